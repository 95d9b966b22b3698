//! Unit tests of the journal: appends, rotation, recovery, torn tails and damage, the head
//! file, giving records up, and the older format.
//!
//! Longer than our ~700 lines: the cases share one set of helpers (records, writing, recovering,
//! flipping bits), and splitting them by topic would only copy those around.

use super::*;
use crate::profile::{Field, ProfileKey, ProfileUpdate, Scalar};
use crate::sequencer;
use crate::store::Store;
use codec::{BatchRecord, UpdateRecord};
use std::fs::OpenOptions;
use std::io::{Seek, Write};

fn record(revision: u64) -> UpdateRecord {
    let update = ProfileUpdate {
        key: ProfileKey::new("2155", format!("c{}", revision % 7)),
        at: chrono::DateTime::from_timestamp(1_700_000_000 + revision as i64, 0).unwrap(),
        fields: vec![
            (Field::GbCustomerId, Some(Scalar::Int(1))),
            (Field::TotalPoints, Some(Scalar::Int(revision as i64))),
        ],
        extras: vec![],
        origin: crate::profile::Origin::Webhook,
    };
    UpdateRecord::new(revision, &update)
}

/// Writes `batches` batches of three records each; returns the journal.
fn write(dir: &Path, batches: u64, segment_bytes: u64) -> Journal {
    let mut journal = Journal::open(dir, None, 1, segment_bytes, FaultSwitch::default()).unwrap();
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

/// Where the frames of `path` end: a crashed journal's newest segment has the runway's zeros
/// after them, which this checks are all zeros.
fn frames_end(path: &Path) -> usize {
    frame_offsets(path).1
}

/// Writes `bytes` where the frames of `path` end, over the runway's zeros, as the journal
/// writes its next frame (and as a crash mid-write leaves part of it).
fn write_after_frames(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let end = frames_end(path);
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, end as u64).unwrap();
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

    let mut journal = reopen(dir.path(), recovered.tail, 13);
    journal
        .append(&BatchRecord {
            updates: vec![record(13)],
        })
        .unwrap();
    assert_eq!(recovered_revision(dir.path()), 13);
}

/// The journal of `dir` opened for appends where recovery left it (`tail`), as start-up does.
/// A batch whose records pass `FRAME_SPLIT_BYTES` (40 records of a megabyte, as bodies under a
/// raised `--max-body-bytes` make) is written as several frames, each far below `MAX_FRAME`,
/// which every reader refuses as damage: a batch of 512 such records was one frame of 512 MB,
/// acknowledged and then refused at start-up. Recovery reads the frames back as one batch.
#[test]
fn a_batch_larger_than_a_frame_is_written_as_several_and_recovered_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path(), None, 1, 1 << 30, FaultSwitch::default()).unwrap();
    journal.append(&split_batch(1)).unwrap();
    journal.close().unwrap();

    let (offsets, _) = frame_offsets(&only_segment(dir.path()));
    let bytes = fs::read(only_segment(dir.path())).unwrap();
    let lengths: Vec<usize> = offsets
        .iter()
        .map(
            |offset| match codec::read_frame(&bytes, *offset, codec::FrameFormat::CURRENT) {
                codec::Frame::Valid { payload, .. } => payload.len(),
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert!(lengths.len() >= 2, "{lengths:?}");
    assert!(
        lengths
            .iter()
            .all(|len| *len <= codec::FRAME_SPLIT_BYTES + 1_100_000),
        "{lengths:?}"
    );
    let (store, recovered) = recovered(dir.path()).unwrap();
    assert_eq!((store.revision(), recovered.replayed), (40, 40));
    let newest = store.get(&ProfileKey::new("2155", "c5")).unwrap();
    assert_eq!(newest.revision, 40);
}

/// 40 records of about a megabyte each: a batch the journal writes as several frames.
fn split_batch(first: u64) -> BatchRecord {
    let large = |revision: u64| {
        let mut update = record(revision).into_update().unwrap();
        let email = format!("{revision:03}").repeat(350_000);
        update
            .fields
            .push((Field::Email, Some(Scalar::Text(email.into()))));
        UpdateRecord::new(revision, &update)
    };
    BatchRecord {
        updates: (first..first + 40).map(large).collect(),
    }
}

/// A journal in `dir` holding record 1, and its segment.
fn journal_of_one_record(dir: &Path, faults: &FaultSwitch) -> (Journal, PathBuf) {
    let mut journal = Journal::open(dir, None, 1, 1 << 30, faults.clone()).unwrap();
    journal
        .append(&BatchRecord {
            updates: vec![record(1)],
        })
        .unwrap();
    (journal, only_segment(dir))
}

/// A batch split in frames is written and synced one frame at a time: at its first sync the
/// file holds its first frame and nothing after it. Written at once, a power cut during the one
/// sync could leave a hole in any frame with later ones whole, which recovery refuses as damage
/// before good frames (found by an adversarial run: zeroing a sector of the first frame).
#[test]
fn a_batch_split_in_frames_is_synced_one_frame_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultSwitch::default();
    let (mut journal, path) = journal_of_one_record(dir.path(), &faults);
    let before = frame_offsets(&path).0.len();

    faults.hold_syncs(true);
    let mut held = faults.syncs_waited();
    let appending = std::thread::spawn(move || {
        journal.append(&split_batch(2)).unwrap();
        journal
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(held.wait_for(|held| *held >= 1)).unwrap();
    assert_eq!(
        frame_offsets(&path).0.len(),
        before + 1,
        "one frame of the batch written before its sync, only zeros after it"
    );
    faults.hold_syncs(false);
    let mut journal = appending.join().unwrap();
    assert!(frame_offsets(&path).0.len() >= before + 2);
    journal.close().unwrap();
    let (store, recovered) = recovered(dir.path()).unwrap();
    assert_eq!((store.revision(), recovered.replayed), (41, 41));
}

/// A batch whose second frame fails after its first synced fails whole: the first frame is
/// cut off too (before the next append, once the disk takes writes again), and the revisions
/// it held go to the next batch without any trace of it.
#[test]
fn a_batch_failing_in_its_second_frame_leaves_nothing_of_its_first() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultSwitch::default();
    let (mut journal, path) = journal_of_one_record(dir.path(), &faults);
    let good = frames_end(&path);

    faults.fail_writes_after_syncs(1);
    assert!(journal.append(&split_batch(2)).is_err());
    assert!(frames_end(&path) > good, "its first frame was synced");
    // The disk works again: the next append cuts the failed batch off before it writes.
    faults.fail_writes(false);
    journal
        .append(&BatchRecord {
            updates: vec![record(2)],
        })
        .unwrap();
    assert_eq!(
        frame_offsets(&path).0.len(),
        2,
        "nothing of the batch is left"
    );
    drop(journal);
    let (store, recovered) = recovered(dir.path()).unwrap();
    assert_eq!((store.revision(), recovered.replayed), (2, 2));
    let second = store.get(&record(2).into_update().unwrap().key).unwrap();
    assert_eq!(second.revision, 2);
}

fn reopen(dir: &Path, tail: Option<Tail>, next_revision: u64) -> Journal {
    Journal::open(dir, tail, next_revision, u64::MAX, FaultSwitch::default()).unwrap()
}

fn recovered_revision(dir: &Path) -> u64 {
    recovered(dir).unwrap().0.revision()
}

#[test]
fn a_torn_last_frame_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 3, u64::MAX));
    let path = only_segment(dir.path());
    let whole = frames_end(&path) as u64;
    // Half of a fourth frame, as a crash mid-write leaves it when the frame grew the file
    // (past the runway, or an earlier build's segment): the file ends inside it.
    let mut frame = Vec::new();
    codec::encode_frame(
        &BatchRecord {
            updates: vec![record(10), record(11)],
        },
        &mut frame,
    );
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(whole).unwrap();
    file.seek(std::io::SeekFrom::End(0)).unwrap();
    file.write_all(&frame[..frame.len() / 2]).unwrap();
    drop(file);

    let (store, recovered) = recovered(dir.path()).unwrap();
    assert_eq!(store.revision(), 9, "the torn batch was never acknowledged");
    assert_eq!(recovered.tail.unwrap().len, whole);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        whole,
        "the torn bytes are gone, and the runway after them"
    );
}

