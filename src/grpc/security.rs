//! Who may call the gRPC API, and how the transport is set up: bearer tokens, TLS and mTLS,
//! keepalive, message sizes, and per-call metrics.
//!
//! [`BearerAuth`] is an interceptor for the services that serve data (ProfileService,
//! AdminService); health and reflection are added without it, because probes and grpcurl's
//! reflection must work without credentials. Tokens are compared in constant time and never
//! echoed. [`server_builder`] turns the configuration into a tonic `Server`; bad files are
//! startup errors that name the file. Nothing here knows about profiles.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use subtle::ConstantTimeEq;
use tonic::codegen::http;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::config::Config;
use crate::metrics::Metrics;

/// Checks `authorization: Bearer <token>` against the configured tokens; lets everything
/// through when none are configured. Cloning it shares the tokens.
#[derive(Clone, Default)]
pub struct BearerAuth {
    tokens: Option<Arc<[Box<[u8]>]>>,
}

impl BearerAuth {
    /// Reads tokens from `path`: one per line, blank lines and `#` comments ignored.
    pub fn from_file(path: &Path) -> anyhow::Result<BearerAuth> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading gRPC auth tokens file {}", path.display()))?;
        let tokens: Vec<Box<[u8]>> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|token| token.as_bytes().into())
            .collect();
        anyhow::ensure!(
            !tokens.is_empty(),
            "gRPC auth tokens file {} holds no token",
            path.display()
        );
        Ok(BearerAuth {
            tokens: Some(tokens.into()),
        })
    }

    /// From `--grpc-auth-tokens-file`, or open when it is not set.
    pub fn from_config(config: &Config) -> anyhow::Result<BearerAuth> {
        match &config.grpc_auth_tokens_file {
            Some(path) => BearerAuth::from_file(path),
            None => Ok(BearerAuth::default()),
        }
    }

    fn allows(&self, presented: &[u8]) -> bool {
        let Some(tokens) = &self.tokens else {
            return true;
        };
        // Every token is compared, so timing does not tell which one (or whether one) matched.
        tokens
            .iter()
            .fold(subtle::Choice::from(0), |any, token| {
                any | token.as_ref().ct_eq(presented)
            })
            .into()
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.tokens.is_none() {
            return Ok(request);
        }
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        let presented = header
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        if self.allows(presented) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// TLS (and mTLS with a client CA) from the configuration; `None` for plaintext.
fn tls(config: &Config) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&config.grpc_tls_cert, &config.grpc_tls_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read(cert, "--grpc-tls-cert")?, read(key, "--grpc-tls-key")?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.grpc_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--grpc-client-ca")?));
    }
    Ok(Some(tls))
}

/// The tonic server as configured: TLS and keepalive. Add [`MetricsLayer`] to it.
pub fn server_builder(config: &Config) -> anyhow::Result<tonic::transport::Server> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls(config)? {
        builder = builder
            .tls_config(tls)
            .context("the gRPC TLS certificate or key is not valid PEM")?;
    }
    let interval = config.grpc_keepalive_interval;
    builder = builder
        .http2_keepalive_interval((!interval.is_zero()).then_some(interval))
        .http2_keepalive_timeout(Some(config.grpc_keepalive_timeout));
    Ok(builder)
}

/// Counts every gRPC call by method and status code (`crate::metrics`). Streams count when
/// they start; a status sent at the end of a stream is not seen here.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl MetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        MetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`MetricsLayer`] wraps around the routes.
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Metrics,
}

/// The methods counted by name; anything else is `other`, so a caller cannot grow the label
/// set with made-up paths.
const KNOWN_SERVICES: [&str; 2] = [
    "/gameball.profiles.v1.ProfileService/",
    "/gameball.profiles.v1.AdminService/",
];

fn method_label(path: &str) -> String {
    KNOWN_SERVICES
        .iter()
        .find_map(|service| path.strip_prefix(service))
        .filter(|method| !method.is_empty() && method.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or("other")
        .to_owned()
}

impl<S, B, R> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let counted = path.starts_with("/gameball.");
        let method = method_label(path);
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if counted {
                // A failed call answers with its status in the headers; a successful one sends
                // it in the trailers, after this point.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok()?.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                let code = format!("{code:?}");
                metrics.grpc_request(&method, &code, started.elapsed().as_secs_f64());
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn request(authorization: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn tokens_are_required_only_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# ops\nalpha\n\n  beta  \n").unwrap();
        let mut auth = BearerAuth::from_file(&path).unwrap();
        assert!(auth.call(request(Some("Bearer alpha"))).is_ok());
        assert!(auth.call(request(Some("Bearer beta"))).is_ok());
        let wrong = auth.call(request(Some("Bearer gamma"))).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(!wrong.message().contains("gamma"), "never echo the token");
        assert!(auth.call(request(None)).is_err());
        assert!(
            auth.call(request(Some("alpha"))).is_err(),
            "the scheme is required"
        );
        assert!(BearerAuth::default().call(request(None)).is_ok());

        std::fs::write(&path, "# nothing\n").unwrap();
        let empty = BearerAuth::from_file(&path).err().unwrap().to_string();
        assert!(empty.contains("holds no token"), "{empty}");
        let missing = BearerAuth::from_file(&dir.path().join("none"))
            .err()
            .unwrap();
        assert!(format!("{missing:#}").contains("none"));
    }

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_label("/gameball.profiles.v1.ProfileService/GetProfile"),
            "GetProfile"
        );
        assert_eq!(
            method_label("/gameball.profiles.v1.ProfileService/x/y"),
            "other"
        );
        assert_eq!(method_label("/gameball.evil.v1.S/M"), "other");
    }
}
