//! The connections a listener holds, and how long they may sit there doing nothing.
//!
//! [`CappedListener`] accepts at most `max` connections at once (`--max-webhook-connections`,
//! `--max-grpc-connections`); one past the cap is closed at once, counted in
//! `profile_state_connections_refused_total` and warned about at most every ten seconds, so a
//! flood of idle sockets cannot use up the process's open files and starve the other ports.
//! [`serve_http`] (the webhook and admin listeners) closes its idlest connection instead, if
//! one has no request in progress, and serves the new one; so does the gRPC listener, whose
//! connections tonic serves, through [`Evictable`].
//! [`Timed`] wraps each accepted connection with its deadlines:
//! - [`Deadlines::Requests`] (the webhook listener): while no request is in progress, a
//!   connection that sends nothing is closed after the idle timeout (counted from the end of
//!   its last request), and one that has started a request's headers (or an HTTP/2 preface)
//!   after the header timeout (counted from the first wait for more of them: a request that
//!   arrives whole never moves the timer). The request's body and answer are the handler's
//!   business (`--webhook-body-timeout`, `--webhook-timeout`).
//! - [`Deadlines::Preface`] (the gRPC listener): the 24 bytes of the HTTP/2 client preface
//!   must arrive within the handshake timeout, counted from the accept; after that HTTP/2
//!   keepalive watches the connection. Under TLS the stream is `super::tls::TlsConnection`,
//!   so the TLS handshake runs inside the same deadline and the preface is counted in
//!   decrypted bytes.
//!
//! A deadline that passes makes the next read fail with `TimedOut`, which makes hyper close
//! the connection; it is counted in `profile_state_connections_timed_out_total`. On the
//! webhook listener, an HTTP/2 client that sends more control frames than it may
//! (`crate::grpc::control_frames`) is closed the same way, counted in
//! `profile_state_connections_cut_total{reason="control_frames"}`. Nothing else here knows
//! HTTP beyond the preface's length.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::Body as _;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::activity::{Activity, Arriving};
use crate::grpc::control_frames::{self, ControlFrames};
use crate::logging::RateLimited;
use crate::metrics::{ConnectionMetrics, ListenerMetrics};

/// Length of the HTTP/2 client connection preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
pub const HTTP2_PREFACE_BYTES: usize = 24;

/// A listener holding at most `max` connections at once; see the module docs.
pub struct CappedListener {
    tcp: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    metrics: ListenerMetrics,
    refusals: RateLimited,
    accept_errors: RateLimited,
}

/// What an accepted connection holds until it closes: its place under the cap and its count
/// in the open-connections gauge.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _open: ConnectionMetrics,
}

/// The flag that sets a listener's connection cap, for the warning of a refusal (found by a
/// first-user review: the limit was given, not what sets it); the admin listener's is fixed.
fn limit_flag(listener: &str) -> Option<&'static str> {
    match listener {
        "grpc" => Some("--max-grpc-connections"),
        "webhook" => Some("--max-webhook-connections"),
        _ => None,
    }
}

impl CappedListener {
    /// `tcp`, capped at `max` connections, counted under `metrics`' listener label.
    pub fn new(tcp: TcpListener, max: usize, metrics: ListenerMetrics) -> CappedListener {
        CappedListener {
            tcp,
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
            metrics,
            refusals: RateLimited::default(),
            accept_errors: RateLimited::default(),
        }
    }

    /// The listener's connection metrics.
    pub fn metrics(&self) -> ListenerMetrics {
        self.metrics.clone()
    }

