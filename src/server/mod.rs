//! Wiring: recovers the data directory (or, with `--nats-url`, opens the replica: its stream
//! and its starting snapshot), binds the three listeners, starts the ingest thread
//! (`ingest_thread.rs`) and the sequencer on it (or the replica's publisher and applier, on
//! the main runtime), serves the webhook ingress (axum, on the ingest thread), the gRPC API
//! (tonic, with health and reflection) and monitoring on the admin listener, and shuts
//! everything down in order.
//!
//! `Server::bind` then `Server::run(shutdown)`: binding first lets callers (tests, `main`) learn
//! the real addresses of port-0 listeners before serving starts. `bind` checks the
//! configuration, binds the three listeners, and only then touches the data directory, so a
//! port that cannot be had leaves no directory created and no store id minted; webhook and
//! gRPC connections wait in the listen backlog until recovery is done and `run` serves them
//! (the admin listener answers "starting" meanwhile). `run` serves (`Server::serve`, a sequence
//! of named steps, each a function here: start the domain, follow readiness into health,
//! start the reconcile jobs and their schedule, give the admin listener its monitoring, serve
//! gRPC, serve the ingress), waits for the signal, then stops (`Running::stop`: `shutdown`'s
//! ordered stop). No request logic lives here.

mod admin_listener;
mod coalesce;
mod connections;
mod cut;
mod grpc_services;
mod ingest_thread;
mod shutdown;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::data_dir::{self, DataDir};
use crate::dead_letters::{DeadLetters, LocalLetters};
use crate::grpc::auth::{AdminAccess, AdminAuth, BearerAuth};
use crate::grpc::certificates::TlsCertificates;
use crate::grpc::transport;
use crate::ingest::Ingest;
use crate::journal::FaultSwitch;
use crate::listen_addr::ListenAddr;
use crate::metrics::Metrics;
use crate::monitoring::{AdminEndpoints, Monitoring};
use crate::reconcile::schedule::SlotClaims;
use crate::reconcile::{ReconcileJobs, ReconcileOptions};
use crate::replication::{self, ApplierPause, ReplicaStatus};
use crate::sequencer::{Durability, JournalState, Sequencer};
use crate::startup;
use crate::store::Store;
use crate::watch::Watchers;
use crate::webhook::secrets::{SecretStore, Secrets};
use crate::webhook::{Ingress, Limits, Verification};
use admin_listener::AdminServer;
use connections::CappedListener;
use ingest_thread::IngestThread;
use shutdown::{Health, Servers, Shutdown};

/// The configuration, or a file it names (secrets, tokens, certificates), cannot be used (a
/// `--data-dir` that is a file included), or a listen address cannot be bound for a reason
/// other than another process holding it.
/// Found before the data directory is touched; `main` exits 64 on it.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct BadConfiguration(pub(crate) anyhow::Error);

/// A bound, not yet serving, service.
pub struct Server {
    config: Config,
    webhook: TcpListener,
    grpc: TcpListener,
    /// The admin listener, served since it was bound: start-up answers until `run` gives it
    /// the monitoring to answer from; the server (stopped if this is dropped without
    /// running); its address.
    admin: (AdminEndpoints, AdminServer, SocketAddr),
    /// The server's metrics, from the bind on (the admin listener counts its connections).
    metrics: Metrics,
    verification: Verification,
    auth: BearerAuth,
    admin_auth: AdminAuth,
    grpc_transport: grpc_services::Transport,
    store: Store,
    mode: Mode,
    dead_letters: DeadLetters,
    /// Replicated mode: the claims that run each schedule period on one replica.
    schedule_claims: Option<Arc<dyn SlotClaims>>,
    faults: FaultSwitch,
    pause: ApplierPause,
    reconcile: ReconcileOptions,
    // Holds the directory's lock until the server stops (and whatever still writes there,
    // holding a share of it, has ended).
    data_dir: Option<DataDir>,
}

