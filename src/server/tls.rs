//! TLS on the gRPC listener, terminated here rather than by tonic: [`TlsConnection`] is an
//! accepted TCP connection whose TLS handshake runs on its first read or write, inside the
//! connection's own task, and which then reads and writes the decrypted bytes.
//!
//! Why not tonic's TLS: tonic times only the handshake, so a client that completes it and then
//! sends nothing held a connection slot forever. Here the capped listener wraps the TLS stream
//! in `super::connections::Timed`, so one deadline (`--grpc-handshake-timeout`) runs from the
//! accept through the TLS handshake to the end of the HTTP/2 preface, counted in decrypted
//! bytes, exactly as for a plaintext connection. The handshake never runs in the accept loop,
//! so slow handshakes do not hold up other clients.
//!
//! A failed handshake goes to [`HandshakeFailures`] (counted; a TLS error warned of). This
//! module does not build the TLS configuration (`crate::grpc::transport::tls_acceptor`
//! reads the certificate, key and client CA) and knows nothing of HTTP/2.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{Accept, TlsAcceptor};

use crate::logging::RateLimited;
use crate::metrics::HandshakeMetrics;

/// A server-side TLS connection over an accepted TCP stream; see the module docs.
pub struct TlsConnection {
    state: State,
    peer: Option<SocketAddr>,
    failures: Arc<HandshakeFailures>,
}

/// What the listener does with a failed handshake: counts it
/// (`profile_state_tls_handshakes_failed_total`), and warns of one TLS refused at most every
/// ten seconds per kind of TLS error ([`kind`]), so a stream of plaintext clients does not
/// hide the one client whose certificate is refused. A client with the wrong CA or an expired
/// certificate fails every call on its side; without this the server stayed silent. Clients
/// that go away mid-handshake (a TCP probe does) are counted, not warned of.
pub struct HandshakeFailures {
    metrics: HandshakeMetrics,
    /// One limiter per kind: a fixed set, whatever clients send.
    warnings: Mutex<HashMap<&'static str, Arc<RateLimited>>>,
}

impl HandshakeFailures {
    /// Failures counted in `metrics`.
    pub fn new(metrics: HandshakeMetrics) -> Arc<HandshakeFailures> {
        Arc::new(HandshakeFailures {
            metrics,
            warnings: Mutex::default(),
        })
    }

    /// The limiter of warnings of `kind`.
    fn limiter(&self, kind: &'static str) -> Arc<RateLimited> {
        let mut warnings = self.warnings.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(warnings.entry(kind).or_default())
    }

    fn failed(&self, error: &io::Error, peer: Option<SocketAddr>) {
        // tokio-rustls returns every TLS error (alerts sent or received) as InvalidData.
        if error.kind() != io::ErrorKind::InvalidData {
            self.metrics.closed();
            tracing::debug!(%error, peer = ?peer, "tls handshake abandoned by the client");
            return;
        }
        self.metrics.refused();
        let peer = peer.map_or_else(|| "unknown".to_owned(), |peer| peer.to_string());
        let kind = kind(error);
        if let Some(held_back) = self.limiter(kind).due() {
            tracing::warn!(
                %error,
                kind,
                %peer,
                held_back,
                "a TLS handshake on the gRPC listener failed; if this client should get \
                 through, check its CA and certificate against --grpc-tls-cert and \
                 --grpc-client-ca (profile_state_tls_handshakes_failed_total counts them)"
            );
        }
    }
}

enum State {
    /// The handshake is in progress; its future owns the TCP stream. Both states are boxed:
    /// rustls' connection state is over a kilobyte, and the connection moves on its way to
    /// tonic.
    Handshaking(Box<Accept<TcpStream>>),
    /// The handshake succeeded.
    Open(Box<TlsStream<TcpStream>>),
    /// The handshake failed, and its error was returned once.
    Failed,
}

/// The kind of a failed handshake, for its warnings' limit: by rustls' error variant, never by
/// its text, which holds numbers (an expired certificate's verification time), alert codes
/// or a certificate's purposes that a client chooses, and would make every failure a kind of
/// its own (found by an adversarial run).
fn kind(error: &io::Error) -> &'static str {
    use tokio_rustls::rustls::{CertificateError as Cert, Error as Tls};
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Tls>()) else {
        return "other";
    };
    match tls {
        Tls::InvalidMessage(_) | Tls::InappropriateMessage { .. } => "not TLS, or malformed",
        Tls::NoCertificatesPresented => "no client certificate",
        Tls::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "certificate expired"
        }
        Tls::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            "certificate not valid yet"
        }
        Tls::InvalidCertificate(Cert::UnknownIssuer) => "certificate of an unknown issuer",
        Tls::InvalidCertificate(Cert::InvalidPurpose | Cert::InvalidPurposeContext { .. }) => {
            "certificate for another purpose"
        }
        Tls::InvalidCertificate(_) => "certificate refused",
        Tls::AlertReceived(_) => "alert from the client",
        Tls::PeerIncompatible(_) => "no common protocol",
        Tls::NoApplicationProtocol => "no common application protocol",
        _ => "other TLS error",
    }
}

