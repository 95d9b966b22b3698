//! Who may call the gRPC services: `authorization: Bearer <token>` checked against the tokens
//! of `--grpc-auth-tokens-file`, and the stricter default for AdminService.
//!
//! [`BearerAuth`] is a tonic interceptor, cheap to clone, that wraps any generated service
//! (`InterceptedService::new(svc, auth.clone())` or `XServer::with_interceptor`). The server
//! wraps ProfileService with it, AdminService with [`AdminAuth`], and adds health and
//! reflection without either: probes and grpcurl's reflection must work without credentials.
//! Tokens are compared in constant time and never appear in a status message or a log line.
//!
//! AdminService purges, replays and backs up everything, so it is never open to other
//! machines without credentials by default: with tokens it takes the token, with mTLS the
//! client certificate was checked in the handshake, and with neither it answers only peers on
//! this machine (loopback) unless `--insecure-open-admin-service` says otherwise
//! ([`AdminAccess`]). This module does not know which services exist, nor how TLS is set up
//! (`super::transport`).

use std::path::Path;
use std::sync::Arc;

use subtle::{Choice, ConstantTimeEq};
use tonic::{Request, Status};

use crate::config::Config;
use crate::io_error::IoError;
use crate::status::{Rejection, grpc_status};

/// The message of a call without an `authorization` header.
pub const MISSING_TOKEN: &str = "missing bearer token";
/// The message of a call whose `authorization` header is not `Bearer <token>` (a token
/// without its scheme was called missing, though the header was there: found by a
/// first-user review).
pub const NOT_BEARER: &str = "the authorization header must be `Bearer <token>`";
/// The message of a call whose bearer token is not one of the configured ones.
pub const INVALID_TOKEN: &str = "invalid bearer token";
/// The message of a call with more than one `authorization` header: which one holds is
/// anybody's guess (a proxy may read the other), so neither does.
pub const REPEATED_TOKEN: &str = "more than one authorization header; send one bearer token";
/// The longest token a file may hold: a longer one could never arrive (clients and servers
/// refuse header blocks of 16 KiB and more).
const MAX_TOKEN_BYTES: usize = 4096;

/// Checks `authorization: Bearer <token>` against the configured tokens, or lets every call
/// through when none are configured. Cloning it shares the tokens (one reference count).
#[derive(Clone, Default)]
pub struct BearerAuth {
    /// `None`: authentication is off. `Some`: never empty (the loader refuses an empty file).
    tokens: Option<Arc<[Box<[u8]>]>>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens themselves.
        f.debug_struct("BearerAuth")
            .field("tokens", &self.tokens.as_ref().map(|tokens| tokens.len()))
            .finish()
    }
}

impl BearerAuth {
    /// From `--grpc-auth-tokens-file`, or open to everyone when it is not set.
    pub fn from_config(config: &Config) -> anyhow::Result<BearerAuth> {
        match &config.grpc_auth_tokens_file {
            Some(path) => BearerAuth::from_file(path)
                .map_err(|error| error.context("--grpc-auth-tokens-file")),
            None => Ok(BearerAuth::default()),
        }
    }

    /// The tokens of the file at `path` ([`read_tokens_file`]).
    pub fn from_file(path: &Path) -> anyhow::Result<BearerAuth> {
        let tokens = read_tokens_file(path)?
            .into_iter()
            .map(|token| token.into_bytes().into_boxed_slice())
            .collect();
        Ok(BearerAuth {
            tokens: Some(tokens),
        })
    }

    /// Whether calls need a token at all.
    pub fn is_enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// Whether `presented` is one of the tokens. Every token is compared, each in constant
    /// time, so the timing tells neither which token matched nor whether one did (only, as
    /// with any such compare, something about the lengths).
    fn accepts(tokens: &[Box<[u8]>], presented: &[u8]) -> bool {
        tokens
            .iter()
            .fold(Choice::from(0), |any, token| any | token.ct_eq(presented))
            .into()
    }
}

/// The tokens of a tokens file (`--grpc-auth-tokens-file`; the operator CLI's `--token-file`
/// reads the same format): one per line, surrounding whitespace trimmed, blank lines and lines
/// starting with `#` ignored. An unreadable file, one without a token, or a line that can never
/// match a presented token (a `Bearer ` prefix, a byte-order mark, more than 4 KiB, a character
/// a header cannot carry) is an error naming the file and the line.
pub fn read_tokens_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(IoError::on(path, "read"))?;
    let mut tokens = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let token = line.trim();
        if token.is_empty() || token.starts_with('#') {
            continue;
        }
        if let Err(reason) = check_token(token) {
            anyhow::bail!("{} line {}: {reason}", path.display(), index + 1);
        }
        tokens.push(token.to_owned());
    }
    anyhow::ensure!(
        !tokens.is_empty(),
        "{} holds no token (one per line; `#` starts a comment)",
        path.display()
    );
    Ok(tokens)
}

