//! Durability end to end, in-process: restarts on the same data directory, watch resume across
//! them, journal write failures, the data directory lock, and snapshots with compaction.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{TestService, at, durable_config, profile_updated};
use profile_state::pb::{self, watch_profiles_response::Event};
use profile_state::{Config, Server};
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn durable(dir: &Path) -> Config {
    durable_config(dir)
}

#[tokio::test]
async fn a_restart_brings_back_profiles_revisions_and_the_store_id() {
    let dir = tempfile::tempdir().unwrap();
    let service = TestService::start_with(durable(dir.path())).await;
    for n in 1..=10 {
        let data =
            json!({"total_points": n, "email": format!("c{}@example.com", n % 4), "note": n});
        service
            .update(&profile_updated(&format!("c{}", n % 4), &at(n), data))
            .await;
    }
    let info = service.server_info().await;
    assert!(info.durable);
    assert_eq!((info.revision, info.profile_count), (10, 4));
    let before = service.all_profiles().await.0;
    service.stop().await;

    let service = TestService::start_with(durable(dir.path())).await;
    let after = service.server_info().await;
    assert_eq!(after.store_id, info.store_id, "the same store");
    assert_eq!(after.revision, 10);
    assert_eq!(service.all_profiles().await.0, before);
    let answer = service
        .update(&profile_updated("c9", &at(11), json!({"total_points": 1})))
        .await;
    assert_eq!(
        answer,
        json!({"outcome": "applied", "revision": 11}),
        "revisions continue"
    );
    service.stop().await;

    // A wiped directory is a new store.
    let other = tempfile::tempdir().unwrap();
    let service = TestService::start_with(durable(other.path())).await;
    assert_ne!(service.server_info().await.store_id, info.store_id);
    service.stop().await;
}

async fn next(stream: &mut tonic::Streaming<pb::WatchProfilesResponse>) -> Event {
    stream
        .message()
        .await
        .expect("no stream error")
        .expect("stream open")
        .event
        .unwrap()
}