    /// The next connection within the cap, with `TCP_NODELAY` set (answers go out as soon as
    /// they are written). A connection past the cap first asks `make_room` to close another
    /// one; if it did, the connection waits for its place (a second at most), and if not it is
    /// closed at once. Not cancel-safe while it waits: the connection accepted is dropped.
    pub async fn accept_making_room(
        &self,
        mut make_room: impl FnMut() -> bool,
    ) -> (TcpStream, SocketAddr, Slot) {
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: wait a moment rather than spin,
                    // so the connections that hold them can finish.
                    if let Some(suppressed) = self.accept_errors.due() {
                        tracing::warn!(
                            listener = self.metrics.listener(),
                            %error,
                            suppressed,
                            "cannot accept a connection"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let permit = match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) if make_room() => {
                    let place = Arc::clone(&self.slots).acquire_owned();
                    tokio::time::timeout(Duration::from_secs(1), place)
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
                Err(_) => None,
            };
            let Some(permit) = permit else {
                self.metrics.refused();
                if let Some(suppressed) = self.refusals.due() {
                    tracing::warn!(
                        listener = self.metrics.listener(),
                        limit = self.max,
                        flag = limit_flag(self.metrics.listener()),
                        suppressed,
                        "connection refused: too many connections open"
                    );
                }
                continue;
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
            let slot = Slot {
                _permit: permit,
                _open: self.metrics.opened(),
            };
            return (stream, peer, slot);
        }
    }
}

/// The most an HTTP/1 connection buffers of what it reads, a request's line and headers
/// whole (more: 431). hyper's default, about 400 KiB, let one client hold that much per
/// connection in headers for the header timeout: 800 MB at the webhook port's 2,048
/// connections (found by an adversarial run). HTTP/2's header list is capped at 16 KiB by
/// hyper; Gameball's headers take well under 1 KiB, and proxies' rarely more than 8 KiB.
pub(crate) const HTTP1_MAX_BUF_BYTES: usize = 32 * 1024;

/// How [`serve_http`] serves its connections.
pub struct HttpOptions {
    /// The idle timeout of [`Deadlines::Requests`].
    pub idle: Duration,
    /// The header timeout of [`Deadlines::Requests`].
    pub header: Duration,
    /// HTTP/1.1 only if `None`; else HTTP/2 (prior knowledge) too, with at most this many
    /// requests at once on a connection.
    pub http2_streams: Option<u32>,
}

/// Each open connection's requests and task, by task: what eviction chooses from.
type OpenConnections = HashMap<tokio::task::Id, (Arc<Activity>, tokio::task::AbortHandle)>;

/// Serves `router` on `listener` until `stopping`, then lets in-flight requests finish (idle
/// connections close at once). Each connection has the idle and header timeouts of
/// [`Deadlines::Requests`]. The connections belong to the returned future: dropping it (an
/// aborted task) cuts them all, which is how shutdown keeps its grace whatever clients do.
/// At the cap, the connection idle the longest (no request in progress) is closed to make room
/// for a new one, which is closed itself only when none is idle: idle connections held open by
/// one client kept every other out (found by adversarial runs). With TCP_NODELAY; the
/// protocols as `options` say.
pub async fn serve_http(
    listener: CappedListener,
    router: axum::Router,
    options: HttpOptions,
    stopping: CancellationToken,
) -> io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(HTTP1_MAX_BUF_BYTES);
    match options.http2_streams {
        None => builder = builder.http1_only(),
        Some(streams) => {
            builder.http2().max_concurrent_streams(streams);
        }
    }
    let (idle, header) = (options.idle, options.header);
    let mut connections = JoinSet::new();
    let mut open = OpenConnections::new();
    loop {
        let make_room = || {
            reap(&mut connections, &mut open);
            let evicted = evict_idlest(&open);
            if let Some(timeout) = evicted {
                listener.metrics().timed_out(timeout);
            }
            evicted.is_some()
        };
        let (stream, peer, slot) = tokio::select! {
            accepted = listener.accept_making_room(make_room) => accepted,
            () = stopping.cancelled() => break,
        };
        reap(&mut connections, &mut open);
        let activity = Arc::new(Activity::default());
        let activity_of_task = Arc::clone(&activity);
        let deadlines = Deadlines::Requests {
            activity: Arc::clone(&activity),
            idle,
            header,
            peer,
        };
        let io = Timed::new(stream, slot, deadlines, listener.metrics(), ());
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let busy = activity.begin();
            let arriving = (!request.body().is_end_stream()).then(|| activity.body_arriving());
            let request = request.map(|body| ArrivingBody { body, arriving });
            let answer = tower::ServiceExt::oneshot(router.clone(), request);
            async move {
                let answer = answer.await;
                drop(busy);
                answer
            }
        });
        let connection = builder.serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection.into_owned());
        let task = connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection closed with an error");
            }
        });
        open.insert(task.id(), (activity_of_task, task));
    }
    drop(listener);
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Forgets the connections that ended.
fn reap(connections: &mut JoinSet<()>, open: &mut OpenConnections) {
    while let Some(ended) = connections.try_join_next_with_id() {
        let id = match ended {
            Ok((id, ())) => id,
            Err(error) => error.id(),
        };
        open.remove(&id);
    }
}

