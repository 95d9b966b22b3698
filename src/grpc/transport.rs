//! How the gRPC listener is set up: TLS (and mTLS), HTTP/2 keepalive and concurrent streams,
//! and the per-call metrics layer.
//!
//! [`server_builder`] turns the configuration into a tonic `Server`, and [`tls_acceptor`] into
//! the rustls configuration the listener terminates TLS with (`crate::server` does that
//! itself, not tonic, so its handshake deadline also covers the HTTP/2 preface), both before
//! anything binds, so a missing or malformed certificate, key or CA file stops start-up with
//! an error naming the file. [`MetricsLayer`] counts every ProfileService and AdminService
//! call by method and status code, the way grpc-ecosystem's go-grpc-prometheus does. Message
//! size limits are per service in tonic, so `crate::server` sets them on each service it adds
//! ([`Config::grpc_max_message_bytes`]). Nothing here knows about profiles, and who may call
//! is `super::auth`'s business.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use anyhow::Context as _;
use base64::Engine as _;
use prost::Message as _;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::Code;
use tonic::codegen::{Body as HttpBody, Bytes, http};

use super::certificates::TlsCertificates;
use crate::activity::Busy;
use crate::config::Config;
use crate::io_error::IoError;
use crate::metrics::{GrpcMethodMetrics, GrpcType, Metrics};
use crate::pb;

/// The tonic server as configured: HTTP/2 keepalive pings every `--grpc-keepalive-interval`
/// (0: none) answered within `--grpc-keepalive-timeout`, and at most
/// `--grpc-max-concurrent-streams` calls at once on one connection (advertised in its HTTP/2
/// settings). Add [`MetricsLayer`] and the services to it. TLS is not tonic's:
/// see [`tls_acceptor`].
pub fn server_builder(config: &Config) -> tonic::transport::Server {
    let interval = config.grpc_keepalive_interval;
    let keepalive = (!interval.is_zero()).then_some(interval);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive.map(|_| config.grpc_keepalive_timeout))
        .max_concurrent_streams(Some(config.grpc_max_concurrent_streams))
}

/// TLS for the gRPC listener from `--grpc-tls-cert` and `--grpc-tls-key` (ALPN `h2`), requiring
/// client certificates signed by `--grpc-client-ca` when that is given; `None` for plaintext.
/// The whole rustls configuration is built here, so a key that does not fit its certificate
/// fails start-up, not the first handshake.
pub fn tls_acceptor(config: &Config) -> anyhow::Result<Option<(TlsAcceptor, TlsCertificates)>> {
    let Some(files) = tls_files(config)? else {
        return Ok(None);
    };
    let unusable = || {
        format!(
            "--grpc-tls-cert, --grpc-tls-key: the TLS configuration from {} is not usable",
            tls_file_names(config)
        )
    };
    let acceptor = server_tls(&files).with_context(unusable)?;
    let client_cas = match &files.client_ca {
        Some(ca) => certificates(ca)?,
        None => Vec::new(),
    };
    let dates =
        TlsCertificates::read(&certificates(&files.cert)?, &client_cas).with_context(unusable)?;
    Ok(Some((acceptor, dates)))
}

/// The PEM contents of the TLS files, each checked.
struct TlsFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// The rustls server configuration of `files`, with ring (as tonic's `tls-ring`) and ALPN `h2`
/// (gRPC clients refuse a connection that did not negotiate it).
fn server_tls(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).context("a --grpc-client-ca certificate")?;
            }
            // Not `allow_unauthenticated`: a client without a certificate signed by this CA
            // fails the handshake.
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let key = PrivateKeyDer::from_pem_slice(&files.key).context("no usable private key")?;
    let mut tls = builder
        .with_single_cert(certificates(&files.cert)?, key)
        .map_err(|err| match err {
            // rustls says "keys may not be consistent: KeyMismatch".
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                anyhow::anyhow!(
                    "the private key (--grpc-tls-key) is not the key of the certificate \
                     (the first one in --grpc-tls-cert)"
                )
            }
            err => err.into(),
        })?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(tls)))
}

