//! A full disk, for real: the data directory on a small tmpfs, the real binary, its HTTP and
//! gRPC health surfaces. Needs root (CI runs as root) to mount the tmpfs; if mounting fails the
//! tests fail, they never skip.

use crate::common;
use crate::common::binary;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use binary::{Binary, PATIENCE, file_names};
use common::{at, profile_updated};
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

/// A tmpfs of `size` mounted on a fresh temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        Tmpfs::mount_options(&format!("size={size}"))
    }

    /// A tmpfs of `size` with room for `inodes` files.
    fn mount_with(size: &str, inodes: u32) -> Tmpfs {
        Tmpfs::mount_options(&format!("size={size},nr_inodes={inodes}"))
    }

    fn mount_options(options: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(status) if status.success() => Tmpfs { dir },
            other => panic!(
                "cannot mount a tmpfs ({options}) on {} ({other:?}): this test needs root (as \
                 CI runs) to fill a real disk",
                dir.path().display()
            ),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem of `dir` with one file until it refuses another byte; returns the file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [64 * 1024, 4096, 1] {
        let bytes = vec![0xAB; chunk];
        loop {
            match file.write(&bytes) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
                Err(error) => panic!("filling the disk: {error}"),
            }
        }
    }
    let _ = file.sync_all();
    path
}

/// Uses up the inodes of the filesystem of `dir` with empty files in a new directory, which
/// it returns.
fn fill_inodes(dir: &Path) -> PathBuf {
    let files = dir.join("inode-filler");
    std::fs::create_dir(&files).unwrap();
    for n in 0.. {
        match std::fs::File::create(files.join(n.to_string())) {
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
            Err(error) => panic!("using up the inodes: {error}"),
        }
        assert!(n < 100_000, "the filesystem's inodes never ran out");
    }
    files
}

const SERVICE: &str = "gameball.profiles.v1.ProfileService";

/// Issue 10, bug 1: the disk fills up just as the journal needs a new segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_at_segment_rotation_heals_once_space_is_back_and_readiness_never_lies() {
    let disk = Tmpfs::mount_with("8m", 1000);
    let data = disk.path().join("data");
    let mut binary = Binary::start(&data, &["--segment-bytes", "65536"]).await;
    // Two webhooks of ~40 KB fill the first segment past 64 KiB: the next change rotates.
    let blob = "x".repeat(40_000);
    for (n, customer) in ["a", "b"].into_iter().enumerate() {
        let body = profile_updated(customer, &at(n as u32), json!({"blob": blob}));
        assert_eq!(binary.post(&body).await.0, 200);
    }
    let mut health = binary.health().await;
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || statuses.message().await.unwrap().unwrap().status();
    assert_eq!(next_status().await, ServingStatus::Serving);

    // Bytes and inodes: leaving the first segment cuts off its runway (the zeros written ahead
    // of its frames), which frees a megabyte; the new segment's file must still not fit.
    let filler = fill(disk.path());
    let inodes = fill_inodes(disk.path());
    let third = profile_updated("c", &at(3), json!({"total_points": 3}));
    let (status, answer) = binary.post(&third).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(next_status().await, ServingStatus::NotServing);
    assert_eq!(binary.ready().await, 503);

    // While the disk stays full, every probe of the sequencer fails and readiness stays false.
    tokio::time::timeout(PATIENCE, async {
        tokio::select! {
            status = next_status() => panic!(
                "health turned {status:?} while the disk is full and webhooks get 503"
            ),
            () = async {
                binary.wait_for("journal probe failed").await;
                binary.wait_for("journal probe failed").await;
            } => {}
        }
    })
    .await
    .expect("two probes within the patience");
    assert_eq!(binary.ready().await, 503);
    assert_eq!(binary.post(&third).await.0, 503, "still full");

    std::fs::remove_file(filler).unwrap();
    std::fs::remove_dir_all(inodes).unwrap();
    // Every refused webhook repeated NOT_SERVING; what follows must be SERVING.
    let status = tokio::time::timeout(PATIENCE, async {
        loop {
            match next_status().await {
                ServingStatus::NotServing => continue,
                other => return other,
            }
        }
    })
    .await;
    assert_eq!(
        status.expect("a new status once the disk has room"),
        ServingStatus::Serving
    );
    assert_eq!(binary.ready().await, 200);
    let (status, answer) = binary.post(&third).await;
    assert_eq!(
        (status, answer),
        (200, json!({"outcome": "applied", "revision": 3})),
        "ready means webhooks are taken"
    );
    assert_eq!(
        file_names(&data),
        [
            "JOURNAL_HEAD",
            "LOCK",
            "STORE_ID",
            "dead-letters",
            "journal-00000000000000000001.log",
            "journal-00000000000000000003.log"
        ],
        "no half-created segment or temporary file is left"
    );

    binary.stop();
    let binary = Binary::start(&data, &["--segment-bytes", "65536"]).await;
    let info = binary.server_info().await;
    assert_eq!((info.revision, info.profile_count), (3, 3));
}

