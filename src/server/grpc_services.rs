//! The gRPC listener as served: ProfileService behind the bearer-token interceptor,
//! AdminService behind its stricter one (`AdminAuth`), health and reflection open, every service under the one message-size limit,
//! and the per-call metrics layer around them all.
//!
//! The listener gets a stop token of its own: shutdown stops gRPC only after the watch streams
//! have sent their last messages (`super::shutdown`), and a cut token that ends the
//! connections still open at the end of the grace (`super::cut`).

use std::future::Future;
use std::pin::Pin;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::grpc::admin::AdminApi;
use crate::grpc::answer_bytes::{AnswerBytesLayer, FramesWatched};
use crate::grpc::auth::{AdminAuth, BearerAuth};
use crate::grpc::backup::BackupApi;
use crate::grpc::certificates::TlsCertificates;
use crate::grpc::dead_letters::DeadLetterApi;
use crate::grpc::open_streams::{
    HEALTH_CHECKS_PER_CONNECTION, OPEN_STREAMS_PER_CONNECTION, OpenStreamsLayer,
};
use crate::grpc::request_bytes::{ConnectionRequestBytes, RequestBytesLayer};
use crate::grpc::transport::{Connection, ConnectionWatches, MetricsLayer};
use crate::grpc::{ProfileApi, ProfileServiceRoutes};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::pb;
use crate::pb::admin_service_server::AdminServiceServer;
use crate::reconcile::ReconcileJobs;
use crate::replication::ReplicaStatus;
use crate::store::Store;
use crate::watch::Watchers;

use super::coalesce::Coalescing;
use super::connections::{self, CappedListener, Evictable};
use super::cut::Cuttable;
use super::tls::{HandshakeFailures, TlsConnection};

/// Applies the one message-size limit, both ways, and the request compressions every service
/// takes (`ACCEPTED_ENCODINGS`, as `ProfileServiceRoutes` does) to a generated service. tonic
/// sets both per service, with methods of the same names on each generated type (no trait to
/// be generic over), hence a macro.
macro_rules! limited {
    ($service:expr, $bytes:expr) => {{
        let mut service = $service
            .max_decoding_message_size($bytes)
            .max_encoding_message_size($bytes);
        for encoding in crate::grpc::ACCEPTED_ENCODINGS {
            service = service.accept_compressed(encoding);
        }
        service
    }};
}

/// Largest request health and reflection decode: they name a service, a file or a symbol.
/// Their streams stay open as long as the client likes, tonic-reflection echoes each request
/// in its answer, and a bidi stream keeps its decoding buffer: with the message limit (and
/// gzip) each reflection stream could hold 10 to 19 MB for a few kilobytes sent, with no
/// credentials (found by an adversarial run).
const SMALL_REQUEST_BYTES: usize = 16 * 1024;

/// Largest reflection answer, whatever `--grpc-max-message-bytes` says: the API's own
/// descriptors (about 29 KB for ProfileService) plus the request echoed. Under the message
/// limit, a limit below that size left grpcurl unable to describe or call anything (found by a
/// first-user review); what reflection answers does not grow with the data.
const REFLECTION_ANSWER_BYTES: usize = 1024 * 1024;

/// A reflection service: requests of at most [`SMALL_REQUEST_BYTES`] and not compressed
/// (a few bytes each; grpcurl and the like send them plain), answers up to the message limit
/// or [`REFLECTION_ANSWER_BYTES`], whichever is larger.
macro_rules! small_requests {
    ($service:expr, $bytes:expr) => {
        $service
            .max_decoding_message_size(SMALL_REQUEST_BYTES)
            .max_encoding_message_size(REFLECTION_ANSWER_BYTES.max($bytes))
    };
}

/// How the gRPC listener speaks: tonic's server as configured (keepalive, concurrent
/// streams), and TLS, which the listener terminates itself (`super::tls`).
pub(super) struct Transport {
    /// The tonic server as configured, without TLS.
    pub builder: tonic::transport::Server,
    /// `--grpc-tls-cert` and friends; `None` for plaintext.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The dates of the certificates served and trusted; `None` for plaintext.
    pub certificates: Option<TlsCertificates>,
}