#[test]
fn a_torn_frame_header_is_cut_off_too() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 2, u64::MAX));
    let path = only_segment(dir.path());
    write_after_frames(&path, &[0x55, 0x01, 0x00]);
    assert_eq!(recovered_revision(dir.path()), 6);
}

#[test]
fn damage_before_the_tail_stops_recovery_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 3, u64::MAX));
    let path = only_segment(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    bytes[codec::HEADER_LEN + codec::FrameFormat::CURRENT.overhead() + 5] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    match recovered(dir.path()) {
        Err(JournalError::Corrupt {
            path: at,
            offset,
            reason,
            ..
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
        Err(JournalError::DamagedSnapshot { path, reason, .. }) => {
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
    let good = frames_end(&path) as u64;
    faults.fail_writes(true);
    assert!(
        journal
            .append(&BatchRecord {
                updates: vec![record(2)]
            })
            .is_err()
    );
    assert_eq!(
        frames_end(&path) as u64,
        good,
        "nothing of the batch is left"
    );
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
        ["JOURNAL_HEAD", "journal-00000000000000000001.log"],
        "no half-created segment is left behind"
    );
    faults.fail_segment_creation(false);
    journal.append(&batch(4..=6)).unwrap();
    assert_eq!(
        file_names(dir.path()),
        [
            "JOURNAL_HEAD",
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
    let first_len = frames_end(&first) as u64;
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
        "nothing written, and the runway cut off before the segment was left"
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
fn temporary_segments_and_snapshots_a_crash_left_are_removed_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 2, u64::MAX));
    let temps = [
        dir.path().join("journal-00000000000000000007.log.tmp"),
        dir.path().join("snapshot-00000000000000000005.snap.tmp"),
    ];
    for temp in &temps {
        fs::write(temp, b"PSJ").unwrap();
    }
    assert_eq!(recovered_revision(dir.path()), 6);
    for temp in &temps {
        assert!(!temp.exists(), "{}", temp.display());
    }
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
                    c.changed_fields
                        .iter()
                        .map(|path| path.to_string())
                        .collect(),
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

/// The offsets of the frames of a segment written by this build, and where they end (the
/// file's length, or where the runway's zeros start).
fn frame_offsets(path: &Path) -> (Vec<usize>, usize) {
    let bytes = fs::read(path).unwrap();
    let mut offsets = Vec::new();
    let mut offset = codec::HEADER_LEN;
    while let codec::Frame::Valid { next, .. } =
        codec::read_frame(&bytes, offset, codec::FrameFormat::CURRENT)
    {
        offsets.push(offset);
        offset = next;
    }
    assert!(
        bytes[offset..].iter().all(|byte| *byte == 0),
        "every frame is valid, and only zeros follow them"
    );
    (offsets, offset)
}

fn flip(path: &Path, byte: usize, bit: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[byte] ^= 1 << bit;
    fs::write(path, bytes).unwrap();
}

/// The refusal, which must be `Corrupt` at `offset` of `path`.
fn refused_at(dir: &Path, path: &Path, offset: usize) -> JournalError {
    match recovered(dir) {
        Err(error @ JournalError::Corrupt { .. }) => {
            let (point, _) = error.discard_point().unwrap();
            assert_eq!(
                point,
                DiscardPoint::at(path, offset as u64).unwrap(),
                "{error}"
            );
            error
        }
        other => panic!(
            "expected Corrupt at {offset}, got {:?}",
            other.map(|(store, _)| store.revision())
        ),
    }
}

#[test]
fn a_flipped_bit_in_the_first_records_length_stops_recovery_naming_file_and_offset() {
    // Issue 10, bug 2: bit 7 of byte 15 is the high byte of the first record's length.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 100, u64::MAX).close().unwrap();
    let path = only_segment(dir.path());
    flip(&path, 15, 7);
    let error = refused_at(dir.path(), &path, codec::HEADER_LEN);
    let message = error.to_string();
    for expected in [
        &format!("{}: damaged record at offset 12", path.display()),
        "frame header checksum mismatch",
        "give up revision 1 and everything after it",
        "--discard-journal-from journal-00000000000000000001.log:12",
        "new store id",
    ] {
        assert!(message.contains(expected), "{expected:?} not in {message}");
    }
    assert_eq!(
        fs::metadata(&path).unwrap().len() as usize,
        frame_offsets_len(&path)
    );
}

/// The segment's length: refusing start-up must not cut anything.
fn frame_offsets_len(path: &Path) -> usize {
    fs::metadata(path).unwrap().len() as usize
}

#[test]
fn a_flipped_bit_in_the_last_frame_after_a_crash_is_damage_not_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    // Dropped, not closed: as after a crash, when a torn last write is possible.
    drop(write(dir.path(), 10, u64::MAX));
    let path = only_segment(dir.path());
    let (offsets, len) = frame_offsets(&path);
    let last = *offsets.last().unwrap();
    for byte in [last + 1, last + 9, last + 20, len - 1] {
        flip(&path, byte, 3);
        refused_at(dir.path(), &path, last);
        flip(&path, byte, 3);
    }
    assert_eq!(recovered_revision(dir.path()), 30, "undamaged again");
}

#[test]
fn a_last_write_with_a_sector_that_never_reached_the_disk_is_cut_as_torn() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 3, u64::MAX));
    let path = only_segment(dir.path());
    let good = frames_end(&path);
    // A fourth batch of ~1.5 KB whose second sector stayed zeros: the file got its length.
    let updates = (10..=60).map(record).collect();
    let mut frame = Vec::new();
    codec::encode_frame(&BatchRecord { updates }, &mut frame);
    let sector_start = 512 - good % 512;
    assert!(frame.len() > sector_start + 1024, "{}", frame.len());
    frame[sector_start..sector_start + 512].fill(0);
    write_after_frames(&path, &frame);
    assert_eq!(recovered_revision(dir.path()), 9);
    assert_eq!(fs::metadata(&path).unwrap().len() as usize, good, "cut off");

    // A last write of which only the length reached the disk (an earlier build's segment, no
    // runway): all zeros.
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&[0; 700])
        .unwrap();
    assert_eq!(recovered_revision(dir.path()), 9);
    assert_eq!(fs::metadata(&path).unwrap().len() as usize, good, "cut off");
}

