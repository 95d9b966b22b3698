//! Recovery: the snapshot the journal continues from, then every later record replayed
//! through the sequencer's merge; a write a crash cut short cut off, anything else refused.
//! [`start_past`] tells the caller which newer snapshot would not need what a refusal found
//! damaged; [`recover_from`] starts from it (the caller decides, and warns).
//!
//! What counts as a torn write (cut off with a warning): only the last thing in the newest
//! segment, only when the journal was not closed cleanly (`JOURNAL_HEAD`), and only when it
//! looks like what a crash leaves: bytes missing at the end of the file, or a run of zeros
//! within one disk sector (a sector that never reached the disk) with no valid frame after
//! it, or, over the runway, a frame zero from a page boundary on (a kill stopped its write).
//! A bit flipped in a header or a payload is none of these, so it stops start-up naming the
//! file and offset, and so does any damage before the end, a gap in the revisions or
//! revisions that go back, a segment `JOURNAL_HEAD` records that is gone, and a journal that
//! does not end where a clean shutdown left it.
//!
//! A segment's frames are checked and decoded (protobuf to [`ProfileUpdate`]) on a second
//! thread while this one merges the batches before them, in order: at a million profiles the
//! decoding was about a third of the replay, and the core beside the merge was idle. Segments
//! are read whole into one buffer reused from segment to segment.
//!
//! This module does not merge or number anything itself (the `replay` callback does) and does
//! not write the journal beyond cutting a torn tail, or the runway of zeros the writer keeps
//! after its frames (`super::writer`), which ends the newest segment after a crash: an all-zero
//! rest of the newest segment of a journal not closed cleanly is the end of its frames, cut off
//! with an info line; zeros anywhere else are judged as any other bytes.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::codec::{
    self, ClosedAt, Frame, FrameFormat, HeaderError, Invalid, Malformed, SEGMENT_MAGIC,
};
use super::writer::{RUNWAY_BYTES, TEMP_SUFFIX, Tail, segment_path};
use super::{JournalError, SEGMENT_PREFIX, head, segments, snapshot, wire};
use crate::profile::ProfileUpdate;
use crate::store::Store;

/// One journaled update as recovery hands it to `replay`: the revision it was recorded with,
/// and the update.
pub type Replayed = (u64, ProfileUpdate);

/// What recovery found and did.
#[derive(Debug)]
pub struct Recovered {
    /// The snapshot loaded, if any.
    pub snapshot: Option<u64>,
    /// How many update records were replayed after it.
    pub replayed: u64,
    /// Where appends continue; `None` when there is no segment yet, or when appends must start
    /// a new one (see `journal_ended_at`).
    pub tail: Option<Tail>,
    /// How long each part took (start-up time is downtime: the log says where it went).
    pub took: Took,
    /// Where the journal's records ended when a snapshot past them was found, so that the
    /// journal is known to have lost records it had synced (set by start-up,
    /// `crate::startup::recover_store`, which then starts from that snapshot); `None` from
    /// recovery itself.
    pub journal_ended_at: Option<u64>,
}

/// How long each part of recovery took.
#[derive(Debug, Default)]
pub struct Took {
    /// Loading the snapshot into the store (zero without one).
    pub snapshot: Duration,
    /// Reading and replaying the journal after it.
    pub replay: Duration,
    /// Building the key order of every profile, once, at the end.
    pub key_order: Duration,
}

/// The unit a crash can leave unwritten inside a write that reached the file's length: such a
/// sector reads back as zeros.
const SECTOR: usize = 512;
/// A torn write shows as at least this many zeros within one sector; shorter runs of zeros
/// occur in frames (a length's high bytes, a zero value) and prove nothing.
const MIN_ZEROED: usize = 8;
/// The most payload bytes the search for a valid frame after damage checksums (format 1, whose
/// lengths are unchecked, needs payload checksums to recognise a frame).
const SEARCH_BUDGET: usize = 64 << 20;

