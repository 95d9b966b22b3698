//! Wiring: recovers the data directory, binds the three listeners, starts the sequencer, serves
//! the webhook ingress (axum), the gRPC API (tonic, with health and reflection) and monitoring
//! on the admin listener, and shuts everything down in order.
//!
//! `Server::bind` then `Server::run(shutdown)`: binding first lets callers (tests, `main`) learn
//! the real addresses of port-0 listeners before serving starts. `bind` checks the
//! configuration, binds the three listeners, and only then touches the data directory, so a
//! port that cannot be had leaves no directory created and no store id minted; connections
//! wait in the listen backlog until recovery is done and `run` serves them. `run` is a sequence of named
//! steps, each a function here: start the domain, follow readiness into health, serve
//! monitoring, serve gRPC, serve the ingress, wait for the signal, then `shutdown`'s ordered
//! stop. No request logic lives here.

mod grpc_services;
mod shutdown;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::data_dir::{self, DataDir};
use crate::dead_letters::DeadLetters;
use crate::grpc::auth::{AdminAccess, AdminAuth, BearerAuth};
use crate::grpc::transport;
use crate::ingest::Ingest;
use crate::journal::FaultSwitch;
use crate::listen_addr::ListenAddr;
use crate::metrics::Metrics;
use crate::monitoring::Monitoring;
use crate::reconcile::{ReconcileJobs, ReconcileOptions};
use crate::sequencer::{Durability, Sequencer};
use crate::startup;
use crate::store::Store;
use crate::watch::Watchers;
use crate::webhook::secrets::{SecretStore, Secrets};
use crate::webhook::{Ingress, Limits, Verification};
use shutdown::{Health, Servers, Shutdown};

/// The configuration, or a file it names (secrets, tokens, certificates), cannot be used, or
/// a listen address cannot be bound for a reason other than another process holding it.
/// Found before the data directory is touched; `main` exits 64 on it.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct BadConfiguration(anyhow::Error);

/// A bound, not yet serving, service.
pub struct Server {
    config: Config,
    webhook: TcpListener,
    grpc: TcpListener,
    admin: TcpListener,
    verification: Verification,
    auth: BearerAuth,
    admin_auth: AdminAuth,
    grpc_builder: tonic::transport::Server,
    store: Store,
    durability: Option<Durability>,
    dead_letters: DeadLetters,
    faults: FaultSwitch,
    reconcile: ReconcileOptions,
    // Holds the directory's lock until the server is dropped.
    data_dir: Option<DataDir>,
}

/// What `Server::bind` reads from the configuration alone, before touching the disk.
struct Checked {
    verification: Verification,
    auth: BearerAuth,
    admin_access: AdminAccess,
    grpc_builder: tonic::transport::Server,
}