#[test]
fn after_a_clean_shutdown_nothing_at_the_end_is_forgiven() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 10, u64::MAX).close().unwrap();
    let path = only_segment(dir.path());
    let (offsets, len) = frame_offsets(&path);
    let last = *offsets.last().unwrap();
    let bytes = fs::read(&path).unwrap();

    // Cut at the last frame boundary: a valid journal, one record short of what was closed.
    fs::write(&path, &bytes[..last]).unwrap();
    match recovered(dir.path()) {
        Err(error @ JournalError::ChangedSinceShutdown { .. }) => {
            assert_eq!(
                error.discard_point(),
                Some((DiscardPoint::at(&path, last as u64).unwrap(), 28))
            );
            let message = error.to_string();
            assert!(
                message.contains(&format!("ends at offset {last} with revision 27")),
                "{message}"
            );
            assert!(
                message.contains(&format!("at offset {len} with revision 30")),
                "{message}"
            );
        }
        other => panic!(
            "expected ChangedSinceShutdown, got {:?}",
            other.map(|(s, _)| s.revision())
        ),
    }
    // Cut inside the last frame: after a clean shutdown that is damage, not a torn write.
    fs::write(&path, &bytes[..len - 3]).unwrap();
    refused_at(dir.path(), &path, last);
    assert_eq!(
        fs::metadata(&path).unwrap().len() as usize,
        len - 3,
        "nothing cut"
    );

    // The same cut after a crash (no clean mark) is a torn write.
    fs::write(&path, &bytes).unwrap();
    drop(reopen(
        dir.path(),
        recovered(dir.path()).unwrap().1.tail,
        31,
    ));
    assert_eq!(
        head::read(dir.path()).unwrap().unwrap().closed,
        None,
        "opening clears the mark"
    );
    fs::write(&path, &bytes[..len - 3]).unwrap();
    assert_eq!(recovered_revision(dir.path()), 27);
}

#[test]
fn a_removed_newest_segment_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 6, 1));
    let segments = segments(dir.path()).unwrap();
    assert_eq!(segments.len(), 6);
    let (_, newest) = segments.last().unwrap();
    fs::remove_file(newest).unwrap();
    match recovered(dir.path()) {
        Err(error @ JournalError::MissingSegment { .. }) => {
            assert_eq!(
                error.discard_point(),
                Some((DiscardPoint::at(newest, 0).unwrap(), 16))
            );
            let message = error.to_string();
            assert!(
                message.contains(&format!("{} is missing", newest.display())),
                "{message}"
            );
            assert!(
                message.contains("--discard-journal-from journal-00000000000000000016.log:0"),
                "{message}"
            );
        }
        other => panic!(
            "expected MissingSegment, got {:?}",
            other.map(|(s, _)| s.revision())
        ),
    }
}

/// Giving up from a damage point cuts the journal there and removes the later segments; the
/// snapshots past the point stay (they hold acknowledged updates the journal lost; removing
/// them lost what intact ones held, adversarial round 42), and start-up starts from the
/// newest, with appends in a new segment after it.
#[test]
fn giving_up_from_the_damage_keeps_everything_before_it_and_the_snapshots_past_it() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of one batch each (1-3, 4-6, ...), a snapshot at 9 and one at 24.
    let mut journal = write(dir.path(), 3, 1);
    let (store, _) = recovered(dir.path()).unwrap();
    snapshot::take(dir.path(), &store, 1000).unwrap();
    for batch in 3..8 {
        journal.append(&batch_of(batch)).unwrap();
    }
    let (store, _) = recovered(dir.path()).unwrap();
    snapshot::take(dir.path(), &store, 1000).unwrap();
    drop(journal);
    // Damage in the segment of revisions 13-15.
    let damaged = dir.path().join("journal-00000000000000000013.log");
    flip(&damaged, codec::HEADER_LEN + 20, 0);
    let error = refused_at(dir.path(), &damaged, codec::HEADER_LEN);
    let (point, first_lost) = error.discard_point().unwrap();
    assert_eq!(first_lost, 13);

    let discarded = discard(dir.path(), &point).unwrap();
    assert_eq!(
        discarded.cut,
        Some((damaged.clone(), codec::HEADER_LEN as u64))
    );
    let mut removed: Vec<_> = discarded
        .removed
        .iter()
        .map(|path| path.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    removed.sort();
    assert_eq!(
        removed,
        [
            "journal-00000000000000000016.log",
            "journal-00000000000000000019.log",
            "journal-00000000000000000022.log",
        ]
    );
    assert!(
        dir.path()
            .join("snapshot-00000000000000000024.snap")
            .exists()
    );
    assert_eq!(head::read(dir.path()).unwrap().unwrap().newest_segment, 13);
    let history = crate::store::HistoryLimits::events(1000);
    let (store, recovered) = crate::startup::recover_store(dir.path(), history, "new").unwrap();
    assert_eq!(store.revision(), 24, "from the snapshot past the point");
    assert_eq!(recovered.journal_ended_at, Some(12));
    assert!(recovered.tail.is_none());
    // Appends continue in a new segment after the snapshot, and later starts recover them.
    let mut journal = Journal::open(dir.path(), None, 25, 1, FaultSwitch::default()).unwrap();
    journal.append(&batch_of(8)).unwrap();
    drop(journal);
    let (store, recovered) = crate::startup::recover_store(dir.path(), history, "new").unwrap();
    assert_eq!((store.revision(), recovered.journal_ended_at), (27, None));
}

/// Batch `n` of three records: revisions 3n+1 to 3n+3.
fn batch_of(n: u64) -> BatchRecord {
    batch(n * 3 + 1..=n * 3 + 3)
}

