//! The fan-out transport baseline: WatchProfiles on the no-op gRPC server, the transport's own
//! cost with none of the service's work.
//!
//! Built like the service's WatchProfiles (`grpc/watch.rs` there): the method is routed before
//! the generated router, served by tonic's `Grpc::server_streaming` with a codec that decodes
//! the request with prost and writes pre-encoded responses as they are, with the service's
//! encode buffer settings. Each stream begins with `Synced`, then gets every published change.
//! A change is encoded once (a whole `WatchProfilesResponse` of the same size as the service's,
//! its revision set) and the bytes are shared by every stream through one tokio broadcast
//! channel, which each stream polls directly: no task, filter, history or store per subscriber.
//!
//! The trigger is a POST on its own HTTP listener (so the ingest baseline stays a no-op): it
//! publishes the next change, then answers `{"outcome":"applied","revision":N}` as the service
//! does, so the tool measures both with the same code and clock (`scenarios::fanout`).
//!
//! What it does not do: filter, resume, keep history or handle slow readers (a stream that lags
//! the channel by more than its capacity ends).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use profile_state::pb;
use profile_state::pb::watch_profiles_response::Event;
use prost::Message;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

/// The path the service serves WatchProfiles on.
const WATCH_PROFILES_PATH: &str = "/gameball.profiles.v1.ProfileService/WatchProfiles";
/// Changes a stream may fall behind before it ends.
const CAPACITY: usize = 4096;
/// The service's encode buffer settings for a watch stream (`grpc/watch.rs`).
const STREAM_BUFFER_BYTES: usize = 1024;
const STREAM_YIELD_BYTES: usize = 32 * 1024;

/// The published changes: a template change and the broadcast channel every stream reads.
pub struct NoopWatch {
    template: pb::ProfileChange,
    revision: AtomicU64,
    changes: broadcast::Sender<Bytes>,
}

impl NoopWatch {
    /// Changes like `profile`'s update of its points (the message the service sends).
    pub fn new(profile: pb::Profile) -> Arc<NoopWatch> {
        Arc::new(NoopWatch {
            template: pb::ProfileChange {
                r#type: pb::ChangeType::Updated.into(),
                profile: Some(profile),
                changed_fields: vec!["activated_points".into(), "total_points".into()],
                ..Default::default()
            },
            revision: AtomicU64::new(0),
            changes: broadcast::channel(CAPACITY).0,
        })
    }

    /// Encodes the next change once and hands it to every stream; returns its revision.
    fn publish(&self) -> u64 {
        let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
        let mut change = self.template.clone();
        change.revision = revision;
        if let Some(profile) = &mut change.profile {
            profile.revision = revision;
        }
        let message = pb::WatchProfilesResponse {
            event: Some(Event::Change(change)),
        };
        // No stream open is not an error: the trigger still answers.
        let _ = self.changes.send(Bytes::from(message.encode_to_vec()));
        revision
    }

    /// The trigger: POST (any path, any body) publishes a change and answers like the webhook.
    pub fn trigger(self: &Arc<Self>) -> Router {
        let watch = Arc::clone(self);
        Router::new().fallback(post(move || {
            let revision = watch.publish();
            async move { axum::Json(serde_json::json!({"outcome": "applied", "revision": revision})) }
        }))
    }
}

/// The no-op `ProfileService` with WatchProfiles served by [`NoopWatch`].
#[derive(Clone)]
pub struct Routes<S> {
    pub generated: S,
    pub watch: Arc<NoopWatch>,
}

impl<S: NamedService> NamedService for Routes<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Routes<S>
where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        >,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.generated.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != WATCH_PROFILES_PATH {
            return Box::pin(self.generated.call(request));
        }
        let method = Method(Arc::clone(&self.watch));
        Box::pin(async move {
            let mut grpc = Grpc::new(PassThroughCodec);
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}

struct Method(Arc<NoopWatch>);

type Changes = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

impl ServerStreamingService<pb::WatchProfilesRequest> for Method {
    type Response = Bytes;
    type ResponseStream = Changes;
    type Future = std::future::Ready<Result<Response<Changes>, Status>>;

    fn call(&mut self, _request: Request<pb::WatchProfilesRequest>) -> Self::Future {
        let synced = pb::WatchProfilesResponse {
            event: Some(Event::Synced(pb::Synced {
                revision: self.0.revision.load(Ordering::Relaxed),
                store_id: "noop".into(),
            })),
        };
        let first = tokio_stream::once(Ok(Bytes::from(synced.encode_to_vec())));
        let changes = BroadcastStream::new(self.0.changes.subscribe())
            .map_while(|change| change.ok().map(Ok));
        std::future::ready(Ok(Response::new(Box::pin(first.chain(changes)))))
    }
}

/// Decodes the request with prost; writes pre-encoded responses as they are.
#[derive(Clone, Copy)]
struct PassThroughCodec;

impl Codec for PassThroughCodec {
    type Encode = Bytes;
    type Decode = pb::WatchProfilesRequest;
    type Encoder = PassThroughCodec;
    type Decoder = tonic_prost::ProstDecoder<pb::WatchProfilesRequest>;

    fn encoder(&mut self) -> PassThroughCodec {
        PassThroughCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(BufferSettings::default())
    }
}

impl Encoder for PassThroughCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER_BYTES, STREAM_YIELD_BYTES)
    }
}
