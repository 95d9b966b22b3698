//! Reconciliation end to end: the whole service with an account pointed at the Gameball API
//! stand-in (`common::gameball_api`), real signed webhooks over HTTP, `ReconcileProfiles` and
//! `GetReconcileJob` over gRPC, changes read back with WatchProfiles and ListProfiles.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use common::binary::Binary;
use common::gameball_api::{API_KEY, Api, Bucket, Customer, GameballStandIn, SECRET_KEY};
use common::{TestService, durable_config, profile_updated};
use profile_state::pb;
use profile_state::pb::admin_service_client::AdminServiceClient;
use profile_state::reconcile::{ClientOptions, FetchOptions, ReconcileOptions};
use profile_state::{Config, Server};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// Writes a secrets file naming the stand-in as account 2155's API, with `api_key`.
fn secrets_file(dir: &Path, stand_in: &GameballStandIn, api_key: &str) -> std::path::PathBuf {
    secrets_file_for(dir, stand_in, api_key, &["2155"])
}

/// Writes a secrets file naming the stand-in as the API of each of `accounts`, with `api_key`.
fn secrets_file_for(
    dir: &Path,
    stand_in: &GameballStandIn,
    api_key: &str,
    accounts: &[&str],
) -> std::path::PathBuf {
    let path = dir.join("secrets.toml");
    let account = |client_id: &&str| {
        format!(
            "[gameball_api.\"{client_id}\"]\napi_key = \"{api_key}\"\nsecret_key = \"{SECRET_KEY}\"\n\
             base_url = \"{}\"\n",
            stand_in.url()
        )
    };
    std::fs::write(&path, accounts.iter().map(account).collect::<String>()).unwrap();
    path
}

/// Short retries and no clock margin: the tests' clock and the stand-in's are the same.
fn quick() -> ReconcileOptions {
    ReconcileOptions {
        client: ClientOptions {
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            max_retry_after: Duration::from_secs(5),
            ..ClientOptions::default()
        },
        fetch: FetchOptions {
            clock_margin: Duration::ZERO,
            batch_poll_interval: Duration::from_millis(20),
            ..FetchOptions::default()
        },
        ..ReconcileOptions::default()
    }
}

pub(crate) async fn start(
    config: Config,
    dir: &Path,
    stand_in: &GameballStandIn,
    key: &str,
) -> TestService {
    let mut config = config;
    config.webhook_secrets_file = Some(secrets_file(dir, stand_in, key));
    let server = Server::bind(config).await.expect("service binds");
    TestService::serve(server.with_reconcile_options(quick()))
}

/// A service keeping its state in memory, with the right keys.
async fn in_memory(dir: &Path, stand_in: &GameballStandIn) -> TestService {
    start(Config::for_tests(common::SECRET), dir, stand_in, API_KEY).await
}

async fn admin(service: &TestService) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(service.channel().await)
}

fn ids(ids: &[&str]) -> pb::reconcile_profiles_request::Selection {
    pb::reconcile_profiles_request::Selection::CustomerIds(pb::CustomerIds {
        ids: ids.iter().map(|id| (*id).to_owned()).collect(),
    })
}

/// Starts a job over gRPC and polls GetReconcileJob until it ends.
async fn reconcile(
    service: &TestService,
    selection: pb::reconcile_profiles_request::Selection,
) -> pb::ReconcileJob {
    let mut admin = admin(service).await;
    let started = admin
        .reconcile_profiles(pb::ReconcileProfilesRequest {
            client_id: "2155".into(),
            selection: Some(selection),
        })
        .await
        .expect("ReconcileProfiles starts a job")
        .into_inner();
    assert!(!started.job_id.is_empty());
    wait(&mut admin, &started.job_id).await
}