impl Server {
    /// Checks the configuration, binds the listeners, then recovers the data directory (unless
    /// `--ephemeral`): nothing is served before recovery is complete, and nothing is written
    /// before the ports are had.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let Checked {
            verification,
            auth,
            admin_access,
            grpc_builder,
        } = check(&config).map_err(|error| anyhow::Error::new(BadConfiguration(error)))?;
        let webhook = listen(&config.webhook_listen, "webhook-listen").await?;
        let grpc = listen(&config.grpc_listen, "grpc-listen").await?;
        let admin = listen(&config.admin_listen, "admin-listen").await?;
        let faults = FaultSwitch::default();
        let (store, durability, data_dir) = open_state(&config, &faults).await?;
        let dead_letters = open_dead_letters(data_dir.as_ref()).await?;
        let admin_auth = AdminAuth::new(auth.clone(), admin_access);
        let reconcile = reconcile_options(&config);
        Ok(Server {
            config,
            webhook,
            grpc,
            admin,
            verification,
            auth,
            admin_auth,
            grpc_builder,
            store,
            durability,
            dead_letters,
            faults,
            reconcile,
            data_dir,
        })
    }

    /// Replaces how reconcile jobs call Gameball (timeouts, retries, batches), whole: the
    /// values `--reconcile-max-jobs` and `--reconcile-max-in-flight` gave included. A testing
    /// seam for short waits.
    pub fn with_reconcile_options(mut self, options: ReconcileOptions) -> Server {
        self.reconcile = options;
        self
    }

    /// The dead letters: signed deliveries that could not be applied (the gRPC AdminService
    /// serves them; tests reach them here).
    pub fn dead_letters(&self) -> DeadLetters {
        self.dead_letters.clone()
    }

    /// The switch that makes journal writes fail: a testing seam for disk failures.
    pub fn journal_faults(&self) -> FaultSwitch {
        self.faults.clone()
    }

    /// The webhook listener's actual address.
    pub fn webhook_addr(&self) -> SocketAddr {
        local_addr(&self.webhook)
    }

    /// The gRPC listener's actual address.
    pub fn grpc_addr(&self) -> SocketAddr {
        local_addr(&self.grpc)
    }

    /// The admin listener's actual address.
    pub fn admin_addr(&self) -> SocketAddr {
        local_addr(&self.admin)
    }

    /// The webhook secrets, for reloading them (SIGHUP does it in production); `None` under
    /// `--insecure-skip-signature`.
    pub fn webhook_secrets(&self) -> Option<SecretStore> {
        secret_store(&self.verification)
    }

    /// Serves until `shutdown` completes, then stops in the order `Shutdown::run`
    /// (`shutdown.rs`) documents: readiness false, watchers told where to resume, listeners
    /// drained, the sequencer's last batch recorded, the journal closed. Each wait is bounded
    /// by `--shutdown-grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            config,
            webhook,
            grpc,
            admin,
            verification,
            auth,
            admin_auth,
            grpc_builder,
            store,
            durability,
            dead_letters,
            faults: _,
            reconcile,
            data_dir,
        } = self;
        let addresses = [local_addr(&webhook), local_addr(&grpc), local_addr(&admin)];
        let admin_access = admin_auth.access();
        let (stopping, tracker, metrics) =
            (CancellationToken::new(), TaskTracker::new(), Metrics::new());
        let watchers = Watchers::new(store.clone());
        let sequencer = start_sequencer(&store, durability, &watchers, &metrics, &tracker);
        if let Verification::Secrets(secrets) = &verification {
            reload_on_sighup(secrets.clone(), &tracker, stopping.clone());
        }
        let writable = sequencer.writable();
        // Reconcile jobs hold a handle only while they run (they end on `stopping`), and the
        // gRPC service holds this one.
        let reconcile = ReconcileJobs::new(
            store.clone(),
            sequencer.clone(),
            secret_store(&verification),
            metrics.clone(),
            reconcile,
            tracker.clone(),
            stopping.clone(),
        );
        crate::reconcile::schedule::start(&reconcile, &config.reconcile.every, &tracker, &stopping);
        // The ingest path takes the only other handle: the sequencer stops once the listeners
        // that use it are gone (shutdown step 4).
        let ingest = Ingest::new(sequencer, dead_letters.clone(), metrics.clone());
        let (health, health_service) =
            Health::follow(writable.clone(), &tracker, stopping.clone()).await;
        let monitoring = Monitoring {
            metrics: metrics.clone(),
            store: store.clone(),
            dead_letters,
            writable,
            stopping: stopping.clone(),
        };
        let monitoring = serve_monitoring(admin, monitoring, &stopping);
        let grpc = grpc_services::serve(
            grpc,
            grpc_services::Services {
                builder: grpc_builder,
                auth,
                admin_auth,
                health: health_service,
                store: store.clone(),
                watchers,
                durable: data_dir.is_some(),
                ingest: ingest.clone(),
                reconcile,
                metrics: metrics.clone(),
                max_watch_streams: config.max_watch_streams,
                max_message_bytes: config.grpc_max_message_bytes,
            },
            &stopping,
            &tracker,
        )?;
        announce(addresses, &config, &verification, admin_access);
        let ingress = Ingress::with_ingest(ingest, verification, limits(&config), metrics);
        let webhook = serve_ingress(webhook, ingress, &stopping);

        wait_for_signal(shutdown, &stopping).await;
        Shutdown {
            health,
            stopping,
            watch_streams_closed: grpc.watch_streams_closed,
            grpc_stopping: grpc.stopping,
            servers: Servers {
                monitoring,
                webhook,
                grpc: grpc.task,
            },
            tracker,
            store,
            data_dir,
            grace: config.shutdown_grace,
        }
        .run()
        .await
    }
}

