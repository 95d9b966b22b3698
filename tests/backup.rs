//! Online backup and restore through the real binary: `profile-state backup` of a server
//! taking webhooks the whole time, `profile-state restore` into a new data directory, the
//! restored directory served by the binary, and every profile compared with the state the
//! server had at the backup's revision.

use crate::common;
use crate::common::binary;

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use binary::{Binary, bare_command};
use common::{TestService, at, durable_config, profile_updated};
use profile_state::pb;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use serde_json::json;
use tokio::sync::oneshot;

/// Customers the load spreads its updates over, so most updates change an existing profile.
const CUSTOMERS: u32 = 25;

async fn run(args: Vec<String>) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut command = under_umask_022(bare_command(&args));
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// `command` run by a shell that sets the umask to 022 first: what the binary creates must be
/// its owner's only by itself, which a test run under umask 077 would not show.
fn under_umask_022(command: std::process::Command) -> std::process::Command {
    let mut shell = std::process::Command::new("sh");
    shell
        .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(command.get_program())
        .args(command.get_args());
    for (name, value) in command.get_envs() {
        match value {
            Some(value) => shell.env(name, value),
            None => shell.env_remove(name),
        };
    }
    shell
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Posts updates until `stop` (and at least 100): update `n` sets customer
/// `c{n % CUSTOMERS}`'s `total_points` to `n`; `warmed` is told after the 50th. Returns
/// `(customer, n, revision)` of each, in order.
async fn load(
    service: Arc<TestService>,
    stop: Arc<AtomicBool>,
    warmed: oneshot::Sender<()>,
) -> Vec<(String, i64, u64)> {
    let mut applied = Vec::new();
    let mut warmed = Some(warmed);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) || n < 100 {
        n += 1;
        let customer = format!("c{}", n % CUSTOMERS);
        let body = profile_updated(&customer, &at(n), json!({"total_points": n}));
        let (status, answer) = service.post(&body).await;
        assert_eq!(status, 200, "{answer}");
        applied.push((customer, i64::from(n), answer["revision"].as_u64().unwrap()));
        if n == 50 {
            let _ = warmed.take().map(|warmed| warmed.send(()));
        }
    }
    applied
}

/// Every profile the binary serves, by customer id.
async fn profiles(grpc: std::net::SocketAddr) -> HashMap<String, pb::Profile> {
    let mut client = ProfileServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (profiles, _) = common::list_all(&mut client).await;
    profiles
        .into_iter()
        .map(|profile| (profile.customer_id.clone(), profile))
        .collect()
}

fn path(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_under_load_restores_to_the_state_at_its_revision() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original");
    let mut config = durable_config(&original);
    // Small messages, so the backup arrives in many pieces.
    config.grpc_max_message_bytes = 1024;
    let service = Arc::new(TestService::start_with(config).await);
    let stop = Arc::new(AtomicBool::new(false));
    let (warmed, warm) = oneshot::channel();
    let load = tokio::spawn(load(Arc::clone(&service), Arc::clone(&stop), warmed));
    // Some history first, then the backup while updates keep coming.
    warm.await.unwrap();
    let file = dir.path().join("backup.snap");
    let backup = run(vec![
        "backup".into(),
        "--grpc".into(),
        service.grpc.to_string(),
        path(&file),
    ])
    .await;
    stop.store(true, Ordering::Relaxed);
    let applied = load.await.unwrap();
    assert!(backup.status.success(), "{}", text(&backup.stderr));
    let said = text(&backup.stdout);
    let revision: u64 = said
        .rsplit("as of revision ")
        .next()
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    let last = applied.last().unwrap().2;
    assert!(
        revision >= 50 && revision < last,
        "taken under load: {revision} of {last}"
    );
    assert_eq!(partial_files(dir.path()), Vec::<String>::new());
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size > 1024, "{size} bytes: more than one message's worth");
    // Personal data: the backup, and the data directories the binary creates, are their
    // owner's only whatever the umask (they were readable by everyone; a fresh-eyes run).
    let private = |path: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o077 == 0
    };
    assert!(private(&file), "the backup file");
    // (This one the test's own process created, under the test's umask.)
    assert!(private(&original), "a data directory the service created");

    // The state at the backup's revision: each customer's last update at or before it.
    let mut expected: HashMap<String, (i64, u64)> = HashMap::new();
    for (customer, points, at_revision) in &applied {
        if *at_revision <= revision {
            expected.insert(customer.clone(), (*points, *at_revision));
        }
    }

    // A restore never overwrites: the original directory is refused.
    let refused = run(vec![
        "restore".into(),
        path(&file),
        "--data-dir".into(),
        path(&original),
    ])
    .await;
    assert_eq!(refused.status.code(), Some(64), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("is not empty"));

    let restored = dir.path().join("restored");
    let restore = run(vec![
        "restore".into(),
        path(&file),
        "--data-dir".into(),
        path(&restored),
    ])
    .await;
    assert!(restore.status.success(), "{}", text(&restore.stderr));
    assert!(private(&restored), "a data directory restore created");
    for file in files_under(&restored) {
        assert!(private(&file), "{} (restored)", file.display());
    }
    assert!(
        text(&restore.stdout).contains(&format!("as of revision {revision} into")),
        "{}",
        text(&restore.stdout)
    );

    let original_id = service.server_info().await.store_id;
    let binary = Binary::start(&restored, &[]).await;
    let info = binary.server_info().await;
    assert_eq!(info.revision, revision);
    assert_ne!(info.store_id, original_id, "a restore gets a new store id");
    let served = profiles(binary.grpc).await;
    assert_eq!(served.len(), expected.len());
    for (customer, (points, at_revision)) in &expected {
        let profile = &served[customer];
        assert_eq!(profile.total_points, Some(*points), "{customer}");
        assert_eq!(profile.revision, *at_revision, "{customer}");
    }
    // Revisions continue from the backup's.
    let next = profile_updated("new", &at(1), json!({"total_points": 1}));
    let (status, answer) = binary.post(&next).await;
    assert_eq!(
        (status, answer["revision"].as_u64()),
        (200, Some(revision + 1))
    );
    binary.stop();
    Arc::into_inner(service).unwrap().stop().await;
}