#[test]
fn discard_points_read_as_refusals_print_them() {
    let point: DiscardPoint = "journal-00000000000000000013.log:12".parse().unwrap();
    assert_eq!(
        point,
        DiscardPoint {
            segment_first: 13,
            offset: 12
        }
    );
    assert_eq!(point.to_string(), "journal-00000000000000000013.log:12");
    for bad in [
        "journal-13.log",
        "snapshot-00000000000000000013.snap:0",
        "journal-x.log:1",
        "journal-00000000000000000013.log:-1",
    ] {
        let error = bad.parse::<DiscardPoint>().unwrap_err();
        assert!(error.contains("<segment>:<offset>"), "{error}");
    }
}

#[test]
fn a_segment_of_a_newer_format_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 2, u64::MAX));
    let path = only_segment(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    bytes[8] = 3;
    fs::write(&path, bytes).unwrap();
    let error = recovered(dir.path()).err().expect("refused");
    assert!(matches!(error, JournalError::Format { .. }), "{error}");
    assert!(
        error.discard_point().is_none(),
        "giving records up would not help"
    );
    let message = error.to_string();
    assert!(
        message.contains("written in format 3 by a newer profile-state"),
        "{message}"
    );
    assert!(message.contains("reads formats 1 to 2"), "{message}");
}

/// A flipped bit in a segment's format version, far past any newer build's, is damage (with
/// the way to give the segment up), not "written by a newer profile-state: run the newer
/// build", which sent the operator after a build that does not exist (adversary round 12, F8).
#[test]
fn a_version_no_build_writes_is_damage_not_a_newer_format() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 2, u64::MAX));
    let path = only_segment(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    bytes[10] ^= 0x20;
    fs::write(&path, bytes).unwrap();
    let error = recovered(dir.path()).err().expect("refused");
    assert!(
        matches!(error, JournalError::Corrupt { offset: 0, .. }),
        "{error}"
    );
    assert!(error.discard_point().is_some());
    let message = error.to_string();
    assert!(
        message.contains("the file header is damaged (format version 2097154"),
        "{message}"
    );
    assert!(!message.contains("newer"), "{message}");
}

/// A copy of `tests/fixtures/format-1`: a data directory written by a build of format 1.
fn format_1_data_dir() -> tempfile::TempDir {
    fixture_data_dir("format-1")
}

/// A copy of the data directory `tests/fixtures/<name>` (its journal, snapshots and head file;
/// not the script that wrote it).
fn fixture_data_dir(name: &str) -> tempfile::TempDir {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if name.starts_with("journal-") || name.starts_with("snapshot-") || name == head::FILE {
            fs::copy(&path, dir.path().join(name)).unwrap();
        }
    }
    dir
}

/// The 60 webhooks of the fixtures' script: webhook n went to customer n % 7 of account 2155
/// with total_points n * 10 and tier_name tier{n % 3}; each customer's last one wins.
fn assert_holds_the_fixtures_webhooks(store: &Store) {
    assert_eq!((store.revision(), store.len()), (60, 7));
    for customer in 0..7u64 {
        let last = (1..=60).filter(|n| n % 7 == customer).max().unwrap();
        let profile = store
            .get(&ProfileKey::new("2155", format!("c{customer}")))
            .unwrap();
        assert_eq!(profile.get_int(Field::TotalPoints), Some(last as i64 * 10));
        let tier = format!("tier{}", last % 3);
        assert_eq!(profile.get_text(Field::TierName), Some(tier.as_str()));
        assert_eq!(profile.revision, last);
    }
}

#[test]
fn a_format_1_data_directory_is_recovered_and_continued_in_format_2() {
    let dir = format_1_data_dir();
    let (store, recovered) = recovered(dir.path()).unwrap();
    assert_eq!(
        recovered.snapshot,
        Some(40),
        "the compaction base, format 1"
    );
    assert_eq!(recovered.replayed, 20);
    assert_holds_the_fixtures_webhooks(&store);
    assert_eq!(
        store.history_from(41, 100).unwrap().len(),
        20,
        "history rebuilt"
    );
    let listed: Vec<String> = store
        .scan(None, None, 100, |_| true)
        .profiles
        .iter()
        .map(|profile| profile.key.customer_id.to_string())
        .collect();
    assert_eq!(
        listed,
        ["c0", "c1", "c2", "c3", "c4", "c5", "c6"],
        "key order"
    );

    let tail = recovered.tail.unwrap();
    assert_eq!(tail.format, codec::FrameFormat::V1);
    let old_tail = fs::read(&tail.path).unwrap();
    let mut journal =
        Journal::open(dir.path(), Some(tail), 61, u64::MAX, FaultSwitch::default()).unwrap();
    assert!(
        segments(dir.path())
            .unwrap()
            .iter()
            .all(|(first, _)| *first < 61),
        "no segment of the new format before a record needs one: an older build can still start"
    );
    let newer = |revision: u64| {
        let update = ProfileUpdate {
            key: ProfileKey::new("2155", format!("new-{revision}")),
            at: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            fields: vec![(Field::TotalPoints, Some(Scalar::Int(1)))],
            extras: vec![],
            origin: crate::profile::Origin::Webhook,
        };
        UpdateRecord::new(revision, &update)
    };
    let updates = vec![newer(61), newer(62)];
    journal.append(&BatchRecord { updates }).unwrap();
    journal.close().unwrap();
    let new = dir.path().join("journal-00000000000000000061.log");
    assert_eq!(
        codec::check_header(&fs::read(&new).unwrap(), codec::SEGMENT_MAGIC),
        Ok(codec::FrameFormat::V2),
        "new records go to a new segment in the new format"
    );
    assert_eq!(
        fs::read(dir.path().join("journal-00000000000000000045.log")).unwrap(),
        old_tail,
        "the old segment is left as it was"
    );
    assert_eq!(recovered_revision(dir.path()), 62);
}

#[test]
fn a_format_2_data_directory_is_recovered_and_its_snapshots_continue_in_format_3() {
    // The same 60 webhooks as format 1's, written by the last build of format 2 (snapshots
    // with a record per field register), its head file included.
    let dir = fixture_data_dir("format-2");
    let (store, from_format_2) = recovered(dir.path()).unwrap();
    assert_eq!(
        from_format_2.snapshot,
        Some(40),
        "the compaction base, format 2"
    );
    assert_eq!(from_format_2.replayed, 20);
    assert_holds_the_fixtures_webhooks(&store);
    let profiles = store.scan(None, None, 100, |_| true).profiles;

    // The next snapshot is written in format 3 and loads the same profiles.
    let written = snapshot::write(dir.path(), 60, &profiles).unwrap();
    assert_eq!(
        codec::check_header(&fs::read(&written).unwrap(), codec::SNAPSHOT_MAGIC),
        Ok(codec::FrameFormat::V3)
    );
    fs::remove_file(dir.path().join("snapshot-00000000000000000040.snap")).unwrap();
    let (again, reloaded) = recovered(dir.path()).unwrap();
    assert_eq!((reloaded.snapshot, reloaded.replayed), (Some(60), 0));
    assert_eq!(again.scan(None, None, 100, |_| true).profiles, profiles);
}

