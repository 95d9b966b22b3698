//! Configuration: command-line flags, each also read from an environment variable
//! `PROFILE_STATE_<FLAG>`.
//!
//! `Config` is a plain struct so tests build it directly; `Config::check` rejects
//! contradictory settings before anything binds. Switches read from the environment accept
//! `1/0`, `true/false`, `yes/no` and `on/off`. Every error here names its flag (`--flag`), so
//! the binary can add which environment variable the value came from (`crate::cli`). Reading
//! files or secrets from elsewhere is not done here. The NATS JetStream flags are in `nats`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::BoolishValueParser;

use crate::journal::DiscardPoint;
use crate::listen_addr::ListenAddr;

mod nats;

pub use nats::{NatsConfig, redact_url};

/// Everything the service needs to start.
#[derive(Clone, Parser)]
#[command(name = "profile-state", version, about)]
pub struct Config {
    /// Address of the webhook ingress (faces Gameball): IP:PORT or HOST:PORT. Port 0 picks a
    /// free port.
    #[arg(
        long,
        env = "PROFILE_STATE_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub webhook_listen: ListenAddr,

    /// Address of the gRPC API (internal callers): IP:PORT or HOST:PORT. Port 0 picks a free
    /// port.
    #[arg(
        long,
        env = "PROFILE_STATE_GRPC_LISTEN",
        default_value = "0.0.0.0:50051"
    )]
    pub grpc_listen: ListenAddr,

    /// Gameball webhook secret used to verify X-GB-Signature.
    #[arg(long, env = "PROFILE_STATE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// TOML or JSON file (JSON when it starts with `{`, whatever its name) of webhook secrets per
    /// client_id, several at once while rotating, plus optional defaults; reloaded on SIGHUP.
    /// `--webhook-secret` adds a default.
    #[arg(long, env = "PROFILE_STATE_WEBHOOK_SECRETS_FILE")]
    pub webhook_secrets_file: Option<PathBuf>,

    /// Accept webhooks without checking their signature (development only).
    #[arg(long, env = "PROFILE_STATE_INSECURE_SKIP_SIGNATURE", value_parser = BoolishValueParser::new())]
    pub insecure_skip_signature: bool,

    /// Largest webhook body accepted, in bytes (at most 16 MiB, 16777216); larger bodies get 413.
    #[arg(long, env = "PROFILE_STATE_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Most webhooks handled at once; more get 503 with Retry-After.
    #[arg(
        long,
        env = "PROFILE_STATE_MAX_IN_FLIGHT_WEBHOOKS",
        default_value_t = 1024
    )]
    pub max_in_flight_webhooks: usize,

    /// Longest a webhook may wait for its update to be confirmed before it is answered 503
    /// (saying it may still be recorded: a retry changes nothing).
    #[arg(long, env = "PROFILE_STATE_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub webhook_timeout: Duration,

    /// Longest a webhook's body may take to arrive whole; slower bodies get 408. Only a
    /// complete body takes one of the in-flight slots.
    #[arg(long, env = "PROFILE_STATE_WEBHOOK_BODY_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub webhook_body_timeout: Duration,

    /// Longest a client may take to send a request's headers (or an HTTP/2 preface) on the
    /// webhook listener, from its first byte; the connection is closed past it.
    #[arg(long, env = "PROFILE_STATE_WEBHOOK_HEADER_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub webhook_header_timeout: Duration,

    /// How long a webhook connection may stay open with no request in progress and nothing
    /// received; the connection is closed past it.
    #[arg(long, env = "PROFILE_STATE_WEBHOOK_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub webhook_idle_timeout: Duration,

    /// Most connections open at once on the webhook listener; one more closes the connection
    /// idle the longest, or is closed itself when none is idle.
    #[arg(
        long,
        env = "PROFILE_STATE_MAX_WEBHOOK_CONNECTIONS",
        default_value_t = 2048
    )]
    pub max_webhook_connections: usize,

    /// How many recent changes stay in memory for watchers that resume by revision or fall
    /// behind.
    #[arg(long, env = "PROFILE_STATE_HISTORY_EVENTS", default_value_t = 100_000)]
    pub history_events: usize,

    /// Most memory the history of recent changes may hold, in bytes (each change counted with
    /// its profile before and after); the oldest changes go first.
    #[arg(long, env = "PROFILE_STATE_HISTORY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub history_bytes: usize,

    /// Directory of the journal, snapshots and store id; created if missing. One process per
    /// directory.
    #[arg(long, env = "PROFILE_STATE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Keep everything in memory only: nothing survives a restart (tests, demos). Not with
    /// --data-dir (the command line refuses both; a `Config` built in code ignores the
    /// directory).
    #[arg(long, env = "PROFILE_STATE_EPHEMERAL", value_parser = BoolishValueParser::new())]
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

    /// Start a new journal segment once the current one reaches this size, in bytes (at least
    /// 1).
    #[arg(long, env = "PROFILE_STATE_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub segment_bytes: u64,

    /// File of bearer tokens (one per line, `#` comments): when set, every ProfileService and
    /// AdminService call needs `authorization: Bearer <token>`. Health and reflection stay open.
    #[arg(long, env = "PROFILE_STATE_GRPC_AUTH_TOKENS_FILE")]
    pub grpc_auth_tokens_file: Option<PathBuf>,

    /// Let AdminService (dead letters, backups, reconciliation) answer clients on other machines without
    /// credentials. Without it, and without tokens or client certificates, AdminService
    /// answers only clients on this machine (loopback).
    #[arg(long, env = "PROFILE_STATE_INSECURE_OPEN_ADMIN_SERVICE", value_parser = BoolishValueParser::new())]
    pub insecure_open_admin_service: bool,

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

    /// Most WatchProfiles streams open at once on one gRPC connection; more get
    /// RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "PROFILE_STATE_MAX_WATCH_STREAMS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_watch_streams_per_connection: usize,

    /// Most concurrent HTTP/2 streams (calls) a gRPC client may open on one connection,
    /// advertised in the connection's settings.
    #[arg(
        long,
        env = "PROFILE_STATE_GRPC_MAX_CONCURRENT_STREAMS",
        default_value_t = 1000
    )]
    pub grpc_max_concurrent_streams: u32,

    /// Longest a gRPC client may take from connecting to completing its TLS handshake (if
    /// any) and the HTTP/2 connection preface; the connection is closed past it.
    #[arg(long, env = "PROFILE_STATE_GRPC_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub grpc_handshake_timeout: Duration,

    /// Longest a gRPC request may take to arrive whole, from its first wait to its end (on a
    /// reflection stream: each message, the wait between them untimed); the call then fails
    /// with DEADLINE_EXCEEDED and what it had received is freed.
    #[arg(long, env = "PROFILE_STATE_GRPC_REQUEST_BODY_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub grpc_request_body_timeout: Duration,

    /// Longest AdminService.Backup waits for its client to take the next piece (at least 1s);
    /// past it the backup is abandoned (the call ends DEADLINE_EXCEEDED), freeing the one
    /// backup slot.
    #[arg(long, env = "PROFILE_STATE_BACKUP_STALL_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub backup_stall_timeout: Duration,

    /// Most connections open at once on the gRPC listener; one more closes the idlest with no
    /// call in progress to make room, else it is closed itself.
    #[arg(
        long,
        env = "PROFILE_STATE_MAX_GRPC_CONNECTIONS",
        default_value_t = 2048
    )]
    pub max_grpc_connections: usize,

    /// Largest gRPC message received or sent, in bytes.
    #[arg(long, env = "PROFILE_STATE_GRPC_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub grpc_max_message_bytes: usize,

    /// HTTP/2 keepalive ping interval on gRPC connections, so idle streams survive load
    /// balancers; 0 turns pings off.
    #[arg(long, env = "PROFILE_STATE_GRPC_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub grpc_keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "PROFILE_STATE_GRPC_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub grpc_keepalive_timeout: Duration,

    /// Address of the admin listener (/metrics, /livez, /readyz): IP:PORT or HOST:PORT, e.g.
    /// the pod IP (`[$(POD_IP)]:9090`). Port 0 picks a free port.
    #[arg(
        long,
        env = "PROFILE_STATE_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: ListenAddr,

    /// How long shutdown waits, in all, for in-flight requests and watch streams before it cuts
    /// their connections; the process exits within this plus one second.
    #[arg(long, env = "PROFILE_STATE_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Log format: `text` (colours only on a terminal, and not with NO_COLOR) or `json` (one
    /// object per line, fields at the top level). The level filter comes from `RUST_LOG`
    /// (default `info`).
    #[arg(
        long,
        env = "PROFILE_STATE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,

    /// Replicated mode over NATS JetStream (issue 13); off unless `--nats-url` is given.
    #[command(flatten)]
    pub nats: NatsConfig,

    /// Reconciliation from Gameball's REST API (issue 15): schedules and limits. The accounts'
    /// API keys are in the secrets file, never in flags.
    #[command(flatten)]
    pub reconcile: ReconcileConfig,
}

