//! The append side of the journal: one frame per group commit, synced, segments rotated by
//! size, and a failed write cut off again.
//!
//! After a failed write, [`Journal::probe`] tries the same path an append would take (the
//! repair, the new segment if one is due, a write of the failed frame's size and a sync), so a
//! probe that succeeds means the next append of that size will. A new segment is written under
//! a temporary name and renamed into place once its header is synced: a failure (a full disk)
//! leaves no half-created segment behind, and the next try starts from scratch. Every new
//! segment is recorded in `JOURNAL_HEAD` before it gets a record, and a clean
//! [`Journal::close`] records where the journal ends (see [`super::head`]).
//!
//! Frames are always written in the current format: a recovered tail of an older format is not
//! appended to, the first append starts a new segment.
//!
//! Frames are written into zeros written ahead of them (the runway, [`RUNWAY_BYTES`] at a
//! time, synced with the frame that needed it): on ext4 an `fdatasync` of a write that grows
//! the file also commits the file system's journal (the new size), and one of a write over
//! blocks already there does not, which made a sync about a third cheaper on this service's
//! disks. Recovery reads an all-zero end of the newest segment as the end of its frames. The
//! runway is cut off before a segment is left for the next one and at a clean
//! [`Journal::close`], so only a crash leaves one behind, and a finished segment ends at its
//! last frame as before (earlier builds read it as they did).
//!
//! This module does not read the journal back (see [`super::recovery`]) and does not decide
//! what goes into a frame (the sequencer does).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::codec::{self, BatchRecord, ClosedAt, FrameFormat, JournalHead, SEGMENT_MAGIC};
use super::{FaultSwitch, JournalError, SEGMENT_PREFIX, SEGMENT_SUFFIX, head};
use crate::data_dir::sync_dir;

/// Where appends continue after recovery.
#[derive(Debug)]
pub struct Tail {
    /// The last segment.
    pub path: PathBuf,
    /// Its length up to the last valid frame.
    pub len: u64,
    /// Its first revision (its name).
    pub first_revision: u64,
    /// How its frames are laid out.
    pub format: FrameFormat,
}

/// The append side of the journal, owned by the sequencer.
pub struct Journal {
    dir: PathBuf,
    file: SegmentFile,
    path: PathBuf,
    /// The current segment's first revision (its name).
    segment_first: u64,
    /// The last revision appended (or recovered).
    last_revision: u64,
    /// Bytes known good: the header and whole, synced frames.
    len: u64,
    /// The file's length: zeros from `len` to here (the runway the next frames overwrite).
    zeroed_end: u64,
    segment_bytes: u64,
    faults: FaultSwitch,
    /// A failed append left bytes after `len` that could not be cut off yet.
    needs_repair: bool,
    /// Size of the last frame that could not be written: what a probe writes.
    failed_frame_len: usize,
    /// The current segment is of an older format: never appended to, the first append starts
    /// a new segment. (Not at open: an older build can still start on a directory this build
    /// has only recovered.)
    older_format: bool,
    /// `JOURNAL_HEAD` does not name the current segment yet (or still has a clean-shutdown
    /// mark): it is written before the next append.
    head_pending: bool,
}

/// The smallest probe write: one page, so a probe never succeeds only because the last page of
/// the segment still had room.
const MIN_PROBE_BYTES: usize = 4096;

/// Zeros written ahead of the frames at a time. A megabyte is about 3,500 records: the sync of
/// the frame that extends the runway writes it too (about 2.5 ms instead of 0.4 on this
/// service's disks), once every couple of hundred batches.
pub(super) const RUNWAY_BYTES: u64 = 1 << 20;

/// Suffix of a segment being created; renamed to `.log` once its header is synced.
pub(super) const TEMP_SUFFIX: &str = ".log.tmp";

pub(super) fn segment_path(dir: &Path, first_revision: u64) -> PathBuf {
    dir.join(format!(
        "{SEGMENT_PREFIX}{first_revision:020}{SEGMENT_SUFFIX}"
    ))
}