async fn wait(admin: &mut AdminServiceClient<Channel>, job_id: &str) -> pb::ReconcileJob {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = admin
            .get_reconcile_job(pb::GetReconcileJobRequest {
                job_id: job_id.into(),
            })
            .await
            .expect("GetReconcileJob answers")
            .into_inner()
            .job
            .unwrap();
        if job.state() != pb::ReconcileJobState::Running {
            return job;
        }
        assert!(Instant::now() < deadline, "job still running: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn profile(service: &TestService, customer: &str) -> pb::Profile {
    service
        .client()
        .await
        .get_profile(pb::GetProfileRequest {
            client_id: "2155".into(),
            customer_id: customer.into(),
            ..Default::default()
        })
        .await
        .expect("profile exists")
        .into_inner()
        .profile
        .unwrap()
}

/// Every change from revision 1 up to `count` of them.
async fn changes(service: &TestService, count: usize) -> Vec<pb::ProfileChange> {
    let mut stream = service
        .client()
        .await
        .watch_profiles(pb::WatchProfilesRequest {
            start_revision: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut changes = Vec::new();
    while changes.len() < count {
        let event = stream.message().await.unwrap().unwrap().event.unwrap();
        if let pb::watch_profiles_response::Event::Change(change) = event {
            changes.push(change);
        }
    }
    changes
}

fn now() -> String {
    ago(0)
}

/// `seconds` before now. A webhook a reconcile is to correct must be older than the fetch by
/// Gameball's clock, which the answer's `Date` gives to the second, less the round trip and
/// the clock margin: a few seconds do.
fn ago(seconds: i64) -> String {
    (Utc::now() - chrono::Duration::seconds(seconds)).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A webhook body carrying every field the API gives, as `customer` holds them.
fn webhook_of(customer: &Customer, created_at: &str) -> Value {
    let (order, name) = customer.tier.clone().unwrap();
    profile_updated(
        &customer.customer_id,
        created_at,
        json!({
            "email": customer.email,
            "mobile_number": customer.mobile,
            "tier_name": name,
            "tier_order": order,
            "referral_code": customer.referral_code,
            "referral_link": customer.referral_link,
            "activated_points": customer.available_points,
            "pending_points": customer.pending_points,
            "total_points": customer.available_points + customer.pending_points,
        }),
    )
}

/// The fields the API gives, as served.
fn api_fields(profile: &pb::Profile) -> Value {
    json!([
        profile.email,
        profile.mobile_number,
        profile.tier_name,
        profile.tier_order,
        profile.referral_code,
        profile.referral_link,
        profile.activated_points,
        profile.pending_points,
        profile.total_points,
    ])
}

fn expected(customer: &Customer) -> Value {
    let (order, name) = customer.tier.clone().unwrap();
    json!([
        customer.email,
        customer.mobile,
        name,
        order,
        customer.referral_code,
        customer.referral_link,
        customer.available_points,
        customer.pending_points,
        customer.available_points + customer.pending_points,
    ])
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series}"))
}

#[tokio::test]
async fn a_profile_wrong_after_a_lost_webhook_is_corrected_and_origins_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let mut jo = Customer::new("jo");
    let service = start(durable_config(dir.path()), dir.path(), &stand_in, API_KEY).await;
    service.update(&webhook_of(&jo, &ago(5))).await;
    // Gameball's next webhook is lost: the truth moves on without the service.
    jo.available_points += 500;
    jo.tier = Some((3, "Platinum".into()));
    stand_in.add([jo.clone()]);

    let job = reconcile(&service, ids(&["jo"])).await;
    assert_eq!(job.state(), pb::ReconcileJobState::Succeeded, "{job:?}");
    assert_eq!((job.total, job.done, job.changed, job.failed), (1, 1, 1, 0));
    assert_eq!(job.api_requests, 3, "details, tier-progress, balance");
    let healed = profile(&service, "jo").await;
    assert_eq!(api_fields(&healed), expected(&jo));
    assert_eq!(
        healed.gb_customer_id, 1234,
        "the webhook's, the API does not give it"
    );
    let (_, metrics) = service.admin_get("/metrics").await;
    let drift = |field| {
        metric(
            &metrics,
            &format!("profile_state_reconcile_drift_total{{field=\"{field}\"}}"),
        )
    };
    assert_eq!(drift("tier_name"), 1.0);
    assert_eq!(drift("activated_points"), 1.0);
    assert_eq!(drift("email"), 0.0, "unchanged fields are not drift");
    assert_eq!(
        metric(
            &metrics,
            "profile_state_reconcile_profiles_total{outcome=\"changed\"}"
        ),
        1.0
    );

    // Both origins, read back from the journal after a restart.
    service.stop().await;
    let config = durable_config(dir.path());
    let service = start(config, dir.path(), &stand_in, API_KEY).await;
    let origins: Vec<_> = changes(&service, 2)
        .await
        .iter()
        .map(|change| change.origin())
        .collect();
    assert_eq!(
        origins,
        [pb::ChangeOrigin::Webhook, pb::ChangeOrigin::Reconcile]
    );
    service.stop().await;
}

#[tokio::test]
async fn a_webhook_newer_than_the_fetch_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let old = Customer::new("jo");
    stand_in.add([old.clone()]);
    // The balance answers slowly: the webhook arrives while the customer is being read.
    stand_in.slow(Api::Balance, Duration::from_millis(400));
    let service = in_memory(dir.path(), &stand_in).await;
    let mut admin = admin(&service).await;
    let job_id = admin
        .reconcile_profiles(pb::ReconcileProfilesRequest {
            client_id: "2155".into(),
            selection: Some(ids(&["jo"])),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stand_in.count(Api::Details) == 0 {
        assert!(
            Instant::now() < deadline,
            "the job never asked for the customer"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut newer = old.clone();
    newer.email = Some("new@example.com".into());
    newer.available_points = 7;
    newer.tier = Some((1, "Basic".into()));
    service.update(&webhook_of(&newer, &now())).await;

    let job = wait(&mut admin, &job_id).await;
    assert_eq!(job.state(), pb::ReconcileJobState::Succeeded, "{job:?}");
    assert_eq!((job.changed, job.unchanged), (0, 1), "{job:?}");
    assert_eq!(api_fields(&profile(&service, "jo").await), expected(&newer));
    service.stop().await;
}

#[tokio::test]
async fn a_429_storm_is_backed_off_without_exceeding_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let customers: Vec<Customer> = (0..20).map(|n| Customer::new(&format!("c-{n}"))).collect();
    stand_in.add(customers.clone());
    stand_in.send_retry_after(true);
    stand_in.storm(Duration::from_millis(800), Some(1));
    let service = in_memory(dir.path(), &stand_in).await;
    let names: Vec<&str> = customers.iter().map(|c| c.customer_id.as_str()).collect();
    let started = Instant::now();
    let job = reconcile(&service, ids(&names)).await;
    let took = started.elapsed();

    assert_eq!(job.state(), pb::ReconcileJobState::Succeeded, "{job:?}");
    assert_eq!((job.changed, job.failed), (20, 0), "{job:?}");
    assert!(
        stand_in.count_status(429) > 0,
        "the storm refused something"
    );
    assert!(
        job.api_requests > 60,
        "retries count in the cost: {}",
        job.api_requests
    );
    // Gameball's documented limits, as the stand-in counted arrivals.
    assert!(stand_in.busiest(Bucket::CustomersGet, Duration::from_secs(1)) <= 100);
    assert!(stand_in.busiest(Bucket::CustomersGet, Duration::from_secs(30)) <= 1200);
    // After a 429 asking for a second, the bucket stayed quiet (requests already on their way
    // excepted).
    let seen = stand_in.seen();
    for refused in seen.iter().filter(|seen| seen.status == 429) {
        let early = seen.iter().filter(|other| {
            other.at >= refused.at + Duration::from_millis(150)
                && other.at < refused.at + Duration::from_millis(850)
        });
        assert_eq!(
            early.count(),
            0,
            "requests during the pause a 429 asked for"
        );
    }
    let (_, metrics) = service.admin_get("/metrics").await;
    let paused = "profile_state_reconcile_rate_limited_seconds_total{bucket=\"customers_get\"}";
    assert!(metric(&metrics, paused) >= 1.0);
    // The 429s of requests in flight together overlap: counted one by one, their pauses
    // added up to more seconds than the job took (an adversarial run).
    assert!(
        metric(&metrics, paused) <= took.as_secs_f64(),
        "paused {} s in a job of {took:?}",
        metric(&metrics, paused)
    );
    assert!(
        metric(
            &metrics,
            "profile_state_reconcile_requests_total{endpoint=\"details\",status=\"429\"}"
        ) >= 1.0
    );
    service.stop().await;
}

/// A long job could not be stopped but by stopping the server (found by an adversarial run):
/// CancelReconcileJob stops it at once, counts the rest as not attempted, frees the account
/// for a new job, and answers a job that ended as it ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_job_is_cancelled_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let names: Vec<String> = (0..40).map(|n| format!("c-{n}")).collect();
    stand_in.add(names.iter().map(|id| Customer::new(id)));
    stand_in.slow(Api::Details, Duration::from_secs(3600));
    let service = in_memory(dir.path(), &stand_in).await;
    let mut admin = admin(&service).await;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let request = pb::ReconcileProfilesRequest {
        client_id: "2155".into(),
        selection: Some(ids(&names[..20])),
    };
    let started = admin
        .reconcile_profiles(request)
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stand_in.count(Api::Details) == 0 {
        assert!(
            Instant::now() < deadline,
            "the job never asked for a customer"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The CLI, as an operator would.
    let cancelled = cli(&service, &["--cancel", &started.job_id, "--json"]).await;
    let said = String::from_utf8_lossy(&cancelled.stderr);
    assert_eq!(cancelled.status.code(), Some(0), "{said}");
    let job: Value = serde_json::from_slice(&cancelled.stdout).unwrap();
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["error"], "cancelled (CancelReconcileJob)", "{job}");
    assert_eq!(job["total"], 20, "{job}");
    assert_eq!(job["changed"], 0, "{job}");
    assert!(job["not_attempted"].as_u64().unwrap() > 0, "{job}");
    // The requests it dropped were sent, and Gameball counted them: so does the job (it did
    // not: a second adversarial run).
    let arrived = stand_in.count(Api::Details) as u64;
    assert!(
        job["api_requests"].as_u64().unwrap() >= arrived,
        "{job}: {arrived} arrived"
    );

    // Again: the job as it ended. Then the account is free for the next job.
    let again = pb::CancelReconcileJobRequest {
        job_id: started.job_id.clone(),
    };
    let again = admin
        .cancel_reconcile_job(again)
        .await
        .unwrap()
        .into_inner();
    let again = again.job.unwrap();
    assert_eq!(again.state(), pb::ReconcileJobState::Cancelled);
    assert_eq!(again.not_attempted, job["not_attempted"].as_u64().unwrap());
    let next = pb::ReconcileProfilesRequest {
        client_id: "2155".into(),
        selection: Some(ids(&names[20..])),
    };
    let next = admin.reconcile_profiles(next).await.unwrap().into_inner();
    let cancel = |job_id: &str| pb::CancelReconcileJobRequest {
        job_id: job_id.to_owned(),
    };
    let next = admin.cancel_reconcile_job(cancel(&next.job_id)).await;
    assert_eq!(
        next.unwrap().into_inner().job.unwrap().state(),
        pb::ReconcileJobState::Cancelled
    );

    let unknown = admin
        .cancel_reconcile_job(cancel("no-such-job"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let empty = admin.cancel_reconcile_job(cancel("")).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument, "{empty:?}");
    assert!(empty.message().contains("job_id"), "{empty:?}");
    let (_, metrics) = service.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "profile_state_reconcile_jobs_total{result=\"cancelled\"}"
        ),
        2.0
    );
    let dropped =
        "profile_state_reconcile_requests_total{endpoint=\"details\",status=\"cancelled\"}";
    assert!(metric(&metrics, dropped) >= arrived as f64);
    service.stop().await;
}

/// A job stopped early over every profile reported only the page it had reached as its
/// selection: a thousand customers where there were 1,500 (found by an adversarial run). The
/// rest is counted as selected and not attempted.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_stopped_early_counts_the_whole_selection() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let config = Config::for_tests(common::SECRET);
    let service = Arc::new(start(config, dir.path(), &stand_in, "revoked-key").await);
    let senders = (0..8).map(|sender| {
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            for n in (sender..1500).step_by(8) {
                let body = profile_updated(&format!("c-{n:04}"), &now(), json!({}));
                service.update(&body).await;
            }
        })
    });
    for sender in senders.collect::<Vec<_>>() {
        sender.await.unwrap();
    }
    let job = reconcile(
        &service,
        pb::reconcile_profiles_request::Selection::All(true),
    )
    .await;
    assert_eq!(job.state(), pb::ReconcileJobState::Failed, "{job:?}");
    assert_eq!(job.total, 1500, "{job:?}");
    assert_eq!(job.changed + job.unchanged, 0);
    assert_eq!(job.failed + job.not_attempted, 1500, "{job:?}");
    let (_, metrics) = service.admin_get("/metrics").await;
    let not_attempted = "profile_state_reconcile_profiles_total{outcome=\"not_attempted\"}";
    assert_eq!(metric(&metrics, not_attempted), job.not_attempted as f64);
}