/// Who writes the store: the sequencer over the local journal, or a replica's applier over
/// the stream.
enum Mode {
    /// A single node: the journal (`None` under `--ephemeral`).
    Local(Option<Durability>),
    /// A replica (`--nats-url`), recovered, not yet applying.
    Replicated(Box<replication::Prepared>),
}

/// The domain as started by `Server::run`.
struct Domain {
    ingest: Ingest,
    watchers: Watchers,
    /// Ready for webhooks, as far as the writer can tell (health follows it).
    ready: tokio::sync::watch::Receiver<bool>,
    /// Whether the journal takes writes (always writable for a replica).
    journal_state: tokio::sync::watch::Receiver<JournalState>,
    replica: Option<ReplicaStatus>,
    /// Cancelled when the service must stop to be started again (a replica the stream was
    /// purged past); never on a single node.
    restart: CancellationToken,
}

/// What `Server::bind` reads from the configuration alone, before touching the disk.
struct Checked {
    verification: Verification,
    auth: BearerAuth,
    admin_access: AdminAccess,
    grpc_transport: grpc_services::Transport,
}

impl Server {
    /// Checks the configuration, binds the listeners, then recovers the data directory (unless
    /// `--ephemeral`): nothing is served before recovery is complete but the admin listener's
    /// start-up answers (`monitoring::AdminEndpoints`), and nothing is written
    /// before the ports are had.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let Checked {
            verification,
            auth,
            admin_access,
            grpc_transport,
        } = check(&config).map_err(|error| anyhow::Error::new(BadConfiguration(error)))?;
        connections::raise_open_files_limit();
        let webhook = listen(&config.webhook_listen, "webhook-listen").await?;
        let grpc = listen(&config.grpc_listen, "grpc-listen").await?;
        let admin = listen(&config.admin_listen, "admin-listen").await?;
        let (endpoints, metrics) = (AdminEndpoints::default(), Metrics::new());
        let admin_addr = local_addr(&admin);
        let admin_server = AdminServer::start(admin, &endpoints, metrics.listener("admin"));
        let admin = (endpoints, admin_server, admin_addr);
        let faults = FaultSwitch::default();
        let (store, mode, data_dir, dead_letters, schedule_claims) = match config.nats.enabled() {
            true => {
                let opened = replication::open(&config).await?;
                let mode = Mode::Replicated(Box::new(opened.replica));
                let dead_letters = DeadLetters::shared(Arc::new(opened.dead_letters));
                let claims: Arc<dyn SlotClaims> = Arc::new(opened.schedule);
                (
                    opened.store,
                    mode,
                    opened.data_dir,
                    dead_letters,
                    Some(claims),
                )
            }
            false => {
                let (store, durability, data_dir) = open_state(&config, &faults).await?;
                let dead_letters = open_dead_letters(data_dir.as_ref()).await?;
                (store, Mode::Local(durability), data_dir, dead_letters, None)
            }
        };
        let admin_auth = AdminAuth::new(auth.clone(), admin_access);
        let reconcile = reconcile_options(&config);
        Ok(Server {
            config,
            webhook,
            grpc,
            admin,
            metrics,
            verification,
            auth,
            admin_auth,
            grpc_transport,
            store,
            mode,
            dead_letters,
            schedule_claims,
            faults,
            pause: ApplierPause::default(),
            reconcile,
            data_dir,
        })
    }

    /// The switch that holds a replica's applier between stream messages: a testing seam for a
    /// replica that lags behind (no effect on a single node).
    pub fn applier_pause(&self) -> ApplierPause {
        self.pause.clone()
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
        self.admin.2
    }

    /// The webhook secrets, for reloading them (SIGHUP does it in production); `None` under
    /// `--insecure-skip-signature`.
    pub fn webhook_secrets(&self) -> Option<SecretStore> {
        secret_store(&self.verification)
    }

    /// Serves until `shutdown` completes, then stops in the order `Shutdown::run`
    /// (`shutdown.rs`) documents: readiness false, watchers told where to resume, listeners
    /// drained, the sequencer's last batch recorded, the journal closed. Each wait is bounded
    /// by `--shutdown-grace`. A replica the stream was purged past stops the same way by itself
    /// and returns an error: it must be started again, from the newest published snapshot.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let running = self.serve().await?;
        wait_for_signal(shutdown, &running.stopping, &running.restart).await;
        running.stop().await
    }

    /// Starts the domain and serves every listener: the steps of the module doc, up to the
    /// wait for the signal.
    async fn serve(self) -> anyhow::Result<Running> {
        let Server {
            config,
            webhook,
            grpc,
            admin: (admin, admin_server, admin_addr),
            metrics,
            verification,
            auth,
            admin_auth,
            grpc_transport,
            store,
            mode,
            dead_letters,
            schedule_claims,
            faults: _,
            pause,
            reconcile,
            data_dir,
        } = self;
        let addresses = [local_addr(&webhook), local_addr(&grpc), admin_addr];
        let admin_access = admin_auth.access();
        let (stopping, tracker) = (CancellationToken::new(), TaskTracker::new());
        let context = (&store, &metrics, &tracker, &stopping);
        let ingest_thread = IngestThread::start()
            .await
            .context("cannot start the ingest thread")?;
        let domain = start_domain(mode, context, &ingest_thread, dead_letters.clone(), pause);
        reload_secrets_on_sighup(&verification, &config, &tracker, &stopping);
        let (health, health_service) =
            Health::follow(domain.ready, &tracker, stopping.clone()).await;
        let secrets = secret_store(&verification);
        let reconcile = (reconcile, schedule_claims);
        let reconcile = start_reconcile(context, &domain.ingest, secrets, reconcile, &config);
        let replica = domain.replica;
        serve_monitoring(
            &admin,
            context,
            dead_letters,
            domain.journal_state,
            replica.clone(),
        );
        let certificates = grpc_transport.certificates.clone();
        let apis = grpc_services::Apis {
            store: store.clone(),
            watchers: domain.watchers,
            durable: data_dir.is_some(),
            ingest: domain.ingest.clone(),
            reconcile,
            metrics: metrics.clone(),
            replica: replica.clone(),
        };
        let services = grpc_services::Services {
            transport: grpc_transport,
            auth,
            admin_auth,
            health: health_service,
            apis,
            limits: grpc_limits(&config),
        };
        let grpc = serve_grpc(grpc, &config, services, &stopping, &tracker)?;
        announce(addresses, &config, &verification, admin_access);
        report_certificates(&metrics, certificates.as_ref());
        let limits = limits(&config);
        let ingress = Ingress::with_ingest(domain.ingest, verification, limits, metrics.clone())
            .with_stopping(stopping.clone());
        let servers = (&metrics, &stopping);
        let webhook = serve_ingress(webhook, ingress, &config, servers, &ingest_thread)?;
        Ok(Running {
            health,
            stopping,
            restart: domain.restart,
            grpc,
            webhook,
            tracker,
            store,
            data_dir,
            grace: config.shutdown_grace,
            ingest_thread,
            admin: admin_server,
            replica,
        })
    }
}

