//! Configuration: command-line flags, each also read from an environment variable
//! `PROFILE_STATE_<FLAG>`.
//!
//! `Config` is a plain struct so tests build it directly; `Config::check` rejects
//! contradictory settings before anything binds. Reading files or secrets from elsewhere is not
//! done here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::journal::DiscardPoint;

/// Everything the service needs to start.
#[derive(Clone, Parser)]
#[command(name = "profile-state", version, about)]
pub struct Config {
    /// Address of the webhook ingress (faces Gameball). Port 0 picks a free port.
    #[arg(
        long,
        env = "PROFILE_STATE_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub webhook_listen: SocketAddr,

    /// Address of the gRPC API (internal callers). Port 0 picks a free port.
    #[arg(
        long,
        env = "PROFILE_STATE_GRPC_LISTEN",
        default_value = "0.0.0.0:50051"
    )]
    pub grpc_listen: SocketAddr,

    /// Gameball webhook secret used to verify X-GB-Signature.
    #[arg(long, env = "PROFILE_STATE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// TOML (`.toml`) or JSON file of webhook secrets per client_id, several at once while
    /// rotating, plus optional defaults; reloaded on SIGHUP. `--webhook-secret` adds a default.
    #[arg(long, env = "PROFILE_STATE_WEBHOOK_SECRETS_FILE")]
    pub webhook_secrets_file: Option<PathBuf>,

    /// Accept webhooks without checking their signature (development only).
    #[arg(long, env = "PROFILE_STATE_INSECURE_SKIP_SIGNATURE")]
    pub insecure_skip_signature: bool,

    /// Largest webhook body accepted, in bytes; larger bodies get 413.
    #[arg(long, env = "PROFILE_STATE_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Most webhooks handled at once; more get 503 with Retry-After.
    #[arg(
        long,
        env = "PROFILE_STATE_MAX_IN_FLIGHT_WEBHOOKS",
        default_value_t = 1024
    )]
    pub max_in_flight_webhooks: usize,

    /// Longest a webhook may take to be recorded before it is answered 503.
    #[arg(long, env = "PROFILE_STATE_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,

    /// How many recent changes stay in memory for watchers that resume by revision or fall
    /// behind.
    #[arg(long, env = "PROFILE_STATE_HISTORY_EVENTS", default_value_t = 100_000)]
    pub history_events: usize,

    /// Directory of the journal, snapshots and store id; created if missing. One process per
    /// directory.
    #[arg(long, env = "PROFILE_STATE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Keep everything in memory only: nothing survives a restart (tests, demos).
    #[arg(long, env = "PROFILE_STATE_EPHEMERAL")]
    pub ephemeral: bool,

    /// After a refused start-up only: give up the journal from the point the refusal names
    /// (`<segment>:<offset>`, as printed) on, and give the store a new store id so every
    /// watcher starts over. Does nothing unless start-up stops exactly there.
    #[arg(
        long,
        env = "PROFILE_STATE_DISCARD_JOURNAL_FROM",
        value_name = "SEGMENT:OFFSET"
    )]
    pub discard_journal_from: Option<DiscardPoint>,

    /// Write a snapshot after this many journal records since the last one.
    #[arg(
        long,
        env = "PROFILE_STATE_SNAPSHOT_EVERY_RECORDS",
        default_value_t = 100_000
    )]
    pub snapshot_every_records: u64,

    /// Write a snapshot after this many journal bytes since the last one.
    #[arg(long, env = "PROFILE_STATE_SNAPSHOT_EVERY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub snapshot_every_bytes: u64,

    /// Start a new journal segment once the current one reaches this size, in bytes.
    #[arg(long, env = "PROFILE_STATE_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub segment_bytes: u64,

    /// File of bearer tokens (one per line, `#` comments): when set, every ProfileService and
    /// AdminService call needs `authorization: Bearer <token>`. Health and reflection stay open.
    #[arg(long, env = "PROFILE_STATE_GRPC_AUTH_TOKENS_FILE")]
    pub grpc_auth_tokens_file: Option<PathBuf>,

    /// PEM certificate chain for gRPC TLS (with --grpc-tls-key).
    #[arg(long, env = "PROFILE_STATE_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// PEM private key for gRPC TLS (with --grpc-tls-cert).
    #[arg(long, env = "PROFILE_STATE_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,

    /// PEM CA bundle: require gRPC clients to present a certificate it signed (mTLS). Needs TLS.
    #[arg(long, env = "PROFILE_STATE_GRPC_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_client_ca: Option<PathBuf>,

    /// Most WatchProfiles streams open at once; more get RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "PROFILE_STATE_MAX_WATCH_STREAMS",
        default_value_t = 10_000
    )]
    pub max_watch_streams: usize,

    /// Largest gRPC message received or sent, in bytes.
    #[arg(long, env = "PROFILE_STATE_GRPC_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub grpc_max_message_bytes: usize,

    /// HTTP/2 keepalive ping interval on gRPC connections, so idle streams survive load
    /// balancers; 0 turns pings off.
    #[arg(long, env = "PROFILE_STATE_GRPC_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub grpc_keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "PROFILE_STATE_GRPC_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grpc_keepalive_timeout: Duration,

    /// Address of the admin listener: /metrics, /healthz, /readyz. Port 0 picks a free port.
    #[arg(
        long,
        env = "PROFILE_STATE_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: SocketAddr,

    /// How long shutdown waits for in-flight requests and streams before it stops anyway.
    #[arg(long, env = "PROFILE_STATE_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format: `text` or `json`. The level filter comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "PROFILE_STATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// A configuration that cannot work, found before anything binds.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither a secret nor the explicit opt-out was given.
    #[error(
        "no webhook secret: pass --webhook-secret (or PROFILE_STATE_WEBHOOK_SECRET) or \
         --webhook-secrets-file, or --insecure-skip-signature to accept unsigned webhooks"
    )]
    MissingWebhookSecret,
    /// A secret was given but is empty.
    #[error("--webhook-secret is empty")]
    EmptyWebhookSecret,
    /// The history must hold at least one change.
    #[error("--history-events must be at least 1")]
    EmptyHistory,
    /// The body limit cannot be zero.
    #[error("--max-body-bytes must be at least 1")]
    ZeroBodyLimit,
    /// At least one watch stream must be allowed.
    #[error("--max-watch-streams must be at least 1")]
    ZeroWatchStreams,
    /// At least one webhook must be allowed in flight.
    #[error("--max-in-flight-webhooks must be at least 1")]
    ZeroInFlight,
    /// Snapshot thresholds cannot be zero.
    #[error("--snapshot-every-records and --snapshot-every-bytes must be at least 1")]
    ZeroSnapshotInterval,
}

