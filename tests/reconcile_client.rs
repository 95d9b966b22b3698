//! The reconciler's client against the Gameball API stand-in (`common::gameball_api`), over real
//! HTTP on 127.0.0.1: what it asks for, how answers become updates, how it fails, and that it
//! keeps Gameball's rate limits, as the stand-in counts them.

use crate::common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::gameball_api::{API_KEY, Api, Bucket, Customer, GameballStandIn, SECRET_KEY, Seen};
use profile_state::profile::{Field, ProfileKey, Scalar};
use profile_state::reconcile::{
    Account, ApiVersion, ClientOptions, FailureReason, FetchOptions, FetchSummary, Fetcher,
    GameballClient, Limits, Outcome, Stopped, Window,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// An account pointed at the stand-in, with Gameball's documented limits in full.
fn account(stand_in: &GameballStandIn) -> Account {
    let mut account = Account::new("2155", API_KEY, SECRET_KEY)
        .unwrap()
        .with_base_url(&stand_in.url())
        .unwrap();
    account.limits = Limits::documented();
    account
}

/// Short waits, so failures show quickly.
fn quick() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        max_in_flight: 4,
        max_attempts: 4,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        max_retry_after: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

/// One customer at a time (no batch) unless a test asks for it.
fn one_by_one() -> FetchOptions {
    FetchOptions {
        bulk_threshold: usize::MAX,
        batch_poll_interval: Duration::from_millis(20),
        ..FetchOptions::default()
    }
}

fn fetcher(account: Account, client: ClientOptions, fetch: FetchOptions) -> Fetcher {
    Fetcher::new(GameballClient::new(account, client).unwrap(), fetch)
}

fn ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}-{n}")).collect()
}

fn customers(ids: &[String]) -> Vec<Customer> {
    ids.iter().map(|id| Customer::new(id)).collect()
}

/// Fetches `ids`, collecting every outcome.
async fn fetch_all(fetcher: &Fetcher, ids: &[String]) -> (Vec<Outcome>, FetchSummary) {
    let (out, mut outcomes) = mpsc::channel(16);
    let collect = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(outcome) = outcomes.recv().await {
            all.push(outcome);
        }
        all
    });
    let summary = fetcher
        .fetch_many(ids, &CancellationToken::new(), &out)
        .await;
    drop(out);
    (collect.await.unwrap(), summary)
}

fn field(update: &profile_state::profile::ProfileUpdate, field: Field) -> Option<&Scalar> {
    update
        .fields
        .iter()
        .find(|(name, _)| *name == field)
        .and_then(|(_, value)| value.as_ref())
}

/// Asserts that after every 429 the bucket was left alone for the rest of the pause it asked
/// for (`pause`), less a grace for requests already on their way when the 429 came back.
fn quiet_after_each_429(seen: &[Seen], bucket: Bucket, pause: Duration) {
    let grace = Duration::from_millis(150);
    for refused in seen.iter().filter(|seen| seen.status == 429) {
        let early = seen.iter().find(|other| {
            other.api.bucket() == bucket
                && other.at >= refused.at + grace
                && other.at < refused.at + pause - grace
        });
        assert!(
            early.is_none(),
            "a request {:?} after a 429 that asked for {pause:?}",
            early.map(|other| other.at - refused.at)
        );
    }
}