/// Rebuilds `store` from the snapshot and journal in `dir`: profiles, revision and history.
///
/// `replay` applies one batch of `(revision, update)` records to the store and fails if they
/// do not produce exactly those revisions (it is the sequencer's merge).
pub fn recover(
    dir: &Path,
    store: &Store,
    replay: impl FnMut(Vec<Replayed>) -> Result<(), String>,
) -> Result<Recovered, JournalError> {
    recover_from(dir, store, 0, replay)
}

/// [`recover`] from a snapshot of revision `at_least` or later (0: any), and the journal after
/// it: the way past damage that such a snapshot covers ([`start_past`]).
pub fn recover_from(
    dir: &Path,
    store: &Store,
    at_least: u64,
    mut replay: impl FnMut(Vec<Replayed>) -> Result<(), String>,
) -> Result<Recovered, JournalError> {
    remove_temporary_files(dir)?;
    let head = head::read(dir)?;
    let newest_recorded = head.as_ref().map_or(0, |head| head.newest_segment);
    let segments = without_unfinished_newest(segments(dir)?, newest_recorded)?;
    if head.is_none() && !segments.is_empty() {
        tracing::warn!(
            "no {}: recovering without checking for a removed newest segment or a cut end; \
             the journal writes one now",
            head::FILE
        );
    }
    let snapshot = snapshot::choose(dir, &segments, at_least)?;
    if at_least > 0 && snapshot.is_none() {
        // Without a snapshot past the damage there is nothing to start from: an empty store
        // would lose everything (a restored directory holds one snapshot and no journal).
        return Err(JournalError::Format {
            path: dir.to_owned(),
            reason: format!("no snapshot of revision {at_least} or later to start from"),
        });
    }
    let from = snapshot.as_ref().map_or(0, |(revision, _)| *revision);
    let room_for_replay = records_after(&segments, from);
    let mut took = Took::default();
    let started = Instant::now();
    match &snapshot {
        Some((revision, path)) => load_snapshot(store, *revision, path, room_for_replay)?,
        None => store.reserve_profiles(room_for_replay),
    }
    took.snapshot = started.elapsed();
    // After a clean shutdown nothing can be torn: the newest segment ends where it was left.
    let closed = head
        .and_then(|head| head.closed)
        .filter(|_| segments.last().map(|(first, _)| *first) == Some(newest_recorded));
    let mut replaying = Replaying {
        store,
        replay: &mut replay,
        replayed: 0,
    };
    let mut tail = None;
    // One buffer for every segment read: a fresh 90 MB read per segment made the kernel zero
    // its pages again (a fifth of the replay phase at a million profiles).
    let mut buffer = Vec::new();
    for (index, (first, path)) in segments.iter().enumerate() {
        let is_last = index + 1 == segments.len();
        // A segment wholly covered by the snapshot needs no reading.
        if let Some((next_first, _)) = segments.get(index + 1)
            && *next_first <= store.revision() + 1
        {
            continue;
        }
        if *first > store.revision() + 1 {
            return Err(JournalError::Gap {
                path: path.clone(),
                offset: 0,
                expected: store.revision() + 1,
                found: *first,
                previous: index
                    .checked_sub(1)
                    .map(|before| segments[before].1.clone()),
            });
        }
        read_whole(path, &mut buffer)?;
        let bytes = buffer.as_slice();
        let format = segment_format(path, bytes, store)?;
        // A clean-shutdown mark speaks only for a segment of this format: an older build,
        // which knows nothing of the mark, may have appended to an older one since.
        let closed_here = closed.is_some() && format == FrameFormat::CURRENT;
        let may_be_torn = is_last && !closed_here;
        let end = replaying.segment(path, bytes, format, may_be_torn)?;
        if is_last {
            tail = Some(Tail {
                path: path.clone(),
                len: end,
                first_revision: *first,
                format,
            });
        }
    }
    check_against_head(dir, store, newest_recorded, closed, tail.as_ref())?;
    took.replay = started.elapsed().saturating_sub(took.snapshot);
    // The snapshot's keys and those of the profiles the replay created wait for their key
    // order, built once, here.
    store.order_replayed();
    took.key_order = started
        .elapsed()
        .saturating_sub(took.snapshot + took.replay);
    Ok(Recovered {
        snapshot: snapshot.map(|(revision, _)| revision),
        replayed: replaying.replayed,
        tail,
        took,
        journal_ended_at: None,
    })
}

