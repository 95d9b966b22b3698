//! The NATS connection as configured by the `--nats-*` flags, and its JetStream context.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, Context};
use async_nats::{ConnectOptions, Event};
use tokio::sync::watch;

use super::JetStreamError;
use crate::config::NatsConfig;
use crate::config::redact_url;
use crate::logging::RateLimited;

/// A connection to NATS and its JetStream context. Cloning is cheap (handles onto one
/// connection task that async-nats owns; it reconnects by itself, forever).
#[derive(Clone)]
pub struct Nats {
    client: async_nats::Client,
    context: Context,
    /// Counts (re)connections; a follower rebuilds its consumer when it moves, since the
    /// consumer may have gone with the server that restarted.
    connections: watch::Receiver<u64>,
    /// `--nats-request-timeout`: the longest one request may take.
    request_timeout: Duration,
}

impl Nats {
    /// Connects to the configured URLs; `name` is how this replica shows up in the servers'
    /// connection lists. Fails if no server can be reached now.
    pub async fn connect(config: &NatsConfig, name: &str) -> Result<Nats, JetStreamError> {
        let urls = redacted(&config.urls);
        let error = |reason: String| JetStreamError::Connect {
            urls: urls.clone(),
            reason,
        };
        // How long one JetStream request (publish acknowledgement, stream info) may take:
        // `--nats-request-timeout`, below the webhook timeout (checked with the flags), so a
        // webhook can still be answered 503 in time.
        let timeout: Duration = config.request_timeout;
        let addrs = config
            .urls
            .iter()
            .map(|url| url.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| error(err.to_string()))?;
        let (connected, connections) = watch::channel(0u64);
        let connected = Arc::new(connected);
        let log = Arc::new(ConnectionLog {
            repeated_errors: RateLimited::default(),
            servers: addrs.clone(),
        });
        let mut options = ConnectOptions::new()
            .event_callback(move |event| {
                let (connected, log) = (connected.clone(), log.clone());
                async move {
                    log.event(&event);
                    if matches!(event, Event::Connected) {
                        connected.send_modify(|count| *count += 1);
                    }
                }
            })
            .name(name)
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            .ping_interval(ping_interval(timeout));
        if let Some(path) = &config.creds {
            options = options
                .credentials_file(path)
                .await
                .map_err(|err| error(format!("--nats-creds: {}: {err}", path.display())))?;
        }
        if let Some(path) = &config.tls_ca {
            check_readable("--nats-tls-ca", path).map_err(error)?;
            options = options
                .add_root_certificates(path.clone())
                .require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
            check_readable("--nats-tls-cert", cert).map_err(error)?;
            check_readable("--nats-tls-key", key).map_err(error)?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        // async-nats names one server's failure for the whole list (the last tried, or a
        // random one): each server and what a TCP connection to it says (found by an
        // adversarial run).
        let client = match options.connect(addrs.clone()).await {
            Ok(client) => client,
            Err(err) => {
                let servers = reachability(&addrs).await;
                return Err(error(format!("{err} (each server: {servers})")));
            }
        };
        let mut context = jetstream::new(client.clone());
        context.set_timeout(timeout);
        Ok(Nats {
            client,
            context,
            connections,
            request_timeout: timeout,
        })
    }

    /// The JetStream context.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// A receiver that changes whenever the client (re)connects.
    pub(super) fn connections(&self) -> watch::Receiver<u64> {
        self.connections.clone()
    }

    /// Whether the connection is up right now (readiness).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// The largest message the connected server accepts, in bytes: a batch must stay below it.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// `--nats-request-timeout`.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }
}

/// The URLs for messages and logs, with any embedded user and password removed.
fn redacted(urls: &[String]) -> String {
    let shown: Vec<String> = urls.iter().map(|url| redact_url(url)).collect();
    shown.join(",")
}

/// async-nats reads certificate files only when it connects, and then reports a missing file
/// as a generic TLS failure; checking first names the flag.
fn check_readable(flag: &str, path: &std::path::Path) -> Result<(), String> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|err| format!("{flag}: {}: {err}", path.display()))
}

/// How often the client pings its server. A server that hangs (a frozen VM, a black-holed node:
/// no FIN, no RST) is left for another once three pings in a row go unanswered; with the
/// client's default (a minute) that took about three minutes, while every publish timed out
/// (503) and the cluster had a quorum elsewhere. Half the request timeout: about 7.5 s with the
/// default.
fn ping_interval(request_timeout: Duration) -> Duration {
    (request_timeout / 2).max(Duration::from_secs(1))
}

/// How long [`reachability`] waits for each server to accept a TCP connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Logs connection events in our words. async-nats logs each one at INFO itself, a "client
/// error" every few seconds while NATS is down; its target is at WARN by default
/// (`logging::filter`), and the errors are repeated here at most every 10 s.
struct ConnectionLog {
    repeated_errors: RateLimited,
    /// `--nats-url`, to say which servers cannot be reached and why.
    servers: Vec<async_nats::ServerAddr>,
}

impl ConnectionLog {
    fn event(&self, event: &Event) {
        match event {
            Event::Connected => tracing::info!("connected to NATS"),
            Event::Disconnected => tracing::warn!("lost the connection to NATS; reconnecting"),
            Event::ClientError(_) => {
                // async-nats's reconnect errors name neither the server nor the cause ("IO
                // error"): a TCP connection to each server tells an operator where to look.
                // Spawned, so that the events after this one are not held up.
                if let Some(suppressed) = self.repeated_errors.due() {
                    let (servers, error) = (self.servers.clone(), event.to_string());
                    tokio::spawn(async move {
                        let servers = reachability(&servers).await;
                        let client_error = error.as_str();
                        tracing::warn!(
                            suppressed,
                            servers,
                            client_error,
                            "cannot reach NATS; retrying"
                        );
                    });
                }
            }
            Event::ServerError(_) => {
                if let Some(suppressed) = self.repeated_errors.due() {
                    tracing::warn!(suppressed, "NATS connection: {event}");
                }
            }
            event => tracing::info!("NATS connection: {event}"),
        }
    }
}

/// What a plain TCP connection to each server says, e.g. `127.0.0.1:4222: Connection refused
/// (os error 111)`.
async fn reachability(servers: &[async_nats::ServerAddr]) -> String {
    let probes = servers.iter().map(|server| async move {
        let (host, port) = (server.host(), server.port());
        let shown = match host.contains(':') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        };
        let connecting = tokio::net::TcpStream::connect((host, port));
        let outcome = match tokio::time::timeout(PROBE_TIMEOUT, connecting).await {
            Err(_) => "no answer within 2 s (the host is down, or packets are dropped)".into(),
            Ok(Err(error)) => error.to_string(),
            Ok(Ok(_)) => {
                "accepts TCP connections (TLS, the credentials or NATS itself fails)".into()
            }
        };
        format!("{shown}: {outcome}")
    });
    futures_util::future::join_all(probes).await.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_messages_never_carry_credentials() {
        let urls = [
            "nats://user:secret@a:4222".to_string(),
            "tls://b:4222".into(),
        ];
        assert_eq!(redacted(&urls), "nats://***@a:4222,tls://b:4222");
    }
}