fn certificates(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .context("a certificate cannot be parsed")
}

/// What tonic hands every call about the connection it arrived on (the listener makes one per
/// connection): the peer's address, and the slots for the watch streams that connection may
/// open.
#[derive(Clone)]
pub struct Connection {
    /// The client's address. tonic's own `Request::remote_addr` knows only the connections of
    /// its own listener, so the AdminService's loopback check reads this one.
    pub peer: std::net::SocketAddr,
    /// The watch stream slots of this connection.
    pub watches: ConnectionWatches,
    /// The slots of this connection for health `Watch` and reflection streams
    /// (`super::open_streams`).
    pub open_streams: ConnectionWatches,
    /// The slots of this connection for health `Check` calls in progress
    /// (`super::open_streams`).
    pub health_checks: ConnectionWatches,
    /// The bytes of requests this connection may be receiving at once.
    pub request_bytes: super::request_bytes::ConnectionRequestBytes,
    /// The bytes of answers this connection may hold unsent at once.
    pub answer_bytes: super::answer_bytes::ConnectionAnswerBytes,
    /// Its calls in progress (marked by [`MetricsLayer`]): the listener closes a connection
    /// with none, the idlest, to make room at its cap.
    pub activity: Arc<crate::activity::Activity>,
}

impl Connection {
    /// The connection of `request`, when it came through the capped listener (plaintext or
    /// TLS: the listener terminates TLS itself, so tonic sees the same `Connection` either way;
    /// no call reads the client's certificate, which the handshake has already checked).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Connection> {
        request.extensions().get::<Connection>()
    }

    /// The connection of an HTTP request, before tonic makes it a call.
    pub(super) fn of_http<B>(request: &http::Request<B>) -> Option<&Connection> {
        request.extensions().get::<Connection>()
    }

    /// The client's address of `request`: the capped listener's, else tonic's.
    pub fn peer_of<T>(request: &tonic::Request<T>) -> Option<std::net::SocketAddr> {
        Connection::of(request)
            .map(|connection| connection.peer)
            .or_else(|| request.remote_addr())
    }
}

/// Slots for the streams one connection may hold open at once: its watch streams
/// (`--max-watch-streams-per-connection`, so one HTTP/2 connection cannot take every slot of
/// `--max-watch-streams`), or its health and reflection streams (`super::open_streams`).
#[derive(Clone)]
pub struct ConnectionWatches {
    slots: Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl ConnectionWatches {
    /// A new connection's: at most `limit` watch streams at once.
    pub fn new(limit: usize) -> Self {
        let limit = limit.min(tokio::sync::Semaphore::MAX_PERMITS);
        ConnectionWatches {
            slots: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
        }
    }

    /// A slot for one more watch stream, or the limit that was reached.
    pub fn try_open(&self) -> Result<tokio::sync::OwnedSemaphorePermit, usize> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| self.limit)
    }
}

/// The TLS files configured, for error messages.
fn tls_file_names(config: &Config) -> String {
    [
        &config.grpc_tls_cert,
        &config.grpc_tls_key,
        &config.grpc_client_ca,
    ]
    .into_iter()
    .flatten()
    .map(|path| path.display().to_string())
    .collect::<Vec<_>>()
    .join(", ")
}

