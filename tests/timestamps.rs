//! Every time the API emits is a valid `google.protobuf.Timestamp` (seconds within
//! 0001-01-01..9999-12-31, nanoseconds below 10^9), whatever Gameball sent: a leap second is
//! kept as the last nanosecond before it, a year outside 1..9999 is refused with the field
//! named, and a leap second journaled before that rule still recovers and is served valid.
//! JSON clients (grpcurl, protobuf's `json_format`) refuse anything else, for a whole
//! ListProfiles page.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::{TestService, durable_config, profile_updated};
use profile_state::Server;
use profile_state::data_dir::DataDir;
use profile_state::journal::{self, FaultSwitch, Journal};
use profile_state::metrics::Metrics;
use profile_state::pb;
use profile_state::profile::{Field, ProfileKey, ProfileUpdate, Scalar};
use profile_state::sequencer::{Applied, Durability, Sequencer};
use profile_state::store::Store;
use serde_json::json;
use tokio_util::task::TaskTracker;

/// The range of a protobuf Timestamp, in Unix seconds.
const EARLIEST_SECONDS: i64 = -62_135_596_800;
const LATEST_SECONDS: i64 = 253_402_300_799;

/// Asserts what every JSON client of the API requires of a Timestamp.
fn assert_valid(timestamp: &prost_types::Timestamp, what: &str) {
    assert!(
        (EARLIEST_SECONDS..=LATEST_SECONDS).contains(&timestamp.seconds),
        "{what}: seconds {} outside 0001..9999",
        timestamp.seconds
    );
    assert!(
        (0..1_000_000_000).contains(&timestamp.nanos),
        "{what}: nanos {} outside [0, 10^9)",
        timestamp.nanos
    );
}

fn rfc3339(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn timestamp(text: &str) -> prost_types::Timestamp {
    let at = rfc3339(text);
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// GetProfile of a customer of account 2155, if it exists.
async fn get(service: &TestService, customer: &str) -> Option<pb::Profile> {
    let request = pb::GetProfileRequest {
        client_id: "2155".into(),
        customer_id: customer.into(),
        ..Default::default()
    };
    match service.client().await.get_profile(request).await {
        Ok(response) => response.into_inner().profile,
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => panic!("GetProfile failed: {status:?}"),
    }
}

/// Every profile of account 2155 as ListProfiles serves it, each `updated_at` checked.
async fn list_checked(service: &TestService) -> Vec<pb::Profile> {
    let (profiles, _) = service.all_profiles().await;
    for profile in &profiles {
        let updated_at = profile.updated_at.as_ref().expect("an updated_at");
        assert_valid(updated_at, &format!("ListProfiles {}", profile.customer_id));
    }
    profiles
}

/// A year of five digits is out of range, as year 0 is: both are told the range, and only a
/// time that is malformed is told the format (a first-user review got the format message for
/// year 10000).
#[tokio::test]
async fn years_0_and_10000_are_told_the_range_and_a_malformed_time_the_format() {
    const RANGE: &str = "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999999Z";
    let service = TestService::start().await;
    let cases = [
        ("0000-01-01T00:00:00Z", RANGE),
        ("10000-01-01T00:00:00Z", RANGE),
        ("123456-07-08T09:10:11.5+02:00", RANGE),
        ("10000-13-01T00:00:00Z", "must be an RFC 3339 timestamp"),
        ("01000-01-01T00:00:00Z", "must be an RFC 3339 timestamp"),
        ("10000-01-01", "must be an RFC 3339 timestamp"),
    ];
    for (n, (created_at, expected)) in cases.into_iter().enumerate() {
        let body = profile_updated(&format!("c{n}"), created_at, json!({}));
        let (status, answer) = service.post(&body).await;
        assert_eq!(status, 422, "{created_at}: {answer}");
        assert_eq!(answer["field"], json!("created_at"), "{answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(expected), "{created_at}: {answer}");
    }
}

#[tokio::test]
async fn a_leap_second_is_kept_as_the_nanosecond_before_and_year_0_is_refused_naming_the_field() {
    let service = TestService::start().await;
    let leap = profile_updated("leap", "2016-12-31T23:59:60Z", json!({"total_points": 1}));
    let (status, answer) = service.post(&leap).await;
    assert_eq!(status, 200, "{answer}");
    let year_zero = profile_updated("year-zero", "0000-01-01T00:00:00Z", json!({}));
    let (status, answer) = service.post(&year_zero).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], json!("created_at"), "{answer}");
    let year_10000 = profile_updated(
        "year-10000",
        "9999-12-31T23:59:59.999999999-00:01",
        json!({}),
    );
    let (status, answer) = service.post(&year_10000).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], json!("created_at"), "{answer}");
    // Far ahead of the server's clock: its fields would have won over every update until then,
    // and over every reconciliation (an adversarial run). Kept as a dead letter; a day's lead
    // is allowed.
    let ahead = |lead: chrono::Duration| {
        let at = chrono::Utc::now() + lead;
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let future = profile_updated("future", &ahead(chrono::Duration::days(400)), json!({}));
    let (status, answer) = service.post(&future).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], json!("created_at"), "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("ahead of this server's clock"),
        "{answer}"
    );
    assert!(answer["dead_letter_id"].is_string(), "{answer}");
    let tomorrow = profile_updated("tomorrow", &ahead(chrono::Duration::hours(23)), json!({}));
    assert_eq!(service.post(&tomorrow).await.0, 200);

    let profile = get(&service, "leap")
        .await
        .expect("the leap second is applied");
    let updated_at = profile.updated_at.expect("an updated_at");
    assert_valid(&updated_at, "GetProfile leap");
    assert_eq!(updated_at, timestamp("2016-12-31T23:59:59.999999999Z"));
    assert!(get(&service, "year-zero").await.is_none());
    assert!(get(&service, "year-10000").await.is_none());
    assert!(get(&service, "future").await.is_none());
    assert_eq!(list_checked(&service).await.len(), 2, "leap and tomorrow");

    // The leap second sorts where it did: after every other instant of its second, before the
    // next second.
    let earlier = profile_updated(
        "leap",
        "2016-12-31T23:59:59.999Z",
        json!({"total_points": 2}),
    );
    assert_eq!(
        service.post(&earlier).await.1["outcome"],
        json!("unchanged")
    );
    let later = profile_updated("leap", "2017-01-01T00:00:00Z", json!({"total_points": 3}));
    assert_eq!(service.post(&later).await.1["outcome"], json!("applied"));

    // The dead letters' arrival times are Timestamps too.
    let mut admin = pb::admin_service_client::AdminServiceClient::new(service.channel().await);
    let letters = admin
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(letters.len(), 3, "year 0, year 10000, far ahead");
    for letter in &letters {
        assert_valid(letter.received_at.as_ref().unwrap(), "received_at");
        assert_valid(
            letter.last_received_at.as_ref().unwrap(),
            "last_received_at",
        );
    }
    service.stop().await;
}

