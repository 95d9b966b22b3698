//! The durable journal: an append-only log of group commits, snapshots, and recovery.
//!
//! The sequencer appends each batch of numbered updates as one checksummed frame and syncs it
//! (`fdatasync`) before anything reaches memory; concurrent webhooks therefore share one sync.
//! Segments rotate by size and are named by their first revision; `JOURNAL_HEAD` ([`head`])
//! records the newest one and, after a clean shutdown, where the journal ended. Snapshots (full
//! profile state as of a revision) let old segments go; see [`snapshot`] for which are kept and
//! why.
//!
//! Recovery loads a snapshot, replays every later record through the same merge the sequencer
//! uses, and so rebuilds profiles, revisions and the watch history exactly. A torn last frame
//! (a crash mid-write, never acknowledged) is cut off with a warning; damage a newer snapshot
//! covers is passed by starting from it ([`recovery::start_past`]); any other damage stops
//! start-up with the file and offset, because skipping it would silently lose acknowledged
//! updates ([`recovery`] has the exact rules). Such a refusal names the [`DiscardPoint`] an
//! operator can pass to `--discard-journal-from` to give up the rest ([`discard`]); the store
//! id changes first (`crate::startup`), so no revision is ever reused under the same id.
//!
//! Why our own segment log and not a crate: the log is small (append, sync, rotate, scan), the
//! records are ours, and recovery must replay through our merge to rebuild the history, so a
//! generic WAL crate would add a format and a dependency without removing any of that code.
//! This module does not merge or number updates and knows nothing of HTTP or gRPC.

pub mod appender;
pub mod codec;
mod discard;
pub mod head;
pub mod recovery;
pub mod snapshot;
mod wire;
mod writer;

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::io_error::IoError;

pub use discard::{Discarded, discard};
pub use recovery::{Recovered, recover, recover_from, start_past};
pub use writer::{Journal, Tail};

/// Segment files are `journal-<first revision, 20 digits>.log`.
pub(crate) const SEGMENT_PREFIX: &str = "journal-";
pub(crate) const SEGMENT_SUFFIX: &str = ".log";

