//! Prometheus metrics: every metric the service exports, by name, in one place.
//!
//! One [`Metrics`] handle per server (no global registry, so several servers in one test
//! process count separately), cloned into whoever records. Three families of names:
//! - `profile_state_*`: the service's own, `profile_state_<subsystem>_<name>_<unit>`; counters
//!   end in `_total`, durations are `_seconds` histograms.
//! - `grpc_server_*`: per-RPC metrics with the names and labels of grpc-ecosystem's
//!   go-grpc-prometheus (`grpc_server_started_total`, `grpc_server_handled_total`,
//!   `grpc_server_handling_seconds`; labels `grpc_type`, `grpc_service`, `grpc_method`,
//!   `grpc_code`), so existing gRPC dashboards and alerts work. `grpc_code` holds the
//!   canonical code names of the gRPC specification (`OK`, `NOT_FOUND`, ...), see
//!   [`grpc_code_name`]. `crate::grpc::transport::MetricsLayer` records them.
//! - `process_*` (CPU, resident memory, open file descriptors, ...): the `prometheus` crate's
//!   process collector, Linux only.
//!
//! Every labelled series this module knows the labels of exists at zero from the first scrape
//! (webhook outcomes and statuses, reset reasons, each RPC with each code), so `rate()` and
//! alerts see the first event instead of a series appearing out of nothing. Labels never carry
//! customer ids, emails or other personal data: only outcomes, statuses, RPC names and codes,
//! and reasons from fixed sets. Gauges that mirror other state (profiles, revision, dead
//! letters, readiness) are read at scrape time from [`Readings`]. Serving `/metrics` is
//! `crate::monitoring`'s job, not this module's. The reconciler's metrics
//! (`profile_state_reconcile_*`) are in `reconcile`.

mod reconcile;

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, exponential_buckets,
};
use tonic::Code;

use crate::replication::ReplicaStatus;
use crate::store::Store;

/// Every `(outcome, HTTP status)` a webhook can be answered with, as the labels of
/// `profile_state_webhooks_total`. Each exists at zero from the start.
pub const WEBHOOK_ANSWERS: &[(&str, u16)] = &[
    ("applied", 200),
    ("unchanged", 200),
    ("ignored", 200),
    ("rejected", 400),
    ("rejected", 401),
    ("rejected", 408),
    ("rejected", 413),
    ("rejected", 415),
    ("rejected", 422),
    ("unavailable", 503),
];

/// Every reason a watcher can be reset for (`crate::watch::ResetKind::label`).
pub const WATCH_RESET_REASONS: &[&str] = &[
    "compacted_start",
    "fell_behind",
    "initial_state",
    "store_changed",
];

/// Every listener whose connections are counted, with the timeouts that can close them: the
/// `listener` and `timeout` labels of `profile_state_connections*`. Each exists at zero.
pub const LISTENER_TIMEOUTS: &[(&str, &[&str])] =
    &[("webhook", &["idle", "header"]), ("grpc", &["handshake"])];

/// Every limit a WatchProfiles call can be refused by: the `limit` label of
/// `profile_state_watch_streams_refused_total` (`--max-watch-streams`,
/// `--max-watch-streams-per-connection`).
pub const WATCH_STREAM_LIMITS: &[&str] = &["server", "connection"];
/// Why a publish to the stream failed (`profile_state_replication_publish_failures_total`).
pub const REPLICATION_PUBLISH_FAILURES: &[&str] = &["unavailable", "refused", "too_large"];

/// What became of a snapshot upload (`profile_state_replication_snapshot_uploads_total`).
pub const REPLICATION_UPLOAD_OUTCOMES: &[&str] = &["uploaded", "failed"];