/// The names of the `.partial` files in `dir`.
fn partial_files(dir: &Path) -> Vec<String> {
    let names = std::fs::read_dir(dir).unwrap();
    let names = names.map(|entry| entry.unwrap().file_name().into_string().unwrap());
    names.filter(|name| name.ends_with(".partial")).collect()
}

/// The backup wrote into a fixed `FILE.partial`, opened following links: a link planted there
/// made it overwrite the link's target and then rename the link to FILE; and two backups to one
/// FILE at once wrote into the same file, so FILE ended damaged (both found by an adversarial
/// run). Each backup now writes a new file of its own: the planted link's target is untouched,
/// of two at once each succeeds or is refused (one backup at a time), and FILE is a whole
/// backup.
#[tokio::test(flavor = "multi_thread")]
async fn backups_write_files_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let service = TestService::start_with(durable_config(&dir.path().join("data"))).await;
    for n in 1..=20 {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"total_points": n}));
        assert_eq!(service.post(&body).await.0, 200);
    }
    let file = dir.path().join("backup.snap");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"kept").unwrap();
    let planted = dir.path().join("backup.snap.partial");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let backup = || {
        let args = ["backup", "--grpc", &service.grpc.to_string(), &path(&file)];
        run(args.iter().map(|arg| arg.to_string()).collect())
    };
    let (first, second) = tokio::join!(backup(), backup());
    assert!(first.status.success() || second.status.success());
    for output in [&first, &second] {
        let said = text(&output.stderr);
        let refused = said.contains("a backup is being taken already");
        assert!(output.status.success() || refused, "{said}");
    }
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"kept",
        "the link's target"
    );
    assert!(std::fs::symlink_metadata(&file).unwrap().is_file());
    assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());
    assert_eq!(partial_files(dir.path()), ["backup.snap.partial"]);
    // Not into the data directory of a server: replacing its journal lost acknowledged
    // webhooks (an adversarial run).
    let inside = dir
        .path()
        .join("data")
        .join("journal-00000000000000000001.log");
    let args = [
        "backup",
        "--grpc",
        &service.grpc.to_string(),
        &path(&inside),
    ];
    let refused = run(args.iter().map(|arg| arg.to_string()).collect()).await;
    assert_eq!(refused.status.code(), Some(64), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("is in the data directory"));
    // Nor in a directory within one: a letter-like name there stopped the next start-up, and
    // a `.tmp` one was removed by it (adversary round 12, F6).
    let letters = dir.path().join("data").join("dead-letters");
    std::fs::create_dir_all(&letters).unwrap();
    for name in [format!("{}.json", "0".repeat(40)), "nightly.tmp".into()] {
        let inside = path(&letters.join(name));
        let args = ["backup", "--grpc", &service.grpc.to_string(), &inside];
        let refused = run(args.iter().map(|arg| arg.to_string()).collect()).await;
        assert_eq!(refused.status.code(), Some(64), "{}", text(&refused.stderr));
        assert!(text(&refused.stderr).contains("is in the data directory"));
    }
    // A volume's root, its `lost+found` kept, is a place to restore to. A backup readable by
    // all (copied with an operator's umask) is restored into files of their own all the same
    // (the snapshot kept the backup's bits: an adversarial run).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let restored = dir.path().join("restored");
    std::fs::create_dir_all(restored.join("lost+found")).unwrap();
    let restore = run(vec![
        "restore".into(),
        path(&file),
        "--data-dir".into(),
        path(&restored),
    ]);
    let restore = restore.await;
    assert!(restore.status.success(), "{}", text(&restore.stderr));
    assert!(
        text(&restore.stdout).contains("20 profiles"),
        "{}",
        text(&restore.stdout)
    );
    for written in files_under(&restored) {
        if written.starts_with(restored.join("lost+found")) {
            continue;
        }
        let mode = std::fs::metadata(&written).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", written.display());
    }
    // A DIR that cannot be used, found before anything is written: a usage error, as a
    // missing FILE is (it was exit 1; a first-user review). Tests run as root, for whom no
    // directory is unwritable: a directory in the place of its LOCK file stands for one.
    let unusable = dir.path().join("unusable");
    std::fs::create_dir_all(unusable.join("LOCK")).unwrap();
    let args = ["restore", &path(&file), "--data-dir", &path(&unusable)];
    let refused = run(args.iter().map(|arg| arg.to_string()).collect()).await;
    let said = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(64), "{said}");
    assert!(
        said.contains("unusable: open its lock file, LOCK: Is a directory"),
        "{said}"
    );
    service.stop().await;

    // A restore that fails half-way (here: no file may grow past 512 bytes, as on a full
    // disk) left a half-made directory, which the retry refused as not empty and the service
    // served as an empty store (an adversarial run). Nothing is left now; the retry succeeds.
    let again = dir.path().join("again");
    let args = ["restore", &path(&file), "--data-dir", &path(&again)];
    let mut limited = std::process::Command::new("sh");
    limited
        .args(["-c", "trap '' XFSZ && ulimit -f 1 && exec \"$0\" \"$@\""])
        .arg(bare_command(&args).get_program())
        .args(args);
    let failed = tokio::task::spawn_blocking(move || limited.output().unwrap());
    let failed = failed.await.unwrap();
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed.stderr));
    assert!(
        text(&failed.stderr).contains("nothing was left in --data-dir"),
        "{}",
        text(&failed.stderr)
    );
    assert!(!again.exists(), "the directory the restore made is gone");
    let retried = run(args.iter().map(|arg| arg.to_string()).collect()).await;
    assert!(retried.status.success(), "{}", text(&retried.stderr));
    restore_killed_half_way(&file).await;
    restore_follows_no_planted_link(&file).await;
}

