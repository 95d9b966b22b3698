//! Readiness as gRPC health reports it, and the ordered stop.
//!
//! [`Shutdown::run`] is the one place the order lives; ARCHITECTURE.md's "Shutdown" section
//! describes the same steps. The waits for clients share one deadline, `--shutdown-grace` from
//! the signal; running out is logged, and the next step runs anyway, since the process is
//! stopping regardless.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health as HealthService, HealthServer};
use tonic_health::server::HealthReporter;

use super::admin_listener::AdminServer;
use crate::data_dir::DataDir;
use crate::grpc::ProfileApi;
use crate::grpc::admin::AdminApi;
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::profile_service_server::ProfileServiceServer;
use crate::store::Store;

use super::ingest_thread::IngestThread;

/// What the sequencer's last flush and the journal's close get at least, even when clients
/// used up all of `--shutdown-grace`: the whole stop takes at most the grace plus this.
pub const FLUSH_MARGIN: Duration = Duration::from_secs(1);

/// The name health reports ProfileService under.
type Profiles = ProfileServiceServer<ProfileApi>;
/// The name health reports AdminService under.
type Admin = AdminServiceServer<AdminApi>;

/// What gRPC health reports: ProfileService follows the journal's writability until shutdown;
/// AdminService (health answered NOT_FOUND for it, though reflection listed it: found by a
/// first-user review) is SERVING until shutdown.
pub(super) struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// Reports ProfileService SERVING (NOT_SERVING while the journal is not writable yet), then
    /// NOT_SERVING while journal writes fail (so load
    /// balancers send webhooks elsewhere until the disk recovers) and SERVING again once one
    /// succeeds, until `stopping`. Returns the health service to serve.
    pub(super) async fn follow(
        mut writable: watch::Receiver<bool>,
        tracker: &TaskTracker,
        stopping: CancellationToken,
    ) -> (Health, HealthServer<impl HealthService>) {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_serving::<Admin>().await;
        // Start from what the journal says now: a restart on a full disk serves reads but is
        // not ready until a write succeeds.
        if *writable.borrow_and_update() {
            reporter.set_serving::<Profiles>().await;
        } else {
            reporter.set_not_serving::<Profiles>().await;
        }
        let readiness = reporter.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    changed = writable.changed() => if changed.is_err() { return },
                    () = stopping.cancelled() => return,
                }
                if *writable.borrow_and_update() {
                    readiness.set_serving::<Profiles>().await;
                } else {
                    readiness.set_not_serving::<Profiles>().await;
                }
            }
        });
        (Health { reporter }, service)
    }

    /// NOT_SERVING for both services and for the server as a whole.
    async fn not_serving(&self) {
        self.reporter.set_not_serving::<Profiles>().await;
        self.reporter.set_not_serving::<Admin>().await;
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }

    /// Removes every status: a health Watch stream only ends when its status is removed, and
    /// open ones would keep tonic from draining until the grace period runs out.
    async fn clear(&mut self) {
        self.reporter
            .clear_service_status(<Profiles as NamedService>::NAME)
            .await;
        self.reporter
            .clear_service_status(<Admin as NamedService>::NAME)
            .await;
        self.reporter.clear_service_status("").await;
    }
}

