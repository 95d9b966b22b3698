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
//! The ingest-impact part of `fanout` measures the no-op webhook endpoint with watchers open,
//! as it measures ours: [`NoopWatch::deliver`] gives each webhook to the streams that want it,
//! so the deliveries cost the transport what they cost the service's. A stream of
//! `customer_ids` gets the webhooks that name one of them (the customer id found in the body by
//! a substring search, no JSON parse), a stream of another account none, any other stream
//! every webhook. While no stream is open a webhook costs one atomic load, so the plain ingest
//! baseline is unchanged.
//!
//! What it does not do: resume, keep history or handle slow readers (a stream that lags the
//! channel by more than its capacity ends; a customer stream's changes beyond its capacity are
//! dropped).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use profile_state::pb;
use profile_state::pb::watch_profiles_response::Event;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
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

/// The published changes: a template change, the broadcast channel every stream of all
/// customers reads, and the streams of one customer each.
pub struct NoopWatch {
    template: pb::ProfileChange,
    revision: AtomicU64,
    changes: broadcast::Sender<Bytes>,
    /// Customer id -> the streams that watch it.
    customers: Mutex<HashMap<String, Vec<mpsc::Sender<Bytes>>>>,
    /// Streams open on the broadcast channel and in `customers`: a webhook looks no further
    /// while both are 0.
    broadcast_streams: AtomicUsize,
    customer_streams: AtomicUsize,
}