/// The reconciliation flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ReconcileConfig {
    /// Reconcile an account periodically: `CLIENT_ID=DURATION` (e.g. `2155=24h`, at least 1h),
    /// repeatable; each run reads the account's profiles not updated for that long. The
    /// account needs `[gameball_api."<client_id>"]` in the secrets file. Off by default.
    #[arg(
        long = "reconcile-every",
        env = "PROFILE_STATE_RECONCILE_EVERY",
        value_delimiter = ',',
        value_parser = ReconcileEvery::parse
    )]
    pub every: Vec<ReconcileEvery>,

    /// Reconcile jobs running at once (one per account at most); more get RESOURCE_EXHAUSTED,
    /// and a scheduled one waits for room until its next period (the account longest without
    /// a scheduled job first), taking a freed place before a new request does.
    #[arg(
        long = "reconcile-max-jobs",
        env = "PROFILE_STATE_RECONCILE_MAX_JOBS",
        default_value_t = 2
    )]
    pub max_jobs: usize,

    /// Requests in flight to Gameball's API at once, per account.
    #[arg(
        long = "reconcile-max-in-flight",
        env = "PROFILE_STATE_RECONCILE_MAX_IN_FLIGHT",
        default_value_t = 8
    )]
    pub max_in_flight: usize,
}

