//! Connections the server can cut, whoever runs their task: [`Cuttable`] wraps a gRPC
//! connection's stream so that, once its token is cancelled, every read and write that would
//! wait fails instead, and hyper drops the connection (and the calls and watch streams on it).
//! The listener cuts its idlest connection to make room at its cap
//! (`super::connections::Evictable`).
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

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A stream that fails every read and write once its token is cancelled; see the module docs.
pub struct Cuttable<S> {
    io: S,
    /// Boxed: the future is not `Unpin`, and the stream must be.
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S> Cuttable<S> {
    /// `io`, cut when `cut` is cancelled. Give each connection a child token of its own, so
    /// connections do not contend on one token's lock.
    pub fn new(io: S, cut: CancellationToken) -> Self {
        Cuttable {
            io,
            cut: Box::pin(cut.cancelled_owned()),
        }
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        unless_cut!(self, cx, poll_write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        unless_cut!(self, cx, poll_flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        unless_cut!(self, cx, poll_shutdown())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        unless_cut!(self, cx, poll_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