/// Links planted under the names of the files a restore writes (the store id's temporary
/// file, the marker) were followed: their targets outside the directory were overwritten
/// (found by an adversarial run). The restore replaces them and leaves the targets alone.
async fn restore_follows_no_planted_link(backup: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("planted");
    std::fs::create_dir(&target).unwrap();
    let victims = [dir.path().join("victim-1"), dir.path().join("victim-2")];
    for (victim, name) in victims.iter().zip(["STORE_ID.tmp", "RESTORING"]) {
        std::fs::write(victim, b"precious").unwrap();
        std::os::unix::fs::symlink(victim, target.join(name)).unwrap();
    }
    let args = ["restore", &path(backup), "--data-dir", &path(&target)];
    let restored = run(args.iter().map(|arg| arg.to_string()).collect()).await;
    assert!(restored.status.success(), "{}", text(&restored.stderr));
    for victim in &victims {
        assert_eq!(std::fs::read(victim).unwrap(), b"precious", "{victim:?}");
    }
    assert_eq!(
        binary::file_names(&target),
        ["LOCK", "STORE_ID", "snapshot-00000000000000000020.snap"]
    );
}

/// A restore killed half-way (here by SIGXFSZ, the default action of a write past `ulimit
/// -f`: no clean-up runs) left a half-made directory that the service served as the store,
/// empty or in part. It is marked until the restore has proven it recovers: the service
/// refuses it, and a restore into it starts over.
async fn restore_killed_half_way(backup: &Path) {
    let dir = tempfile::tempdir().unwrap();
    // Killed at its first write of a byte: the marker, written before the store id (a restore
    // killed while it wrote the store id, the marker not yet there, was served as an empty
    // store; found by an adversarial run).
    let first_byte = dir.path().join("first-byte");
    restore_killed_at(backup, &first_byte, 0).await;
    assert!(!first_byte.join("STORE_ID").exists());
    let refused = binary::refused(&first_byte, &[]).await;
    assert!(text(&refused.stderr).contains("holds a restore that did not finish"));
    // Killed while it wrote the backup.
    let target = dir.path().join("killed");
    restore_killed_at(backup, &target, 1).await;
    assert!(target.join("STORE_ID").exists(), "the restore had begun");
    let args = ["restore", &path(backup), "--data-dir", &path(&target)];

    let refused = binary::refused(&target, &[]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("holds a restore that did not finish"),
        "{}",
        text(&refused.stderr)
    );
    let again = run(args.iter().map(|arg| arg.to_string()).collect()).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("restored 20 profiles"));
    let served = Binary::start(&target, &[]).await;
    assert_eq!(served.server_info().await.profile_count, 20);
    let body = profile_updated("acknowledged", &at(1), json!({}));
    assert_eq!(served.post(&body).await.0, 200);
    served.stop();

    // A marker left beside what a server wrote (a version that does not know it served the
    // directory): the restore wiped the acknowledged webhooks, and succeeded (an adversarial
    // run). It refuses, naming a file, and leaves them.
    std::fs::write(target.join("RESTORING"), b"").unwrap();
    let before = binary::file_names(&target);
    let refused = run(args.iter().map(|arg| arg.to_string()).collect()).await;
    assert_eq!(refused.status.code(), Some(64), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("but also files a server wrote since (JOURNAL_HEAD)"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(binary::file_names(&target), before);

    // The backup inside the directory: it was overwritten, then removed.
    let inside = dir.path().join("inside");
    std::fs::create_dir(&inside).unwrap();
    std::fs::copy(backup, inside.join("RESTORING")).unwrap();
    let args = [
        "restore",
        &path(&inside.join("RESTORING")),
        "--data-dir",
        &path(&inside),
    ];
    let refused = run(args.iter().map(|arg| arg.to_string()).collect()).await;
    assert_eq!(refused.status.code(), Some(64), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("move the backup out first"));
    assert_eq!(
        std::fs::read(inside.join("RESTORING")).unwrap(),
        std::fs::read(backup).unwrap()
    );
}

/// `restore` into `target`, killed by SIGXFSZ at its first write past `blocks` of 512 bytes
/// (`ulimit -f`: the default action, so no clean-up runs).
async fn restore_killed_at(backup: &Path, target: &Path, blocks: u32) {
    use std::os::unix::process::ExitStatusExt;
    let args = ["restore", &path(backup), "--data-dir", &path(target)];
    let mut limited = std::process::Command::new("sh");
    limited
        .args(["-c", &format!("ulimit -f {blocks} && exec \"$0\" \"$@\"")])
        .arg(bare_command(&args).get_program())
        .args(args);
    let killed = tokio::task::spawn_blocking(move || limited.output().unwrap());
    let killed = killed.await.unwrap();
    assert_eq!(killed.status.signal(), Some(25), "SIGXFSZ: {killed:?}");
}

/// Each Backup call held a copy of the state, with no limit on how many ran at once: eight
/// clients that stopped reading took a gigabyte (found by an adversarial run). One at a time:
/// another is refused RESOURCE_EXHAUSTED while a stream is open, and served once it is gone.
#[tokio::test(flavor = "multi_thread")]
async fn one_backup_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = durable_config(&dir.path().join("data"));
    // Small pieces, a state larger than the server buffers for a stream (about 900 KB), and a
    // first client with a small window that stops reading: its backup cannot all be sent, so
    // its stream stays open.
    config.grpc_max_message_bytes = 1024;
    let service = TestService::start_with(config).await;
    for n in 1..=15 {
        let blob = format!("{n:06}{}", "x".repeat(60_000));
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"blob": blob}));
        assert_eq!(service.post(&body).await.0, 200);
    }
    let client = || async {
        let channel = service.channel().await;
        pb::admin_service_client::AdminServiceClient::new(channel)
    };
    let mut first = small_window_admin(&service).await;
    let mut held = first
        .backup(pb::BackupRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(held.message().await.unwrap().is_some(), "the first piece");
    let refused = client()
        .await
        .backup(pb::BackupRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("a backup is being taken already")
    );
    drop((held, first));
    let deadline = std::time::Instant::now() + binary::PATIENCE;
    loop {
        match client().await.backup(pb::BackupRequest {}).await {
            Ok(_) => break,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(std::time::Instant::now() < deadline, "still refused");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    service.stop().await;
}

/// A Backup whose client stopped reading (window 0, pings answered) held the one backup slot
/// for as long as its connection lived, refusing every other backup (found by an adversarial
/// run). Past `--backup-stall-timeout` the backup is abandoned and the slot is free; the
/// stalled client, if it reads again, gets what HTTP/2 held and then DEADLINE_EXCEEDED, never
/// a clean end that would pass a truncated backup for a whole one.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_whose_client_stops_reading_gives_up_the_slot_after_the_stall_timeout() {
    // More than the queue and HTTP/2 hold: the encoding thread waits for room.
    stalled_backup(15).await;
}

/// A client that stopped reading once the last piece was queued kept the queued pieces, and
/// the slot went to the next backup: 15 such clients of a small store took 65 MB (found by an
/// adversarial run). The queue holds its share of the slot until its pieces are taken, and is
/// abandoned like any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_whose_client_stops_reading_after_it_is_all_queued_is_abandoned_too() {
    // Five pieces: one read, one held by HTTP/2, three queued; the thread is done.
    stalled_backup(5).await;
}

