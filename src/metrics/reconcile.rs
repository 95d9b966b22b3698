//! The reconciler's metrics (`profile_state_reconcile_*`, issue 15): what Gameball's API cost,
//! what the jobs found and how they ended, and when each `--reconcile-every` schedule last
//! ran to its end. Every series of a fixed label set exists from the first scrape: endpoints,
//! statuses, outcomes, reasons and fields are fixed sets. No account or customer in any label,
//! except the schedules' gauges: a series per schedule (its last success only once one of its
//! jobs ran to its end), whose `client_id` is an account `--reconcile-every` names, a set the
//! operator fixes; a schedule that stopped running is per account, which no other label could
//! tell.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{CounterVec, GaugeVec, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use super::{Metrics, counter_vec, counter_vec_at_zero, gauge, histogram_vec, register};
use crate::profile::Field;
use crate::reconcile::client::{RequestObserver, STATUS_LABELS};
use crate::reconcile::jobs::{NOT_RECORDED, UPDATE_REFUSED};
use crate::reconcile::{Endpoint, FailureReason};

/// Every outcome of `profile_state_reconcile_profiles_total`.
pub const PROFILE_OUTCOMES: [&str; 4] = ["changed", "unchanged", "failed", "not_attempted"];
/// Every result of `profile_state_reconcile_jobs_total`.
pub const JOB_RESULTS: [&str; 3] = ["succeeded", "failed", "cancelled"];
/// Every bucket of `profile_state_reconcile_rate_limited_seconds_total`.
pub const BUCKETS: [&str; 2] = ["customers_get", "others"];

pub(super) struct ReconcileMetrics {
    requests: IntCounterVec,
    request_duration: HistogramVec,
    profiles: IntCounterVec,
    failures: IntCounterVec,
    drift: IntCounterVec,
    jobs: IntCounterVec,
    jobs_running: IntGauge,
    rate_limited: CounterVec,
    schedule_started: GaugeVec,
    schedule_last_success: GaugeVec,
    schedule_period: GaugeVec,
}

/// The fields reconciliation can correct: every modeled field but `gb_customer_id`, which the
/// API does not give.
fn drift_fields() -> impl Iterator<Item = Field> {
    Field::ALL
        .into_iter()
        .filter(|field| *field != Field::GbCustomerId)
}

/// The cost of Gameball's API: every attempt by endpoint and status, and its duration by
/// endpoint.
fn request_metrics(r: &Registry) -> (IntCounterVec, HistogramVec) {
    let requests = counter_vec(
        r,
        "profile_state_reconcile_requests_total",
        "Requests to Gameball's API, every attempt (retries included): the reconciler's \
         cost. By endpoint and status (200, 401, 403, 404, 429, 4xx, 5xx, timeout, \
         unreachable, other).",
        &["endpoint", "status"],
    );
    let request_duration = histogram_vec(
        r,
        "profile_state_reconcile_request_duration_seconds",
        "Time of one attempt at Gameball's API, by endpoint.",
        &["endpoint"],
    );
    for endpoint in Endpoint::ALL {
        for status in STATUS_LABELS {
            requests.with_label_values(&[endpoint.as_str(), status]);
        }
        request_duration.with_label_values(&[endpoint.as_str()]);
    }
    (requests, request_duration)
}

impl ReconcileMetrics {
    pub(super) fn new(r: &Registry) -> ReconcileMetrics {
        let (requests, request_duration) = request_metrics(r);
        let profiles = counter_vec_at_zero(
            r,
            "profile_state_reconcile_profiles_total",
            "Customers reconciled, by outcome: changed (the API corrected the profile), \
             unchanged, failed, not_attempted (the job stopped first).",
            "outcome",
            PROFILE_OUTCOMES,
        );
        let failures = counter_vec_at_zero(
            r,
            "profile_state_reconcile_failures_total",
            "Customers that could not be reconciled, by reason.",
            "reason",
            FailureReason::ALL
                .iter()
                .map(|reason| reason.as_str())
                .chain([NOT_RECORDED, UPDATE_REFUSED]),
        );
        let drift = counter_vec_at_zero(
            r,
            "profile_state_reconcile_drift_total",
            "Fields a reconciliation found wrong and corrected, by field: above zero means \
             webhooks were lost.",
            "field",
            drift_fields().map(|field| field.name()),
        );
        let jobs = counter_vec_at_zero(
            r,
            "profile_state_reconcile_jobs_total",
            "Reconcile jobs finished, by result (succeeded, failed, cancelled).",
            "result",
            JOB_RESULTS,
        );
        let rate_limited = CounterVec::new(
            Opts::new(
                "profile_state_reconcile_rate_limited_seconds_total",
                "Seconds a rate bucket of Gameball's API was paused by 429 answers, by bucket \
                 (customers_get, others).",
            ),
            &["bucket"],
        )
        .expect("valid metric");
        let rate_limited = register(r, rate_limited);
        for bucket in BUCKETS {
            rate_limited.with_label_values(&[bucket]);
        }
        let [schedule_started, schedule_last_success, schedule_period] = schedule_metrics(r);
        ReconcileMetrics {
            requests,
            request_duration,
            profiles,
            failures,
            drift,
            jobs,
            jobs_running: gauge(
                r,
                "profile_state_reconcile_jobs_running",
                "Reconcile jobs running now.",
            ),
            rate_limited,
            schedule_started,
            schedule_last_success,
            schedule_period,
        }
    }
}

