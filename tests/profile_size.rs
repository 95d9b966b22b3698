//! How large a profile may grow, and reads that stay decodable: an update that would take a
//! profile's extras past the bound is refused whole (422, kept as a dead letter, replayable once
//! the profile has room), on a single node and on replicas alike; ListProfiles pages stop
//! short of the message limit and a BatchGetProfiles answer past it is refused by name.

use crate::common;
use crate::replicas::{replica_config, stream_of};

use std::collections::BTreeSet;

use common::{TestService, at, durable_config, profile_updated};
use futures_util::StreamExt;
use nats_harness::NatsCluster;
use profile_state::dead_letters::DeadLetterId;
use profile_state::jetstream::{UpdateBatch, UpdateStream};
use profile_state::pb;
use profile_state::pb::admin_service_client::AdminServiceClient;
use profile_state::profile::{
    EventTime, Field, MAX_EXTRAS_JSON_BYTES, ProfileKey, ProfileUpdate, Scalar,
};
use serde_json::{Value, json};
use tonic::Code;

/// A signed-able body for `customer` at `second` with these `data` fields.
fn body(customer: &str, second: u32, data: Value) -> Vec<u8> {
    serde_json::to_vec(&profile_updated(customer, &at(second), data)).unwrap()
}

/// More than half the bound: two such extras do not fit in one profile.
fn over_half() -> String {
    "x".repeat(MAX_EXTRAS_JSON_BYTES / 2 + 1000)
}

async fn get(service: &TestService, customer: &str) -> pb::Profile {
    let request = pb::GetProfileRequest {
        client_id: "2155".into(),
        customer_id: customer.into(),
        ..Default::default()
    };
    let response = service.client().await.get_profile(request).await;
    response
        .expect("the profile reads")
        .into_inner()
        .profile
        .unwrap()
}

fn extra_keys(profile: &pb::Profile) -> Vec<String> {
    let extra = profile.extra.as_ref().map(|extra| extra.fields.clone());
    extra.unwrap_or_default().into_keys().collect()
}

/// Asserts a 422 that kept `body` as a dead letter, refused for the bound on `data`.
fn assert_refused((status, answer): &(u16, Value), body: &[u8]) {
    assert_eq!(*status, 422, "{answer}");
    assert_eq!(answer["field"], json!("data"), "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&MAX_EXTRAS_JSON_BYTES.to_string()),
        "the answer names the bound: {answer}"
    );
    let id = DeadLetterId::of(body);
    assert_eq!(answer["dead_letter_id"], json!(id.as_str()), "{answer}");
}

async fn replay(service: &TestService, body: &[u8]) -> Result<u64, tonic::Status> {
    let request = pb::ReplayDeadLetterRequest {
        id: DeadLetterId::of(body).to_string(),
    };
    let mut admin = AdminServiceClient::new(service.channel().await);
    let response = admin.replay_dead_letter(request).await?.into_inner();
    Ok(response.revision)
}

#[tokio::test]
async fn an_update_growing_a_profile_past_the_bound_is_refused_whole_and_replayable_later() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = durable_config(dir.path());
    config.max_body_bytes = 1 << 20;
    let service = TestService::start_with(config.clone()).await;
    let first = body("big", 1, json!({"total_points": 1, "first": over_half()}));
    assert_eq!(service.post_signed(&first).await.0, 200);

    // New extras past the bound, and a points change: refused whole, nothing recorded.
    let second = body("big", 2, json!({"total_points": 7, "second": over_half()}));
    assert_refused(&service.post_signed(&second).await, &second);
    let profile = get(&service, "big").await;
    assert_eq!((profile.revision, profile.total_points), (1, Some(1)));
    assert_eq!(extra_keys(&profile), ["first"]);
    // An update without extras still applies to the full profile.
    let points = body("big", 3, json!({"total_points": 3}));
    assert_eq!(service.post_signed(&points).await.0, 200);
    assert_eq!(get(&service, "big").await.revision, 2);

    // Replayed while there is no room: still refused, still kept.
    let status = replay(&service, &second).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("data"), "{status:?}");
    // A clear makes room (the key stays, its value goes); the replay applies then.
    let clear = body("big", 4, json!({"first": null}));
    assert_eq!(service.post_signed(&clear).await.0, 200);
    assert_eq!(replay(&service, &second).await.unwrap(), 4);
    let profile = get(&service, "big").await;
    assert_eq!(
        extra_keys(&profile),
        ["second"],
        "a cleared extra is not served"
    );
    assert_eq!(profile.total_points, Some(3), "at 3 is newer than at 2");
    service.stop().await;

    // The journal holds exactly what was answered: the same profile after a restart.
    let restarted = TestService::start_with(config).await;
    assert_eq!(get(&restarted, "big").await, profile);
    restarted.stop().await;
}