impl TlsConnection {
    /// `tcp`, to be handshaken with `acceptor` once it is first read or written; a failed
    /// handshake is reported to `failures`.
    pub fn accepting(
        acceptor: &TlsAcceptor,
        tcp: TcpStream,
        failures: &Arc<HandshakeFailures>,
    ) -> TlsConnection {
        TlsConnection {
            peer: tcp.peer_addr().ok(),
            state: State::Handshaking(Box::new(acceptor.accept(tcp))),
            failures: Arc::clone(failures),
        }
    }

    /// Drives the handshake; the TLS stream once it is done.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut TlsStream<TcpStream>>> {
        if let State::Handshaking(accept) = &mut self.state {
            match Pin::new(&mut **accept).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(stream)) => self.state = State::Open(Box::new(stream)),
                Poll::Ready(Err(error)) => {
                    self.state = State::Failed;
                    self.failures.failed(&error, self.peer);
                    return Poll::Ready(Err(error));
                }
            }
        }
        match &mut self.state {
            State::Open(stream) => Poll::Ready(Ok(stream)),
            State::Handshaking(_) | State::Failed => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the tls handshake failed",
            ))),
        }
    }
}

/// Polls `$method` on the open TLS stream, after the handshake.
macro_rules! when_open {
    ($this:expr, $cx:expr, $method:ident ( $($arg:expr),* )) => {
        match $this.get_mut().poll_open($cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).$method($cx, $($arg),*),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    };
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        when_open!(self, cx, poll_read(buf))
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        when_open!(self, cx, poll_write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        when_open!(self, cx, poll_flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Open(stream) => Pin::new(stream).poll_shutdown(cx),
            // Nothing was said over TLS yet: dropping the TCP stream is the whole shutdown.
            State::Handshaking(_) | State::Failed => Poll::Ready(Ok(())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        when_open!(self, cx, poll_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.state {
            State::Open(stream) => stream.is_write_vectored(),
            State::Handshaking(_) | State::Failed => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_rustls::rustls::{AlertDescription, CertificateError, Error as Tls};

    use super::*;
    use crate::metrics::Metrics;

    fn io(tls: Tls) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, tls)
    }

    /// Failures are limited by kind, never by text: every alert code a client can send, and
    /// an expired certificate's verification time, make no new kinds (found by an adversarial
    /// run: 64 texts filled a map of limiters for good).
    #[test]
    fn warnings_are_limited_per_kind_of_error_whatever_the_text() {
        let failures = HandshakeFailures::new(Metrics::new().tls_handshakes());
        let expired = |now| {
            io(Tls::InvalidCertificate(CertificateError::ExpiredContext {
                time: tokio_rustls::rustls::pki_types::UnixTime::since_unix_epoch(
                    std::time::Duration::from_secs(now),
                ),
                not_after: tokio_rustls::rustls::pki_types::UnixTime::since_unix_epoch(
                    std::time::Duration::from_secs(1),
                ),
            }))
        };
        assert_eq!(kind(&expired(1_700_000_000)), "certificate expired");
        assert!(
            failures
                .limiter(kind(&expired(1_700_000_000)))
                .due()
                .is_some()
        );
        assert!(
            failures
                .limiter(kind(&expired(1_700_000_001)))
                .due()
                .is_none(),
            "same kind"
        );
        for code in 0..=255u8 {
            let alert = io(Tls::AlertReceived(AlertDescription::from(code)));
            assert_eq!(kind(&alert), "alert from the client");
            failures.limiter(kind(&alert));
        }
        let unknown = io(Tls::InvalidCertificate(CertificateError::UnknownIssuer));
        assert!(
            failures.limiter(kind(&unknown)).due().is_some(),
            "not hidden by the alerts"
        );
        assert_eq!(kind(&io::Error::other("not rustls")), "other");
        assert_eq!(failures.warnings.lock().unwrap().len(), 3);
    }
}