/// Everything that can go wrong reading or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(IoError),
    /// A damaged record of a segment that cannot be a write a crash cut short.
    #[error(
        "{path}: damaged record at offset {offset} ({reason}), not a write cut short by a crash: \
         start-up stops rather than lose acknowledged updates; {}",
        give_up(.path, *.offset, *.first_lost)
    )]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the damaged frame starts.
        offset: u64,
        /// What is wrong.
        reason: String,
        /// The first revision recovery could not read back.
        first_lost: u64,
    },
    /// Revisions do not follow each other: the records before `found` are missing.
    #[error(
        "{path}: expected revision {expected} at offset {offset}, found {found}{}: the records \
         in between are missing (a segment removed, cut short or damaged); {}",
        .previous.as_ref().map(|previous| format!(
            " (the segment before it, {}, ends at revision {})",
            previous.display(),
            .expected - 1
        )).unwrap_or_default(),
        give_up(.path, *.offset, *.expected)
    )]
    Gap {
        /// The segment.
        path: PathBuf,
        /// Where the unexpected record (or the segment, at 0) starts.
        offset: u64,
        /// The revision that should come next.
        expected: u64,
        /// The revision found.
        found: u64,
        /// The segment that ends before `expected`, when the gap is between segments.
        previous: Option<PathBuf>,
    },
    /// The newest segment `JOURNAL_HEAD` records is gone.
    #[error(
        "{path} is missing: {} records that the journal reached it, so the records from \
         revision {first_lost} on may be gone; {}",
        head::FILE,
        give_up(.path, 0, *.first_lost)
    )]
    MissingSegment {
        /// The segment that should be there.
        path: PathBuf,
        /// The first revision recovery could not read back.
        first_lost: u64,
    },
    /// After a clean shutdown, the newest segment does not end where the shutdown left it.
    #[error(
        "{path}: ends at offset {offset} with revision {revision}, but the clean shutdown left \
         it at offset {closed_len} with revision {closed_revision}: it was cut short or \
         changed since; {}",
        give_up(.path, (*.offset).min(*.closed_len), (*.revision).min(*.closed_revision) + 1)
    )]
    ChangedSinceShutdown {
        /// The segment.
        path: PathBuf,
        /// Where its valid frames end.
        offset: u64,
        /// The last revision it holds.
        revision: u64,
        /// Its length at the clean shutdown.
        closed_len: u64,
        /// The last revision at the clean shutdown.
        closed_revision: u64,
    },
    /// A damaged snapshot: nothing to skip or cut, it is all or nothing (start-up passes it
    /// when a newer snapshot covers it: `crate::startup::recover_store`).
    #[error(
        "{path}: damaged snapshot at offset {offset} ({reason}): restore it from a backup of \
         the data directory"
    )]
    DamagedSnapshot {
        /// The snapshot.
        path: PathBuf,
        /// Where the damaged frame starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The journal no longer starts at revision 1 and the snapshot it continues from is gone.
    #[error(
        "no snapshot to start from: the oldest journal segment {segment} starts at revision \
         {first}, so a snapshot-<revision>.snap with a revision from {oldest} to {newest} is \
         missing{found}: restore it from a backup of the data directory"
    )]
    MissingSnapshot {
        /// The oldest segment.
        segment: PathBuf,
        /// Its first revision.
        first: u64,
        /// The oldest revision the missing snapshot can have.
        oldest: u64,
        /// The newest revision it can have (the last of the oldest segment, as far as known).
        newest: String,
        /// What snapshots there are instead, as a clause (empty when none).
        found: String,
    },
    /// `JOURNAL_HEAD` cannot be read.
    #[error(
        "{path}: damaged ({reason}); it records which journal segments must exist and where a \
         clean shutdown left the journal: restore it from a backup, or remove it to start once \
         without those checks (the store then gets a new store id, so every watcher starts over)"
    )]
    DamagedHead {
        /// The head file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file this build cannot read.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// [`LockShare::check_in_place`] as a journal error: work about to write into `dir` (`action`)
/// first makes sure the directory is still the one its server locked.
pub fn in_place(
    lock: &crate::data_dir::LockShare,
    dir: &Path,
    action: &'static str,
) -> Result<(), JournalError> {
    lock.check_in_place(dir)
        .map_err(|error| JournalError::Io(IoError::new(dir, action, error)))
}

/// The way back from a backup. Not "restore the file": a copy of the file, or of the
/// directory, put back by hand keeps the store id, and a copy older than the damage rolled the
/// store back under it, the revisions after the copy assigned again to other changes that
/// watchers resuming with that id took for the ones they had missed (found by an adversarial
/// run).
const RESTORE: &str = "restore the data directory from a backup with `profile-state restore`, \
     which gives it a new store id (a copy of the file or of the directory put back by hand \
     keeps the old id, and the revisions after the copy would be assigned again to other \
     changes: remove STORE_ID from such a copy before starting it)";

/// The end of a refusal that an operator can resolve by giving records up.
fn give_up(path: &Path, offset: u64, first_lost: u64) -> String {
    match DiscardPoint::at(path, offset) {
        Some(point) => format!(
            "{RESTORE}, or give up revision {first_lost} and everything after it that no \
             snapshot holds by starting once with --discard-journal-from {point} (the store \
             then gets a new store id, so every watcher starts over)"
        ),
        None => RESTORE.into(),
    }
}

/// Where an operator gives up the journal: everything from `offset` of `segment` on, and every
/// later segment. Offset 0 gives up the whole segment. Written `<segment file name>:<offset>`,
/// as refusals print it (`--discard-journal-from`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardPoint {
    /// The segment's first revision (its name).
    pub segment_first: u64,
    /// The first byte given up.
    pub offset: u64,
}