/// Issue 10, bug 5: a snapshot that fails (here for lack of space) must not leave its
/// temporary file, and one left by a crash is removed at start-up. Each attempt is counted by
/// its outcome: a log line alone left operators blind to a journal that was never trimmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_fails_for_lack_of_space_leaves_no_temporary_file_and_is_counted() {
    let disk = Tmpfs::mount("4m");
    let data = disk.path().join("data");
    let args = ["--snapshot-every-records", "5"];
    let mut binary = Binary::start(&data, &args).await;
    // Four profiles of ~40 KB: the snapshot after the fifth record needs ~160 KB.
    let blob = "x".repeat(40_000);
    for n in 1..=4 {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"blob": blob}));
        assert_eq!(binary.post(&body).await.0, 200);
    }
    // A full disk with two pages free: room for a small journal frame, not for the snapshot.
    let filler = fill(disk.path());
    let filled = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .and_then(|file| file.set_len(filled - 8192))
        .unwrap();
    let small = profile_updated("c5", &at(5), json!({"total_points": 5}));
    assert_eq!(binary.post(&small).await.0, 200);
    let failed = binary
        .wait_for("snapshot failed; the next one will retry")
        .await;
    assert!(
        failed["error"].as_str().unwrap().contains("No space left"),
        "{failed}"
    );
    let names = file_names(&data);
    assert!(
        !names.iter().any(|name| name.ends_with(".tmp")),
        "the failed snapshot's temporary file is gone: {names:?}"
    );
    let snapshots = async |binary: &Binary| {
        let text = binary.metrics().await;
        let outcome = |outcome| {
            let labels = [("outcome", outcome)];
            common::metric(&text, "profile_state_snapshots_total", &labels)
        };
        (outcome("written"), outcome("failed"))
    };
    assert_eq!(snapshots(&binary).await, (Some(0.0), Some(1.0)));

    // With room again, the next one is written, and counted so.
    std::fs::remove_file(&filler).unwrap();
    for n in 6..=10 {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"total_points": n}));
        assert_eq!(binary.post(&body).await.0, 200);
    }
    binary.wait_for("snapshot written").await;
    assert_eq!(snapshots(&binary).await, (Some(1.0), Some(1.0)));
    binary.stop();

    // One left behind by a crash mid-snapshot is removed at start-up.
    let stale = data.join("snapshot-00000000000000000005.snap.tmp");
    std::fs::write(&stale, vec![0; 100_000]).unwrap();
    let binary = Binary::start(&data, &args).await;
    assert!(
        !stale.exists(),
        "a stale temporary snapshot is removed at start-up"
    );
    assert_eq!(binary.server_info().await.revision, 10);
}

/// A restart while the disk is full: the service starts and serves reads, readiness says not
/// ready (webhooks would get 503), and all comes right once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_full_disk_serves_reads_and_is_not_ready_until_there_is_room() {
    let disk = Tmpfs::mount("8m");
    let data = disk.path().join("data");
    let binary = Binary::start(&data, &[]).await;
    let first = profile_updated("a", &at(1), json!({"total_points": 1}));
    assert_eq!(binary.post(&first).await.0, 200);
    binary.stop();

    let filler = fill(disk.path());
    let binary = Binary::start(&data, &[]).await;
    assert_eq!(binary.server_info().await.revision, 1, "reads work");
    assert_eq!(binary.ready().await, 503);
    let mut health = binary.health().await;
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || statuses.message().await.unwrap().unwrap().status();
    assert_eq!(next_status().await, ServingStatus::NotServing);
    let second = profile_updated("b", &at(2), json!({"total_points": 2}));
    assert_eq!(binary.post(&second).await.0, 503);

    std::fs::remove_file(filler).unwrap();
    let status = tokio::time::timeout(PATIENCE, async {
        loop {
            match next_status().await {
                ServingStatus::NotServing => continue,
                other => return other,
            }
        }
    })
    .await;
    assert_eq!(
        status.expect("ready once there is room"),
        ServingStatus::Serving
    );
    assert_eq!(
        binary.post(&second).await,
        (200, json!({"outcome": "applied", "revision": 2}))
    );
    binary.stop();
    let binary = Binary::start(&data, &[]).await;
    assert_eq!(binary.server_info().await.revision, 2);
}

