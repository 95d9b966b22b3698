//! The other streams that stay open for as long as their client likes: gRPC health's `Watch`
//! and reflection's `ServerReflectionInfo`, beside WatchProfiles (which `super::watch` caps).
//!
//! Nothing counted them: each held about 14 KB, and 5,000 health watches on five connections
//! took 68 MB (found by an adversarial run); the listener's own caps allowed two million. Each
//! now takes one of [`OPEN_STREAMS_PER_CONNECTION`] slots of its connection (a client needs
//! one health watch per connection and a reflection stream at a time) and one of
//! `--max-watch-streams` slots in all, both held until the answer is dropped; past either the
//! call is refused RESOURCE_EXHAUSTED. Neither is a WatchProfiles slot: a client with
//! client-side health checking would otherwise lose one of its connection's watch streams to
//! it, and shutdown waits for WatchProfiles' slots before health streams end.
//!
//! Every other call passes through untouched (no allocation, no lookup beyond its path).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::http;

use super::transport::Connection;
use crate::metrics::Metrics;
use crate::status::{Rejection, grpc_status};

/// Health `Watch` and reflection streams one connection may have open at once.
pub const OPEN_STREAMS_PER_CONNECTION: usize = 16;

/// The paths of the open-ended streams this layer counts.
const OPEN_ENDED: [&str; 3] = [
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The layer that gives each open-ended stream its slots; see the module docs.
#[derive(Clone)]
pub struct OpenStreamsLayer {
    in_all: Arc<Semaphore>,
    limit: usize,
    metrics: Metrics,
}

impl OpenStreamsLayer {
    /// At most `limit` open-ended streams in all; refusals are counted in `metrics`.
    pub fn new(limit: usize, metrics: Metrics) -> Self {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        OpenStreamsLayer {
            in_all: Arc::new(Semaphore::new(limit)),
            limit,
            metrics,
        }
    }

    /// Both slots for a stream arriving on `connection` (none from a connection that did not
    /// come through the capped listener), or the refusal naming the limit reached.
    fn slots(&self, connection: Option<&Connection>) -> Result<Slots, tonic::Status> {
        let connection = match connection {
            None => None,
            Some(connection) => Some(connection.open_streams.try_open().map_err(|limit| {
                self.metrics.watch_stream_refused("connection");
                let scope = "on this connection";
                grpc_status(Rejection::TooManyOpenStreams { scope, limit })
            })?),
        };
        let in_all = Arc::clone(&self.in_all).try_acquire_owned().map_err(|_| {
            self.metrics.watch_stream_refused("server");
            let (scope, limit) = ("on this server", self.limit);
            grpc_status(Rejection::TooManyOpenStreams { scope, limit })
        })?;
        Ok(Slots {
            _connection: connection,
            _in_all: in_all,
        })
    }
}

/// What an open-ended stream holds until its answer is dropped.
struct Slots {
    _connection: Option<OwnedSemaphorePermit>,
    _in_all: OwnedSemaphorePermit,
}

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
        if !OPEN_ENDED.contains(&request.uri().path()) {
            return Either::Left(self.inner.call(request));
        }
        let slots = match self.layer.slots(Connection::of_http(&request)) {
            Ok(slots) => slots,
            Err(refused) => {
                return Either::Right(Box::pin(std::future::ready(Ok(refused.into_http()))));
            }
        };
        let answer = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let answer = answer.await?;
            Ok(answer.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _slots = &slots;
                    frame
                }))
            }))
        }))
    }
}
