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
//! `crate::monitoring`'s job, not this module's. The per-RPC `grpc_server_*` series are in
//! `grpc`, the replicated mode's (`profile_state_replication_*`) in `replication`, the
//! reconciler's (`profile_state_reconcile_*`) in `reconcile`.

mod grpc;
mod reconcile;
mod replication;
mod tls;

pub use grpc::{GrpcMethodMetrics, GrpcType, grpc_code_name};
pub use replication::{REPLICATION_PUBLISH_FAILURES, REPLICATION_UPLOAD_OUTCOMES};
pub use tls::HandshakeMetrics;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, exponential_buckets,
};

use crate::poison::lock;
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
    ("rejected", 501),
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
pub const LISTENER_TIMEOUTS: &[(&str, &[&str])] = &[
    ("webhook", &["idle", "header"]),
    ("grpc", &["handshake", "idle"]),
    ("admin", &["idle", "header"]),
];

/// Why the gRPC answer budgets cut a connection: the `reason` label of
/// `profile_state_connections_cut_total` (`grpc::answer_bytes`).
pub const CUT_REASONS: &[&str] = &[
    "connection_budget",
    "server_budget",
    "stream_bytes",
    "control_frames",
];

/// Every limit a WatchProfiles call can be refused by: the `limit` label of
/// `profile_state_watch_streams_refused_total` (`--max-watch-streams`,
/// `--max-watch-streams-per-connection`).
pub const WATCH_STREAM_LIMITS: &[&str] = &["server", "connection"];
/// What became of a snapshot of the store written to the data directory: the `outcome` label
/// of `profile_state_snapshots_total` (a single node's, and a replica's local ones).
pub const SNAPSHOT_OUTCOMES: &[&str] = &["written", "failed"];
/// The version label of `profile_state_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The revision label of `profile_state_build_info`: the source revision given to the build as
/// `PROFILE_STATE_REVISION` (the Dockerfile passes it as a build argument), else `unknown`.
pub const REVISION: &str = match option_env!("PROFILE_STATE_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

/// Handle to the metrics of one server. Cloning it is one reference-count increment.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    webhooks: Webhooks,
    mirrors: Mirrors,
    watch: Watch,
    connections: IntGaugeVec,
    connections_refused: IntCounterVec,
    connections_timed_out: IntCounterVec,
    journal: Journal,
    snapshots: Snapshots,
    grpc: grpc::Grpc,
    reconcile: reconcile::ReconcileMetrics,
    replication: replication::Replication,
    tls: tls::Tls,
}

/// The `profile_state_webhook*` series.
struct Webhooks {
    /// `WEBHOOK_ANSWERS[i]`'s counter and duration histogram, resolved once.
    answers: Vec<(IntCounter, Histogram)>,
    by_outcome: IntCounterVec,
    duration: HistogramVec,
    signature_failures: IntCounter,
    /// Signatures that held, over the body's bytes (`[0]`) and over its compact form (`[1]`).
    signatures_verified: [IntCounter; 2],
    dead_letters_kept: IntCounter,
    compact_signature_checks: IntGauge,
}

/// The gauges that mirror the rest of the service, set at scrape time from [`Readings`].
struct Mirrors {
    dead_letters: IntGauge,
    ready: IntGauge,
    profiles: IntGauge,
    store_revision: IntGauge,
}

/// The `profile_state_watch_*` series.
struct Watch {
    streams: IntGauge,
    events: IntCounter,
    resets: IntCounterVec,
    streams_refused: IntCounterVec,
    history_bytes: IntGauge,
    /// Counted by the gRPC answer budgets themselves (`grpc::answer_bytes`).
    unsent_stream_bytes: IntGauge,
    queued_watch_bytes: IntGauge,
    /// The same: connections they cut, by reason ([`CUT_REASONS`]).
    connections_cut: IntCounterVec,
}

/// The `profile_state_journal_*` series.
struct Journal {
    fsync: Histogram,
    bytes: IntCounter,
    failures: IntCounter,
    batches_in_flight: IntGauge,
}