/// A backup of `profiles` profiles of 60 KB, whose client reads the first piece and stops;
/// once a second backup is served, the first ends DEADLINE_EXCEEDED after at most what HTTP/2
/// held for it.
async fn stalled_backup(profiles: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = durable_config(&dir.path().join("data"));
    // Pieces larger than tonic gathers before it writes (32 KiB): HTTP/2 holds one, the rest
    // wait in the queue.
    config.grpc_max_message_bytes = 64 * 1024;
    config.backup_stall_timeout = std::time::Duration::from_secs(1);
    let service = TestService::start_with(config).await;
    for n in 1..=profiles {
        let blob = format!("{n:06}{}", "x".repeat(60_000));
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"blob": blob}));
        assert_eq!(service.post(&body).await.0, 200);
    }
    let mut stalled = small_window_admin(&service)
        .await
        .backup(pb::BackupRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        stalled.message().await.unwrap().is_some(),
        "the first piece"
    );

    let deadline = std::time::Instant::now() + binary::PATIENCE;
    let mut second = loop {
        let mut client = pb::admin_service_client::AdminServiceClient::new(service.channel().await);
        match client.backup(pb::BackupRequest {}).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(std::time::Instant::now() < deadline, "the slot stays taken");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    let mut count = 0;
    while let Some(piece) = second.message().await.expect("the second backup is whole") {
        count = count.max(piece.profile_count);
    }
    assert_eq!(count, u64::from(profiles));

    // What was queued for it was dropped: it gets what HTTP/2 held (the queue's pieces too,
    // before), then the error.
    let (mut after_the_stall, mut bytes) = (0, 0);
    let ended = loop {
        match stalled.message().await {
            Ok(Some(piece)) => {
                (after_the_stall, bytes) = (after_the_stall + 1, bytes + piece.chunk.len())
            }
            Ok(None) => panic!("a stalled backup must not end OK"),
            Err(status) => break status,
        }
    };
    assert!(after_the_stall <= 2, "{after_the_stall} pieces kept for it");
    // Small pieces: a stream whose client keeps it open and reads nothing holds one (1 MiB
    // pieces held about 1.7 MiB for each backup abandoned so: found by an adversarial run).
    assert!(bytes <= 2 * 16 * 1024, "{bytes} bytes kept for it");
    assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    assert!(
        ended.message().contains("--backup-stall-timeout"),
        "{ended:?}"
    );
    service.stop().await;
}

