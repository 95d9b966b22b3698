//! What gRPC answers may hold while they wait to be sent: bytes per connection and in all.
//!
//! tonic encodes an answer whole and hyper hands it to h2, which keeps it until the client's
//! flow-control window lets it go: a client that asked for large answers and never read them
//! had the server hold them all, up to `--grpc-max-concurrent-streams` calls per connection
//! (about 6 MB each for a 4 MB ListProfiles page: 1.7 GB from 300 calls on two connections;
//! found by an adversarial run). Here an answer's first message, read as soon as the call
//! returns (hyper would not poll the body while the client's window is shut), draws its bytes
//! from its connection's budget (four times `--grpc-max-message-bytes`) and the server's (32
//! times it). It is handed to hyper in chunks of 16 KiB, and its bytes are given back as the
//! connection's socket takes them ([`AnswersSent`] counts what it writes). hyper takes a chunk
//! whenever the stream's window has a byte of room, and h2 keeps up to 400 KiB per stream that
//! the socket has not taken: a client that opened huge windows and never read held 475 MB on
//! one connection when chunks were given back as hyper took them (found by an adversarial
//! run). An answer past either budget is RESOURCE_EXHAUSTED instead, naming the budget.
//! Answers that clients read take their budget back as fast as the network carries them; only
//! clients that stop reading (or read far slower than they ask) meet the limits.
//!
//! The socket's count is every byte it wrote (frames' headers, other streams' messages), so
//! it gives back somewhat more than answers' bytes, never more than was handed over and not
//! yet given back: other bytes go out only while the client reads, and then so do the
//! answers'.
//!
//! A call refused because the server's budget is spent cuts the connection that holds the
//! most (`Holders`): one client that stops reading on enough connections would otherwise
//! refuse every other client's larger answers for as long as it stayed.
//!
//! What this module does not do: count a stream's later messages (a watch stream's outbox
//! bounds them, and a backup's stall timeout), or give a stalled answer a time limit.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, Bytes, http};

use super::byte_budgets::{Budget, Budgets, Held, Spent};
use super::transport::Connection;
use crate::poison::lock;

/// A connection's budget: this many of the largest messages.
const PER_CONNECTION: usize = 4;
/// The server's budget: this many of the largest messages.
const IN_ALL: usize = 32;

/// The bytes of answers a connection may hold unsent at once, and those its socket has yet
/// to take.
#[derive(Clone)]
pub struct ConnectionAnswerBytes {
    budget: Budget,
    unsent: Arc<Unsent>,
}

/// Answer bytes handed to hyper that the connection's socket has not taken yet: still drawn
/// from the connection's budget and the server's, given back as the socket takes bytes.
struct Unsent {
    bytes: AtomicUsize,
    /// The connection's stream is gone: bytes handed over now are given back at once.
    closed: AtomicBool,
    connection: Budget,
    in_all: Budget,
    /// Cancelled to cut the connection (`crate::server::cut`).
    cut: CancellationToken,
    peer: SocketAddr,
    /// What its budget had given back when a refusal last looked, and since when.
    seen: Mutex<Option<(usize, Instant)>>,
}

impl Unsent {
    fn handed_over(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        // Read after the addition: either this or `close` sees both, so nothing is left.
        if self.closed.load(Ordering::SeqCst) {
            self.give_back(self.bytes.swap(0, Ordering::SeqCst));
        }
    }

    /// The socket took `bytes`: as many unsent bytes are given back, at most all of them.
    fn sent(&self, bytes: usize) {
        if self.bytes.load(Ordering::Relaxed) == 0 {
            return;
        }
        let fewer = |unsent: usize| (unsent > 0).then(|| unsent.saturating_sub(bytes));
        if let Ok(unsent) = self
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, fewer)
        {
            self.give_back(unsent.min(bytes));
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.give_back(self.bytes.swap(0, Ordering::SeqCst));
    }

    fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.connection.give_back(bytes);
            self.in_all.give_back(bytes);
        }
    }

    /// Whether the connection holds answer bytes and has given none back for [`STALLED`], as
    /// refusals have seen it: a client reading its answers, however slowly, gives some back.
    fn stalled(&self, now: Instant) -> bool {
        let (used, given) = (self.connection.used(), self.connection.given_back());
        let mut seen = lock(&self.seen);
        match *seen {
            Some((was, since)) if was == given && used > 0 => now - since >= STALLED,
            _ => {
                *seen = (used > 0).then_some((given, now));
                false
            }
        }
    }
}

/// How long a connection holding answer bytes must give none back before a refusal for the
/// server's budget may cut it.
const STALLED: Duration = Duration::from_secs(1);

/// The layer that makes every answer body draw on its budgets.
#[derive(Clone)]
pub struct AnswerBytesLayer {
    in_all: Budget,
    max_message_bytes: usize,
    holders: Holders,
}