/// The files of `--grpc-tls-cert`, `--grpc-tls-key` and `--grpc-client-ca`, read and checked
/// as PEM; `None` for plaintext.
fn tls_files(config: &Config) -> anyhow::Result<Option<TlsFiles>> {
    let (cert, key) = match (&config.grpc_tls_cert, &config.grpc_tls_key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) => {
            // clap enforces this for flags; a `Config` built in code is checked here.
            anyhow::ensure!(
                config.grpc_client_ca.is_none(),
                "--grpc-client-ca needs --grpc-tls-cert and --grpc-tls-key"
            );
            return Ok(None);
        }
        _ => anyhow::bail!("--grpc-tls-cert and --grpc-tls-key go together"),
    };
    let cert = read_pem(cert, "--grpc-tls-cert", &["CERTIFICATE"])?;
    let key = read_pem(
        key,
        "--grpc-tls-key",
        &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
    )?;
    let client_ca = match &config.grpc_client_ca {
        Some(ca) => Some(read_pem(ca, "--grpc-client-ca", &["CERTIFICATE"])?),
        None => None,
    };
    Ok(Some(TlsFiles {
        cert,
        key,
        client_ca,
    }))
}

/// Reads a PEM file given by `flag` and checks that it holds at least one block labelled one
/// of `labels` and that every block is well-formed, so a wrong or damaged file is reported by
/// name (tonic's own parse error does not say which file it was).
fn read_pem(path: &Path, flag: &str, labels: &[&str]) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(IoError::on(path, "read"))
        .with_context(|| flag.to_owned())?;
    check_pem(&bytes, labels)
        .with_context(|| format!("{flag}: {} is not usable", path.display()))?;
    Ok(bytes)
}

fn check_pem(bytes: &[u8], labels: &[&str]) -> anyhow::Result<()> {
    let text = std::str::from_utf8(bytes).context("not PEM text (not UTF-8)")?;
    let mut found = 0;
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        loop {
            match lines.next() {
                Some(line) if line == end => break,
                Some(line) => body.push_str(line),
                None => anyhow::bail!("the PEM block {label:?} has no end line"),
            }
        }
        base64::engine::general_purpose::STANDARD
            .decode(&body)
            .with_context(|| format!("the PEM block {label:?} is not valid base64"))?;
        found += usize::from(labels.contains(&label));
    }
    anyhow::ensure!(found > 0, "no PEM block labelled {}", labels.join(" or "));
    Ok(())
}

/// Counts every ProfileService and AdminService call in the `grpc_server_*` metrics of
/// `crate::metrics`, with go-grpc-prometheus's semantics: `grpc_server_started_total` when the
/// call arrives, `grpc_server_handled_total` with its status code and
/// `grpc_server_handling_seconds` when it ends.
///
/// A call ends when its status is known: from the response headers when it failed before
/// answering, otherwise from the trailers after the last message was sent (so an answer too
/// large to encode counts as the error it became, and a watch stream counts with the status it
/// ended with: `UNAVAILABLE` at shutdown). A call the client abandons before that (a dropped
/// stream, a cancelled call) counts as `CANCELLED`. Started minus handled is the number of
/// calls in progress, open watch streams included. Health and reflection are not counted, and
/// only methods of the proto package are labels, so callers cannot grow the label set.
///
/// Our own rather than a crate's: the tonic layers on crates.io record into one process-wide
/// registry (we keep one per server, so tests in one process count apart), and none counts
/// streams by how they end or creates every series at zero.
#[derive(Clone)]
pub struct MetricsLayer {
    methods: Arc<HashMap<String, GrpcMethodMetrics>>,
}

impl MetricsLayer {
    /// A layer recording into `metrics`; the methods come from the compiled descriptor set,
    /// so a new RPC is counted without changes here, and each one's series exist from now on.
    pub fn new(metrics: Metrics) -> Self {
        let descriptors = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET)
            .expect("the compiled file descriptor set decodes");
        let mut methods = HashMap::new();
        for file in &descriptors.file {
            for service in &file.service {
                let service_name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let kind = GrpcType::of(method.client_streaming(), method.server_streaming());
                    let counted = metrics.grpc_method(kind, &service_name, method.name());
                    methods.insert(format!("/{service_name}/{}", method.name()), counted);
                }
            }
        }
        MetricsLayer {
            methods: Arc::new(methods),
        }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`MetricsLayer`] wraps around tonic's routes.
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    layer: MetricsLayer,
}