#[tokio::test]
async fn a_watcher_resumes_across_a_restart_without_missing_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let service = TestService::start_with(durable(dir.path())).await;
    let mut client = service.client().await;
    let mut stream = client
        .watch_profiles(pb::WatchProfilesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let Event::Synced(synced) = next(&mut stream).await else {
        panic!("expected Synced")
    };
    let store_id = synced.store_id;
    for n in 1..=3 {
        service
            .update(&profile_updated("a", &at(n), json!({"total_points": n})))
            .await;
    }
    let mut seen = 0;
    for _ in 1..=3 {
        let Event::Change(change) = next(&mut stream).await else {
            panic!("expected a change")
        };
        seen = change.revision;
    }
    drop(stream);
    // Changes the watcher misses: made while it is away, then the server restarts.
    for n in 4..=5 {
        service
            .update(&profile_updated("b", &at(n), json!({"total_points": n})))
            .await;
    }
    service.stop().await;

    let service = TestService::start_with(durable(dir.path())).await;
    let mut client = service.client().await;
    let mut stream = client
        .watch_profiles(pb::WatchProfilesRequest {
            start_revision: seen + 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for revision in 4..=5 {
        let Event::Change(change) = next(&mut stream).await else {
            panic!("expected change {revision}")
        };
        assert_eq!(change.revision, revision);
        assert_eq!(change.profile.unwrap().customer_id, "b");
    }
    let Event::Synced(synced) = next(&mut stream).await else {
        panic!("expected Synced")
    };
    assert_eq!(
        (synced.revision, synced.store_id.as_str()),
        (5, store_id.as_str())
    );
    service
        .update(&profile_updated("a", &at(6), json!({"total_points": 6})))
        .await;
    let Event::Change(change) = next(&mut stream).await else {
        panic!("expected the live change")
    };
    assert_eq!(change.revision, 6);
    service.stop().await;

    // With a history shorter than the gap, the watcher is told to start over.
    let mut config = durable(dir.path());
    config.history_events = 2;
    let service = TestService::start_with(config).await;
    let mut client = service.client().await;
    let mut stream = client
        .watch_profiles(pb::WatchProfilesRequest {
            start_revision: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Event::Reset(reset) = next(&mut stream).await else {
        panic!("expected Reset")
    };
    assert_eq!(
        (reset.revision, reset.store_id.as_str()),
        (5, store_id.as_str())
    );
    service.stop().await;
}

/// A health client of `service`, and the watch of ProfileService's status on it.
async fn profile_health(
    service: &TestService,
) -> (
    HealthClient<tonic::transport::Channel>,
    tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) {
    let mut health = HealthClient::new(service.channel().await);
    let statuses = health
        .watch(HealthCheckRequest {
            service: "gameball.profiles.v1.ProfileService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    (health, statuses)
}

async fn health_status(client: &mut HealthClient<tonic::transport::Channel>) -> i32 {
    client
        .check(HealthCheckRequest {
            service: "gameball.profiles.v1.ProfileService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn a_failing_disk_gets_503_applies_nothing_and_recovers_by_itself() {
    // Before the server starts: its ingest thread takes the subscriber it is started under.
    let (logs, _capture) = common::CapturedLogs::on_this_thread(tracing::Level::ERROR);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind(durable(dir.path())).await.unwrap();
    let faults = server.journal_faults();
    let service = TestService::serve(server);
    let (mut health, mut statuses) = profile_health(&service).await;
    let mut next_status = async || statuses.message().await.unwrap().unwrap().status();
    assert_eq!(next_status().await, ServingStatus::Serving);

    faults.fail_writes(true);
    let body = profile_updated("a", &at(1), json!({"total_points": 1}));
    for _ in 0..3 {
        let (status, answer) = service.post(&body).await;
        assert_eq!(status, 503, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("retry"),
            "{answer}"
        );
    }
    // Logged when writes start failing, not once per webhook (a full disk would flood the
    // logs); the capture may miss a line, never add one.
    let logged = logs.text().matches("journal write failed").count();
    assert!(logged <= 1, "{logged} lines:\n{}", logs.text());
    let mut client = service.client().await;
    let missing = client
        .get_profile(pb::GetProfileRequest {
            client_id: "2155".into(),
            customer_id: "a".into(),
            ..Default::default()
        })
        .await
        .expect_err("nothing applied");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(service.server_info().await.revision, 0, "no revision used");
    assert_eq!(next_status().await, ServingStatus::NotServing);
    assert_eq!(
        health_status(&mut health).await,
        ServingStatus::NotServing as i32
    );

    faults.fail_writes(false);
    assert_eq!(
        next_status().await,
        ServingStatus::Serving,
        "recovers by itself"
    );
    assert_eq!(
        service.update(&body).await,
        json!({"outcome": "applied", "revision": 1})
    );
    service.stop().await;

    let service = TestService::start_with(durable(dir.path())).await;
    assert_eq!(service.server_info().await.revision, 1);
    service.stop().await;
}

#[tokio::test]
async fn readiness_stays_false_until_the_segment_that_could_not_be_created_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = durable(dir.path());
    // Tiny segments: every batch after the first starts a new one.
    config.segment_bytes = 1;
    let server = Server::bind(config.clone()).await.unwrap();
    let faults = server.journal_faults();
    let service = TestService::serve(server);
    let (_health, mut statuses) = profile_health(&service).await;
    let mut next_status = async || statuses.message().await.unwrap().unwrap().status();
    assert_eq!(next_status().await, ServingStatus::Serving);
    service
        .update(&profile_updated("a", &at(1), json!({"total_points": 1})))
        .await;

    // The disk refuses the new segment (as a full one does); appends to the old one would work.
    faults.fail_segment_creation(true);
    let mut injected = faults.injected();
    let body = profile_updated("b", &at(2), json!({"total_points": 2}));
    let (status, answer) = service.post(&body).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(next_status().await, ServingStatus::NotServing);
    // The sequencer probes the disk every second: each probe must try what failed (creating
    // the segment), so readiness stays false as long as webhooks would be refused.
    let refused = *injected.borrow_and_update();
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            status = next_status() => panic!(
                "readiness turned {status:?} while a new segment cannot be created and \
                 webhooks get 503"
            ),
            probed = injected.wait_for(|count| *count >= refused + 2) => probed.map(|_| ()),
        }
    })
    .await
    .expect("the probe tries to create the segment")
    .unwrap();
    assert_eq!(service.admin_get("/readyz").await.0, 503);
    assert_eq!(service.post(&body).await.0, 503, "still refused");

    faults.fail_segment_creation(false);
    // Every refused webhook repeats NOT_SERVING; what follows must be SERVING.
    let status = loop {
        match next_status().await {
            ServingStatus::NotServing => continue,
            other => break other,
        }
    };
    assert_eq!(status, ServingStatus::Serving);
    assert_eq!(service.admin_get("/readyz").await.0, 200);
    assert_eq!(
        service.update(&body).await,
        json!({"outcome": "applied", "revision": 2})
    );
    service.stop().await;

    let service = TestService::start_with(config).await;
    assert_eq!(service.server_info().await.revision, 2);
    service.stop().await;
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::bind(durable(dir.path())).await.unwrap();
    let error = Server::bind(durable(dir.path()))
        .await
        .err()
        .expect("the directory is locked");
    assert!(error.to_string().contains("in use"), "{error}");
    drop(first);
    let again = Server::bind(durable(dir.path())).await;
    assert!(again.is_ok(), "the lock goes with the first server");
}

#[tokio::test]
async fn a_data_dir_that_cannot_be_created_is_refused_naming_it_and_its_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let error = match Server::bind(durable(&file.join("data"))).await {
        Ok(_) => panic!("a data dir inside a file was accepted"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains(&file.display().to_string()), "{error}");
    assert_eq!(error.matches("(os error 20)").count(), 1, "{error}");
}

/// A journal write refused for lack of space or of quota removes the journal files before the
/// newest snapshot (kept only for watchers resuming across a restart), so that a disk or quota
/// filled with them can be written again; another failure (an I/O error) removes nothing. Each
/// is injected into the journal's writes; the full disk itself is `disk_full`'s.
#[tokio::test]
async fn a_write_refused_for_space_or_quota_gives_up_old_journal_files_and_no_other_does() {
    let kinds = [
        (std::io::ErrorKind::QuotaExceeded, true),
        (std::io::ErrorKind::StorageFull, true),
        (std::io::ErrorKind::Other, false),
    ];
    for (kind, removes) in kinds {
        let dir = tempfile::tempdir().unwrap();
        let mut config = durable(dir.path());
        config.snapshot_every_records = 20;
        config.segment_bytes = 2048;
        config.history_events = 100_000;
        let server = Server::bind(config).await.unwrap();
        let faults = server.journal_faults();
        let service = TestService::serve(server);
        for n in 1..=60 {
            let body = profile_updated(&format!("c{n}"), &at(n), json!({"total_points": n}));
            service.update(&body).await;
        }
        // The first segment is kept for the history (100,000 events), the snapshot at 60 made.
        let first = dir.path().join("journal-00000000000000000001.log");
        let snapshot = dir.path().join("snapshot-00000000000000000060.snap");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !snapshot.exists() {
            assert!(std::time::Instant::now() < deadline, "no snapshot at 60");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(first.exists());
        faults.fail_writes_as(kind);
        let body = profile_updated("c61", &at(61), json!({"total_points": 61}));
        // Removed on the snapshots' thread (not beside a snapshot): looked at until it is
        // gone; kept is looked at for two seconds.
        let looked = std::time::Instant::now();
        while first.exists() && looked.elapsed() < std::time::Duration::from_secs(10) {
            assert_eq!(service.post(&body).await.0, 503);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if !removes && looked.elapsed() > std::time::Duration::from_secs(2) {
                break;
            }
        }
        assert_eq!(!first.exists(), removes, "{kind:?}");
        faults.fail_writes(false);
        service.stop().await;
        let service = TestService::start_with(durable(dir.path())).await;
        assert_eq!(service.server_info().await.revision, 60, "{kind:?}");
        service.stop().await;
    }
}

#[tokio::test]
async fn snapshots_compact_the_journal_and_a_restart_restores_state_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut config = durable(dir.path());
        config.snapshot_every_records = 40;
        config.segment_bytes = 2048;
        config.history_events = 30;
        config
    };
    let service = TestService::start_with(config()).await;
    for n in 1..=200 {
        let data = json!({"total_points": n, "tier_name": format!("t{}", n % 3)});
        service
            .update(&profile_updated(&format!("c{}", n % 20), &at(n), data))
            .await;
    }
    let before = service.all_profiles().await.0;
    // Stopping waits for background snapshots, so the directory is settled afterwards.
    service.stop().await;

    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().any(|name| name.starts_with("snapshot-")),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|name| name == "journal-00000000000000000001.log"),
        "the first segment was compacted away: {names:?}"
    );

    let service = TestService::start_with(config()).await;
    assert_eq!(service.all_profiles().await.0, before);
    let info = service.server_info().await;
    assert_eq!(info.revision, 200);
    assert_eq!(
        info.oldest_revision, 171,
        "the whole history window is back"
    );
    let mut client = service.client().await;
    let mut stream = client
        .watch_profiles(pb::WatchProfilesRequest {
            start_revision: 171,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for revision in 171..=200 {
        let Event::Change(change) = next(&mut stream).await else {
            panic!("expected change {revision}")
        };
        assert_eq!(change.revision, revision);
    }
    service.stop().await;
}

/// Records since the newest snapshot count toward the next across restarts. Counted from
/// start-up, a server restarted more often than every `--snapshot-every-records` records never
/// snapshotted, so never compacted, and replayed its whole journal at every start (found by an
/// adversarial run: 10 snapshots in 15,050 revisions over 35 restarts, each 500 records after
/// a restart, never after the snapshot before).
#[tokio::test]
async fn records_since_the_last_snapshot_count_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut config = durable(dir.path());
        config.snapshot_every_records = 40;
        config
    };
    let snapshots = || {
        let names = std::fs::read_dir(dir.path()).unwrap();
        let names = names.map(|entry| entry.unwrap().file_name().into_string().unwrap());
        names.filter(|name| name.ends_with(".snap")).count()
    };
    for restart in 0..3 {
        let service = TestService::start_with(config()).await;
        for n in 1..=25 {
            let n = restart * 25 + n;
            let data = json!({"total_points": n});
            service
                .update(&profile_updated(&format!("c{n}"), &at(n), data))
                .await;
        }
        // Stopping waits for background snapshots.
        service.stop().await;
        // 25 records a run: the snapshot is due at the 40th (the second run), and the third
        // run's 10 since it and its own 25 are not yet 40.
        assert_eq!(
            snapshots(),
            usize::from(restart >= 1),
            "after run {restart}"
        );
    }
}

/// A durable service in `dir` that snapshots every 5 records, whose snapshot at revision 5
/// will hang: its file is a FIFO nobody reads yet, so creating it blocks as a disk that stopped
/// answering would.
async fn snapshot_hung_at_revision_5(dir: &Path) -> (TestService, common::stuck_file::StuckFile) {
    let mut config = durable(dir);
    config.snapshot_every_records = 5;
    let service = TestService::start_with(config).await;
    let temp = dir.join(format!("snapshot-{:020}.snap.tmp", 5));
    (service, common::stuck_file::StuckFile::plant(temp))
}

/// A snapshot hung on its disk (here its file is a FIFO nobody reads, so creating it blocks
/// as a disk that stopped answering would) shows in `profile_state_snapshot_running_seconds`,
/// which grows while webhooks are still recorded, and goes back to 0 when it ends. Before,
/// nothing showed it: it neither failed nor was written.
#[tokio::test]
async fn a_hung_snapshot_shows_in_its_running_time_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (service, stuck) = snapshot_hung_at_revision_5(dir.path()).await;
    for n in 1..=5 {
        let data = json!({"total_points": n});
        service
            .update(&profile_updated(&format!("c{n}"), &at(n), data))
            .await;
    }
    let running = |text: &str| {
        common::metric(text, "profile_state_snapshot_running_seconds", &[]).expect("the gauge")
    };
    let first = running(&service.metrics_until(|text| running(text) > 0.0).await);
    service
        .metrics_until(|text| running(text) > first + 0.2)
        .await;
    let answer = service
        .update(&profile_updated("c6", &at(6), json!({"total_points": 6})))
        .await;
    assert_eq!(answer, json!({"outcome": "applied", "revision": 6}));

    // Read the FIFO: the snapshot writes into it, and fails to sync it.
    let reader = stuck.release();
    // (A scrape reads the gauge a moment before the counters: it may see the count and the
    // time of the same snapshot.)
    let failed_and_over = |text: &str| {
        let outcome = |outcome| common::metric(text, "profile_state_snapshots_total", &[outcome]);
        outcome(("outcome", "failed")) == Some(1.0) && running(text) == 0.0
    };
    let text = service.metrics_until(failed_and_over).await;
    let written = common::metric(
        &text,
        "profile_state_snapshots_total",
        &[("outcome", "written")],
    );
    assert_eq!(written, Some(0.0));
    reader.join().unwrap().unwrap();
    service.stop().await;
}

