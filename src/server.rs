//! Wiring: recovers the data directory, binds both listeners, starts the sequencer, serves the webhook ingress (axum) and
//! the gRPC API (tonic, with health and reflection), and shuts everything down in order.
//!
//! `Server::bind` then `Server::run(shutdown)`: binding first lets callers (tests, `main`) learn
//! the real addresses of port-0 listeners before serving starts. No request logic lives here.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::Config;
use crate::data_dir::{self, DataDir};
use crate::dead_letters::DeadLetters;
use crate::grpc::ProfileApi;
use crate::grpc::admin::AdminApi;
use crate::grpc::auth::BearerAuth;
use crate::grpc::transport::{self, MetricsLayer};
use crate::journal::{self, FaultSwitch, Journal};
use crate::metrics::Metrics;
use crate::pb;
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::profile_service_server::ProfileServiceServer;
use crate::sequencer::{self, Durability, Sequencer};
use crate::store::Store;
use crate::webhook::secrets::{SecretStore, Secrets};
use crate::webhook::{Ingress, Limits, Verification};
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

/// The configuration, or a file it names (secrets, tokens, certificates), cannot be used.
/// Found before anything binds; `main` exits 64 on it.
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
    grpc_builder: tonic::transport::Server,
    store: Store,
    durability: Option<Durability>,
    dead_letters: DeadLetters,
    faults: FaultSwitch,
    // Holds the directory's lock until the server is dropped.
    data_dir: Option<DataDir>,
}

impl Server {
    /// Checks the configuration, recovers the data directory (unless `--ephemeral`), then binds
    /// both listeners: nothing is served before recovery is complete.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let (verification, auth, grpc_builder) = (|| {
            config.check()?;
            let verification = verification(&config)?;
            let auth = BearerAuth::from_config(&config)?;
            let grpc_builder = transport::server_builder(&config)?;
            anyhow::Ok((verification, auth, grpc_builder))
        })()
        .map_err(|error| anyhow::Error::new(BadConfiguration(error)))?;
        let faults = FaultSwitch::default();
        let (store, durability, data_dir) = if config.ephemeral {
            let store = Store::new(config.history_events, data_dir::new_store_id());
            tracing::info!(
                store_id = store.store_id(),
                "ephemeral: state is kept in memory only"
            );
            (store, None, None)
        } else {
            let config = config.clone();
            let faults = faults.clone();
            tokio::task::spawn_blocking(move || recover(&config, faults))
                .await
                .context("recovery task")??
        };
        // Kept beside the journal, loaded before anything is served; in memory if ephemeral.
        let dead_letters = match &data_dir {
            None => DeadLetters::in_memory(),
            Some(dir) => {
                let path = dir.path().to_owned();
                tokio::task::spawn_blocking(move || DeadLetters::open(&path))
                    .await
                    .context("dead letters task")??
            }
        };
        let webhook = TcpListener::bind(config.webhook_listen)
            .await
            .with_context(|| format!("binding the webhook listener {}", config.webhook_listen))?;
        let grpc = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| format!("binding the gRPC listener {}", config.grpc_listen))?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
        Ok(Server {
            config,
            webhook,
            grpc,
            admin,
            verification,
            auth,
            grpc_builder,
            store,
            durability,
            dead_letters,
            faults,
            data_dir,
        })
    }

    /// The dead letters: signed deliveries that could not be applied (the admin gRPC service
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
        self.webhook
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The gRPC listener's actual address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The admin listener's actual address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The webhook secrets, for reloading them (SIGHUP does it in production); `None` under
    /// `--insecure-skip-signature`.
    pub fn webhook_secrets(&self) -> Option<SecretStore> {
        match &self.verification {
            Verification::Secrets(secrets) => Some(secrets.clone()),
            Verification::Skip => None,
        }
    }

    /// Serves until `shutdown` completes, then stops in order: health NOT_SERVING, no new
    /// webhooks, in-flight webhooks finished, watch streams ended with the revision to resume
    /// from, background tasks drained. Each wait is bounded by `--shutdown-grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            config,
            webhook,
            grpc,
            admin,
            verification,
            auth,
            grpc_builder,
            store,
            durability,
            dead_letters,
            faults: _,
            data_dir,
        } = self;
        let webhook_addr = webhook.local_addr()?;
        let grpc_addr = grpc.local_addr()?;
        let stopping = CancellationToken::new();
        let tracker = TaskTracker::new();

        let metrics = Metrics::new();
        let admin_addr = admin.local_addr()?;
        let sequencer = Sequencer::start(store.clone(), durability, metrics.clone(), &tracker);
        let mut writable = sequencer.writable();
        if let Verification::Secrets(secrets) = &verification {
            reload_on_sighup(secrets.clone(), &tracker, stopping.clone());
        }
        let limits = Limits {
            max_body_bytes: config.max_body_bytes,
            max_in_flight: config.max_in_flight_webhooks,
            timeout: config.webhook_timeout,
        };
        let admin = axum::serve(
            admin,
            Admin {
                metrics: metrics.clone(),
                store: store.clone(),
                dead_letters: dead_letters.clone(),
                writable: sequencer.writable(),
                stopping: stopping.clone(),
            }
            .router(),
        )
        .with_graceful_shutdown(stopping.clone().cancelled_owned())
        .into_future();
        let admin_api = AdminApi::new(dead_letters.clone(), sequencer.clone());
        let ingress = Ingress::new(sequencer, verification, limits, metrics.clone())
            .with_dead_letters(dead_letters)
            .router();
        // Answers go out as soon as they are written: no Nagle delay on either listener.
        let webhook = webhook.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY on a webhook connection");
            }
        });
        let http = axum::serve(webhook, ingress)
            .with_graceful_shutdown(stopping.clone().cancelled_owned())
            .into_future();

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<ProfileServiceServer<ProfileApi>>()
            .await;
        // Readiness follows the journal: NOT_SERVING while writes fail, so load balancers
        // send webhooks elsewhere until the disk recovers.
        let readiness = health.clone();
        let readiness_stop = stopping.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    changed = writable.changed() => if changed.is_err() { return },
                    () = readiness_stop.cancelled() => return,
                }
                let ok = *writable.borrow_and_update();
                if ok {
                    readiness
                        .set_serving::<ProfileServiceServer<ProfileApi>>()
                        .await;
                } else {
                    readiness
                        .set_not_serving::<ProfileServiceServer<ProfileApi>>()
                        .await;
                }
            }
        });
        // The gRPC server stops only after the watch streams have sent their last messages
        // (see the shutdown sequence below), so those messages are not cut off.
        let grpc_stopping = CancellationToken::new();
        let api = ProfileApi::new(
            store.clone(),
            data_dir.is_some(),
            stopping.clone(),
            tracker.clone(),
            metrics.clone(),
        )
        .with_max_watch_streams(config.max_watch_streams);
        let watch_streams_closed = api.streams_closed();
        // Every service decodes and encodes messages up to the same limit (tonic sets it per
        // service). Health and reflection stay open (probes, grpcurl); the data services need
        // a token when tokens are configured.
        let limit = config.grpc_max_message_bytes;
        let profiles = ProfileServiceServer::new(api)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let admin_service = AdminServiceServer::new(admin_api)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let health_service = health_service
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let grpc = grpc_builder
            .layer(MetricsLayer::new(metrics.clone()))
            .add_service(health_service)
            .add_service(
                reflection_v1()?
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                reflection_v1alpha()?
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(InterceptedService::new(profiles, auth.clone()))
            .add_service(InterceptedService::new(admin_service, auth))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(grpc).with_nodelay(Some(true)),
                grpc_stopping.clone().cancelled_owned(),
            );

        tracing::info!(
            webhook = %webhook_addr,
            grpc = %grpc_addr,
            admin = %admin_addr,
            "profile-state listening"
        );
        let admin = tokio::spawn(admin);
        let http = tokio::spawn(http);
        let grpc = tokio::spawn(grpc);
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => tracing::info!("shutting down"),
            () = stopping.cancelled() => {}
        }
        let mut health = health;
        health
            .set_not_serving::<ProfileServiceServer<ProfileApi>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        stopping.cancel();
        // Watch feeds end on `stopping` with a last Progress and UNAVAILABLE; wait until tonic
        // has taken those (it drops each stream after its last message), then stop gRPC.
        let grace = config.shutdown_grace;
        within(grace, "watch streams to end", async {
            watch_streams_closed.await;
            Ok(())
        })
        .await?;
        grpc_stopping.cancel();
        // Health Watch streams only end when their status is removed; open ones would keep
        // tonic from draining until the grace period runs out.
        health
            .clear_service_status(<ProfileServiceServer<ProfileApi> as NamedService>::NAME)
            .await;
        health.clear_service_status("").await;

        let servers = async {
            let (http, grpc, admin) = tokio::join!(http, grpc, admin);
            admin
                .context("admin server task")?
                .context("admin server")?;
            http.context("webhook server task")?
                .context("webhook server")?;
            grpc.context("gRPC server task")?.context("gRPC server")?;
            anyhow::Ok(())
        };
        let served = within(grace, "servers to finish in-flight requests", servers).await;
        tracker.close();
        within(grace, "background tasks to stop", async {
            tracker.wait().await;
            Ok(())
        })
        .await?;
        tracing::info!(revision = store.revision(), "stopped");
        drop(data_dir);
        served
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