/// The `profile_state_snapshot*` series. A snapshot that keeps failing, or hangs on a disk
/// that stopped answering, lets the journal (or a replica's share of the stream) grow, and the
/// next start replay it all: a failure has a log line, a hang had nothing to show it.
struct Snapshots {
    outcomes: IntCounterVec,
    running: Gauge,
    /// When the snapshot in progress started, if one is.
    running_since: Mutex<Option<Instant>>,
}

impl Snapshots {
    fn new(r: &Registry) -> Snapshots {
        let outcomes = counter_vec_at_zero(
            r,
            "profile_state_snapshots_total",
            "Snapshots of the store written to the data directory, by outcome (written, \
             failed): a single node's, which let older journal segments go, and a replica's \
             local ones.",
            "outcome",
            SNAPSHOT_OUTCOMES.iter().copied(),
        );
        let running = Gauge::new(
            "profile_state_snapshot_running_seconds",
            "How long the snapshot being written has been running, 0 when none is: one that \
             keeps growing hangs (a disk that stopped answering), and the journal grows \
             meanwhile.",
        );
        Snapshots {
            outcomes,
            running: register(r, running.expect("valid metric")),
            running_since: Mutex::new(None),
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

/// A counter with one label, every value of `values` created at zero from the first scrape.
fn counter_vec_at_zero<'v>(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = &'v str>,
) -> IntCounterVec {
    let counter = counter_vec(registry, name, help, &[label]);
    for value in values {
        counter.with_label_values(&[value]);
    }
    counter
}

/// The counter of connections cut, by listener (only `grpc` cuts) and reason, every reason of
/// [`CUT_REASONS`] created at zero from the first scrape.
fn connections_cut(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    let counter = counter_vec(registry, name, help, &["listener", "reason"]);
    for reason in CUT_REASONS {
        counter.with_label_values(&["grpc", reason]);
    }
    // The webhook listener's HTTP/2 connections are cut for the same flood.
    counter.with_label_values(&["webhook", "control_frames"]);
    counter
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

/// `profile_state_ready`, at 0.
fn ready_gauge(registry: &Registry) -> IntGauge {
    let help = "1 while the service is ready for webhooks (as /readyz), else 0.";
    gauge(registry, "profile_state_ready", help)
}

/// `profile_state_starting`, at 0.
fn starting_gauge(registry: &Registry) -> IntGauge {
    let help = "1 while the service starts (a single node's recovery, a replica's snapshot \
                download and catch-up with the stream): only build info, process metrics and \
                profile_state_ready 0 are exported then. 0 once started.";
    gauge(registry, "profile_state_starting", help)
}

/// What `/metrics` answers while the server starts, before there is a [`Metrics`] to render:
/// build info, the process's metrics, `profile_state_ready 0` and `profile_state_starting 1`.
/// A scrape succeeds meanwhile, so a long start reads as "not ready", not as "down".
pub fn render_starting() -> String {
    let registry = Registry::new();
    build_info(&registry);
    process_metrics(&registry);
    ready_gauge(&registry);
    starting_gauge(&registry).set(1);
    exposition(&registry)
}

/// The Prometheus text exposition of everything in `registry`.
fn exposition(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding into memory");
    String::from_utf8(out).expect("the text format is UTF-8")
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

impl Webhooks {
    fn new(r: &Registry) -> Webhooks {
        let by_outcome = counter_vec(
            r,
            "profile_state_webhooks_total",
            "Webhooks answered, by outcome (applied, unchanged, ignored, rejected, unavailable) \
             and HTTP status.",
            &["outcome", "status"],
        );
        let duration = histogram_vec(
            r,
            "profile_state_webhook_duration_seconds",
            "Time from receiving a webhook to answering it, by HTTP status.",
            &["status"],
        );
        let answers = WEBHOOK_ANSWERS
            .iter()
            .map(|&(outcome, status)| {
                let status = status.to_string();
                (
                    by_outcome.with_label_values(&[outcome, &status]),
                    duration.with_label_values(&[&status]),
                )
            })
            .collect();
        let verified = counter_vec(
            r,
            "profile_state_webhook_signatures_verified_total",
            "Webhooks whose X-GB-Signature held, by what it covers: the body's bytes (raw) or \
             its compact form, JSON.stringify of the body (compact), checked only when the \
             bytes match no secret.",
            &["form"],
        );
        Webhooks {
            answers,
            by_outcome,
            duration,
            signature_failures: counter(
                r,
                "profile_state_webhook_signature_failures_total",
                "Webhooks refused because X-GB-Signature was missing or wrong.",
            ),
            signatures_verified: ["raw", "compact"].map(|form| verified.with_label_values(&[form])),
            dead_letters_kept: counter(
                r,
                "profile_state_webhook_dead_letters_total",
                "Signed webhooks that could not be applied and were kept as dead letters.",
            ),
            compact_signature_checks: gauge(
                r,
                "profile_state_webhook_compact_signature_checks",
                "Webhooks whose bytes matched no secret, having their signature checked over \
                 their compact form (JSON.stringify of the body) or waiting for their turn: one \
                 at a time, off the thread that answers webhooks.",
            ),
        }
    }
}

impl Mirrors {
    fn new(r: &Registry) -> Mirrors {
        Mirrors {
            dead_letters: gauge(
                r,
                "profile_state_dead_letters",
                "Dead letters kept now, waiting to be replayed or purged.",
            ),
            ready: ready_gauge(r),
            profiles: gauge(r, "profile_state_profiles", "Profiles in the store."),
            store_revision: gauge(
                r,
                "profile_state_store_revision",
                "The store's current revision.",
            ),
        }
    }
}

impl Watch {
    fn new(r: &Registry) -> Watch {
        Watch {
            streams: gauge(
                r,
                "profile_state_watch_streams",
                "WatchProfiles streams open.",
            ),
            events: counter(
                r,
                "profile_state_watch_events_sent_total",
                "Events sent on WatchProfiles streams.",
            ),
            resets: counter_vec_at_zero(
                r,
                "profile_state_watch_resets_total",
                "Resets sent to watchers, by reason (compacted_start, fell_behind, initial_state).",
                "reason",
                WATCH_RESET_REASONS.iter().copied(),
            ),
            streams_refused: counter_vec_at_zero(
                r,
                "profile_state_watch_streams_refused_total",
                "WatchProfiles calls, and health Watch and reflection streams, refused with \
                 RESOURCE_EXHAUSTED, by the limit they met (server: --max-watch-streams, \
                 connection: --max-watch-streams-per-connection, or 8 health and reflection \
                 streams).",
                "limit",
                WATCH_STREAM_LIMITS.iter().copied(),
            ),
            history_bytes: gauge(
                r,
                "profile_state_watch_history_bytes",
                "Memory held by the history of recent changes watchers resume from, as \
                 --history-bytes counts it.",
            ),
            unsent_stream_bytes: gauge(
                r,
                "profile_state_stream_unsent_bytes",
                "Bytes of gRPC streams' messages (watch initial states and changes, backup \
                 chunks) read and not yet handed to HTTP/2, their clients' windows shut; past \
                 32 times --grpc-max-message-bytes, connections whose clients read less than a \
                 sixteenth of it in a second are cut, those reading the smallest share first; \
                 a connection's watch streams take turns once theirs hold its own budget.",
            ),
            queued_watch_bytes: gauge(
                r,
                "profile_state_watch_queued_bytes",
                "Bytes of changes and profiles queued for gRPC watch streams and not taken by \
                 them, past each stream's queue bound (256 KiB: a larger change is queued \
                 alone); counted with profile_state_stream_unsent_bytes toward the cut of \
                 connections whose clients do not read.",
            ),
            connections_cut: connections_cut(
                r,
                "profile_state_connections_cut_total",
                "Connections cut: gRPC ones because their client stopped reading its answers, \
                 by what its unread answers filled: connection_budget (its own budget, for ten \
                 seconds), server_budget (the server's, for a second), stream_bytes (streams' \
                 messages waiting for window, past 32 times --grpc-max-message-bytes in all); \
                 gRPC and webhook HTTP/2 ones because their client sent more control frames \
                 (PING, SETTINGS, WINDOW_UPDATE, RST_STREAM, PRIORITY, undefined types) than its \
                 requests and what it read account for: control_frames. Their calls and watch \
                 streams end with them; watchers resume from their revision.",
            ),
        }
    }
}

impl Journal {
    fn new(r: &Registry) -> Journal {
        Journal {
            fsync: histogram(
                r,
                "profile_state_journal_fsync_duration_seconds",
                "Time to append and fsync one journal batch.",
            ),
            bytes: counter(
                r,
                "profile_state_journal_bytes_total",
                "Bytes appended to the journal.",
            ),
            failures: counter(
                r,
                "profile_state_journal_write_failures_total",
                "Journal appends that failed (the batch was answered 503).",
            ),
            batches_in_flight: gauge(
                r,
                "profile_state_journal_batches_in_flight",
                "Batches sequenced and not yet synced: 0 idle, 1 one syncing, 2 the next one \
                 waiting for that sync (the journal is the bottleneck).",
            ),
        }
    }
}

impl Metrics {
    /// A fresh set of metrics in its own registry, every known series at zero.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        build_info(r);
        process_metrics(r);
        starting_gauge(r);
        let (connections, connections_refused, connections_timed_out) = connection_metrics(r);
        let inner = Inner {
            webhooks: Webhooks::new(r),
            mirrors: Mirrors::new(r),
            watch: Watch::new(r),
            connections,
            connections_refused,
            connections_timed_out,
            journal: Journal::new(r),
            snapshots: Snapshots::new(r),
            grpc: grpc::Grpc::new(r),
            replication: replication::Replication::new(r),
            reconcile: reconcile::ReconcileMetrics::new(r),
            tls: tls::Tls::new(r),
            registry,
        };
        Metrics {
            inner: Arc::new(inner),
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
            let (count, duration) = &self.inner.webhooks.answers[index];
            count.inc();
            duration.observe(seconds);
            return;
        }
        let status = status.to_string();
        self.inner
            .webhooks
            .by_outcome
            .with_label_values(&[outcome, &status])
            .inc();
        self.inner
            .webhooks
            .duration
            .with_label_values(&[&status])
            .observe(seconds);
    }

    /// Counts a signature failure.
    pub fn signature_failure(&self) {
        self.inner.webhooks.signature_failures.inc();
    }

    /// Counts a webhook whose signature held, over its compact form or over its bytes.
    pub fn signature_verified(&self, over_compact_form: bool) {
        self.inner.webhooks.signatures_verified[usize::from(over_compact_form)].inc();
    }

    /// A webhook's signature check over its compact form queued; the returned guard counts
    /// it done when dropped.
    pub fn compact_signature_check(&self) -> InProgress {
        let gauge = &self.inner.webhooks.compact_signature_checks;
        gauge.inc();
        InProgress(gauge.clone())
    }

    /// Counts a stored dead letter.
    pub fn dead_letter(&self) {
        self.inner.webhooks.dead_letters_kept.inc();
    }

    /// A watch stream opened; the returned guard counts it closed when dropped.
    pub fn watch_stream(&self) -> InProgress {
        self.inner.watch.streams.inc();
        InProgress(self.inner.watch.streams.clone())
    }

    /// The gauge of what gRPC streams' messages hold before they are handed to HTTP/2, for
    /// the answer budgets to count in.
    pub fn unsent_stream_bytes(&self) -> IntGauge {
        self.inner.watch.unsent_stream_bytes.clone()
    }

    /// The gauge of what watch streams' queues hold that the streams have not taken, past
    /// their bound, for the answer budgets to count in.
    pub fn queued_watch_bytes(&self) -> IntGauge {
        self.inner.watch.queued_watch_bytes.clone()
    }

    /// The counter of connections cut, by listener and reason ([`CUT_REASONS`]), for the gRPC
    /// answer budgets to count in.
    pub fn connections_cut(&self) -> IntCounterVec {
        self.inner.watch.connections_cut.clone()
    }

    /// Counts an event sent to a watcher.
    pub fn watch_event(&self) {
        self.inner.watch.events.inc();
    }

    /// Counts a reset sent to a watcher. `reason` is one of [`WATCH_RESET_REASONS`].
    pub fn watch_reset(&self, reason: &str) {
        debug_assert!(
            WATCH_RESET_REASONS.contains(&reason),
            "reset reason {reason} missing from WATCH_RESET_REASONS"
        );
        self.inner.watch.resets.with_label_values(&[reason]).inc();
    }

    /// Counts a WatchProfiles call, a health Watch or reflection stream, or a health check,
    /// refused by `limit`, one of [`WATCH_STREAM_LIMITS`].
    pub fn watch_stream_refused(&self, limit: &str) {
        debug_assert!(
            WATCH_STREAM_LIMITS.contains(&limit),
            "unknown limit {limit}"
        );
        self.inner
            .watch
            .streams_refused
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
            cut: inner.watch.connections_cut.clone(),
        }
    }

    /// Records one journal append.
    pub fn journal_append(&self, seconds: f64, bytes: u64) {
        self.inner.journal.fsync.observe(seconds);
        self.inner.journal.bytes.inc_by(bytes);
    }

    /// How many batches are sequenced and not yet synced (at most two).
    pub fn journal_batches_in_flight(&self, batches: usize) {
        self.inner.journal.batches_in_flight.set(batches as i64);
    }

    /// Counts a failed journal append.
    pub fn journal_failure(&self) {
        self.inner.journal.failures.inc();
    }

    /// A snapshot of the store started; [`Metrics::snapshot`] when it ends.
    pub fn snapshot_started(&self) {
        *lock(&self.inner.snapshots.running_since) = Some(Instant::now());
    }

    /// Counts a snapshot of the store: written, or failed.
    pub fn snapshot(&self, written: bool) {
        let snapshots = &self.inner.snapshots;
        *lock(&snapshots.running_since) = None;
        let outcome = SNAPSHOT_OUTCOMES[usize::from(!written)];
        snapshots.outcomes.with_label_values(&[outcome]).inc();
    }

    /// The Prometheus text exposition of every metric, with the mirrored gauges read now.
    pub fn render(&self, now: Readings<'_>) -> String {
        let inner = &self.inner;
        inner.mirrors.profiles.set(now.store.len() as i64);
        let revision = i64::try_from(now.store.revision()).unwrap_or(i64::MAX);
        inner.mirrors.store_revision.set(revision);
        inner.mirrors.dead_letters.set(now.dead_letters as i64);
        inner.mirrors.ready.set(i64::from(now.ready));
        let history_bytes = i64::try_from(now.store.history_bytes()).unwrap_or(i64::MAX);
        inner.watch.history_bytes.set(history_bytes);
        let running_since = *lock(&inner.snapshots.running_since);
        let running = running_since.map_or(0.0, |since| since.elapsed().as_secs_f64());
        inner.snapshots.running.set(running);
        if let Some(replica) = now.replica {
            inner.replication.mirror(replica);
        }
        exposition(&inner.registry)
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
         (--max-webhook-connections, --max-grpc-connections; 256 on the admin listener).",
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
    cut: IntCounterVec,
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

    /// Counts a connection cut for `reason` (`profile_state_connections_cut_total`).
    pub fn cut(&self, reason: &str) {
        self.cut.with_label_values(&[self.listener, reason]).inc();
    }
}

/// Counts one open connection; dropping it counts the connection closed.
pub struct ConnectionMetrics(IntGauge);

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts one of something in a gauge while it lasts; dropping it counts it done.
pub struct InProgress(IntGauge);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reset_kind_is_a_known_reason() {
        use crate::watch::ResetKind;
        for kind in ResetKind::ALL {
            assert!(WATCH_RESET_REASONS.contains(&kind.label()), "{kind:?}");
        }
    }
}