/// Where recovery, stopped by `error`, could start instead without reading what is damaged:
/// the least revision a snapshot must have to pass it. A damaged snapshot is passed by any
/// newer one. Damage in a segment that is not the newest (a damaged record, revisions that
/// jump), or a segment missing before one, is passed by a snapshot at or past the revision
/// before the next segment: recovery does not read a segment a snapshot covers whole. `None`
/// for anything else, damage in the newest segment among it: every start reads that one.
/// Whether such a snapshot exists, and whether the journal continues from it, is for the
/// caller's next recovery to find.
pub fn start_past(dir: &Path, error: &JournalError) -> Result<Option<u64>, JournalError> {
    let next_segment_after = |path: &Path| -> Result<Option<u64>, JournalError> {
        let segments = segments(dir)?;
        let index = segments.iter().position(|(_, segment)| segment == path);
        let next = index.and_then(|index| segments.get(index + 1));
        Ok(next.map(|(next_first, _)| next_first - 1))
    };
    match error {
        JournalError::DamagedSnapshot { path, .. } => {
            let name = path.file_name().and_then(|name| name.to_str());
            Ok(name.and_then(snapshot::number).map(|revision| revision + 1))
        }
        // Between segments: the segment `path` starts past the revision expected.
        JournalError::Gap {
            offset: 0,
            found,
            previous: Some(_),
            ..
        } => Ok(Some(found.saturating_sub(1))),
        JournalError::Gap { path, .. } | JournalError::Corrupt { path, .. } => {
            next_segment_after(path)
        }
        _ => Ok(None),
    }
}

/// Reads the file `path` into `buffer`, replacing what it held and keeping its capacity.
fn read_whole(path: &Path, buffer: &mut Vec<u8>) -> Result<(), JournalError> {
    buffer.clear();
    File::open(path)
        .and_then(|mut file| {
            let len = file.metadata()?.len();
            buffer.reserve(usize::try_from(len).unwrap_or(0));
            file.read_to_end(buffer)
        })
        .map_err(JournalError::io(path, "read"))?;
    Ok(())
}

/// About how many records the journal holds after `revision`: exact for every segment but
/// the newest (the next one's first revision says), the newest one's estimated from its size
/// at the others' bytes per record (none counted when it is the only one). A segment never
/// counts more records than its bytes can hold, and the whole never more than
/// [`MAX_REPLAY_RESERVE`]: the names of a damaged directory must not size an allocation.
///
/// The profile map makes room for that many new profiles before loading, because growing it
/// while the replay adds profiles rehashes every one already loaded, each a pointer chase to
/// its key: a tenth of recovery's CPU at a million profiles. An over-estimate (records that
/// update profiles already there) costs table slots (9 bytes each), never correctness.
pub(super) fn records_after(segments: &[(u64, PathBuf)], revision: u64) -> usize {
    let size = |path: &Path| fs::metadata(path).map_or(0, |metadata| metadata.len());
    // Records of revisions up to `revision` that a segment starting at `first` holds.
    let covered = |first: u64| (revision + 1).saturating_sub(first);
    let (mut records, mut whole_records, mut whole_bytes) = (0u64, 0u64, 0u64);
    for pair in segments.windows(2) {
        let [(first, path), (next_first, _)] = pair else {
            continue;
        };
        let bytes = size(path);
        let held = next_first
            .saturating_sub(*first)
            .min(bytes / MIN_RECORD_BYTES);
        records += held.saturating_sub(covered(*first));
        whole_records += held;
        whole_bytes += bytes;
    }
    if let Some((first, path)) = segments.last()
        && whole_records > 0
        && whole_bytes > 0
    {
        let estimated =
            u128::from(written_len(path)) * u128::from(whole_records) / u128::from(whole_bytes);
        let estimated = u64::try_from(estimated).unwrap_or(u64::MAX);
        records += estimated.saturating_sub(covered(*first));
    }
    usize::try_from(records.min(MAX_REPLAY_RESERVE)).unwrap_or(usize::MAX)
}