impl ReconcileConfig {
    /// One schedule per account: two would both run, each skipped while the other's job runs,
    /// which is neither period.
    fn check_schedules(&self) -> Result<(), ConfigError> {
        let mut seen: std::collections::HashMap<&str, Duration> = Default::default();
        for every in &self.every {
            if let Some(first) = seen.insert(&every.client_id, every.period) {
                return Err(ConfigError::DuplicateSchedule {
                    client_id: every.client_id.clone(),
                    first: humantime::format_duration(first).to_string(),
                    second: humantime::format_duration(every.period).to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Shortest `--reconcile-every` period: each run costs API quota the account shares.
pub const MIN_RECONCILE_PERIOD: Duration = Duration::from_secs(3600);

/// One `--reconcile-every CLIENT_ID=DURATION`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconcileEvery {
    /// The account.
    pub client_id: String,
    /// How often.
    pub period: Duration,
}

impl ReconcileEvery {
    /// Parses `CLIENT_ID=DURATION` (the period at least [`MIN_RECONCILE_PERIOD`]).
    pub fn parse(text: &str) -> Result<ReconcileEvery, String> {
        let (client_id, period) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not CLIENT_ID=DURATION (e.g. 2155=24h)"))?;
        if client_id.is_empty() {
            return Err(format!("{text:?} names no client_id"));
        }
        let period = duration(period).map_err(|error| format!("period {period:?}: {error}"))?;
        if period < MIN_RECONCILE_PERIOD {
            return Err(format!(
                "period {} of client_id {client_id:?} is shorter than 1h",
                humantime::format_duration(period)
            ));
        }
        Ok(ReconcileEvery {
            client_id: client_id.to_owned(),
            period,
        })
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The longest duration any flag takes: a year, beyond any sensible setting and far from where
/// adding it to a clock overflows (a larger `--shutdown-grace` or `--grpc-keepalive-interval`
/// was a panic at its first use).
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses a duration flag (`10s`, `5m`, `2h`, as humantime reads them), at most
/// [`MAX_DURATION`].
pub fn duration(text: &str) -> Result<Duration, String> {
    // humantime's own words name neither the format nor the units ("expected number at 0").
    let parsed = humantime::parse_duration(text).map_err(|error| {
        format!("{error}: a duration is a number and a unit, such as 500ms, 10s, 5m, 2h or 1d")
    })?;
    if parsed > MAX_DURATION {
        return Err(format!(
            "{text} is longer than the longest a flag takes, a year"
        ));
    }
    Ok(parsed)
}

/// What a duration flag that is zero is told, whichever check finds it: the server's flags
/// ([`ConfigError::ZeroDuration`]), the subcommands' `--timeout` ([`positive_duration`]) and
/// `reconcile --not-updated-for`.
pub const ZERO_DURATION: &str = "must be more than zero";

/// A [`duration`] that must be more than zero (a timeout of zero fails every call at once).
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    let parsed = duration(text)?;
    match parsed.is_zero() {
        true => Err(ZERO_DURATION.to_owned()),
        false => Ok(parsed),
    }
}

/// The smallest `--grpc-max-message-bytes`: room for the smallest answers (below it, 0 or 10
/// were taken, and every read failed with OUT_OF_RANGE while the server looked healthy).
pub const MIN_GRPC_MESSAGE_BYTES: usize = 1024;
/// The least `--backup-stall-timeout` taken.
pub const MIN_BACKUP_STALL_TIMEOUT: Duration = Duration::from_secs(1);

/// The most webhooks a server holds in flight: far beyond what one process handles at once,
/// and within what its semaphore counts (more was a panic right after it started listening).
pub const MAX_IN_FLIGHT_WEBHOOKS: usize = 1 << 20;

/// A configuration that cannot work, found before anything binds.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A count (a number flag) that must be at least 1 is 0.
    #[error("{flag} must be at least 1")]
    Zero {
        /// The flag.
        flag: &'static str,
    },
    /// A flag is below the least it takes.
    #[error("{flag} must be at least {min}")]
    TooSmall {
        /// The flag.
        flag: &'static str,
        /// The least it takes.
        min: u64,
    },
    /// A duration flag is below the least it takes.
    #[error("{flag} must be at least {}s", .min.as_secs())]
    TooShort {
        /// The flag.
        flag: &'static str,
        /// The least it takes.
        min: Duration,
    },
    /// A flag is above the most it takes.
    #[error("{flag} must be at most {max}")]
    TooLarge {
        /// The flag.
        flag: &'static str,
        /// The most it takes.
        max: u64,
    },
    /// Neither a secret nor the explicit opt-out was given.
    #[error(
        "no webhook secret: pass --webhook-secret (or PROFILE_STATE_WEBHOOK_SECRET) or \
         --webhook-secrets-file, or --insecure-skip-signature to accept unsigned webhooks"
    )]
    MissingWebhookSecret,
    /// Unsigned webhooks accepted beside secrets: a development switch left set (say in the
    /// environment) turned a production service's authentication off with only a warning
    /// (found by a first-user review).
    #[error(
        "--insecure-skip-signature accepts unsigned webhooks, so it cannot be used with \
         --webhook-secret or --webhook-secrets-file: keep one or the other"
    )]
    SkipSignatureWithSecrets,
    /// A secret was given but is empty.
    #[error("--webhook-secret is empty")]
    EmptyWebhookSecret,
    /// A secret begins or ends with whitespace: no signature Gameball makes would match it.
    #[error(
        "--webhook-secret begins or ends with whitespace (a newline from a file or an \
         environment variable?); Gameball's secrets have none, so every signature would fail"
    )]
    PaddedWebhookSecret,
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
    /// A timeout (a duration flag) is zero.
    #[error("--{flag} {ZERO_DURATION}")]
    ZeroDuration {
        /// The flag, without dashes.
        flag: &'static str,
    },
    /// Snapshot thresholds cannot be zero.
    #[error("--snapshot-every-records and --snapshot-every-bytes must be at least 1")]
    ZeroSnapshotInterval,
    /// One account given two `--reconcile-every` schedules.
    #[error(
        "--reconcile-every: client_id {client_id:?} is given twice ({first} and {second}); \
         give each account one period"
    )]
    DuplicateSchedule {
        /// The account.
        client_id: String,
        /// Its first period, as written.
        first: String,
        /// Its second period.
        second: String,
    },
    /// A NATS flag has a value that cannot work.
    #[error("--{flag}: {reason}")]
    BadNatsFlag {
        /// The flag, without dashes.
        flag: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
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
            (Some(secret), _) if secret.trim() != secret => {
                return Err(ConfigError::PaddedWebhookSecret);
            }
            (None, false) if !has_file => return Err(ConfigError::MissingWebhookSecret),
            (Some(_), true) => return Err(ConfigError::SkipSignatureWithSecrets),
            (None, true) if has_file => return Err(ConfigError::SkipSignatureWithSecrets),
            _ => {}
        }
        if self.max_in_flight_webhooks == 0 {
            return Err(ConfigError::ZeroInFlight);
        }
        if self.max_in_flight_webhooks > MAX_IN_FLIGHT_WEBHOOKS {
            return Err(ConfigError::TooLarge {
                flag: "--max-in-flight-webhooks",
                max: MAX_IN_FLIGHT_WEBHOOKS as u64,
            });
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
        // What one body can make of a journal record or a profile must fit a journal frame.
        if self.max_body_bytes > crate::journal::codec::MAX_BODY_BYTES {
            return Err(ConfigError::TooLarge {
                flag: "--max-body-bytes",
                max: crate::journal::codec::MAX_BODY_BYTES as u64,
            });
        }
        if self.snapshot_every_records == 0 || self.snapshot_every_bytes == 0 {
            return Err(ConfigError::ZeroSnapshotInterval);
        }
        self.check_transport_limits()?;
        if self.reconcile.max_jobs == 0 {
            return Err(ConfigError::Zero {
                flag: "--reconcile-max-jobs",
            });
        }
        if self.reconcile.max_in_flight == 0 {
            return Err(ConfigError::Zero {
                flag: "--reconcile-max-in-flight",
            });
        }
        self.reconcile.check_schedules()?;
        self.nats.check()?;
        if self.nats.enabled() && self.nats.request_timeout >= self.webhook_timeout {
            return Err(ConfigError::BadNatsFlag {
                flag: "nats-request-timeout",
                reason: format!(
                    "{} must be shorter than --webhook-timeout ({}), so a webhook whose \
                     publish times out can still be answered 503",
                    humantime::format_duration(self.nats.request_timeout),
                    humantime::format_duration(self.webhook_timeout)
                ),
            });
        }
        Ok(())
    }
}

