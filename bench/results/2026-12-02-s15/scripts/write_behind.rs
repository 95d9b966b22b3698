//! Webhook answers written to their sockets by a thread of their own.
//!
//! The ingest thread (`ingest_thread.rs`) parses, verifies and sequences every webhook; on
//! this 2-core machine it is the one busy thread of the service, and about a third of its time
//! went into the `writev` of each answer (on loopback the kernel delivers the segment to the
//! reader inside that call). [`WriteBehind`] is the connection's stream with its writes
//! handed over: hyper's write copies the answer into the connection's [`Outbox`] and returns
//! at once, and the [`AnswerWriter`]'s thread sends it, so the second core does that work
//! while the ingest thread reads and sequences the next webhooks. A durable batch's answers,
//! which leave together when its sync ends, go out while the next batch is being built.
//!
//! What it keeps: bytes leave in the order they were written, each connection's bytes at
//! most once; a connection's shutdown (and so its close by hyper) waits until what was
//! written is sent; a write fails once a send failed. A peer that stops reading is not buffered
//! without bound: the thread never waits for a socket; when a send would block it leaves the
//! rest to the connection's own task ("stalled"), which writes it through tokio as any
//! connection would (and keeps the connection's deadlines), and past [`MAX_PENDING`] bytes a
//! write waits. The thread wakes only when an outbox is queued while it sleeps.
//!
//! Not here: HTTP (hyper writes the bytes), deadlines (`connections::Timed` wraps this), and
//! gRPC connections (tonic's own writes, on the main runtime).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::thread::Thread;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// How many unsent bytes a connection may hold before its writes wait (an answer is a few
/// hundred bytes: this is a client that stopped reading, or a very large answer).
pub const MAX_PENDING: usize = 64 * 1024;

/// How long the writer's thread sleeps at most before looking whether it should end.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// The thread that sends answers; a cheap handle. The thread ends once every handle and every
/// connection made with it are gone and nothing is left to send.
#[derive(Clone)]
pub struct AnswerWriter {
    shared: Arc<Shared>,
}

struct Shared {
    /// Outboxes with bytes to send, in the order they were queued.
    queue: Mutex<Vec<Arc<Outbox>>>,
    /// The thread is asleep (or about to be): whoever queues wakes it.
    parked: AtomicBool,
    thread: Thread,
}

impl AnswerWriter {
    /// Starts the thread (named `answers`).
    pub fn start() -> io::Result<AnswerWriter> {
        let (started, shared) = std::sync::mpsc::sync_channel::<Arc<Shared>>(1);
        std::thread::Builder::new()
            .name("answers".into())
            .spawn(move || {
                let shared = Arc::new(Shared {
                    queue: Mutex::new(Vec::new()),
                    parked: AtomicBool::new(false),
                    thread: std::thread::current(),
                });
                if started.send(Arc::clone(&shared)).is_ok() {
                    run(&shared);
                }
            })?;
        let shared = shared
            .recv()
            .map_err(|_| io::Error::other("the answer writer's thread ended at its start"))?;
        Ok(AnswerWriter { shared })
    }

    /// `stream` with its writes sent by this writer's thread.
    pub fn wrap(&self, stream: TcpStream) -> WriteBehind {
        let (read, write) = stream.into_split();
        WriteBehind {
            read,
            outbox: Arc::new(Outbox {
                stream: write,
                state: Mutex::new(State::default()),
            }),
            writer: self.clone(),
        }
    }

    fn enqueue(&self, outbox: Arc<Outbox>) {
        lock(&self.shared.queue).push(outbox);
        if self.shared.parked.swap(false, Ordering::SeqCst) {
            self.shared.thread.unpark();
        }
    }
}

/// The writer's loop: send what is queued, sleep when nothing is, end when nobody can queue.
fn run(shared: &Arc<Shared>) {
    let mut batch = Vec::new();
    let mut scratch = Vec::new();
    loop {
        std::mem::swap(&mut *lock(&shared.queue), &mut batch);
        if batch.is_empty() {
            // Only this thread holds `shared`: no handle, no connection left.
            if Arc::strong_count(shared) == 1 {
                return;
            }
            shared.parked.store(true, Ordering::SeqCst);
            // Queued between the swap and the flag: the queuer saw no flag, so look again.
            if lock(&shared.queue).is_empty() {
                std::thread::park_timeout(IDLE_CHECK);
            }
            shared.parked.store(false, Ordering::SeqCst);
            continue;
        }
        for outbox in batch.drain(..) {
            if outbox.send_pending(&mut scratch) {
                lock(&shared.queue).push(outbox);
            }
        }
    }
}