#[tokio::test]
async fn replicas_refuse_the_same_update_and_apply_its_retry_once_there_is_room() {
    let nats = NatsCluster::single().await.unwrap();
    let config = |name| {
        let mut config = replica_config(&nats, "SIZE", name);
        config.max_body_bytes = 700_000; // within what a dead letter keeps under max_payload
        config
    };
    let a = TestService::start_with(config("a")).await;
    let b = TestService::start_with(config("b")).await;
    let first = body("big", 1, json!({"first": over_half()}));
    assert_eq!(a.post_signed(&first).await.0, 200);
    let second = body("big", 2, json!({"total_points": 7, "second": over_half()}));
    assert_refused(&b.post_signed(&second).await, &second);
    // The stream took it (same message id: a duplicate now), and each replica refused it.
    // Repeats while nothing changed are refused again, each at most one more stream message
    // (the update alone under the profile's revision, then dropped as a repeat of that).
    assert_refused(&a.post_signed(&second).await, &second);
    let before = a.server_info().await.stream_last_sequence;
    for _ in 0..5 {
        assert_refused(&a.post_signed(&second).await, &second);
        assert_refused(&b.post_signed(&second).await, &second);
    }
    let after = a.server_info().await.stream_last_sequence;
    assert!(after - before <= 2, "{before}..{after}");
    let after = body("big", 3, json!({"total_points": 3}));
    let (status, answer) = b.post_signed(&after).await;
    assert_eq!(status, 200, "{answer}");
    let revision = answer["revision"].as_u64().unwrap();
    for replica in [&a, &b] {
        assert_eq!(
            served(replica, revision).await,
            (2, Some(3), vec!["first".into()])
        );
    }

    // Room made: Gameball's retry of the refused delivery is applied, though the stream
    // holds the original (a duplicate, for two hours), and on the other replica too. The
    // replica remembers the outcomes of its last 4096 stream messages: past those, it works
    // out from the profile that the update was not applied.
    let clear = body("big", 4, json!({"first": null}));
    assert_eq!(a.post_signed(&clear).await.0, 200);
    let (status, answer) = a.post_signed(&second).await;
    assert_eq!(status, 200, "the retry applies: {answer}");
    let revision = answer["revision"].as_u64().unwrap();
    assert_eq!(
        served(&b, revision).await,
        (4, Some(3), vec!["second".into()]),
        "points of 2 are older than those of 3"
    );
    let third = body("big", 5, json!({"third": over_half()}));
    assert_refused(&b.post_signed(&third).await, &third);
    // More than 4096 stream messages past the refusal, each a new profile: a revision each.
    // Both replicas are waited for, so that the webhooks below wait for nothing but their own.
    publish_others(&stream_of(&nats, "SIZE").await, 4100).await;
    for replica in [&a, &b] {
        let big = served(replica, revision + 4100).await;
        assert_eq!(big, (revision, Some(3), vec!["second".into()]));
    }
    let clear = body("big", 6, json!({"second": null}));
    assert_eq!(b.post_signed(&clear).await.0, 200);
    let (status, answer) = b.post_signed(&third).await;
    assert_eq!(status, 200, "the retry applies: {answer}");
    let revision = answer["revision"].as_u64().unwrap();
    assert_eq!(served(&a, revision).await.2, ["third"]);
    // A repeat of what was applied changes nothing (answered with the outcome of the message
    // it repeats, as any repeat on a replica).
    let (status, answer) = a.post_signed(&third).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(served(&a, revision).await.0, revision, "no revision used");
    a.stop().await;
    b.stop().await;
}