/// An AdminService client whose streams have a 1 KiB window: it stops taking a backup as soon
/// as it stops reading.
async fn small_window_admin(
    service: &TestService,
) -> pb::admin_service_client::AdminServiceClient<tonic::transport::Channel> {
    let small_window = tonic::transport::Channel::from_shared(format!("http://{}", service.grpc))
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    pb::admin_service_client::AdminServiceClient::new(small_window)
}

/// Every file under `dir`, in its subdirectories too.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        match path.is_dir() {
            true => files.extend(files_under(&path)),
            false => files.push(path),
        }
    }
    files
}

/// A data directory that already existed (made by an operator, a volume mount) keeps its
/// mode, and under a usual umask of 022 the journal, snapshot and dead letters written into it
/// were readable by everyone (found by a fresh-eyes run). The binary creates them its owner's
/// only, whatever the umask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_an_existing_data_directory_are_their_owners_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = ["--snapshot-every-records", "1"];
    let binary = Binary::spawn(under_umask_022(binary::command(&data, &args))).await;
    let kept = profile_updated("kept", &at(1), json!({"total_points": 1}));
    assert_eq!(binary.post(&kept).await.0, 200);
    let mut letter = profile_updated("letter", &at(2), json!({}));
    letter["data"]["tier_order"] = json!("high");
    assert_eq!(binary.post(&letter).await.0, 422, "kept as a dead letter");
    binary.stop();
    let files = files_under(&data);
    assert!(
        files.len() >= 4,
        "journal, snapshot, dead letter, store id: {files:?}"
    );
    for file in files {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", file.display());
    }
}

