//! The corruption sweep (issue 10): a journal of 83 records in 38 frames and several
//! segments, and start-up's recovery (`startup::recover_store`, the code the binary runs, merge
//! included) against single-bit flips and cuts:
//!
//! - every bit of every frame header (12 bytes: all of it lies in the frame's first 64 bytes),
//! - every bit of the first 64 bytes of the last two frames (where the torn-tail rules decide),
//! - one bit of every 16th payload byte of every frame,
//! - every bit of every segment's file header, and cuts inside it,
//! - cuts at every frame boundary and at six places inside every frame.
//!
//! After a crash the newest segment's frames are followed by the runway (zeros the journal
//! writes ahead of its frames), so the crash run also has:
//!
//! - one bit flipped at 32 places in the runway,
//! - the last frame torn inside the runway: each of its sectors but one zeroed, as a write of
//!   which that sector alone never reached the disk leaves it (and its first sector alone).
//!
//! Each case must end in one of two ways: recovery refuses, naming the file (and, for a flipped
//! bit, exactly the damaged frame's offset, with the flag that would give it up); or it
//! recovers every record of every frame the case left whole, which only a cut or a torn last
//! write of the newest segment, or damage in its runway, of a journal that was not closed
//! cleanly may do. Never fewer records under the same store id. Run twice: as after a crash
//! (the journal dropped) and after a clean shutdown (`Journal::close`), when even a cut at the
//! end is refused.
//!
//! Why not every bit of the first 64 bytes of every frame: each case is a whole recovery, about
//! 45 µs per replayed record in a debug build, and that would be ~20,000 cases per run, several
//! minutes; bits 12 to 64 are payload bits, which the payload sample and the last two frames
//! cover with the same checksum path.

use std::ops::Range;
use std::path::{Path, PathBuf};

use profile_state::journal::codec::{self, BatchRecord, Frame, FrameFormat, UpdateRecord};
use profile_state::journal::{FaultSwitch, Journal, JournalError};
use profile_state::profile::{Field, ProfileKey, ProfileUpdate, Scalar};
use profile_state::startup::recover_store;
use profile_state::store::HistoryLimits;

const RECORDS: u64 = 83;
/// The last batch's size: a frame of several sectors, which the torn-write cases need.
const LAST_BATCH: u64 = 10;
const STORE_ID: &str = "sweep";

/// One frame of the journal: where it is and the revisions it holds.
#[derive(Debug, Clone)]
struct FrameAt {
    segment: usize,
    span: Range<usize>,
    revisions: Range<u64>,
}

/// The journal as written: segment files (path, bytes) and every frame.
struct Written {
    segments: Vec<(PathBuf, Vec<u8>)>,
    frames: Vec<FrameAt>,
    /// Where the newest segment's frames end (its runway's zeros follow after a crash).
    frames_end: usize,
}

fn update(revision: u64) -> UpdateRecord {
    let customer = format!("c{}", revision % 23);
    let update = ProfileUpdate {
        key: ProfileKey::new("2155", customer.as_str()),
        at: chrono::DateTime::from_timestamp(1_700_000_000 + revision as i64, 0).unwrap(),
        fields: vec![
            (Field::GbCustomerId, Some(Scalar::Int(revision as i64 % 5))),
            (Field::TotalPoints, Some(Scalar::Int(revision as i64 * 7))),
            (
                Field::TierName,
                Some(Scalar::Text(format!("tier{}", revision % 4).into())),
            ),
        ],
        extras: vec![("note".into(), Some(serde_json::json!({"n": revision})))],
        origin: profile_state::profile::Origin::Webhook,
    };
    UpdateRecord::new(revision, &update)
}

