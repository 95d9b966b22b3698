//! WatchProfiles end to end: filters, initial state under concurrent ingest, replay by
//! revision, resets, slow subscribers and shutdown.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{TestService, at, profile_updated};
use profile_state::Config;
use profile_state::pb::{self, watch_profiles_response::Event};
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tonic::Streaming;

/// Upper bound for any single stream read: a hung stream fails the test instead of hanging it.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) async fn watch(
    service: &TestService,
    request: pb::WatchProfilesRequest,
) -> Streaming<pb::WatchProfilesResponse> {
    service
        .client()
        .await
        .watch_profiles(request)
        .await
        .expect("watch starts")
        .into_inner()
}

pub(crate) async fn next(stream: &mut Streaming<pb::WatchProfilesResponse>) -> Event {
    let message = tokio::time::timeout(READ_TIMEOUT, stream.message())
        .await
        .expect("a watch message arrives in time")
        .expect("the stream has no error")
        .expect("the stream is not over");
    message.event.expect("every message carries an event")
}

pub(crate) async fn next_change(
    stream: &mut Streaming<pb::WatchProfilesResponse>,
) -> pb::ProfileChange {
    match next(stream).await {
        Event::Change(change) => change,
        other => panic!("expected a change, got {other:?}"),
    }
}

pub(crate) async fn synced(stream: &mut Streaming<pb::WatchProfilesResponse>) -> u64 {
    match next(stream).await {
        Event::Synced(synced) => synced.revision,
        other => panic!("expected Synced, got {other:?}"),
    }
}

fn customer(change: &pb::ProfileChange) -> &str {
    &change.profile.as_ref().unwrap().customer_id
}