/// Opens the data directory and rebuilds the store from its snapshot and journal.
fn recover(
    config: &Config,
    faults: FaultSwitch,
) -> anyhow::Result<(Store, Option<Durability>, Option<DataDir>)> {
    let started = std::time::Instant::now();
    let dir = DataDir::open(&config.data_dir)?;
    let store = Store::new(config.history_events, dir.store_id());
    let recovered = journal::recover(dir.path(), &store, |records| {
        sequencer::replay(&store, records)
    })?;
    let journal = Journal::open(
        dir.path(),
        recovered.tail,
        store.revision() + 1,
        config.segment_bytes,
        faults,
    )?;
    tracing::info!(
        data_dir = %dir.path().display(),
        store_id = store.store_id(),
        revision = store.revision(),
        profiles = store.len(),
        snapshot = ?recovered.snapshot,
        replayed = recovered.replayed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered"
    );
    let durability = Durability {
        journal,
        snapshot_every_records: config.snapshot_every_records,
        snapshot_every_bytes: config.snapshot_every_bytes,
        history_events: config.history_events as u64,
    };
    Ok((store, Some(durability), Some(dir)))
}

/// Awaits `work` for at most `grace`; running out is logged, not an error, since the process
/// is stopping anyway.
async fn within(
    grace: Duration,
    what: &str,
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    match tokio::time::timeout(grace, work).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(?grace, "gave up waiting for {what}");
            Ok(())
        }
    }
}

fn reflection_v1() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_file_descriptor_set(crate::status::error_details_descriptors())
        .build_v1()?)
}

// grpcurl before 1.8.8 speaks only v1alpha, so both versions are served.
fn reflection_v1alpha() -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_file_descriptor_set(crate::status::error_details_descriptors())
        .build_v1alpha()?)
}