#[tokio::test]
async fn refused_keys_fail_the_job_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.add((0..30).map(|n| Customer::new(&format!("c-{n}"))));
    let service = start(
        Config::for_tests(common::SECRET),
        dir.path(),
        &stand_in,
        "revoked-key",
    )
    .await;
    let names: Vec<String> = (0..30).map(|n| format!("c-{n}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let job = reconcile(&service, ids(&names)).await;
    assert_eq!(job.state(), pb::ReconcileJobState::Failed, "{job:?}");
    assert!(
        job.error.contains("unauthorized") && job.error.contains("code 1000"),
        "{}",
        job.error
    );
    assert_eq!(job.changed + job.unchanged, 0);
    assert_eq!(job.failed + job.not_attempted, 30, "{job:?}");
    let reasons: Vec<&str> = job
        .failures_by_reason
        .iter()
        .map(|r| r.reason.as_str())
        .collect();
    assert!(reasons.contains(&"unauthorized"), "{reasons:?}");
    assert!(stand_in.seen().len() <= 10, "stopped at the first refusals");
    let (_, metrics) = service.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "profile_state_reconcile_jobs_total{result=\"failed\"}"
        ),
        1.0
    );
    service.stop().await;
}

/// Reconcile clocked its updates with this host's clock and webhooks carry Gameball's: with
/// Gameball's clock seconds behind, a webhook of a change made after the fetch was answered
/// `applied` and lost to the older reconciled value (found by an adversarial run). The fetch
/// is now timed by the answer's `Date`, Gameball's clock.
#[tokio::test]
async fn a_webhook_after_the_fetch_wins_when_gameballs_clock_is_behind() {
    let behind = chrono::Duration::seconds(120);
    let gameball_now = |shift: i64| {
        (Utc::now() - behind + chrono::Duration::seconds(shift))
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    };
    let points = |total: i64| {
        let mut customer = Customer::new("late");
        (customer.available_points, customer.pending_points) = (total, 0);
        customer
    };
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.clock_behind(behind.to_std().unwrap());
    let service = in_memory(dir.path(), &stand_in).await;

    service
        .update(&webhook_of(&points(100), &gameball_now(-10)))
        .await;
    // A webhook lost meanwhile: the API says 200.
    stand_in.add([points(200)]);
    let job = reconcile(&service, ids(&["late"])).await;
    assert_eq!(job.changed, 1, "{job:?}");
    assert_eq!(profile(&service, "late").await.total_points, Some(200));
    // The customer changes after the fetch; Gameball stamps the webhook with its clock.
    service
        .update(&webhook_of(&points(300), &gameball_now(0)))
        .await;
    assert_eq!(
        profile(&service, "late").await.total_points,
        Some(300),
        "the webhook of a change after the fetch wins"
    );
    service.stop().await;
}

/// A server given no secrets file was told "no [gameball_api] settings in the secrets file",
/// which sent a first-user review looking for a file there was not: the answer says the
/// secrets file is what reconciliation needs.
#[tokio::test]
async fn reconciling_on_a_server_without_a_secrets_file_says_it_needs_one() {
    let service = TestService::start().await;
    let request = pb::ReconcileProfilesRequest {
        client_id: "2155".into(),
        selection: Some(ids(&["jo"])),
    };
    let status = admin(&service)
        .await
        .reconcile_profiles(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains(
            "reconciliation needs --webhook-secrets-file with a [gameball_api.\"2155\"] table"
        ),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("given no secrets file"),
        "{}",
        status.message()
    );
    service.stop().await;
}