/// The backup replaces FILE by a rename, which would replace a link or a device node itself
/// (`backup /dev/full` made a regular file of it) and left `.partial` files beside a directory:
/// such targets are refused before anything is written (found by an adversarial run).
#[tokio::test]
async fn backup_refuses_a_target_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let regular = dir.path().join("regular");
    std::fs::write(&regular, b"kept").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&regular, &link).unwrap();
    let directory = dir.path().join("directory");
    std::fs::create_dir(&directory).unwrap();
    for target in [&link, &directory, Path::new("/dev/null")] {
        let refused = run(vec!["backup".into(), path(target)]).await;
        let stderr = text(&refused.stderr);
        assert_eq!(
            refused.status.code(),
            Some(64),
            "{}: {stderr}",
            target.display()
        );
        assert!(stderr.contains("is not a regular file"), "{stderr}");
    }
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(std::fs::read(&regular).unwrap(), b"kept");
    assert!(
        !std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_file()
    );
    let mut names = binary::file_names(dir.path());
    names.sort();
    assert_eq!(names, ["directory", "link", "regular"], "no .partial left");
}

/// FILE in a directory that does not exist, or under a file: said of the directory, and a
/// usage error found before connecting, as a missing backup is for `restore` (a first-user
/// review: "create a partial file beside: No such file or directory" of the partial file's
/// name, exit 1). No server runs: the default address would refuse the connection.
#[tokio::test]
async fn backup_into_a_directory_that_does_not_exist_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let regular = dir.path().join("regular");
    std::fs::write(&regular, b"kept").unwrap();
    let missing = dir.path().join("nodir");
    let cases = [
        (
            missing.join("x.snap"),
            "nodir does not exist: create the directory first",
        ),
        (regular.join("x.snap"), "regular is not a directory"),
        (
            regular.join("a/x.snap"),
            "is not a directory (a part of its path is a file)",
        ),
    ];
    for (target, said) in cases {
        let args = vec![
            "backup".into(),
            "--grpc".into(),
            "127.0.0.1:9".into(),
            path(&target),
        ];
        let refused = run(args).await;
        let stderr = text(&refused.stderr);
        assert_eq!(refused.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains(&format!("cannot write {}: ", target.display())),
            "{stderr}"
        );
        assert!(stderr.contains(said), "{stderr}");
    }
    assert!(!missing.exists());
}