/// When each schedule started on this server, when one of its jobs last ran to its end here,
/// and its period: what an alert needs to tell a schedule that stopped succeeding, through
/// restarts and across replicas, with Prometheus remembering the newest success (a restart
/// does not make it look recent: the last success is absent until this server has one).
fn schedule_metrics(r: &Registry) -> [GaugeVec; 3] {
    let gauge_vec = |name: &str, help: &str| {
        let gauge = GaugeVec::new(Opts::new(name, help), &["client_id"]).expect("valid metric");
        register(r, gauge)
    };
    [
        gauge_vec(
            "profile_state_reconcile_schedule_started_timestamp_seconds",
            "When this server started the account's --reconcile-every schedule (Unix time).",
        ),
        gauge_vec(
            "profile_state_reconcile_schedule_last_success_timestamp_seconds",
            "When a job of the account's --reconcile-every schedule last ran to its end on this \
             server (Unix time); absent until one has since the server started.",
        ),
        gauge_vec(
            "profile_state_reconcile_schedule_period_seconds",
            "The period of the account's --reconcile-every schedule.",
        ),
    ]
}

/// The wall clock as Unix time in seconds.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    fn reconcile(&self) -> &ReconcileMetrics {
        &self.inner.reconcile
    }

    /// Counts `count` customers of a job with `outcome` (one of [`PROFILE_OUTCOMES`]).
    pub fn reconcile_profiles(&self, outcome: &str, count: u64) {
        debug_assert!(PROFILE_OUTCOMES.contains(&outcome), "{outcome}");
        let profiles = &self.reconcile().profiles;
        profiles.with_label_values(&[outcome]).inc_by(count);
    }

    /// Counts a customer that failed, and why.
    pub fn reconcile_failure(&self, reason: &str) {
        self.reconcile_profiles("failed", 1);
        self.reconcile().failures.with_label_values(&[reason]).inc();
    }

    /// Counts a field a reconciliation corrected.
    pub fn reconcile_drift(&self, field: &str) {
        self.reconcile().drift.with_label_values(&[field]).inc();
    }

    /// Counts a job started (running).
    pub fn reconcile_job_started(&self) {
        self.reconcile().jobs_running.inc();
    }

    /// Counts a job finished with `result` (one of [`JOB_RESULTS`]).
    pub fn reconcile_job_finished(&self, result: &str) {
        debug_assert!(JOB_RESULTS.contains(&result), "{result}");
        let reconcile = self.reconcile();
        reconcile.jobs_running.dec();
        reconcile.jobs.with_label_values(&[result]).inc();
    }

    /// A `--reconcile-every` schedule started: its start and its period.
    pub fn reconcile_schedule_started(&self, client_id: &str, period: Duration) {
        let reconcile = self.reconcile();
        reconcile
            .schedule_started
            .with_label_values(&[client_id])
            .set(unix_now());
        reconcile
            .schedule_period
            .with_label_values(&[client_id])
            .set(period.as_secs_f64());
    }

    /// A job the schedule of `client_id` started ran to its end.
    pub fn reconcile_schedule_succeeded(&self, client_id: &str) {
        self.reconcile()
            .schedule_last_success
            .with_label_values(&[client_id])
            .set(unix_now());
    }
}

impl RequestObserver for Metrics {
    fn attempted(&self, endpoint: Endpoint, status: &'static str, seconds: f64) {
        let reconcile = self.reconcile();
        let endpoint = endpoint.as_str();
        reconcile
            .requests
            .with_label_values(&[endpoint, status])
            .inc();
        reconcile
            .request_duration
            .with_label_values(&[endpoint])
            .observe(seconds);
    }

    fn paused(&self, endpoint: Endpoint, seconds: f64) {
        let bucket = if endpoint.is_customers_get() {
            "customers_get"
        } else {
            "others"
        };
        let rate_limited = &self.reconcile().rate_limited;
        rate_limited.with_label_values(&[bucket]).inc_by(seconds);
    }
}