impl Journal {
    /// Opens the journal for appending: at the recovered tail, or in a new segment whose first
    /// revision is `next_revision`. A tail of an older format is never appended to: the first
    /// append starts a new segment. Records the segment in `JOURNAL_HEAD`, which also clears a
    /// clean-shutdown mark: from now on the end may be torn again.
    pub fn open(
        dir: &Path,
        tail: Option<Tail>,
        next_revision: u64,
        segment_bytes: u64,
        faults: FaultSwitch,
    ) -> Result<Journal, JournalError> {
        let (path, file, len, segment_first, older_format) = match tail {
            Some(Tail {
                path,
                len,
                first_revision,
                format,
            }) => {
                // Written at offsets (the runway), never appended to.
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(JournalError::io(&path, "open for append"))?;
                (
                    path,
                    file,
                    len,
                    first_revision,
                    format != FrameFormat::CURRENT,
                )
            }
            None => {
                let path = segment_path(dir, next_revision);
                let file = create_segment(&path, &faults)?;
                (path, file, codec::HEADER_LEN as u64, next_revision, false)
            }
        };
        if older_format {
            tracing::info!(
                segment = %path.display(),
                "the last segment is of an older format: the first append starts a new one"
            );
        }
        let mut journal = Journal {
            dir: dir.to_owned(),
            file: SegmentFile::new(file, &faults),
            path,
            segment_first,
            last_revision: next_revision - 1,
            len,
            // Recovery cut off anything after the last frame (a crash's runway included).
            zeroed_end: len,
            segment_bytes: segment_bytes.max(codec::HEADER_LEN as u64 + 1),
            faults,
            needs_repair: false,
            failed_frame_len: 0,
            older_format,
            head_pending: true,
        };
        // Before any append, not necessarily now: a full disk must not keep the service from
        // starting (reads work, webhooks get 503 until the head and the frame can be written).
        if let Err(error) = journal.write_head() {
            tracing::warn!(%error, "cannot update the journal head yet; appends retry it first");
        }
        Ok(journal)
    }

    /// Whether nothing is known to stand in the way of the next append: `false` after a failed
    /// write not yet repaired, or while `JOURNAL_HEAD` could not be updated (a full disk at
    /// start-up). The sequencer starts not writable (and probing) when this is `false`.
    pub fn looks_writable(&self) -> bool {
        !self.needs_repair && !self.head_pending
    }

    /// Records the current segment in `JOURNAL_HEAD`, which also clears a clean-shutdown mark.
    fn write_head(&mut self) -> Result<(), JournalError> {
        let head = JournalHead {
            newest_segment: self.segment_first,
            closed: None,
        };
        head::write(&self.dir, &head)?;
        self.head_pending = false;
        Ok(())
    }

    /// Marks the journal closed cleanly in `JOURNAL_HEAD` (the revision and length it ends
    /// at), so recovery treats any difference at its end as damage, not as a torn write. Call
    /// it last, once nothing more is appended; a journal dropped without it counts as crashed.
    pub fn close(&mut self) -> Result<(), JournalError> {
        if self.needs_repair || self.zeroed_end > self.len {
            self.repair().map_err(JournalError::io(
                &self.path,
                "cut off a failed write or the runway",
            ))?;
        }
        head::write(
            &self.dir,
            &JournalHead {
                newest_segment: self.segment_first,
                closed: Some(ClosedAt {
                    revision: self.last_revision,
                    segment_len: self.len,
                }),
            },
        )
    }

    /// Appends one batch as one frame (several past `FRAME_SPLIT_BYTES`) and syncs it. Returns the bytes written. On failure,
    /// nothing of the batch stays in the file (or it is cut off before the next append).
    pub fn append(&mut self, batch: &BatchRecord) -> std::io::Result<u64> {
        let frame = codec::batch_frame(batch);
        let revisions = match (batch.updates.first(), batch.updates.last()) {
            (Some(first), Some(last)) => Some((first.revision, last.revision)),
            _ => None,
        };
        self.append_encoded(&frame, revisions)
    }

    /// [`Journal::append`] of a frame the caller encoded ([`codec::batch_frame`] of a
    /// [`BatchRecord`], or a [`codec::BatchFrame`]) holding the revisions `first..=last` (`None`: no updates), so the
    /// encoding can happen off the thread that writes.
    pub fn append_encoded(
        &mut self,
        frame: &[u8],
        revisions: Option<(u64, u64)>,
    ) -> std::io::Result<u64> {
        match self.append_frame(frame, revisions.map(|(first, _)| first)) {
            Ok(()) => {
                if let Some((_, last)) = revisions {
                    self.last_revision = last;
                }
                Ok(frame.len() as u64)
            }
            Err(error) => {
                self.failed_frame_len = frame.len();
                Err(error)
            }
        }
    }