#[tokio::test]
async fn restore_refuses_what_is_not_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-backup");
    std::fs::write(&file, b"hello").unwrap();
    let target = dir.path().join("target");
    let damaged = run(vec![
        "restore".into(),
        path(&file),
        "--data-dir".into(),
        path(&target),
    ])
    .await;
    assert_eq!(damaged.status.code(), Some(1), "{}", text(&damaged.stderr));
    let said = text(&damaged.stderr);
    assert!(
        said.contains("is not a whole backup: the block at offset 0 is damaged"),
        "{said}"
    );
    // This file is the backup: not the journal's advice to restore one (an adversarial run).
    assert!(
        said.contains("take the backup again (`profile-state backup`) or restore an older one")
            && !said.contains("from a backup of the data directory"),
        "{said}"
    );
    assert!(!target.exists(), "nothing created");
    let missing = run(vec![
        "restore".into(),
        path(&dir.path().join("none")),
        "--data-dir".into(),
        path(&target),
    ])
    .await;
    assert_eq!(missing.status.code(), Some(64), "{}", text(&missing.stderr));
    // A directory cannot be read as a file: a usage error, not a damaged backup (found by an
    // adversarial run).
    let directory = run(vec![
        "restore".into(),
        path(dir.path()),
        "--data-dir".into(),
        path(&target),
    ])
    .await;
    let said = text(&directory.stderr);
    assert_eq!(directory.status.code(), Some(64), "{said}");
    assert!(!said.contains("take the backup again"), "{said}");
}

/// A backup whose checksums hold but whose profiles a store could not hold is refused, naming
/// the profile: revisions past the backup's (the restored server gave revision 1 twice, and
/// watches of the initial state were reset for ever), a revision given twice, a profile made
/// after its last change, an empty id. They were restored (found by an adversarial run).
#[tokio::test]
async fn restore_refuses_a_backup_whose_profiles_no_store_holds() {
    use profile_state::journal::snapshot;
    use profile_state::profile::{Profile, ProfileKey};
    use std::sync::Arc;
    let profile = |customer: &str, revision: u64, create_revision: u64| {
        let mut profile = Profile::empty(ProfileKey::new("2155", customer));
        (profile.revision, profile.create_revision, profile.version) =
            (revision, create_revision, 1);
        Arc::new(profile)
    };
    let cases = [
        (2, vec![profile("a", 1, 1), profile("b", 2, 2)], None),
        (
            2,
            vec![profile("a", 1, 1), profile("b", 5, 5)],
            Some(
                r#"the profile of customer "b" of account "2155" has revision 5, past the backup's 2"#,
            ),
        ),
        (
            2,
            vec![profile("a", 2, 1), profile("b", 2, 2)],
            Some("two profiles have revision 2"),
        ),
        (
            3,
            vec![profile("a", 2, 3)],
            Some(
                r#"customer "a" of account "2155" was created at revision 3, after its last change at 2"#,
            ),
        ),
        (1, vec![profile("", 1, 1)], Some("has an empty id")),
    ];
    for (revision, profiles, refusal) in cases {
        let dir = tempfile::tempdir().unwrap();
        let file = snapshot::write(dir.path(), revision, &profiles).unwrap();
        let target = dir.path().join("target");
        let restored = run(vec![
            "restore".into(),
            path(&file),
            "--data-dir".into(),
            path(&target),
        ])
        .await;
        let said = text(&restored.stderr);
        match refusal {
            None => assert_eq!(restored.status.code(), Some(0), "{said}"),
            Some(refusal) => {
                assert_eq!(restored.status.code(), Some(1), "{said}");
                assert!(
                    said.contains("is not a backup a server can serve"),
                    "{said}"
                );
                assert!(said.contains(refusal), "{refusal}: {said}");
                assert!(!target.exists(), "nothing created");
            }
        }
    }
}

/// A restore reads its backup twice (checked, then copied): a pipe is refused before DIR is
/// touched, also one with no writer (its check waited for one forever); and a DIR that is a
/// link to nothing is said to be one (creating it failed with "File exists"). Both found by
/// an adversarial run.
#[tokio::test]
async fn restore_refuses_a_pipe_and_a_link_to_nothing_before_making_anything() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("backup.pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap();
    assert!(made.success());
    let target = dir.path().join("target");
    let mut child = bare_command(&["restore", &path(&pipe), "--data-dir", &path(&target)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the restore waited for a writer of the pipe");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let refused = child.wait_with_output().unwrap();
    let said = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(64), "{said}");
    assert!(said.contains("is not a regular file"), "{said}");
    assert!(!target.exists(), "nothing made");

    let backup = dir.path().join("backup");
    std::fs::write(&backup, b"never read").unwrap();
    let nowhere = dir.path().join("nowhere");
    std::os::unix::fs::symlink(&nowhere, &target).unwrap();
    let refused = run(vec![
        "restore".into(),
        path(&backup),
        "--data-dir".into(),
        path(&target),
    ])
    .await;
    let said = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(64), "{said}");
    assert!(
        said.contains(&format!(
            "is a symbolic link to {}, which does not exist",
            nowhere.display()
        )),
        "{said}"
    );
    assert!(!nowhere.exists(), "nothing made");
}