/// The length of the file `path` without the zeros it ends in, looked for in its last
/// [`RUNWAY_BYTES`] (what the runway a crash leaves can be): the newest segment's records are
/// estimated from it. Zero when it cannot be read (recovery reports that when it reads it).
fn written_len(path: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let Ok(file) = File::open(path) else { return 0 };
    let size = file.metadata().map_or(0, |metadata| metadata.len());
    let window = size.min(RUNWAY_BYTES);
    let mut end = vec![0; window as usize];
    if file.read_exact_at(&mut end, size - window).is_err() {
        return size;
    }
    size - window + written_end(&end) as u64
}

/// Fewer bytes than any record this service writes takes (its revision, customer id and time
/// alone take more): what bounds the records a segment is counted as holding, whatever the
/// names around it say, so the room made is at most about its size.
const MIN_RECORD_BYTES: u64 = 8;

/// The most profiles recovery makes room for ahead of a replay; beyond it the map grows as
/// profiles arrive.
const MAX_REPLAY_RESERVE: u64 = 1 << 24;

/// Loads the snapshot `path` (as of `revision`) into the store, with room for `more` profiles
/// beyond those it holds.
fn load_snapshot(
    store: &Store,
    revision: u64,
    path: &Path,
    more: usize,
) -> Result<(), JournalError> {
    let read = snapshot::read(path, |expected, profiles| {
        store.reserve_profiles(expected.saturating_add(more));
        // `recover` orders the keys once, after the replay.
        store.restore_unordered(expected, profiles, revision)
    })?;
    if read != revision {
        return Err(JournalError::DamagedSnapshot {
            path: path.to_owned(),
            offset: codec::HEADER_LEN as u64,
            reason: format!("the snapshot's header says revision {read}, its name {revision}"),
        });
    }
    Ok(())
}

/// `segments` without a newest one whose file header was never completed (shorter than a
/// header), which a crash while an earlier build created it in place leaves: it never held a
/// record, and is removed. Not the one `JOURNAL_HEAD` records (`newest_recorded`): that one
/// held records. Removed before recovery reads any segment, so that the one before it is read
/// as the newest, as it was (its end may be a torn write or a runway of zeros); when it was
/// removed during the read, the one before it had been read as an older one, and start-up
/// refused, saying that intact segment was missing (adversary round 12, F7).
fn without_unfinished_newest(
    mut segments: Vec<(u64, PathBuf)>,
    newest_recorded: u64,
) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    while let Some((first, path)) = segments.last()
        && *first != newest_recorded
        && fs::metadata(path)
            .map_err(JournalError::io(path, "read"))?
            .len()
            < codec::HEADER_LEN as u64
    {
        tracing::warn!(segment = %path.display(), "removing a segment whose header was never completed");
        fs::remove_file(path).map_err(JournalError::io(path, "remove"))?;
        segments.pop();
    }
    Ok(segments)
}

/// How the segment `path` (its `bytes`) lays out its frames, from its file header.
fn segment_format(path: &Path, bytes: &[u8], store: &Store) -> Result<FrameFormat, JournalError> {
    match codec::check_header(bytes, SEGMENT_MAGIC) {
        Ok(format) => Ok(format),
        Err(error @ HeaderError::UnknownVersion { .. }) => Err(JournalError::Format {
            path: path.to_owned(),
            reason: format!("not a journal segment this build reads: {error}"),
        }),
        Err(error) => Err(JournalError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            reason: error.to_string(),
            first_lost: store.revision() + 1,
        }),
    }
}