/// The version label of `profile_state_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The revision label of `profile_state_build_info`: the source revision given to the build as
/// `PROFILE_STATE_REVISION` (the Dockerfile passes it as a build argument), else `unknown`.
pub const REVISION: &str = match option_env!("PROFILE_STATE_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

/// Every gRPC status code, in numeric order (`Code as usize` indexes it).
const GRPC_CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The canonical name of a gRPC status code, as the gRPC specification writes it
/// (`doc/statuscodes.md`) and the `grpc_code` label holds it: `OK`, `CANCELLED`, `NOT_FOUND`.
pub fn grpc_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The kind of an RPC, as the `grpc_type` label holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcType {
    /// One request, one response.
    Unary,
    /// A stream of requests, one response.
    ClientStream,
    /// One request, a stream of responses (WatchProfiles).
    ServerStream,
    /// Streams both ways.
    BidiStream,
}

impl GrpcType {
    /// The kind of an RPC from its descriptor's streaming flags.
    pub fn of(client_streaming: bool, server_streaming: bool) -> GrpcType {
        match (client_streaming, server_streaming) {
            (false, false) => GrpcType::Unary,
            (true, false) => GrpcType::ClientStream,
            (false, true) => GrpcType::ServerStream,
            (true, true) => GrpcType::BidiStream,
        }
    }

    /// The label value: `unary`, `client_stream`, `server_stream`, `bidi_stream`.
    pub fn label(self) -> &'static str {
        match self {
            GrpcType::Unary => "unary",
            GrpcType::ClientStream => "client_stream",
            GrpcType::ServerStream => "server_stream",
            GrpcType::BidiStream => "bidi_stream",
        }
    }
}

/// Handle to the metrics of one server. Cloning it is one reference-count increment.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// `WEBHOOK_ANSWERS[i]`'s counter and duration histogram, resolved once.
    webhook_answers: Vec<(IntCounter, Histogram)>,
    webhooks: IntCounterVec,
    webhook_duration: HistogramVec,
    signature_failures: IntCounter,
    dead_letters_kept: IntCounter,
    dead_letters: IntGauge,
    ready: IntGauge,
    profiles: IntGauge,
    store_revision: IntGauge,
    watch_streams: IntGauge,
    watch_events: IntCounter,
    watch_resets: IntCounterVec,
    watch_streams_refused: IntCounterVec,
    history_bytes: IntGauge,
    connections: IntGaugeVec,
    connections_refused: IntCounterVec,
    connections_timed_out: IntCounterVec,
    journal_fsync: Histogram,
    journal_bytes: IntCounter,
    journal_failures: IntCounter,
    grpc_started: IntCounterVec,
    grpc_handled: IntCounterVec,
    grpc_handling: HistogramVec,
    reconcile: reconcile::ReconcileMetrics,
    replication: Replication,
}

/// The `profile_state_replication_*` series: all zero on a single node.
struct Replication {
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
}

impl Replication {
    fn new(r: &Registry) -> Replication {
        let publish_failures = counter_vec(
            r,
            "profile_state_replication_publish_failures_total",
            "Publishes to the stream that failed (their webhooks got 503), by reason \
             (unavailable, refused, too_large).",
            &["reason"],
        );
        for reason in REPLICATION_PUBLISH_FAILURES {
            publish_failures.with_label_values(&[reason]);
        }
        let snapshot_uploads = counter_vec(
            r,
            "profile_state_replication_snapshot_uploads_total",
            "Snapshots this replica published to the snapshot bucket, by outcome (uploaded, \
             failed).",
            &["outcome"],
        );
        for outcome in REPLICATION_UPLOAD_OUTCOMES {
            snapshot_uploads.with_label_values(&[outcome]);
        }
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
            publish_failures,
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
            snapshot_uploads,
        }
    }
}

/// What the gauges that mirror the rest of the service read at scrape time.
pub struct Readings<'a> {
    /// The store: profiles and revision.
    pub store: &'a Store,
    /// Dead letters kept now.
    pub dead_letters: usize,
    /// Whether the service is ready for webhooks (what `/readyz` answers).
    pub ready: bool,
    /// The replica's standing, in replicated mode.
    pub replica: Option<&'a ReplicaStatus>,
}

/// The per-RPC metrics of one method, resolved once so a call touches no label map.
#[derive(Clone)]
pub struct GrpcMethodMetrics {
    started: IntCounter,
    /// Indexed by `Code as usize`.
    handled: Arc<[IntCounter]>,
    handling: Histogram,
}

impl GrpcMethodMetrics {
    /// Counts a call started.
    pub fn started(&self) {
        self.started.inc();
    }

    /// Counts a call finished with `code` after `seconds` (for a stream: its whole life).
    pub fn handled(&self, code: Code, seconds: f64) {
        self.handled[code as usize].inc();
        self.handling.observe(seconds);
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let counter = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    register(registry, counter)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid metric"))
}

fn histogram_opts(name: &str, help: &str) -> HistogramOpts {
    // 100 µs to ~6.5 s, doubling: covers an in-memory answer and a slow fsync alike.
    let buckets = exponential_buckets(0.0001, 2.0, 17).expect("valid buckets");
    HistogramOpts::new(name, help).buckets(buckets)
}

fn histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let histogram = Histogram::with_opts(histogram_opts(name, help)).expect("valid metric");
    register(registry, histogram)
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let histogram = HistogramVec::new(histogram_opts(name, help), labels).expect("valid metric");
    register(registry, histogram)
}