/// The webhook and gRPC listeners' server tasks (the admin listener's is stopped last, on
/// its own: [`Shutdown::admin`]).
pub(super) struct Servers {
    /// The webhook ingress.
    pub webhook: JoinHandle<std::io::Result<()>>,
    /// The gRPC API.
    pub grpc: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Servers {
    /// Handles that stop the three server tasks, dropping the connections they own.
    fn abort_handles(&self) -> [AbortHandle; 2] {
        [self.webhook.abort_handle(), self.grpc.abort_handle()]
    }

    /// Waits for both to finish their in-flight requests; the first failure is returned.
    async fn finished(self) -> anyhow::Result<()> {
        let (webhook, grpc) = tokio::join!(self.webhook, self.grpc);
        webhook
            .context("webhook server task")?
            .context("webhook server")?;
        grpc.context("gRPC server task")?.context("gRPC server")?;
        Ok(())
    }
}

/// Everything the ordered stop needs, gathered by `Server::run`.
pub(super) struct Shutdown {
    /// gRPC health statuses.
    pub health: Health,
    /// Cancelled first: `/readyz` answers 503, axum stops accepting, watch feeds end.
    pub stopping: CancellationToken,
    /// Completes once every watch stream has been handed to tonic and dropped.
    pub watch_streams_closed: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Stops the gRPC server.
    pub grpc_stopping: CancellationToken,
    /// Cuts the gRPC connections still open, whose tasks tonic spawned.
    pub grpc_cut: CancellationToken,
    /// The listeners' tasks.
    pub servers: Servers,
    /// Every background task: the sequencer, watch feeds, snapshots, readiness, SIGHUP.
    pub tracker: TaskTracker,
    /// For the last log line.
    pub store: Store,
    /// Released last.
    pub data_dir: Option<DataDir>,
    /// `--shutdown-grace`, for all the waits on clients together.
    pub grace: Duration,
    /// Ended once everything on it has stopped or was given up on, before the data
    /// directory's lock is released.
    pub ingest_thread: IngestThread,
    /// The admin listener: it answers throughout (`/readyz` 503 "shutting down") and is
    /// stopped last, its connections cut.
    pub admin: AdminServer,
}

impl Shutdown {
    /// Stops the service, in this order:
    ///
    /// 1. Readiness false: health NOT_SERVING, `/readyz` 503 "shutting down" (`stopping`).
    /// 2. Watchers get their last `Progress` and `UNAVAILABLE` naming the revision to resume
    ///    from (their feeds end on `stopping`); only once tonic has taken and dropped every
    ///    watch stream does gRPC stop, so those last messages are not cut off. Reads waiting
    ///    for a `min_revision` and reflection streams end with UNAVAILABLE at once (`stopping`
    ///    too).
    /// 3. The listeners drain: axum finishes in-flight webhooks (it stopped accepting at 1),
    ///    tonic its calls, after health statuses are removed so health Watch streams end too.
    /// 4. The sequencer flushes: once the last ingress handle is gone it answers what it holds
    ///    and stops; every other background task (snapshots included) is waited for.
    /// 5. The journal closes (it went with the sequencer task); the admin listener, which
    ///    answered throughout, stops and cuts its connections; the data directory's lock is
    ///    released, last.
    ///
    /// Steps 2 and 3 share one deadline, `--shutdown-grace` from the signal, whatever clients
    /// do (a watcher that stops reading, half-open connections): past it the server tasks are
    /// aborted, which cuts the webhook connections left, and the gRPC connections left are
    /// cut (`super::cut`), so an in-process server returns with none of them open. Step 4
    /// then has what is left of the grace, and at least [`FLUSH_MARGIN`], so the whole stop takes at most the
    /// grace plus that margin.
    pub(super) async fn run(self) -> anyhow::Result<()> {
        let Shutdown {
            mut health,
            stopping,
            watch_streams_closed,
            grpc_stopping,
            grpc_cut,
            servers,
            tracker,
            store,
            data_dir,
            grace,
            ingest_thread,
            admin,
        } = self;
        let deadline = Instant::now() + grace;
        health.not_serving().await;
        stopping.cancel();

        within(deadline, "watch streams to end", async {
            watch_streams_closed.await;
            Ok(())
        })
        .await?;
        grpc_stopping.cancel();

        health.clear().await;
        let aborts = servers.abort_handles();
        let served = within(
            deadline,
            "servers to finish in-flight requests",
            servers.finished(),
        )
        .await;
        // The webhook task owns its connections: aborting it cuts what is still connected
        // there. tonic spawned the gRPC connections' tasks: their streams fail once cut, which
        // ends them (and the watch streams on them).
        aborts.iter().for_each(AbortHandle::abort);
        grpc_cut.cancel();

        tracker.close();
        let flush_deadline = deadline.max(Instant::now() + FLUSH_MARGIN);
        within(flush_deadline, "background tasks to stop", async {
            tracker.wait().await;
            Ok(())
        })
        .await?;

        // What the steps above gave up on goes with the ingest thread's runtime; the journal
        // is closed (or given up on) before the data directory's lock is released.
        ingest_thread.stop().await;
        let admin_stopped = admin.stop().context("admin listener's server");
        tracing::info!(revision = store.revision(), "stopped");
        if let Some(shares) = data_dir.as_ref().map(DataDir::lock_shares)
            && shares > 0
        {
            tracing::warn!(
                shares,
                "work that writes into the data directory (the journal's thread, a snapshot, a \
                 dead letter's change) outlived the stop: the directory stays locked until it ends"
            );
        }
        drop(data_dir);
        served.and(admin_stopped)
    }
}

/// Awaits `work` until `deadline`; running out is logged, not an error, since the process is
/// stopping anyway.
async fn within(
    deadline: Instant,
    what: &str,
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    match tokio::time::timeout_at(deadline, work).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("gave up waiting for {what}: out of --shutdown-grace");
            Ok(())
        }
    }
}