/// The segment `JOURNAL_HEAD` records as the newest (or a newer one) must be there, and after
/// a clean shutdown the journal must end exactly where it was left (if its newest segment is of
/// this format; see `recover`).
fn check_against_head(
    dir: &Path,
    store: &Store,
    newest_recorded: u64,
    closed: Option<ClosedAt>,
    tail: Option<&Tail>,
) -> Result<(), JournalError> {
    let newest_present = tail.map_or(0, |tail| tail.first_revision);
    if newest_present < newest_recorded {
        return Err(JournalError::MissingSegment {
            path: segment_path(dir, newest_recorded),
            first_lost: store.revision() + 1,
        });
    }
    if let (Some(closed), Some(tail)) = (closed, tail)
        && tail.format == FrameFormat::CURRENT
        && (tail.len != closed.segment_len || store.revision() != closed.revision)
    {
        return Err(JournalError::ChangedSinceShutdown {
            path: tail.path.clone(),
            offset: tail.len,
            revision: store.revision(),
            closed_len: closed.segment_len,
            closed_revision: closed.revision,
        });
    }
    Ok(())
}

/// Replays segments into the store.
struct Replaying<'a, F> {
    store: &'a Store,
    replay: &'a mut F,
    replayed: u64,
}

/// How many decoded batches the decoding thread may be ahead of the merge.
const DECODED_AHEAD: usize = 32;

/// A batch's records as the decoding thread leaves them: each one's revision, and its update
/// or why that does not decode.
type DecodedRecords = wire::DecodedUpdates;

/// What the decoding thread found at a frame of a segment, in file order.
enum Decoded {
    /// A batch that may hold records from the segment's floor on: its records (those of the
    /// first batch that reaches the floor from the floor on, the later ones' all) or why the
    /// batch does not decode.
    Batch {
        offset: usize,
        records: Result<DecodedRecords, String>,
    },
    /// The valid frames end here, at the end of the file.
    End { offset: usize },
    /// No valid frame at `offset`.
    Invalid { offset: usize, invalid: Invalid },
}

impl<F: FnMut(Vec<Replayed>) -> Result<(), String>> Replaying<'_, F> {
    /// Replays the frames of one segment (`bytes`, laid out as `format`); returns where its
    /// valid frames end. When `may_be_torn`, a torn last write is cut off the file.
    ///
    /// A scoped thread decodes the frames ahead (`decode_frames`); this one applies them in
    /// file order, so what is replayed, and which error stops it, is as if decoded here.
    fn segment(
        &mut self,
        path: &Path,
        bytes: &[u8],
        format: FrameFormat,
        may_be_torn: bool,
    ) -> Result<u64, JournalError> {
        let floor = self.store.revision() + 1;
        let (sender, decoded) = mpsc::sync_channel(DECODED_AHEAD);
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("journal-decode".into())
                .spawn_scoped(scope, move || decode_frames(bytes, format, floor, &sender))
                .map_err(JournalError::io(path, "start the decoding thread for"))?;
            // `decoded` is dropped on return, so the decoder stops at its next send.
            self.apply(path, bytes, format, floor, may_be_torn, decoded)
        })
    }

    /// Applies what `decode_frames` sends, in order, until the segment's valid frames end.
    /// `floor` is the first revision the segment's replay needs (the ones before it are the
    /// snapshot's).
    fn apply(
        &mut self,
        path: &Path,
        bytes: &[u8],
        format: FrameFormat,
        floor: u64,
        may_be_torn: bool,
        decoded: mpsc::Receiver<Decoded>,
    ) -> Result<u64, JournalError> {
        for item in decoded {
            let first_lost = self.store.revision() + 1;
            let corrupt = |offset: usize, reason: String| JournalError::Corrupt {
                path: path.to_owned(),
                offset: offset as u64,
                reason,
                first_lost,
            };
            match item {
                Decoded::End { offset } => return Ok(offset as u64),
                Decoded::Batch { offset, records } => {
                    let records = records.map_err(|reason| corrupt(offset, reason))?;
                    self.batch(path, offset, records, floor)?;
                }
                Decoded::Invalid { offset, invalid } => {
                    if may_be_torn && all_zero(&bytes[offset..]) {
                        cut_runway(path, bytes.len(), offset)?;
                        return Ok(offset as u64);
                    }
                    if may_be_torn && is_torn(bytes, offset, format, invalid) {
                        cut_torn_tail(path, bytes.len(), offset, invalid)?;
                        return Ok(offset as u64);
                    }
                    return Err(corrupt(offset, invalid.reason().into()));
                }
            }
        }
        unreachable!("the decoder ends every segment with its end or an invalid frame")
    }

    /// Replays the `records` of the batch at `offset` that the store does not hold yet, after
    /// checking their revisions against the journal's order (`floor` as in `apply`).
    fn batch(
        &mut self,
        path: &Path,
        offset: usize,
        records: DecodedRecords,
        floor: u64,
    ) -> Result<(), JournalError> {
        let first_lost = self.store.revision() + 1;
        let corrupt = |reason: String| JournalError::Corrupt {
            path: path.to_owned(),
            offset: offset as u64,
            reason,
            first_lost,
        };
        let revisions = records.iter().map(|(revision, _)| *revision);
        if let Some(reason) = out_of_order(revisions, floor, first_lost) {
            return Err(corrupt(reason));
        }
        let pending: Vec<_> = records
            .into_iter()
            .filter(|(revision, _)| *revision >= first_lost)
            .collect();
        match pending.first() {
            None => return Ok(()),
            Some((revision, _)) if *revision != first_lost => {
                return Err(JournalError::Gap {
                    path: path.to_owned(),
                    offset: offset as u64,
                    expected: first_lost,
                    found: *revision,
                    previous: None,
                });
            }
            Some(_) => {}
        }
        self.replayed += pending.len() as u64;
        let updates = pending
            .into_iter()
            .map(|(revision, update)| Ok((revision, update?)))
            .collect::<Result<Vec<_>, Malformed>>()
            .map_err(|error| corrupt(error.to_string()))?;
        (self.replay)(updates).map_err(corrupt)
    }
}