/// A snapshot that comes due while the last one still runs starts as soon as that one ends,
/// with no webhook after it. Before, it waited for the next write: a server that went quiet
/// kept its older snapshot, and replayed the journal since it at its next start.
#[tokio::test]
async fn a_snapshot_due_while_one_ran_starts_when_it_ends_without_another_write() {
    let dir = tempfile::tempdir().unwrap();
    let (service, stuck) = snapshot_hung_at_revision_5(dir.path()).await;
    let update = |n: u32| {
        let data = json!({"total_points": n});
        profile_updated(&format!("c{n}"), &at(n), data)
    };
    for n in 1..=5 {
        service.update(&update(n)).await;
    }
    let running = |text: &str| {
        common::metric(text, "profile_state_snapshot_running_seconds", &[]).expect("the gauge")
    };
    // Hung in the FIFO (as in the test above) while five more records make the next one due.
    service.metrics_until(|text| running(text) > 0.2).await;
    for n in 6..=10 {
        let answer = service.update(&update(n)).await;
        assert_eq!(answer["outcome"], "applied");
    }

    let reader = stuck.release();
    let outcome = |text: &str, outcome| {
        common::metric(
            text,
            "profile_state_snapshots_total",
            &[("outcome", outcome)],
        )
    };
    let text = service
        .metrics_until(|text| outcome(text, "written") == Some(1.0))
        .await;
    assert_eq!(outcome(&text, "failed"), Some(1.0), "the hung one failed");
    reader.join().unwrap().unwrap();
    let written = dir.path().join(format!("snapshot-{:020}.snap", 10));
    assert!(written.exists(), "{} was written", written.display());
    assert_eq!(service.server_info().await.revision, 10);
    service.stop().await;
}