/// One call being counted; dropped before its status was seen, it counts as `CANCELLED`.
struct Call {
    pending: Option<(GrpcMethodMetrics, Instant)>,
}

impl Call {
    fn start(method: GrpcMethodMetrics) -> Call {
        method.started();
        Call {
            pending: Some((method, Instant::now())),
        }
    }

    fn finish(&mut self, code: Code) {
        if let Some((method, started)) = self.pending.take() {
            method.handled(code, started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

impl<S, B, R> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: HttpBody<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<Measured<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = self.layer.methods.get(request.uri().path()).cloned();
        // In progress on its connection until the answer is dropped (`Connection::activity`):
        // held by the answer's body, which this layer wraps anyway.
        let busy = Connection::of_http(&request).map(|connection| connection.activity.begin());
        let response = self.inner.call(request);
        let Some(method) = method else {
            return Box::pin(async move {
                let response = response.await?;
                Ok(response.map(|body| Measured {
                    body,
                    call: None,
                    _busy: busy,
                }))
            });
        };
        let mut call = Call::start(method);
        Box::pin(async move {
            let response = response.await?;
            // A call that failed before answering has its status in the headers.
            if let Some(code) = status_in(response.headers()) {
                call.finish(code);
            } else if response.body().is_end_stream() {
                call.finish(Code::Unknown);
            }
            // Otherwise the status follows the messages, in the trailers; a body dropped before
            // them drops `call`, which counts the call as cancelled.
            Ok(response.map(|body| Measured {
                body,
                call: Some(call),
                _busy: busy,
            }))
        })
    }
}

/// An answer's body as [`MetricsLayer`] counts it: its call ends with the status in its
/// trailers, and its connection is busy until it is dropped. The inner body in place, not
/// boxed again: one pointer less to follow for every frame of every watch stream.
pub struct Measured<R> {
    body: R,
    /// None for calls not counted (health, reflection).
    call: Option<Call>,
    _busy: Option<Busy>,
}

impl<R: HttpBody<Data = Bytes> + Unpin> HttpBody for Measured<R> {
    type Data = Bytes;
    type Error = R::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, R::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let (Some(Ok(frame)), Some(call)) = (&frame, &mut this.call)
            && let Some(trailers) = frame.trailers_ref()
        {
            call.finish(status_in(trailers).unwrap_or(Code::Unknown));
        }
        Poll::Ready(frame)
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

    #[test]
    fn the_methods_of_both_services_are_known_and_nothing_else() {
        let layer = MetricsLayer::new(Metrics::new());
        assert!(
            layer
                .methods
                .contains_key("/gameball.profiles.v1.ProfileService/GetProfile")
        );
        assert!(
            layer
                .methods
                .contains_key("/gameball.profiles.v1.AdminService/ListDeadLetters")
        );
        assert!(!layer.methods.contains_key("/grpc.health.v1.Health/Check"));
        assert!(
            !layer
                .methods
                .contains_key("/gameball.profiles.v1.ProfileService/Made-Up")
        );
    }

    #[test]
    fn pem_files_are_checked_block_by_block() {
        let cert = "-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n";
        assert!(check_pem(cert.as_bytes(), &["CERTIFICATE"]).is_ok());
        let error = check_pem(cert.as_bytes(), &["PRIVATE KEY"]).unwrap_err();
        assert!(error.to_string().contains("PRIVATE KEY"), "{error}");
        assert!(check_pem(b"not pem at all", &["CERTIFICATE"]).is_err());
        let broken = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        assert!(check_pem(broken.as_bytes(), &["CERTIFICATE"]).is_err());
        let unterminated = "-----BEGIN CERTIFICATE-----\nTUlJQg==\n";
        assert!(check_pem(unterminated.as_bytes(), &["CERTIFICATE"]).is_err());
        assert!(check_pem(&[0xff, 0xfe], &["CERTIFICATE"]).is_err());
    }
}