#[tokio::test]
async fn requests_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.slow(Api::Details, Duration::from_secs(2));
    stand_in.add([Customer::new("jo")]);
    let service = in_memory(dir.path(), &stand_in).await;
    let mut admin = admin(&service).await;
    let ask = |client_id: &str, selection| {
        let request = pb::ReconcileProfilesRequest {
            client_id: client_id.into(),
            selection,
        };
        let mut admin = admin.clone();
        async move { admin.reconcile_profiles(request).await }
    };
    let status = ask("9999", Some(ids(&["jo"]))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("9999"), "{}", status.message());
    let status = ask("2155", None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = ask("2155", Some(ids(&[]))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // Ages past what a timestamp holds were a panic in the job, which then showed RUNNING for
    // good and refused every later job of the account (found by an adversarial run).
    for (seconds, nanos) in [(400_000 * 366 * 86_400, 0), (i64::MAX, 1_999_999_999)] {
        let age = prost_types::Duration { seconds, nanos };
        let selection = pb::reconcile_profiles_request::Selection::NotUpdatedFor(age);
        let status = ask("2155", Some(selection)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("not_updated_for"),
            "{}",
            status.message()
        );
    }

    let running = ask("2155", Some(ids(&["jo"]))).await.unwrap().into_inner();
    let status = ask("2155", Some(ids(&["jo"]))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
    assert!(
        status.message().contains(&running.job_id),
        "{}",
        status.message()
    );
    let status = admin
        .get_reconcile_job(pb::GetReconcileJobRequest {
            job_id: "no-such-job".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    // Shutdown cancels the running job instead of waiting for it.
    service.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn unknown_customers_are_created_and_all_walks_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let known = Customer::new("known");
    let new = Customer::new("new");
    stand_in.add([known.clone(), new.clone()]);
    let service = in_memory(dir.path(), &stand_in).await;
    let job = reconcile(&service, ids(&["new"])).await;
    assert_eq!(job.changed, 1, "{job:?}");
    let created = profile(&service, "new").await;
    assert_eq!(api_fields(&created), expected(&new));
    assert_eq!(created.gb_customer_id, 0, "unset until a webhook brings it");

    service.update(&webhook_of(&known, &common::at(1))).await;
    let job = reconcile(
        &service,
        pb::reconcile_profiles_request::Selection::All(true),
    )
    .await;
    assert_eq!((job.total, job.failed), (2, 0), "{job:?}");
    let job = reconcile(
        &service,
        pb::reconcile_profiles_request::Selection::NotUpdatedFor(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
    )
    .await;
    assert_eq!(job.total, 0, "every profile was just reconciled: {job:?}");
    service.stop().await;
}

/// A customer whose update is too large for a stream message (a replica whose stream's
/// `max_msg_size` is 8 KiB; the id alone is larger) is refused by itself: it fails with
/// `update_refused`, and the job goes on to record the others. It stopped the whole job, every
/// customer after it "not recorded", saying the journal refused the updates (found by an
/// adversarial run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_too_large_for_the_stream_fails_its_customer_not_the_job() {
    let nats = nats_harness::NatsCluster::single().await.unwrap();
    let (context, made) = crate::replicas::made_stream(&nats, "RECONCILED").await;
    let mut capped = made;
    capped.max_message_size = 8192;
    context.update_stream(capped).await.unwrap();
    let stand_in = GameballStandIn::start().await;
    let huge = "h".repeat(9_000);
    let names = ["first", huge.as_str(), "second", "third"];
    stand_in.add(names.map(Customer::new));
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::replicas::replica_config(&nats, "RECONCILED", "a");
    config.nats.replicas = 1;
    config.max_body_bytes = 8192;
    let service = start(config, dir.path(), &stand_in, API_KEY).await;

    let job = reconcile(&service, ids(&names)).await;
    assert_eq!(job.state(), pb::ReconcileJobState::Succeeded, "{job:?}");
    assert_eq!((job.changed, job.failed), (3, 1), "{job:?}");
    assert!(job.error.is_empty(), "{job:?}");
    let failure = &job.failures[0];
    assert_eq!(failure.reason, "update_refused", "{failure:?}");
    assert!(failure.customer_id.starts_with("hhh"), "{failure:?}");
    assert!(
        failure.detail.contains("a message of the replicated log"),
        "{failure:?}"
    );
    for name in ["first", "second", "third"] {
        assert_eq!(profile(&service, name).await.customer_id, name);
    }
    let (_, metrics) = service.admin_get("/metrics").await;
    let series = "profile_state_reconcile_failures_total{reason=\"update_refused\"}";
    assert_eq!(metric(&metrics, series), 1.0);
    service.stop().await;
}

/// A hundred failed customers whose ids are 50 KB each (a webhook takes them): listed whole,
/// the report passed gRPC's 4 MiB message limit, and the job could no longer be read or
/// cancelled (found by an adversarial run). Listed ids are cut; the counts cover all.
#[tokio::test]
async fn a_report_of_failed_customers_with_huge_ids_can_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let service = in_memory(dir.path(), &stand_in).await;
    for n in 0..100 {
        let id = format!("{n:03}{}", "x".repeat(50_000));
        service
            .update(&profile_updated(&id, &common::at(1), json!({})))
            .await;
    }
    // Gameball knows none of them.
    let job = reconcile(
        &service,
        pb::reconcile_profiles_request::Selection::All(true),
    )
    .await;
    assert_eq!((job.total, job.failed), (100, 100), "{:?}", job.error);
    assert_eq!(job.failures.len(), 100);
    for failure in &job.failures {
        assert_eq!(failure.customer_id.chars().count(), 129, "cut, then …");
        assert!(failure.customer_id.ends_with("xxx…"));
    }
    service.stop().await;
}

/// Gameball's truth changes while webhooks (some lost, some twice, out of order) and
/// reconcile jobs run at once. After a last job clocked past every earlier read, the service
/// holds the truth whatever the order; three orders end in the same values.
#[tokio::test]
async fn webhooks_and_reconciles_converge_whatever_the_order() {
    let mut finals = Vec::new();
    for seed in [1u64, 2, 3] {
        finals.push(converge(seed).await);
    }
    assert_eq!(finals[0], finals[1]);
    assert_eq!(finals[1], finals[2]);
}

async fn converge(seed: u64) -> Vec<Value> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let names = ["a", "b", "c", "d"];
    let mut truth: Vec<Customer> = names.iter().map(|name| Customer::new(name)).collect();
    stand_in.add(truth.clone());
    let service = in_memory(dir.path(), &stand_in).await;
    let mut webhooks = Vec::new();
    for step in 0..5i64 {
        for customer in &mut truth {
            customer.available_points = 100 * step + customer.customer_id.len() as i64;
            customer.tier = Some((step, format!("tier-{step}")));
            customer.email = Some(format!("{}-{step}@example.com", customer.customer_id));
            let body = webhook_of(customer, &ago(10 - step));
            // 20 % lost, 20 % delivered twice.
            match rng.u32(0..5) {
                0 => {}
                1 => webhooks.extend([body.clone(), body]),
                _ => webhooks.push(body),
            }
        }
        stand_in.add(truth.clone());
        // A reconcile of everything while the deliveries of this step are still to come.
        let job = reconcile(
            &service,
            pb::reconcile_profiles_request::Selection::All(true),
        )
        .await;
        assert_eq!(job.failed, 0, "{job:?}");
        rng.shuffle(&mut webhooks);
        let deliver = webhooks.len() / 2;
        let batch: Vec<Value> = webhooks.drain(..deliver).collect();
        let posts = batch.iter().map(|body| service.update(body));
        futures_util::future::join_all(posts).await;
    }
    // The late rest, while a job runs, then a last job after every change.
    let posts = webhooks.iter().map(|body| service.update(body));
    let ids_all = ids(&names);
    let (_, job) = tokio::join!(
        futures_util::future::join_all(posts),
        reconcile(&service, ids_all)
    );
    assert_eq!(job.failed, 0, "{job:?}");
    // A reconcile is clocked by Gameball's `Date` (whole seconds) less the round trip, a time
    // never later than its read (`gameball_time`), not by when it was sent: two reads of a
    // customer within about a second plus a round trip of each other may be clocked in the
    // opposite order, and the older read's values stay until a later read is clocked past it
    // (one read 600 ms slower in the same `Date` second loses to the one before it). A last job
    // pins the truth only once it is clocked past every earlier read: reconcile again, a second
    // apart, until it is, which on a loaded machine (round trips of most of a second seen) may
    // take a few jobs. Every job attempts every customer.
    let wanted: Vec<Value> = truth.iter().map(expected).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let finals = loop {
        let job = reconcile(&service, ids(&names)).await;
        assert_eq!(job.state(), pb::ReconcileJobState::Succeeded, "{job:?}");
        assert_eq!(
            (job.done, job.failed, job.not_attempted),
            (4, 0, 0),
            "{job:?}"
        );
        let mut served = Vec::new();
        for customer in &truth {
            served.push(api_fields(&profile(&service, &customer.customer_id).await));
        }
        if served == wanted {
            break served;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: never converged\n  served: {served:?}\n  truth: {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
    };
    service.stop().await;
    finals
}

/// Runs `profile-state reconcile ARGS` (the real binary) against `service`.
async fn cli(service: &TestService, args: &[&str]) -> std::process::Output {
    let grpc = service.grpc.to_string();
    let mut command =
        common::binary::bare_command(&[&["reconcile", "--grpc", &grpc], args].concat());
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// `reconcile --wait --json` of these customers of account 2155 through the CLI; the job's
/// outcome, once the CLI exited 0.
async fn reconciled(service: &TestService, ids: &[&str]) -> Value {
    let mut args = vec!["--client-id", "2155", "--wait", "--json"];
    for id in ids {
        args.extend(["--customer-id", id]);
    }
    let done = cli(service, &args).await;
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(0), "{stderr}");
    serde_json::from_slice(&done.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reconcile_subcommand_starts_follows_and_exits_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("jo")]);
    let service = in_memory(dir.path(), &stand_in).await;
    let done = cli(
        &service,
        &[
            "--client-id",
            "2155",
            "--customer-id",
            "jo",
            "--wait",
            "--json",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(0), "{stderr}");
    let outcome: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(outcome["state"], "succeeded");
    assert_eq!(
        (outcome["changed"].as_u64(), outcome["failed"].as_u64()),
        (Some(1), Some(0))
    );

    // A customer Gameball does not know: the job runs to the end, with a failure: exit 1.
    let missing = cli(
        &service,
        &["--client-id", "2155", "--customer-id", "nobody", "--wait"],
    )
    .await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stdout).contains("nobody\tnot_found"));
    // Without --wait: the job id, at once.
    let started = cli(&service, &["--client-id", "2155", "--all"]).await;
    assert_eq!(started.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&started.stdout).trim().len(), 32);
    // No selection is a usage error.
    let usage = cli(&service, &["--client-id", "2155"]).await;
    assert_eq!(usage.status.code(), Some(64));
    service.stop().await;

    // Keys Gameball refuses stop the job early: exit 2, naming the reason.
    let stand_in = GameballStandIn::start().await;
    let service = start(
        Config::for_tests(common::SECRET),
        dir.path(),
        &stand_in,
        "revoked",
    )
    .await;
    let refused = cli(
        &service,
        &["--client-id", "2155", "--customer-id", "jo", "--wait"],
    )
    .await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unauthorized"));
    service.stop().await;
}

/// What Gameball wrote reached the operator's terminal as written: an escape sequence in a
/// failure's detail cleared or recoloured it, a newline or a tab forged lines of the listing
/// (found by an adversarial run). It is printed escaped.
#[tokio::test(flavor = "multi_thread")]
async fn gameballs_words_reach_the_terminal_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("jo")]);
    let said = "bad \u{1b}[2J\u{1b}[31mred\nforged\tline";
    stand_in.fail_next_saying(Api::Details, &[400], said);
    let service = in_memory(dir.path(), &stand_in).await;
    let args = ["--client-id", "2155", "--customer-id", "jo", "--wait"];
    let done = cli(&service, &args).await;
    let printed = String::from_utf8(done.stdout).unwrap();
    assert_eq!(done.status.code(), Some(1), "{printed}");
    assert!(!printed.contains('\u{1b}'), "{printed:?}");
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2, "the summary and one failure: {printed:?}");
    assert!(lines[1].starts_with("jo\t"), "{printed:?}");
    assert!(
        lines[1].contains(r"bad \u{1b}[2J\u{1b}[31mred\nforged\tline"),
        "{printed:?}"
    );

    // The job's error, in the message the CLI ends with (a newline there still forged a line;
    // a bidi override reordered it: a second adversarial run).
    let said = "Secret Key Required\nprofile-state: FORGED \u{202e}desrever";
    stand_in.fail_next_saying(Api::Details, &[401], said);
    let stopped = cli(&service, &args).await;
    let stderr = String::from_utf8(stopped.stderr).unwrap();
    assert_eq!(stopped.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(r"Secret Key Required\nprofile-state: FORGED \u{202e}desrever"),
        "{stderr:?}"
    );
    assert!(
        !stderr
            .lines()
            .any(|line| line.starts_with("profile-state: FORGED"))
    );
    service.stop().await;
}