/// A connection's unsent bytes and how its sending goes.
struct Outbox {
    stream: OwnedWriteHalf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Written by hyper, not sent yet.
    pending: Vec<u8>,
    /// In the writer's queue (or being sent by it).
    queued: bool,
    /// A send would have blocked: the connection's task sends `pending` itself.
    stalled: bool,
    /// A send failed: every later write fails with this.
    failed: Option<io::ErrorKind>,
    /// The connection's task, waiting for room, for its shutdown, or to read: woken when a
    /// send ends, stalls or fails.
    waker: Option<Waker>,
}

impl Outbox {
    /// Sends the pending bytes from the writer's thread; true when more were written meanwhile
    /// (queue it again).
    fn send_pending(&self, scratch: &mut Vec<u8>) -> bool {
        scratch.clear();
        std::mem::swap(&mut lock(&self.state).pending, scratch);
        let socket = socket2::SockRef::from(self.stream.as_ref());
        let mut sent = 0;
        let outcome = loop {
            if sent == scratch.len() {
                break Ok(());
            }
            match socket.send(&scratch[sent..]) {
                Ok(count) => sent += count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => break Err(error),
            }
        };
        let mut state = lock(&self.state);
        let again = match outcome {
            Ok(()) => !state.pending.is_empty(),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                // Ahead of what was written meanwhile; the connection's task takes over.
                let later = std::mem::take(&mut state.pending);
                state.pending = scratch.split_off(sent);
                state.pending.extend_from_slice(&later);
                state.stalled = true;
                false
            }
            Err(error) => {
                state.failed = Some(error.kind());
                state.pending = Vec::new();
                false
            }
        };
        state.queued = again;
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        again
    }

    /// Sends a stalled outbox's bytes from the connection's task, through tokio's readiness.
    /// Ready once they are all sent (or failed).
    fn poll_send_stalled(&self, state: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let stream: &TcpStream = self.stream.as_ref();
        while !state.pending.is_empty() {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_write(&state.pending) {
                Ok(count) => {
                    state.pending.drain(..count);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    state.failed = Some(error.kind());
                    state.pending = Vec::new();
                    return Poll::Ready(Err(error));
                }
            }
        }
        state.stalled = false;
        Poll::Ready(Ok(()))
    }
}

/// A webhook connection whose writes the [`AnswerWriter`] sends; see the module docs.
pub struct WriteBehind {
    read: OwnedReadHalf,
    outbox: Arc<Outbox>,
    writer: AnswerWriter,
}

impl WriteBehind {
    fn failed(state: &State) -> io::Result<()> {
        match state.failed {
            Some(kind) => Err(io::Error::new(kind, "an earlier answer could not be sent")),
            None => Ok(()),
        }
    }
}

impl AsyncRead for WriteBehind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.read).poll_read(cx, buf);
        if read.is_pending() {
            // While bytes are in flight, a send that stalls must find this task: it writes
            // the rest (the peer may wait for it before sending more).
            let mut state = lock(&this.outbox.state);
            if state.stalled {
                // Pending or not, the read's own wake-up is registered; a failure shows at
                // the next write.
                let _ = this.outbox.poll_send_stalled(&mut state, cx);
            } else if state.queued {
                state.waker = Some(cx.waker().clone());
            }
        }
        read
    }
}

impl AsyncWrite for WriteBehind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut state = lock(&this.outbox.state);
        WriteBehind::failed(&state)?;
        if state.stalled {
            ready!(this.outbox.poll_send_stalled(&mut state, cx))?;
        }
        if state.pending.len() >= MAX_PENDING {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut count = 0;
        for buf in bufs {
            state.pending.extend_from_slice(buf);
            count += buf.len();
        }
        if count > 0 && !state.queued {
            state.queued = true;
            drop(state);
            this.writer.enqueue(Arc::clone(&this.outbox));
        }
        Poll::Ready(Ok(count))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Ready at once: the bytes are on their way (what a flush of a socket means too).
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        WriteBehind::failed(&lock(&self.outbox.state)).into()
    }

    /// Waits until everything written is sent, then shuts the socket's sending side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut state = lock(&this.outbox.state);
        WriteBehind::failed(&state)?;
        if state.stalled {
            ready!(this.outbox.poll_send_stalled(&mut state, cx))?;
        }
        if state.queued {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        drop(state);
        socket2::SockRef::from(this.outbox.stream.as_ref()).shutdown(std::net::Shutdown::Write)?;
        Poll::Ready(Ok(()))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing holding these locks panics halfway through a change.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