/// Every `--reconcile-every` account has API settings in the secrets file.
fn check_schedules(config: &Config, verification: &Verification) -> anyhow::Result<()> {
    let secrets = secret_store(verification).map(|store| store.current());
    for every in &config.reconcile.every {
        let client_id = &every.client_id;
        if secrets
            .as_ref()
            .and_then(|s| s.api_account(client_id))
            .is_none()
        {
            anyhow::bail!(
                "--reconcile-every {client_id}: no [gameball_api.\"{client_id}\"] settings in \
                 --webhook-secrets-file (api_key and secret_key)"
            );
        }
    }
    Ok(())
}

/// How reconcile jobs run, from the flags.
fn reconcile_options(config: &Config) -> ReconcileOptions {
    let mut options = ReconcileOptions {
        max_jobs: config.reconcile.max_jobs,
        ..ReconcileOptions::default()
    };
    options.client.max_in_flight = config.reconcile.max_in_flight;
    options
}

/// The secrets reconcile jobs read accounts from; none under `--insecure-skip-signature`.
fn secret_store(verification: &Verification) -> Option<SecretStore> {
    match verification {
        Verification::Secrets(secrets) => Some(secrets.clone()),
        Verification::Skip => None,
    }
}

/// Everything `bind` can refuse from the configuration alone: flag combinations, the webhook
/// secrets, the gRPC tokens and TLS files.
fn check(config: &Config) -> anyhow::Result<Checked> {
    config.check()?;
    let verification = verification(config)?;
    check_schedules(config, &verification)?;
    Ok(Checked {
        verification,
        auth: BearerAuth::from_config(config)?,
        admin_access: AdminAccess::from_config(config),
        grpc_builder: transport::server_builder(config)?,
    })
}

/// The store, and its journal and locked data directory unless `--ephemeral`.
async fn open_state(
    config: &Config,
    faults: &FaultSwitch,
) -> anyhow::Result<(Store, Option<Durability>, Option<DataDir>)> {
    if config.ephemeral {
        let store = Store::new(config.history_events, data_dir::new_store_id());
        tracing::info!(
            store_id = store.store_id(),
            "ephemeral: state is kept in memory only"
        );
        return Ok((store, None, None));
    }
    let (config, faults) = (config.clone(), faults.clone());
    let (store, durability, dir) =
        tokio::task::spawn_blocking(move || startup::open_durable(&config, faults))
            .await
            .context("recovery task")??;
    Ok((store, Some(durability), Some(dir)))
}

/// The dead letters, kept beside the journal and loaded before anything is served; in memory
/// when ephemeral.
async fn open_dead_letters(data_dir: Option<&DataDir>) -> anyhow::Result<DeadLetters> {
    let Some(dir) = data_dir else {
        return Ok(DeadLetters::in_memory());
    };
    let path = dir.path().to_owned();
    Ok(
        tokio::task::spawn_blocking(move || DeadLetters::open(&path))
            .await
            .context("dead letters task")??,
    )
}

/// Binds the listener of `--<flag>`. An address another process holds is a plain error (it
/// may be free on the next try: a restart is worth it); any other failure (a host name that
/// does not resolve, an address this machine does not have, a port it may not use) is bad
/// configuration.
async fn listen(address: &ListenAddr, flag: &str) -> anyhow::Result<TcpListener> {
    address.bind().await.map_err(|error| {
        let in_use = error.is_in_use();
        let error = anyhow::anyhow!("--{flag} {error}");
        if in_use {
            error
        } else {
            anyhow::Error::new(BadConfiguration(error))
        }
    })
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// The one writer, telling the watch layer of every commit.
fn start_sequencer(
    store: &Store,
    durability: Option<Durability>,
    watchers: &Watchers,
    metrics: &Metrics,
    tracker: &TaskTracker,
) -> Sequencer {
    let hook = Arc::new(watchers.clone());
    Sequencer::start_with_hook(store.clone(), durability, hook, metrics.clone(), tracker)
}

/// Serves `/metrics`, `/livez` and `/readyz` until `stopping`.
fn serve_monitoring(
    listener: TcpListener,
    monitoring: Monitoring,
    stopping: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    let serve = axum::serve(listener, monitoring.router())
        .with_graceful_shutdown(stopping.clone().cancelled_owned());
    tokio::spawn(serve.into_future())
}

/// What one webhook, and all of them together, may take.
fn limits(config: &Config) -> Limits {
    Limits {
        max_body_bytes: config.max_body_bytes,
        max_in_flight: config.max_in_flight_webhooks,
        timeout: config.webhook_timeout,
    }
}

/// Serves the webhook path until `stopping`; in-flight webhooks are finished first.
fn serve_ingress(
    listener: TcpListener,
    ingress: Ingress,
    stopping: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    // Answers go out as soon as they are written: no Nagle delay (gRPC sets the same).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a webhook connection");
        }
    });
    let serve = axum::serve(listener, ingress.router())
        .with_graceful_shutdown(stopping.clone().cancelled_owned());
    tokio::spawn(serve.into_future())
}

