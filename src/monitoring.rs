//! Monitoring over HTTP, served on the admin listener (`--admin-listen`, loopback by default):
//! what operators and orchestrators poll. (The gRPC AdminService, dead letters, is
//! `crate::grpc::dead_letters`.)
//!
//! - `GET /metrics`: Prometheus text exposition of `crate::metrics`.
//! - `GET /livez` (and `/healthz`, its older name): 200 while the process serves at all
//!   (liveness).
//! - `GET /readyz`: 200 when webhooks can be accepted: recovery done (the listener only opens
//!   after it), the journal writable, not shutting down, and in replicated mode connected to
//!   NATS, applying and within `--max-lag` of the stream (judged at the request); else 503
//!   with the reason.
//!
//! While the server starts (a single node's recovery, a replica's download of a snapshot and
//! catch-up with the stream), [`Starting`] answers on the same listener: `/livez` 200, and
//! `/readyz` and `/metrics` 503 "starting", so that a probe gets an answer instead of a
//! connection nobody serves.
//!
//! It only reads state; it changes nothing and serves no customer data.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dead_letters::DeadLetters;
use crate::metrics::{Metrics, Readings};
use crate::replication::ReplicaStatus;
use crate::store::Store;

/// What the monitoring endpoints read.
#[derive(Clone)]
pub struct Monitoring {
    /// Metrics to render.
    pub metrics: Metrics,
    /// The store, for the gauges read at scrape time.
    pub store: Store,
    /// The dead letters, for the gauge of those kept.
    pub dead_letters: DeadLetters,
    /// Whether the journal's last write succeeded (always true in replicated mode).
    pub writable: watch::Receiver<bool>,
    /// Cancelled when shutdown begins.
    pub stopping: CancellationToken,
    /// The replica's standing, in replicated mode.
    pub replica: Option<ReplicaStatus>,
}

impl Monitoring {
    /// The monitoring router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/livez", get(|| async { "ok\n" }))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .with_state(self)
    }

    /// Why the service is not ready for webhooks, if it is not (`/readyz` and the
    /// `profile_state_ready` gauge both say this).
    fn not_ready(&self) -> Option<String> {
        if self.stopping.is_cancelled() {
            return Some("shutting down\n".into());
        }
        if !*self.writable.borrow() {
            return Some("journal writes are failing; webhooks get 503\n".into());
        }
        let replica = self.replica.as_ref()?;
        replica.not_ready_reason().map(|reason| reason + "\n")
    }
}

async fn metrics(State(monitoring): State<Monitoring>) -> Response {
    let text = monitoring.metrics.render(Readings {
        store: &monitoring.store,
        dead_letters: monitoring.dead_letters.len(),
        ready: monitoring.not_ready().is_none(),
        replica: monitoring.replica.as_ref(),
    });
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

async fn ready(State(monitoring): State<Monitoring>) -> Response {
    match monitoring.not_ready() {
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        None => "ready\n".into_response(),
    }
}

/// How long a stop waits for the start-up answers' connections to end before cutting them.
const STARTING_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The monitoring endpoints while the server starts, served on a copy of the admin listener
/// until [`Starting::stop`] (or its drop, when start-up fails) hands the listener over.
pub struct Starting {
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Starting {
    /// Starts answering on `listener`; returns the listener back for [`Monitoring`] to serve
    /// once start-up is done (both are the same socket: connections wait in its backlog in
    /// between).
    pub fn serve(listener: TcpListener) -> std::io::Result<(TcpListener, Starting)> {
        let listener = listener.into_std()?;
        let copy = TcpListener::from_std(listener.try_clone()?)?;
        let not_yet = || async { (StatusCode::SERVICE_UNAVAILABLE, "starting\n") };
        let router = Router::new()
            .route("/livez", get(|| async { "ok\n" }))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(not_yet))
            .route("/metrics", get(not_yet));
        let stop = CancellationToken::new();
        let serve =
            axum::serve(copy, router).with_graceful_shutdown(stop.clone().cancelled_owned());
        let task = tokio::spawn(serve.into_future());
        Ok((TcpListener::from_std(listener)?, Starting { stop, task }))
    }

    /// Stops answering: requests under way get [`STARTING_STOP_WAIT`] to finish.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(STARTING_STOP_WAIT, &mut self.task).await;
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}