/// Writes `RECORDS` records in batches of 1 to 3, then one of [`LAST_BATCH`], in segments of
/// about 2 KiB. Small batches: each case replays the records before the damage, and with
/// batches of up to 10 (200 records) the two sweeps took over a minute each of CI's test run,
/// for the same frames and bits.
fn write_journal(dir: &Path, close: bool) -> Written {
    let mut journal = Journal::open(dir, None, 1, 2048, FaultSwitch::default()).unwrap();
    let mut revision = 1;
    let mut size = 1;
    while revision <= RECORDS {
        if revision + LAST_BATCH > RECORDS {
            size = RECORDS + 1 - revision;
        }
        let last = revision + size - 1;
        let updates = (revision..=last).map(update).collect();
        journal.append(&BatchRecord { updates }).unwrap();
        revision = last + 1;
        size = size % 3 + 1;
    }
    if close {
        journal.close().unwrap();
    }
    drop(journal);
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    segments.sort();
    let mut written = Written {
        segments: Vec::new(),
        frames: Vec::new(),
        frames_end: 0,
    };
    let mut next_revision = 1;
    let newest = segments.len() - 1;
    for (index, path) in segments.into_iter().enumerate() {
        let bytes = std::fs::read(&path).unwrap();
        let mut offset = codec::HEADER_LEN;
        while let Frame::Valid { payload, next } =
            codec::read_frame(&bytes, offset, FrameFormat::CURRENT)
        {
            let count = <BatchRecord as prost::Message>::decode(payload)
                .unwrap()
                .updates
                .len() as u64;
            written.frames.push(FrameAt {
                segment: index,
                span: offset..next,
                revisions: next_revision..next_revision + count,
            });
            next_revision += count;
            offset = next;
        }
        // A segment left for the next, and a journal closed cleanly, end at their last frame;
        // after a crash the newest ends in the runway.
        if index == newest && !close {
            assert!(bytes.len() > offset, "a runway after the frames");
            assert!(bytes[offset..].iter().all(|byte| *byte == 0));
        } else {
            assert_eq!(offset, bytes.len());
        }
        written.frames_end = offset;
        written.segments.push((path, bytes));
    }
    assert_eq!(next_revision, RECORDS + 1);
    written
}

/// What start-up made of a case.
enum Outcome {
    Recovered { revision: u64, profiles: usize },
    Refused(JournalError),
}

fn recover(dir: &Path) -> Outcome {
    match recover_store(dir, HistoryLimits::events(100_000), STORE_ID) {
        Ok((store, _)) => {
            assert_eq!(store.store_id(), STORE_ID);
            Outcome::Recovered {
                revision: store.revision(),
                profiles: store.len(),
            }
        }
        Err(error) => Outcome::Refused(error),
    }
}

/// The number of profiles after the first `revisions` records.
fn profiles_after(revisions: u64) -> usize {
    (1..=revisions)
        .map(|r| r % 23)
        .collect::<std::collections::HashSet<_>>()
        .len()
}

struct Sweep<'a> {
    written: &'a Written,
    dir: &'a Path,
    closed: bool,
    cases: usize,
    /// Cases recovered as a torn tail.
    torn: usize,
}

