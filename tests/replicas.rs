//! Replicated mode (`--nats-url`) against real nats-server processes (`nats-harness`, installed
//! if missing): replicas publish to one R3 stream with `sync_interval: always`, apply it in its
//! order and converge to the same profiles and revisions; they answer webhooks with the real
//! outcome, 503 while NATS is gone (nothing acknowledged lost), restart from their snapshot and
//! the stream, and serve `min_revision` reads and resumed watches on a lagging replica by
//! waiting, never by refusing a revision the cluster assigned.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{SECRET, TestService, at, profile_updated};
use nats_harness::NatsCluster;
use profile_state::pb::watch_profiles_response::Event;
use profile_state::{Config, Server, pb};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_stream::StreamExt;

/// How long a test waits for anything the replicas do by themselves.
const PATIENCE: Duration = Duration::from_secs(30);

/// A replica's configuration: in-process, ephemeral unless the test sets a data directory,
/// short timeouts so that failures are answered quickly.
fn replica_config(nats: &NatsCluster, stream: &str, name: &str) -> Config {
    let mut config = Config::for_tests(SECRET);
    config.nats.urls = nats.client_urls();
    config.nats.stream = stream.into();
    config.nats.replicas = nats.nodes().len();
    config.nats.replica_name = Some(name.into());
    config.nats.request_timeout = Duration::from_secs(2);
    config.webhook_timeout = Duration::from_secs(4);
    config
}