/// A server that serves, until its ordered stop.
struct Running {
    health: Health,
    stopping: CancellationToken,
    /// Cancelled when a replica must stop to be started again.
    restart: CancellationToken,
    grpc: grpc_services::Serving,
    webhook: JoinHandle<std::io::Result<()>>,
    tracker: TaskTracker,
    store: Store,
    data_dir: Option<DataDir>,
    grace: std::time::Duration,
    ingest_thread: IngestThread,
    admin: AdminServer,
    replica: Option<ReplicaStatus>,
}

impl Running {
    /// The ordered stop (`Shutdown::run`); an error after it when a replica stopped to be
    /// started again.
    async fn stop(self) -> anyhow::Result<()> {
        let stopped = Shutdown {
            health: self.health,
            stopping: self.stopping,
            watch_streams_closed: self.grpc.watch_streams_closed,
            grpc_stopping: self.grpc.stopping,
            grpc_cut: self.grpc.cut,
            servers: Servers {
                webhook: self.webhook,
                grpc: self.grpc.task,
            },
            tracker: self.tracker,
            store: self.store,
            data_dir: self.data_dir,
            grace: self.grace,
            ingest_thread: self.ingest_thread,
            admin: self.admin,
        }
        .run()
        .await;
        if self.restart.is_cancelled() {
            // The applier's reason: the stream purged past this replica, or replaced.
            let reason = self.replica.and_then(|status| status.failure());
            anyhow::bail!(
                "this replica stopped to start again ({}): started again, it loads the newest \
                 published snapshot (a supervisor restarts it by itself)",
                reason
                    .as_deref()
                    .unwrap_or("the stream cannot be followed from its position")
            );
        }
        stopped
    }
}