#[test]
fn a_torn_format_1_tail_is_still_cut_and_a_damaged_format_1_length_refused() {
    let dir = format_1_data_dir();
    let path = dir.path().join("journal-00000000000000000045.log");
    let bytes = fs::read(&path).unwrap();
    // The file ends inside its last frame (record 60), as a crash leaves it.
    fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    assert_eq!(recovered_revision(dir.path()), 59);

    // The first record's length damaged so that it seems to run past the end: format 1 has no
    // header checksum, but the valid frames after it show it is no torn write.
    let mut damaged = bytes.clone();
    damaged[codec::HEADER_LEN + 1] ^= 0x10;
    fs::write(&path, &damaged).unwrap();
    refused_at(dir.path(), &path, codec::HEADER_LEN);
    // Issue 10's bit: the high byte of the first length. Refused, not cut off.
    let mut damaged = bytes;
    damaged[15] ^= 0x80;
    fs::write(&path, &damaged).unwrap();
    let error = refused_at(dir.path(), &path, codec::HEADER_LEN);
    assert!(
        error.to_string().contains("implausible frame length"),
        "{error}"
    );
}

#[test]
fn a_clean_shutdown_mark_does_not_hold_against_an_older_build_appending_after_it() {
    // Upgraded, stopped cleanly before any webhook, rolled back: the older build appends to
    // its format 1 segment, knowing nothing of JOURNAL_HEAD. Upgraded again: no refusal.
    let dir = format_1_data_dir();
    let (_, recovered) = recovered(dir.path()).unwrap();
    let tail = recovered.tail.unwrap();
    let path = tail.path.clone();
    Journal::open(dir.path(), Some(tail), 61, u64::MAX, FaultSwitch::default())
        .unwrap()
        .close()
        .unwrap();
    assert!(head::read(dir.path()).unwrap().unwrap().closed.is_some());
    let newer = ProfileUpdate {
        key: ProfileKey::new("2155", "rolled-back"),
        at: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        fields: vec![(Field::TotalPoints, Some(Scalar::Int(1)))],
        extras: vec![],
        origin: crate::profile::Origin::Webhook,
    };
    let payload = prost::Message::encode_to_vec(&BatchRecord {
        updates: vec![UpdateRecord::new(61, &newer)],
    });
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&frame)
        .unwrap();
    assert_eq!(recovered_revision(dir.path()), 61);
}

#[test]
fn a_record_that_does_not_decode_stops_recovery_at_its_frame_after_the_batches_before_it() {
    // The frames are decoded on a second thread ahead of the merge: its failure must still be
    // reported at its own frame, with every batch before it replayed and none after it.
    let dir = tempfile::tempdir().unwrap();
    let mut journal = write(dir.path(), 3, u64::MAX);
    let mut bad = record(11);
    bad.fields[0].field = 999;
    let updates = vec![record(10), bad, record(12)];
    journal.append(&BatchRecord { updates }).unwrap();
    let updates = (13..=15).map(record).collect();
    journal.append(&BatchRecord { updates }).unwrap();
    drop(journal);
    let path = only_segment(dir.path());
    let (offsets, _) = frame_offsets(&path);
    let error = refused_at(dir.path(), &path, offsets[3]);
    match error {
        JournalError::Corrupt {
            first_lost, reason, ..
        } => {
            assert_eq!(first_lost, 10, "the three batches before it were replayed");
            assert!(reason.contains("999"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

/// Appends batches `batches` of three records, each record a new customer `u<revision>`.
fn append_new_customers(journal: &mut Journal, batches: std::ops::Range<u64>) {
    for batch in batches {
        let updates = (1..=3)
            .map(|i| {
                let revision = batch * 3 + i;
                let mut update = record(revision);
                update.customer_id = format!("u{revision:04}");
                update
            })
            .collect();
        journal.append(&BatchRecord { updates }).unwrap();
    }
}

#[test]
fn a_snapshot_and_the_profiles_replayed_after_it_are_listed_together_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path(), None, 1, 300, FaultSwitch::default()).unwrap();
    append_new_customers(&mut journal, 0..20);
    let (state, _) = recovered(dir.path()).unwrap();
    snapshot::take(dir.path(), &state, 10).unwrap();
    append_new_customers(&mut journal, 20..40);
    let (state, _) = recovered(dir.path()).unwrap();
    // The snapshot at 60 becomes the base below the window: recovery loads it, replays 61..120.
    snapshot::take(dir.path(), &state, 10).unwrap();

    let (store, recovered) = recovered(dir.path()).unwrap();
    assert_eq!((recovered.snapshot, recovered.replayed), (Some(60), 60));
    let listed: Vec<String> = store
        .scan(None, None, 1000, |_| true)
        .profiles
        .iter()
        .map(|profile| profile.key.customer_id.to_string())
        .collect();
    let expected: Vec<String> = (1..=120)
        .map(|revision| format!("u{revision:04}"))
        .collect();
    assert_eq!(listed, expected, "every profile once, in key order");
}

#[test]
fn the_records_after_a_revision_are_counted_in_whole_segments_and_estimated_in_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path(), None, 1, 600, FaultSwitch::default()).unwrap();
    append_new_customers(&mut journal, 0..50);
    let segments = segments(dir.path()).unwrap();
    assert!(segments.len() > 3, "{} segments", segments.len());
    let newest_first = segments.last().unwrap().0;
    for revision in [0, 1, 40, newest_first - 1, newest_first + 1, 149] {
        let estimated = recovery::records_after(&segments, revision) as u64;
        let actual = 150 - revision;
        // The newest segment is estimated from its size at the others' bytes per record,
        // which differ by a varint byte or so: within a batch.
        assert!(
            estimated.abs_diff(actual) <= 3,
            "after {revision}: estimated {estimated}, actual {actual}"
        );
    }
    // A journal of one segment has nothing to learn from: its records are not estimated.
    let one = tempfile::tempdir().unwrap();
    let single = write(one.path(), 4, u64::MAX);
    drop(single);
    assert_eq!(
        recovery::records_after(&super::segments(one.path()).unwrap(), 0),
        0
    );
}

#[test]
fn segment_names_claiming_a_huge_journal_reserve_no_more_than_their_bytes_can_hold() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 4, u64::MAX).close().unwrap();
    // A second segment named as if some 10^18 records came before it: a gap, to be refused
    // with its error rather than by an allocation of room for that many profiles.
    let first = segments(dir.path()).unwrap()[0].1.clone();
    let bogus = writer::segment_path(dir.path(), 1_000_000_000_000_000_000);
    fs::copy(&first, &bogus).unwrap();
    let claimed = recovery::records_after(&segments(dir.path()).unwrap(), 0);
    let bytes = fs::metadata(&first).unwrap().len() * 2;
    assert!(
        claimed as u64 <= bytes,
        "{claimed} records claimed in {bytes} bytes"
    );
    match recovered(dir.path()) {
        Err(JournalError::Gap { .. }) => {}
        other => panic!(
            "expected a gap, got {:?}",
            other.map(|(_, recovered)| recovered)
        ),
    }
}

