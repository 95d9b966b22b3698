//! One Gameball account's REST API settings: its keys, where the API is, which version, and how
//! much of the account's rate limits the reconciler may use.
//!
//! The settings come from the `[gameball_api."<client_id>"]` section of the webhook secrets file
//! (`crate::webhook::secrets` reads the file; this module checks one entry), never from flags:
//! flags show in `ps`. The keys are [`SecretString`]s, so `Debug` prints `[REDACTED]`, and no
//! error message here contains them. This module does not make requests.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::limiter::Window;

/// Gameball's production API.
pub const DEFAULT_BASE_URL: &str = "https://api.gameball.co";

/// The share of the account's rate limits the reconciler takes unless told otherwise: the
/// limits belong to the whole account, and the integrator's own backend calls the same API.
pub const DEFAULT_QUOTA_SHARE: f64 = 0.5;

/// An account's entry in the secrets file, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountEntry {
    /// `APIKey` header.
    api_key: SecretString,
    /// `SecretKey` header (the "transaction key"); the profile endpoints need it.
    secret_key: SecretString,
    /// Defaults to [`DEFAULT_BASE_URL`].
    #[serde(default)]
    base_url: Option<String>,
    /// `v4.0` (default) or `v4.1`.
    #[serde(default)]
    api_version: Option<String>,
    /// The share (0 < share ≤ 1) of Gameball's documented limits the reconciler may use.
    #[serde(default)]
    quota_share: Option<f64>,
    /// Whether to read email and mobile number (`/details`, personal data). Default true.
    #[serde(default)]
    read_contact: Option<bool>,
}

/// The API version in request paths (`/api/<version>/integrations/...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiVersion {
    /// `v4.0`: the secret key on sensitive endpoints (all the profile endpoints but
    /// `/customers/{id}`).
    V4_0,
    /// `v4.1`: both keys on every endpoint, server to server only.
    V4_1,
}

impl ApiVersion {
    /// As written in paths and in the secrets file.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V4_0 => "v4.0",
            ApiVersion::V4_1 => "v4.1",
        }
    }
}

/// Gameball's rate buckets that the reconciler uses, each with both of its windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `GET .../customers/...`: the four profile endpoints.
    pub customers_get: Vec<Window>,
    /// "Others": the batch endpoints (balance inquiry, batch status).
    pub others: Vec<Window>,
}

impl Limits {
    /// Gameball's documented limits (rate-limiting page): Customers GET 100 per second and
    /// 1,200 per 30 s; other resources 30 per second and 360 per 30 s.
    pub fn documented() -> Limits {
        let second = Duration::from_secs(1);
        let thirty = Duration::from_secs(30);
        Limits {
            customers_get: vec![Window::new(100, second), Window::new(1200, thirty)],
            others: vec![Window::new(30, second), Window::new(360, thirty)],
        }
    }

    /// Every window's limit scaled by `share`.
    pub fn share(&self, share: f64) -> Limits {
        let scale = |windows: &[Window]| windows.iter().map(|w| w.share(share)).collect();
        Limits {
            customers_get: scale(&self.customers_get),
            others: scale(&self.others),
        }
    }
}

/// One account's API settings, checked. Cloning copies the keys (they are zeroed on drop).
#[derive(Clone, Debug)]
pub struct Account {
    /// The Gameball account (`client_id`) these settings are for.
    pub client_id: Arc<str>,
    api_key: SecretString,
    secret_key: SecretString,
    /// The API's base URL: `https`, or `http` to a loopback address (tests, a local proxy).
    pub base_url: Url,
    /// The version in request paths.
    pub api_version: ApiVersion,
    /// The limits the reconciler keeps for this account.
    pub limits: Limits,
    /// Whether email and mobile number are read.
    pub read_contact: bool,
}

impl Account {
    /// Settings for `client_id` with Gameball's defaults: production URL, `v4.0`, half of the
    /// documented limits, contact fields read.
    pub fn new(client_id: &str, api_key: &str, secret_key: &str) -> Result<Account, String> {
        check_key("api_key", api_key)?;
        check_key("secret_key", secret_key)?;
        Ok(Account {
            client_id: client_id.into(),
            api_key: api_key.into(),
            secret_key: secret_key.into(),
            base_url: Url::parse(DEFAULT_BASE_URL).expect("the default base URL parses"),
            api_version: ApiVersion::V4_0,
            limits: Limits::documented().share(DEFAULT_QUOTA_SHARE),
            read_contact: true,
        })
    }

