//! What gRPC requests may hold while they arrive: bytes per connection and in all, and time.
//!
//! tonic keeps a request's bytes until its whole message is there, and hyper hands out flow
//! control credit as they are read, so a client that declares a large message and never
//! finishes it held up to `--grpc-max-message-bytes` per call, 1,000 calls per connection, for
//! as long as it stayed: 890 MB from 200 calls (found by an adversarial run). Every request
//! body here follows its messages' length prefixes, and while a message is incomplete its
//! bytes are drawn from its connection's budget (twice the message limit) and the server's
//! (16 times it), given back when it is whole or the body ends; a body that would go over
//! fails with `RESOURCE_EXHAUSTED`, and a message (the first, or one begun) not whole within
//! `--grpc-request-body-timeout` of the first wait for it with `DEADLINE_EXCEEDED`. A message
//! that comes whole in one frame, most of them, takes nothing, and its timer, if any, goes
//! with it. Every request of the API is one message, so a legitimate one arrives at once; the
//! limits bind only requests that stall or flood. A stream of requests (reflection's, the only
//! one) has no time limit on its wait between whole messages: a tool waits there between its
//! questions. Any other request must end within the timeout of its first wait, whatever it
//! sends meanwhile: tonic reads the body to its end before the call runs.
//!
//! A call still waiting for its request after [`UNCOUNTED_WAIT`] also draws what it holds
//! besides the bytes (`byte_budgets::CALL_BYTES`: its HTTP/2 stream and the call's state) from
//! its connection's budget and a server's budget of its own (as large), until its request
//! ends: a client that opened calls and sent their headers alone held about 15 KB each, none
//! refused, 300 MiB for 19,800 on 20 connections (found by an adversarial run). Past a budget
//! it is refused the same way. A legitimate request arrives within moments of
//! its headers, so it never draws this, whoever holds the budgets.
//!
//! What this module does not do: limit a message's size (tonic does, per service) or count
//! responses.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, Bytes, http};

use super::byte_budgets::{Budget, Budgets, Held, call_bytes};
use super::open_streams::REFLECTION;
use super::transport::Connection;

/// A connection's budget: this many of the largest messages.
const PER_CONNECTION: usize = 2;
/// The server's budget: this many of the largest messages.
const IN_ALL: usize = 16;
/// How long a call may wait for its request before what the call holds is counted: a
/// legitimate one comes right behind its headers.
const UNCOUNTED_WAIT: Duration = Duration::from_millis(100);

/// The bytes of requests a connection may be receiving at once.
#[derive(Clone)]
pub struct ConnectionRequestBytes(Budget);

impl ConnectionRequestBytes {
    /// A new connection's budget, for messages of at most `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> Self {
        ConnectionRequestBytes(Budget::new(max_message_bytes, PER_CONNECTION))
    }
}

/// The layer that gives every request body its budgets and its deadline.
#[derive(Clone)]
pub struct RequestBytesLayer {
    in_all: Budget,
    /// The server's budget for what calls waiting for their requests hold besides their
    /// bytes: its own, so that calls sending their headers alone cannot crowd out the bytes of
    /// requests arriving in several frames (found by an adversarial run: 96 KB of headers had
    /// every request larger than a frame refused).
    waiting: Budget,
    arrival: Duration,
    /// What a call waiting for its request holds (`byte_budgets::call_bytes`).
    call_bytes: usize,
}

impl RequestBytesLayer {
    /// Budgets for messages of at most `max_message_bytes`, each to arrive within `arrival`.
    pub fn new(max_message_bytes: usize, arrival: Duration) -> Self {
        RequestBytesLayer {
            in_all: Budget::new(max_message_bytes, IN_ALL),
            waiting: Budget::new(max_message_bytes, IN_ALL),
            arrival,
            call_bytes: call_bytes(max_message_bytes),
        }
    }
}

