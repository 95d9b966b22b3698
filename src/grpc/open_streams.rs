//! The other calls that stay open for as long as their client likes: gRPC health's `Watch`
//! and reflection's `ServerReflectionInfo`, beside WatchProfiles (which `super::watch` caps),
//! and health `Check`s whose answers their clients do not read.
//!
//! Nothing counted them: each held about 14 KB, and 5,000 health watches on five connections
//! took 68 MB (found by an adversarial run); the listener's own caps allowed two million. A
//! connection may now have [`OPEN_STREAMS_PER_CONNECTION`] of them open (a client needs one
//! health watch per service name it checks and a reflection stream at a time); one more is
//! refused RESOURCE_EXHAUSTED. The bound in all is that times `--max-grpc-connections`. There
//! is deliberately no server-wide count: health and reflection answer without a token, and
//! slots anyone can take would let one client refuse every other client's health watch,
//! which client-side health checking reads as the server being down (found by the next run).
//! Neither are these WatchProfiles slots: a connection full of watch streams keeps its health
//! watch.
//!
//! A health `Check` is a unary call, but its answer waits for as long as its client leaves it
//! unread, holding its HTTP/2 stream (about 12 KB), and health answers draw on no server-wide
//! budget (`super::byte_budgets::server_budget_for`): 1,000 checks parked on each of 2,048
//! connections would have taken about 24 GB (found by an adversarial run). A connection may
//! have [`HEALTH_CHECKS_PER_CONNECTION`] of them in progress, slots of their own (a connection
//! full of health watches still has its checks answered); one more is refused
//! RESOURCE_EXHAUSTED. A prober has one in progress at a time.
//!
//! Reflection streams also end at the start of shutdown (UNAVAILABLE, "server shutting
//! down"): a grpcurl session left open held the drain for the whole `--shutdown-grace`. Health
//! watches end in shutdown's own order, after they have seen NOT_SERVING. A reflection stream
//! whose requests fail on the way in (`super::request_bytes`: a message that stalls or floods)
//! ends with that failure's status: tonic-reflection ends it as if answered in full (OK).
//!
//! Every other call passes through untouched (no allocation, no lookup beyond its path).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use futures_util::future::Either;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, Bytes, http};

use super::transport::Connection;
use crate::metrics::Metrics;
use crate::status::{Rejection, grpc_status};

/// Health `Watch` and reflection streams one connection may have open at once.
pub const OPEN_STREAMS_PER_CONNECTION: usize = 8;

/// Health `Check` calls one connection may have in progress at once.
pub const HEALTH_CHECKS_PER_CONNECTION: usize = 8;

const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// Reflection's method paths: the API's only requests that are streams of messages.
pub(super) const REFLECTION: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The layer that gives each open-ended stream its slot; see the module docs.
#[derive(Clone)]
pub struct OpenStreamsLayer {
    metrics: Metrics,
    stopping: CancellationToken,
}

impl OpenStreamsLayer {
    /// Refusals counted in `metrics`; reflection streams end when `stopping` is cancelled.
    pub fn new(metrics: Metrics, stopping: CancellationToken) -> Self {
        OpenStreamsLayer { metrics, stopping }
    }

    /// The slot of a stream (or a health check, `check`) arriving on `connection` (none from
    /// a connection that did not come through the capped listener), or the refusal.
    fn slot(&self, connection: Option<&Connection>, check: bool) -> Result<Slot, Status> {
        let Some(connection) = connection else {
            return Ok(None);
        };
        let slots = match check {
            true => &connection.health_checks,
            false => &connection.open_streams,
        };
        slots
            .try_open()
            .map(|slot| Some(Arc::new(slot)))
            .map_err(|limit| {
                self.metrics.watch_stream_refused("connection");
                match check {
                    true => grpc_status(Rejection::TooManyHealthChecks { limit }),
                    false => grpc_status(Rejection::TooManyOpenStreams { limit }),
                }
            })
    }
}

/// What an open-ended stream holds until its answer is dropped and h2 has let go of every
/// chunk of it ([`SlotChunk`]).
type Slot = Option<Arc<OwnedSemaphorePermit>>;

impl<S> tower::Layer<S> for OpenStreamsLayer {
    type Service = OpenStreamsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OpenStreamsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`OpenStreamsLayer`] wraps around tonic's routes.
#[derive(Clone)]
pub struct OpenStreamsService<S> {
    inner: S,
    layer: OpenStreamsLayer,
}

type Answer<E> = Result<http::Response<Body>, E>;

