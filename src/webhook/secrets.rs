//! Webhook secrets: which secrets may sign a delivery for a given `client_id`, and their reload.
//!
//! Secrets come from `--webhook-secret` (a default for every client) and/or
//! `--webhook-secrets-file`, a small TOML (`.toml`) or JSON file:
//!
//! ```toml
//! default = ["secret-for-any-client"]      # optional
//! [clients]
//! "2155" = ["new-secret", "old-secret"]    # several at once while rotating
//! ```
//!
//! A client listed in the file is checked against its own secrets only; any other client
//! against the defaults; a client with neither is refused. [`SecretStore::reload`] swaps the
//! whole set at once (SIGHUP in production): requests in flight keep the set they started
//! with, and a file that does not load leaves the old set in place. This module does not read
//! headers or verify digests; `signature` does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use super::signature::SignatureCheck;
use crate::io_error::IoError;

/// One loaded set of secrets.
pub struct Secrets {
    by_client: HashMap<String, Vec<SignatureCheck>>,
    default: Vec<SignatureCheck>,
}

/// The file's shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsFile {
    #[serde(default)]
    default: Vec<String>,
    #[serde(default)]
    clients: HashMap<String, Vec<String>>,
}

/// Why a secrets file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The file cannot be read.
    #[error("webhook secrets file {0}")]
    Read(IoError),
    /// The file does not parse.
    #[error("webhook secrets file {path} is not valid {format}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// TOML or JSON.
        format: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The file parses but is unusable.
    #[error("webhook secrets file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Secrets {
    /// A set with one default secret, for every client.
    pub fn single(secret: &str) -> Secrets {
        Secrets {
            by_client: HashMap::new(),
            default: vec![SignatureCheck::new(secret)],
        }
    }

    /// Loads `path`, adding `extra_default` (the `--webhook-secret`) to the defaults.
    pub fn load(path: &Path, extra_default: Option<&str>) -> Result<Secrets, SecretsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| SecretsError::Read(IoError::new(path, "read", error)))?;
        let toml = path.extension().is_some_and(|ext| ext == "toml");
        let file: SecretsFile = if toml {
            toml::from_str(&text).map_err(|err| SecretsError::Parse {
                path: path.to_owned(),
                format: "TOML",
                reason: err.message().to_owned(),
            })?
        } else {
            serde_json::from_str(&text).map_err(|err| SecretsError::Parse {
                path: path.to_owned(),
                format: "JSON",
                reason: err.to_string(),
            })?
        };
        let invalid = |reason: String| SecretsError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if file.default.iter().any(String::is_empty) {
            return Err(invalid("`default` holds an empty secret".into()));
        }
        let mut by_client = HashMap::new();
        for (client, secrets) in file.clients {
            if secrets.is_empty() || secrets.iter().any(String::is_empty) {
                return Err(invalid(format!(
                    "client {client:?} needs at least one non-empty secret"
                )));
            }
            let checks = secrets.iter().map(|s| SignatureCheck::new(s)).collect();
            by_client.insert(client, checks);
        }
        let mut default: Vec<SignatureCheck> = file
            .default
            .iter()
            .map(|s| SignatureCheck::new(s))
            .collect();
        default.extend(extra_default.map(SignatureCheck::new));
        if by_client.is_empty() && default.is_empty() {
            return Err(invalid(
                "no secret at all: add `default` or `[clients]`".into(),
            ));
        }
        Ok(Secrets { by_client, default })
    }

    /// The secrets that may sign a delivery for `client_id` (the defaults when it is unknown or
    /// missing); empty when none may.
    pub fn for_client(&self, client_id: Option<&str>) -> &[SignatureCheck] {
        client_id
            .and_then(|client| self.by_client.get(client))
            .unwrap_or(&self.default)
    }
}

/// The current secrets, swappable at runtime. Cloning it shares the same set.
#[derive(Clone)]
pub struct SecretStore {
    current: Arc<RwLock<Arc<Secrets>>>,
    file: Option<PathBuf>,
    extra_default: Option<String>,
}

impl SecretStore {
    /// A store of `secrets`, reloaded from `file` (if any) with `extra_default` added.
    pub fn new(secrets: Secrets, file: Option<PathBuf>, extra_default: Option<String>) -> Self {
        SecretStore {
            current: Arc::new(RwLock::new(Arc::new(secrets))),
            file,
            extra_default,
        }
    }

    /// The set in force now; it stays valid for the caller even if a reload happens.
    pub fn current(&self) -> Arc<Secrets> {
        Arc::clone(&self.current.read().expect("secrets lock poisoned"))
    }

    /// Reloads the secrets file. On error the old secrets stay in force.
    pub fn reload(&self) -> Result<(), SecretsError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let secrets = Secrets::load(file, self.extra_default.as_deref())?;
        *self.current.write().expect("secrets lock poisoned") = Arc::new(secrets);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signs(secrets: &Secrets, client: Option<&str>, secret: &str) -> bool {
        let body = b"{}";
        let signature = SignatureCheck::new(secret).sign(body);
        super::super::signature::verify(secrets.for_client(client), Some(&signature), body, || None)
            .is_ok()
    }

    #[test]
    fn per_client_secrets_and_defaults_from_toml_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("secrets.toml");
        std::fs::write(
            &toml,
            "default = [\"d\"]\n[clients]\n\"2155\" = [\"new\", \"old\"]\n",
        )
        .unwrap();
        let secrets = Secrets::load(&toml, Some("flag")).unwrap();
        assert!(signs(&secrets, Some("2155"), "new"));
        assert!(signs(&secrets, Some("2155"), "old"));
        assert!(
            !signs(&secrets, Some("2155"), "d"),
            "a listed client uses its own"
        );
        assert!(signs(&secrets, Some("9"), "d"));
        assert!(signs(&secrets, None, "flag"));

        let json = dir.path().join("secrets.json");
        std::fs::write(&json, r#"{"clients": {"2155": ["j"]}}"#).unwrap();
        let secrets = Secrets::load(&json, None).unwrap();
        assert!(signs(&secrets, Some("2155"), "j"));
        assert!(
            secrets.for_client(Some("9")).is_empty(),
            "no default: refused"
        );
    }

    #[test]
    fn bad_files_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        for (text, wanted) in [
            ("default = [", "not valid TOML"),
            ("defaults = [\"x\"]", "not valid TOML"),
            ("[clients]\n\"1\" = []", "at least one"),
            ("", "no secret at all"),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = Secrets::load(&path, None)
                .err()
                .expect("refused")
                .to_string();
            assert!(
                error.contains("s.toml") && error.contains(wanted),
                "{error}"
            );
        }
        let missing = Secrets::load(&dir.path().join("none.json"), None)
            .err()
            .unwrap();
        assert!(missing.to_string().contains("none.json"));
    }

    #[test]
    fn a_failed_reload_keeps_the_old_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, r#"{"default": ["one"]}"#).unwrap();
        let store = SecretStore::new(
            Secrets::load(&path, None).unwrap(),
            Some(path.clone()),
            None,
        );
        std::fs::write(&path, r#"{"default": ["two"]}"#).unwrap();
        store.reload().unwrap();
        assert!(signs(&store.current(), None, "two"));
        std::fs::write(&path, "{broken").unwrap();
        assert!(store.reload().is_err());
        assert!(signs(&store.current(), None, "two"), "old secrets stay");
    }
}