/// Where a webhook body names its customer (the workload's bodies, `workload.rs`).
const CUSTOMER_KEY: &str = "\"customer_id\":\"";

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
            customers: Mutex::default(),
            broadcast_streams: AtomicUsize::new(0),
            customer_streams: AtomicUsize::new(0),
        })
    }

    /// The next change, encoded once.
    fn next_change(&self) -> (u64, Bytes) {
        let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
        let mut change = self.template.clone();
        change.revision = revision;
        if let Some(profile) = &mut change.profile {
            profile.revision = revision;
        }
        let message = pb::WatchProfilesResponse {
            event: Some(Event::Change(change)),
        };
        (revision, Bytes::from(message.encode_to_vec()))
    }

    /// Encodes the next change once and hands it to every broadcast stream; returns its
    /// revision.
    fn publish(&self) -> u64 {
        let (revision, change) = self.next_change();
        // No stream open is not an error: the trigger still answers.
        let _ = self.changes.send(change);
        revision
    }

    /// A webhook arrived at the no-op endpoint: one change to every stream that wants it.
    pub fn deliver(&self, body: &[u8]) {
        if self.broadcast_streams.load(Ordering::Relaxed) > 0 {
            self.publish();
        }
        if self.customer_streams.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(customer) = customer_of(body) else {
            return;
        };
        let mut customers = self
            .customers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(streams) = customers.get_mut(customer) else {
            return;
        };
        let (_, change) = self.next_change();
        streams.retain(|stream| match stream.try_send(change.clone()) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// A stream of the changes of `customer_ids`.
    fn watch_customers(self: &Arc<Self>, customer_ids: Vec<String>) -> Changes {
        let (sender, receiver) = mpsc::channel(CAPACITY);
        let mut customers = self
            .customers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for customer in customer_ids {
            customers.entry(customer).or_default().push(sender.clone());
        }
        let changes = ReceiverStream::new(receiver).map(Ok);
        Counted::boxed(changes, self, |watch| &watch.customer_streams)
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

/// The customer id a workload body names.
fn customer_of(body: &[u8]) -> Option<&str> {
    let body = std::str::from_utf8(body).ok()?;
    let start = body.find(CUSTOMER_KEY)? + CUSTOMER_KEY.len();
    let length = body[start..].find('"')?;
    Some(&body[start..start + length])
}

/// A stream counted in one of [`NoopWatch`]'s stream counts while it is open.
struct Counted<S> {
    changes: S,
    watch: Arc<NoopWatch>,
    count: fn(&NoopWatch) -> &AtomicUsize,
}

impl<S: Stream<Item = Result<Bytes, Status>> + Send + Unpin + 'static> Counted<S> {
    fn boxed(changes: S, watch: &Arc<NoopWatch>, count: fn(&NoopWatch) -> &AtomicUsize) -> Changes {
        count(watch).fetch_add(1, Ordering::Relaxed);
        Box::pin(Counted {
            changes,
            watch: Arc::clone(watch),
            count,
        })
    }
}

impl<S: Stream + Unpin> Stream for Counted<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<S::Item>> {
        std::pin::Pin::new(&mut self.changes).poll_next(cx)
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        (self.count)(&self.watch).fetch_sub(1, Ordering::Relaxed);
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

    fn call(&mut self, request: Request<pb::WatchProfilesRequest>) -> Self::Future {
        let watch = &self.0;
        let synced = pb::WatchProfilesResponse {
            event: Some(Event::Synced(pb::Synced {
                revision: watch.revision.load(Ordering::Relaxed),
                store_id: "noop".into(),
            })),
        };
        let first = tokio_stream::once(Ok(Bytes::from(synced.encode_to_vec())));
        let request = request.into_inner();
        let account = watch
            .template
            .profile
            .as_ref()
            .map(|p| p.client_id.as_str());
        let changes: Changes =
            if !request.client_id.is_empty() && Some(request.client_id.as_str()) != account {
                // The workload's webhooks all name the template's account: this stream gets none.
                Box::pin(tokio_stream::pending())
            } else if !request.customer_ids.is_empty() {
                watch.watch_customers(request.customer_ids)
            } else {
                let changes = BroadcastStream::new(watch.changes.subscribe())
                    .map_while(|change| change.ok().map(Ok));
                Counted::boxed(changes, watch, |watch| &watch.broadcast_streams)
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Workload;

    fn request(client_id: &str, customer_ids: Vec<String>) -> Request<pb::WatchProfilesRequest> {
        Request::new(pb::WatchProfilesRequest {
            client_id: client_id.into(),
            customer_ids,
            ..Default::default()
        })
    }

    /// The events a stream has ready now (it never ends while its server lives).
    async fn ready(stream: &mut Changes) -> usize {
        let mut count = 0;
        while let Ok(Some(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(20), stream.next()).await
        {
            count += 1;
        }
        count
    }

    /// A WatchProfiles stream of the no-op, past its `Synced`.
    async fn open(watch: &Arc<NoopWatch>, request: Request<pb::WatchProfilesRequest>) -> Changes {
        let response = Method(Arc::clone(watch)).call(request).await.unwrap();
        let mut stream = response.into_inner();
        assert_eq!(ready(&mut stream).await, 1, "Synced first");
        stream
    }

    #[tokio::test]
    async fn each_webhook_reaches_the_streams_that_want_it_and_closed_streams_stop_the_work() {
        let workload = Workload::new("bench", 10, "s");
        let watch = NoopWatch::new(workload.profile(0));
        let customer = Workload::customer_id(3);
        let mut one = open(&watch, request("bench", vec![customer])).await;
        let mut all = open(&watch, request("bench", Vec::new())).await;
        let mut other = open(&watch, request("bench-other", Vec::new())).await;

        for n in 0..10 {
            watch.deliver(&workload.update(n).body);
        }
        assert_eq!(ready(&mut one).await, 1, "only customer 3's webhook");
        assert_eq!(ready(&mut all).await, 10, "every webhook");
        assert_eq!(
            ready(&mut other).await,
            0,
            "another account's stream gets none"
        );

        // Closed streams leave the endpoint a no-op again.
        drop((one, all));
        assert_eq!(watch.customer_streams.load(Ordering::Relaxed), 0);
        assert_eq!(watch.broadcast_streams.load(Ordering::Relaxed), 0);
        let revision = watch.revision.load(Ordering::Relaxed);
        watch.deliver(&workload.update(0).body);
        watch.deliver(&workload.update(3).body);
        assert_eq!(
            watch.revision.load(Ordering::Relaxed),
            revision,
            "nothing encoded"
        );
        drop(other);
    }
}