#[tokio::test]
async fn a_watcher_resuming_with_another_store_id_is_reset_or_refused() {
    let service = TestService::start().await;
    service
        .update(&profile_updated("a", &at(1), json!({"total_points": 1})))
        .await;
    let store_id = service.server_info().await.store_id;
    let mut client = service.client().await;
    let resume = |store_id: &str, fail_if_compacted| pb::WatchProfilesRequest {
        start_revision: 2,
        store_id: store_id.into(),
        fail_if_compacted,
        ..Default::default()
    };

    // Its revisions belong to another store: reset, then this store's state.
    let mut stream = client
        .watch_profiles(resume("another-store", false))
        .await
        .unwrap()
        .into_inner();
    let Event::Reset(reset) = next(&mut stream).await else {
        panic!("expected Reset")
    };
    assert_eq!(reset.store_id, store_id);
    assert!(reset.reason.contains("another-store"), "{}", reset.reason);
    let Event::Change(existing) = next(&mut stream).await else {
        panic!("expected the initial state")
    };
    assert_eq!(existing.profile.unwrap().customer_id, "a");
    let Event::Synced(synced) = next(&mut stream).await else {
        panic!("expected Synced")
    };
    assert_eq!(synced.revision, 1);

    let refused = client
        .watch_profiles(resume("another-store", true))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("another-store"), "{refused}");

    // The same store: resumes as usual.
    let mut stream = client
        .watch_profiles(resume(&store_id, true))
        .await
        .unwrap()
        .into_inner();
    let Event::Synced(synced) = next(&mut stream).await else {
        panic!("expected Synced")
    };
    assert_eq!(synced.revision, 1);
    service.stop().await;
}