impl AnswerBytesLayer {
    /// Budgets for messages of at most `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> Self {
        AnswerBytesLayer {
            in_all: Budget::new(max_message_bytes, IN_ALL),
            max_message_bytes,
            holders: Holders::default(),
        }
    }

    /// A new connection's budget, drawing on this server's too; `cut` cuts the connection
    /// (from `peer`) if it holds the most when the server's budget is spent.
    pub fn connection(&self, peer: SocketAddr, cut: CancellationToken) -> ConnectionAnswerBytes {
        let budget = Budget::counting_given_back(self.max_message_bytes, PER_CONNECTION);
        let unsent = Arc::new(Unsent {
            bytes: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            connection: budget.clone(),
            in_all: self.in_all.clone(),
            cut,
            peer,
            seen: Mutex::new(None),
        });
        self.holders.add(&unsent);
        ConnectionAnswerBytes { budget, unsent }
    }
}

/// Every connection's answer bytes, for the server to cut the one that holds the most, of
/// those that have given none back for [`STALLED`], when its budget is spent: one client that
/// stops reading on enough connections could otherwise refuse every other client's larger
/// answers for as long as it stayed (found by an adversarial run). Cut, its calls fail and its
/// bytes come back; the calls refused meanwhile are told to retry in a moment. Clients still
/// reading are never cut.
#[derive(Clone, Default)]
struct Holders(Arc<Mutex<Vec<Weak<Unsent>>>>);

impl Holders {
    fn add(&self, unsent: &Arc<Unsent>) {
        let mut holders = lock(&self.0);
        // Closed connections go whenever the list doubles: amortized, no timer.
        if holders.len() == holders.capacity() {
            holders.retain(|holder| holder.strong_count() > 0);
        }
        holders.push(Arc::downgrade(unsent));
    }

    /// Cuts the stalled connection, other than `calling`'s, that holds the most answer bytes,
    /// if any.
    fn cut_heaviest(&self, calling: Option<&Arc<Unsent>>) {
        let now = Instant::now();
        let heaviest = {
            let mut holders = lock(&self.0);
            holders.retain(|holder| holder.strong_count() > 0);
            holders
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|holder| !holder.cut.is_cancelled())
                .filter(|holder| calling.is_none_or(|calling| !Arc::ptr_eq(holder, calling)))
                .filter(|holder| holder.stalled(now))
                .max_by_key(|holder| holder.connection.used())
        };
        let Some(heaviest) = heaviest else {
            return;
        };
        heaviest.cut.cancel();
        tracing::warn!(
            peer = %heaviest.peer,
            answer_bytes = heaviest.connection.used(),
            "cut the gRPC connection holding the most answers not yet read, none read for a \
             second: the server's budget for them was spent (a client that stops reading its \
             answers)"
        );
    }
}

/// A connection's stream that gives its answer budgets back the bytes it writes, and what is
/// still unsent when it is dropped (the connection is over).
pub struct AnswersSent<S> {
    io: S,
    unsent: Arc<Unsent>,
}

impl<S> AnswersSent<S> {
    /// `io`, the stream of the connection that `answer_bytes` belong to.
    pub fn new(io: S, answer_bytes: &ConnectionAnswerBytes) -> Self {
        AnswersSent {
            io,
            unsent: Arc::clone(&answer_bytes.unsent),
        }
    }
}

impl<S> Drop for AnswersSent<S> {
    fn drop(&mut self) {
        self.unsent.close();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AnswersSent<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnswersSent<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.unsent.sent(written);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
        self.unsent.sent(written);
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<S> tower::Layer<S> for AnswerBytesLayer {
    type Service = AnswerBytesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AnswerBytesService {
            inner,
            in_all: self.in_all.clone(),
            holders: self.holders.clone(),
        }
    }
}

/// The service [`AnswerBytesLayer`] wraps.
#[derive(Clone)]
pub struct AnswerBytesService<S> {
    inner: S,
    in_all: Budget,
    holders: Holders,
}

type Answer<E> = Result<http::Response<Body>, E>;

impl<S, B> tower::Service<http::Request<B>> for AnswerBytesService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Answer<S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let answer_bytes = Connection::of_http(&request).map(|c| c.answer_bytes.clone());
        let budgets = Budgets {
            connection: answer_bytes.as_ref().map(|bytes| bytes.budget.clone()),
            in_all: self.in_all.clone(),
            what: "answers not yet read by their clients",
            advice: "read the answers of earlier calls first, then call again",
        };
        let unsent = answer_bytes.map(|bytes| bytes.unsent);
        let holders = self.holders.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await?;
            Ok(
                Sending::first_frame(answer, budgets, unsent).unwrap_or_else(|(spent, unsent)| {
                    if spent.by_server {
                        holders.cut_heaviest(unsent.as_ref());
                    }
                    spent.status.into_http()
                }),
            )
        })
    }
}

/// At most this much of a counted message is handed to hyper at once. hyper takes a chunk
/// whenever the stream has a byte of window, and h2 keeps what the window does not let out:
/// a message handed over whole would be out of the count while still unsent (a client with a
/// window of 64 KiB that never reads held 4 MB pages that way).
const CHUNK: usize = 16 * 1024;