/// A data dir whose journal holds `batches` (each a list of record revisions, written as they
/// are, in order) in one segment named after the first one's first revision, and, with
/// `snapshot_at`, a snapshot of the state the records up to it make (taken from a second
/// journal of those records alone). Recovery uses a snapshot only when the journal does not
/// start at revision 1.
fn journal_of(batches: &[&[u64]], snapshot_at: Option<u64>) -> tempfile::TempDir {
    let write_batches = |dir: &Path, batches: &[&[u64]]| {
        let first = batches.iter().find_map(|batch| batch.first()).copied();
        let mut journal = Journal::open(
            dir,
            None,
            first.unwrap_or(1),
            u64::MAX,
            FaultSwitch::default(),
        )
        .unwrap();
        for revisions in batches {
            let updates = revisions.iter().map(|revision| record(*revision)).collect();
            journal.append(&BatchRecord { updates }).unwrap();
        }
    };
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), batches);
    if let Some(revision) = snapshot_at {
        let before = tempfile::tempdir().unwrap();
        let records: Vec<u64> = (1..=revision).collect();
        write_batches(before.path(), &[&records]);
        let (store, _) = recovered(before.path()).unwrap();
        let profiles = store.scan(None, None, usize::MAX, |_| true).profiles;
        snapshot::write(dir.path(), revision, &profiles).unwrap();
    }
    dir
}

#[test]
fn revisions_that_go_back_after_the_replay_started_are_refused_not_dropped() {
    // Refused as damage at the batch, everything before it replayed (`first_lost`, which is
    // also what giving the journal up from there would lose).
    let refused = |batches: &[&[u64]], snapshot_at, first: u64, said: &str| {
        let dir = journal_of(batches, snapshot_at);
        match recovered(dir.path()).map(|(store, _)| store.revision()) {
            Err(JournalError::Corrupt {
                first_lost, reason, ..
            }) => {
                assert_eq!(first_lost, first, "{batches:?}: {reason}");
                assert!(reason.contains(said), "{batches:?}: {reason}");
            }
            other => panic!("{batches:?}: {other:?}"),
        }
    };
    // A batch that goes back within itself, in the middle of the journal and at its end.
    refused(
        &[&[1, 2, 3], &[4, 3], &[5]],
        None,
        4,
        "revision 3 follows revision 4",
    );
    refused(
        &[&[1, 2, 3], &[4, 3]],
        None,
        4,
        "revision 3 follows revision 4",
    );
    // One the replay already has, whole, after a snapshot.
    let again = "revision 5 again: the replay already has it (it needs 8 next)";
    refused(&[&[2, 3], &[4, 5, 6], &[7], &[5]], Some(3), 8, again);
    // One that ends below the snapshot after the replay went past it.
    refused(
        &[&[2, 3], &[4, 5, 6], &[7, 2], &[8]],
        Some(3),
        7,
        "revision 2 follows revision 7",
    );
    // A record without a revision (prost reads it as 0).
    refused(
        &[&[1, 2, 3], &[4, 0], &[5]],
        None,
        4,
        "revision 0 follows revision 4",
    );
    // What the snapshot holds is still skipped, a batch across it cut: the journals, sound.
    for (batches, replayed) in [
        (&[&[2, 3][..], &[4, 5, 6], &[7], &[8]][..], 5),
        (&[&[2], &[3, 4, 5], &[6]], 3),
    ] {
        let dir = journal_of(batches, Some(3));
        let (store, recovered) = recovered(dir.path()).unwrap();
        assert_eq!(recovered.snapshot, Some(3));
        assert_eq!(
            (store.revision(), recovered.replayed),
            (3 + replayed, replayed)
        );
    }
}

#[test]
fn an_empty_batch_before_the_snapshot_does_not_make_the_batches_it_holds_decoded() {
    // A batch the snapshot holds, whose middle record does not decode (its customer id is not
    // UTF-8), is skipped by its last revision, an empty batch before it or not: none of its
    // records is needed.
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path(), None, 2, u64::MAX, FaultSwitch::default()).unwrap();
    journal.append(&BatchRecord { updates: vec![] }).unwrap();
    let mut payload = prost::Message::encode_to_vec(&batch(2..=2));
    // Field 1 (an update) holding revision 3 and a customer id (field 3) of one byte, 0xff.
    payload.extend_from_slice(&[0x0a, 0x05, 0x08, 0x03, 0x1a, 0x01, 0xff]);
    payload.extend(prost::Message::encode_to_vec(&batch(4..=4)));
    journal
        .append_encoded(&codec::frame_of(&payload), Some((2, 4)))
        .unwrap();
    journal.append(&batch(5..=6)).unwrap();
    drop(journal);
    let sound = journal_of(&[&[2, 3, 4]], Some(4));
    let snapshot = snapshot::list(sound.path()).unwrap().remove(0).1;
    std::fs::copy(&snapshot, dir.path().join(snapshot.file_name().unwrap())).unwrap();
    let (store, recovered) = recovered(dir.path()).unwrap();
    assert_eq!(recovered.snapshot, Some(4));
    assert_eq!((store.revision(), recovered.replayed), (6, 2));
}

#[test]
fn a_crash_leaves_the_runway_after_the_frames_and_recovery_cuts_it_off() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 4, u64::MAX));
    let path = only_segment(dir.path());
    let end = frames_end(&path) as u64;
    let len = fs::metadata(&path).unwrap().len();
    assert!(
        len > end && len >= writer::RUNWAY_BYTES,
        "frames end at {end}, the file at {len}: the frames are written into zeros ahead"
    );
    let (store, recovered) = recovered(dir.path()).unwrap();
    assert_eq!(store.revision(), 12);
    assert_eq!(recovered.tail.as_ref().unwrap().len, end);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        end,
        "the runway is cut off"
    );

    let mut journal = reopen(dir.path(), recovered.tail, 13);
    journal.append(&batch(13..=15)).unwrap();
    drop(journal);
    assert_eq!(recovered_revision(dir.path()), 15);
}