/// Closes the connection with no request in progress that has been idle the longest, or else
/// the one whose requests have all been waiting for their bodies the longest, or else the
/// oldest of those accepted less than [`NEW_CONNECTION_GRACE`] ago with no request yet: what
/// was closed (the `timeout` label it is counted under), if anything was. A connection
/// answering a request is never closed. Slow bodies counted as work kept the cap: 2,048
/// connections each sending an unsigned body a byte a second, and another after each 408, had
/// signed webhooks' new connections closed at once; and a new connection, idle until its
/// request's head is read, was the idlest when the next one came (found by an adversarial
/// run). A request whose body is complete between the check and the abort is cut before its
/// answer: never acknowledged, so the sender retries it (a webhook's merge makes a retry of a
/// recorded update harmless).
fn evict_idlest(open: &OpenConnections) -> Option<&'static str> {
    let running = || open.values().filter(|(_, task)| !task.is_finished());
    let idle = |new: bool| {
        running()
            .filter(move |(activity, _)| {
                !activity.in_progress() && activity.new_within(NEW_CONNECTION_GRACE) == new
            })
            .min_by_key(|(activity, _)| activity.last_end())
            .map(|(_, task)| task)
    };
    let arriving = || {
        running()
            .filter_map(|(activity, task)| Some((activity.only_arriving_since()?, task)))
            .min_by_key(|(since, _)| *since)
            .map(|(_, task)| task)
    };
    let (task, timeout) = idle(false)
        .map(|task| (task, "idle"))
        .or_else(|| arriving().map(|task| (task, "body")))
        .or_else(|| idle(true).map(|task| (task, "idle")))?;
    task.abort();
    Some(timeout)
}

/// How long a new connection with no request yet is closed to make room only when no other
/// can be: long enough for a sender's first request to arrive, short enough that sockets opened
/// and left silent soon count as idle.
const NEW_CONNECTION_GRACE: Duration = Duration::from_secs(1);

/// A request's body that tells its connection's [`Activity`] when its last byte is read (or
/// the body is dropped): until then the request is only arriving, and its connection can be
/// closed at the cap like an idle one ([`evict_idlest`]).
struct ArrivingBody {
    body: Incoming,
    arriving: Option<Arriving>,
}

impl http_body::Body for ArrivingBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = matches!(polled, Poll::Ready(None | Some(Err(_))));
        if ended || self.body.is_end_stream() {
            self.arriving = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Connections served by a task out of our reach (tonic's), which the listener closes at its
/// cap through their cut token (`super::cut`): the one with no call in progress that has been
/// idle the longest, as [`serve_http`] does with its own tasks. 2,048 idle gRPC connections,
/// answering pings and making no call, kept every other client out for as long as they stayed
/// (found by an adversarial run).
#[derive(Clone, Default)]
pub struct Evictable(Arc<Mutex<Vec<EvictableConnection>>>);

/// A connection's activity, and the token that cuts it.
type EvictableConnection = (Weak<Activity>, CancellationToken);

impl Evictable {
    /// A connection's activity and the token that cuts it. The entry goes once the connection
    /// and its calls are gone (the last `Arc` of its activity).
    pub fn add(&self, activity: &Arc<Activity>, cut: CancellationToken) {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        open.retain(|(activity, _)| activity.strong_count() > 0);
        open.push((Arc::downgrade(activity), cut));
    }

    /// Cuts the connection with no call in progress idle the longest; whether there was one.
    /// A call that begins on it between the check and the cut fails with the connection, and
    /// its client retries it, as with [`serve_http`]'s eviction; a connection still in its
    /// TLS handshake or preface has no call, so it goes first if it came first.
    pub fn evict_idlest(&self) -> bool {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        open.retain(|(activity, cut)| activity.strong_count() > 0 && !cut.is_cancelled());
        let idlest = open
            .iter()
            .enumerate()
            .filter_map(|(index, (activity, _))| {
                let activity = activity.upgrade()?;
                (!activity.in_progress()).then(|| (index, activity.last_end()))
            })
            .min_by_key(|(_, last_end)| *last_end);
        let Some((index, _)) = idlest else {
            return false;
        };
        let (_, cut) = open.swap_remove(index);
        cut.cancel();
        true
    }
}

/// The connections of `listener` as tonic's incoming stream, each turned by `open` into the
/// stream tonic reads (the TCP stream itself, or TLS over it) and a tag made from the peer's
/// address, with the handshake timeout of [`Deadlines::Preface`]; at the cap, the idlest of
/// `evictable` is closed for a new one.
pub fn incoming<T: Send + 'static, S: Send + 'static>(
    listener: CappedListener,
    handshake: Duration,
    open: impl Fn(TcpStream, SocketAddr) -> (S, T) + Send + 'static,
    evictable: Evictable,
) -> impl futures_util::Stream<Item = io::Result<Timed<T, S>>> + Send + 'static {
    futures_util::stream::unfold((listener, open), move |(listener, open)| {
        let evictable = evictable.clone();
        async move {
            let metrics = listener.metrics();
            let make_room = || {
                let evicted = evictable.evict_idlest();
                if evicted {
                    metrics.timed_out("idle");
                }
                evicted
            };
            let (stream, peer, slot) = listener.accept_making_room(make_room).await;
            let deadlines = Deadlines::Preface { handshake };
            let (stream, tag) = open(stream, peer);
            let io = Timed::new(stream, slot, deadlines, listener.metrics(), tag);
            Some((Ok(io), (listener, open)))
        }
    })
}

/// Raises the soft limit of open files to the hard limit, so the connection caps, not the
/// default of 1024 descriptors, decide how many connections are served; logs the result.
pub fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
    }
}