#[tokio::test]
async fn a_customer_is_fetched_and_mapped_from_the_documented_answers() {
    let stand_in = GameballStandIn::start().await;
    let mut jo = Customer::new("c-1");
    jo.email = Some("jo@example.com".into());
    jo.tier = Some((3, "Platinum".into()));
    jo.available_points = 90;
    jo.pending_points = 10;
    let mut bare = Customer::new("c-2");
    bare.mobile = None;
    bare.tier = None;
    stand_in.add([jo, bare]);
    let fetcher = fetcher(account(&stand_in), quick(), one_by_one());

    let before = Utc::now();
    let update = fetcher.fetch_one("c-1").await.unwrap();
    let after = Utc::now();
    assert_eq!(update.key, ProfileKey::new("2155", "c-1"));
    let text = |value: &str| Some(Scalar::Text(value.into()));
    assert_eq!(
        update.fields,
        vec![
            (Field::Email, text("jo@example.com")),
            (Field::MobileNumber, text("+201000000000")),
            (Field::TierName, text("Platinum")),
            (Field::TierOrder, Some(Scalar::Int(3))),
            (Field::ReferralCode, text("REF-CODE")),
            (Field::ReferralLink, text("https://example.com/r/REF-CODE")),
            (Field::ActivatedPoints, Some(Scalar::Int(90))),
            (Field::PendingPoints, Some(Scalar::Int(10))),
            (Field::TotalPoints, Some(Scalar::Int(100))),
        ]
    );
    // The fetch time by the answer's `Date` (whole seconds) less the round trip, less the
    // default one-second margin for clock skew.
    let margin = chrono::Duration::seconds(1);
    let earliest = before - margin - chrono::Duration::seconds(1) - (after - before);
    assert!(
        update.at >= earliest && update.at <= after - margin,
        "{} not in {earliest}..{}",
        update.at,
        after - margin
    );
    for api in [Api::Details, Api::TierProgress, Api::Balance] {
        assert_eq!(stand_in.count(api), 1, "{api:?}");
    }
    assert_eq!(
        stand_in.count(Api::Customer),
        0,
        "/details has the referral too"
    );
    assert!(stand_in.seen().iter().all(|seen| seen.version == "v4.0"));

    // What the API does not give is left out, not cleared.
    let update = fetcher.fetch_one("c-2").await.unwrap();
    for absent in [
        Field::MobileNumber,
        Field::TierName,
        Field::TierOrder,
        Field::GbCustomerId,
    ] {
        assert!(
            update.fields.iter().all(|(field, _)| *field != absent),
            "{absent:?}"
        );
    }
    assert_eq!(field(&update, Field::TotalPoints), Some(&Scalar::Int(1500)));
}

#[tokio::test]
async fn any_customer_id_travels_as_one_path_segment() {
    let stand_in = GameballStandIn::start().await;
    let odd = "jo+1@example.com/a b?c#d%2e..";
    stand_in.add([Customer::new(odd)]);
    let fetcher = fetcher(account(&stand_in), quick(), one_by_one());
    let update = fetcher.fetch_one(odd).await.unwrap();
    assert_eq!(
        &*update.key.customer_id, odd,
        "the stand-in answered for this exact id"
    );

    for unaddressable in [".", ".."] {
        let error = fetcher.fetch_one(unaddressable).await.unwrap_err();
        assert_eq!(error.reason, FailureReason::Rejected);
        assert_eq!(error.attempts, 0);
    }
    // An id whose url would pass what a request can carry (a `/` is 3 bytes escaped): refused
    // at once, named, not retried as Gameball unreachable (found by an adversarial run).
    let error = fetcher.fetch_one(&"/".repeat(25_000)).await.unwrap_err();
    assert_eq!(error.reason, FailureReason::Rejected, "{error}");
    assert_eq!(error.attempts, 0);
    assert!(
        error
            .detail
            .contains("customer id (25000 bytes) makes a url of"),
        "{error}"
    );
    assert_eq!(
        stand_in.seen().len(),
        3,
        "no request for . or .. or the long id"
    );
}

#[tokio::test]
async fn without_contact_fields_the_customer_endpoint_is_read_in_v4_1_with_both_keys() {
    let stand_in = GameballStandIn::start().await;
    stand_in.high_security(true);
    stand_in.add([Customer::new("c-1")]);
    let mut account = account(&stand_in);
    account.read_contact = false;
    account.api_version = ApiVersion::V4_1;
    let update = fetcher(account, quick(), one_by_one())
        .fetch_one("c-1")
        .await
        .unwrap();
    assert_eq!(
        field(&update, Field::ReferralCode),
        Some(&Scalar::Text("REF-CODE".into()))
    );
    assert!(
        field(&update, Field::Email).is_none() && field(&update, Field::MobileNumber).is_none()
    );
    assert_eq!(
        (stand_in.count(Api::Customer), stand_in.count(Api::Details)),
        (1, 0)
    );
    assert!(stand_in.seen().iter().all(|seen| seen.version == "v4.1"));
}