impl DiscardPoint {
    /// The point at `offset` of the segment `path`, if that is a segment's name.
    pub fn at(path: &Path, offset: u64) -> Option<DiscardPoint> {
        let name = path.file_name()?.to_str()?;
        Some(DiscardPoint {
            segment_first: segment_number(name)?,
            offset,
        })
    }
}

fn segment_number(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)
        .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

impl std::fmt::Display for DiscardPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = self.segment_first;
        write!(
            f,
            "{SEGMENT_PREFIX}{first:020}{SEGMENT_SUFFIX}:{}",
            self.offset
        )
    }
}

impl FromStr for DiscardPoint {
    type Err = String;

    fn from_str(text: &str) -> Result<DiscardPoint, String> {
        let usage = || {
            format!(
                "{text:?} is not <segment>:<offset> as a refused start-up prints it, e.g. \
                 journal-00000000000000000001.log:12"
            )
        };
        let (name, offset) = text.rsplit_once(':').ok_or_else(usage)?;
        Ok(DiscardPoint {
            segment_first: segment_number(name).ok_or_else(usage)?,
            offset: offset.parse().map_err(|_| usage())?,
        })
    }
}

impl JournalError {
    /// Where the operator can give the journal up to get past this error, and the first
    /// revision that loses; `None` when giving records up would not help.
    pub fn discard_point(&self) -> Option<(DiscardPoint, u64)> {
        let (path, offset, first_lost) = match self {
            JournalError::Corrupt {
                path,
                offset,
                first_lost,
                ..
            } => (path, *offset, *first_lost),
            JournalError::Gap {
                path,
                offset,
                expected,
                ..
            } => (path, *offset, *expected),
            JournalError::MissingSegment { path, first_lost } => (path, 0, *first_lost),
            JournalError::ChangedSinceShutdown {
                path,
                offset,
                revision,
                closed_len,
                closed_revision,
            } => (
                path,
                (*offset).min(*closed_len),
                (*revision).min(*closed_revision) + 1,
            ),
            _ => return None,
        };
        Some((DiscardPoint::at(path, offset)?, first_lost))
    }

    fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
        let io = IoError::on(path, action);
        move |error| JournalError::Io(io(error))
    }
}

/// Makes journal writes fail on demand: the seam the disk-failure tests use. Cheap to clone;
/// all clones share one switch. Off unless someone turns it on.
#[derive(Clone, Default)]
pub struct FaultSwitch(Arc<Faults>);

#[derive(Default)]
struct Faults {
    writes: AtomicBool,
    segment_creation: AtomicBool,
    lose_unsynced: AtomicBool,
    /// While true, a sync waits (the journal thread blocks in it) until it is false again.
    syncs_held: std::sync::Mutex<bool>,
    syncs_released: std::sync::Condvar,
    /// How many syncs have waited so far, for tests to know one is held.
    syncs_waited: tokio::sync::watch::Sender<u64>,
    /// How many failures were injected so far, for tests to wait on.
    injected: tokio::sync::watch::Sender<u64>,
    /// Writes fail (`writes` is set) once this many more written frames have synced.
    fail_after_syncs: std::sync::Mutex<Option<u64>>,
    /// The kind of error a failing write gives (`Other` when unset).
    write_error: std::sync::Mutex<Option<std::io::ErrorKind>>,
}

impl FaultSwitch {
    /// Makes every following write and sync fail (`true`) or work again (`false`).
    pub fn fail_writes(&self, fail: bool) {
        self.0.writes.store(fail, Ordering::SeqCst);
    }

    /// Makes every following write and sync fail with an error of `kind` (a full disk is
    /// `StorageFull`, a full quota `QuotaExceeded`), as [`FaultSwitch::fail_writes`] does.
    pub fn fail_writes_as(&self, kind: std::io::ErrorKind) {
        *self
            .0
            .write_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(kind);
        self.fail_writes(true);
    }