impl Sweep<'_> {
    /// Runs one case: `damaged` replaces segment `segment`; checks the outcome against `frame`
    /// (the frame the damage is in, `None` for a file header) and restores the file. `kept`:
    /// where the frames a crash may have left whole end, if the damage is what a crash can
    /// leave (a cut, a torn last write, zeros or damage in the runway), `None` for a flipped bit.
    fn case(
        &mut self,
        segment: usize,
        damaged: &[u8],
        frame: Option<&FrameAt>,
        kept: Option<usize>,
        what: &str,
    ) {
        self.cases += 1;
        let (path, original) = &self.written.segments[segment];
        std::fs::write(path, damaged).unwrap();
        let outcome = recover(self.dir);
        let newest = segment + 1 == self.written.segments.len();
        match outcome {
            Outcome::Refused(error) => {
                let message = error.to_string();
                assert!(
                    message.contains(&path.display().to_string()),
                    "{what}: the refusal names no file: {message}"
                );
                let (point, first_lost) = error
                    .discard_point()
                    .unwrap_or_else(|| panic!("{what}: refused without a point: {message}"));
                assert!(
                    message.contains(&format!("--discard-journal-from {point}")),
                    "{what}: {message}"
                );
                if let (Some(frame), None) = (frame, kept) {
                    // A flipped bit: refused exactly at the damaged frame.
                    let at =
                        profile_state::journal::DiscardPoint::at(path, frame.span.start as u64);
                    assert_eq!(Some(point), at, "{what}: {message}");
                    assert_eq!(first_lost, frame.revisions.start, "{what}: {message}");
                }
            }
            Outcome::Recovered { revision, profiles } => {
                // Only a crash's torn write at the end of the newest segment may be cut off, and
                // then every frame the cut left whole comes back.
                let kept = kept.filter(|_| newest && !self.closed);
                let kept = kept.unwrap_or_else(|| {
                    panic!("{what}: recovered revision {revision} instead of refusing")
                });
                let whole = self
                    .written
                    .frames
                    .iter()
                    .filter(|f| f.segment < segment || (f.segment == segment && f.span.end <= kept))
                    .map(|f| f.revisions.end - 1)
                    .max()
                    .unwrap_or(0);
                assert_eq!(
                    revision, whole,
                    "{what}: records lost under the same store id"
                );
                assert_eq!(profiles, profiles_after(whole), "{what}");
                self.torn += 1;
            }
        }
        std::fs::write(path, original).unwrap();
    }

    /// Flips every bit of the first `whole` bytes of `frame`, then one bit of every 16th byte.
    fn flips(&mut self, frame: &FrameAt, whole: usize) {
        let original = &self.written.segments[frame.segment].1;
        let whole_end = (frame.span.start + whole).min(frame.span.end);
        let bits = (frame.span.start * 8..whole_end * 8).chain(
            (whole_end..frame.span.end)
                .step_by(16)
                .map(|byte| byte * 8 + byte % 8),
        );
        let mut damaged = original.clone();
        for bit in bits {
            damaged[bit / 8] ^= 1 << (bit % 8);
            let what = format!(
                "segment {} bit {bit} (frame at {})",
                frame.segment, frame.span.start
            );
            self.case(frame.segment, &damaged, Some(frame), None, &what);
            damaged[bit / 8] ^= 1 << (bit % 8);
        }
    }

    /// The crash run's runway cases (see the module doc), in the newest segment.
    fn runway(&mut self) {
        let segment = self.written.segments.len() - 1;
        let original = self.written.segments[segment].1.clone();
        let end = self.written.frames_end;
        let runway = original.len() - end;
        for place in 0..32 {
            let byte = end + runway * place / 32;
            let mut damaged = original.clone();
            damaged[byte] ^= 1 << (place % 8);
            let what = format!("runway bit {place} at {byte}");
            // Nothing was written there that recovery could lose: every frame comes back.
            self.case(segment, &damaged, None, Some(original.len()), &what);
        }
        let last = self.written.frames.last().unwrap().clone();
        let sectors: Vec<usize> = (last.span.start / SECTOR..=(last.span.end - 1) / SECTOR)
            .map(|sector| sector * SECTOR)
            .collect();
        assert!(
            sectors.len() >= 2,
            "the last frame spans {} sectors",
            sectors.len()
        );
        // Each sector of the last frame that is its alone, never written: zeros as the runway.
        for sector in &sectors {
            let from = (*sector).max(last.span.start);
            let to = (sector + SECTOR).min(last.span.end);
            let mut damaged = original.clone();
            damaged[from..to].fill(0);
            let what = format!("last frame's sector at {sector} never written");
            self.case(segment, &damaged, Some(&last), Some(last.span.start), &what);
        }
        // Only its first sector written.
        let mut damaged = original.clone();
        damaged[sectors[1]..last.span.end].fill(0);
        let what = "only the last frame's first sector written";
        self.case(segment, &damaged, Some(&last), Some(last.span.start), what);
    }

    fn cuts(&mut self, frame: &FrameAt) {
        let original = &self.written.segments[frame.segment].1;
        let start = frame.span.start;
        let overhead = FrameFormat::CURRENT.overhead();
        let inside = [
            start,
            start + 1,
            start + overhead - 1,
            start + overhead,
            start + overhead + 1,
            (start + frame.span.end) / 2,
            frame.span.end - 1,
        ];
        for at in inside {
            let what = format!("segment {} cut at {at} (frame at {start})", frame.segment);
            self.case(frame.segment, &original[..at], Some(frame), Some(at), &what);
        }
    }

    fn file_headers(&mut self) {
        for segment in 0..self.written.segments.len() {
            let original = self.written.segments[segment].1.clone();
            for bit in 0..codec::HEADER_LEN * 8 {
                let mut damaged = original.clone();
                damaged[bit / 8] ^= 1 << (bit % 8);
                self.file_header_case(
                    segment,
                    &damaged,
                    &format!("segment {segment} header bit {bit}"),
                );
            }
            for len in 1..codec::HEADER_LEN {
                self.file_header_case(
                    segment,
                    &original[..len],
                    &format!("segment {segment} cut at {len}"),
                );
            }
        }
    }

    /// A damaged file header: always refused, naming the file (a flipped version may read as
    /// a newer format, which no point can give up).
    fn file_header_case(&mut self, segment: usize, damaged: &[u8], what: &str) {
        self.cases += 1;
        let (path, original) = &self.written.segments[segment];
        std::fs::write(path, damaged).unwrap();
        match recover(self.dir) {
            Outcome::Refused(error) => assert!(
                error.to_string().contains(&path.display().to_string()),
                "{what}: {error}"
            ),
            Outcome::Recovered { revision, .. } => {
                panic!("{what}: recovered revision {revision} instead of refusing")
            }
        }
        std::fs::write(path, original).unwrap();
    }
}