/// Who may call AdminService, decided once from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAccess {
    /// A bearer token, as every data service (`--grpc-auth-tokens-file`).
    Tokens,
    /// A client certificate the handshake checked (`--grpc-client-ca`, without tokens).
    ClientCertificates,
    /// No credentials exist, so only peers on this machine (a loopback address).
    LoopbackPeers,
    /// Anyone who can connect (`--insecure-open-admin-service`, without tokens or mTLS).
    Open,
}

impl AdminAccess {
    /// The access the configuration gives: credentials when there are any, else loopback
    /// peers only, unless the operator opened it explicitly.
    pub fn from_config(config: &Config) -> AdminAccess {
        if config.grpc_auth_tokens_file.is_some() {
            AdminAccess::Tokens
        } else if config.grpc_client_ca.is_some() {
            AdminAccess::ClientCertificates
        } else if config.insecure_open_admin_service {
            AdminAccess::Open
        } else {
            AdminAccess::LoopbackPeers
        }
    }

    /// A few words for the start-up line.
    pub fn describe(self) -> &'static str {
        match self {
            AdminAccess::Tokens => "bearer token",
            AdminAccess::ClientCertificates => "client certificate",
            AdminAccess::LoopbackPeers => "loopback clients only",
            AdminAccess::Open => "open to anyone (--insecure-open-admin-service)",
        }
    }
}

/// The message of an AdminService call refused because it came from another machine.
pub const ADMIN_LOOPBACK_ONLY: &str = "AdminService answers only clients on the server's own \
    machine when no credentials are configured: set --grpc-auth-tokens-file (or \
    --grpc-client-ca), or --insecure-open-admin-service";

/// The interceptor in front of AdminService: [`BearerAuth`] when tokens are configured, else
/// the peer-address check of [`AdminAccess::LoopbackPeers`].
#[derive(Clone, Debug)]
pub struct AdminAuth {
    bearer: BearerAuth,
    access: AdminAccess,
}

impl AdminAuth {
    /// The check for `access`, with the tokens `bearer` holds.
    pub fn new(bearer: BearerAuth, access: AdminAccess) -> AdminAuth {
        AdminAuth { bearer, access }
    }

    /// Who may call.
    pub fn access(&self) -> AdminAccess {
        self.access
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self.access {
            AdminAccess::Tokens => self.bearer.call(request),
            AdminAccess::ClientCertificates | AdminAccess::Open => Ok(request),
            AdminAccess::LoopbackPeers => {
                // `to_canonical`: an IPv4 peer on a dual-stack listener is `::ffff:127.0.0.1`.
                // A peer tonic cannot name is not known to be local.
                let local = super::transport::Connection::peer_of(&request)
                    .is_some_and(|peer| peer.ip().to_canonical().is_loopback());
                if local {
                    Ok(request)
                } else {
                    Err(grpc_status(Rejection::PermissionDenied {
                        reason: ADMIN_LOOPBACK_ONLY,
                    }))
                }
            }
        }
    }
}

/// Why a token from the file could never be presented, if it could not.
fn check_token(token: &str) -> Result<(), String> {
    if token.starts_with('\u{feff}') {
        return Err("starts with a byte-order mark; save the file without one".into());
    }
    if bearer_token(token.as_bytes()).is_some() {
        return Err("starts with `Bearer `; write the token alone".into());
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(format!("a token is at most {MAX_TOKEN_BYTES} bytes"));
    }
    if !token
        .bytes()
        .all(|byte| byte == b' ' || byte.is_ascii_graphic())
    {
        return Err("a token is printable ASCII (what a header carries)".into());
    }
    Ok(())
}

