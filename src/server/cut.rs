//! Connections the server can cut, whoever runs their task: [`Cuttable`] wraps a gRPC
//! connection's stream so that, once its token is cancelled, every read and write that would
//! wait fails instead, and hyper drops the connection (and the calls and watch streams on it).
//! The listener cuts its idlest connection to make room at its cap
//! (`super::connections::Evictable`).
//!
//! A write that has waited longer than its stall limit (the keepalive interval plus its
//! timeout) fails too: a client that reads nothing fills the socket, and then keepalive's own
//! PING cannot go out, so the connection stayed open, calls and all, for as long as the
//! client liked (found by an adversarial run).
//!
//! tonic spawns each connection's task itself, out of our reach, and its graceful shutdown
//! waits for calls that may never end (a watcher that stopped reading, a half-open
//! connection). A binary ends them by exiting; an in-process `Server::run` (tests, embedding)
//! cancels the token at the end of `--shutdown-grace` instead (`super::shutdown`). This module
//! does not decide when; it knows nothing of HTTP/2.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A stream that fails every read and write once its token is cancelled, and a write that
/// waits past its stall limit; see the module docs.
pub struct Cuttable<S> {
    io: S,
    /// Boxed: the future is not `Unpin`, and the stream must be.
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The longest a write may wait; none without keepalive.
    write_stall: Option<Duration>,
    /// Running while a write waits.
    waiting_since: Option<Pin<Box<Sleep>>>,
}

impl<S> Cuttable<S> {
    /// `io`, cut when `cut` is cancelled, its writes failing once one has waited
    /// `write_stall`. Give each connection a child token of its own, so connections do not
    /// contend on one token's lock.
    pub fn new(io: S, cut: CancellationToken, write_stall: Option<Duration>) -> Self {
        Cuttable {
            io,
            cut: Box::pin(cut.cancelled_owned()),
            write_stall,
            waiting_since: None,
        }
    }

    /// A write's outcome, failed instead if it waits and has waited past the stall limit
    /// (else `cx` is woken when it has).
    fn unless_stalled<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.waiting_since = None;
            return written;
        }
        let Some(limit) = self.write_stall else {
            return written;
        };
        let waiting =
            (self.waiting_since).get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if waiting.as_mut().poll(cx).is_pending() {
            return written;
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took no bytes for {}s (the keepalive interval and timeout): it \
                 reads nothing",
                limit.as_secs()
            ),
        )))
    }

    /// The error to fail with, once cut; otherwise `cx` is woken when it is.
    fn cut(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.cut.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection cut by the server (the end of the shutdown grace, or room made at the \
                 connection cap)",
            )
        })
    }
}

/// Polls `$method` on the stream; when it would wait, fails instead once cut (else the cut
/// wakes it). The token is looked at only then, so a busy connection pays nothing for it: a
/// connection is only ever left open at the end of the grace because it is waiting.
macro_rules! unless_cut {
    ($this:expr, $cx:expr, $method:ident ( $($arg:expr),* )) => {{
        let this = $this.get_mut();
        match Pin::new(&mut this.io).$method($cx, $($arg),*) {
            Poll::Pending => this.cut($cx).map_or(Poll::Pending, |error| Poll::Ready(Err(error))),
            ready => ready,
        }
    }};
}

impl<S: AsyncRead + Unpin> AsyncRead for Cuttable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        unless_cut!(self, cx, poll_read(buf))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cuttable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = unless_cut!(self.as_mut(), cx, poll_write(buf));
        self.get_mut().unless_stalled(cx, written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = unless_cut!(self.as_mut(), cx, poll_flush());
        self.get_mut().unless_stalled(cx, flushed)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        unless_cut!(self, cx, poll_shutdown())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = unless_cut!(self.as_mut(), cx, poll_write_vectored(bufs));
        self.get_mut().unless_stalled(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