/// The served certificates' dates as metrics, and a warning for each that expires soon or is
/// not valid yet.
fn report_certificates(metrics: &Metrics, certificates: Option<&TlsCertificates>) {
    let Some(certificates) = certificates else {
        return;
    };
    metrics.tls_certificate_expiry(certificates.expiry());
    metrics.tls_certificate_valid_from(certificates.valid_from());
    for warning in certificates.warnings(chrono::Utc::now().timestamp()) {
        tracing::warn!("{warning}");
    }
}

/// Every `--reconcile-every` account has API settings in the secrets file.
fn check_schedules(config: &Config, verification: &Verification) -> anyhow::Result<()> {
    let secrets = secret_store(verification).map(|store| store.current());
    for every in &config.reconcile.every {
        let client_id = &every.client_id;
        if config.webhook_secrets_file.is_none() {
            // "no settings in --webhook-secrets-file" sent a first-user review looking for a
            // file that was never given.
            anyhow::bail!(
                "--reconcile-every {client_id}: reconciliation needs --webhook-secrets-file \
                 with a [gameball_api.\"{client_id}\"] table (api_key and secret_key), and no \
                 secrets file is given"
            );
        }
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
/// secrets, the gRPC tokens and TLS files, a `--data-dir` that is not a directory.
fn check(config: &Config) -> anyhow::Result<Checked> {
    config.check()?;
    // A file where the directory should be is configuration (exit 64), not a failure to
    // start worth retrying (exit 1, which it was), and is known before anything binds.
    if !config.ephemeral {
        data_dir::check_kind(&config.data_dir)?;
    }
    let verification = verification(config)?;
    check_schedules(config, &verification)?;
    Ok(Checked {
        verification,
        auth: BearerAuth::from_config(config)?,
        admin_access: AdminAccess::from_config(config),
        grpc_transport: match transport::tls_acceptor(config)? {
            Some((acceptor, certificates)) => grpc_services::Transport {
                builder: transport::server_builder(config),
                tls: Some(acceptor),
                certificates: Some(certificates),
            },
            None => grpc_services::Transport {
                builder: transport::server_builder(config),
                tls: None,
                certificates: None,
            },
        },
    })
}

/// The store, and its journal and locked data directory unless `--ephemeral`.
async fn open_state(
    config: &Config,
    faults: &FaultSwitch,
) -> anyhow::Result<(Store, Option<Durability>, Option<DataDir>)> {
    if config.ephemeral {
        let store = Store::with_history(config.history(), data_dir::new_store_id());
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

/// A single node's dead letters, kept beside the journal and loaded before anything is served;
/// in memory when ephemeral. (A replica's are the cluster's, in the stream's bucket.)
async fn open_dead_letters(data_dir: Option<&DataDir>) -> anyhow::Result<DeadLetters> {
    let Some(dir) = data_dir else {
        return Ok(DeadLetters::in_memory());
    };
    let (path, lock) = (dir.path().to_owned(), dir.lock_ref());
    Ok(
        tokio::task::spawn_blocking(move || {
            LocalLetters::open(&path, lock).map(DeadLetters::local)
        })
        .await
        .context("dead letters task")??,
    )
}

/// Binds the listener of `--<flag>`. An address another process holds is a plain error (it
/// may be free on the next try: a restart is worth it); any other failure (a host name that
/// does not resolve, an address this machine does not have, a port it may not use) is bad
/// configuration. Either names the flag as every flag's error does, `--flag: VALUE: reason`.
async fn listen(address: &ListenAddr, flag: &str) -> anyhow::Result<TcpListener> {
    address.bind().await.map_err(|error| {
        let in_use = error.is_in_use();
        let error = anyhow::anyhow!("--{flag}: {error}");
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

/// Starts the store's one writer, telling the watch layer of every commit: the sequencer on a
/// single node, on the ingest thread; the replica's applier (and its publisher) in replicated
/// mode, on this runtime (it also starts snapshot uploads, whose hashing of every chunk must
/// not hold up webhooks). The ingest path takes the only handle of the sequencer or publisher:
/// it stops once the listeners that use it are gone (shutdown step 4), and a replica's applier
/// after it.
fn start_domain(
    mode: Mode,
    (store, metrics, tracker, stopping): (&Store, &Metrics, &TaskTracker, &CancellationToken),
    ingest_thread: &IngestThread,
    dead_letters: DeadLetters,
    pause: ApplierPause,
) -> Domain {
    let watchers = Watchers::new(store.clone());
    match mode {
        Mode::Local(durability) => {
            // The sequencer's task is spawned with `tokio::spawn` (through `tracker`): onto the
            // ingest thread, beside the handlers that hand it updates.
            let sequencer = {
                let _on_ingest_thread = ingest_thread.handle().enter();
                start_sequencer(store, durability, &watchers, metrics, tracker)
            };
            let journal_state = sequencer.journal_state();
            Domain {
                ingest: Ingest::new(sequencer, dead_letters, metrics.clone()),
                watchers,
                ready: ready_while_writable(journal_state.clone(), tracker),
                journal_state,
                replica: None,
                restart: CancellationToken::new(),
            }
        }
        Mode::Replicated(prepared) => {
            let hook = Arc::new(watchers.clone());
            let running = prepared.start(store, hook, metrics, tracker, stopping, pause);
            Domain {
                ingest: Ingest::replicated(running.publisher, dead_letters, metrics.clone()),
                watchers: watchers.with_catch_up(running.catch_up),
                ready: running.ready,
                // No journal: writability is the replica's readiness, reported apart.
                journal_state: tokio::sync::watch::channel(JournalState::Writable).1,
                replica: Some(running.status),
                restart: running.restart,
            }
        }
    }
}

/// Whether a single node is ready for webhooks: while its journal takes writes (health
/// follows this, `/readyz` reads the journal's state itself, to say why not).
fn ready_while_writable(
    mut journal_state: tokio::sync::watch::Receiver<JournalState>,
    tracker: &TaskTracker,
) -> tokio::sync::watch::Receiver<bool> {
    let writable = |state: &JournalState| *state == JournalState::Writable;
    let (ready_tx, ready) = tokio::sync::watch::channel(writable(&journal_state.borrow()));
    tracker.spawn(async move {
        while journal_state.changed().await.is_ok() {
            let now = writable(&journal_state.borrow_and_update());
            ready_tx.send_if_modified(|ready| std::mem::replace(ready, now) != now);
        }
    });
    ready
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

/// Starts the reconcile jobs' handle and their `--reconcile-every` schedule. Reconcile jobs
/// record through the ingest path (the sequencer on a single node, the stream on a replica),
/// like webhooks; they end on `stopping`, and the gRPC service holds their handle.
fn start_reconcile(
    (store, metrics, tracker, stopping): (&Store, &Metrics, &TaskTracker, &CancellationToken),
    ingest: &Ingest,
    secrets: Option<SecretStore>,
    (options, claims): (ReconcileOptions, Option<Arc<dyn SlotClaims>>),
    config: &Config,
) -> ReconcileJobs {
    let jobs = ReconcileJobs::new(
        store.clone(),
        ingest.clone(),
        secrets,
        metrics.clone(),
        options,
        tracker.clone(),
        stopping.clone(),
    );
    let every = &config.reconcile.every;
    crate::reconcile::schedule::start(&jobs, every, tracker, stopping, claims);
    jobs
}

/// Serves the gRPC listener, capped at `--max-grpc-connections`, until `stopping`.
fn serve_grpc<H: tonic_health::pb::health_server::Health>(
    listener: TcpListener,
    config: &Config,
    services: grpc_services::Services<H>,
    stopping: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<grpc_services::Serving> {
    let metrics = services.apis.metrics.listener("grpc");
    let listener = CappedListener::new(listener, config.max_grpc_connections, metrics);
    grpc_services::serve(listener, services, stopping, tracker)
}

/// Ends the admin listener's start-up answers: `/metrics` and `/readyz` answer from
/// `Monitoring` from now on (it is served until the end of the ordered stop).
fn serve_monitoring(
    endpoints: &AdminEndpoints,
    (store, metrics, _, stopping): (&Store, &Metrics, &TaskTracker, &CancellationToken),
    dead_letters: DeadLetters,
    journal_state: tokio::sync::watch::Receiver<JournalState>,
    replica: Option<ReplicaStatus>,
) {
    endpoints.started(Monitoring {
        metrics: metrics.clone(),
        store: store.clone(),
        dead_letters,
        journal_state,
        stopping: stopping.clone(),
        replica,
    });
}

/// What one webhook, and all of them together, may take.
fn limits(config: &Config) -> Limits {
    Limits {
        max_body_bytes: config.max_body_bytes,
        max_in_flight: config.max_in_flight_webhooks,
        body_timeout: config.webhook_body_timeout,
        timeout: config.webhook_timeout,
    }
}

/// What one RPC, and all of them together, may take.
fn grpc_limits(config: &Config) -> grpc_services::Limits {
    grpc_services::Limits {
        max_watch_streams: config.max_watch_streams,
        max_watch_streams_per_connection: config.max_watch_streams_per_connection,
        max_message_bytes: config.grpc_max_message_bytes,
        handshake_timeout: config.grpc_handshake_timeout,
        request_body_timeout: config.grpc_request_body_timeout,
        backup_stall_timeout: config.backup_stall_timeout,
        write_stall: (!config.grpc_keepalive_interval.is_zero())
            .then(|| config.grpc_keepalive_interval + config.grpc_keepalive_timeout),
    }
}

/// Requests an HTTP/2 connection to the webhook port may run at once: one, as over HTTP/1.1, so
/// that the connection cap bounds the requests in progress (and the bodies being read) whatever
/// the protocol. At hyper's default of 200, eleven connections of stalled bodies took gigabytes,
/// or every place of a cap on requests (found by adversarial runs). A proxy that speaks HTTP/2
/// to us opens more connections instead; Gameball sends one delivery per request.
const WEBHOOK_HTTP2_STREAMS: u32 = 1;

/// Serves the webhook path on the ingest thread until `stopping`; in-flight webhooks are
/// finished first. Each connection has the idle and header timeouts (`--webhook-idle-timeout`,
/// `--webhook-header-timeout`).
fn serve_ingress(
    listener: TcpListener,
    ingress: Ingress,
    config: &Config,
    (metrics, stopping): (&Metrics, &CancellationToken),
    ingest_thread: &IngestThread,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let metrics = metrics.listener("webhook");
    // Moved to the ingest thread's runtime: a listener stays registered with the runtime that
    // made it, and would wake this one for every connection.
    let moved = listener.into_std().and_then(|listener| {
        let _on_ingest_thread = ingest_thread.handle().enter();
        TcpListener::from_std(listener)
    });
    let listener = moved.context("cannot move the webhook listener to the ingest thread")?;
    let listener = CappedListener::new(listener, config.max_webhook_connections, metrics);
    let options = connections::HttpOptions {
        idle: config.webhook_idle_timeout,
        header: config.webhook_header_timeout,
        http2_streams: Some(WEBHOOK_HTTP2_STREAMS),
    };
    Ok(ingest_thread.handle().spawn(connections::serve_http(
        listener,
        ingress.router(),
        options,
        stopping.clone(),
    )))
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
    let largest = crate::grpc::largest_change_bytes(config.max_body_bytes);
    if largest > config.grpc_max_message_bytes {
        tracing::warn!(
            largest,
            grpc_max_message_bytes = config.grpc_max_message_bytes,
            max_body_bytes = config.max_body_bytes,
            "a profile may grow larger than a gRPC message may carry (a watch change with its \
             previous state may take about {largest} bytes): such a profile could not be read \
             or watched; raise --grpc-max-message-bytes or lower --max-body-bytes"
        );
    }
    if grpc_auth == "off" && !grpc.ip().to_canonical().is_loopback() {
        tracing::warn!(
            grpc = %grpc,
            admin_service_auth = admin_access.describe(),
            "gRPC is reachable from other machines without credentials: anyone who can connect \
             reads every profile; set --grpc-auth-tokens-file (SECURITY.md)"
        );
    }
}

/// Waits for the caller's shutdown signal (or for something inside cancelling `stopping`, or
/// asking for a restart).
async fn wait_for_signal(
    shutdown: impl Future<Output = ()>,
    stopping: &CancellationToken,
    restart: &CancellationToken,
) {
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        () = stopping.cancelled() => {}
        () = restart.cancelled() => tracing::info!("shutting down, to be started again"),
    }
}

/// How webhooks are authenticated: the secrets (file and/or flag), or not at all.
fn verification(config: &Config) -> anyhow::Result<Verification> {
    if config.insecure_skip_signature {
        tracing::warn!(
            "--insecure-skip-signature is set: webhooks are accepted without checking \
             X-GB-Signature"
        );
        // Never beside secrets: `Config::check` refuses that.
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

/// Unless webhooks are unsigned: reloads the webhook secrets on every SIGHUP.
fn reload_secrets_on_sighup(
    verification: &Verification,
    config: &Config,
    tracker: &TaskTracker,
    stopping: &CancellationToken,
) {
    if let Verification::Secrets(secrets) = verification {
        let scheduled = config.reconcile.every.iter().map(|e| e.client_id.clone());
        reload_on_sighup(
            secrets.clone(),
            scheduled.collect(),
            tracker,
            stopping.clone(),
        );
    }
}

/// Reloads the webhook secrets file on every SIGHUP; a bad file keeps the old secrets.
fn reload_on_sighup(
    secrets: SecretStore,
    scheduled: Vec<String>,
    tracker: &TaskTracker,
    stopping: CancellationToken,
) {
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
            if !secrets.reloads_a_file() {
                // It said "reloaded" of secrets that come from flags only (found by a
                // fresh-eyes run).
                tracing::info!("SIGHUP: there is no --webhook-secrets-file to reload");
                continue;
            }
            match secrets.reload() {
                Ok(()) => {
                    tracing::info!("webhook secrets reloaded");
                    warn_of_unscheduled(&secrets, &scheduled);
                }
                Err(error) => {
                    tracing::error!(%error, "webhook secrets not reloaded; the old ones stay")
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (secrets, scheduled, tracker, stopping);
}

/// A reloaded secrets file without the API settings of a `--reconcile-every` account: start-up
/// refuses that file, a reload takes it (the webhook secrets in it may be a rotation that must
/// not wait) and says that account's scheduled runs will fail (found by an adversarial run).
fn warn_of_unscheduled(secrets: &SecretStore, scheduled: &[String]) {
    let current = secrets.current();
    for client_id in scheduled {
        if current.api_account(client_id).is_none() {
            tracing::warn!(
                %client_id,
                "the reloaded --webhook-secrets-file has no [gameball_api.\"{client_id}\"] \
                 settings, which its --reconcile-every schedule needs: its runs fail until they \
                 are back"
            );
        }
    }
}