/// The start-up line: each listener's address, and whether TLS and authentication are on for
/// it; a warning when gRPC data is open to other machines.
fn announce(
    [webhook, grpc, admin]: [SocketAddr; 3],
    config: &Config,
    verification: &Verification,
    admin_access: AdminAccess,
) {
    let webhook_auth = match verification {
        Verification::Secrets(_) => "X-GB-Signature",
        Verification::Skip => "off (--insecure-skip-signature)",
    };
    let grpc_tls = match (&config.grpc_tls_cert, &config.grpc_client_ca) {
        (None, _) => "off",
        (Some(_), None) => "on",
        (Some(_), Some(_)) => "on, client certificates required",
    };
    let grpc_auth = match (&config.grpc_auth_tokens_file, &config.grpc_client_ca) {
        (Some(_), _) => "bearer token",
        (None, Some(_)) => "client certificate",
        (None, None) => "off",
    };
    tracing::info!(
        webhook = %webhook,
        webhook_tls = "off (terminate HTTPS in front)",
        webhook_auth,
        grpc = %grpc,
        grpc_tls,
        grpc_auth,
        admin_service_auth = admin_access.describe(),
        admin = %admin,
        admin_tls = "off",
        admin_auth = "off (metrics and health only)",
        "profile-state listening"
    );
    if grpc_auth == "off" && !grpc.ip().to_canonical().is_loopback() {
        tracing::warn!(
            grpc = %grpc,
            admin_service_auth = admin_access.describe(),
            "gRPC is reachable from other machines without credentials: anyone who can connect \
             reads every profile; set --grpc-auth-tokens-file (SECURITY.md)"
        );
    }
}

/// Waits for the caller's shutdown signal (or for something inside cancelling `stopping`).
async fn wait_for_signal(shutdown: impl Future<Output = ()>, stopping: &CancellationToken) {
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        () = stopping.cancelled() => {}
    }
}

/// How webhooks are authenticated: the secrets (file and/or flag), or not at all.
fn verification(config: &Config) -> anyhow::Result<Verification> {
    if config.insecure_skip_signature {
        tracing::warn!(
            "--insecure-skip-signature is set: webhooks are accepted without checking \
             X-GB-Signature"
        );
        return Ok(Verification::Skip);
    }
    let flag = config.webhook_secret.clone();
    let secrets = match &config.webhook_secrets_file {
        Some(file) => Secrets::load(file, flag.as_deref())?,
        None => Secrets::single(flag.as_deref().context("a webhook secret is configured")?),
    };
    Ok(Verification::Secrets(SecretStore::new(
        secrets,
        config.webhook_secrets_file.clone(),
        flag,
    )))
}

/// Reloads the webhook secrets file on every SIGHUP; a bad file keeps the old secrets.
fn reload_on_sighup(secrets: SecretStore, tracker: &TaskTracker, stopping: CancellationToken) {
    // Installed here, before the listeners announce themselves: a SIGHUP without a handler
    // would terminate the process.
    #[cfg(unix)]
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; secrets will not reload");
            return;
        }
    };
    #[cfg(unix)]
    tracker.spawn(async move {
        loop {
            tokio::select! {
                received = hangups.recv() => if received.is_none() { return },
                () = stopping.cancelled() => return,
            }
            match secrets.reload() {
                Ok(()) => tracing::info!("webhook secrets reloaded"),
                Err(error) => {
                    tracing::error!(%error, "webhook secrets not reloaded; the old ones stay")
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (secrets, tracker, stopping);
}
