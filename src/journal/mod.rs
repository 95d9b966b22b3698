//! The durable journal: an append-only log of group commits, snapshots, and recovery.
//!
//! The sequencer appends each batch of numbered updates as one checksummed frame and syncs it
//! (`fdatasync`) before anything reaches memory; concurrent webhooks therefore share one sync.
//! Segments rotate by size and are named by their first revision. Snapshots (full profile state
//! as of a revision) let old segments go; see [`snapshot`] for which are kept and why.
//!
//! Recovery loads a snapshot, replays every later record through the same merge the sequencer
//! uses, and so rebuilds profiles, revisions and the watch history exactly. A torn last frame
//! (a crash mid-write, never acknowledged) is cut off with a warning; any other damage stops
//! start-up with the file and offset, because skipping it would silently lose acknowledged
//! updates.
//!
//! Why our own segment log and not a crate: the log is small (append, sync, rotate, scan), the
//! records are ours, and recovery must replay through our merge to rebuild the history, so a
//! generic WAL crate would add a format and a dependency without removing any of that code.
//! This module does not merge or number updates and knows nothing of HTTP or gRPC.

pub mod codec;
mod recovery;
pub mod snapshot;
mod writer;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use recovery::{Recovered, recover};
pub use writer::{Journal, Tail};

/// Segment files are `journal-<first revision, 20 digits>.log`.
pub(crate) const SEGMENT_PREFIX: &str = "journal-";
pub(crate) const SEGMENT_SUFFIX: &str = ".log";

/// Everything that can go wrong reading or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A filesystem operation failed.
    #[error("{path}: {action}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A damaged record that is not the torn tail of the last segment.
    #[error(
        "{path}: damaged record at offset {offset} ({reason}); acknowledged updates follow it, \
         so start-up stops instead of skipping it: restore the file from a backup, or move it \
         away to accept losing its updates"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the damaged frame starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Revisions do not follow each other.
    #[error("{path}: expected revision {expected}, found {found}: the journal has a gap")]
    Gap {
        /// The file.
        path: PathBuf,
        /// The revision that should come next.
        expected: u64,
        /// The revision found.
        found: u64,
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
    /// A file this build cannot read.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl JournalError {
    fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
        let path = path.to_owned();
        move |source| JournalError::Io {
            path,
            action,
            source,
        }
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
    /// How many failures were injected so far, for tests to wait on.
    injected: tokio::sync::watch::Sender<u64>,
}

impl FaultSwitch {
    /// Makes every following write and sync fail (`true`) or work again (`false`).
    pub fn fail_writes(&self, fail: bool) {
        self.0.writes.store(fail, Ordering::SeqCst);
    }

    /// Makes creating a journal segment fail (`true`) the way a full disk makes it fail: the
    /// file is created, then writing its header fails. Appends into the current segment still
    /// work, so only a rotation (and whatever tries one) fails.
    pub fn fail_segment_creation(&self, fail: bool) {
        self.0.segment_creation.store(fail, Ordering::SeqCst);
    }

    /// The number of failures injected so far: tests wait on it to know that a write (or the
    /// sequencer's probe) was tried and refused.
    pub fn injected(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.injected.subscribe()
    }