/// How a batch's `revisions` break the journal's order, if they do: each one must follow the
/// one before it, and once the replay is past the segment's `floor` (`next`, the revision it
/// needs, above it) none may be one it already has. Before that, revisions below `next` are
/// the snapshot's and are skipped.
fn out_of_order(revisions: impl Iterator<Item = u64>, floor: u64, next: u64) -> Option<String> {
    let mut previous: Option<u64> = None;
    for revision in revisions {
        if let Some(previous) = previous
            && revision != previous.wrapping_add(1)
        {
            return Some(format!(
                "revision {revision} follows revision {previous} in one batch"
            ));
        }
        if next > floor && revision < next {
            return Some(format!(
                "revision {revision} again: the replay already has it (it needs {next} next)"
            ));
        }
        previous = Some(revision);
    }
    None
}

/// The frames of a segment from its header on, decoded and sent in order, ending with its
/// end or its first invalid frame. A batch whose last revision is before `floor` (the
/// snapshot holds it: after a snapshot, most of a segment) is skipped without decoding its
/// updates. Stops early when the receiver is gone.
fn decode_frames(bytes: &[u8], format: FrameFormat, floor: u64, out: &mpsc::SyncSender<Decoded>) {
    let mut offset = codec::HEADER_LEN;
    let mut accounts = None;
    // Past the first batch that reaches the floor, the batches are decoded whole without
    // looking for their last revision first: in a sound journal they are all above it
    // (revisions only grow), and `apply` refuses one that holds a revision it already has.
    let mut past_floor = false;
    loop {
        let (item, next) = match codec::read_frame(bytes, offset, format) {
            Frame::End => (Decoded::End { offset }, None),
            Frame::Invalid(invalid) => (Decoded::Invalid { offset, invalid }, None),
            Frame::Valid { payload, next } => {
                let last = match past_floor {
                    true => Ok(None),
                    false => wire::last_revision(payload),
                };
                match last {
                    Ok(last) if last.is_some_and(|last| last < floor) => {
                        offset = next;
                        continue;
                    }
                    Ok(last) => {
                        let from = if past_floor { 0 } else { floor };
                        // An empty batch reaches nothing.
                        past_floor |= last.is_some();
                        let records = decode_batch(payload, from, &mut accounts);
                        (Decoded::Batch { offset, records }, Some(next))
                    }
                    Err(error) => {
                        let records = Err(format!("undecodable batch: {error}"));
                        (Decoded::Batch { offset, records }, None)
                    }
                }
            }
        };
        if out.send(item).is_err() {
            return;
        }
        match next {
            Some(next) => offset = next,
            None => return,
        }
    }
}