/// A TCP forwarder to `upstream`, as `kubectl port-forward` or a TCP load balancer: when the
/// upstream goes away it closes the client's connection, and closes new ones at once.
async fn tcp_forwarder(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    address
}

/// A TCP forwarder to `upstream` that can be made to hang, as a server stopped by SIGSTOP or
/// a network path that drops every packet: once `hung` is set, what either side sends is read
/// and dropped, and the connections stay open.
async fn hanging_forwarder(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pass(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        hung: Arc<AtomicBool>,
    ) {
        let mut buffer = vec![0; 16 * 1024];
        while let Ok(read @ 1..) = from.read(&mut buffer).await {
            if !hung.load(Ordering::SeqCst) && to.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let hung = Arc::new(AtomicBool::new(false));
    let switch = Arc::clone(&hung);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let ((client_read, client_write), (server_read, server_write)) =
                (client.into_split(), server.into_split());
            tokio::spawn(pass(client_read, server_write, Arc::clone(&hung)));
            tokio::spawn(pass(server_read, client_write, Arc::clone(&hung)));
        }
    });
    (address, switch)
}

/// Starts `reconcile --wait` (with `extra` arguments) of customer `jo` through `grpc`, and
/// returns once its job asked Gameball for the customer: the command's output, once it ends.
async fn wait_for_a_running_job(
    grpc: &str,
    extra: &[&str],
    stand_in: &GameballStandIn,
) -> tokio::task::JoinHandle<std::process::Output> {
    let args = ["reconcile", "--grpc", grpc, "--client-id", "2155"];
    let wait = ["--customer-id", "jo", "--wait"];
    let mut command = common::binary::bare_command(&[&args[..], extra, &wait[..]].concat());
    let waiting = tokio::task::spawn_blocking(move || command.output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while stand_in.count(Api::Details) == 0 {
        assert!(Instant::now() < deadline, "the job never asked Gameball");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waiting
}

/// A server that hangs (SIGSTOP, a dead network path) while `reconcile --wait` follows its
/// job: each poll runs out its `--timeout` in this client's transport, which counts as the
/// server unreachable, so after 5 s of those the job is reported stopped early (exit 2), not
/// as a failed connection (an adversarial run could not tell which; now pinned).
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_wait_says_the_job_ended_when_its_server_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("jo")]);
    stand_in.slow(Api::Details, Duration::from_secs(60));
    let service = in_memory(dir.path(), &stand_in).await;
    let (grpc, hung) = hanging_forwarder(service.grpc).await;
    let grpc = grpc.to_string();
    let waiting = wait_for_a_running_job(&grpc, &["--timeout", "1s"], &stand_in).await;
    // Polled a few times (each second) while nothing moves: the time is what is tested.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    hung.store(true, Ordering::SeqCst);
    let waited = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("--wait gives up on a hung server")
        .unwrap();
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert_eq!(waited.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("stopped early: the server has been unreachable for")
            && stderr.contains("Timeout expired"),
        "{stderr}"
    );
    // Progress is shown when it moves, not the same line every second (a fresh-eyes run).
    assert_eq!(stderr.matches("0 of 1 done").count(), 1, "{stderr}");
    service.stop().await;
}

/// A server that stopped while `reconcile --wait` followed its job was reported as a failed
/// connection (exit 1, "is the server running?"), though the job had ended with it (found by
/// an adversarial run): it is a job stopped early, exit 2, saying so; the same behind a TCP
/// forwarder, where the poll fails in the transport rather than as UNAVAILABLE (found by the
/// next adversarial run).
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_wait_says_the_job_ended_when_its_server_stops() {
    for forwarded in [false, true] {
        wait_for_a_job_whose_server_stops(forwarded).await;
    }
}

async fn wait_for_a_job_whose_server_stops(forwarded: bool) {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("jo")]);
    stand_in.slow(Api::Details, Duration::from_secs(60));
    // The port this service frees when it stops could be bound at once by another test's
    // server on 127.0.0.1 (CI once answered this job's poll with an HTTP 404 from one): on an
    // address of its own, what its client meets once it has stopped is always nothing.
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_listen = ([127, 0, 0, 77], 0).into();
    let service = start(config, dir.path(), &stand_in, API_KEY).await;
    let grpc = match forwarded {
        false => service.grpc.to_string(),
        true => tcp_forwarder(service.grpc).await.to_string(),
    };
    let waiting = wait_for_a_running_job(&grpc, &[], &stand_in).await;
    service.stop().await;
    let waited = waiting.await.unwrap();
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert_eq!(
        waited.status.code(),
        Some(2),
        "forwarded {forwarded}: {stderr}"
    );
    // Either a poll caught the job cancelled by the shutdown, or the server was gone by then.
    assert!(
        stderr.contains("stopped early: the server has been unreachable for 5s")
            || stderr.contains("stopped early: server shutting down"),
        "forwarded {forwarded}: {stderr}"
    );
}

#[tokio::test]
async fn a_schedule_for_an_account_without_api_settings_is_refused_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let mut config = Config::for_tests(common::SECRET);
    config.webhook_secrets_file = Some(secrets_file(dir.path(), &stand_in, API_KEY));
    config.reconcile.every =
        vec![profile_state::config::ReconcileEvery::parse("9999=24h").unwrap()];
    let error = Server::bind(config.clone()).await.err().expect("refused");
    assert!(
        error.is::<profile_state::server::BadConfiguration>(),
        "exit 64: {error:#}"
    );
    assert!(
        format!("{error:#}").contains("--reconcile-every 9999"),
        "{error:#}"
    );
    // The account that has settings is accepted.
    config.reconcile.every =
        vec![profile_state::config::ReconcileEvery::parse("2155=24h").unwrap()];
    TestService::serve(Server::bind(config).await.unwrap())
        .stop()
        .await;
}

