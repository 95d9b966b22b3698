//! The NATS JetStream flags (`--nats-*`, `--replica-name`, `--max-lag`) and their checks:
//! replicated mode is asked for by `--nats-url`, and every other flag here needs it. Connecting
//! to NATS is `crate::jetstream`'s job, not this module's.

use std::path::PathBuf;
use std::time::Duration;

use super::ConfigError;

/// The NATS JetStream flags. Nothing changes unless `--nats-url` is given; the others need it.
#[derive(Clone, Debug, clap::Args)]
pub struct NatsConfig {
    /// NATS server URL(s), repeatable or comma-separated (`nats://host:4222`, `tls://...`):
    /// switches to replicated mode, with the JetStream stream as the one ordered log.
    #[arg(
        long = "nats-url",
        env = "PROFILE_STATE_NATS_URL",
        value_delimiter = ','
    )]
    pub urls: Vec<String>,

    /// Name of the JetStream stream of updates (this and every other `--nats-*` flag needs
    /// `--nats-url`); its snapshot and dead-letter buckets are named
    /// after it (`<stream>_SNAPSHOTS`, `<stream>_DEAD_LETTERS`).
    #[arg(
        long = "nats-stream",
        env = "PROFILE_STATE_NATS_STREAM",
        default_value = "PROFILE_STATE",
        requires = "urls"
    )]
    pub stream: String,

    /// NATS credentials file (JWT and NKey seed, `.creds`).
    #[arg(
        long = "nats-creds",
        env = "PROFILE_STATE_NATS_CREDS",
        requires = "urls"
    )]
    pub creds: Option<PathBuf>,

    /// PEM CA bundle that signed the NATS servers' certificates; requires TLS.
    #[arg(
        long = "nats-tls-ca",
        env = "PROFILE_STATE_NATS_TLS_CA",
        requires = "urls"
    )]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate for NATS mutual TLS (with --nats-tls-key).
    #[arg(
        long = "nats-tls-cert",
        env = "PROFILE_STATE_NATS_TLS_CERT",
        requires_all = ["urls", "tls_key"]
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for NATS mutual TLS (with --nats-tls-cert).
    #[arg(
        long = "nats-tls-key",
        env = "PROFILE_STATE_NATS_TLS_KEY",
        requires_all = ["urls", "tls_cert"]
    )]
    pub tls_key: Option<PathBuf>,

    /// Replicas of the stream and buckets when this service creates them (1 = no redundancy;
    /// 3 needs a cluster of at least three JetStream servers). An existing stream must match.
    #[arg(
        long = "nats-replicas",
        env = "PROFILE_STATE_NATS_REPLICAS",
        default_value_t = 3,
        requires = "urls"
    )]
    pub replicas: usize,

    /// How long the stream remembers a message id to drop a repeated publish. Two hours cover
    /// Gameball's retries (5, 20, 60 minutes) of a delivery published on its own; the server
    /// keeps one entry per message in the window.
    #[arg(long = "nats-duplicate-window", env = "PROFILE_STATE_NATS_DUPLICATE_WINDOW", default_value = "2h", value_parser = super::duration, requires = "urls")]
    pub duplicate_window: Duration,

    /// Largest size of the stream in bytes. When it is full, publishes are refused (webhooks
    /// get 503) rather than old updates dropped; default: no limit.
    #[arg(
        long = "nats-max-bytes",
        env = "PROFILE_STATE_NATS_MAX_BYTES",
        requires = "urls"
    )]
    pub max_bytes: Option<u64>,

    /// Longest one JetStream request (a publish's acknowledgement, stream info) may take before
    /// it fails; shorter than --webhook-timeout, so a webhook can still be answered 503 in time.
    #[arg(long = "nats-request-timeout", env = "PROFILE_STATE_NATS_REQUEST_TIMEOUT", default_value = "5s", value_parser = super::duration, requires = "urls")]
    pub request_timeout: Duration,

    /// Longest a batch of webhooks waits for more before it is published, when it is smaller
    /// than the recent batches (and never longer than half the last publish's round trip).
    /// Each stream message costs every nats-server a Raft round and fsyncs, so under load fewer,
    /// larger messages cost the cluster less CPU per webhook; `0s` publishes at once.
    #[arg(long = "nats-publish-linger", env = "PROFILE_STATE_NATS_PUBLISH_LINGER", default_value = "5ms", value_parser = super::duration, requires = "urls")]
    pub publish_linger: Duration,

    /// Stream messages kept before the point a published snapshot covers when the stream is
    /// purged, so that a restarting replica can still replay its watch history from its own
    /// older snapshot. Nothing a published snapshot does not cover is ever purged.
    #[arg(
        long = "nats-retain-after-snapshot",
        env = "PROFILE_STATE_NATS_RETAIN_AFTER_SNAPSHOT",
        default_value_t = 100_000,
        requires = "urls"
    )]
    pub retain_after_snapshot: u64,

    /// The least time between two of this replica's attempts to publish a snapshot (not a
    /// flag: tests lower it). Each attempt lists the snapshot bucket (three JetStream requests:
    /// a consumer made, read and deleted); at a low `--snapshot-every-records` there would be
    /// many a second. (Before the listing deleted its consumer, the attempts ran the bucket
    /// out of consumers and publications and purges stopped: found by an adversarial run.)
    #[arg(skip = std::time::Duration::from_secs(10))]
    pub snapshot_publish_interval: std::time::Duration,

    /// How long start-up keeps trying while JetStream cannot do what it asks yet (not a flag:
    /// tests lower it): a stream or cluster formed a moment ago is still electing its leaders,
    /// and a stream that existed and is missing may be being restored. A replica that exited
    /// at once would only be restarted into the same wait.
    #[arg(skip = std::time::Duration::from_secs(30))]
    pub start_patience: std::time::Duration,

    /// Takes over a stream of an earlier build's merge rules (1, without the bound on how large
    /// an update may grow a profile): what it holds is applied as before, what comes after
    /// with this build's rules. Only with every replica of the earlier build stopped (README,
    /// "Upgrades"); harmless on a stream of this build's rules.
    #[arg(
        long = "nats-upgrade-rules",
        env = "PROFILE_STATE_NATS_UPGRADE_RULES",
        requires = "urls"
    )]
    pub upgrade_rules: bool,

    /// This replica's name in GetServerInfo, logs and the NATS connection list; default: the
    /// host name.
    #[arg(
        long = "replica-name",
        env = "PROFILE_STATE_REPLICA_NAME",
        requires = "urls"
    )]
    pub replica_name: Option<String>,

    /// Readiness is false while this replica is further behind the stream than this (the
    /// time since it last had applied everything the stream held), so load balancers send
    /// webhooks to replicas that answer quickly.
    #[arg(long = "max-lag", env = "PROFILE_STATE_MAX_LAG", default_value = "1s", value_parser = super::duration, requires = "urls")]
    pub max_lag: Duration,
}