    fn check(&self) -> std::io::Result<()> {
        self.refuse_if(&self.0.writes, "injected write failure")
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
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
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
mod tests {
    use super::*;
    use crate::profile::{Field, ProfileKey, ProfileUpdate, Scalar};
    use crate::sequencer;
    use crate::store::Store;
    use codec::{BatchRecord, UpdateRecord};
    use std::fs::OpenOptions;
    use std::io::Write;

    fn record(revision: u64) -> UpdateRecord {
        let update = ProfileUpdate {
            key: ProfileKey::new("2155", format!("c{}", revision % 7)),
            at: chrono::DateTime::from_timestamp(1_700_000_000 + revision as i64, 0).unwrap(),
            fields: vec![
                (Field::GbCustomerId, Some(Scalar::Int(1))),
                (Field::TotalPoints, Some(Scalar::Int(revision as i64))),
            ],
            extras: vec![],
        };
        UpdateRecord::new(revision, &update)
    }

    /// Writes `batches` batches of three records each; returns the journal.
    fn write(dir: &Path, batches: u64, segment_bytes: u64) -> Journal {
        let mut journal =
            Journal::open(dir, None, 1, segment_bytes, FaultSwitch::default()).unwrap();
        for batch in 0..batches {
            let updates = (1..=3).map(|i| record(batch * 3 + i)).collect();
            journal.append(&BatchRecord { updates }).unwrap();
        }
        journal
    }

    fn recovered(dir: &Path) -> Result<(Store, Recovered), JournalError> {
        let store = Store::new(1000, "test");
        let recovered = recover(dir, &store, |records| sequencer::replay(&store, records))?;
        Ok((store, recovered))
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let segments = segments(dir).unwrap();
        assert_eq!(segments.len(), 1);
        segments[0].1.clone()
    }

    #[test]
    fn recovery_replays_every_record_and_appending_continues() {
        let dir = tempfile::tempdir().unwrap();
        drop(write(dir.path(), 4, u64::MAX));
        let (store, recovered) = recovered(dir.path()).unwrap();
        assert_eq!(store.revision(), 12);
        assert_eq!(recovered.replayed, 12);
        assert_eq!(
            store.history_from(1, 100).unwrap().len(),
            12,
            "history rebuilt"
        );
        let profile = store.get(&ProfileKey::new("2155", "c5")).unwrap();
        assert_eq!(profile.get_int(Field::TotalPoints), Some(12));

        let mut journal = Journal::open(
            dir.path(),
            recovered.tail,
            13,
            u64::MAX,
            FaultSwitch::default(),
        )
        .unwrap();
        journal
            .append(&BatchRecord {
                updates: vec![record(13)],
            })
            .unwrap();
        assert_eq!(recovered_revision(dir.path()), 13);
    }

    fn recovered_revision(dir: &Path) -> u64 {
        recovered(dir).unwrap().0.revision()
    }

    #[test]
    fn a_torn_last_frame_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        drop(write(dir.path(), 3, u64::MAX));
        let path = only_segment(dir.path());
        let whole = fs::metadata(&path).unwrap().len();
        // Half of a fourth frame, as a crash mid-write leaves it.
        let mut frame = Vec::new();
        codec::encode_frame(
            &BatchRecord {
                updates: vec![record(10), record(11)],
            },
            &mut frame,
        );
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&frame[..frame.len() / 2]).unwrap();
        drop(file);

        let (store, recovered) = recovered(dir.path()).unwrap();
        assert_eq!(store.revision(), 9, "the torn batch was never acknowledged");
        assert_eq!(recovered.tail.unwrap().len, whole);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            whole,
            "the torn bytes are gone"
        );
    }

    #[test]
    fn a_torn_frame_header_is_cut_off_too() {
        let dir = tempfile::tempdir().unwrap();
        drop(write(dir.path(), 2, u64::MAX));
        let path = only_segment(dir.path());
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0x55, 0x01, 0x00]).unwrap();
        drop(file);
        assert_eq!(recovered_revision(dir.path()), 6);
    }

    #[test]
    fn damage_before_the_tail_stops_recovery_with_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        drop(write(dir.path(), 3, u64::MAX));
        let path = only_segment(dir.path());
        let mut bytes = fs::read(&path).unwrap();
        bytes[codec::HEADER_LEN + codec::FRAME_OVERHEAD + 5] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        match recovered(dir.path()) {
            Err(JournalError::Corrupt {
                path: at,
                offset,
                reason,
            }) => {
                assert_eq!(at, path);
                assert_eq!(offset, codec::HEADER_LEN as u64);
                assert_eq!(reason, "checksum mismatch");
            }
            other => panic!(
                "expected Corrupt, got {:?}",
                other.map(|(s, _)| s.revision())
            ),
        }
    }

    #[test]
    fn a_snapshot_whose_header_disagrees_with_its_name_stops_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let written = snapshot::write(dir.path(), 7, &[]).unwrap();
        // Renamed by hand (or damaged): its name says 8, its header 7.
        let renamed = written.with_file_name("snapshot-00000000000000000008.snap");
        fs::rename(&written, &renamed).unwrap();
        match recovered(dir.path()) {
            Err(JournalError::Corrupt { path, reason, .. }) => {
                assert_eq!(path, renamed);
                assert_eq!(reason, "the snapshot's header says revision 7, its name 8");
            }
            other => panic!(
                "expected Corrupt, got {:?}",
                other.map(|(s, _)| s.revision())
            ),
        }
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_the_next_one_works() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultSwitch::default();
        let mut journal = Journal::open(dir.path(), None, 1, u64::MAX, faults.clone()).unwrap();
        journal
            .append(&BatchRecord {
                updates: vec![record(1)],
            })
            .unwrap();
        let path = only_segment(dir.path());
        let good = fs::metadata(&path).unwrap().len();
        faults.fail_writes(true);
        assert!(
            journal
                .append(&BatchRecord {
                    updates: vec![record(2)]
                })
                .is_err()
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), good);
        faults.fail_writes(false);
        journal
            .append(&BatchRecord {
                updates: vec![record(2)],
            })
            .unwrap();
        assert_eq!(recovered_revision(dir.path()), 2);
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn batch(revisions: std::ops::RangeInclusive<u64>) -> BatchRecord {
        BatchRecord {
            updates: revisions.map(record).collect(),
        }
    }

    #[test]
    fn a_segment_that_could_not_be_created_is_created_on_the_next_try() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultSwitch::default();
        // Tiny segments: every append after the first needs a new one.
        let mut journal = Journal::open(dir.path(), None, 1, 1, faults.clone()).unwrap();
        journal.append(&batch(1..=3)).unwrap();
        faults.fail_segment_creation(true);
        assert!(journal.append(&batch(4..=6)).is_err());
        assert_eq!(
            file_names(dir.path()),
            ["journal-00000000000000000001.log"],
            "no half-created segment is left behind"
        );
        faults.fail_segment_creation(false);
        journal.append(&batch(4..=6)).unwrap();
        assert_eq!(
            file_names(dir.path()),
            [
                "journal-00000000000000000001.log",
                "journal-00000000000000000004.log"
            ]
        );
        assert_eq!(recovered_revision(dir.path()), 6);
    }

    #[test]
    fn the_probe_tries_the_segment_the_next_append_needs_and_leaves_no_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultSwitch::default();
        let mut journal = Journal::open(dir.path(), None, 1, 1, faults.clone()).unwrap();
        journal.append(&batch(1..=3)).unwrap();
        let first = only_segment(dir.path());
        let first_len = fs::metadata(&first).unwrap().len();
        faults.fail_segment_creation(true);
        assert!(journal.append(&batch(4..=6)).is_err());
        let refused = *faults.injected().borrow();
        assert!(
            journal.probe(4).is_err(),
            "the segment still cannot be created"
        );
        assert_eq!(*faults.injected().borrow(), refused + 1, "the probe tried");
        assert_eq!(
            fs::metadata(&first).unwrap().len(),
            first_len,
            "nothing written"
        );

        faults.fail_segment_creation(false);
        journal.probe(4).unwrap();
        let second = dir.path().join("journal-00000000000000000004.log");
        assert_eq!(
            fs::metadata(&second).unwrap().len(),
            codec::HEADER_LEN as u64,
            "the probe's bytes are cut off again"
        );
        journal.append(&batch(4..=6)).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
        assert_eq!(recovered_revision(dir.path()), 6);
    }

    #[test]
    fn a_temporary_segment_a_crash_left_is_removed_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        drop(write(dir.path(), 2, u64::MAX));
        let temp = dir.path().join("journal-00000000000000000007.log.tmp");
        fs::write(&temp, b"PSJ").unwrap();
        assert_eq!(recovered_revision(dir.path()), 6);
        assert!(!temp.exists());
    }

    #[test]
    fn a_temporary_snapshot_a_failure_left_is_removed_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        drop(write(dir.path(), 2, u64::MAX));
        let temp = dir.path().join("snapshot-00000000000000000005.snap.tmp");
        fs::write(&temp, b"PSSNAPSH").unwrap();
        assert_eq!(recovered_revision(dir.path()), 6);
        assert!(!temp.exists());
    }

    #[test]
    fn a_missing_snapshot_is_reported_as_such_and_named() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of one batch (three revisions) each: 1-3, 4-6, 7-9.
        drop(write(dir.path(), 3, 1));
        let old = snapshot::write(dir.path(), 1, &[]).unwrap();
        // As after a compaction whose base snapshot (3, 4 or 5) was then lost.
        fs::remove_file(dir.path().join("journal-00000000000000000001.log")).unwrap();
        let error = recovered(dir.path()).err().expect("recovery refuses");
        assert!(
            matches!(&error, JournalError::MissingSnapshot { .. }),
            "{error}"
        );
        let message = error.to_string();
        for expected in [
            "journal-00000000000000000004.log starts at revision 4",
            "snapshot-<revision>.snap with a revision from 3 to 6 is missing",
            &format!("{} is too old", old.display()),
            "restore it from a backup",
        ] {
            assert!(message.contains(expected), "{expected:?} not in {message}");
        }
    }

    #[test]
    fn segments_rotate_and_snapshots_compact_without_changing_state_or_history() {
        let dir = tempfile::tempdir().unwrap();
        // Small segments: a new one every few batches.
        let mut journal = write(dir.path(), 20, 300);
        assert!(segments(dir.path()).unwrap().len() > 3);
        let (before, _) = recovered(dir.path()).unwrap();
        assert_eq!(before.revision(), 60);

        // A snapshot at 60 is inside the history window of 10 changes... nothing can go yet.
        let taken = snapshot::take(dir.path(), &before, 10).unwrap();
        assert_eq!((taken.revision, taken.profiles), (60, 7));
        assert!(taken.removed.is_empty());
        // 30 more changes: the snapshot at 60 is now below the window, so older files go.
        for batch in 20..30 {
            let updates = (1..=3).map(|i| record(batch * 3 + i)).collect();
            journal.append(&BatchRecord { updates }).unwrap();
        }
        let (state, _) = recovered(dir.path()).unwrap();
        let taken = snapshot::take(dir.path(), &state, 10).unwrap();
        assert_eq!(taken.revision, 90);
        assert!(
            !taken.removed.is_empty(),
            "segments before the snapshot at 60 are removed"
        );
        assert!(segments(dir.path()).unwrap().first().unwrap().0 > 1);

        let (after, recovered) = recovered(dir.path()).unwrap();
        assert_eq!(
            recovered.snapshot,
            Some(60),
            "the base snapshot below the window"
        );
        assert_eq!(after.revision(), 90);
        for customer in 0..7 {
            let key = ProfileKey::new("2155", format!("c{customer}"));
            assert_eq!(after.get(&key), state.get(&key), "same profile {customer}");
        }
        let history = |store: &Store| -> Vec<(u64, Vec<String>)> {
            store
                .history_from(81, 100)
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c.revision,
                        c.changed_fields.iter().map(ToString::to_string).collect(),
                    )
                })
                .collect()
        };
        assert_eq!(
            history(&after),
            history(&state),
            "the history window is rebuilt"
        );
    }
}