/// What the gRPC listener serves, and with which limits.
pub(super) struct Services<H> {
    /// The tonic server and TLS.
    pub transport: Transport,
    /// Wraps ProfileService.
    pub auth: BearerAuth,
    /// Wraps AdminService.
    pub admin_auth: AdminAuth,
    /// The health service, whose statuses the server reports.
    pub health: HealthServer<H>,
    /// What ProfileService and AdminService answer from.
    pub apis: Apis,
    /// What calls may take.
    pub limits: Limits,
}

/// What ProfileService and AdminService answer from.
pub(super) struct Apis {
    /// What ProfileService reads.
    pub store: Store,
    /// The store's watch layer, which WatchProfiles opens feeds through.
    pub watchers: Watchers,
    /// Whether the store is persisted (reported by GetServerInfo).
    pub durable: bool,
    /// The ingest path, whose dead letters AdminService serves and replays.
    pub ingest: Ingest,
    /// The reconcile jobs AdminService starts and reports.
    pub reconcile: ReconcileJobs,
    /// Counts calls and watch activity.
    pub metrics: Metrics,
    /// The replica's standing, in replicated mode (GetServerInfo reports it).
    pub replica: Option<ReplicaStatus>,
}

impl Apis {
    /// The two services under `limits`; watch feeds run on `tracker` and end on `stopping`.
    fn build(
        self,
        limits: &Limits,
        stopping: &CancellationToken,
        tracker: &TaskTracker,
    ) -> (ProfileApi, AdminApi) {
        let limit = limits.max_message_bytes;
        let admin = AdminApi::new(
            DeadLetterApi::new(self.ingest, limit),
            BackupApi::new(self.store.clone(), limit, limits.backup_stall_timeout),
            self.reconcile,
        );
        let mut profiles = ProfileApi::new(
            self.store,
            self.watchers,
            self.durable,
            stopping.clone(),
            tracker.clone(),
            self.metrics,
        )
        .with_max_watch_streams(limits.max_watch_streams)
        .with_max_message_bytes(limit);
        if let Some(replica) = self.replica {
            profiles = profiles.with_replica(replica);
        }
        (profiles, admin)
    }
}

/// What one RPC, and all of them together, may take.
pub(super) struct Limits {
    /// `--max-watch-streams`.
    pub max_watch_streams: usize,
    /// `--max-watch-streams-per-connection`.
    pub max_watch_streams_per_connection: usize,
    /// `--grpc-max-message-bytes`.
    pub max_message_bytes: usize,
    /// `--grpc-handshake-timeout`: from the accept, the TLS handshake (if any) and the HTTP/2
    /// preface must be done within it.
    pub handshake_timeout: std::time::Duration,
    /// `--grpc-request-body-timeout`: a request's message must arrive whole within it.
    pub request_body_timeout: std::time::Duration,
    /// `--backup-stall-timeout`: a Backup's client must take a piece within it.
    pub backup_stall_timeout: std::time::Duration,
    /// `--grpc-keepalive-interval` plus `--grpc-keepalive-timeout` (none without keepalive):
    /// the longest a connection's write may wait for its socket.
    pub write_stall: Option<std::time::Duration>,
}