/// What a [`limiting_forwarder`] does once it has passed its limit.
#[derive(Clone, Copy)]
enum Past {
    /// Holds the connection open and silent until the client leaves: a server that stopped in
    /// the middle of a stream, or a partition without a reset.
    Stall,
    /// Closes the connection: a server that died in the middle of a stream.
    Close,
}

/// A TCP forwarder to `upstream` that passes the client's bytes on, and at most `limit` of the
/// server's back, then does what `past` says.
async fn limiting_forwarder(
    upstream: std::net::SocketAddr,
    limit: usize,
    past: Past,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            tokio::spawn(async move {
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let up = tokio::io::copy(&mut from_client, &mut to_server);
                let down = async {
                    let mut buffer = vec![0; limit];
                    let mut passed = 0;
                    while passed < limit {
                        let read = from_server.read(&mut buffer[..limit - passed]).await?;
                        if read == 0 {
                            break;
                        }
                        to_client.write_all(&buffer[..read]).await?;
                        passed += read;
                    }
                    match past {
                        Past::Stall => std::future::pending::<std::io::Result<()>>().await,
                        Past::Close => Ok(()),
                    }
                };
                // Until the client leaves: then the server's connection closes too.
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    address
}

/// A durable service in `dir/data` holding 300 profiles of about 1 KB each.
async fn with_300_kb(dir: &Path) -> TestService {
    let service = TestService::start_with(durable_config(&dir.join("data"))).await;
    let extra = "x".repeat(1000);
    for n in 0..300 {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({ "note": extra }));
        assert_eq!(service.post(&body).await.0, 200);
    }
    service
}

/// A server that stops sending in the middle of a backup kept the backup waiting for ever
/// (found by an adversarial run): each piece must come within `--timeout`, and the backup
/// gives up, leaving no file behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_gives_up_on_a_server_that_stops_sending() {
    let dir = tempfile::tempdir().unwrap();
    let service = with_300_kb(dir.path()).await;
    // The handshake and the answer's start pass; the backup's 300 KB do not.
    let stalling = limiting_forwarder(service.grpc, 64 * 1024, Past::Stall).await;
    let file = dir.path().join("backup.snap");
    let args = [
        "backup",
        "--grpc",
        &stalling.to_string(),
        "--timeout",
        "2s",
        &path(&file),
    ];
    let mut command = bare_command(&args);
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the backup still waited after 20 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("backup: no data for 2s (--timeout)"),
        "{}",
        text(&output.stderr)
    );
    assert!(!file.exists());
    assert_eq!(partial_files(dir.path()), Vec::<String>::new());
    service.stop().await;
}

/// What a backup of a 300 KB store through a forwarder that closes the connection after the
/// server's first `limit` bytes printed (it failed, exit 1, and left no file).
async fn backup_cut_off_after(limit: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let service = with_300_kb(dir.path()).await;
    let cutting = limiting_forwarder(service.grpc, limit, Past::Close).await;
    let file = dir.path().join("backup.snap");
    let output = run(vec![
        "backup".into(),
        "--grpc".into(),
        cutting.to_string(),
        path(&file),
    ])
    .await;
    let said = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(!file.exists());
    assert_eq!(partial_files(dir.path()), Vec::<String>::new());
    service.stop().await;
    said
}

/// A server that died in the middle of a backup: the backup says the stream broke off after
/// what arrived, and no longer blames TLS or client certificates on a connection that got past
/// them (found by an adversarial run).
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_cut_off_mid_stream_says_so_without_a_tls_hint() {
    let said = backup_cut_off_after(64 * 1024).await;
    assert!(
        said.contains("backup: the stream broke off after "),
        "{said}"
    );
    assert!(said.contains(" bytes (not kept): "), "{said}");
    assert!(!said.contains("TLS") && !said.contains("--cert"), "{said}");
}

/// A server that died before the backup's first piece: the hint names a stopped server
/// beside TLS, as the words of the error cannot tell them apart (it named only TLS and client
/// certificates; found by an adversarial run).
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_cut_off_before_its_first_piece_names_a_stopped_server() {
    // The server's first bytes (its HTTP/2 settings) pass; the answer does not.
    let said = backup_cut_off_after(9).await;
    assert!(
        said.contains("the server may have stopped or restarted"),
        "{said}"
    );
}
