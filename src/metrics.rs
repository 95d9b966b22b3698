//! Prometheus metrics: every metric the service exports, named `profile_state_*`, in one place.
//!
//! One [`Metrics`] handle per server (no global registry, so several servers in one test
//! process count separately), cloned into whoever records. Counters end in `_total`, durations
//! are `_seconds` histograms. Labels never carry customer ids, emails or other personal data:
//! only outcomes, statuses, gRPC methods and codes, and reasons from a fixed set.
//! Gauges that mirror the store (profiles, revision) are read at scrape time. Serving
//! `/metrics` is `crate::monitoring`'s job.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder, exponential_buckets,
};

use crate::store::Store;

/// Handle to the metrics of one server. Cloning it is one reference-count increment.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    webhooks: IntCounterVec,
    webhook_duration: HistogramVec,
    signature_failures: IntCounter,
    dead_letters: IntCounter,
    profiles: IntGauge,
    store_revision: IntGauge,
    watch_streams: IntGauge,
    watch_events: IntCounter,
    watch_resets: IntCounterVec,
    journal_fsync: Histogram,
    journal_bytes: IntCounter,
    journal_failures: IntCounter,
    grpc_requests: IntCounterVec,
    grpc_duration: HistogramVec,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("unique metric");
    counter
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let counter = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("unique metric");
    counter
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let gauge = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("unique metric");
    gauge
}

fn histogram_opts(name: &str, help: &str) -> HistogramOpts {
    // 100 µs to ~6.5 s, doubling: covers an in-memory answer and a slow fsync alike.
    let buckets = exponential_buckets(0.0001, 2.0, 17).expect("valid buckets");
    HistogramOpts::new(name, help).buckets(buckets)
}

fn histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let histogram = Histogram::with_opts(histogram_opts(name, help)).expect("valid metric");
    registry
        .register(Box::new(histogram.clone()))
        .expect("unique metric");
    histogram
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let histogram = HistogramVec::new(histogram_opts(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(histogram.clone()))
        .expect("unique metric");
    histogram
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in its own registry.
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("profile_state".into()), None).expect("a valid prefix");
        let r = &registry;
        let inner = Inner {
            webhooks: counter_vec(
                r,
                "webhooks_total",
                "Webhooks answered, by outcome (applied, unchanged, ignored, rejected) and HTTP status.",
                &["outcome", "status"],
            ),
            webhook_duration: histogram_vec(
                r,
                "webhook_duration_seconds",
                "Time from receiving a webhook to answering it, by HTTP status.",
                &["status"],
            ),
            signature_failures: counter(
                r,
                "webhook_signature_failures_total",
                "Webhooks refused because X-GB-Signature was missing or wrong.",
            ),
            dead_letters: counter(
                r,
                "webhook_dead_letters_total",
                "Signed webhooks that could not be applied and were kept as dead letters.",
            ),
            profiles: gauge(r, "profiles", "Profiles in the store."),
            store_revision: gauge(r, "store_revision", "The store's current revision."),
            watch_streams: gauge(r, "watch_streams", "WatchProfiles streams open."),
            watch_events: counter(
                r,
                "watch_events_sent_total",
                "Events sent on WatchProfiles streams.",
            ),
            watch_resets: counter_vec(
                r,
                "watch_resets_total",
                "Resets sent to watchers, by reason (compacted_start, fell_behind, initial_state).",
                &["reason"],
            ),
            journal_fsync: histogram(
                r,
                "journal_fsync_duration_seconds",
                "Time to append and fsync one journal batch.",
            ),
            journal_bytes: counter(r, "journal_bytes_total", "Bytes appended to the journal."),
            journal_failures: counter(
                r,
                "journal_write_failures_total",
                "Journal appends that failed (the batch was answered 503).",
            ),
            grpc_requests: counter_vec(
                r,
                "grpc_requests_total",
                "gRPC calls answered, by method and status code.",
                &["method", "code"],
            ),
            grpc_duration: histogram_vec(
                r,
                "grpc_request_duration_seconds",
                "Time to answer a unary gRPC call (for streams: to start it), by method.",
                &["method"],
            ),
            registry,
        };
        Metrics {
            inner: Arc::new(inner),
        }
    }

    /// Counts an answered webhook.
    pub fn webhook(&self, outcome: &str, status: u16, seconds: f64) {
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
        self.inner.dead_letters.inc();
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

    /// Counts a reset sent to a watcher.
    pub fn watch_reset(&self, reason: &str) {
        self.inner.watch_resets.with_label_values(&[reason]).inc();
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

    /// Counts an answered gRPC call.
    pub fn grpc_request(&self, method: &str, code: &str, seconds: f64) {
        self.inner
            .grpc_requests
            .with_label_values(&[method, code])
            .inc();
        self.inner
            .grpc_duration
            .with_label_values(&[method])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric, with the store gauges read now.
    pub fn render(&self, store: &Store) -> String {
        self.inner.profiles.set(store.len() as i64);
        self.inner
            .store_revision
            .set(i64::try_from(store.revision()).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut out)
            .expect("text encoding into memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Counts one open watch stream; dropping it counts the stream closed.
pub struct WatchStreamGuard(IntGauge);

impl Drop for WatchStreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