/// `--reconcile-every`'s loop, end to end: the schedule (here every 300 ms: the flag refuses
/// under an hour, the configuration field does not) starts jobs on its own, which heal a
/// profile whose webhook was lost once it is older than the period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_heals_a_lost_webhook_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let mut jo = Customer::new("jo");
    let mut config = Config::for_tests(common::SECRET);
    config.reconcile.every = vec![profile_state::config::ReconcileEvery {
        client_id: "2155".into(),
        period: Duration::from_millis(300),
    }];
    let before_start = unix_now();
    let service = start(config, dir.path(), &stand_in, API_KEY).await;
    let last_success = |metrics: &str| {
        metric(
            metrics,
            "profile_state_reconcile_schedule_last_success_timestamp_seconds{client_id=\"2155\"}",
        )
    };
    let succeeded = "profile_state_reconcile_jobs_total{result=\"succeeded\"}";
    let (_, metrics) = service.admin_get("/metrics").await;
    let started = metric(
        &metrics,
        "profile_state_reconcile_schedule_started_timestamp_seconds{client_id=\"2155\"}",
    );
    let succeeded_before = metric(&metrics, succeeded);
    assert!(
        started >= before_start && started <= unix_now(),
        "{started}"
    );
    assert_eq!(
        metric(
            &metrics,
            "profile_state_reconcile_schedule_period_seconds{client_id=\"2155\"}"
        ),
        0.3
    );
    service.update(&webhook_of(&jo, &ago(5))).await;
    jo.available_points += 500;
    stand_in.add([jo.clone()]);

    let deadline = Instant::now() + Duration::from_secs(20);
    while api_fields(&profile(&service, "jo").await) != expected(&jo) {
        assert!(
            Instant::now() < deadline,
            "no scheduled job healed the profile"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The healing job has ended once its metrics count it (a job of the first slot may have
    // run before the first scrape: only a later one counts here).
    let metrics = loop {
        let (_, metrics) = service.admin_get("/metrics").await;
        if metric(&metrics, succeeded) > succeeded_before {
            break metrics;
        }
        assert!(Instant::now() < deadline, "no scheduled job ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        last_success(&metrics) > started,
        "a scheduled success moves it on"
    );
    assert!(
        metric(
            &metrics,
            "profile_state_reconcile_drift_total{field=\"activated_points\"}"
        ) >= 1.0
    );
    service.stop().await;
}

/// A schedule whose jobs stop early (here Gameball refuses the account's keys) keeps its last
/// success where it was: `ProfileStateReconcileScheduleLate` fires 2.5 periods on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_whose_jobs_fail_does_not_move_its_last_success() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let jo = Customer::new("jo");
    stand_in.add([jo.clone()]);
    let mut config = Config::for_tests(common::SECRET);
    config.reconcile.every = vec![profile_state::config::ReconcileEvery {
        client_id: "2155".into(),
        period: Duration::from_millis(300),
    }];
    let service = start(config, dir.path(), &stand_in, "revoked-key").await;
    let last_success = scheduled_success_of_2155;
    // A profile older than the period, so each run from now on asks Gameball and is refused
    // (a run before it selected nothing, and ran to its end).
    service.update(&webhook_of(&jo, &ago(5))).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let when_failed = |count: f64| {
        let service = &service;
        async move {
            loop {
                let (_, metrics) = service.admin_get("/metrics").await;
                let failed = "profile_state_reconcile_jobs_total{result=\"failed\"}";
                if metric(&metrics, failed) >= count {
                    return metrics;
                }
                assert!(Instant::now() < deadline, "fewer than {count} jobs failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Absent, or the end of a job before the webhook: failed jobs leave it as it was.
    let after_first = last_success(&when_failed(1.0).await);
    let after_third = last_success(&when_failed(3.0).await);
    assert_eq!(after_third, after_first);
    service.stop().await;
}

/// When a scheduled job of account 2155 last ran to its end, if one has (`metrics`' gauge).
fn scheduled_success_of_2155(metrics: &str) -> Option<f64> {
    let series = "profile_state_reconcile_schedule_last_success_timestamp_seconds\
                  {client_id=\"2155\"}";
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .map(|value| value.trim().parse::<f64>().unwrap())
}

/// The wall clock as Unix time in seconds, as the metrics give it.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A balance inquiry Gameball refused was logged with Gameball's message, which may quote the
/// request: customer ids, e-mails, mobile numbers (and a newline in it forged a line; found by
/// an adversarial run). The warning says what failed, not what Gameball wrote.
#[tokio::test(flavor = "multi_thread")]
async fn gameballs_words_stay_out_of_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let ids: Vec<String> = (1..=30).map(|n| format!("quoted-{n}")).collect();
    stand_in.add(ids.iter().map(|id| Customer::new(id)));
    let quoted = "customerId quoted-1 (email jane.doe@example.com, mobile +201001234567) \
                  is invalid\nFORGED line";
    stand_in.fail_next_saying(Api::BalanceInquiry, &[400], quoted);
    let secrets = secrets_file(dir.path(), &stand_in, API_KEY);
    let args = ["--webhook-secrets-file", secrets.to_str().unwrap()];
    let server = Binary::start(&dir.path().join("data"), &args).await;
    let grpc = server.grpc.to_string();
    let mut reconcile = vec![
        "reconcile",
        "--grpc",
        &grpc,
        "--client-id",
        "2155",
        "--wait",
    ];
    for id in &ids {
        reconcile.extend(["--customer-id", id]);
    }
    let mut command = common::binary::bare_command(&reconcile);
    let done = tokio::task::spawn_blocking(move || command.output().unwrap());
    let done = done.await.unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let lines = server.stop_collecting();
    let warned = lines
        .iter()
        .find(|line| line["message"] == "balance inquiry not created; asking one by one")
        .unwrap_or_else(|| panic!("the refused inquiry is warned of: {lines:#?}"));
    assert_eq!(
        warned["detail"],
        "gameball balance_inquiry rejected (http 400, code 5000)"
    );
    for line in &lines {
        let text = line.to_string();
        for said in ["example.com", "+2010", "quoted-", "FORGED"] {
            assert!(!text.contains(said), "{said} in {text}");
        }
    }
}

/// A 403 from the balance inquiry (a key without permission for batches) was taken as the
/// account's keys refused: every job of 25 customers or more failed, every customer "not
/// attempted" (found by an adversarial run). Its customers are asked one by one instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_balance_inquiry_forbidden_alone_does_not_stop_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let ids: Vec<String> = (1..=30).map(|n| format!("c{n}")).collect();
    stand_in.add(ids.iter().map(|id| Customer::new(id)));
    stand_in.fail_next_saying(Api::BalanceInquiry, &[403], "Forbidden for batches.");
    let service = in_memory(dir.path(), &stand_in).await;
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let outcome = reconciled(&service, &ids).await;
    assert_eq!(outcome["state"], "succeeded", "{outcome}");
    assert_eq!(outcome["changed"].as_u64(), Some(30), "{outcome}");
    service.stop().await;
}

/// A 429 asking to wait longer than the client waits (an hour) failed that customer and the job
/// sent every other customer into the same refusal at once (found by an adversarial run). The
/// job stops, saying how long Gameball asked for, and starts no new customer.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_retry_after_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let ids: Vec<String> = (1..=60).map(|n| format!("w{n}")).collect();
    stand_in.add(ids.iter().map(|id| Customer::new(id)));
    let service = in_memory(dir.path(), &stand_in).await;
    stand_in.storm(Duration::from_secs(60), Some(3600));
    let mut args = vec!["--client-id", "2155", "--wait"];
    for id in &ids[..20] {
        args.extend(["--customer-id", id]);
    }
    let done = cli(&service, &args).await;
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_ne!(done.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("gameball asked to wait 3600 s"), "{stderr}");
    let sent = stand_in.seen().len();
    assert!(
        sent < 20,
        "{sent} requests for 20 customers after the first asked to wait"
    );
    service.stop().await;
}

/// The balance inquiry is a shortcut in a bucket of its own: a 429 there asking to wait an hour
/// stopped the whole job, though its customers could be read one by one in theirs (found by an
/// adversarial run). They are, and the job goes on without batches.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_wait_asked_for_batches_alone_does_not_stop_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let ids: Vec<String> = (1..=60).map(|n| format!("b{n}")).collect();
    stand_in.add(ids.iter().map(|id| Customer::new(id)));
    // One request of the bucket an hour: the inquiry goes, its status is refused for an hour.
    stand_in.set_limits(Bucket::Others, &[(1, Duration::from_secs(3600))]);
    stand_in.send_retry_after(true);
    let service = in_memory(dir.path(), &stand_in).await;
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let outcome = reconciled(&service, &ids).await;
    assert_eq!(outcome["changed"].as_u64(), Some(60), "{outcome}");
    let batches = stand_in.count(Api::BalanceInquiry) + stand_in.count(Api::BatchStatus);
    assert!(
        batches <= 3,
        "{batches} batch requests after the first refusal"
    );
    service.stop().await;
}

/// A customer id given several times was fetched each time (its calls on the account's quota
/// again) and counted each time (found by an adversarial run): once now.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_customer_id_is_fetched_once() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("jo"), Customer::new("al")]);
    let service = in_memory(dir.path(), &stand_in).await;
    let outcome = reconciled(&service, &["jo", "al", "jo", "jo"]).await;
    assert_eq!(outcome["total"].as_u64(), Some(2), "{outcome}");
    assert_eq!(outcome["changed"].as_u64(), Some(2), "{outcome}");
    let jo = stand_in
        .seen()
        .iter()
        .filter(|seen| seen.customers == ["jo"])
        .count();
    let al = stand_in
        .seen()
        .iter()
        .filter(|seen| seen.customers == ["al"])
        .count();
    assert_eq!(jo, al, "jo asked for as often as al");
    service.stop().await;
}

/// Nothing said when a schedule would first run, and one account given twice ran two
/// schedules (found by an adversarial run): start-up logs each schedule with its period and
/// first run, and refuses an account given twice (exit 64, naming it).
#[tokio::test(flavor = "multi_thread")]
async fn schedules_are_logged_at_start_up_and_an_account_given_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let secrets = secrets_file(dir.path(), &stand_in, API_KEY);
    let secrets = secrets.to_str().unwrap();
    let schedule = ["--webhook-secrets-file", secrets, "--reconcile-every"];
    let server = Binary::start(
        &dir.path().join("a"),
        &[&schedule[..], &["2155=24h"]].concat(),
    )
    .await;
    // Logged as the schedule starts, before the "listening" line Binary::start waited for.
    let line = server
        .seen
        .iter()
        .find(|line| line["message"] == "reconcile schedule started")
        .cloned()
        .unwrap_or_else(|| panic!("no schedule line: {:?}", server.seen));
    assert_eq!(
        (&line["client_id"], &line["period"]),
        (&json!("2155"), &json!("1day"))
    );
    let first = humantime::parse_duration(line["first_run_in"].as_str().unwrap()).unwrap();
    assert!(first <= Duration::from_secs(24 * 3600), "{line}");
    // At the start of the next day of wall-clock time, whenever the server started: the first
    // run used to come a random delay after each start, so a server restarted more often than
    // its period might never run (found by an adversarial run).
    let at = line["first_run_at"].as_str().unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(at).unwrap().to_utc();
    let midnight = (Utc::now() + chrono::Duration::days(1)).date_naive();
    assert_eq!(
        at,
        midnight.and_hms_opt(0, 0, 0).unwrap().and_utc(),
        "{line}"
    );
    let until = (at - Utc::now()).to_std().unwrap();
    assert!(until.abs_diff(first) < Duration::from_secs(5), "{line}");
    server.stop();

    let twice = [&schedule[..], &["2155=24h,2155=2h"]].concat();
    let refused = common::binary::refused(&dir.path().join("b"), &twice).await;
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("client_id \"2155\" is given twice (1day and 2h)"),
        "{stderr}"
    );
}