impl NatsConfig {
    /// Whether replicated mode is asked for.
    pub fn enabled(&self) -> bool {
        !self.urls.is_empty()
    }

    /// Rejects NATS settings that cannot work (naming a URL without its credentials); without `--nats-url` there is nothing to check.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let bad = |flag, reason: String| Err(ConfigError::BadNatsFlag { flag, reason });
        for url in &self.urls {
            // An empty one failed later, as a DNS error and exit status 1 (a supervisor then
            // restarts a typo forever; found by an adversarial run), as did the files below.
            if url.trim().is_empty() {
                return bad("nats-url", "is empty".into());
            }
            match url.parse::<async_nats::ServerAddr>() {
                Err(err) => {
                    let url = redact_url(url);
                    return bad("nats-url", format!("{url:?} is not a NATS URL: {err}"));
                }
                // Built without async-nats' websocket support.
                Ok(addr) if addr.is_websocket() => {
                    return bad(
                        "nats-url",
                        format!("{:?}: websocket URLs are not supported", redact_url(url)),
                    );
                }
                Ok(_) => {}
            }
        }
        // Bucket names are derived from it, and they allow only these characters.
        let name_ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if self.stream.is_empty() || !self.stream.chars().all(name_ok) {
            let reason = format!("{:?}: use letters, digits, '-' and '_'", self.stream);
            return bad("nats-stream", reason);
        }
        if !(1..=5).contains(&self.replicas) {
            let reason = format!("{} replicas: JetStream allows 1 to 5", self.replicas);
            return bad("nats-replicas", reason);
        }
        if self.duplicate_window.is_zero() {
            return Err(ConfigError::ZeroDuration {
                flag: "nats-duplicate-window",
            });
        }
        if self.max_bytes == Some(0) {
            return Err(ConfigError::Zero {
                flag: "--nats-max-bytes",
            });
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration {
                flag: "nats-request-timeout",
            });
        }
        if self.publish_linger >= self.request_timeout {
            let reason = "must be shorter than --nats-request-timeout".into();
            return bad("nats-publish-linger", reason);
        }
        if self.max_lag.is_zero() {
            return Err(ConfigError::ZeroDuration { flag: "max-lag" });
        }
        if self.replica_name.as_deref() == Some("") {
            return bad("replica-name", "must not be empty".into());
        }
        let files = [
            ("nats-creds", &self.creds),
            ("nats-tls-ca", &self.tls_ca),
            ("nats-tls-cert", &self.tls_cert),
            ("nats-tls-key", &self.tls_key),
        ];
        for (flag, path) in files {
            if let Some(path) = path
                && let Err(reason) = readable_file(path)
            {
                return bad(flag, reason);
            }
        }
        if let Some(path) = &self.creds {
            let text =
                std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()));
            let parsed = text.and_then(|text| {
                async_nats::ConnectOptions::with_credentials(&text)
                    .map(drop)
                    .map_err(|err| {
                        format!("{}: not a NATS credentials file: {err}", path.display())
                    })
            });
            if let Err(reason) = parsed {
                return bad("nats-creds", reason);
            }
        }
        Ok(())
    }

    /// `--replica-name`, else the host name (`/proc/sys/kernel/hostname`, `$HOSTNAME`), else
    /// `profile-state`.
    pub fn replica_name(&self) -> String {
        if let Some(name) = &self.replica_name {
            return name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "profile-state".into())
    }
}

/// `url` for messages and logs, with any user, password or token before an `@` replaced by
/// `***` (a URL that does not parse included: its error message must not carry them either).
pub fn redact_url(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((before, host)) => {
            let scheme = before.split_once("://").map_or("", |(scheme, _)| scheme);
            format!("{scheme}://***@{host}")
        }
        None => url.to_owned(),
    }
}

/// Whether `path` is a file this process can open.
fn readable_file(path: &std::path::Path) -> Result<(), String> {
    let described = |err: std::io::Error| format!("{}: {err}", path.display());
    let file = std::fs::File::open(path).map_err(described)?;
    match file.metadata().map_err(described)?.is_file() {
        true => Ok(()),
        false => Err(format!("{}: not a file", path.display())),
    }
}