#[tokio::test]
async fn refused_keys_fail_with_gameballs_reason_and_stop_the_run() {
    let stand_in = GameballStandIn::start().await;
    let all = ids("c", 30);
    stand_in.add(customers(&all));

    let wrong_api_key = Account::new("2155", "wrong", SECRET_KEY)
        .unwrap()
        .with_base_url(&stand_in.url())
        .unwrap();
    let error = fetcher(wrong_api_key.clone(), quick(), one_by_one())
        .fetch_one("c-0")
        .await
        .unwrap_err();
    assert_eq!(error.reason, FailureReason::Unauthorized);
    assert_eq!(
        (error.status, error.gameball_code, error.attempts),
        (Some(401), Some(1000), 1)
    );
    assert_eq!(
        error.to_string(),
        "gameball details unauthorized (http 401, code 1000): Unauthorized access."
    );
    assert!(!error.to_string().contains("wrong"), "keys never show");

    let wrong_secret = Account::new("2155", API_KEY, "wrong")
        .unwrap()
        .with_base_url(&stand_in.url())
        .unwrap();
    let error = fetcher(wrong_secret, quick(), one_by_one())
        .fetch_one("c-0")
        .await
        .unwrap_err();
    assert_eq!(
        (error.reason, error.gameball_code),
        (FailureReason::Unauthorized, Some(1001))
    );

    stand_in.forbid(true);
    let error = fetcher(account(&stand_in), quick(), one_by_one())
        .fetch_one("c-0")
        .await
        .unwrap_err();
    assert_eq!(
        (error.reason, error.gameball_code),
        (FailureReason::Forbidden, Some(1002))
    );
    // Gameball's message is kept, the key it echoed is not (found by an adversarial run: it
    // reached the job's report and the log).
    assert_eq!(
        error.detail,
        "No permission to access the resource with key [redacted]."
    );
    stand_in.forbid(false);

    // A whole run stops at the first refusal instead of spending 90 calls on 401s.
    let before = stand_in.seen().len();
    let bulk = FetchOptions {
        bulk_threshold: 10,
        ..one_by_one()
    };
    let (outcomes, summary) = fetch_all(&fetcher(wrong_api_key, quick(), bulk), &all).await;
    let Some(Stopped::AccountRefused(refusal)) = &summary.stopped else {
        panic!("not stopped for the keys: {summary:?}");
    };
    assert_eq!(refusal.reason, FailureReason::Unauthorized);
    let sent = stand_in.seen().len() - before;
    assert!(
        sent <= 1 + 4,
        "{sent} requests: the batch and the first 4 in flight at most"
    );
    assert_eq!(summary.fetched, 0);
    assert_eq!(summary.failed, outcomes.len());
    assert!(outcomes.iter().all(|outcome| {
        outcome.result.as_ref().unwrap_err().reason == FailureReason::Unauthorized
    }));
    assert_eq!(summary.failed + summary.not_attempted, 30);
    assert!(summary.not_attempted >= 26, "{summary:?}");
}

#[tokio::test]
async fn an_unknown_customer_fails_alone_and_a_bad_answer_names_its_field() {
    let stand_in = GameballStandIn::start().await;
    stand_in.add(customers(&["a".into(), "b".into()]));
    let fetcher = fetcher(account(&stand_in), quick(), one_by_one());
    let asked: Vec<String> = ["a", "ghost", "b"].map(String::from).into();
    let (outcomes, summary) = fetch_all(&fetcher, &asked).await;
    assert_eq!(
        (summary.fetched, summary.failed, summary.not_attempted),
        (2, 1, 0)
    );
    assert_eq!(summary.stopped, None);
    let ghost = outcomes.iter().find(|o| o.customer_id == "ghost").unwrap();
    let error = ghost.result.as_ref().unwrap_err();
    assert_eq!(
        (error.reason, error.gameball_code),
        (FailureReason::NotFound, Some(7000))
    );
    assert_eq!(error.attempts, 1, "a 404 is not retried");

    stand_in.answer(
        Api::TierProgress,
        json!({"current": {"order": "2", "name": "Gold"}}),
    );
    let error = fetcher.fetch_one("a").await.unwrap_err();
    assert_eq!(error.reason, FailureReason::BadAnswer);
    assert!(
        error.detail.contains("current.order must be a number"),
        "{error}"
    );

    // A text field too long for any profile is a bad answer, not a profile no message can
    // carry (found by an adversarial run).
    stand_in.answer(
        Api::TierProgress,
        json!({"current": {"order": 2, "name": "G".repeat(8 * 1024 + 1)}}),
    );
    let error = fetcher.fetch_one("a").await.unwrap_err();
    assert_eq!(error.reason, FailureReason::BadAnswer);
    assert!(
        error.detail.contains("current.name is 8193 bytes"),
        "{error}"
    );
    stand_in.answer(
        Api::TierProgress,
        json!({"current": {"order": 2, "name": "G".repeat(8 * 1024)}}),
    );
    fetcher.fetch_one("a").await.expect("8 KiB is taken");

    // An answer larger than the client reads is refused, not buffered.
    stand_in.answer(
        Api::TierProgress,
        json!({"current": null, "padding": "x".repeat(10_000)}),
    );
    let small = ClientOptions {
        max_answer_bytes: 4096,
        ..quick()
    };
    let error = self::fetcher(account(&stand_in), small, one_by_one())
        .fetch_one("a")
        .await
        .unwrap_err();
    assert_eq!(error.reason, FailureReason::BadAnswer);
    assert!(error.detail.contains("larger than 4096 bytes"), "{error}");
}