/// An answer's body: its first message counted in its budgets until its connection's socket
/// takes it, handed to hyper a chunk at a time as the client's window lets hyper take them. A
/// stream's later messages are not counted: its own bounds hold them (a watch stream's
/// outbox, a backup's stall timeout), and a count on each would cost every delivery.
struct Sending {
    body: Body,
    /// What is left of the first message, counted in `held`.
    rest: Bytes,
    held: Held,
    /// Where handed-over bytes are counted until sent; none for a connection that did not
    /// come through the capped listener (tests), whose bytes are given back as handed over.
    unsent: Option<Arc<Unsent>>,
}

impl Sending {
    /// `answer`, its first frame taken from its budgets at once when it is ready (a unary
    /// answer's whole message: tonic encodes it when its body is first polled). hyper polls a
    /// body only once the client's window has room, so a client whose window is shut would
    /// hold every answer unencoded and uncounted. Past a budget: which one, and `unsent`.
    fn first_frame(
        answer: http::Response<Body>,
        budgets: Budgets,
        unsent: Option<Arc<Unsent>>,
    ) -> Result<http::Response<Body>, (Spent, Option<Arc<Unsent>>)> {
        let (parts, mut body) = answer.into_parts();
        let waker = futures_util::task::noop_waker();
        let first = match Pin::new(&mut body).poll_frame(&mut Context::from_waker(&waker)) {
            Poll::Ready(Some(Ok(frame))) => frame,
            // Nothing yet (a stream's first message to come): as it is.
            Poll::Pending => return Ok(http::Response::from_parts(parts, body)),
            Poll::Ready(None) => return Ok(http::Response::from_parts(parts, Body::empty())),
            Poll::Ready(Some(Err(status))) => return Ok(status.into_http()),
        };
        let rest = match first.into_data() {
            Ok(data) => data,
            // Trailers first: the answer is over.
            Err(trailers) => {
                let only =
                    futures_util::stream::once(std::future::ready(Ok::<_, Status>(trailers)));
                let body = http_body_util::StreamBody::new(only);
                return Ok(http::Response::from_parts(parts, Body::new(body)));
            }
        };
        let mut held = Held::default();
        if let Err(spent) = budgets.take(rest.len(), &mut held) {
            return Err((spent, unsent));
        }
        let sending = Sending {
            body,
            rest,
            held,
            unsent,
        };
        Ok(http::Response::from_parts(parts, Body::new(sending)))
    }
}

impl HttpBody for Sending {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if !this.rest.is_empty() {
            let chunk = this.rest.split_to(this.rest.len().min(CHUNK));
            match &this.unsent {
                Some(unsent) => {
                    this.held.hand_over(chunk.len());
                    unsent.handed_over(chunk.len());
                }
                None => this.held.give_back(chunk.len()),
            }
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    /// The inner body's, with what is left of the first message: hyper sets a length from an
    /// exact hint, which without `rest` would be short.
    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.body.size_hint();
        let rest = self.rest.len() as u64;
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(hint.lower() + rest);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a connection that holds answer bytes and gives none back for a second, as
    /// refusals see it, may be cut: one whose client reads, however slowly, may not.
    #[test]
    fn a_connection_is_stalled_only_after_a_second_without_giving_bytes_back() {
        let layer = AnswerBytesLayer::new(1000);
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let bytes = layer.connection(peer, CancellationToken::new());
        let start = Instant::now();
        assert!(!bytes.unsent.stalled(start), "holds nothing");
        let budgets = Budgets {
            connection: Some(bytes.budget.clone()),
            in_all: layer.in_all.clone(),
            what: "answers",
            advice: "wait",
        };
        let mut held = Held::default();
        assert!(budgets.take(600, &mut held).is_ok());
        let second = Duration::from_secs(1);
        assert!(!bytes.unsent.stalled(start), "first seen");
        assert!(!bytes.unsent.stalled(start + second / 2));
        assert!(bytes.unsent.stalled(start + second));
        // Some read: not stalled, and a second more before it is again.
        held.hand_over(100);
        bytes.unsent.handed_over(100);
        bytes.unsent.sent(50);
        assert!(!bytes.unsent.stalled(start + 2 * second));
        assert!(!bytes.unsent.stalled(start + 2 * second + second / 2));
        assert!(bytes.unsent.stalled(start + 3 * second));
        // Taking more is not reading.
        assert!(budgets.take(100, &mut held).is_ok());
        assert!(bytes.unsent.stalled(start + 3 * second));
    }

    /// hyper sets a content length from an exact size hint: the first message read ahead
    /// still counts in it.
    #[test]
    fn the_size_hint_counts_the_first_message_read_ahead() {
        let full = http_body_util::Full::new(Bytes::from(vec![7; 100]));
        let answer = http::Response::new(Body::new(full));
        let budgets = Budgets {
            connection: None,
            in_all: Budget::new(1000, 1),
            what: "answers",
            advice: "wait",
        };
        let Ok(answer) = Sending::first_frame(answer, budgets, None) else {
            panic!("within the budget");
        };
        let (_, body) = answer.into_parts();
        assert_eq!(body.size_hint().exact(), Some(100));
    }
}