impl Config {
    /// A configuration for tests and embedding: loopback, port 0, the given secret, in memory
    /// (`ephemeral`), defaults for the rest.
    pub fn for_tests(secret: &str) -> Self {
        let mut config = Config::parse_from(["profile-state", "--webhook-secret", secret]);
        config.webhook_listen = ([127, 0, 0, 1], 0).into();
        config.grpc_listen = ([127, 0, 0, 1], 0).into();
        config.admin_listen = ([127, 0, 0, 1], 0).into();
        config.ephemeral = true;
        config
    }

    /// Rejects settings the service cannot run with.
    pub fn check(&self) -> Result<(), ConfigError> {
        let has_file = self.webhook_secrets_file.is_some();
        match (&self.webhook_secret, self.insecure_skip_signature) {
            (Some(secret), _) if secret.is_empty() => return Err(ConfigError::EmptyWebhookSecret),
            (None, false) if !has_file => return Err(ConfigError::MissingWebhookSecret),
            _ => {}
        }
        if self.max_in_flight_webhooks == 0 {
            return Err(ConfigError::ZeroInFlight);
        }
        if self.max_watch_streams == 0 {
            return Err(ConfigError::ZeroWatchStreams);
        }
        if self.history_events == 0 {
            return Err(ConfigError::EmptyHistory);
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::ZeroBodyLimit);
        }
        if self.snapshot_every_records == 0 || self.snapshot_every_bytes == 0 {
            return Err(ConfigError::ZeroSnapshotInterval);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_or_the_explicit_opt_out_is_required() {
        let mut config = Config::for_tests("s");
        assert!(config.check().is_ok());
        config.webhook_secret = None;
        assert!(matches!(
            config.check(),
            Err(ConfigError::MissingWebhookSecret)
        ));
        config.insecure_skip_signature = true;
        assert!(config.check().is_ok());
        config.webhook_secret = Some(String::new());
        assert!(matches!(
            config.check(),
            Err(ConfigError::EmptyWebhookSecret)
        ));
    }
}