/// The disk sector the torn-write rules reason in.
const SECTOR: usize = 512;

/// A directory on a RAM disk when there is one: cutting a torn tail syncs the file, and
/// thousands of syncs on a real disk would make the sweep slow.
fn scratch_dir() -> tempfile::TempDir {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(dir) => dir,
        Err(_) => tempfile::tempdir().unwrap(),
    }
}

fn sweep(closed: bool) {
    let dir = scratch_dir();
    let written = write_journal(dir.path(), closed);
    assert!(
        written.segments.len() >= 3,
        "{} segments",
        written.segments.len()
    );
    assert_eq!(written.frames.len(), 38);
    match recover(dir.path()) {
        Outcome::Recovered { revision, .. } => assert_eq!(revision, RECORDS),
        Outcome::Refused(error) => panic!("the undamaged journal: {error}"),
    }
    let mut sweep = Sweep {
        written: &written,
        dir: dir.path(),
        closed,
        cases: 0,
        torn: 0,
    };
    let last_two = written.frames.len() - 2;
    for (index, frame) in written.frames.iter().enumerate() {
        let whole = if index >= last_two {
            64
        } else {
            FrameFormat::CURRENT.overhead()
        };
        sweep.flips(frame, whole);
        sweep.cuts(frame);
    }
    sweep.file_headers();
    if !closed {
        sweep.runway();
    }
    eprintln!(
        "{} cases over {} frames in {} segments ({}): {} recovered as a torn tail, the rest refused",
        sweep.cases,
        written.frames.len(),
        written.segments.len(),
        if closed {
            "closed cleanly"
        } else {
            "as after a crash"
        },
        sweep.torn,
    );
    // Every cut inside the newest segment's frames and every runway case, and nothing else,
    // after a crash; none after a clean shutdown.
    let newest = written.segments.len() - 1;
    let newest_frames = written
        .frames
        .iter()
        .filter(|f| f.segment == newest)
        .count();
    let last = written.frames.last().unwrap();
    let last_sectors = (last.span.end - 1) / SECTOR - last.span.start / SECTOR + 1;
    let runway_cases = 32 + last_sectors + 1;
    let expected = if closed {
        0
    } else {
        newest_frames * 7 + runway_cases
    };
    assert_eq!(sweep.torn, expected);
}

#[test]
fn every_flipped_bit_and_cut_after_a_crash_is_refused_or_a_torn_tail() {
    sweep(false);
}

#[test]
fn every_flipped_bit_and_cut_after_a_clean_shutdown_is_refused() {
    sweep(true);
}