#[test]
fn a_clean_close_and_leaving_a_segment_cut_the_runway_off_and_zeros_after_a_close_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = write(dir.path(), 20, 300);
    let segments = segments(dir.path()).unwrap();
    assert!(segments.len() > 2, "{} segments", segments.len());
    for (_, path) in &segments[..segments.len() - 1] {
        assert_eq!(
            fs::metadata(path).unwrap().len() as usize,
            frames_end(path),
            "a segment left for the next ends at its last frame"
        );
    }
    let newest = &segments.last().unwrap().1;
    assert!(fs::metadata(newest).unwrap().len() as usize > frames_end(newest));
    journal.close().unwrap();
    let end = frames_end(newest);
    assert_eq!(fs::metadata(newest).unwrap().len() as usize, end);
    assert_eq!(recovered_revision(dir.path()), 60);

    // After a clean shutdown the journal ends where it was left: zeros after it are a change.
    OpenOptions::new()
        .append(true)
        .open(newest)
        .unwrap()
        .write_all(&[0; 4096])
        .unwrap();
    refused_at(dir.path(), newest, end);
}

#[test]
fn a_torn_frame_header_split_by_a_sector_that_never_reached_the_disk_is_cut_in_the_runway() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path(), None, 1, u64::MAX, FaultSwitch::default()).unwrap();
    let path = only_segment(dir.path());
    // One-record batches until the frames end within a header's length before a sector's end.
    let mut revision = 0;
    while !(SECTOR_LEN - 11..SECTOR_LEN).contains(&(frames_end(&path) % SECTOR_LEN)) {
        revision += 1;
        assert!(revision < 500, "the frames never ended near a sector's end");
        journal.append(&batch(revision..=revision)).unwrap();
    }
    drop(journal);
    let end = frames_end(&path);
    // The next frame, of which only the first sector reached the disk: its header is cut
    // short by the sector after it, which reads back as the runway's zeros.
    let mut frame = Vec::new();
    codec::encode_frame(&batch(revision + 1..=revision + 20), &mut frame);
    let written = SECTOR_LEN - end % SECTOR_LEN;
    write_after_frames(&path, &frame[..written]);
    assert_eq!(recovered_revision(dir.path()), revision);
    assert_eq!(fs::metadata(&path).unwrap().len() as usize, end, "cut off");
}

/// The disk sector recovery's torn-write rules reason in.
const SECTOR_LEN: usize = 512;

/// A batch of the one record `revision` whose frame ([`codec::batch_frame`], as the journal
/// writes it) is exactly `len` bytes long (its customer id padded), for `len` of a few hundred bytes or more.
fn batch_of_frame_len(revision: u64, len: usize) -> BatchRecord {
    let frame_len = |batch: &BatchRecord| codec::batch_frame(batch).len();
    let mut batch = batch(revision..=revision);
    let mut pad = len.saturating_sub(frame_len(&batch));
    loop {
        batch.updates[0].customer_id = format!("c{}", "x".repeat(pad));
        match frame_len(&batch) {
            found if found == len => return batch,
            found if found > len => pad -= 1,
            _ => pad += 1,
        }
    }
}

/// Kills stop a write into the page cache between pages: the next frame written into the
/// runway up to a page boundary, its last bytes (as few as one) still the runway's zeros. It
/// was never acknowledged, and before the runway the same kill left the file short: cut, as
/// then. The same zeros at the end of a frame, starting one byte after the boundary (where
/// neither a kill nor a sector that never reached the disk leaves them), are damage.
#[test]
fn a_frame_a_kill_stopped_at_a_page_boundary_is_cut_however_few_bytes_it_lacks() {
    for missing in 1..=12 {
        let dir = tempfile::tempdir().unwrap();
        drop(write(dir.path(), 4, u64::MAX));
        let path = only_segment(dir.path());
        let end = frames_end(&path);
        let page = (end / 4096 + 2) * 4096;
        let frame = codec::batch_frame(&batch_of_frame_len(13, page + missing - end));
        assert_eq!(end + frame.len(), page + missing);
        write_after_frames(&path, &frame[..frame.len() - missing]);
        assert_eq!(
            recovered_revision(dir.path()),
            12,
            "{missing} bytes missing"
        );
        assert_eq!(fs::metadata(&path).unwrap().len() as usize, end, "cut off");

        // The frame whole but for its last bytes, which do not start at a page boundary.
        let dir = tempfile::tempdir().unwrap();
        drop(write(dir.path(), 4, u64::MAX));
        let mut frame = codec::batch_frame(&batch_of_frame_len(13, page + missing + 1 - end));
        let zeros_from = frame.len() - missing;
        frame[zeros_from..].fill(0);
        let path = only_segment(dir.path());
        write_after_frames(&path, &frame);
        refused_at(dir.path(), &path, end);
    }
}

/// Every batch frame ends in a mark that is not zero, so a damaged last frame never passes for
/// a write a kill stopped at a page boundary: here one ending a byte past a page boundary, its
/// last record ending in a zero (an integer field of value 0), is refused, not cut.
#[test]
fn a_damaged_last_frame_ending_just_past_a_page_boundary_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = write(dir.path(), 4, u64::MAX);
    let path = only_segment(dir.path());
    let end = frames_end(&path);
    let page = (end / 4096 + 2) * 4096;
    let mut last = record(13);
    last.fields[1].value = Some(codec::ScalarRecord::Int(0));
    let mut batch = BatchRecord {
        updates: vec![last],
    };
    let mut pad = 0;
    while end + codec::batch_frame(&batch).len() != page + 1 {
        pad += 1;
        assert!(pad < 10_000, "no frame of that length");
        batch.updates[0].customer_id = format!("c{}", "x".repeat(pad));
    }
    let mut records = Vec::new();
    codec::encode_frame(&batch, &mut records);
    assert_eq!(records.last(), Some(&0), "the records alone end in a zero");
    journal.append(&batch).unwrap();
    drop(journal);
    assert_eq!(frames_end(&path), page + 1);
    flip(&path, end + 40, 2);
    refused_at(dir.path(), &path, end);
}

