//! The no-op baselines every figure is compared with, measured in the same run:
//!
//! - HTTP: axum, the same version and listener setting (TCP_NODELAY) as the service's webhook
//!   ingress, on the same path; it reads the body and answers 200 with an empty body (and,
//!   while watch streams are open on the no-op gRPC server, hands the body to them first).
//! - gRPC: tonic, the same `ProfileService` and listener setting, answering GetProfile,
//!   BatchGetProfiles and ListProfiles with pre-built profiles of the same size as ours (no
//!   store, no lookup); the other RPCs are UNIMPLEMENTED.
//! - fan-out over gRPC: WatchProfiles on the no-op gRPC server, every change pre-encoded once
//!   and written to every stream (`noop_watch.rs`), triggered by a POST on a third listener;
//!   and the same server on a fourth listener with each connection and its streams on one
//!   task (`one_task.rs`), the transport's floor.
//! - fan-out in process: a tokio broadcast channel alone (see [`broadcast_fanout`]).
//!
//! The servers run in their own process (`profile-state-bench baseline`), started by the tool,
//! so they share the cores with the load generator exactly as the service does.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use hdrhistogram::Histogram;
use profile_state::pb;
use profile_state::pb::profile_service_server::{ProfileService, ProfileServiceServer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::noop_watch::{NoopWatch, Routes};
use crate::workload::Workload;

/// Serves both no-op servers on 127.0.0.1 port 0 and prints their addresses as one JSON line
/// (`{"http": ..., "grpc": ...}`); runs until killed.
pub async fn serve(client_id: &str) -> anyhow::Result<()> {
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let trigger = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_one_task = TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "{}",
        serde_json::json!({
            "http": http.local_addr()?,
            "grpc": grpc.local_addr()?,
            "fanout_trigger": trigger.local_addr()?,
            "grpc_one_task": grpc_one_task.local_addr()?,
        })
    );
    let workload = Workload::new(client_id, 1, "");
    let profile = workload.profile(0);
    let watch = NoopWatch::new(profile.clone());
    let noop = NoopProfiles { profile };
    let routes = Routes {
        generated: ProfileServiceServer::new(noop),
        watch: Arc::clone(&watch),
    };
    let one_task = crate::one_task::serve(grpc_one_task, routes.clone());
    let grpc = tonic::transport::Server::builder()
        .add_service(routes)
        .serve_with_incoming(TcpIncoming::from(grpc).with_nodelay(Some(true)));
    let http = axum::serve(http.tap_nodelay(), noop_router(Arc::clone(&watch))).into_future();
    let trigger = axum::serve(trigger.tap_nodelay(), watch.trigger()).into_future();
    let (grpc, one_task, http, trigger) = tokio::join!(grpc, one_task, http, trigger);
    grpc?;
    one_task?;
    http?;
    trigger?;
    Ok(())
}

/// The no-op webhook endpoint: read the body, give it to the watch streams that want it (none
/// open: one atomic load), answer 200.
fn noop_router(watch: Arc<NoopWatch>) -> Router {
    Router::new().route(
        profile_state::webhook::PATH,
        post(move |body: Bytes| async move {
            watch.deliver(&body);
            axum::http::StatusCode::OK
        }),
    )
}

trait TapNodelay {
    fn tap_nodelay(self) -> impl axum::serve::Listener<Addr = SocketAddr>;
}

impl TapNodelay for TcpListener {
    // The same setting as the service's webhook listener (`server/mod.rs`, `serve_ingress`).
    fn tap_nodelay(self) -> impl axum::serve::Listener<Addr = SocketAddr> {
        use axum::serve::ListenerExt;
        self.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    }
}

/// Answers reads with clones of one pre-built profile.
struct NoopProfiles {
    profile: pb::Profile,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchProfilesResponse, Status>> + Send>>;

/// As long as the service's (a UUID's 32 hex digits), so the answers are as large as its.
const STORE_ID: &str = "0123456789abcdef0123456789abcdef";

#[tonic::async_trait]
impl ProfileService for NoopProfiles {
    async fn get_profile(
        &self,
        _request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        Ok(Response::new(pb::GetProfileResponse {
            profile: Some(self.profile.clone()),
            store_revision: self.profile.revision,
            store_id: STORE_ID.into(),
        }))
    }

    async fn batch_get_profiles(
        &self,
        request: Request<pb::BatchGetProfilesRequest>,
    ) -> Result<Response<pb::BatchGetProfilesResponse>, Status> {
        let count = request.into_inner().customer_ids.len();
        Ok(Response::new(pb::BatchGetProfilesResponse {
            profiles: vec![self.profile.clone(); count],
            missing_customer_ids: Vec::new(),
            store_revision: self.profile.revision,
            store_id: STORE_ID.into(),
        }))
    }