#[tokio::test]
async fn live_watch_starts_with_synced_and_follows_changes() {
    let service = TestService::start().await;
    service
        .update(&profile_updated("a", &at(1), json!({"total_points": 1})))
        .await;
    let mut stream = watch(&service, pb::WatchProfilesRequest::default()).await;
    assert_eq!(synced(&mut stream).await, 1);

    service
        .update(&profile_updated("a", &at(2), json!({"total_points": 5})))
        .await;
    let change = next_change(&mut stream).await;
    assert_eq!(change.r#type(), pb::ChangeType::Updated);
    assert_eq!(change.revision, 2);
    assert_eq!(change.changed_fields, vec!["total_points"]);
    assert_eq!(
        change.points_delta,
        Some(pb::PointsDelta {
            activated: 0,
            pending: 0,
            total: 4
        })
    );
    assert_eq!(change.tier_change, None);
    assert_eq!(change.previous, None, "previous only with include_previous");
    service.stop().await;
}

#[tokio::test]
async fn each_filter_selects_only_matching_changes() {
    let service = TestService::start().await;
    let mut by_client = watch(
        &service,
        pb::WatchProfilesRequest {
            client_id: "2155".into(),
            ..Default::default()
        },
    )
    .await;
    let mut by_customer = watch(
        &service,
        pb::WatchProfilesRequest {
            customer_ids: vec!["b".into(), "c".into()],
            ..Default::default()
        },
    )
    .await;
    let mut by_tier = watch(
        &service,
        pb::WatchProfilesRequest {
            fields: vec!["tier_name".into()],
            ..Default::default()
        },
    )
    .await;
    let mut by_extra = watch(
        &service,
        pb::WatchProfilesRequest {
            fields: vec!["extra.birthday".into()],
            include_previous: true,
            ..Default::default()
        },
    )
    .await;
    let mut any_extra = watch(
        &service,
        pb::WatchProfilesRequest {
            fields: vec!["extra".into()],
            ..Default::default()
        },
    )
    .await;
    for stream in [
        &mut by_client,
        &mut by_customer,
        &mut by_tier,
        &mut by_extra,
        &mut any_extra,
    ] {
        assert_eq!(synced(stream).await, 0);
    }

    let mut other_client = profile_updated("b", &at(1), json!({"tier_name": "gold"}));
    other_client["client_id"] = json!("other");
    service.update(&other_client).await; // 1: other/b tier
    service
        .update(&profile_updated("a", &at(1), json!({"total_points": 1})))
        .await; // 2: a points
    service
        .update(&profile_updated(
            "b",
            &at(1),
            json!({"tier_name": "gold", "birthday": "1990-01-01"}),
        ))
        .await; // 3
    service
        .update(&profile_updated("c", &at(1), json!({"nickname": "cc"})))
        .await; // 4: c extra
    service
        .update(&profile_updated(
            "b",
            &at(2),
            json!({"birthday": "1991-01-01"}),
        ))
        .await; // 5: b extra

    let revisions =
        |changes: Vec<pb::ProfileChange>| changes.iter().map(|c| c.revision).collect::<Vec<_>>();
    let read = async |stream: &mut Streaming<pb::WatchProfilesResponse>, count| {
        let mut changes = Vec::new();
        for _ in 0..count {
            changes.push(next_change(stream).await);
        }
        changes
    };
    assert_eq!(revisions(read(&mut by_client, 4).await), vec![2, 3, 4, 5]);
    assert_eq!(revisions(read(&mut by_customer, 4).await), vec![1, 3, 4, 5]);
    assert_eq!(revisions(read(&mut by_tier, 2).await), vec![1, 3]);
    let extra = read(&mut by_extra, 2).await;
    assert_eq!(revisions(extra.clone()), vec![3, 5]);
    assert_eq!(
        extra[1].previous.as_ref().unwrap().revision,
        3,
        "include_previous fills previous"
    );
    assert_eq!(revisions(read(&mut any_extra, 3).await), vec![3, 4, 5]);

    // One more change that every watcher sees proves nothing else was queued before it.
    service
        .update(&profile_updated(
            "b",
            &at(3),
            json!({"tier_name": "vip", "birthday": null}),
        ))
        .await; // 6
    for stream in [
        &mut by_client,
        &mut by_customer,
        &mut by_tier,
        &mut by_extra,
        &mut any_extra,
    ] {
        assert_eq!(next_change(stream).await.revision, 6);
    }
    service.stop().await;
}

/// Each name in a change's `changed_fields` selects that change as a filter, whatever the
/// extra's key: an empty key was named `extra.`, which the filter refused (found by an
/// adversarial run), and a key with a dot is one key, not a path.
#[tokio::test]
async fn every_changed_field_name_selects_its_change_as_a_filter() {
    let service = TestService::start().await;
    let by_fields = |fields: &[&str]| pb::WatchProfilesRequest {
        fields: fields.iter().map(|field| field.to_string()).collect(),
        ..Default::default()
    };
    let mut empty_key = watch(&service, by_fields(&["extra."])).await;
    let mut dotted_key = watch(&service, by_fields(&["extra.a.b"])).await;
    for stream in [&mut empty_key, &mut dotted_key] {
        assert_eq!(synced(stream).await, 0);
    }
    for (at_second, data) in [
        (1, json!({"": 1, "a.b": 1})),
        (2, json!({"": 2})),
        (3, json!({"a.b": 3})),
        (4, json!({"a": 4})),
        (5, json!({"": 5, "a.b": 5})),
    ] {
        service
            .update(&profile_updated("x", &at(at_second), data))
            .await;
    }
    let first = next_change(&mut empty_key).await;
    assert_eq!(first.revision, 1);
    assert_eq!(
        first.changed_fields,
        vec!["gb_customer_id", "extra.", "extra.a.b"],
        "created"
    );
    let second = next_change(&mut empty_key).await;
    assert_eq!(
        (second.revision, second.changed_fields),
        (2, vec!["extra.".into()])
    );
    assert_eq!(next_change(&mut empty_key).await.revision, 5);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_change(&mut dotted_key).await.revision);
    }
    assert_eq!(seen, vec![1, 3, 5], "not the plain key `a`");
    service.stop().await;
}