    /// Checks a secrets-file entry. The error says which setting is wrong and why, never a key.
    pub fn from_entry(client_id: &str, entry: AccountEntry) -> Result<Account, String> {
        let mut account = Account::new(
            client_id,
            entry.api_key.expose_secret(),
            entry.secret_key.expose_secret(),
        )?;
        if let Some(base_url) = entry.base_url {
            account = account.with_base_url(&base_url)?;
        }
        if let Some(version) = entry.api_version {
            account.api_version = match version.as_str() {
                "v4.0" => ApiVersion::V4_0,
                "v4.1" => ApiVersion::V4_1,
                _ => return Err(format!("api_version {version:?} is not v4.0 or v4.1")),
            };
        }
        if let Some(share) = entry.quota_share {
            if !(share > 0.0 && share <= 1.0) {
                return Err(format!("quota_share {share} is not in (0, 1]"));
            }
            account.limits = Limits::documented().share(share);
        }
        if let Some(read_contact) = entry.read_contact {
            account.read_contact = read_contact;
        }
        Ok(account)
    }

    /// The same account at another base URL (checked as in the secrets file).
    pub fn with_base_url(mut self, base_url: &str) -> Result<Account, String> {
        let url = Url::parse(base_url).map_err(|err| format!("base_url {base_url:?}: {err}"))?;
        let loopback = match url.host_str() {
            Some("localhost") => true,
            Some(host) => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
            None => false,
        };
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return Err(format!(
                    "base_url {base_url:?} must use https (plain http only to a loopback \
                     address): the keys travel in its headers"
                ));
            }
            scheme => {
                return Err(format!(
                    "base_url {base_url:?}: scheme {scheme} is not https"
                ));
            }
        }
        if url.query().is_some() || url.fragment().is_some() || url.cannot_be_a_base() {
            return Err(format!(
                "base_url {base_url:?} must be a plain URL without query or fragment"
            ));
        }
        self.base_url = url;
        Ok(self)
    }

    /// The `APIKey` header's value.
    pub(crate) fn api_key(&self) -> &str {
        self.api_key.expose_secret()
    }

    /// The `SecretKey` header's value.
    pub(crate) fn secret_key(&self) -> &str {
        self.secret_key.expose_secret()
    }
}

/// A key must be a non-empty header value of visible ASCII (what an HTTP header can carry).
fn check_key(name: &str, key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!("{name} must not be empty"));
    }
    if !key.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(format!(
            "{name} must be visible ASCII without spaces (as Gameball's dashboard shows it)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(toml_text: &str) -> AccountEntry {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn defaults_are_gameballs_and_half_its_limits() {
        let account =
            Account::from_entry("2155", entry("api_key = \"k1\"\nsecret_key = \"s1\"")).unwrap();
        assert_eq!(account.base_url.as_str(), "https://api.gameball.co/");
        assert_eq!(account.api_version, ApiVersion::V4_0);
        assert_eq!(account.limits.customers_get[0].limit, 50);
        assert_eq!(account.limits.customers_get[1].limit, 600);
        assert_eq!(account.limits.others[1].limit, 180);
        assert!(account.read_contact);
        assert_eq!((account.api_key(), account.secret_key()), ("k1", "s1"));
    }

    #[test]
    fn every_setting_is_read_and_checked_without_showing_a_key() {
        let account = Account::from_entry(
            "2155",
            entry(
                "api_key = \"k1\"\nsecret_key = \"s1\"\nbase_url = \"http://127.0.0.1:9/gb\"\n\
                 api_version = \"v4.1\"\nquota_share = 1.0\nread_contact = false",
            ),
        )
        .unwrap();
        assert_eq!(account.base_url.as_str(), "http://127.0.0.1:9/gb");
        assert_eq!(account.api_version, ApiVersion::V4_1);
        assert_eq!(account.limits, Limits::documented());
        assert!(!account.read_contact);

        let keys = "api_key = \"topsecret-a\"\nsecret_key = \"topsecret-b\"\n";
        for (extra, wanted) in [
            ("base_url = \"http://api.gameball.co\"", "must use https"),
            ("base_url = \"ftp://x\"", "not https"),
            ("base_url = \"https://x/?a=1\"", "without query"),
            ("base_url = \"nonsense\"", "base_url"),
            ("api_version = \"4.0\"", "not v4.0 or v4.1"),
            ("quota_share = 0.0", "not in (0, 1]"),
            ("quota_share = 1.5", "not in (0, 1]"),
        ] {
            let error = Account::from_entry("2155", entry(&format!("{keys}{extra}"))).unwrap_err();
            assert!(error.contains(wanted), "{extra}: {error}");
            assert!(!error.contains("topsecret"), "{error}");
        }
        for (api_key, wanted) in [("", "must not be empty"), ("a b", "visible ASCII")] {
            let error = Account::new("2155", api_key, "s").unwrap_err();
            assert!(
                error.contains("api_key") && error.contains(wanted),
                "{error}"
            );
        }
    }

    #[test]
    fn keys_never_print() {
        let account = Account::new("2155", "topsecret-a", "topsecret-b").unwrap();
        let shown = format!("{account:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(shown.contains("2155"));
    }

    #[test]
    fn unknown_settings_are_refused_by_name() {
        let error =
            toml::from_str::<AccountEntry>("api_key = \"a\"\nsecret_key = \"b\"\napikey = 1")
                .err()
                .unwrap();
        assert!(error.message().contains("apikey"), "{}", error.message());
    }
}
