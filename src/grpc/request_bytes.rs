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
//! What this module does not do: limit a message's size (tonic does, per service) or count
//! responses.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, Bytes, http};

use super::byte_budgets::{Budget, Budgets, Held};
use super::open_streams::REFLECTION;
use super::transport::Connection;

/// A connection's budget: this many of the largest messages.
const PER_CONNECTION: usize = 2;
/// The server's budget: this many of the largest messages.
const IN_ALL: usize = 16;

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
    arrival: Duration,
}

impl RequestBytesLayer {
    /// Budgets for messages of at most `max_message_bytes`, each to arrive within `arrival`.
    pub fn new(max_message_bytes: usize, arrival: Duration) -> Self {
        RequestBytesLayer {
            in_all: Budget::new(max_message_bytes, IN_ALL),
            arrival,
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
        self.inner.call(request.map(|body| {
            Body::new(Arriving {
                body,
                budgets,
                held: Held::default(),
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
        if self.streamed {
            self.deadline = None;
        }
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
                let arrival = this.arrival;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(arrival)));
                if deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.end();
                Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "the request did not arrive whole within {}s",
                    arrival.as_secs()
                )))))
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