/// A disk filled while the journal holds files recovery no longer needs (segments and
/// snapshots before the newest snapshot, kept for watchers resuming across a restart): the
/// service removes them and writes again by itself, the filler still there. It stayed 503
/// until an operator came: no record can be appended, so no snapshot came due, and compaction
/// runs only after a snapshot (found by an adversarial run). Every update is there after a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_of_the_journals_own_history_makes_room_by_itself() {
    let disk = Tmpfs::mount("4m");
    let data = disk.path().join("data");
    let args = [
        "--snapshot-every-records",
        "50",
        "--history-events",
        "100000",
        "--segment-bytes",
        "65536",
    ];
    let mut binary = Binary::start(&data, &args).await;
    let blob = "x".repeat(1_000);
    for n in 1..=400 {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"blob": blob}));
        assert_eq!(binary.post(&body).await.0, 200, "webhook {n}");
    }
    binary.wait_for("snapshot written").await;
    let before = file_names(&data).len();
    let filler = fill(disk.path());

    // The segment's runway takes a few records; then the disk is full, until room is made,
    // the filler still there.
    let deadline = std::time::Instant::now() + PATIENCE;
    let (mut acknowledged, mut refused) = (400, 0);
    for n in 401.. {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"total_points": n}));
        let status = binary.post(&body).await.0;
        assert!(
            std::time::Instant::now() < deadline,
            "webhook {n}: {status}"
        );
        match status {
            200 if refused > 0 => {
                acknowledged += 1;
                break;
            }
            200 => acknowledged += 1,
            503 => refused += 1,
            other => panic!("webhook {n}: {other}"),
        }
        if refused > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let made_room = "the disk is full: removed the journal files before the newest snapshot, \
                     kept for watchers resuming across a restart and needed by no recovery, so \
                     that the journal can be written again (after a restart, watchers resuming \
                     before that snapshot get Reset); free space on the disk";
    binary.wait_for(made_room).await;
    assert!(file_names(&data).len() < before, "{:?}", file_names(&data));
    assert!(filler.exists());
    binary.stop();

    let binary = Binary::start(&data, &args).await;
    let info = binary.server_info().await;
    assert_eq!(
        (info.revision, info.profile_count),
        (acknowledged, acknowledged)
    );
}

/// A batch of `records` records from `first` on, each a new customer with a long name (about
/// 100 bytes a record).
fn batch_of(first: u64, records: u64) -> profile_state::journal::codec::BatchRecord {
    use profile_state::journal::codec::{BatchRecord, UpdateRecord};
    use profile_state::profile::{Field, Origin, ProfileKey, ProfileUpdate, Scalar};
    let updates = (first..first + records)
        .map(|revision| {
            let update = ProfileUpdate {
                key: ProfileKey::new("2155", format!("customer-{revision:0>60}")),
                at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                fields: vec![(Field::TotalPoints, Some(Scalar::Int(revision as i64)))],
                extras: vec![],
                origin: Origin::Webhook,
            };
            UpdateRecord::new(revision, &update)
        })
        .collect();
    BatchRecord { updates }
}

/// The journal writes its frames into zeros written ahead (the runway, a megabyte at a time):
/// a disk with room for the next frames but not for the next runway still takes them, and
/// every one it took is recovered.
#[test]
fn a_disk_too_full_for_the_journals_runway_still_takes_the_records_that_fit() {
    use profile_state::journal::{FaultSwitch, Journal};
    let disk = Tmpfs::mount("4m");
    let dir = disk.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let mut journal = Journal::open(&dir, None, 1, u64::MAX, FaultSwitch::default()).unwrap();
    const RECORDS: u64 = 50;
    journal.append(&batch_of(1, RECORDS)).unwrap();
    let segment = dir.join("journal-00000000000000000001.log");
    let with_runway = std::fs::metadata(&segment).unwrap().len();
    assert!(
        with_runway > 1 << 20,
        "a runway after the first frame: {with_runway} bytes"
    );

    // The disk full, then 64 KiB freed: room for frames, not for another megabyte of zeros.
    let filler = fill(disk.path());
    let filler_len = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(filler_len - 64 * 1024)
        .unwrap();
    let mut next = 1 + RECORDS;
    let mut past_the_runway = 0;
    loop {
        let before = std::fs::metadata(&segment).unwrap().len();
        if journal.append(&batch_of(next, RECORDS)).is_err() {
            break;
        }
        next += RECORDS;
        if std::fs::metadata(&segment).unwrap().len() > before {
            past_the_runway += 1;
        }
        assert!(next < 1_000_000, "the disk never filled up");
    }
    assert!(
        past_the_runway >= 5,
        "frames past the runway taken on a disk with no room for another: {past_the_runway}"
    );
    let acknowledged = next - 1;
    drop(journal);

    let history = profile_state::store::HistoryLimits::events(1000);
    let (store, _) = profile_state::startup::recover_store(&dir, history, "test").unwrap();
    assert_eq!(
        store.revision(),
        acknowledged,
        "every record taken is recovered"
    );
}