    /// Tries what the next append would do, without recording anything: cuts off what a
    /// failed write left, starts the segment that is due (named `next_revision`, the first
    /// revision the next append will carry), writes and syncs as many bytes as the last frame
    /// that failed, and cuts them off again. `Ok` means an append of that size would work now.
    pub fn probe(&mut self, next_revision: u64) -> std::io::Result<()> {
        self.prepare(Some(next_revision))?;
        // Zeros: should a crash keep them, recovery reads them as a torn tail and cuts them.
        let filler = vec![0; self.failed_frame_len.max(MIN_PROBE_BYTES)];
        self.write_and_sync(&filler)?;
        self.needs_repair = true;
        self.repair()
    }

    /// Repairs, rotates if due, then writes and syncs `frames` (and the runway after them, if
    /// they reach the runway's end): one frame, or a batch split in several, each written and
    /// synced before the next. Recovery takes damage only in the last frame for a write a crash
    /// cut short; one write of several frames could come back from a power cut with a hole in
    /// any of them (the page cache writes back in no set order), which recovery took for damage
    /// before good frames, and refused to start (found by an adversarial run). If one of them
    /// fails, the batch's frames synced before it are cut off too: the batch failed whole.
    fn append_frame(&mut self, frames: &[u8], first_revision: Option<u64>) -> std::io::Result<()> {
        self.prepare(first_revision)?;
        let batch_start = self.len;
        let mut start = 0;
        for end in codec::frame_ends(frames) {
            if let Err(error) = self.write_and_sync(&frames[start..end]) {
                self.len = batch_start;
                self.needs_repair = true;
                let _ = self.repair();
                return Err(error);
            }
            self.len += (end - start) as u64;
            start = end;
        }
        Ok(())
    }

    /// Cuts off what a failed write left, and starts a new segment (whose first revision is
    /// `first_revision`) if the current one is full. A frame without updates never rotates.
    /// Whether the next append does more than write and sync the open segment: cuts a failed
    /// write off, starts a segment (by path), or writes `JOURNAL_HEAD` (by path).
    pub fn next_append_does_more(&self) -> bool {
        self.needs_repair
            || self.len >= self.segment_bytes
            || self.older_format
            || self.head_pending
    }

    fn prepare(&mut self, first_revision: Option<u64>) -> std::io::Result<()> {
        if self.needs_repair {
            self.repair()?;
        }
        if let Some(first_revision) = first_revision
            && (self.len >= self.segment_bytes || self.older_format)
        {
            self.rotate(first_revision)?;
        }
        if self.head_pending {
            self.write_head().map_err(into_io)?;
        }
        Ok(())
    }

    /// Writes `bytes` after the good frames and syncs; on failure, cuts them off again (now, or
    /// before the next write if that fails too).
    fn write_and_sync(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let end = self.len + bytes.len() as u64;
        let written = self
            .faults
            .check()
            .and_then(|()| self.file.write_at(bytes, self.len))
            .and_then(|()| self.extend_runway(end))
            .and_then(|()| {
                self.faults.before_sync();
                self.faults.check()
            })
            .and_then(|()| self.file.sync_data())
            .inspect(|()| self.faults.synced());
        if written.is_err() {
            self.needs_repair = true;
            let _ = self.repair();
        }
        written
    }

    /// Writes zeros after `end` (where the frame just written ends) if it reached the
    /// runway's end, [`RUNWAY_BYTES`] of them; the frame's sync makes them durable. A disk too
    /// full for them does not fail the frame: what was written of them is cut off again, and
    /// the frame is synced as a plain append.
    fn extend_runway(&mut self, end: u64) -> std::io::Result<()> {
        static ZEROS: [u8; RUNWAY_BYTES as usize] = [0; RUNWAY_BYTES as usize];
        if end <= self.zeroed_end {
            return Ok(());
        }
        match self.file.write_at(&ZEROS, end) {
            Ok(()) => self.zeroed_end = end + RUNWAY_BYTES,
            Err(error) => {
                tracing::debug!(%error, "no room for the journal's runway; appending without");
                self.file.set_len(end)?;
                self.zeroed_end = end;
            }
        }
        Ok(())
    }

    /// Cuts the file back to its last good frame (a failed write, the runway).
    fn repair(&mut self) -> std::io::Result<()> {
        self.faults.check()?;
        self.file.set_len(self.len)?;
        self.zeroed_end = self.len;
        self.file.sync_data()?;
        self.needs_repair = false;
        Ok(())
    }