    /// Makes every write and sync fail, as [`FaultSwitch::fail_writes`] does, once `syncs` more
    /// written frames have synced: a write fails in the middle of an append (a batch written
    /// as several frames).
    pub fn fail_writes_after_syncs(&self, syncs: u64) {
        *self.fail_after_syncs() = Some(syncs);
    }

    /// A written frame synced.
    fn synced(&self) {
        let mut left = self.fail_after_syncs();
        if let Some(count) = left.as_mut() {
            *count = count.saturating_sub(1);
            if *count == 0 {
                *left = None;
                self.fail_writes(true);
            }
        }
    }

    fn fail_after_syncs(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.0
            .fail_after_syncs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes creating a journal segment fail (`true`) the way a full disk makes it fail: the
    /// file is created, then writing its header fails. Appends into the current segment still
    /// work, so only a rotation (and whatever tries one) fails.
    pub fn fail_segment_creation(&self, fail: bool) {
        self.0.segment_creation.store(fail, Ordering::SeqCst);
    }

    /// Runs the journal as over a disk that loses power: what it writes to a segment reaches
    /// the file only when it syncs, and what was written since the last successful sync is
    /// lost when the journal is dropped (after [`FaultSwitch::fail_writes`], the power cut, no
    /// sync succeeds any more). For a journal opened after this call.
    pub fn lose_unsynced_writes(&self) {
        self.0.lose_unsynced.store(true, Ordering::SeqCst);
    }

    /// Makes every following journal sync wait until called with `false` (`true`), so a test
    /// can hold an append in flight while the sequencer goes on.
    pub fn hold_syncs(&self, hold: bool) {
        *self
            .0
            .syncs_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hold;
        self.0.syncs_released.notify_all();
    }

    /// How many syncs have been held so far: tests wait on it to know an append is in flight.
    pub fn syncs_waited(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.syncs_waited.subscribe()
    }

    /// Waits while syncs are held ([`FaultSwitch::hold_syncs`]).
    fn before_sync(&self) {
        let mut held = self
            .0
            .syncs_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *held {
            self.0.syncs_waited.send_modify(|count| *count += 1);
        }
        while *held {
            held = self
                .0
                .syncs_released
                .wait(held)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn loses_unsynced_writes(&self) -> bool {
        self.0.lose_unsynced.load(Ordering::SeqCst)
    }

    /// The number of failures injected so far: tests wait on it to know that a write (or the
    /// sequencer's probe) was tried and refused.
    pub fn injected(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.injected.subscribe()
    }

    fn check(&self) -> std::io::Result<()> {
        let kind = *self
            .0
            .write_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.refuse_if(&self.0.writes, "injected write failure") {
            Err(error) => Err(std::io::Error::new(
                kind.unwrap_or(std::io::ErrorKind::Other),
                error.to_string(),
            )),
            ok => ok,
        }
    }

    fn check_segment_creation(&self) -> std::io::Result<()> {
        self.refuse_if(
            &self.0.segment_creation,
            "injected failure writing a new segment (disk full)",
        )
    }

    fn refuse_if(&self, switch: &AtomicBool, what: &str) -> std::io::Result<()> {
        if switch.load(Ordering::SeqCst) {
            self.0.injected.send_modify(|count| *count += 1);
            return Err(std::io::Error::other(what.to_owned()));
        }
        Ok(())
    }
}

/// The journal segments in `dir`, by first revision.
pub(crate) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    numbered_files(dir, SEGMENT_PREFIX, SEGMENT_SUFFIX)
}

/// Files named `<prefix><number><suffix>` in `dir`, sorted by number.
fn numbered_files(
    dir: &Path,
    prefix: &str,
    suffix: &str,
) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(JournalError::io(dir, "list"))? {
        let entry = entry.map_err(JournalError::io(dir, "list"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let number = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .and_then(|digits| digits.parse::<u64>().ok());
        if let Some(number) = number {
            files.push((number, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod power_loss_tests;
#[cfg(test)]
mod tests;