#[tokio::test]
async fn the_limiter_keeps_both_windows_as_the_stand_in_counts_them() {
    let stand_in = GameballStandIn::start().await;
    let short = Duration::from_millis(200);
    let long = Duration::from_secs(1);
    stand_in.set_limits(Bucket::CustomersGet, &[(10, short), (30, long)]);
    // Something to overlap: concurrency shows only when answers take time.
    stand_in.slow(Api::TierProgress, Duration::from_millis(30));
    let all = ids("c", 10);
    stand_in.add(customers(&all));
    let mut account = account(&stand_in);
    // Half of the stand-in's limits, as production keeps half of Gameball's by default.
    account.limits = Limits {
        customers_get: vec![Window::new(10, short), Window::new(30, long)],
        others: Limits::documented().others,
    }
    .share(0.5);

    let start = Instant::now();
    let (outcomes, summary) = fetch_all(&fetcher(account, quick(), one_by_one()), &all).await;
    assert_eq!(summary.fetched, 10, "{outcomes:?}");
    assert_eq!(stand_in.seen().len(), 30, "no retries");
    assert_eq!(stand_in.count_status(429), 0);
    assert!(stand_in.busiest(Bucket::CustomersGet, short) <= 10);
    assert!(stand_in.busiest(Bucket::CustomersGet, long) <= 30);
    // 30 requests at 15 per second: the 16th waits until the first has left the window.
    assert!(start.elapsed() >= long, "{:?}", start.elapsed());
    let in_flight = stand_in.max_in_flight();
    assert!(
        (2..=4).contains(&in_flight),
        "{in_flight} in flight, 4 allowed"
    );
}

#[tokio::test]
async fn a_429_storm_without_retry_after_is_backed_off_together() {
    let stand_in = GameballStandIn::start().await;
    let all = ids("c", 10);
    stand_in.add(customers(&all));
    let options = ClientOptions {
        max_attempts: 6,
        base_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(400),
        ..quick()
    };
    stand_in.storm(Duration::from_millis(600), None);
    let (outcomes, summary) =
        fetch_all(&fetcher(account(&stand_in), options, one_by_one()), &all).await;
    assert_eq!(summary.fetched, 10, "{outcomes:?}");
    let refused = stand_in.count_status(429);
    // Four customers in flight, each backing off 50, 100, 200, 400 ms (with jitter, at most
    // five refusals each in 600 ms); a client that did not back off would send hundreds.
    assert!((1..=20).contains(&refused), "{refused} answers 429");
    assert!(stand_in.busiest(Bucket::CustomersGet, Duration::from_secs(1)) <= 100);
}