/// A SIGHUP, even one that changed nothing, built the account's client anew, with new rate
/// limiters: a pause a 429 had asked for was forgotten, and the next job called at once
/// (found by an adversarial run). The limiters outlive the reload.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_the_pause_gameball_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("jo")]);
    let secrets = secrets_file(dir.path(), &stand_in, API_KEY);
    let args = ["--webhook-secrets-file", secrets.to_str().unwrap()];
    let mut server = Binary::start(&dir.path().join("data"), &args).await;
    let mut admin = AdminServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let start = || pb::ReconcileProfilesRequest {
        client_id: "2155".into(),
        selection: Some(ids(&["jo"])),
    };
    // A 429 asking for 4 s: the job waits it out, and is cancelled meanwhile.
    stand_in.storm(Duration::from_millis(500), Some(4));
    let first = admin
        .reconcile_profiles(start())
        .await
        .unwrap()
        .into_inner();
    // Cancelled once the job has taken the pause (counted as it starts), not merely once the
    // stand-in has answered 429: a job cancelled before it read that answer never paused, and
    // a loaded machine got there first (the next job then called at once).
    let paused = "profile_state_reconcile_rate_limited_seconds_total{bucket=\"customers_get\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&server.metrics().await, paused) == 0.0 {
        assert!(Instant::now() < deadline, "no pause taken");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The pause runs from the 429's answer: the stand-in's clock, not when this test saw it.
    let answered_429 = stand_in.seen().into_iter().find(|seen| seen.status == 429);
    let paused_at = answered_429.expect("a 429").at;
    let cancel = pb::CancelReconcileJobRequest {
        job_id: first.job_id,
    };
    admin.cancel_reconcile_job(cancel).await.unwrap();
    server.signal("HUP");
    server.wait_for("webhook secrets reloaded").await;

    let before = stand_in.seen().len();
    let second = admin
        .reconcile_profiles(start())
        .await
        .unwrap()
        .into_inner();
    let job = wait(&mut admin, &second.job_id).await;
    assert_eq!(job.state(), pb::ReconcileJobState::Succeeded, "{job:?}");
    let next = stand_in.seen()[before].at;
    assert!(
        next >= paused_at + Duration::from_millis(3500),
        "the next job called {:?} into a 4 s pause",
        next - paused_at
    );
    server.stop();
}

/// A SIGHUP that reloads a secrets file without a scheduled account's API settings was taken
/// without a word, though start-up refuses that file (found by an adversarial run): the
/// reload stands (its webhook secrets may be a rotation), with a warning naming the account.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_without_a_scheduled_accounts_settings_is_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let secrets = secrets_file(dir.path(), &stand_in, API_KEY);
    let args = [
        "--webhook-secrets-file",
        secrets.to_str().unwrap(),
        "--reconcile-every",
        "2155=24h",
    ];
    let mut server = Binary::start(&dir.path().join("data"), &args).await;
    std::fs::write(&secrets, "").unwrap();
    server.signal("HUP");
    server.wait_for("webhook secrets reloaded").await;
    let warning = server
        .wait_for(
            "the reloaded --webhook-secrets-file has no [gameball_api.\"2155\"] settings, which \
             its --reconcile-every schedule needs: its runs fail until they are back",
        )
        .await;
    assert_eq!(
        (&warning["level"], &warning["client_id"]),
        (&json!("WARN"), &json!("2155"))
    );
    server.stop();
}