/// Publishes `count` updates of other customers straight to `stream`, each its own stream
/// message in the format and under the message id a replica publishes a webhook with: what as
/// many webhooks posted one at a time would add, in a few seconds rather than 25 to 50 s.
/// Pipelined (64 in flight), so they reach the stream in any order.
async fn publish_others(stream: &UpdateStream, count: usize) {
    let batches: Vec<UpdateBatch> = (0..count)
        .map(|n| {
            UpdateBatch::new([&ProfileUpdate {
                key: ProfileKey::new("2155", format!("c{n}")),
                at: EventTime::from_timestamp(1_732_000_001, 0).unwrap(),
                fields: vec![(Field::TotalPoints, Some(Scalar::Int(n as i64)))],
                extras: vec![],
                origin: Default::default(),
            }])
        })
        .collect();
    let published = futures_util::stream::iter(&batches)
        .map(|batch| stream.publish(batch))
        .buffer_unordered(64);
    let sequences: BTreeSet<u64> = published
        .map(|published| {
            let published = published.expect("the stream takes the update");
            assert!(!published.duplicate, "each update is new");
            published.sequence
        })
        .collect()
        .await;
    assert_eq!(sequences.len(), count, "each its own stream message");
}

/// The revision, points and extra keys of the profile "big" as `replica` serves it once it has
/// applied `revision`.
async fn served(replica: &TestService, revision: u64) -> (u64, Option<i64>, Vec<String>) {
    let mut client = replica.client().await;
    let request = pb::GetProfileRequest {
        client_id: "2155".into(),
        customer_id: "big".into(),
        min_revision: revision,
        ..Default::default()
    };
    let profile = client.get_profile(request).await.unwrap().into_inner();
    let profile = profile.profile.unwrap();
    (profile.revision, profile.total_points, extra_keys(&profile))
}

#[tokio::test]
async fn list_pages_stop_short_of_the_message_limit_and_a_batch_past_it_is_refused() {
    let mut config = profile_state::Config::for_tests(common::SECRET);
    config.grpc_max_message_bytes = 64 * 1024;
    let service = TestService::start_with(config).await;
    let customers: Vec<String> = (0..20).map(|n| format!("c{n:02}")).collect();
    for customer in &customers {
        let note = "n".repeat(10_000);
        let (status, answer) = service
            .post_signed(&body(customer, 1, json!({"note": note})))
            .await;
        assert_eq!(status, 200, "{answer}");
    }

    let mut client = service.client().await;
    let (mut seen, mut page_token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let request = pb::ListProfilesRequest {
            page_size: 1000,
            page_token,
            ..Default::default()
        };
        let page = client.list_profiles(request).await.unwrap().into_inner();
        assert!(prost::Message::encoded_len(&page) <= 64 * 1024);
        assert!(!page.profiles.is_empty(), "every page holds a profile");
        pages += 1;
        seen.extend(page.profiles.into_iter().map(|p| p.customer_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, customers, "each once, in order");
    assert!(
        pages >= 4,
        "20 profiles of 10 KB take 4 pages of 64 KiB: {pages}"
    );

    let batch = |ids: &[String]| pb::BatchGetProfilesRequest {
        client_id: "2155".into(),
        customer_ids: ids.to_vec(),
        ..Default::default()
    };
    let status = client.batch_get_profiles(batch(&customers)).await;
    let status = status.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("customer_ids"), "{status:?}");
    assert!(status.message().contains("65536"), "{status:?}");
    let some = client.batch_get_profiles(batch(&customers[..4])).await;
    let found: BTreeSet<_> = some
        .unwrap()
        .into_inner()
        .profiles
        .into_iter()
        .map(|p| p.customer_id)
        .collect();
    assert_eq!(found.len(), 4);
    service.stop().await;
}

/// One ListProfiles page after `page_token`: its customers, the keys it names too large, and
/// the next token.
async fn list_page(
    service: &TestService,
    page_size: i32,
    page_token: String,
) -> (Vec<String>, Vec<pb::ProfileKey>, String) {
    let request = pb::ListProfilesRequest {
        page_size,
        page_token,
        ..Default::default()
    };
    let page = service.client().await.list_profiles(request).await;
    let page = page.expect("a page reaching a profile too large still answers");
    let page = page.into_inner();
    assert!(prost::Message::encoded_len(&page) <= 64 * 1024);
    let customers = page.profiles.into_iter().map(|p| p.customer_id).collect();
    (customers, page.too_large, page.next_page_token)
}

fn assert_names_too_large(status: &tonic::Status, customer: &str, revision: u64) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for part in [
        format!("customer_id {customer:?}"),
        format!("revision {revision} "),
        "65536".into(),
        "--grpc-max-message-bytes".into(),
    ] {
        assert!(status.message().contains(&part), "{part}: {status:?}");
    }
}