/// A frame of an earlier build carries no end mark and can end in a zero: last, damaged, and
/// ending a byte past a page boundary in that zero, it is refused, not taken for a write a
/// kill stopped there.
#[test]
fn a_damaged_last_frame_without_the_end_mark_ending_past_a_page_boundary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 4, u64::MAX));
    let path = only_segment(dir.path());
    let end = frames_end(&path);
    // An earlier build's segment: no runway.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(end as u64)
        .unwrap();
    let page = (end / 4096 + 2) * 4096;
    let mut last = record(13);
    last.fields[1].value = Some(codec::ScalarRecord::Int(0));
    let mut batch = BatchRecord {
        updates: vec![last],
    };
    let encoded = |batch: &BatchRecord| {
        let mut frame = Vec::new();
        codec::encode_frame(batch, &mut frame);
        frame
    };
    let mut pad = 0;
    while end + encoded(&batch).len() != page + 1 {
        pad += 1;
        assert!(pad < 10_000, "no frame of that length");
        batch.updates[0].customer_id = format!("c{}", "x".repeat(pad));
    }
    let frame = encoded(&batch);
    assert_eq!(frame.last(), Some(&0));
    write_after_frames(&path, &frame);
    assert_eq!(recovered_revision(dir.path()), 13);
    flip(&path, end + 40, 2);
    refused_at(dir.path(), &path, end);
}

/// A newest segment whose header was never completed (an empty file, as a crash while it was
/// created leaves) is removed, and the one before it is recovered as the newest: after a clean
/// stop (its end is where the stop left it) and after a crash (its runway of zeros is cut off).
/// It was removed during the read, after the one before it had been read as an older one:
/// start-up then refused, saying that intact segment was missing, or refused its runway as
/// damage (adversary round 12, F7).
#[test]
fn an_empty_newest_segment_is_removed_and_the_one_before_it_is_the_newest_again() {
    for clean in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = write(dir.path(), 4, u64::MAX);
        if clean {
            journal.close().unwrap();
        }
        drop(journal);
        let empty = dir.path().join("journal-00000000000000000013.log");
        fs::write(&empty, b"").unwrap();
        let (store, recovered) = recovered(dir.path()).unwrap();
        assert_eq!(store.revision(), 12, "clean: {clean}");
        assert!(!empty.exists(), "clean: {clean}");
        let tail = recovered.tail.unwrap();
        assert_eq!(tail.first_revision, 1);
        assert_eq!(fs::metadata(&tail.path).unwrap().len(), tail.len);
    }
}

/// A snapshot alone (no journal: what a restore leaves) that is damaged, with nothing newer,
/// is refused and left where it is. Recovery passing damage took "no snapshot past it" for an
/// empty start: the store came up empty under the same id, the snapshot renamed aside
/// (adversary round 13).
#[test]
fn a_damaged_snapshot_with_nothing_newer_and_no_journal_is_refused_not_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 4, u64::MAX));
    let (store, _) = recovered(dir.path()).unwrap();
    let taken = snapshot::take(dir.path(), &store, 1000).unwrap();
    for (_, path) in segments(dir.path()).unwrap() {
        fs::remove_file(path).unwrap();
    }
    fs::remove_file(dir.path().join(head::FILE)).unwrap();
    let len = fs::metadata(&taken.path).unwrap().len() as usize;
    flip(&taken.path, len - 10, 1);
    let history = crate::store::HistoryLimits::events(1000);
    let refused = crate::startup::recover_store(dir.path(), history, "test").err();
    assert!(
        matches!(refused, Some(JournalError::DamagedSnapshot { .. })),
        "{refused:?}"
    );
    assert!(taken.path.exists(), "left where it is");
}

/// A snapshot past the end of the journal recovered (here its newest segment and JOURNAL_HEAD
/// lost) holds revisions the journal lost: recovery starts from it, appends start a new
/// segment after it, and start-up is told where the journal ended (it gives the store a new
/// id). One that cannot be loaded is set aside, so that no later start (passing damage) and no
/// compaction takes it for this history (adversary round 13: five acknowledged updates were
/// replaced by the lost values), and the journal's end stands.
#[test]
fn a_journal_that_ends_before_a_snapshot_is_started_past_from_it() {
    let history = crate::store::HistoryLimits::events(1000);
    for damaged in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        drop(write(dir.path(), 6, 300));
        let (store, _) = recovered(dir.path()).unwrap();
        assert_eq!(store.revision(), 18);
        let taken = snapshot::take(dir.path(), &store, 1000).unwrap();
        let segments = segments(dir.path()).unwrap();
        assert!(segments.len() >= 2, "{segments:?}");
        fs::remove_file(&segments.last().unwrap().1).unwrap();
        fs::remove_file(dir.path().join(head::FILE)).unwrap();
        if damaged {
            let len = fs::metadata(&taken.path).unwrap().len() as usize;
            flip(&taken.path, len / 2, 1);
        }
        let (store, recovered) =
            crate::startup::recover_store(dir.path(), history, "test").unwrap();
        let ended_at = recovered.journal_ended_at.expect("told");
        assert!(ended_at < 18, "{ended_at}");
        assert!(recovered.tail.is_none(), "appends start a new segment");
        let mut aside = taken.path.clone().into_os_string();
        aside.push(".damaged");
        if damaged {
            assert_eq!(store.revision(), ended_at);
            assert!(!taken.path.exists() && Path::new(&aside).exists());
            assert_eq!(recovered.snapshot, None);
        } else {
            assert_eq!((store.revision(), recovered.snapshot), (18, Some(18)));
            assert!(taken.path.exists() && !Path::new(&aside).exists());
        }
    }
}

/// A snapshot's writing asks whether the directory is still the server's before the file is
/// created and again before it is renamed into place; told no the second time, it leaves no
/// file (not even its temporary one), replaces none of the same name, and compacts nothing.
/// (It asked once, before reading the state, which takes seconds at a million profiles: a
/// directory moved aside meanwhile for a restore got the old store's snapshot and compaction in
/// the new one; adversary round 13.)
#[test]
fn a_snapshot_into_a_directory_no_longer_the_servers_leaves_nothing_and_replaces_nothing() {
    let dir = tempfile::tempdir().unwrap();
    drop(write(dir.path(), 6, 300));
    let (store, _) = recovered(dir.path()).unwrap();
    snapshot::take(dir.path(), &store, 1).unwrap();
    let before = file_names(dir.path());
    let asked = std::cell::Cell::new(0);
    let in_place = || {
        asked.set(asked.get() + 1);
        match asked.get() {
            1 => Ok(()),
            _ => Err(JournalError::Format {
                path: dir.path().to_owned(),
                reason: "moved".into(),
            }),
        }
    };
    let same_name = snapshot::list(dir.path()).unwrap().pop().unwrap().1;
    let kept = fs::read(&same_name).unwrap();
    let error = snapshot::take_in_place(dir.path(), &store, 1, &in_place).err();
    assert!(
        matches!(error, Some(JournalError::Format { .. })),
        "{error:?}"
    );
    assert_eq!(asked.get(), 2);
    assert_eq!(file_names(dir.path()), before);
    assert_eq!(fs::read(&same_name).unwrap(), kept);
}