/// Journals `updates` into a fresh data directory at `dir` the way a build that kept times as
/// they came did: straight through the sequencer, past today's validation.
async fn journal_as_before(dir: &Path, updates: Vec<ProfileUpdate>) {
    let data_dir = DataDir::open(dir).unwrap();
    let store = Store::new(1000, data_dir.store_id());
    let recovered = journal::recover(dir, &store, |_| unreachable!("an empty journal")).unwrap();
    let journal = Journal::open(dir, recovered.tail, 1, 1 << 20, FaultSwitch::default()).unwrap();
    let durability = Durability {
        journal,
        snapshot_every_records: u64::MAX,
        records_since_snapshot: 0,
        snapshot_every_bytes: u64::MAX,
        history_events: 1000,
        lock: data_dir.lock_ref(),
        stalled_after: std::time::Duration::from_secs(5),
    };
    let tracker = TaskTracker::new();
    let sequencer = Sequencer::start(store, Some(durability), Metrics::new(), &tracker);
    for update in updates {
        let applied = sequencer.apply(update).await.unwrap();
        assert!(matches!(applied, Applied::Changed { .. }), "{applied:?}");
    }
    drop(sequencer);
    tracker.close();
    tracker.wait().await;
}

fn update(customer: &str, at: &str, points: i64) -> ProfileUpdate {
    ProfileUpdate {
        key: ProfileKey::new(Arc::from("2155"), customer),
        at: rfc3339(at),
        fields: vec![
            (Field::GbCustomerId, Some(Scalar::Int(1234))),
            (Field::TotalPoints, Some(Scalar::Int(points))),
        ],
        extras: vec![],
        origin: profile_state::profile::Origin::Webhook,
    }
}

#[tokio::test]
async fn leap_seconds_already_in_the_journal_recover_and_are_served_valid() {
    let data = tempfile::tempdir().unwrap();
    journal_as_before(
        data.path(),
        vec![
            update("leap", "2016-12-31T23:59:59.5Z", 1),
            update("leap", "2016-12-31T23:59:60.5Z", 2),
            update("other", "2016-12-31T23:59:60Z", 3),
        ],
    )
    .await;

    let config = durable_config(data.path());
    let service = TestService::serve(Server::bind(config).await.expect("the data dir recovers"));
    let leap = get(&service, "leap").await.expect("recovered");
    assert_eq!(leap.total_points, Some(2), "the leap second still won");
    assert_eq!(leap.revision, 2);
    let updated_at = leap.updated_at.expect("an updated_at");
    assert_valid(&updated_at, "GetProfile leap");
    assert_eq!(updated_at, timestamp("2016-12-31T23:59:59.999999999Z"));
    assert_eq!(list_checked(&service).await.len(), 2);
    service.stop().await;
}