/// `profile_state_build_info{version, revision} 1`.
fn build_info(registry: &Registry) {
    let help = "Always 1; the labels say which build is running.";
    let info = IntGaugeVec::new(
        Opts::new("profile_state_build_info", help),
        &["version", "revision"],
    )
    .expect("valid metric");
    register(registry, info)
        .with_label_values(&[VERSION, REVISION])
        .set(1);
}

/// CPU, memory, file descriptors, threads and start time of this process (`process_*`).
#[cfg(target_os = "linux")]
fn process_metrics(registry: &Registry) {
    let collector = prometheus::process_collector::ProcessCollector::for_self();
    registry
        .register(Box::new(collector))
        .expect("unique metric");
}

#[cfg(not(target_os = "linux"))]
fn process_metrics(_registry: &Registry) {}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in its own registry, every known series at zero.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        build_info(r);
        process_metrics(r);
        let webhooks = counter_vec(
            r,
            "profile_state_webhooks_total",
            "Webhooks answered, by outcome (applied, unchanged, ignored, rejected, unavailable) \
             and HTTP status.",
            &["outcome", "status"],
        );
        let webhook_duration = histogram_vec(
            r,
            "profile_state_webhook_duration_seconds",
            "Time from receiving a webhook to answering it, by HTTP status.",
            &["status"],
        );
        let webhook_answers = WEBHOOK_ANSWERS
            .iter()
            .map(|&(outcome, status)| {
                let status = status.to_string();
                (
                    webhooks.with_label_values(&[outcome, &status]),
                    webhook_duration.with_label_values(&[&status]),
                )
            })
            .collect();
        let watch_resets = counter_vec(
            r,
            "profile_state_watch_resets_total",
            "Resets sent to watchers, by reason (compacted_start, fell_behind, initial_state).",
            &["reason"],
        );
        for reason in WATCH_RESET_REASONS {
            watch_resets.with_label_values(&[reason]);
        }
        let watch_streams_refused = counter_vec(
            r,
            "profile_state_watch_streams_refused_total",
            "WatchProfiles calls refused with RESOURCE_EXHAUSTED, by the limit they met \
             (server: --max-watch-streams, connection: --max-watch-streams-per-connection).",
            &["limit"],
        );
        for limit in WATCH_STREAM_LIMITS {
            watch_streams_refused.with_label_values(&[limit]);
        }
        let (connections, connections_refused, connections_timed_out) = connection_metrics(r);
        let grpc_labels = ["grpc_type", "grpc_service", "grpc_method"];
        let inner = Inner {
            webhook_answers,
            webhooks,
            webhook_duration,
            signature_failures: counter(
                r,
                "profile_state_webhook_signature_failures_total",
                "Webhooks refused because X-GB-Signature was missing or wrong.",
            ),
            dead_letters_kept: counter(
                r,
                "profile_state_webhook_dead_letters_total",
                "Signed webhooks that could not be applied and were kept as dead letters.",
            ),
            dead_letters: gauge(
                r,
                "profile_state_dead_letters",
                "Dead letters kept now, waiting to be replayed or purged.",
            ),
            ready: gauge(
                r,
                "profile_state_ready",
                "1 while the service is ready for webhooks (as /readyz), else 0.",
            ),
            profiles: gauge(r, "profile_state_profiles", "Profiles in the store."),
            store_revision: gauge(
                r,
                "profile_state_store_revision",
                "The store's current revision.",
            ),
            watch_streams: gauge(
                r,
                "profile_state_watch_streams",
                "WatchProfiles streams open.",
            ),
            watch_events: counter(
                r,
                "profile_state_watch_events_sent_total",
                "Events sent on WatchProfiles streams.",
            ),
            watch_resets,
            watch_streams_refused,
            history_bytes: gauge(
                r,
                "profile_state_watch_history_bytes",
                "Memory held by the history of recent changes watchers resume from, as \
                 --history-bytes counts it.",
            ),
            connections,
            connections_refused,
            connections_timed_out,
            journal_fsync: histogram(
                r,
                "profile_state_journal_fsync_duration_seconds",
                "Time to append and fsync one journal batch.",
            ),
            journal_bytes: counter(
                r,
                "profile_state_journal_bytes_total",
                "Bytes appended to the journal.",
            ),
            journal_failures: counter(
                r,
                "profile_state_journal_write_failures_total",
                "Journal appends that failed (the batch was answered 503).",
            ),
            grpc_started: counter_vec(
                r,
                "grpc_server_started_total",
                "RPCs started on the server.",
                &grpc_labels,
            ),
            grpc_handled: counter_vec(
                r,
                "grpc_server_handled_total",
                "RPCs completed on the server, by status code, whatever the outcome.",
                &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            ),
            grpc_handling: histogram_vec(
                r,
                "grpc_server_handling_seconds",
                "Time from the start of an RPC to its status (for a stream: its whole life).",
                &grpc_labels,
            ),
            replication: Replication::new(r),
            reconcile: reconcile::ReconcileMetrics::new(r),
            registry,
        };
        Metrics {
            inner: Arc::new(inner),
        }
    }

    /// The metrics of one RPC, `/{service}/{method}`: its series appear now, at zero, with
    /// every status code.
    pub fn grpc_method(&self, kind: GrpcType, service: &str, method: &str) -> GrpcMethodMetrics {
        let labels = [kind.label(), service, method];
        let handled = GRPC_CODES
            .iter()
            .map(|&code| {
                let [kind, service, method] = labels;
                self.inner.grpc_handled.with_label_values(&[
                    kind,
                    service,
                    method,
                    grpc_code_name(code),
                ])
            })
            .collect();
        GrpcMethodMetrics {
            started: self.inner.grpc_started.with_label_values(&labels),
            handled,
            handling: self.inner.grpc_handling.with_label_values(&labels),
        }
    }

    /// Counts an answered webhook. `(outcome, status)` is one of [`WEBHOOK_ANSWERS`].
    pub fn webhook(&self, outcome: &str, status: u16, seconds: f64) {
        let known = WEBHOOK_ANSWERS
            .iter()
            .position(|&answer| answer == (outcome, status));
        debug_assert!(
            known.is_some(),
            "webhook answer ({outcome}, {status}) missing from WEBHOOK_ANSWERS"
        );
        if let Some(index) = known {
            let (count, duration) = &self.inner.webhook_answers[index];
            count.inc();
            duration.observe(seconds);
            return;
        }
        let status = status.to_string();
        self.inner
            .webhooks
            .with_label_values(&[outcome, &status])
            .inc();
        self.inner
            .webhook_duration
            .with_label_values(&[&status])
            .observe(seconds);
    }

    /// Counts a signature failure.
    pub fn signature_failure(&self) {
        self.inner.signature_failures.inc();
    }

    /// Counts a stored dead letter.
    pub fn dead_letter(&self) {
        self.inner.dead_letters_kept.inc();
    }

    /// A watch stream opened; the returned guard counts it closed when dropped.
    pub fn watch_stream(&self) -> WatchStreamGuard {
        self.inner.watch_streams.inc();
        WatchStreamGuard(self.inner.watch_streams.clone())
    }

    /// Counts an event sent to a watcher.
    pub fn watch_event(&self) {
        self.inner.watch_events.inc();
    }

    /// Counts a reset sent to a watcher. `reason` is one of [`WATCH_RESET_REASONS`].
    pub fn watch_reset(&self, reason: &str) {
        debug_assert!(
            WATCH_RESET_REASONS.contains(&reason),
            "reset reason {reason} missing from WATCH_RESET_REASONS"
        );
        self.inner.watch_resets.with_label_values(&[reason]).inc();
    }

    /// Counts a WatchProfiles call refused by `limit`, one of [`WATCH_STREAM_LIMITS`].
    pub fn watch_stream_refused(&self, limit: &str) {
        debug_assert!(
            WATCH_STREAM_LIMITS.contains(&limit),
            "unknown limit {limit}"
        );
        self.inner
            .watch_streams_refused
            .with_label_values(&[limit])
            .inc();
    }

    /// The connection metrics of one listener of [`LISTENER_TIMEOUTS`].
    pub fn listener(&self, listener: &'static str) -> ListenerMetrics {
        let inner = &self.inner;
        ListenerMetrics {
            listener,
            open: inner.connections.with_label_values(&[listener]),
            refused: inner.connections_refused.with_label_values(&[listener]),
            timed_out: inner.connections_timed_out.clone(),
        }
    }

    /// Records one journal append.
    pub fn journal_append(&self, seconds: f64, bytes: u64) {
        self.inner.journal_fsync.observe(seconds);
        self.inner.journal_bytes.inc_by(bytes);
    }

    /// Counts a failed journal append.
    pub fn journal_failure(&self) {
        self.inner.journal_failures.inc();
    }

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

    /// The Prometheus text exposition of every metric, with the mirrored gauges read now.
    pub fn render(&self, now: Readings<'_>) -> String {
        let inner = &self.inner;
        inner.profiles.set(now.store.len() as i64);
        let revision = i64::try_from(now.store.revision()).unwrap_or(i64::MAX);
        inner.store_revision.set(revision);
        inner.dead_letters.set(now.dead_letters as i64);
        inner.ready.set(i64::from(now.ready));
        let history_bytes = i64::try_from(now.store.history_bytes()).unwrap_or(i64::MAX);
        inner.history_bytes.set(history_bytes);
        if let Some(replica) = now.replica {
            let replication = &inner.replication;
            let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
            let lag = replica.lag();
            replication
                .applied_sequence
                .set(gauge(replica.position().sequence));
            replication
                .stream_last_sequence
                .set(gauge(replica.stream_last()));
            replication.lag_messages.set(gauge(lag.messages));
            replication.lag_seconds.set(lag.seconds);
            replication
                .nats_connected
                .set(i64::from(replica.nats_connected()));
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&inner.registry.gather(), &mut out)
            .expect("text encoding into memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The gauge of open connections, and the counters of refused and timed-out ones, by listener.
fn connection_metrics(r: &Registry) -> (IntGaugeVec, IntCounterVec, IntCounterVec) {
    let open = register(
        r,
        IntGaugeVec::new(
            Opts::new(
                "profile_state_connections",
                "Connections open, by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric"),
    );
    let refused = counter_vec(
        r,
        "profile_state_connections_refused_total",
        "Connections closed as they arrived because the listener's connection cap was reached \
         (--max-webhook-connections, --max-grpc-connections).",
        &["listener"],
    );
    let timed_out = counter_vec(
        r,
        "profile_state_connections_timed_out_total",
        "Connections closed by a timeout, by listener and timeout (idle, header, handshake).",
        &["listener", "timeout"],
    );
    for (listener, timeouts) in LISTENER_TIMEOUTS {
        open.with_label_values(&[listener]);
        refused.with_label_values(&[listener]);
        for timeout in *timeouts {
            timed_out.with_label_values(&[listener, timeout]);
        }
    }
    (open, refused, timed_out)
}

/// The connection metrics of one listener.
#[derive(Clone)]
pub struct ListenerMetrics {
    listener: &'static str,
    open: IntGauge,
    refused: IntCounter,
    timed_out: IntCounterVec,
}

impl ListenerMetrics {
    /// The `listener` label.
    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// A connection opened; the returned guard counts it closed when dropped.
    pub fn opened(&self) -> ConnectionMetrics {
        self.open.inc();
        ConnectionMetrics(self.open.clone())
    }

    /// Counts a connection refused at the cap.
    pub fn refused(&self) {
        self.refused.inc();
    }

    /// Counts a connection closed by `timeout` (one of this listener's [`LISTENER_TIMEOUTS`]).
    pub fn timed_out(&self, timeout: &str) {
        self.timed_out
            .with_label_values(&[self.listener, timeout])
            .inc();
    }
}

/// Counts one open connection; dropping it counts the connection closed.
pub struct ConnectionMetrics(IntGauge);

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts one open watch stream; dropping it counts the stream closed.
pub struct WatchStreamGuard(IntGauge);

impl Drop for WatchStreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_the_canonical_ones_in_numeric_order() {
        for (number, code) in GRPC_CODES.iter().enumerate() {
            assert_eq!(*code as usize, number);
            assert_eq!(Code::from_i32(number as i32), *code);
        }
        assert_eq!(grpc_code_name(Code::Ok), "OK");
        assert_eq!(grpc_code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(grpc_code_name(Code::Cancelled), "CANCELLED");
        assert_eq!(grpc_code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }

    #[test]
    fn every_reset_kind_is_a_known_reason() {
        use crate::watch::ResetKind;
        for kind in ResetKind::ALL {
            assert!(WATCH_RESET_REASONS.contains(&kind.label()), "{kind:?}");
        }
    }

    #[test]
    fn grpc_types_follow_the_streaming_flags() {
        assert_eq!(GrpcType::of(false, false).label(), "unary");
        assert_eq!(GrpcType::of(true, false).label(), "client_stream");
        assert_eq!(GrpcType::of(false, true).label(), "server_stream");
        assert_eq!(GrpcType::of(true, true).label(), "bidi_stream");
    }
}