/// The token of an `authorization` header value: `Bearer <token>`, the scheme matched without
/// regard to case (RFC 6750 and RFC 9110 make it case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    Some(value[SCHEME.len()..].trim_ascii()).filter(|token| !token.is_empty())
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(request);
        };
        let mut values = request.metadata().get_all("authorization").iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(grpc_status(Rejection::Unauthenticated {
                reason: REPEATED_TOKEN,
            }));
        }
        let refused = |reason| grpc_status(Rejection::Unauthenticated { reason });
        let first = first.ok_or_else(|| refused(MISSING_TOKEN))?;
        let presented = bearer_token(first.as_bytes()).ok_or_else(|| refused(NOT_BEARER))?;
        if BearerAuth::accepts(tokens, presented) {
            Ok(request)
        } else {
            Err(grpc_status(Rejection::Unauthenticated {
                reason: INVALID_TOKEN,
            }))
        }
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

    fn auth(file: &str) -> BearerAuth {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, file).unwrap();
        BearerAuth::from_file(&path).unwrap()
    }

    /// Two `authorization` headers: the first decided, so a valid token followed by a wrong
    /// one was let in (found by an adversarial run).
    #[test]
    fn a_repeated_authorization_header_is_refused() {
        let mut auth = auth("alpha\n");
        let mut twice = request(Some("Bearer alpha"));
        twice
            .metadata_mut()
            .append("authorization", "Bearer wrong".parse().unwrap());
        let status = auth.call(twice).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), REPEATED_TOKEN);
        assert!(auth.call(request(Some("Bearer alpha"))).is_ok());
    }

    /// Lines that could never match a presented token were taken, and every call with them
    /// failed (found by an adversarial run).
    #[test]
    fn token_lines_that_could_never_be_presented_are_refused_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let long = "t".repeat(4097);
        for (file, reason) in [
            ("\u{feff}alpha\n", "byte-order mark"),
            ("# ok\nBearer alpha\n", "starts with `Bearer `"),
            (&format!("alpha\n{long}\n") as &str, "at most 4096 bytes"),
            ("alpha\nbéta\n", "printable ASCII"),
        ] {
            std::fs::write(&path, file).unwrap();
            let error = format!("{:#}", BearerAuth::from_file(&path).unwrap_err());
            assert!(error.contains(reason), "{file:?}: {error}");
            assert!(
                error.contains(" line 2") || file.starts_with('\u{feff}'),
                "{error}"
            );
        }
        std::fs::write(&path, "a token with spaces\n").unwrap();
        BearerAuth::from_file(&path).expect("spaces inside a token are carried");
    }

    #[test]
    fn configured_tokens_are_required_and_never_echoed() {
        let mut auth = auth("# ops team\nalpha\n\n  beta  \n# gamma\n");
        assert!(auth.is_enabled());
        assert!(auth.call(request(Some("Bearer alpha"))).is_ok());
        assert!(auth.call(request(Some("Bearer beta"))).is_ok());
        assert!(
            auth.call(request(Some("bearer beta"))).is_ok(),
            "scheme case"
        );
        for wrong in [
            "Bearer gamma",
            "Bearer alph",
            "Bearer alphaa",
            "Bearer # ops team",
        ] {
            let status = auth.call(request(Some(wrong))).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{wrong}");
            assert_eq!(status.message(), INVALID_TOKEN, "{wrong}");
        }
        let status = auth.call(request(None)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), MISSING_TOKEN);
        for not_bearer in ["alpha", "Basic alpha", "Bearer ", "Bearer"] {
            let status = auth.call(request(Some(not_bearer))).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{not_bearer}");
            assert_eq!(status.message(), NOT_BEARER, "{not_bearer}");
        }
        assert!(!format!("{auth:?}").contains("alpha"), "Debug hides tokens");
    }

    fn from(peer: &str) -> Request<()> {
        let mut request = request(None);
        let peer: std::net::SocketAddr = peer.parse().unwrap();
        request
            .extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(peer),
            });
        request
    }

    #[test]
    fn admin_service_without_credentials_answers_loopback_peers_only() {
        let mut admin = AdminAuth::new(BearerAuth::default(), AdminAccess::LoopbackPeers);
        for local in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert!(admin.call(from(local)).is_ok(), "{local}");
        }
        for remote in ["10.0.0.8:5000", "[fd00::8]:5000", "[::ffff:10.0.0.8]:5000"] {
            let status = admin.call(from(remote)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{remote}");
            assert_eq!(status.message(), ADMIN_LOOPBACK_ONLY);
        }
        let unknown = admin.call(request(None)).unwrap_err();
        assert_eq!(
            unknown.code(),
            tonic::Code::PermissionDenied,
            "no peer address"
        );

        let mut open = AdminAuth::new(BearerAuth::default(), AdminAccess::Open);
        assert!(open.call(from("10.0.0.8:5000")).is_ok());
        let mut tokens = AdminAuth::new(auth("alpha\n"), AdminAccess::Tokens);
        let status = tokens.call(from("127.0.0.1:5000")).unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "loopback needs the token too"
        );
        let mut with_token = from("10.0.0.8:5000");
        with_token
            .metadata_mut()
            .insert("authorization", "Bearer alpha".parse().unwrap());
        assert!(tokens.call(with_token).is_ok());
    }

    #[test]
    fn the_access_follows_the_credentials_configured() {
        let mut config = Config::for_tests("s");
        assert_eq!(
            AdminAccess::from_config(&config),
            AdminAccess::LoopbackPeers
        );
        config.insecure_open_admin_service = true;
        assert_eq!(AdminAccess::from_config(&config), AdminAccess::Open);
        config.grpc_client_ca = Some("ca.pem".into());
        assert_eq!(
            AdminAccess::from_config(&config),
            AdminAccess::ClientCertificates
        );
        config.grpc_auth_tokens_file = Some("tokens".into());
        assert_eq!(AdminAccess::from_config(&config), AdminAccess::Tokens);
    }

    #[test]
    fn without_a_file_everything_passes() {
        let mut open = BearerAuth::default();
        assert!(!open.is_enabled());
        assert!(open.call(request(None)).is_ok());
        assert!(open.call(request(Some("Bearer anything"))).is_ok());
    }

    #[test]
    fn an_empty_or_missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty-tokens");
        std::fs::write(&empty, "# nobody yet\n\n   \n").unwrap();
        let error = format!("{:#}", BearerAuth::from_file(&empty).unwrap_err());
        assert!(
            error.contains("empty-tokens") && error.contains("no token"),
            "{error}"
        );
        let missing = dir.path().join("missing-tokens");
        let error = format!("{:#}", BearerAuth::from_file(&missing).unwrap_err());
        assert!(error.contains("missing-tokens"), "{error}");
    }
}
