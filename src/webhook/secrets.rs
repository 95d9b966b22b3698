//! Webhook secrets: which secrets may sign a delivery for a given `client_id`, and their reload.
//!
//! Secrets come from `--webhook-secret` (a default for every client) and/or
//! `--webhook-secrets-file`, a small TOML or JSON file (JSON when its first character is `{`,
//! TOML otherwise, whatever the file is called; TOML errors give the line and column):
//!
//! ```toml
//! default = ["secret-for-any-client"]      # optional
//! [clients]
//! "2155" = ["new-secret", "old-secret"]    # several at once while rotating
//!
//! [gameball_api."2155"]                    # optional: REST API keys, for reconciliation
//! api_key = "..."
//! secret_key = "..."
//! # base_url = "https://api.gameball.co"  api_version = "v4.0"  quota_share = 0.5
//! # read_contact = true
//! ```
//!
//! A client listed in the file is checked against its own secrets only; any other client
//! against the defaults; a client with neither is refused. [`SecretStore::reload`] swaps the
//! whole set at once (SIGHUP in production): requests in flight keep the set they started
//! with, and a file that does not load leaves the old set in place. This module does not read
//! headers or verify digests; `signature` does.
//!
//! The `gameball_api` section holds each account's REST API keys and settings
//! ([`crate::reconcile::Account`], which checks an entry). It lives here because these are the
//! same kind of secret, rotated the same way, and must never be flags (`ps` shows flags). Files
//! without it load as before; a file with it still needs a webhook secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use super::signature::SignatureCheck;
use crate::io_error::IoError;
use crate::reconcile::{Account, AccountEntry};

/// One loaded set of secrets.
pub struct Secrets {
    by_client: HashMap<String, Vec<SignatureCheck>>,
    default: Vec<SignatureCheck>,
    api_accounts: HashMap<String, Arc<Account>>,
    /// [`Secrets::most_checks`], counted once.
    most_checks: usize,
}

/// The file's shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsFile {
    #[serde(default)]
    default: Vec<String>,
    #[serde(default)]
    clients: HashMap<String, Vec<String>>,
    #[serde(default)]
    gameball_api: HashMap<String, AccountEntry>,
}

/// Why a secrets file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The file cannot be read.
    #[error("--webhook-secrets-file: {0}")]
    Read(IoError),
    /// The file does not parse.
    #[error("--webhook-secrets-file: {path} is not a valid secrets file ({format}): {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// TOML or JSON.
        format: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The file parses but is unusable.
    #[error("--webhook-secrets-file: {path}: {reason}")]
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
            api_accounts: HashMap::new(),
            most_checks: 1,
        }
    }

    /// Loads `path`, adding `extra_default` (the `--webhook-secret`) to the defaults.
    pub fn load(path: &Path, extra_default: Option<&str>) -> Result<Secrets, SecretsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| SecretsError::Read(IoError::new(path, "read", error)))?;
        let file = parse(path, &text)?;
        let invalid = |reason: String| SecretsError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if file.default.iter().any(String::is_empty) {
            return Err(invalid("`default` holds an empty secret".into()));
        }
        let padded = |secret: &String| secret.trim() != secret;
        if file
            .default
            .iter()
            .chain(file.clients.values().flatten())
            .any(padded)
        {
            return Err(invalid(
                "a secret begins or ends with whitespace; Gameball's secrets have none, so \
                 every signature would fail"
                    .into(),
            ));
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
        let mut api_accounts = HashMap::new();
        for (client, entry) in file.gameball_api {
            if client.is_empty() {
                return Err(invalid("gameball_api has an empty client_id".into()));
            }
            let account = Account::from_entry(&client, entry)
                .map_err(|why| invalid(format!("gameball_api {client:?}: {why}")))?;
            api_accounts.insert(client, Arc::new(account));
        }
        let most_checks = (by_client.values().map(Vec::len))
            .chain([default.len(), 1])
            .max()
            .unwrap_or(1);
        Ok(Secrets {
            by_client,
            default,
            api_accounts,
            most_checks,
        })
    }

    /// The secrets that may sign a delivery for `client_id` (the defaults when it is unknown or
    /// missing); empty when none may.
    pub fn for_client(&self, client_id: Option<&str>) -> &[SignatureCheck] {
        client_id
            .and_then(|client| self.by_client.get(client))
            .unwrap_or(&self.default)
    }

    /// Whether any account has secrets of its own: without, every delivery is checked against
    /// the defaults, and which account a body names does not matter to its signature.
    pub fn has_account_secrets(&self) -> bool {
        !self.by_client.is_empty()
    }

    /// The most secrets any delivery is checked against (an account's, or the defaults): what
    /// a refused delivery's check is padded to (`signature::verify`), so that the time of a
    /// 401 does not tell an account in the middle of a rotation (several secrets) from one
    /// with one or none.
    pub fn most_checks(&self) -> usize {
        self.most_checks
    }

    /// The REST API settings of `client_id`, if the file has them.
    pub fn api_account(&self, client_id: &str) -> Option<&Arc<Account>> {
        self.api_accounts.get(client_id)
    }

    /// Every account with REST API settings.
    pub fn api_accounts(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.api_accounts.values()
    }
}