/// A stop whose grace runs out while the journal's thread is inside a sync must not release
/// the data directory's lock: when the sync returns, that thread still owns the journal's
/// files, and a server that took the directory meanwhile (recovered it, cut its torn tail,
/// appended) could find its records overwritten. The lock goes when the thread is done.
#[tokio::test]
async fn the_data_directory_stays_locked_until_a_sync_that_outlived_the_stop_ends() {
    use profile_state::data_dir::{DataDir, DataDirError};
    // The stop's warning is captured: the test's runtime runs the server's task on this thread.
    let (captured, _guard) = common::CapturedLogs::on_this_thread(tracing::Level::WARN);
    let dir = tempfile::tempdir().unwrap();
    let mut config = durable(dir.path());
    config.shutdown_grace = Duration::from_millis(100);
    let server = Server::bind(config).await.unwrap();
    let faults = server.journal_faults();
    let mut held = faults.syncs_waited();
    let service = TestService::serve(server);
    let release = common::HeldSyncs::hold(&faults);
    let body = serde_json::to_vec(&profile_updated("a", &at(1), json!({"total_points": 7})));
    let (url, body) = (service.webhook_url(), body.unwrap());
    let signature =
        profile_state::webhook::signature::SignatureCheck::new(common::SECRET).sign(&body);
    let posting = tokio::spawn(async move {
        let sent = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .header("x-gb-signature", signature)
            .body(body)
            .send()
            .await;
        sent.map(|answer| answer.status().as_u16())
    });
    held.wait_for(|syncs| *syncs >= 1).await.unwrap();

    service.stop().await;
    let answered = posting.await.unwrap();
    assert!(
        !matches!(answered, Ok(200)),
        "a webhook whose sync never ended must not be acknowledged: {answered:?}"
    );
    let refused = DataDir::open(dir.path()).err();
    assert!(
        matches!(refused, Some(DataDirError::Locked { .. })),
        "the journal's thread is still inside its sync: the directory must stay locked, got {refused:?}"
    );
    let logs = captured.text();
    assert!(
        logs.contains("outlived the stop: the directory stays locked"),
        "the operator is told why the directory is still locked: {logs}"
    );

    // The sync ends, the thread with it, and the lock is released: the next server recovers
    // the directory cleanly (the held update was synced, never acknowledged: either is fine).
    drop(release);
    // Nothing signals the thread's end to a test but the lock itself: look every 5 ms.
    let reopened = async {
        loop {
            match DataDir::open(dir.path()) {
                Ok(opened) => return opened,
                Err(DataDirError::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(error) => panic!("{error}"),
            }
        }
    };
    let reopened = tokio::time::timeout(Duration::from_secs(10), reopened)
        .await
        .expect("the lock is released once the journal's thread ends");
    drop(reopened);
    let service = TestService::start_with(durable(dir.path())).await;
    assert!(service.server_info().await.revision <= 1);
    service.stop().await;
}

/// A journal write that hangs (a disk that stops answering rather than failing) left
/// readiness and health saying ready while every webhook waited out its timeout and got 503
/// (found by an adversarial run). After half of `--webhook-timeout` without the write
/// returning, the service is not ready, and says why; ready again once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_write_that_hangs_makes_the_service_not_ready_until_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = durable(dir.path());
    config.webhook_timeout = std::time::Duration::from_secs(2);
    let server = Server::bind(config).await.unwrap();
    let faults = server.journal_faults();
    let service = TestService::serve(server);
    let (_health, mut statuses) = profile_health(&service).await;
    let mut next_status = async || statuses.message().await.unwrap().unwrap().status();
    assert_eq!(next_status().await, ServingStatus::Serving);
    assert_eq!(service.admin_get("/readyz").await.0, 200);
    let mut client = service.client().await;
    let mut changes = client
        .watch_profiles(pb::WatchProfilesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next(&mut changes).await, Event::Synced(_)));

    faults.hold_syncs(true);
    let mut held = faults.syncs_waited();
    let body = profile_updated("a", &at(1), json!({"total_points": 1}));
    let (status, answer) = service.post(&body).await;
    assert_eq!(status, 503, "its timeout: {answer}");
    held.wait_for(|held| *held >= 1).await.unwrap();
    // The write has hung for longer than a second (the timeout's half) by now.
    let patience = std::time::Duration::from_secs(10);
    let status = tokio::time::timeout(patience, next_status()).await;
    assert_eq!(
        status,
        Ok(ServingStatus::NotServing),
        "ready while it hangs"
    );
    let (status, reason) = service.admin_get("/readyz").await;
    assert_eq!(status, 503);
    assert!(
        reason.contains("the journal's write has not returned"),
        "{reason}"
    );

    faults.hold_syncs(false);
    assert_eq!(next_status().await, ServingStatus::Serving, "ready again");
    assert_eq!(service.admin_get("/readyz").await.0, 200);
    // What the write carried was recorded: the webhook's 503 said it might be. Applied just
    // after the write returns, so waited for as a change (asked for at once, the revision
    // was now and then still 0).
    let change = tokio::time::timeout(patience, next(&mut changes)).await;
    let Ok(Event::Change(change)) = change else {
        panic!("expected the change within {patience:?}: {change:?}")
    };
    assert_eq!(change.revision, 1);
    assert_eq!(service.server_info().await.revision, 1);
    service.stop().await;
}