/// Posts `body` until it is answered 2xx, as Gameball retries a 503 (sooner: a test).
async fn post_until_ok(replica: &TestService, body: &Value) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, answer) = replica.post(body).await;
        if status == 200 {
            return answer;
        }
        assert_eq!(status, 503, "only 503 is retried: {answer}");
        assert!(
            Instant::now() < deadline,
            "still 503 after {PATIENCE:?}: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every replica has applied `sequence`, through GetServerInfo.
async fn wait_applied(replicas: &[&TestService], sequence: u64) {
    for replica in replicas {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let info = replica.server_info().await;
            if info.applied_sequence >= sequence {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} applied {} of {sequence}",
                info.replica,
                info.applied_sequence
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The stream's last sequence, as the replicas see it.
async fn stream_last(replicas: &[&TestService]) -> u64 {
    let mut last = 0;
    for replica in replicas {
        last = last.max(replica.server_info().await.stream_last_sequence);
    }
    last
}

/// Waits until all replicas applied everything and asserts identical full dumps (profiles and
/// their revisions) and the same store revision and id; returns the dump.
async fn assert_converged(replicas: &[&TestService]) -> Vec<pb::Profile> {
    // Read the last sequence after the writes are answered: every replica's poll reads it
    // from the stream leader within a fraction of a second.
    let last = stream_last(replicas).await;
    wait_applied(replicas, last).await;
    let (first, revision) = replicas[0].all_profiles().await;
    let store_id = replicas[0].server_info().await.store_id;
    for replica in &replicas[1..] {
        let (dump, other_revision) = replica.all_profiles().await;
        assert_eq!(other_revision, revision, "store revisions differ");
        assert!(dump == first, "dumps differ");
        assert_eq!(replica.server_info().await.store_id, store_id);
    }
    first
}

/// One customer's deliveries: `count` updates whose points are their second, sent in a
/// shuffled order with a repeat of one of them: duplicates and out-of-order deliveries.
fn deliveries(customer: &str, count: u32, seed: u32) -> Vec<Value> {
    let mut seconds: Vec<u32> = (1..=count).collect();
    // A fixed permutation per seed: reversed halves, rotated.
    seconds.reverse();
    seconds.rotate_left((seed % count) as usize);
    seconds.push(seconds[0]);
    seconds
        .into_iter()
        .map(|second| profile_updated(customer, &at(second), json!({"total_points": second})))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_converge_under_duplicates_and_out_of_order_deliveries() {
    let nats = NatsCluster::three().await.unwrap();
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(TestService::start_with(replica_config(&nats, "CONVERGE", name)).await);
    }
    let replicas = Arc::new(replicas);
    // (customer, delivery, outcome, revision) of every 2xx.
    let answers = Arc::new(Mutex::new(Vec::new()));
    let mut senders = Vec::new();
    for sender in 0..32u32 {
        let (replicas, answers) = (Arc::clone(&replicas), Arc::clone(&answers));
        senders.push(tokio::spawn(async move {
            // Two customers per sender, and one customer every sender shares.
            let mut bodies = deliveries(&format!("c{}", sender % 16), 6, sender);
            bodies.extend(deliveries("shared", 3, sender));
            for (n, body) in bodies.iter().enumerate() {
                let replica = &replicas[(sender as usize + n) % replicas.len()];
                let answer = post_until_ok(replica, body).await;
                let outcome = answer["outcome"].as_str().unwrap().to_owned();
                let revision = answer["revision"].as_u64().unwrap();
                let customer = body["customer_id"].as_str().unwrap().to_owned();
                let delivery = format!("{customer}@{}", body["created_at"]);
                answers
                    .lock()
                    .await
                    .push((customer, delivery, outcome, revision));
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let refs: Vec<&TestService> = replicas.iter().collect();
    let dump = assert_converged(&refs).await;

    let answers = answers.lock().await;
    // An identical delivery published apart is dropped by the stream as a repeat (same
    // message id) and answered with the outcome of the message it repeats: one revision may be
    // answered to several copies of one delivery, never to two different deliveries.
    let mut revisions: BTreeMap<u64, &str> = BTreeMap::new();
    let mut newest: BTreeMap<&str, u64> = BTreeMap::new();
    for (customer, delivery, outcome, revision) in answers.iter() {
        assert!(outcome == "applied" || outcome == "unchanged", "{outcome}");
        if outcome == "applied" {
            let first = *revisions.entry(*revision).or_insert(delivery);
            assert_eq!(
                first, delivery,
                "revision {revision} answered to two deliveries"
            );
        }
        let entry = newest.entry(customer.as_str()).or_default();
        *entry = (*entry).max(*revision);
    }
    assert!(
        answers
            .iter()
            .any(|(_, _, outcome, _)| outcome == "unchanged")
    );
    let by_customer: BTreeMap<&str, &pb::Profile> = dump
        .iter()
        .map(|profile| (profile.customer_id.as_str(), profile))
        .collect();
    assert_eq!(by_customer.len(), 17);
    for (customer, revision) in newest {
        let profile = by_customer[customer];
        // Every answered revision of the customer is in its history: its last one is at least.
        assert!(profile.revision >= revision, "{customer}: {profile:?}");
        let max = if customer == "shared" { 3 } else { 6 };
        assert_eq!(
            profile.total_points,
            Some(max),
            "{customer}: the newest wins"
        );
    }
    // Every revision the replicas assigned was answered once: dense and none twice.
    let top = refs[0].server_info().await.revision;
    assert_eq!(
        revisions.len() as u64,
        top,
        "revisions 1..={top} each answered"
    );
    assert_eq!(
        revisions.last_key_value().map(|(revision, _)| *revision),
        Some(top)
    );
    for replica in Arc::try_unwrap(replicas).ok().unwrap() {
        replica.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_nats_webhooks_get_503_and_nothing_acknowledged_is_lost() {
    let mut nats = NatsCluster::three().await.unwrap();
    let a = TestService::start_with(replica_config(&nats, "OUTAGE", "a")).await;
    let b = TestService::start_with(replica_config(&nats, "OUTAGE", "b")).await;
    let first = a
        .update(&profile_updated("kept", &at(1), json!({"total_points": 1})))
        .await;
    assert_eq!(first["outcome"], "applied");
    assert_eq!(a.admin_get("/readyz").await.0, 200);

    nats.kill_all();
    let started = Instant::now();
    let body = profile_updated("during", &at(2), json!({"total_points": 2}));
    let signature = profile_state::webhook::signature::SignatureCheck::new(SECRET)
        .sign(&serde_json::to_vec(&body).unwrap());
    let response = reqwest::Client::new()
        .post(a.webhook_url())
        .header("content-type", "application/json")
        .header("x-gb-signature", signature)
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within the timeout"
    );
    let text = response.text().await.unwrap();
    assert!(text.contains("retry"), "{text}");
    let (status, reason) = a.admin_get("/readyz").await;
    assert_eq!(status, 503, "{reason}");

    nats.restart_all().await.unwrap();
    // Gameball's retry, on the other replica: applied once NATS is back.
    let retried = post_until_ok(&b, &body).await;
    assert!(retried["outcome"] == "applied", "{retried}");
    let deadline = Instant::now() + PATIENCE;
    while a.admin_get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "a ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dump = assert_converged(&[&a, &b]).await;
    let points: BTreeMap<_, _> = dump
        .iter()
        .map(|profile| (profile.customer_id.as_str(), profile.total_points))
        .collect();
    assert_eq!(points["kept"], Some(1), "acknowledged before the outage");
    assert_eq!(points["during"], Some(2), "retried after it");
    a.stop().await;
    b.stop().await;
}

/// A replica whose applier is held (a stand-in for one that lags), serving.
async fn held_replica(config: Config) -> (TestService, profile_state::replication::ApplierPause) {
    let server = Server::bind(config).await.expect("replica binds");
    let pause = server.applier_pause();
    (TestService::serve(server), pause)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_replica_waits_for_min_revision_reads_and_resumed_watches() {
    let nats = NatsCluster::single().await.unwrap();
    let a = TestService::start_with(replica_config(&nats, "LAGGING", "a")).await;
    let (b, pause) = held_replica(replica_config(&nats, "LAGGING", "b")).await;
    a.update(&profile_updated("x", &at(1), json!({"total_points": 1})))
        .await;
    assert_converged(&[&a, &b]).await;

    pause.pause();
    a.update(&profile_updated("x", &at(2), json!({"total_points": 2})))
        .await;
    // Two revisions ahead of b: beyond its next one, which a watch would simply wait for.
    let answer = a
        .update(&profile_updated("y", &at(3), json!({"total_points": 3})))
        .await;
    let revision = answer["revision"].as_u64().unwrap();
    let get = |min_revision| pb::GetProfileRequest {
        client_id: "2155".into(),
        customer_id: "x".into(),
        min_revision,
    };
    // Past the deadline: UNAVAILABLE naming the revision b has applied.
    let mut client = b.client().await;
    let mut request = tonic::Request::new(get(revision));
    request.set_timeout(Duration::from_millis(300));
    let status = client.get_profile(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    use tonic_types::StatusExt;
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "REVISION_NOT_APPLIED");
    assert_eq!(
        info.metadata["applied_revision"],
        (revision - 2).to_string()
    );

    // A watch resumed at a's revision, and reads with it, wait for b instead of failing.
    let watch = pb::WatchProfilesRequest {
        start_revision: revision,
        ..Default::default()
    };
    let mut watcher = b.client().await;
    let watched = tokio::spawn(async move { watcher.watch_profiles(watch).await });
    let mut reader = b.client().await;
    let read = tokio::spawn(async move { reader.get_profile(get(revision)).await });
    let mut batch_reader = b.client().await;
    let batch = tokio::spawn(async move {
        batch_reader
            .batch_get_profiles(pb::BatchGetProfilesRequest {
                client_id: "2155".into(),
                customer_ids: vec!["x".into()],
                min_revision: revision,
            })
            .await
    });
    let mut list_reader = b.client().await;
    let list = tokio::spawn(async move {
        list_reader
            .list_profiles(pb::ListProfilesRequest {
                min_revision: revision,
                ..Default::default()
            })
            .await
    });
    // Held past the moment each reached b (they wait, they did not fail).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!read.is_finished() && !batch.is_finished() && !list.is_finished());
    assert!(!watched.is_finished(), "the watch waits for b to catch up");
    pause.resume();

    let profile = read.await.unwrap().unwrap().into_inner().profile.unwrap();
    assert_eq!(profile.total_points, Some(2), "the read sees the write");
    let found = batch.await.unwrap().unwrap().into_inner();
    assert_eq!(found.profiles[0].total_points, Some(2));
    let page = list.await.unwrap().unwrap().into_inner();
    assert_eq!(page.profiles.len(), 2, "x and y");
    let mut events = watched.await.unwrap().expect("no refusal").into_inner();
    let first = tokio::time::timeout(PATIENCE, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match first.event {
        Some(Event::Change(change)) => assert_eq!(change.revision, revision),
        other => panic!("expected the change at {revision}, got {other:?}"),
    }
    a.stop().await;
    b.stop().await;
}