#[tokio::test]
async fn invalid_watch_requests_are_refused_with_the_field() {
    use tonic_types::StatusExt;
    let service = TestService::start().await;
    let mut client = service.client().await;
    for (request, field) in [
        (
            pb::WatchProfilesRequest {
                fields: vec!["tier".into()],
                ..Default::default()
            },
            "fields[0]",
        ),
        (
            pb::WatchProfilesRequest {
                customer_ids: vec!["a".into(), String::new()],
                ..Default::default()
            },
            "customer_ids[1]",
        ),
        // A stream keeps its filter while it is open: 1,000 ids of 4 KB kept 4 MB a stream
        // (found by an adversarial run). 1,000 ids of 263 bytes are 1 KiB too many.
        (
            pb::WatchProfilesRequest {
                customer_ids: (0..1000).map(|n| format!("{n:0>263}")).collect(),
                ..Default::default()
            },
            "customer_ids",
        ),
        // So are its other texts: 100 field names of 40 KB, or a 4 MB client_id or store_id,
        // kept 4.4 MB a stream (adversary round 11, F1). 16 KiB each at most.
        (
            pb::WatchProfilesRequest {
                fields: (0..100).map(|n| format!("extra.{n:0>158}")).collect(),
                ..Default::default()
            },
            "fields",
        ),
        (
            pb::WatchProfilesRequest {
                client_id: "c".repeat(16 * 1024 + 1),
                ..Default::default()
            },
            "client_id",
        ),
        (
            pb::WatchProfilesRequest {
                store_id: "s".repeat(16 * 1024 + 1),
                start_revision: 1,
                ..Default::default()
            },
            "store_id",
        ),
    ] {
        let status = client.watch_profiles(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let violations = status
            .get_details_bad_request()
            .expect("bad request details")
            .field_violations;
        assert_eq!(violations[0].field, field);
        if field == "customer_ids[1]" {
            // As BatchGetProfiles words an empty id.
            assert_eq!(violations[0].description, "is required");
        }
        if field == "customer_ids" {
            assert_eq!(
                violations[0].description,
                "at most 262144 bytes of ids per watch, got 263000"
            );
        }
        if field == "fields" {
            assert_eq!(
                violations[0].description,
                "at most 16384 bytes per watch, got 16400"
            );
        }
    }
    // 100 field names of 16,300 bytes in all, and a client_id of 16 KiB, fit.
    let request = pb::WatchProfilesRequest {
        fields: (0..100).map(|n| format!("extra.{n:0>157}")).collect(),
        client_id: "c".repeat(16 * 1024),
        ..Default::default()
    };
    let mut stream = client.watch_profiles(request).await.unwrap().into_inner();
    assert!(matches!(
        stream.message().await.unwrap().unwrap().event,
        Some(Event::Synced(_))
    ));
    // 1,000 ids of 262 bytes fit.
    let request = pb::WatchProfilesRequest {
        customer_ids: (0..1000).map(|n| format!("{n:0>262}")).collect(),
        ..Default::default()
    };
    let mut stream = client.watch_profiles(request).await.unwrap().into_inner();
    assert!(matches!(
        stream.message().await.unwrap().unwrap().event,
        Some(Event::Synced(_))
    ));
    service.stop().await;
}

/// Posts `count` updates spread over `customers` customers from 16 concurrent senders; counts
/// answered posts in `answered`.
async fn post_concurrently(
    service: &TestService,
    count: u32,
    customers: u32,
    answered: Arc<AtomicU32>,
    progress: Arc<Notify>,
) {
    let mut senders = JoinSet::new();
    for sender in 0..16 {
        let webhook = service.webhook_url();
        let answered = Arc::clone(&answered);
        let progress = Arc::clone(&progress);
        senders.spawn(async move {
            let http = reqwest::Client::new();
            for n in (sender..count).step_by(16) {
                let body = profile_updated(
                    &format!("c{:04}", n % customers),
                    &at(n),
                    json!({"total_points": n, "tier_name": if n % 2 == 0 { "even" } else { "odd" }}),
                );
                let raw = serde_json::to_vec(&body).unwrap();
                let signature = profile_state::webhook::signature::SignatureCheck::new(common::SECRET).sign(&raw);
                let response = http
                    .post(&webhook)
                    .header("x-gb-signature", signature)
                    .header("content-type", "application/json")
                    .body(raw)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                answered.fetch_add(1, Ordering::SeqCst);
                progress.notify_waiters();
            }
        });
    }
    while let Some(done) = senders.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_state_during_concurrent_ingest_ends_equal_to_the_store() {
    let service = TestService::start().await;
    let notify = Arc::new(Notify::new());
    post_concurrently(&service, 200, 150, Arc::default(), Arc::clone(&notify)).await;

    let answered = Arc::new(AtomicU32::new(0));
    let ingest = post_concurrently(
        &service,
        1000,
        300,
        Arc::clone(&answered),
        Arc::clone(&notify),
    );
    let subscriber = async {
        // Subscribe once ingest is well under way, so the initial state is read while
        // webhooks keep arriving.
        while answered.load(Ordering::SeqCst) < 100 {
            let progressed = notify.notified();
            if answered.load(Ordering::SeqCst) >= 100 {
                break;
            }
            progressed.await;
        }
        let mut stream = watch(
            &service,
            pb::WatchProfilesRequest {
                send_initial_state: true,
                ..Default::default()
            },
        )
        .await;
        let mut view = BTreeMap::new();
        let synced_at = loop {
            match next(&mut stream).await {
                Event::Change(change) => {
                    assert_eq!(change.r#type(), pb::ChangeType::Existing);
                    let profile = change.profile.unwrap();
                    let before = view.insert(profile.customer_id.clone(), profile);
                    assert!(
                        before.is_none(),
                        "a profile sent twice in the initial state"
                    );
                }
                Event::Synced(synced) => break synced.revision,
                other => panic!("unexpected {other:?} during the initial state"),
            }
        };
        (stream, view, synced_at)
    };
    let ((), (mut stream, mut view, synced_at)) = tokio::join!(ingest, subscriber);

    let (profiles, final_revision) = service.all_profiles().await;
    let store: BTreeMap<String, pb::Profile> = profiles
        .into_iter()
        .map(|profile| (profile.customer_id.clone(), profile))
        .collect();
    assert!(
        synced_at < final_revision,
        "the initial state overlapped with ingest"
    );
    let mut last = synced_at;
    while last < final_revision {
        let change = next_change(&mut stream).await;
        assert_eq!(
            change.revision,
            last + 1,
            "no gap and no duplicate after Synced"
        );
        last = change.revision;
        let profile = change.profile.unwrap();
        view.insert(profile.customer_id.clone(), profile);
    }
    assert_eq!(view, store, "the watcher's view equals the store");
    service.stop().await;
}

#[tokio::test]
async fn start_revision_replays_history_then_goes_live() {
    let service = TestService::start().await;
    for n in 1..=10 {
        service
            .update(&profile_updated("a", &at(n), json!({"total_points": n})))
            .await;
    }
    let mut stream = watch(
        &service,
        pb::WatchProfilesRequest {
            start_revision: 4,
            ..Default::default()
        },
    )
    .await;
    for revision in 4..=10 {
        let change = next_change(&mut stream).await;
        assert_eq!(change.revision, revision);
        assert_eq!(
            change.profile.unwrap().total_points,
            Some(i64::try_from(revision).unwrap())
        );
    }
    assert_eq!(synced(&mut stream).await, 10);
    service
        .update(&profile_updated("a", &at(11), json!({"total_points": 11})))
        .await;
    assert_eq!(next_change(&mut stream).await.revision, 11);

    // Resuming exactly at the next revision is valid; one past it is out of range.
    let mut at_head = watch(
        &service,
        pb::WatchProfilesRequest {
            start_revision: 12,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(synced(&mut at_head).await, 11);
    let mut client = service.client().await;
    let status = client
        .watch_profiles(pb::WatchProfilesRequest {
            start_revision: 13,
            ..Default::default()
        })
        .await
        .expect_err("a future revision is refused");
    assert_eq!(status.code(), tonic::Code::OutOfRange);
    service.stop().await;
}

fn short_history(events: usize) -> Config {
    let mut config = Config::for_tests(common::SECRET);
    config.history_events = events;
    config
}

#[tokio::test]
async fn a_compacted_start_revision_resets_or_fails_as_asked() {
    let service = TestService::start_with(short_history(5)).await;
    for n in 1..=20 {
        service
            .update(&profile_updated(
                &format!("c{}", n % 3),
                &at(n),
                json!({"total_points": n}),
            ))
            .await;
    }
    let mut stream = watch(
        &service,
        pb::WatchProfilesRequest {
            start_revision: 2,
            ..Default::default()
        },
    )
    .await;
    match next(&mut stream).await {
        Event::Reset(reset) => {
            assert_eq!(reset.revision, 16, "the oldest revision still in history");
            assert!(
                reset.reason.contains("start_revision 2"),
                "{}",
                reset.reason
            );
        }
        other => panic!("expected Reset, got {other:?}"),
    }
    let mut existing = Vec::new();
    let synced_at = loop {
        match next(&mut stream).await {
            Event::Change(change) => existing.push(customer(&change).to_owned()),
            Event::Synced(synced) => break synced.revision,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(existing, vec!["c0", "c1", "c2"]);
    assert_eq!(synced_at, 20);

    let mut client = service.client().await;
    let status = client
        .watch_profiles(pb::WatchProfilesRequest {
            start_revision: 2,
            fail_if_compacted: true,
            ..Default::default()
        })
        .await
        .expect_err("fail_if_compacted refuses");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("oldest available revision is 16"),
        "{}",
        status.message()
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_blocks_neither_ingest_nor_others() {
    let service = TestService::start_with(short_history(100)).await;
    let mut stalled = watch(&service, pb::WatchProfilesRequest::default()).await;
    assert_eq!(synced(&mut stalled).await, 0);
    let mut reader = watch(&service, pb::WatchProfilesRequest::default()).await;
    assert_eq!(synced(&mut reader).await, 0);

    // 500 changes of ~8 KiB: far more than the stalled stream's channel and HTTP/2 windows hold,
    // so its feed stops while ingest and the other reader go on.
    const CHANGES: u32 = 500;
    let padding = "x".repeat(8 * 1024);
    let reading = async {
        for revision in 1..=u64::from(CHANGES) {
            assert_eq!(next_change(&mut reader).await.revision, revision);
        }
    };
    let ingest = async {
        for n in 1..=CHANGES {
            let body = profile_updated(
                &format!("c{}", n % 50),
                &at(n),
                json!({"total_points": n, "note": padding}),
            );
            service.update(&body).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(reading, ingest)
    })
    .await
    .expect("ingest and the reading subscriber finish while one subscriber stalls");

    // When the stalled subscriber reads again, the history has moved past it: it is told so
    // and gets the whole state again, never a silent gap.
    let mut last_revision = 0;
    let reset = loop {
        match next(&mut stalled).await {
            Event::Change(change) => {
                assert_eq!(
                    change.revision,
                    last_revision + 1,
                    "no gap before the reset"
                );
                last_revision = change.revision;
            }
            Event::Reset(reset) => break reset,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(
        last_revision < u64::from(CHANGES),
        "the stalled feed was held back"
    );
    assert!(reset.reason.contains("fell behind"), "{}", reset.reason);
    let mut existing = 0;
    loop {
        match next(&mut stalled).await {
            Event::Change(change) => {
                assert_eq!(change.r#type(), pb::ChangeType::Existing);
                existing += 1;
            }
            Event::Synced(synced) => {
                assert_eq!(synced.revision, u64::from(CHANGES));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(existing, 50);
    service.stop().await;
}

#[tokio::test]
async fn shutdown_ends_streams_with_the_revision_to_resume_from() {
    let service = TestService::start().await;
    service
        .update(&profile_updated("a", &at(1), json!({"total_points": 1})))
        .await;
    let mut stream = watch(
        &service,
        pb::WatchProfilesRequest {
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        next_change(&mut stream).await.r#type(),
        pb::ChangeType::Existing
    );
    assert_eq!(synced(&mut stream).await, 1);

    // An open health Watch (as load balancers keep) must not hold shutdown up either.
    let mut health = tonic_health::pb::health_client::HealthClient::new(service.channel().await);
    let mut statuses = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(statuses.message().await.unwrap().is_some());

    service.stop_within(Duration::from_secs(5)).await;
    match next(&mut stream).await {
        Event::Progress(progress) => assert_eq!(progress.revision, 1, "a last resume point"),
        other => panic!("expected a last Progress, got {other:?}"),
    }
    let status = tokio::time::timeout(READ_TIMEOUT, stream.message())
        .await
        .expect("the stream ends in time")
        .expect_err("the stream ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("resume from revision 2"),
        "{}",
        status.message()
    );
}