/// A profile larger than a message may carry (limits that allow it, which the start-up log
/// warns of; or a profile an earlier build let grow): GetProfile and a watch reaching it fail
/// naming it, its revision and the flag, and ListProfiles goes past it, naming it in
/// `too_large`. Before, every page reaching it failed with tonic's bare "encoded message length
/// too large", so no later profile could be listed (adversary round 9, F5).
#[tokio::test]
async fn a_profile_too_large_for_a_message_is_named_and_listings_go_past_it() {
    let mut config = profile_state::Config::for_tests(common::SECRET);
    config.grpc_max_message_bytes = 64 * 1024;
    let service = TestService::start_with(config).await;
    let big = || "b".repeat(40_000);
    let updates = [
        ("a", json!({"note": "small"})),
        ("b", json!({"first": big()})),
        ("b", json!({"second": big()})),
        ("c", json!({"note": "small"})),
    ];
    for (second, (customer, data)) in (1..).zip(updates) {
        let (status, answer) = service.post_signed(&body(customer, second, data)).await;
        assert_eq!(status, 200, "{answer}");
    }

    let mut client = service.client().await;
    let request = |customer: &str| pb::GetProfileRequest {
        client_id: "2155".into(),
        customer_id: customer.into(),
        ..Default::default()
    };
    let status = client.get_profile(request("b")).await.unwrap_err();
    assert_names_too_large(&status, "b", 3);
    assert_eq!(get(&service, "c").await.revision, 4);
    // Not "ask for fewer customer_ids": no answer can carry b.
    let batch = pb::BatchGetProfilesRequest {
        client_id: "2155".into(),
        customer_ids: vec!["b".into()],
        ..Default::default()
    };
    let status = client.batch_get_profiles(batch).await.unwrap_err();
    assert_names_too_large(&status, "b", 3);

    // Every page size: a, c listed; b named once, wherever the pages fall.
    for page_size in [1, 2, 3, 1000] {
        let (mut listed, mut too_large, mut token) = (Vec::new(), Vec::new(), String::new());
        for _ in 0..10 {
            let (customers, skipped, next) = list_page(&service, page_size, token).await;
            listed.extend(customers);
            too_large.extend(skipped);
            token = next;
            if token.is_empty() {
                break;
            }
        }
        assert!(token.is_empty(), "the listing ends (page_size {page_size})");
        assert_eq!(listed, ["a", "c"], "page_size {page_size}");
        let named = pb::ProfileKey {
            client_id: "2155".into(),
            customer_id: "b".into(),
        };
        assert_eq!(too_large, [named], "page_size {page_size}");
    }

    // A watch of everything ends at b's too-large change, named; its first change (40 KB) and
    // a's went through. One of c alone is not touched by it.
    let mut everything = crate::watch::watch(
        &service,
        pb::WatchProfilesRequest {
            start_revision: 1,
            ..Default::default()
        },
    )
    .await;
    for revision in [1, 2] {
        assert_eq!(
            crate::watch::next_change(&mut everything).await.revision,
            revision
        );
    }
    let status = everything.message().await.unwrap_err();
    assert_names_too_large(&status, "b", 3);
    let mut initial = crate::watch::watch(
        &service,
        pb::WatchProfilesRequest {
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await;
    let first = crate::watch::next_change(&mut initial).await;
    assert_eq!(first.profile.unwrap().customer_id, "a");
    assert_names_too_large(&initial.message().await.unwrap_err(), "b", 3);
    let mut only_c = crate::watch::watch(
        &service,
        pb::WatchProfilesRequest {
            customer_ids: vec!["c".into()],
            start_revision: 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(crate::watch::next_change(&mut only_c).await.revision, 4);
    assert!(matches!(
        crate::watch::next(&mut only_c).await,
        pb::watch_profiles_response::Event::Synced(_)
    ));
    service.stop().await;
}

/// A stream an earlier build (merge rules 1, no bound) wrote, holding a profile grown past the
/// bound: refused without `--nats-upgrade-rules`, naming it; taken over with it, what the
/// stream held applies as it did under rules 1, and what comes after with the bound.
#[tokio::test]
async fn a_stream_of_the_earlier_rules_is_taken_over_only_when_asked_and_applies_as_before() {
    use profile_state::jetstream::{Nats, StreamSettings};
    let nats = NatsCluster::single().await.unwrap();
    let mut config = replica_config(&nats, "RULES", "a");
    config.max_body_bytes = 700_000;
    let client = Nats::connect(&config.nats, "test").await.unwrap();
    let settings = StreamSettings::from_config(&config.nats);
    let stream = UpdateStream::ensure(&client, &settings).await.unwrap();
    for (second, key) in [(1, "one"), (2, "two")] {
        let update = ProfileUpdate {
            key: ProfileKey::new("2155", "big"),
            at: EventTime::from_timestamp(1_732_000_000 + second, 0).unwrap(),
            fields: vec![],
            extras: vec![(key.into(), Some(over_half().into()))],
            origin: Default::default(),
        };
        stream.publish(&UpdateBatch::new([&update])).await.unwrap();
    }
    let context = client.context();
    common::set_stream_metadata(context, "RULES", "profile_state_rules", "1").await;

    let refused = profile_state::Server::bind(config.clone()).await.err();
    let message = format!("{:#}", refused.expect("a stream of rules 1 is refused"));
    assert!(message.contains("--nats-upgrade-rules"), "{message}");

    // Not taken over while the stream is read (a replica of rules 1 may still run), nor with
    // another setting that does not fit: the stream stays as it was.
    config.nats.upgrade_rules = true;
    let reader = async_nats::jetstream::consumer::pull::Config {
        durable_name: Some("old-replica".into()),
        ..Default::default()
    };
    context
        .create_consumer_on_stream(reader, "RULES")
        .await
        .unwrap();
    let refused = profile_state::Server::bind(config.clone()).await.err();
    let message = format!("{:#}", refused.expect("refused while a consumer reads"));
    assert!(message.contains("consumers"), "{message}");
    context
        .delete_consumer_from_stream("old-replica", "RULES")
        .await
        .unwrap();
    let mut longer = config.clone();
    longer.nats.duplicate_window *= 2;
    let refused = profile_state::Server::bind(longer).await.err();
    let message = format!(
        "{:#}",
        refused.expect("a longer duplicate window is refused")
    );
    assert!(message.contains("duplicate"), "{message}");
    let info = context
        .get_stream("RULES")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.metadata["profile_state_rules"], "1");

    let a = TestService::start_with(config.clone()).await;
    assert_eq!(
        served(&a, 2).await,
        (2, None, vec!["one".into(), "two".into()])
    );
    let three = body("big", 3, json!({"three": "x"}));
    assert_refused(&a.post_signed(&three).await, &three);
    a.stop().await;
    // Taken over once: the flag is harmless on a stream of rules 2, and a replica with an
    // empty disk replays the same history the same way.
    let mut fresh = replica_config(&nats, "RULES", "b");
    fresh.max_body_bytes = 700_000;
    let b = TestService::start_with(fresh).await;
    assert_eq!(
        served(&b, 2).await,
        (2, None, vec!["one".into(), "two".into()])
    );
    assert_refused(&b.post_signed(&three).await, &three);
    b.stop().await;
}