/// The gRPC listener, serving.
pub(super) struct Serving {
    /// The server's task.
    pub task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// Stops the server (after the watch streams ended).
    pub stopping: CancellationToken,
    /// Cuts every connection still open (at the end of the shutdown grace).
    pub cut: CancellationToken,
    /// Completes once every watch stream has been handed to tonic and dropped.
    pub watch_streams_closed: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// Serves `services` on `listener`. Watch feeds run on `tracker` and end when `stopping` is
/// cancelled; the server itself stops on [`Serving::stopping`].
pub(super) fn serve<H: Health>(
    listener: CappedListener,
    services: Services<H>,
    stopping: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Serving> {
    let Services {
        transport: Transport { builder, tls, .. },
        auth,
        admin_auth,
        health,
        apis,
        limits,
    } = services;
    let (limit, metrics) = (limits.max_message_bytes, apis.metrics.clone());
    let (profiles, admin) = apis.build(&limits, stopping, tracker);
    // Every stream a connection may hold open: its watches, health and reflection watches,
    // and a backup.
    let open_streams = limits.max_watch_streams_per_connection + OPEN_STREAMS_PER_CONNECTION + 1;
    let answers = AnswerBytesLayer::new(limit, open_streams)
        .counting_frames_in(metrics.unsent_stream_bytes(), metrics.queued_watch_bytes())
        .counting_cuts_in(metrics.connections_cut());
    let watch_streams_closed = Box::pin(profiles.streams_closed());
    // Health and reflection stay open (probes, grpcurl); ProfileService needs a token when
    // tokens are configured, AdminService credentials or a loopback peer (`AdminAuth`).
    let router = builder
        .layer(MetricsLayer::new(metrics.clone()))
        .layer(RequestBytesLayer::new(limit, limits.request_body_timeout))
        .layer(answers.clone())
        .layer(OpenStreamsLayer::new(metrics.clone(), stopping.clone()))
        .add_service(limited!(health, limit).max_decoding_message_size(SMALL_REQUEST_BYTES))
        .add_service(small_requests!(reflection_v1()?, limit))
        .add_service(small_requests!(reflection_v1alpha()?, limit))
        .add_service(InterceptedService::new(
            ProfileServiceRoutes::new(profiles, limit),
            auth,
        ))
        .add_service(InterceptedService::new(
            limited!(AdminServiceServer::new(admin), limit),
            admin_auth,
        ));
    let grpc_stopping = CancellationToken::new();
    let stopped = grpc_stopping.clone().cancelled_owned();
    let cut = CancellationToken::new();
    // The listener sets TCP_NODELAY: answers go out as soon as they are written.
    let evictable = Evictable::default();
    let connection = tagging(&cut, evictable.clone(), &limits, answers);
    let (handshake_timeout, write_stall) = (limits.handshake_timeout, limits.write_stall);
    let task = match tls {
        None => {
            let open = move |tcp, peer| {
                let (cut, tag) = connection(peer);
                let tcp = FramesWatched::new(tcp, &tag.answer_bytes);
                (Cuttable::new(Coalescing::new(tcp), cut, write_stall), tag)
            };
            let incoming = connections::incoming(listener, handshake_timeout, open, evictable);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        Some(acceptor) => {
            let failures = HandshakeFailures::new(metrics.tls_handshakes());
            let open = move |tcp, peer| {
                let (cut, tag) = connection(peer);
                let tls = TlsConnection::accepting(&acceptor, tcp, &failures);
                let tls = FramesWatched::new(tls, &tag.answer_bytes);
                (Cuttable::new(Coalescing::new(tls), cut, write_stall), tag)
            };
            let incoming = connections::incoming(listener, handshake_timeout, open, evictable);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    Ok(Serving {
        task,
        stopping: grpc_stopping,
        cut,
        watch_streams_closed,
    })
}

/// What each accepted connection gets: its cut token (a child of `cut`), its activity (in
/// `registry`, for the listener to close the idlest at its cap), and its own limits on watch
/// streams, open streams, request bytes and answer bytes.
fn tagging(
    cut: &CancellationToken,
    registry: Evictable,
    limits: &Limits,
    answers: AnswerBytesLayer,
) -> impl Fn(std::net::SocketAddr) -> (CancellationToken, Connection) + Clone + Send + 'static {
    let cuttable = cut.clone();
    let (per_connection, limit) = (
        limits.max_watch_streams_per_connection,
        limits.max_message_bytes,
    );
    move |peer| {
        let cut = cuttable.child_token();
        let activity = std::sync::Arc::new(crate::activity::Activity::default());
        registry.add(&activity, cut.clone());
        let tag = Connection {
            peer,
            watches: ConnectionWatches::new(per_connection),
            open_streams: ConnectionWatches::new(OPEN_STREAMS_PER_CONNECTION),
            health_checks: ConnectionWatches::new(HEALTH_CHECKS_PER_CONNECTION),
            request_bytes: ConnectionRequestBytes::new(limit),
            answer_bytes: answers.connection(peer, cut.clone()),
            activity,
        };
        (cut, tag)
    }
}

fn reflection_v1() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_file_descriptor_set(crate::status::error_details_descriptors())
        .build_v1()?)
}

// grpcurl before 1.8.8 speaks only v1alpha, so both versions are served.
fn reflection_v1alpha() -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_file_descriptor_set(crate::status::error_details_descriptors())
        .build_v1alpha()?)
}
