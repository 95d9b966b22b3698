//! Who may call the gRPC data services: `authorization: Bearer <token>` checked against the
//! tokens of `--grpc-auth-tokens-file`.
//!
//! [`BearerAuth`] is a tonic interceptor, cheap to clone, that wraps any generated service
//! (`InterceptedService::new(svc, auth.clone())` or `XServer::with_interceptor`). The server
//! wraps ProfileService and AdminService with it and adds health and reflection without it:
//! probes and grpcurl's reflection must work without credentials. Tokens are compared in
//! constant time and never appear in a status message or a log line. This module does not know
//! which services exist, nor anything about TLS (`super::transport`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use subtle::{Choice, ConstantTimeEq};
use tonic::{Request, Status};

use crate::config::Config;
use crate::status::{Rejection, grpc_status};

/// The message of a call without a bearer token.
pub const MISSING_TOKEN: &str = "missing bearer token";
/// The message of a call whose bearer token is not one of the configured ones.
pub const INVALID_TOKEN: &str = "invalid bearer token";

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
            Some(path) => BearerAuth::from_file(path),
            None => Ok(BearerAuth::default()),
        }
    }

    /// Reads tokens from `path`: one per line, surrounding whitespace trimmed, blank lines and
    /// lines starting with `#` ignored. An unreadable file, or one without a token, is an error
    /// naming the file.
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
            "gRPC auth tokens file {} holds no token (one per line; `#` starts a comment)",
            path.display()
        );
        Ok(BearerAuth {
            tokens: Some(tokens.into()),
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
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| bearer_token(value.as_bytes()))
            .ok_or_else(|| {
                grpc_status(Rejection::Unauthenticated {
                    reason: MISSING_TOKEN,
                })
            })?;
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
        for missing in [
            None,
            Some("alpha"),
            Some("Basic alpha"),
            Some("Bearer "),
            Some("Bearer"),
        ] {
            let status = auth.call(request(missing)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{missing:?}");
            assert_eq!(status.message(), MISSING_TOKEN, "{missing:?}");
        }
        assert!(!format!("{auth:?}").contains("alpha"), "Debug hides tokens");
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
