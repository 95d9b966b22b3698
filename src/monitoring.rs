//! Monitoring over HTTP, served on the admin listener (`--admin-listen`, loopback by default):
//! what operators and orchestrators poll. (The gRPC AdminService, dead letters, is
//! `crate::grpc::dead_letters`.)
//!
//! - `GET /metrics`: Prometheus text exposition of `crate::metrics`.
//! - `GET /livez` (and `/healthz`, its older name): 200 while the process serves at all
//!   (liveness).
//! - `GET /readyz`: 200 when webhooks can be accepted: start-up done (503 "starting" until
//!   then), the journal writable, not shutting down, and in replicated mode connected to
//!   NATS, applying and within `--max-lag` of the stream (judged at the request); else 503
//!   with the reason.
//!
//! The listener is served from the moment it is bound ([`AdminEndpoints`]): while the server
//! starts (a single node's recovery, a replica's download of a snapshot and catch-up with the
//! stream), `/livez` answers 200, `/readyz` 503 "starting" and `/metrics` a start-up
//! exposition (`crate::metrics::render_starting`: `profile_state_starting 1`,
//! `profile_state_ready 0`), so that a probe gets an answer instead of a connection nobody
//! serves and a scrape succeeds (a long start alerts as not ready, not as down); then the same
//! server answers from [`Monitoring`] (`crate::server`'s `admin_listener` serves these routes,
//! through the whole stop).
//!
//! It only reads state; it changes nothing and serves no customer data.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::{Arc, OnceLock};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dead_letters::DeadLetters;
use crate::metrics::{self, Metrics, Readings};
use crate::replication::ReplicaStatus;
use crate::sequencer::JournalState;
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
    /// Whether the journal takes writes (always writable in replicated mode).
    pub journal_state: watch::Receiver<JournalState>,
    /// Cancelled when shutdown begins.
    pub stopping: CancellationToken,
    /// The replica's standing, in replicated mode.
    pub replica: Option<ReplicaStatus>,
}

/// The admin listener's endpoints: start-up answers until [`AdminEndpoints::started`] gives
/// them the [`Monitoring`] to answer from. Cloning is cheap.
#[derive(Clone, Default)]
pub struct AdminEndpoints(Arc<OnceLock<Monitoring>>);

impl AdminEndpoints {
    /// The routes, answering from these endpoints.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/livez", get(|| async { "ok\n" }))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .with_state(self.clone())
    }

    /// Start-up is over: answer from `monitoring` from now on.
    pub fn started(&self, monitoring: Monitoring) {
        let _ = self.0.set(monitoring);
    }
}

/// What `/readyz` answers while the server starts.
fn starting() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
}

/// The Prometheus text format's content type.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Monitoring {
    /// Why the service is not ready for webhooks, if it is not (`/readyz` and the
    /// `profile_state_ready` gauge both say this).
    fn not_ready(&self) -> Option<String> {
        if self.stopping.is_cancelled() {
            return Some("shutting down\n".into());
        }
        match *self.journal_state.borrow() {
            JournalState::Writable => {}
            JournalState::Failing => {
                return Some("journal writes are failing; webhooks get 503\n".into());
            }
            JournalState::Stalled => {
                return Some(
                    "the journal's write has not returned for half of --webhook-timeout (the \
                     disk hangs); webhooks wait for it, then get 503\n"
                        .into(),
                );
            }
        }
        let replica = self.replica.as_ref()?;
        replica.not_ready_reason().map(|reason| reason + "\n")
    }
}

async fn metrics(State(endpoints): State<AdminEndpoints>) -> Response {
    let Some(monitoring) = endpoints.0.get() else {
        return (
            [(header::CONTENT_TYPE, EXPOSITION)],
            metrics::render_starting(),
        )
            .into_response();
    };
    let text = monitoring.metrics.render(Readings {
        store: &monitoring.store,
        dead_letters: monitoring.dead_letters.len(),
        ready: monitoring.not_ready().is_none(),
        replica: monitoring.replica.as_ref(),
    });
    ([(header::CONTENT_TYPE, EXPOSITION)], text).into_response()
}

async fn ready(State(endpoints): State<AdminEndpoints>) -> Response {
    let Some(monitoring) = endpoints.0.get() else {
        return starting();
    };
    match monitoring.not_ready() {
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        None => "ready\n".into_response(),
    }
}