    /// Starts the segment `first_revision`; it is recorded in `JOURNAL_HEAD` before it gets a
    /// record, so recovery notices if it goes missing.
    fn rotate(&mut self, first_revision: u64) -> std::io::Result<()> {
        // The segment left ends at its last frame: recovery reads a zero end only in the newest.
        if self.zeroed_end > self.len {
            self.repair()?;
        }
        let path = segment_path(&self.dir, first_revision);
        let file = create_segment(&path, &self.faults).map_err(into_io)?;
        tracing::info!(segment = %path.display(), "journal segment started");
        self.file = SegmentFile::new(file, &self.faults);
        self.path = path;
        self.segment_first = first_revision;
        self.len = codec::HEADER_LEN as u64;
        self.zeroed_end = self.len;
        self.older_format = false;
        // Recorded before the segment gets a record: `prepare` writes it next, and an append
        // fails (and is retried) until it is written.
        self.head_pending = true;
        Ok(())
    }

    /// The directory the journal lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The segment being written. Writes reach the file at once (the OS keeps them until
/// `fdatasync`), except over the power-loss seam ([`FaultSwitch::lose_unsynced_writes`]),
/// where they wait here until the next sync: dropping the journal then loses what was written
/// since the last successful sync, as a power cut loses the page cache.
struct SegmentFile {
    file: File,
    /// `Some` over the power-loss seam: writes not yet synced, with their offsets, in order.
    unsynced: Option<Vec<(u64, Vec<u8>)>>,
}

impl SegmentFile {
    fn new(file: File, faults: &FaultSwitch) -> SegmentFile {
        let unsynced = faults.loses_unsynced_writes().then(Vec::new);
        SegmentFile { file, unsynced }
    }

    fn write_at(&mut self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        match &mut self.unsynced {
            Some(unsynced) => {
                unsynced.push((offset, bytes.to_vec()));
                Ok(())
            }
            None => self.file.write_all_at(bytes, offset),
        }
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        if let Some(unsynced) = &mut self.unsynced {
            for (offset, bytes) in unsynced.drain(..) {
                self.file.write_all_at(&bytes, offset)?;
            }
        }
        self.file.sync_data()
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        if let Some(unsynced) = &mut self.unsynced {
            // What is cut off is gone; what is before `len` still waits for the sync.
            unsynced.retain_mut(|(offset, bytes)| {
                bytes.truncate(usize::try_from(len.saturating_sub(*offset)).unwrap_or(usize::MAX));
                !bytes.is_empty()
            });
        }
        self.file.set_len(len)
    }
}

/// A journal error as the I/O error of an append: the message keeps the file and the step, the
/// kind what the OS said.
fn into_io(error: JournalError) -> std::io::Error {
    let kind = match &error {
        JournalError::Io(error) => error.kind(),
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, error.to_string())
}

/// Creates the segment `path` with its header, atomically: written and synced under a
/// temporary name, then renamed into place and the directory synced. On failure the temporary
/// file is removed (recovery removes one a crash left).
fn create_segment(path: &Path, faults: &FaultSwitch) -> Result<File, JournalError> {
    let temp = temp_path(path);
    let created = write_segment_header(path, &temp, faults);
    if created.is_err() {
        // Best effort: a full disk still lets a file be removed.
        let _ = fs::remove_file(&temp);
    }
    created
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_stem().unwrap_or_default().to_owned();
    name.push(TEMP_SUFFIX);
    path.with_file_name(name)
}

fn write_segment_header(
    path: &Path,
    temp: &Path,
    faults: &FaultSwitch,
) -> Result<File, JournalError> {
    match fs::remove_file(temp) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(JournalError::io(temp, "remove a stale new segment")(error)),
    }
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(temp)
        .map_err(JournalError::io(temp, "create segment"))?;
    faults
        .check_segment_creation()
        .and_then(|()| file.write_all(&codec::file_header(SEGMENT_MAGIC, FrameFormat::CURRENT)))
        .and_then(|()| file.sync_all())
        .map_err(JournalError::io(temp, "write segment header"))?;
    // A segment of this name can only be one whose directory sync failed after the rename
    // (a header, no frame: the revision it is named after was never used). Never replace one
    // that holds frames.
    if let Ok(existing) = fs::metadata(path)
        && existing.len() > codec::HEADER_LEN as u64
    {
        return Err(JournalError::Format {
            path: path.to_owned(),
            reason: "a new segment of this name would replace the records it holds".into(),
        });
    }
    fs::rename(temp, path).map_err(JournalError::io(path, "rename new segment into place"))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
        .map_err(JournalError::io(path, "sync directory"))?;
    Ok(file)
}