/// The file's content, as JSON when it starts with `{` and as TOML otherwise: no TOML document
/// starts with `{`, and a JSON one must (it is an object). The extension is not consulted, so a
/// Secret mounted under any key name loads.
fn parse(path: &Path, text: &str) -> Result<SecretsFile, SecretsError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let error = |format, reason| SecretsError::Parse {
        path: path.to_owned(),
        format,
        reason,
    };
    if text.trim_start().starts_with('{') {
        // serde_json's message ends with the line and column.
        serde_json::from_str(text).map_err(|err| error("JSON", without_strings(&err.to_string())))
    } else {
        // Not toml's Display: it quotes the offending line, which may hold a secret.
        toml::from_str(text).map_err(|err| {
            let at = match err.span() {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    format!("line {line}, column {column}: ")
                }
                None => String::new(),
            };
            error(
                "TOML",
                format!("{at}{}", without_strings(err.message().trim_end())),
            )
        })
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A parser's message without the text values it quotes: `invalid type: string "..."` would
/// print a secret or key that was put where a list or table belongs (`"2155" = "key"` in
/// `[gameball_api]`, copying the style of `[clients]`).
fn without_strings(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(QUOTED) {
        out.push_str(&rest[..start]);
        out.push_str("a string");
        // serde quotes the value as Rust's Debug does: `\"` inside, `"` at the end.
        let value = &rest[start + QUOTED.len()..];
        let mut escaped = false;
        let end = value.char_indices().find(|&(_, c)| {
            let closes = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            closes
        });
        match end {
            Some((end, _)) => rest = &value[end + 1..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
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

    /// Whether there is a file to reload (`--webhook-secrets-file`).
    pub fn reloads_a_file(&self) -> bool {
        self.file.is_some()
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
        super::super::signature::verify(
            secrets.for_client(client),
            (1, Some(&signature)),
            body,
            || None,
        )
        .is_ok()
    }

    /// Why loading `path` (without a flag secret) fails.
    fn load_error(path: &Path) -> String {
        Secrets::load(path, None)
            .err()
            .expect("refused")
            .to_string()
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
            ("default = [", "is not a valid secrets file (TOML)"),
            ("defaults = [\"x\"]", "is not a valid secrets file (TOML)"),
            ("[clients]\n\"1\" = []", "at least one"),
            ("", "no secret at all"),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = load_error(&path);
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
    fn the_format_comes_from_the_content_whatever_the_name() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("toml-in.json", "[clients]\n\"2155\" = [\"t\"]\n"),
            (
                "json-in.toml",
                "\u{feff}\n  {\"clients\": {\"2155\": [\"t\"]}}",
            ),
            ("no-extension", "[clients]\n\"2155\" = [\"t\"]\n"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let secrets = Secrets::load(&path, None).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(signs(&secrets, Some("2155"), "t"), "{name}");
        }
    }

    #[test]
    fn parse_errors_give_line_and_column_and_never_the_line_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        std::fs::write(
            &path,
            "[clients]\n\"2155\" = [\"topsecret\"\n\"9\" = [\"x\"]\n",
        )
        .unwrap();
        let error = load_error(&path);
        assert!(
            error.contains("is not a valid secrets file (TOML): line 3, column "),
            "{error}"
        );
        assert!(!error.contains("topsecret"), "{error}");
        std::fs::write(&path, "{\"clients\": {\"2155\": [\"topsecret\",]}}").unwrap();
        let error = load_error(&path);
        assert!(
            error.contains("is not a valid secrets file (JSON)") && error.contains("line 1 column"),
            "{error}"
        );
        assert!(!error.contains("topsecret"), "{error}");
        assert_eq!(line_and_column("ab\ncdé\nx", 7), (2, 4));
        assert_eq!(line_and_column("ab", 0), (1, 1));
    }

    #[test]
    fn api_keys_load_from_toml_and_json_beside_the_webhook_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("secrets.toml");
        std::fs::write(
            &toml,
            "[clients]\n\"2155\" = [\"w\"]\n[gameball_api.2155]\napi_key = \"ak\"\n\
             secret_key = \"sk\"\napi_version = \"v4.1\"\n",
        )
        .unwrap();
        let secrets = Secrets::load(&toml, None).unwrap();
        assert!(
            signs(&secrets, Some("2155"), "w"),
            "webhook secrets unchanged"
        );
        let account = secrets.api_account("2155").expect("api settings");
        assert_eq!(&*account.client_id, "2155");
        assert_eq!(account.api_version, crate::reconcile::ApiVersion::V4_1);
        assert!(secrets.api_account("9").is_none());
        assert_eq!(secrets.api_accounts().count(), 1);

        let json = dir.path().join("secrets.json");
        std::fs::write(
            &json,
            r#"{"default": ["d"], "gameball_api": {"7": {"api_key": "a", "secret_key": "s",
                "base_url": "http://127.0.0.1:8080"}}}"#,
        )
        .unwrap();
        let secrets = Secrets::load(&json, None).unwrap();
        let account = secrets.api_account("7").unwrap();
        assert_eq!(account.base_url.as_str(), "http://127.0.0.1:8080/");
        assert!(Secrets::single("x").api_account("7").is_none());
    }

    #[test]
    fn bad_api_settings_name_the_file_client_and_setting_never_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        for (section, wanted) in [
            ("api_key = \"topsecret1\"", "missing field `secret_key`"),
            (
                "api_key = \"topsecret1\"\nsecret_key = \"\"",
                "gameball_api \"2155\": secret_key must not be empty",
            ),
            (
                "api_key = \"topsecret1\"\nsecret_key = \"topsecret2\"\nbase_url = \"http://gb\"",
                "gameball_api \"2155\": base_url",
            ),
            (
                "api_key = \"topsecret1\"\nsecret_key = \"topsecret2\"\nretries = 3",
                "unknown field `retries`",
            ),
        ] {
            let text = format!("default = [\"d\"]\n[gameball_api.\"2155\"]\n{section}\n");
            std::fs::write(&path, text).unwrap();
            let error = load_error(&path);
            assert!(
                error.contains("s.toml") && error.contains(wanted),
                "{error}"
            );
            assert!(!error.contains("topsecret"), "{error}");
        }
        // API keys are not webhook secrets: a file with only them has none.
        std::fs::write(
            &path,
            "[gameball_api.1]\napi_key = \"a\"\nsecret_key = \"b\"\n",
        )
        .unwrap();
        let error = load_error(&path);
        assert!(error.contains("no secret at all"), "{error}");
        assert!(Secrets::load(&path, Some("flag")).is_ok());
    }

    #[test]
    fn a_value_in_the_wrong_place_is_never_quoted_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            (
                "a.toml",
                "default = [\"d\"]\n[gameball_api]\n\"2155\" = \"top\\\"secret\"\n",
            ),
            ("b.toml", "[clients]\n\"2155\" = \"topsecret\"\n"),
            ("c.json", r#"{"clients": {"2155": "top\"secret"}}"#),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let error = load_error(&path);
            assert!(error.contains("invalid type: a string"), "{error}");
            assert!(
                !error.contains("secret\"") && !error.contains("topsecret"),
                "{error}"
            );
        }
        assert_eq!(
            without_strings("string \"a\\\"b\" then string \"c\", end"),
            "a string then a string, end"
        );
        assert_eq!(without_strings("string \"unterminated"), "a string");
        assert_eq!(without_strings("no quotes"), "no quotes");
    }

    #[test]
    fn a_reload_rotates_api_keys_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let write = |key: &str| {
            let text = format!(
                r#"{{"default": ["d"], "gameball_api": {{"1": {{"api_key": "{key}", "secret_key": "s"}}}}}}"#
            );
            std::fs::write(&path, text).unwrap();
        };
        write("old");
        let store = SecretStore::new(
            Secrets::load(&path, None).unwrap(),
            Some(path.clone()),
            None,
        );
        let before = store.current();
        write("new");
        store.reload().unwrap();
        assert_eq!(
            before.api_account("1").unwrap().api_key(),
            "old",
            "in flight: old set"
        );
        assert_eq!(store.current().api_account("1").unwrap().api_key(), "new");
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