/// Which deadlines a connection has; see the module docs.
pub enum Deadlines {
    /// Idle and header timeouts while no request of `activity` is in progress.
    Requests {
        /// The connection's requests, counted by its service.
        activity: Arc<Activity>,
        /// Nothing received and no request in progress.
        idle: Duration,
        /// A request's headers started but not complete.
        header: Duration,
        /// The client's address, for the log.
        peer: SocketAddr,
    },
    /// The HTTP/2 preface within the handshake timeout, from the accept.
    Preface {
        /// The handshake timeout.
        handshake: Duration,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request: the idle deadline runs.
    Idle,
    /// Part of a request's headers arrived, and the connection has not waited for more yet:
    /// the header deadline is set when it first does. Most requests arrive whole in one read
    /// and are in progress before the connection waits again, so they never move the timer
    /// (moving it earlier takes the timer driver's lock: a measurable cost per webhook).
    HeaderArrived,
    /// Part of a request's headers (or the preface) arrived: the header deadline runs.
    Header,
    /// A request is in progress: no deadline.
    Busy,
    /// The preface arrived: no deadline from here on.
    Done,
}

/// An accepted connection with its [`Deadlines`]; `tag` is what tonic's `Connected` hands to
/// every request on it (`()` for the webhook listener). `S` is what is read and written: the
/// TCP stream, or the TLS stream over it (whose handshake then runs under the deadlines).
pub struct Timed<T, S = TcpStream> {
    io: S,
    _slot: Slot,
    deadlines: Deadlines,
    phase: Phase,
    preface_left: usize,
    timer: Pin<Box<Sleep>>,
    metrics: ListenerMetrics,
    /// The control frames an HTTP/2 client sends, on listeners that serve requests (the
    /// webhook's; `None` on the gRPC listener, whose `FramesWatched` counts them).
    control: Option<ControlFrames>,
    tag: T,
}

impl<T, S> Timed<T, S> {
    /// Wraps a connection `accept` returned; its first deadline starts now.
    pub fn new(io: S, slot: Slot, deadlines: Deadlines, metrics: ListenerMetrics, tag: T) -> Self {
        let (phase, first, control) = match &deadlines {
            Deadlines::Requests { idle, .. } => {
                (Phase::Idle, *idle, Some(ControlFrames::default()))
            }
            Deadlines::Preface { handshake } => (Phase::Header, *handshake, None),
        };
        Timed {
            io,
            _slot: slot,
            deadlines,
            phase,
            preface_left: HTTP2_PREFACE_BYTES,
            timer: Box::pin(tokio::time::sleep(first)),
            metrics,
            control,
            tag,
        }
    }

    fn arm(&mut self, phase: Phase, after: Duration) {
        self.phase = phase;
        self.timer.as_mut().reset(Instant::now() + after);
    }