/// A batch's records from `floor` on, each decoded into its update or why it does not decode.
/// Read straight from the bytes (`wire`): prost's records and their conversion were the
/// decoding thread's time, and that thread is the replay's bottleneck at start-up.
fn decode_batch(
    payload: &[u8],
    floor: u64,
    accounts: &mut Option<arcstr::ArcStr>,
) -> Result<DecodedRecords, String> {
    wire::decode_updates(payload, floor, accounts)
        .map_err(|error| format!("undecodable batch: {error}"))
}

/// Whether the invalid frame at `offset`, the last thing in the newest segment, is a write a
/// crash cut short (never acknowledged): bytes missing at the end, or a sector left zero, and
/// no valid frame after it. Anything else is damage to a frame that was acknowledged.
fn is_torn(bytes: &[u8], offset: usize, format: FrameFormat, invalid: Invalid) -> bool {
    match invalid {
        Invalid::HeaderCutOff => true,
        // A sound header's length is believed. Format 1's is unchecked: a valid frame further
        // on means the length was damaged, not the write cut short.
        Invalid::PayloadCutOff { .. } => {
            format != FrameFormat::V1 || !valid_frame_after(bytes, offset + 1, format)
        }
        // The runway's zeros after the frame prove nothing of a damaged header: only zeros in
        // its own sectors up to the last byte written do, or a header that runs into the zeros.
        Invalid::HeaderDamaged => {
            let written = written_end(bytes);
            (zeroed_sector(bytes, offset, written) || written < offset + format.overhead())
                && !valid_frame_after(bytes, offset + 1, format)
        }
        // Bytes after a complete frame (other than the runway's zeros) mean it was not the
        // last write: it was acknowledged.
        Invalid::PayloadDamaged { claimed_end } => {
            all_zero(&bytes[claimed_end..])
                && (zeroed_sector(bytes, offset, claimed_end)
                    || zeroed_from_page(bytes, offset, claimed_end))
        }
        Invalid::ImplausibleLength => false,
    }
}

/// Whether the frame `bytes[from..to]` is a write into the runway that a kill stopped at the
/// last page boundary inside it (the kernel copies a write into the page cache a page at a
/// time and gives up between pages for a fatal signal): zeros from there on, as few as one,
/// fewer than [`MIN_ZEROED`], and before them the start of the end mark every batch frame
/// carries ([`codec::BATCH_END_MARK`]), so that only the mark is missing. Before the runway such
/// a write left the file short instead (`PayloadCutOff`). More missing bytes fill a sector's
/// part with zeros, which `zeroed_sector` reads; a frame without the mark (an earlier build's)
/// never passes here.
fn zeroed_from_page(bytes: &[u8], from: usize, to: usize) -> bool {
    let mark = codec::BATCH_END_MARK;
    let boundary = (to - 1) / PAGE * PAGE;
    let missing = to - boundary;
    boundary > from
        && missing <= mark.len()
        && to >= from + mark.len()
        && all_zero(&bytes[boundary..to])
        && bytes[to - mark.len()..boundary] == mark[..mark.len() - missing]
}

/// The unit the kernel copies a write into the page cache in.
const PAGE: usize = 4096;

/// Whether `bytes[from..to]` holds, within one sector, a run of at least [`MIN_ZEROED`] zeros
/// that fills that sector's part of the range.
fn zeroed_sector(bytes: &[u8], from: usize, to: usize) -> bool {
    let mut start = from;
    while start < to {
        let end = ((start / SECTOR + 1) * SECTOR).min(to);
        let chunk = &bytes[start..end];
        if chunk.len() >= MIN_ZEROED && chunk.iter().all(|byte| *byte == 0) {
            return true;
        }
        start = end;
    }
    false
}

