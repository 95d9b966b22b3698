//! Monitoring over HTTP, served on the admin listener (`--admin-listen`, loopback by default):
//! what operators and orchestrators poll. (The gRPC AdminService, dead letters, is
//! `crate::grpc::dead_letters`.)
//!
//! - `GET /metrics`: Prometheus text exposition of `crate::metrics`.
//! - `GET /livez` (and `/healthz`, its older name): 200 while the process serves at all
//!   (liveness).
//! - `GET /readyz`: 200 when webhooks can be accepted: recovery done (the listener only opens
//!   after it), the journal writable, not shutting down; else 503 with the reason.
//!
//! It only reads state; it changes nothing and serves no customer data.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dead_letters::DeadLetters;
use crate::metrics::{Metrics, Readings};
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
    /// Whether the journal's last write succeeded.
    pub writable: watch::Receiver<bool>,
    /// Cancelled when shutdown begins.
    pub stopping: CancellationToken,
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
    fn not_ready(&self) -> Option<&'static str> {
        if self.stopping.is_cancelled() {
            return Some("shutting down\n");
        }
        if !*self.writable.borrow() {
            return Some("journal writes are failing; webhooks get 503\n");
        }
        None
    }
}

async fn metrics(State(monitoring): State<Monitoring>) -> Response {
    let text = monitoring.metrics.render(Readings {
        store: &monitoring.store,
        dead_letters: monitoring.dead_letters.len(),
        ready: monitoring.not_ready().is_none(),
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