#[tokio::test]
async fn retry_after_pauses_every_caller_for_as_long_as_asked() {
    let stand_in = GameballStandIn::start().await;
    let all = ids("c", 4);
    stand_in.add(customers(&all));
    stand_in.storm(Duration::from_millis(800), Some(1));
    let start = Instant::now();
    let (_, summary) = fetch_all(&fetcher(account(&stand_in), quick(), one_by_one()), &all).await;
    assert_eq!(summary.fetched, 4);
    let seen = stand_in.seen();
    let refused = stand_in.count_status(429);
    assert!(
        (1..=4).contains(&refused),
        "one wave of 429s only: {refused}"
    );
    quiet_after_each_429(&seen, Bucket::CustomersGet, Duration::from_secs(1));
    assert!(start.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn the_stand_ins_own_limits_back_a_too_eager_client_off() {
    let stand_in = GameballStandIn::start().await;
    stand_in.set_limits(
        Bucket::CustomersGet,
        &[
            (6, Duration::from_millis(200)),
            (100, Duration::from_secs(1)),
        ],
    );
    stand_in.send_retry_after(true);
    let all = ids("c", 4);
    stand_in.add(customers(&all));
    // The client believes in Gameball's documented limits, far above the stand-in's.
    let options = ClientOptions {
        max_attempts: 6,
        ..quick()
    };
    let (outcomes, summary) =
        fetch_all(&fetcher(account(&stand_in), options, one_by_one()), &all).await;
    assert_eq!(summary.fetched, 4, "{outcomes:?}");
    let refused = stand_in.count_status(429);
    assert!((1..=8).contains(&refused), "{refused} answers 429");
    quiet_after_each_429(
        &stand_in.seen(),
        Bucket::CustomersGet,
        Duration::from_secs(1),
    );
}

#[tokio::test]
async fn a_retry_after_longer_than_the_client_waits_fails_at_once() {
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("c-1")]);
    stand_in.storm(Duration::from_secs(30), Some(120));
    let start = Instant::now();
    let error = fetcher(account(&stand_in), quick(), one_by_one())
        .fetch_one("c-1")
        .await
        .unwrap_err();
    assert_eq!(error.reason, FailureReason::RateLimited);
    assert_eq!(error.attempts, 1);
    assert!(error.detail.contains("retry after 120 s"), "{error}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn slow_answers_hit_the_timeout_on_every_attempt() {
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("c-1")]);
    stand_in.slow(Api::Details, Duration::from_secs(3));
    let options = ClientOptions {
        request_timeout: Duration::from_millis(200),
        max_attempts: 2,
        ..quick()
    };
    let start = Instant::now();
    let error = fetcher(account(&stand_in), options, one_by_one())
        .fetch_one("c-1")
        .await
        .unwrap_err();
    assert_eq!(error.reason, FailureReason::Timeout);
    assert_eq!(error.attempts, 2);
    assert_eq!(stand_in.count(Api::Details), 2);
    assert_eq!(
        stand_in.count(Api::TierProgress),
        0,
        "the customer stops at its first failure"
    );
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn server_errors_are_retried_and_other_refusals_are_not() {
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("c-1")]);
    stand_in.fail_next(Api::Details, &[503, 500]);
    stand_in.fail_next(Api::TierProgress, &[502]);
    let fetcher = fetcher(account(&stand_in), quick(), one_by_one());
    fetcher.fetch_one("c-1").await.unwrap();
    assert_eq!(
        (
            stand_in.count(Api::Details),
            stand_in.count(Api::TierProgress)
        ),
        (3, 2)
    );

    stand_in.fail_next(Api::Balance, &[503, 503, 503, 503]);
    let error = fetcher.fetch_one("c-1").await.unwrap_err();
    assert_eq!(
        (error.reason, error.attempts),
        (FailureReason::ServerError, 4),
        "never forever"
    );

    // Redirects are not followed (they would carry the keys elsewhere), nor retried.
    for status in [400, 302] {
        stand_in.fail_next(Api::Balance, &[status]);
        let error = fetcher.fetch_one("c-1").await.unwrap_err();
        assert_eq!((error.reason, error.attempts), (FailureReason::Rejected, 1));
        assert_eq!(error.status, Some(status));
    }
}

#[tokio::test]
async fn an_unreachable_api_fails_as_such_without_naming_the_customer() {
    // A port nobody listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let account = Account::new("2155", API_KEY, SECRET_KEY)
        .unwrap()
        .with_base_url(&url)
        .unwrap();
    let options = ClientOptions {
        max_attempts: 2,
        ..quick()
    };
    let error = fetcher(account, options, one_by_one())
        .fetch_one("jo@example.com")
        .await
        .unwrap_err();
    assert_eq!(
        (error.reason, error.attempts),
        (FailureReason::Unreachable, 2)
    );
    assert!(!error.to_string().contains("jo@example.com"), "{error}");
}

fn bulk() -> FetchOptions {
    FetchOptions {
        bulk_threshold: 10,
        batch_poll_interval: Duration::from_millis(20),
        batch_timeout: Duration::from_secs(10),
        ..FetchOptions::default()
    }
}