impl Config {
    /// What the watch history keeps: `--history-events` and `--history-bytes`.
    pub fn history(&self) -> crate::store::HistoryLimits {
        crate::store::HistoryLimits {
            events: self.history_events,
            bytes: self.history_bytes,
        }
    }

    /// The limits of the listeners, the history and the journal's segments: each must leave
    /// room for something.
    fn check_transport_limits(&self) -> Result<(), ConfigError> {
        // A count is told "at least 1" and a duration "more than zero", whichever list it is
        // in (the same kind of flag was told both: found by a first-user review).
        let zero_counts = [
            ("--history-bytes", self.history_bytes == 0),
            // Zero was taken as the smallest segment, silently (found by a first-user review).
            ("--segment-bytes", self.segment_bytes == 0),
            (
                "--max-webhook-connections",
                self.max_webhook_connections == 0,
            ),
            (
                "--max-watch-streams-per-connection",
                self.max_watch_streams_per_connection == 0,
            ),
            (
                "--grpc-max-concurrent-streams",
                self.grpc_max_concurrent_streams == 0,
            ),
            ("--max-grpc-connections", self.max_grpc_connections == 0),
        ];
        if let Some((flag, _)) = zero_counts.into_iter().find(|(_, is_zero)| *is_zero) {
            return Err(ConfigError::Zero { flag });
        }
        let zero = [
            // Zero answered webhooks that were recorded with 503 (found by a first-user review).
            ("webhook-timeout", self.webhook_timeout.is_zero()),
            ("webhook-body-timeout", self.webhook_body_timeout.is_zero()),
            (
                "webhook-header-timeout",
                self.webhook_header_timeout.is_zero(),
            ),
            ("webhook-idle-timeout", self.webhook_idle_timeout.is_zero()),
            (
                "grpc-handshake-timeout",
                self.grpc_handshake_timeout.is_zero(),
            ),
            (
                "grpc-request-body-timeout",
                self.grpc_request_body_timeout.is_zero(),
            ),
            (
                "grpc-keepalive-timeout",
                self.grpc_keepalive_timeout.is_zero(),
            ),
        ];
        if let Some((flag, _)) = zero.into_iter().find(|(_, is_zero)| *is_zero) {
            return Err(ConfigError::ZeroDuration { flag });
        }
        // A backup waits this long for a client that gives window back in steps of several
        // pieces (grpcio): a timeout of milliseconds would fail every backup but the fastest.
        if self.backup_stall_timeout < MIN_BACKUP_STALL_TIMEOUT {
            return Err(ConfigError::TooShort {
                flag: "--backup-stall-timeout",
                min: MIN_BACKUP_STALL_TIMEOUT,
            });
        }
        if self.grpc_max_message_bytes < MIN_GRPC_MESSAGE_BYTES {
            return Err(ConfigError::TooSmall {
                flag: "--grpc-max-message-bytes",
                min: MIN_GRPC_MESSAGE_BYTES as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "expected number at 0" was all a bad duration got (found by a fresh-eyes run).
    #[test]
    fn a_bad_duration_is_told_the_format() {
        for bad in ["xyz", "10", "5 parsecs"] {
            let error = duration(bad).unwrap_err();
            assert!(error.contains("such as 500ms, 10s"), "{bad}: {error}");
        }
        assert_eq!(duration("90s"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn reconcile_every_is_an_account_and_a_period_of_an_hour_or_more() {
        let every = ReconcileEvery::parse("2155=24h").unwrap();
        assert_eq!(every.client_id, "2155");
        assert_eq!(every.period, Duration::from_secs(24 * 3600));
        for (bad, says) in [
            ("2155", "CLIENT_ID=DURATION"),
            ("=24h", "no client_id"),
            ("2155=soon", "period"),
            ("2155=30m", "shorter than 1h"),
        ] {
            let error = ReconcileEvery::parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
        let config = Config::parse_from([
            "profile-state",
            "--webhook-secret",
            "s",
            "--reconcile-every",
            "1=1h",
            "--reconcile-every",
            "2=2h",
        ]);
        assert_eq!(config.reconcile.every.len(), 2);
        assert!(config.check().is_ok());
        // One account twice (as flags, or in the variable's list): refused, naming it.
        let twice = Config::parse_from([
            "profile-state",
            "--webhook-secret",
            "s",
            "--reconcile-every",
            "2155=1h,7=2h",
            "--reconcile-every",
            "2155=3h",
        ]);
        assert_eq!(
            twice.check().unwrap_err().to_string(),
            "--reconcile-every: client_id \"2155\" is given twice (1h and 3h); give each \
             account one period"
        );
        let mut zero = Config::for_tests("s");
        zero.reconcile.max_jobs = 0;
        assert!(
            zero.check()
                .unwrap_err()
                .to_string()
                .contains("--reconcile-max-jobs")
        );
    }

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
        config.webhook_secret = Some("s".into());
        assert!(matches!(
            config.check(),
            Err(ConfigError::SkipSignatureWithSecrets)
        ));
        config.webhook_secret = None;
        config.webhook_secrets_file = Some("secrets.toml".into());
        assert!(matches!(
            config.check(),
            Err(ConfigError::SkipSignatureWithSecrets)
        ));
        config.webhook_secrets_file = None;
        config.webhook_secret = Some(String::new());
        assert!(matches!(
            config.check(),
            Err(ConfigError::EmptyWebhookSecret)
        ));
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let base = ["profile-state", "--webhook-secret", "s"];
        Config::try_parse_from(base.iter().chain(args))
    }

    #[test]
    fn without_a_nats_url_nothing_nats_is_checked_or_allowed() {
        let config = parse(&[]).unwrap();
        assert!(!config.nats.enabled());
        assert_eq!(config.nats.stream, "PROFILE_STATE");
        assert!(config.check().is_ok());
        let flags = [
            ["--nats-creds", "/x"],
            ["--nats-tls-ca", "/x"],
            ["--nats-stream", "S"],
            ["--nats-replicas", "1"],
            ["--nats-duplicate-window", "1h"],
            ["--nats-max-bytes", "1000"],
            ["--nats-request-timeout", "1s"],
            ["--nats-publish-linger", "1ms"],
            ["--nats-retain-after-snapshot", "10"],
            ["--replica-name", "r1"],
            ["--max-lag", "2s"],
        ];
        for flag in flags {
            let error = parse(&flag).err().expect("needs --nats-url");
            assert!(error.to_string().contains("--nats-url"), "{error}");
        }
        assert!(parse(&["--nats-url", "nats://a:4222", "--nats-tls-cert", "/c"]).is_err());
    }

    #[test]
    fn nats_urls_repeat_or_split_on_commas() {
        let urls = [
            "--nats-url",
            "nats://a:4222,nats://b:4222",
            "--nats-url",
            "tls://c:4222",
        ];
        let config = parse(&urls).unwrap();
        assert_eq!(
            config.nats.urls,
            ["nats://a:4222", "nats://b:4222", "tls://c:4222"]
        );
    }

    #[test]
    fn bad_nats_values_name_their_flag_and_a_good_set_is_accepted() {
        let cases: [(&[&str], &str); 10] = [
            (&["--nats-url", "http://a:80"], "--nats-url"),
            (&["--nats-url", "nats://a,wss://b:443"], "--nats-url"),
            (
                &["--nats-url", "nats://a", "--nats-stream", "A.B"],
                "--nats-stream",
            ),
            (
                &["--nats-url", "nats://a", "--nats-replicas", "0"],
                "--nats-replicas",
            ),
            (
                &["--nats-url", "nats://a", "--nats-duplicate-window", "0s"],
                "--nats-duplicate-window",
            ),
            (
                &["--nats-url", "nats://a", "--nats-max-bytes", "0"],
                "--nats-max-bytes",
            ),
            (
                &["--nats-url", "nats://a", "--nats-request-timeout", "10s"],
                "--nats-request-timeout",
            ),
            (
                &["--nats-url", "nats://a", "--nats-publish-linger", "5s"],
                "--nats-publish-linger",
            ),
            (&["--nats-url", "nats://a", "--max-lag", "0s"], "--max-lag"),
            (
                &["--nats-url", "nats://a", "--replica-name", ""],
                "--replica-name",
            ),
        ];
        for (args, flag) in cases {
            let error = parse(args).unwrap().check().unwrap_err().to_string();
            assert!(error.starts_with(flag), "{args:?}: {error}");
        }
        let config = parse(&["--nats-url", "nats://127.0.0.1:4222"]).unwrap();
        assert!(config.check().is_ok());
        assert_eq!(config.nats.max_lag, Duration::from_secs(1));
        assert!(!config.nats.replica_name().is_empty(), "the host name");
        let named = parse(&["--nats-url", "nats://a", "--replica-name", "r1"]).unwrap();
        assert_eq!(named.nats.replica_name(), "r1");
    }
}