impl<S> tower::Layer<S> for RequestBytesLayer {
    type Service = RequestBytesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestBytesService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RequestBytesLayer`] wraps.
#[derive(Clone)]
pub struct RequestBytesService<S> {
    inner: S,
    layer: RequestBytesLayer,
}

impl<S> tower::Service<http::Request<Body>> for RequestBytesService<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let connection = request
            .extensions()
            .get::<Connection>()
            .map(|connection| connection.request_bytes.0.clone());
        let budgets = Budgets {
            connection,
            in_all: Some(self.layer.in_all.clone()),
            connection_share: None,
            what: "requests still arriving",
            advice: "send the request again once they are in",
        };
        let arrival = self.layer.arrival;
        let streamed = REFLECTION.contains(&request.uri().path());
        let (waiting, call_bytes) = (self.layer.waiting.clone(), self.layer.call_bytes);
        self.inner.call(request.map(|body| {
            Body::new(Arriving {
                body,
                budgets,
                held: Held::default(),
                waiting,
                call_bytes,
                call: None,
                deadline: None,
                between: false,
                streamed,
                arrival,
                ended: false,
                framing: Framing::default(),
            })
        }))
    }
}

/// Where a body is in its gRPC messages (each a 5-byte prefix, then as many bytes as it
/// declares): tonic holds a message's bytes until it is whole, so only those count.
#[derive(Default)]
struct Framing {
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the message still to come, once its prefix is whole.
    rest: u64,
}

impl Framing {
    /// Counts `data` in; whether a message is incomplete after it.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.prefix_len < self.prefix.len() {
                let take = (self.prefix.len() - self.prefix_len).min(data.len());
                self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
                self.prefix_len += take;
                data = &data[take..];
                if self.prefix_len == self.prefix.len() {
                    let [_, length @ ..] = self.prefix;
                    self.rest = u64::from(u32::from_be_bytes(length));
                    self.next_if_whole();
                }
                continue;
            }
            let take = usize::try_from(self.rest)
                .unwrap_or(usize::MAX)
                .min(data.len());
            self.rest -= take as u64;
            data = &data[take..];
            self.next_if_whole();
        }
        self.prefix_len > 0
    }

    fn next_if_whole(&mut self) {
        if self.rest == 0 {
            self.prefix_len = 0;
        }
    }
}

/// A request body drawing on its budgets until it ends, within its deadline.
struct Arriving {
    body: Body,
    budgets: Budgets,
    /// The bytes received so far, given back when the body ends or is dropped.
    held: Held,
    /// The server's budget for calls waiting for their requests, and what such a call draws
    /// on it and on its connection's.
    waiting: Budget,
    call_bytes: usize,
    /// What the call holds besides its bytes, once it has waited [`UNCOUNTED_WAIT`]: until
    /// its request ends, or for a stream of requests until its message is whole.
    call: Option<Held>,
    /// Set at the first wait for more while a message is due: the first, or one begun.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A message came whole and no other has begun.
    between: bool,
    /// The request is a stream of messages (reflection's): its wait for the next message is
    /// its client's to make as long as it likes (a tool's stream between questions). Every
    /// other request is one message, and tonic reads its body to the end before the call
    /// runs: that wait is timed too.
    streamed: bool,
    arrival: Duration,
    ended: bool,
    framing: Framing,
}

impl Arriving {
    fn hold(&mut self, bytes: usize) -> Result<(), Status> {
        (self.budgets.take(bytes, &mut self.held)).map_err(|spent| spent.status)
    }

    fn end(&mut self) {
        self.ended = true;
        self.between_messages();
    }

    /// No message incomplete: nothing held. A stream of requests waits for its next message
    /// untimed; any other request's wait for its end stays timed from its first wait (whole
    /// messages trickled in one by one held a unary call open; found by an adversarial run).
    fn between_messages(&mut self) {
        self.held = Held::default();
        self.between = true;
        if self.streamed || self.ended {
            self.call = None;
        }
        if self.streamed {
            self.deadline = None;
        }
    }

    /// Ready when the wait for more is over: past [`UNCOUNTED_WAIT`], what the call holds is
    /// drawn (a refusal past a budget ends it), then the deadline.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<Status> {
        let arrival = self.arrival;
        let first = UNCOUNTED_WAIT.min(arrival);
        let deadline = (self.deadline).get_or_insert_with(|| Box::pin(tokio::time::sleep(first)));
        ready!(deadline.as_mut().poll(cx));
        if self.call.is_none() {
            let budgets = Budgets {
                connection: self.budgets.connection.clone(),
                in_all: Some(self.waiting.clone()),
                connection_share: None,
                what: "calls waiting for their requests",
                advice: self.budgets.advice,
            };
            let mut held = Held::default();
            if let Err(spent) = budgets.take(self.call_bytes, &mut held) {
                return Poll::Ready(spent.status);
            }
            self.call = Some(held);
            let started = deadline.deadline() - first;
            deadline.as_mut().reset(started + arrival);
            if deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Poll::Ready(Status::deadline_exceeded(format!(
            "the request did not arrive whole within {}s",
            arrival.as_secs()
        )))
    }
}

impl HttpBody for Arriving {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Pin::new(&mut this.body).poll_frame(cx);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let Some(data) = frame.data_ref() else {
                    return Poll::Ready(Some(Ok(frame)));
                };
                if !this.framing.feed(data) {
                    this.between_messages();
                    return Poll::Ready(Some(Ok(frame)));
                }
                this.between = false;
                if let Err(status) = this.hold(data.len()) {
                    this.end();
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => {
                this.end();
                Poll::Ready(other)
            }
            Poll::Pending if this.between && this.streamed => Poll::Pending,
            Poll::Pending => {
                let failed = ready!(this.wait(cx));
                this.end();
                Poll::Ready(Some(Err(failed)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(length: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend(length.to_be_bytes());
        bytes.resize(5 + length as usize, b'x');
        bytes
    }

    /// A request body's frames, sent by a test.
    type Frames = tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, Status>>;

    /// `bytes` as the next frame of a request body.
    async fn send(frames: &Frames, bytes: &[u8]) {
        let frame = http_body::Frame::data(Bytes::copy_from_slice(bytes));
        frames.send(Ok(frame)).await.unwrap();
    }

    /// A call still waiting for its request after [`UNCOUNTED_WAIT`] draws what it holds
    /// (`byte_budgets::call_bytes`: 1 KiB here), from its connection's budget and the server's
    /// for waiting calls (not the one for requests' bytes), until its request ends; a stream of
    /// requests holds none of it between messages.
    #[tokio::test(start_paused = true)]
    async fn a_call_waiting_for_its_request_draws_what_it_holds_until_it_comes() {
        use http_body_util::BodyExt;
        let connection = Budget::new(65_536, PER_CONNECTION);
        let layer = RequestBytesLayer::new(65_536, Duration::from_secs(30));
        let request = |streamed| {
            let (frames, rx): (Frames, _) = tokio::sync::mpsc::channel(4);
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let body = Arriving {
                body: Body::new(http_body_util::StreamBody::new(stream)),
                budgets: Budgets {
                    connection: Some(connection.clone()),
                    in_all: Some(layer.in_all.clone()),
                    connection_share: None,
                    what: "requests still arriving",
                    advice: "wait",
                },
                held: Held::default(),
                waiting: layer.waiting.clone(),
                call_bytes: layer.call_bytes,
                call: None,
                deadline: None,
                between: false,
                streamed,
                arrival: layer.arrival,
                ended: false,
                framing: Framing::default(),
            };
            (frames, body)
        };
        let used = || (connection.used(), layer.in_all.used(), layer.waiting.used());
        let call = layer.call_bytes;
        assert_eq!(call, 1024);
        let pending = |body: &mut Arriving| {
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            Pin::new(body).poll_frame(&mut cx).is_pending()
        };

        // A unary request: nothing counted for its first 100 ms, then 4 KiB until it ends.
        let (frames, mut unary) = request(false);
        assert!(pending(&mut unary));
        tokio::time::advance(UNCOUNTED_WAIT / 2).await;
        assert!(pending(&mut unary));
        assert_eq!(used(), (0, 0, 0));
        tokio::time::advance(UNCOUNTED_WAIT).await;
        assert!(pending(&mut unary));
        assert_eq!(used(), (call, 0, call));
        send(&frames, &message(3)).await;
        drop(frames);
        while unary.frame().await.is_some() {}
        assert_eq!(used(), (0, 0, 0), "given back as it ends");

        // A stream of requests: between messages, nothing; a message that came whole at once
        // leaves the next one's wait to be counted.
        let (frames, mut stream) = request(true);
        send(&frames, &message(3)).await;
        assert!(stream.frame().await.is_some());
        let ten = message(10);
        send(&frames, &ten[..7]).await;
        assert!(stream.frame().await.is_some());
        assert!(pending(&mut stream), "the rest of the message due");
        tokio::time::advance(2 * UNCOUNTED_WAIT).await;
        assert!(pending(&mut stream));
        assert_eq!(used(), (7 + call, 7, call));
        send(&frames, &ten[7..]).await;
        assert!(stream.frame().await.is_some());
        assert_eq!(used(), (0, 0, 0), "a whole message: between messages");
        assert!(pending(&mut stream), "waiting for the next, untimed");
        tokio::time::advance(2 * UNCOUNTED_WAIT).await;
        assert!(pending(&mut stream));
        assert_eq!(used(), (0, 0, 0));
        // The next message begun and stalled: counted again.
        send(&frames, &ten[..7]).await;
        assert!(stream.frame().await.is_some());
        assert!(pending(&mut stream));
        tokio::time::advance(2 * UNCOUNTED_WAIT).await;
        assert!(pending(&mut stream));
        assert_eq!(used(), (7 + call, 7, call), "the second message's wait");
    }

    /// Only a message not yet whole counts, however its bytes are cut into frames.
    #[test]
    fn framing_follows_messages_across_frames() {
        let mut framing = Framing::default();
        assert!(!framing.feed(&message(3)), "whole in one frame");
        assert!(!framing.feed(&message(0)), "an empty message");
        let ten = message(10);
        assert!(framing.feed(&ten[..2]), "the prefix cut");
        assert!(
            framing.feed(&ten[2..7]),
            "the prefix whole, two bytes of ten"
        );
        assert!(!framing.feed(&ten[7..]), "the rest");
        let mut two = message(4);
        two.extend(message(6));
        assert!(framing.feed(&two[..12]), "one whole, the next begun");
        assert!(!framing.feed(&two[12..]));
        assert!(!framing.feed(&[]), "nothing");
    }
}