impl<S> tower::Service<http::Request<Body>> for OpenStreamsService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Pin<Box<dyn Future<Output = Answer<S::Error>> + Send>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let reflection = REFLECTION.contains(&path);
        let check = path == HEALTH_CHECK;
        if !reflection && !check && path != HEALTH_WATCH {
            return Either::Left(self.inner.call(request));
        }
        let slot = match self.layer.slot(Connection::of_http(&request), check) {
            Ok(slot) => slot,
            Err(refused) => {
                return Either::Right(Box::pin(std::future::ready(Ok(refused.into_http()))));
            }
        };
        let stopping = || Box::pin(self.layer.stopping.clone().cancelled_owned());
        let failure = reflection.then(Arc::default);
        // A reflection stream's requests end at shutdown too: the service waits for the next
        // one, holding the stream (and the drain) open until the client half-closes.
        let request = match &failure {
            Some(failure) => request.map(|body| {
                Body::new(Requests {
                    body: Some(body),
                    stopping: stopping(),
                    failure: Arc::clone(failure),
                })
            }),
            None => request,
        };
        let stopping = reflection.then(stopping);
        let answer = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let answer = answer.await?;
            Ok(answer.map(|body| {
                Body::new(Holding {
                    body,
                    slot,
                    stopping,
                    failure,
                    ended: false,
                })
            }))
        }))
    }
}

/// An open-ended stream's answer: holds its slot, and ends at `stopping` if it has one, or
/// with its requests' failure if they failed. Each of its chunks holds the slot too, until h2
/// lets go of it: hyper ends a body once h2 has taken its last chunk and trailers, while h2
/// keeps them behind a window its client holds at one byte, and the slot went with the body
/// (a client parked 990 health checks on each connection that way; found by an adversarial
/// run).
struct Holding {
    body: Body,
    slot: Slot,
    stopping: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    failure: Option<RequestFailure>,
    ended: bool,
}

/// Why a reflection stream's requests failed, once they have.
type RequestFailure = Arc<OnceLock<Status>>;

impl HttpBody for Holding {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        // tonic yields whole messages per frame, so trailers may follow any frame.
        if let Some(stopping) = &mut this.stopping
            && stopping.as_mut().poll(cx).is_ready()
        {
            this.ended = true;
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(shutting_down()))));
        }
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        this.ended = match &frame {
            Some(Ok(frame)) => frame.is_trailers(),
            _ => true,
        };
        let failed = this.failure.as_ref().and_then(|failure| failure.get());
        match (frame, failed) {
            (Some(Ok(frame)), Some(failed)) if frame.is_trailers() => {
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers_of(failed)))))
            }
            (Some(Ok(frame)), _) => Poll::Ready(Some(Ok(SlotChunk::holding(frame, &this.slot)))),
            (frame, _) => Poll::Ready(frame),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }
}

/// A chunk of an open-ended stream's answer, holding its stream's slot until h2 lets go of it.
struct SlotChunk {
    bytes: Bytes,
    _slot: Arc<OwnedSemaphorePermit>,
}

impl SlotChunk {
    /// `frame`, its data holding `slot` (if any) too.
    fn holding(frame: http_body::Frame<Bytes>, slot: &Slot) -> http_body::Frame<Bytes> {
        let Some(slot) = slot else {
            return frame;
        };
        frame.map_data(|bytes| {
            let _slot = Arc::clone(slot);
            Bytes::from_owner(SlotChunk { bytes, _slot })
        })
    }
}

impl AsRef<[u8]> for SlotChunk {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A reflection stream's requests: they end at `stopping` (the client's body let go of, which
/// resets its side of the stream), and a failure is kept for the answer to end with.
struct Requests {
    body: Option<Body>,
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    failure: RequestFailure,
}

impl HttpBody for Requests {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.stopping.as_mut().poll(cx).is_ready() {
            self.body = None;
        }
        let Some(body) = &mut self.body else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(body).poll_frame(cx));
        if let Some(Err(status)) = &frame {
            let _ = self.failure.set(status.clone());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(HttpBody::is_end_stream)
    }
}

/// The trailers that end a stream with `status`; a status that cannot be written (none of
/// ours: their messages are ASCII) ends it UNKNOWN.
fn trailers_of(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        trailers.insert("grpc-status", http::HeaderValue::from_static("2"));
    }
    trailers
}

/// The trailers that end a stream at shutdown: UNAVAILABLE (14), "server shutting down" (all
/// printable ASCII, so nothing to percent-encode).
fn shutting_down() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
    let message = http::HeaderValue::from_static("server shutting down");
    trailers.insert("grpc-message", message);
    trailers
}