    /// The connection's HTTP/2 client sent more control frames than it may: counted and warned
    /// of (at most every 10 s), and the error that closes it. The webhook listener's
    /// connections are served on the ingest thread, which such a flood held for as long as
    /// its header deadline let it, every time its client connected again, and with a request
    /// kept in progress (no deadline runs then) for as long as it liked (found by adversarial
    /// runs).
    fn cut_for_control_frames(&self) -> io::Error {
        static WARNINGS: RateLimited = RateLimited::new();
        self.metrics.cut("control_frames");
        if let Some(suppressed) = WARNINGS.due() {
            // Only connections with `Requests` deadlines count the frames.
            let peer = match &self.deadlines {
                Deadlines::Requests { peer, .. } => peer.to_string(),
                Deadlines::Preface { .. } => String::new(),
            };
            tracing::warn!(
                listener = self.metrics.listener(),
                peer,
                burst = control_frames::BURST,
                per_second = control_frames::PER_SECOND,
                suppressed,
                "{}",
                control_frames::CUT
            );
        }
        io::Error::other("too many HTTP/2 control frames")
    }

    /// `received` bytes arrived: the header deadline starts, or the preface is counted.
    fn received(&mut self, received: usize) {
        if received == 0 {
            return;
        }
        match &self.deadlines {
            Deadlines::Requests { activity, .. } => {
                // Busy and no request in progress: the last one ended, and the connection has
                // not waited since (it would be Idle then).
                let waiting = matches!(self.phase, Phase::Idle | Phase::Busy);
                if waiting && !activity.in_progress() {
                    self.phase = Phase::HeaderArrived;
                }
            }
            Deadlines::Preface { .. } => {
                self.preface_left = self.preface_left.saturating_sub(received);
                if self.preface_left == 0 {
                    self.phase = Phase::Done;
                }
            }
        }
    }

    /// Called when the connection waits: the error that closes it once its deadline passed.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Deadlines::Requests {
            activity,
            idle,
            header,
            ..
        } = &self.deadlines
        {
            match (activity.in_progress(), self.phase) {
                // No deadline, but the timer stays armed so that the connection is polled
                // again after the request ended (see `Activity`).
                (true, _) => {
                    self.phase = Phase::Busy;
                    if self.timer.is_elapsed() {
                        let idle = *idle;
                        self.arm(Phase::Busy, idle);
                    }
                    let _ = self.timer.as_mut().poll(cx);
                    return None;
                }
                (false, Phase::Busy) => {
                    let deadline = activity.last_end() + *idle;
                    self.phase = Phase::Idle;
                    self.timer.as_mut().reset(deadline);
                }
                // The first wait for the rest of the headers: their deadline starts now (the
                // bytes that began them arrived in the read just before).
                (false, Phase::HeaderArrived) => {
                    let header = *header;
                    self.arm(Phase::Header, header);
                }
                (false, _) => {}
            }
        }
        let which = match self.phase {
            Phase::Busy | Phase::Done => return None,
            Phase::Idle => "idle",
            Phase::HeaderArrived | Phase::Header => match self.deadlines {
                Deadlines::Requests { .. } => "header",
                Deadlines::Preface { .. } => "handshake",
            },
        };
        self.timer.as_mut().poll(cx).is_ready().then(|| {
            self.metrics.timed_out(which);
            self.phase = Phase::Done;
            io::Error::new(io::ErrorKind::TimedOut, format!("{which} timeout"))
        })
    }
}

impl<T: Unpin, S: AsyncRead + Unpin> AsyncRead for Timed<T, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if let Some(control) = &mut this.control
                    && !control.read(read)
                {
                    // Not handed on: hyper would parse the rest of the flood first.
                    buf.set_filled(before);
                    return Poll::Ready(Err(this.cut_for_control_frames()));
                }
                this.received(read.len());
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match this.expired(cx) {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Pending,
            },
        }
    }
}

impl<T: Unpin, S: AsyncWrite + Unpin> AsyncWrite for Timed<T, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            // A client that stops reading our answers is as idle as one that sends nothing.
            Poll::Pending => this
                .expired(cx)
                .map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
            ready => ready,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this
                .expired(cx)
                .map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => this
                .expired(cx)
                .map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<T: Clone + Send + Sync + Unpin + 'static, S> tonic::transport::server::Connected
    for Timed<T, S>
{
    type ConnectInfo = T;

    fn connect_info(&self) -> T {
        self.tag.clone()
    }
}