#[tokio::test]
async fn many_customers_get_their_points_from_one_balance_inquiry() {
    let stand_in = GameballStandIn::start().await;
    stand_in.batch_processing(Duration::from_millis(150));
    let all = ids("c", 40);
    stand_in.add(customers(&all));
    let before = Utc::now();
    let (outcomes, summary) = fetch_all(&fetcher(account(&stand_in), quick(), bulk()), &all).await;
    assert_eq!(
        (summary.fetched, summary.batches, summary.batch_fallbacks),
        (40, 1, 0)
    );
    assert_eq!(stand_in.count(Api::BalanceInquiry), 1);
    assert_eq!(
        stand_in.count(Api::Balance),
        0,
        "no customer asked for alone"
    );
    assert!(stand_in.count(Api::BatchStatus) >= 1);
    let seen = stand_in.seen();
    let inquiry = seen.iter().find(|s| s.api == Api::BalanceInquiry).unwrap();
    assert_eq!(inquiry.customers, all);
    for outcome in &outcomes {
        let update = outcome.result.as_ref().unwrap();
        assert_eq!(field(update, Field::TotalPoints), Some(&Scalar::Int(1500)));
        assert_eq!(
            field(update, Field::ActivatedPoints),
            Some(&Scalar::Int(1200))
        );
        // The batch's clock: when it was asked for, not when its results were read (by the
        // answer's `Date`, whole seconds, less the round trip and the margin).
        assert!(update.at >= before - chrono::Duration::seconds(3));
        assert!(update.at <= inquiry.wall - chrono::Duration::seconds(1));
    }
}

#[tokio::test]
async fn customers_a_batch_leaves_out_or_fails_are_asked_for_alone() {
    let stand_in = GameballStandIn::start().await;
    let all = ids("c", 12);
    stand_in.add(customers(&all));
    stand_in.batch_omits("c-3");
    let fetcher = fetcher(account(&stand_in), quick(), bulk());
    let (outcomes, summary) = fetch_all(&fetcher, &all).await;
    assert_eq!((summary.fetched, summary.batch_fallbacks), (12, 1));
    let balances: Vec<Seen> = stand_in
        .seen()
        .into_iter()
        .filter(|s| s.api == Api::Balance)
        .collect();
    assert_eq!(balances.len(), 1);
    assert_eq!(balances[0].customers, ["c-3"]);
    let c3 = outcomes.iter().find(|o| o.customer_id == "c-3").unwrap();
    assert!(field(c3.result.as_ref().unwrap(), Field::TotalPoints).is_some());

    stand_in.batch_fails(true);
    let (_, summary) = fetch_all(&fetcher, &all).await;
    assert_eq!((summary.fetched, summary.batch_fallbacks), (12, 12));
    assert_eq!(stand_in.count(Api::Balance), 1 + 12);
}

#[tokio::test]
async fn a_batch_never_holds_more_than_1000_customers() {
    let stand_in = GameballStandIn::start().await;
    let fast = [(100_000, Duration::from_secs(1))];
    stand_in.set_limits(Bucket::CustomersGet, &fast);
    let all = ids("c", 1001);
    stand_in.add(customers(&all));
    let mut account = account(&stand_in);
    account.limits.customers_get = vec![Window::new(100_000, Duration::from_secs(1))];
    let options = ClientOptions {
        max_in_flight: 16,
        ..quick()
    };
    let (_, summary) = fetch_all(&fetcher(account, options, bulk()), &all).await;
    assert_eq!((summary.fetched, summary.batches), (1001, 2));
    let mut sizes: Vec<usize> = stand_in
        .seen()
        .iter()
        .filter(|s| s.api == Api::BalanceInquiry)
        .map(|s| s.customers.len())
        .collect();
    sizes.sort();
    assert_eq!(sizes, [500, 501], "equal chunks, none above 1,000");
    assert_eq!(stand_in.count_status(400), 0);
}

#[tokio::test]
async fn cancelling_stops_the_fetch_promptly_and_counts_what_was_left() {
    let stand_in = GameballStandIn::start().await;
    let all = ids("c", 40);
    stand_in.add(customers(&all));
    stand_in.slow(Api::Details, Duration::from_millis(100));
    let fetcher = fetcher(account(&stand_in), quick(), one_by_one());
    let cancel = CancellationToken::new();
    let (out, mut outcomes) = mpsc::channel(1);
    let run = {
        let cancel = cancel.clone();
        let all = all.clone();
        tokio::spawn(async move { fetcher.fetch_many(&all, &cancel, &out).await })
    };
    let first = outcomes.recv().await.expect("a first outcome");
    assert!(first.result.is_ok());
    let cancelled_at = Instant::now();
    cancel.cancel();
    while outcomes.recv().await.is_some() {}
    let summary = run.await.unwrap();
    assert!(cancelled_at.elapsed() < Duration::from_secs(1));
    assert_eq!(summary.stopped, Some(Stopped::Cancelled));
    assert!(summary.not_attempted > 20, "{summary:?}");
    assert_eq!(summary.fetched + summary.failed + summary.not_attempted, 40);
}
