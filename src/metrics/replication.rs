//! The replicated mode's metrics (`profile_state_replication_*`, issue 13): publishes to the
//! JetStream stream, how far this replica's applier is behind, snapshot uploads. All of them
//! exist, at zero, on a single node too. The gauges that mirror the replica's standing are read
//! at scrape time from `crate::replication::ReplicaStatus`. No customer data in any label.

use prometheus::{Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

use super::{Metrics, counter, counter_vec_at_zero, gauge, histogram, register};
use crate::replication::ReplicaStatus;

/// Why a publish to the stream failed (`profile_state_replication_publish_failures_total`).
pub const REPLICATION_PUBLISH_FAILURES: &[&str] = &[
    "unavailable",
    "unconfirmed",
    "refused",
    "too_large",
    "replaced",
];

/// What became of a snapshot upload (`profile_state_replication_snapshot_uploads_total`).
pub const REPLICATION_UPLOAD_OUTCOMES: &[&str] = &["uploaded", "failed"];

/// The `profile_state_replication_*` series: all zero on a single node.
pub(super) struct Replication {
    applied_sequence: IntGauge,
    stream_last_sequence: IntGauge,
    lag_messages: IntGauge,
    lag_seconds: Gauge,
    nats_connected: IntGauge,
    applier_stopped: IntGauge,
    publish: Histogram,
    apply_lag: Histogram,
    publish_failures: IntCounterVec,
    recorded_not_applied: IntCounter,
    duplicates: IntCounter,
    snapshot_uploads: IntCounterVec,
    name_taken: IntCounter,
}

impl Replication {
    pub(super) fn new(r: &Registry) -> Replication {
        let float_gauge =
            |name: &str, help: &str| register(r, Gauge::new(name, help).expect("valid metric"));
        Replication {
            applied_sequence: gauge(
                r,
                "profile_state_replication_applied_sequence",
                "The last stream sequence this replica applied.",
            ),
            stream_last_sequence: gauge(
                r,
                "profile_state_replication_stream_last_sequence",
                "The stream's last sequence, as this replica last saw it.",
            ),
            lag_messages: gauge(
                r,
                "profile_state_replication_lag_messages",
                "Stream messages this replica knows of and has not applied.",
            ),
            lag_seconds: float_gauge(
                "profile_state_replication_lag_seconds",
                "Time since this replica last knew it had applied the whole stream.",
            ),
            nats_connected: gauge(
                r,
                "profile_state_replication_nats_connected",
                "1 while this replica is connected to NATS.",
            ),
            applier_stopped: gauge(
                r,
                "profile_state_replication_applier_stopped",
                "1 once this replica stopped applying the stream (a hole or a malformed message).",
            ),
            publish: histogram(
                r,
                "profile_state_replication_publish_duration_seconds",
                "Time from publishing a batch to the stream to its acknowledgement.",
            ),
            apply_lag: histogram(
                r,
                "profile_state_replication_apply_lag_seconds",
                "Time from a message being stored in the stream to this replica applying it.",
            ),
            publish_failures: counter_vec_at_zero(
                r,
                "profile_state_replication_publish_failures_total",
                "Publishes to the stream that failed (their webhooks got 503), by reason \
                 (unavailable, unconfirmed, refused, replaced; too_large: an update whose \
                 message alone passes the stream's message cap, never published, its webhook \
                 answered 422 and kept as a dead letter).",
                "reason",
                REPLICATION_PUBLISH_FAILURES.iter().copied(),
            ),
            recorded_not_applied: counter(
                r,
                "profile_state_replication_recorded_not_applied_total",
                "Webhooks answered 503 although recorded in the stream, because this replica \
                 did not apply them within the webhook timeout.",
            ),
            duplicates: counter(
                r,
                "profile_state_replication_duplicate_publishes_total",
                "Publishes the stream dropped as repeats of an earlier message (same message id).",
            ),
            snapshot_uploads: counter_vec_at_zero(
                r,
                "profile_state_replication_snapshot_uploads_total",
                "Snapshots this replica published to the snapshot bucket, by outcome (uploaded, \
                 failed).",
                "outcome",
                REPLICATION_UPLOAD_OUTCOMES.iter().copied(),
            ),
            name_taken: counter(
                r,
                "profile_state_replication_name_taken_total",
                "Times this replica found the mark of its --replica-name written by another \
                 process: two processes run under one name (checked every 5 s).",
            ),
        }
    }

    /// Sets the gauges that mirror the replica's standing, at scrape time.
    pub(super) fn mirror(&self, replica: &ReplicaStatus) {
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let lag = replica.lag();
        self.applied_sequence
            .set(gauge(replica.position().sequence));
        self.stream_last_sequence.set(gauge(replica.stream_last()));
        self.lag_messages.set(gauge(lag.messages));
        self.lag_seconds.set(lag.seconds);
        self.nats_connected.set(i64::from(replica.nats_connected()));
    }
}

impl Metrics {
    /// Records a publish acknowledged after `seconds`; `duplicate` when the stream dropped it
    /// as a repeat.
    pub fn replication_published(&self, seconds: f64, duplicate: bool) {
        self.inner.replication.publish.observe(seconds);
        if duplicate {
            self.inner.replication.duplicates.inc();
        }
    }

    /// Counts a failed publish. `reason` is one of [`REPLICATION_PUBLISH_FAILURES`].
    pub fn replication_publish_failed(&self, reason: &str) {
        debug_assert!(REPLICATION_PUBLISH_FAILURES.contains(&reason), "{reason}");
        let failures = &self.inner.replication.publish_failures;
        failures.with_label_values(&[reason]).inc();
    }

    /// Counts a webhook answered 503 although recorded (not applied here in time).
    pub fn replication_recorded_not_applied(&self) {
        self.inner.replication.recorded_not_applied.inc();
    }

    /// Records a message applied `seconds` after the stream stored it.
    pub fn replication_applied(&self, seconds: f64) {
        self.inner.replication.apply_lag.observe(seconds);
    }

    /// Marks the applier stopped for good.
    pub fn replication_applier_failed(&self) {
        self.inner.replication.applier_stopped.set(1);
    }

    /// Counts a snapshot upload. `outcome` is one of [`REPLICATION_UPLOAD_OUTCOMES`].
    pub fn replication_snapshot_upload(&self, outcome: &str) {
        debug_assert!(REPLICATION_UPLOAD_OUTCOMES.contains(&outcome), "{outcome}");
        let uploads = &self.inner.replication.snapshot_uploads;
        uploads.with_label_values(&[outcome]).inc();
    }

    /// Counts another process found writing this replica's name mark.
    pub fn replication_name_taken(&self) {
        self.inner.replication.name_taken.inc();
    }
}