    async fn list_profiles(
        &self,
        request: Request<pb::ListProfilesRequest>,
    ) -> Result<Response<pb::ListProfilesResponse>, Status> {
        let size = match request.into_inner().page_size {
            0 => 100,
            size => size.clamp(1, 1000) as usize,
        };
        Ok(Response::new(pb::ListProfilesResponse {
            profiles: vec![self.profile.clone(); size],
            // As long as a real token (a key, base64), so the next request is as large too.
            next_page_token: "Y2xpZW50LWlkL2N1c3RvbWVyLWlkLzAwMDAwMDAwLTAwMDAtNDAwMA".into(),
            store_revision: self.profile.revision,
            store_id: STORE_ID.into(),
            too_large: Vec::new(),
        }))
    }

    type WatchProfilesStream = WatchStream;

    async fn watch_profiles(
        &self,
        _request: Request<pb::WatchProfilesRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        Err(Status::unimplemented("not part of the no-op baseline"))
    }

    async fn get_server_info(
        &self,
        _request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::GetServerInfoResponse>, Status> {
        Err(Status::unimplemented("not part of the no-op baseline"))
    }
}

/// What a fan-out measurement found: per-delivery latencies (µs) and counts.
pub struct FanoutStats {
    /// Every delivery: from the event's publication to its receipt.
    pub latency: Histogram<u64>,
    /// Every delivery: from the webhook's send (or the channel send) to its receipt.
    pub from_send: Histogram<u64>,
    /// Per event: from publication to receipt by the last subscriber.
    pub last: Histogram<u64>,
    /// Events published in the measured window.
    pub events: u64,
    pub deliveries: u64,
    /// Deliveries that arrived before their write's acknowledgement (counted as 0 in `latency`).
    pub early: u64,
    pub missing: u64,
    pub elapsed: Duration,
    /// The server's CPU time per delivery over the whole window (warm-up included, ingest of
    /// the webhooks too), when the tool started the server.
    pub cpu_per_delivery: Option<Duration>,
}

/// The fan-out baseline: `subscribers` tasks on one tokio broadcast channel of pre-built
/// events (`Arc`, as a real server would share one encoded event), `rate` events per second
/// for `duration`; latency from `send` to each receiver's receipt. The channel's own cost, with
/// the same number of tasks and rate as the real scenario, in this process's runtime.
pub async fn broadcast_fanout(
    subscribers: usize,
    rate: f64,
    warmup: Duration,
    duration: Duration,
    event: Arc<pb::WatchProfilesResponse>,
) -> FanoutStats {
    let (sender, _) =
        tokio::sync::broadcast::channel::<(u64, Instant, Arc<pb::WatchProfilesResponse>)>(4096);
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let mut receiver = sender.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok((sequence, sent, event)) = receiver.recv().await {
                std::hint::black_box(&event);
                seen.push((sequence, sent, Instant::now()));
            }
            seen
        }));
    }
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let started = Instant::now();
    let measure_from = started + warmup;
    let end = measure_from + duration;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sequence = 0u64;
    let mut measured = Vec::new();
    loop {
        ticks.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= measure_from {
            measured.push(sequence);
        }
        let _ = sender.send((sequence, now, Arc::clone(&event)));
        sequence += 1;
    }
    drop(sender);
    let measured: std::collections::HashSet<u64> = measured.into_iter().collect();
    let mut stats = FanoutStats {
        latency: histogram(),
        from_send: histogram(),
        last: histogram(),
        events: measured.len() as u64,
        deliveries: 0,
        early: 0,
        missing: 0,
        elapsed: duration,
        cpu_per_delivery: None,
    };
    let mut last = std::collections::HashMap::<u64, u64>::new();
    for task in tasks {
        let seen = task.await.unwrap_or_default();
        let mut got = 0u64;
        for (sequence, sent, received) in seen {
            if !measured.contains(&sequence) {
                continue;
            }
            got += 1;
            let micros = received.duration_since(sent).as_micros() as u64;
            stats.latency.saturating_record(micros);
            stats.from_send.saturating_record(micros);
            let slot = last.entry(sequence).or_default();
            *slot = (*slot).max(micros);
        }
        stats.deliveries += got;
        stats.missing += measured.len() as u64 - got.min(measured.len() as u64);
    }
    for micros in last.into_values() {
        stats.last.saturating_record(micros);
    }
    stats
}

/// A latency histogram in microseconds, 1 µs to 1 hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// How the no-op servers that answer once their work is done (`noop_durable`, `noop_replica`)
/// answer a request: `item` goes to their worker with a reply slot, 200 once the worker says
/// done, 503 when it failed or is gone.
pub async fn answer_when_done<T>(
    worker: &mpsc::Sender<(T, oneshot::Sender<bool>)>,
    item: T,
) -> axum::http::StatusCode {
    let (reply, done) = oneshot::channel();
    if worker.send((item, reply)).await.is_err() {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    match done.await {
        Ok(true) => axum::http::StatusCode::OK,
        _ => axum::http::StatusCode::SERVICE_UNAVAILABLE,
    }
}