/// Whether `bytes` are all zeros (none: also true): the runway the writer keeps after its
/// frames, or what is left of it.
fn all_zero(bytes: &[u8]) -> bool {
    // Compared a block at a time (`memcmp`): a megabyte per start-up after a crash, and per
    // case of the corruption sweep's thousands, where a byte loop in a debug build was slow.
    bytes
        .chunks(ZEROS.len())
        .all(|chunk| chunk == &ZEROS[..chunk.len()])
}

/// A block of zeros to compare with.
static ZEROS: [u8; 4096] = [0; 4096];

/// Where the bytes that are not zeros end: the zeros after are the runway, or nothing.
fn written_end(bytes: &[u8]) -> usize {
    let zero_blocks = bytes
        .rchunks(ZEROS.len())
        .take_while(|chunk| all_zero(chunk))
        .count();
    let before = bytes.len().saturating_sub(zero_blocks * ZEROS.len());
    bytes[..before]
        .iter()
        .rposition(|byte| *byte != 0)
        .map_or(0, |last| last + 1)
}

/// Whether a valid frame with a payload starts anywhere from `from` on.
fn valid_frame_after(bytes: &[u8], from: usize, format: FrameFormat) -> bool {
    // Such a frame's length is not zero, so it starts before the zeros the file may end in
    // (the runway: a megabyte of offsets not worth a look each).
    let mut budget = SEARCH_BUDGET;
    for offset in from..written_end(bytes) {
        let checked = match codec::read_frame(bytes, offset, format) {
            Frame::Valid { payload, .. } if !payload.is_empty() => return true,
            Frame::Valid { payload, .. } => payload.len(),
            Frame::Invalid(Invalid::PayloadDamaged { claimed_end }) => claimed_end - offset,
            _ => 0,
        };
        budget = budget.saturating_sub(checked);
        if budget == 0 {
            return false;
        }
    }
    false
}

/// Cuts off the runway (zeros written ahead of the frames, `offset` to `len`) that a crash
/// left at the end of the newest segment: not damage, and not a torn write.
fn cut_runway(path: &Path, len: usize, offset: usize) -> Result<(), JournalError> {
    tracing::info!(
        segment = %path.display(),
        offset,
        zero_bytes = len - offset,
        "the newest segment ends in zeros written ahead of its records (a crash left them); \
         cutting them off"
    );
    cut(path, offset)
}

/// Cuts the segment `path` at `offset`, synced.
fn cut(path: &Path, offset: usize) -> Result<(), JournalError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(JournalError::io(path, "open to cut the end of"))?;
    file.set_len(offset as u64)
        .and_then(|()| file.sync_all())
        .map_err(JournalError::io(path, "cut the end of"))
}

fn cut_torn_tail(
    path: &Path,
    len: usize,
    offset: usize,
    invalid: Invalid,
) -> Result<(), JournalError> {
    tracing::warn!(
        segment = %path.display(),
        offset,
        dropped_bytes = len - offset,
        reason = invalid.reason(),
        "cutting off a torn last record: what a crash mid-write leaves (a write never synced, \
         so never acknowledged); had the file been cut short by other means after an unclean \
         stop, updates in the cut part would be lost, which only a snapshot past the cut shows \
         (start-up then starts from it, under a new store id)"
    );
    cut(path, offset)
}

/// Removes what an interrupted segment creation or snapshot left: a temporary file never
/// renamed into place holds nothing recovery needs (and a snapshot's can be large).
fn remove_temporary_files(dir: &Path) -> Result<(), JournalError> {
    let temporary = [
        (SEGMENT_PREFIX, TEMP_SUFFIX),
        (snapshot::PREFIX, snapshot::TEMP_SUFFIX),
    ];
    for entry in fs::read_dir(dir).map_err(JournalError::io(dir, "list"))? {
        let path = entry.map_err(JournalError::io(dir, "list"))?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        if temporary
            .iter()
            .any(|(prefix, suffix)| name.starts_with(prefix) && name.ends_with(suffix))
        {
            tracing::info!(file = %path.display(), "removing a file whose writing was cut off");
            fs::remove_file(&path).map_err(JournalError::io(&path, "remove"))?;
        }
    }
    Ok(())
}