/// A SIGHUP without a secrets file said "webhook secrets reloaded" of secrets that come from
/// the flags alone (found by a fresh-eyes run): it says there is no file to reload.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_without_a_secrets_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(&dir.path().join("data"), &[]).await;
    server.signal("HUP");
    let said = server
        .wait_for("SIGHUP: there is no --webhook-secrets-file to reload")
        .await;
    assert_eq!(said["level"], "INFO");
    server.stop();
}

/// A service with `--reconcile-max-jobs 1`, API settings for `accounts` (all on the
/// stand-in) and a schedule of `period` seconds for each of `scheduled`.
async fn one_job_at_a_time(
    dir: &Path,
    stand_in: &GameballStandIn,
    accounts: &[&str],
    scheduled: &[&str],
    period: f64,
) -> TestService {
    let secrets = secrets_file_for(dir, stand_in, API_KEY, accounts);
    let mut config = Config::for_tests(common::SECRET);
    config.webhook_secrets_file = Some(secrets);
    config.reconcile.every = scheduled
        .iter()
        .map(|client_id| profile_state::config::ReconcileEvery {
            client_id: (*client_id).into(),
            period: Duration::from_secs_f64(period),
        })
        .collect();
    let server = Server::bind(config).await.expect("service binds");
    let options = ReconcileOptions {
        max_jobs: 1,
        ..quick()
    };
    TestService::serve(server.with_reconcile_options(options))
}

/// Takes the one job place (`--reconcile-max-jobs 1`) with a job of `holder` whose customer
/// Gameball never answers (`held`), before a slot of `period` seconds starts; the job's id and
/// that slot's start (Unix seconds): the first slot to start once the holder has the place.
async fn take_the_place_before_a_slot(
    admin: &mut AdminServiceClient<Channel>,
    holder: &str,
    period: f64,
) -> (String, f64) {
    let next_slot_after = |at: f64| (at / period).floor() * period + period;
    // A slot that started a moment ago (since the server did) may still run its scheduled
    // jobs, which select nothing and end at once, one after the other: until the last has
    // ended the place is taken, and the holder is refused. So it asks until it has the place,
    // rather than trusting that a slot is far enough away (a second was the margin, and no
    // margin covered a slot that had just started).
    let deadline = Instant::now() + Duration::from_secs(10);
    let holding = loop {
        let request = pb::ReconcileProfilesRequest {
            client_id: holder.into(),
            selection: Some(ids(&["held"])),
        };
        match admin.reconcile_profiles(request).await {
            Ok(holding) => break holding.into_inner(),
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    Instant::now() < deadline,
                    "the place stays taken: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    (holding.job_id, next_slot_after(unix_now()))
}

/// Schedules of one period fall due at the same instants: with more accounts than
/// `--reconcile-max-jobs`, those that found no room were skipped until the next slot, where the
/// same race left the same ones out again. A slot that finds the cap taken now waits for a job
/// to end, and runs within its own period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_past_the_job_cap_waits_for_room_within_its_slot() {
    const PERIOD: f64 = 3.0;
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    // Account 2156's job takes the one job slot: Gameball never answers for its customer.
    stand_in.add([Customer::new("held")]);
    stand_in.slow(Api::Details, Duration::from_secs(3600));
    let service =
        one_job_at_a_time(dir.path(), &stand_in, &["2155", "2156"], &["2155"], PERIOD).await;
    let mut admin = admin(&service).await;
    let (holding, blocked_slot) = take_the_place_before_a_slot(&mut admin, "2156", PERIOD).await;
    // Half a second into the slot: its job found the cap taken.
    tokio::time::sleep(Duration::from_secs_f64(blocked_slot + 0.5 - unix_now())).await;
    let last_success = scheduled_success_of_2155;
    let (_, metrics) = service.admin_get("/metrics").await;
    assert!(
        last_success(&metrics).is_none_or(|at| at < blocked_slot),
        "2155's job ran beside 2156's: {metrics}"
    );

    let cancel = pb::CancelReconcileJobRequest { job_id: holding };
    // The waiting job may start, and end, before the cancel is answered.
    let room_at = unix_now();
    admin.cancel_reconcile_job(cancel).await.unwrap();
    let metrics = service
        .metrics_until(|metrics| last_success(metrics).is_some_and(|at| at >= room_at))
        .await;
    let ran_at = last_success(&metrics).unwrap();
    assert!(
        ran_at < blocked_slot + PERIOD,
        "the slot at {blocked_slot} did not run in its period (room at {room_at}, ran at \
         {ran_at})"
    );
    service.stop().await;
}

/// A job asked for while the server stops is refused UNAVAILABLE, saying so: it would be
/// cancelled at once. (Scheduled ones too: shutdown ended the running jobs, and each end let a
/// waiting schedule start one after the server had begun to stop; an adversarial run.) Here a
/// watcher that reads nothing holds the stop open while the call is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_starts_once_the_server_stops() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    let mut config = Config::for_tests(common::SECRET);
    config.shutdown_grace = Duration::from_secs(3);
    let service = start(config, dir.path(), &stand_in, API_KEY).await;
    let mut admin = admin(&service).await;
    let _never_reads = crate::limits::small_window_watch(service.grpc).await;
    crate::limits::post_many(service.webhook, "c", crate::limits::WEBHOOKS, 32).await;
    let readyz = format!("http://{}/readyz", service.admin);
    let stopped = tokio::spawn(service.stop_within(Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while reqwest::get(&readyz).await.unwrap().status() != 503 {
        assert!(
            Instant::now() < deadline,
            "the server did not begin to stop"
        );
        tokio::task::yield_now().await;
    }
    let request = pb::ReconcileProfilesRequest {
        client_id: "2155".into(),
        selection: Some(ids(&["c1"])),
    };
    let refused = admin.reconcile_profiles(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("stopping"), "{refused:?}");
    stopped.await.unwrap();
}

/// Shutdown cancels the running jobs, and each end let a waiting schedule start its job after
/// the server had begun to stop (an adversarial run: up to all seven waiting, in 7 of 8
/// stops). Nothing starts once the server stops.
#[tokio::test(flavor = "current_thread")]
async fn schedules_waiting_for_room_start_nothing_once_the_server_stops() {
    const PERIOD: f64 = 2.0;
    let (logs, _capture) = common::CapturedLogs::on_this_thread(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let stand_in = GameballStandIn::start().await;
    stand_in.add([Customer::new("held")]);
    stand_in.slow(Api::Details, Duration::from_secs(3600));
    let scheduled = ["2155", "2156", "2157"];
    let accounts = ["2155", "2156", "2157", "2199"];
    let service = one_job_at_a_time(dir.path(), &stand_in, &accounts, &scheduled, PERIOD).await;
    let mut admin = admin(&service).await;
    let (_, blocked_slot) = take_the_place_before_a_slot(&mut admin, "2199", PERIOD).await;
    // The three schedules of that slot wait, each line naming the slot. Counted by the slot's
    // name, not as every wait since the place was taken: a slot that started while the holder
    // was being answered, or one whose ticks a loaded machine ran late, waits too, and its
    // lines came on top of the three. (Nor a sleep until the slot starts first: computed just
    // as the slot began, its length was negative, a panic.)
    let slot = chrono::DateTime::from_timestamp(blocked_slot as i64, 0)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Secs, true);
    let waits_in_the_slot = |logs: &str| {
        logs.lines()
            .filter(|line| line.contains("scheduled reconcile waits") && line.contains(&slot))
            .count()
    };
    let until_the_slot = Duration::from_secs_f64((blocked_slot - unix_now()).max(0.0));
    let deadline = Instant::now() + until_the_slot + Duration::from_secs(10);
    let waiting = loop {
        let waiting = logs.text();
        if waits_in_the_slot(&waiting) == 3 {
            break waiting;
        }
        assert!(Instant::now() < deadline, "{slot}: {waiting}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    service.stop().await;
    let after = logs.text().split_off(waiting.len());
    assert!(after.contains("reconcile job finished"), "{after}");
    assert!(!after.contains("scheduled reconcile started"), "{after}");
}
