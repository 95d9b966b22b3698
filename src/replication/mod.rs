//! Replicated mode (issue 13): N identical replicas over one NATS JetStream stream, the
//! wiring between the domain (`ingest`, `sequencer::sequence`, `Store::commit`, the watch
//! layer's `CommitHook`) and the JetStream adapter (`crate::jetstream`).
//!
//! - [`startup`]: connect, open the stream (its metadata holds the cluster's store id and the
//!   merge rules version), rebuild the store from a local or published snapshot; `restored`:
//!   which snapshot of an earlier incarnation a stream restored from a backup continues.
//! - [`Publisher`]: what the ingest path records through: batches of updates published to the
//!   stream, each caller answered once this replica has applied its update.
//! - `applier`: the replica's one writer, applying the stream in stream order through the same
//!   merge and numbering as the single node; `snapshots` (local, published, purge);
//!   `pending` (acknowledged updates waiting for their apply).
//! - [`ReplicaStatus`]: the applied position, the lag, readiness (`poll_findings`: how long
//!   the polls that answered found the stream missing or replaced); `catch_up`: the barrier a
//!   watch waits for on a lagging replica; `name_mark`: another process under this replica's
//!   name warned of.
//!
//! Who orders: the stream, and nothing else. Each replica owns its store in memory, its local
//! snapshots and its applied stream sequence; no replica talks to another. There is no local
//! journal: the stream is the log. This module decides no merge rule and serves no request.

mod applier;
mod catch_up;
mod linger;
mod name_mark;
mod pending;
mod poll_findings;
mod publisher;
mod restored;
mod snapshots;
pub mod startup;
mod status;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use applier::ApplierPause;
pub use catch_up::CATCH_UP_TIMEOUT;
pub use linger::{Linger, Wait};
pub use publisher::{MAX_BATCH, Publisher, next_batch};
pub use startup::{Opened, open};
pub use status::{Lag, POLL_INTERVAL, Position, ReplicaStatus};

use crate::config::Config;
use crate::data_dir::{DataDir, LockRef};
use crate::jetstream::{
    Follower, JetStreamError, Nats, ReplicaNameMark, SnapshotBucket, UpdateStream,
};
use crate::metrics::Metrics;
use crate::sequencer::CommitHook;
use crate::store::Store;
use applier::Applier;
use catch_up::StreamCatchUp;
use pending::Pending;
use poll_findings::Finding;
use snapshots::Snapshots;

/// A replica that has loaded its starting point and not yet started applying.
pub struct Prepared {
    status: ReplicaStatus,
    stream: UpdateStream,
    bucket: SnapshotBucket,
    follower: Follower,
    settings: Settings,
}

/// The flags a running replica follows.
struct Settings {
    name: String,
    apply_timeout: Duration,
    /// Where local snapshots go, and where each takes its share of the directory's lock.
    data_dir: Option<(std::path::PathBuf, LockRef)>,
    snapshot_every_records: u64,
    snapshot_every_bytes: u64,
    snapshot_publish_interval: Duration,
    history_events: u64,
    retain_after_snapshot: u64,
    publish_linger: Duration,
    /// How long a snapshot upload may go on once the replica starts stopping.
    upload_stop_allowance: Duration,
}

/// A running replica: what the rest of the server uses.
pub struct Running {
    /// What the ingest path records through.
    pub publisher: Publisher,
    /// Position, lag, readiness.
    pub status: ReplicaStatus,
    /// Whether the replica is ready for webhooks, re-evaluated every [`POLL_INTERVAL`].
    pub ready: watch::Receiver<bool>,
    /// The barrier watches wait for on this replica.
    pub catch_up: Arc<dyn crate::watch::CatchUp>,
    /// Cancelled when the stream was purged past this replica: the server stops, and the
    /// replica must be started again (it then loads the newest published snapshot).
    pub restart: CancellationToken,
}

impl Prepared {
    #[allow(clippy::too_many_arguments)]
    fn new(
        config: &Config,
        name: String,
        nats: Nats,
        stream: UpdateStream,
        bucket: SnapshotBucket,
        follower: Follower,
        applied: u64,
        store: &Store,
        data_dir: Option<&DataDir>,
    ) -> Prepared {
        let position = Position {
            sequence: applied,
            revision: store.revision(),
        };
        let limits = (config.nats.max_lag, config.max_body_bytes as u64);
        let status = ReplicaStatus::new(name.clone(), nats, limits, position);
        // A caller's own wait ends a little before the ingress's timeout, so the answer says
        // whether the update was recorded.
        let apply_timeout = config.webhook_timeout.mul_f64(0.9);
        let settings = Settings {
            name,
            apply_timeout,
            data_dir: data_dir.map(|dir| (dir.path().to_owned(), dir.lock_ref())),
            snapshot_every_records: config.snapshot_every_records,
            snapshot_every_bytes: config.snapshot_every_bytes,
            snapshot_publish_interval: config.nats.snapshot_publish_interval,
            history_events: config.history_events as u64,
            retain_after_snapshot: config.nats.retain_after_snapshot,
            publish_linger: config.nats.publish_linger,
            // Half the grace, so giving the claim back fits in the rest of it.
            upload_stop_allowance: config.shutdown_grace / 2,
        };
        Prepared {
            status,
            stream,
            bucket,
            follower,
            settings,
        }
    }

    /// The replica's status (for wiring that happens before it starts).
    pub fn status(&self) -> &ReplicaStatus {
        &self.status
    }

    /// Starts the publisher, the applier (telling `hook` of every commit) and the status
    /// poll on `tracker`. The poll stops at `stopping`; the applier once the publisher has
    /// stopped (every ingress handle gone) and no webhook waits for an apply any more.
    pub fn start(
        self,
        store: &Store,
        hook: Arc<dyn CommitHook>,
        metrics: &Metrics,
        tracker: &TaskTracker,
        stopping: &CancellationToken,
        pause: ApplierPause,
    ) -> Running {
        let Prepared {
            status,
            stream,
            bucket,
            mut follower,
            settings,
        } = self;
        follower.follow_end(status.watch_stream_last());
        let mark = ReplicaNameMark::new(&bucket, &settings.name);
        tracker.spawn(name_mark::keep(
            (mark, settings.name.clone()),
            metrics.clone(),
            stopping.clone(),
        ));
        let pending = Arc::new(Pending::after(follower.next_sequence() - 1));
        let publisher_done = CancellationToken::new();
        let publisher = Publisher::start(
            publisher::Parts {
                stream: stream.clone(),
                pending: Arc::clone(&pending),
                store: store.clone(),
                metrics: metrics.clone(),
                apply_timeout: settings.apply_timeout,
                done: publisher_done.clone(),
                linger: settings.publish_linger,
                failure_log: crate::logging::RateLimited::default(),
                status: status.clone(),
            },
            tracker,
        );
        let snapshots = settings.data_dir.clone().map(|(dir, lock)| Snapshots {
            dir,
            lock,
            store: store.clone(),
            stream: stream.clone(),
            bucket,
            every_records: settings.snapshot_every_records,
            every_bytes: settings.snapshot_every_bytes,
            publish_interval: settings.snapshot_publish_interval,
            last_publish: None,
            history_events: settings.history_events,
            retain_after: settings.retain_after_snapshot,
            name: settings.name.clone(),
            metrics: metrics.clone(),
            tracker: tracker.clone(),
            stopping: stopping.clone(),
            stop_allowance: settings.upload_stop_allowance,
            records_since: 0,
            bytes_since: 0,
            running: Arc::new(AtomicBool::new(false)),
            room_made_at: None,
            publication_failed: Arc::new(AtomicBool::new(false)),
            publication_skipped: false,
        });
        let restart = CancellationToken::new();
        let (replaced, replaced_seen) = watch::channel(None);
        let applier = Applier {
            follower,
            store: store.clone(),
            hook,
            status: status.clone(),
            pending,
            metrics: metrics.clone(),
            snapshots,
            stop: publisher_done,
            restart: restart.clone(),
            pause,
            rules_from: stream.rules_from(),
            replaced_seen,
        };
        tracker.spawn(applier.run());
        let ready = poll(&stream, &status, tracker, stopping.clone(), replaced);
        let catch_up = Arc::new(StreamCatchUp {
            status: status.clone(),
            stopping: stopping.clone(),
            timeout: CATCH_UP_TIMEOUT,
        });
        Running {
            publisher,
            status,
            ready,
            catch_up,
            restart,
        }
    }
}

/// How often a stream that cannot be followed (deleted, or created again) is warned of.
const STREAM_WARNING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// How long the polls that answer must find the stream replaced before the applier stops: one
/// answer could be a NATS server's from before it was paused (the follower's re-ask, for the
/// same reason, is `jetstream::follow::SETTLE`).
const REPLACED_SETTLE: Duration = Duration::from_secs(2);

/// Reads the stream's last sequence every [`POLL_INTERVAL`] (the barrier that proves this
/// replica current, idle or not) and re-evaluates readiness, until `stopping`. A stream
/// found replaced for [`REPLACED_SETTLE`] is sent on `replaced`, for the applier to stop.
fn poll(
    stream: &UpdateStream,
    status: &ReplicaStatus,
    tracker: &TaskTracker,
    stopping: CancellationToken,
    replaced: watch::Sender<Option<String>>,
) -> watch::Receiver<bool> {
    let (ready_tx, ready) = watch::channel(false);
    let (stream, status) = (stream.clone(), status.clone());
    tracker.spawn(async move {
        let mut ticks = tokio::time::interval(POLL_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned: Option<tokio::time::Instant> = None;
        loop {
            // Stopping first, and the read raced against it: during a NATS outage each read
            // waits out --nats-request-timeout, and a stop waited for one or two of them, the
            // whole --shutdown-grace in all (found by an adversarial run).
            tokio::select! {
                biased;
                () = stopping.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let read_at = tokio::time::Instant::now();
            let reading = stream.bounds();
            tokio::pin!(reading);
            // Readiness looked at again while the read waits: a read of a hung NATS waits out
            // --nats-request-timeout, and gRPC health (which follows `ready`) said SERVING that
            // long after /readyz, which asks at once, said the replica lagged (found by an
            // adversarial run).
            let mut recheck = tokio::time::interval_at(read_at + POLL_INTERVAL, POLL_INTERVAL);
            let read = loop {
                tokio::select! {
                    biased;
                    () = stopping.cancelled() => return,
                    read = &mut reading => break read,
                    _ = recheck.tick() => publish_readiness(&status, &ready_tx),
                }
            };
            let run = status.observed(Finding::of(&read));
            match read {
                Ok(bounds) => {
                    status.observed_last(bounds.last, read_at, bounds.heard);
                    status.observed_room(bounds.room);
                }
                Err(error) => {
                    let silent = matches!(error, JetStreamError::NoQuorum { .. });
                    status.observed_unbounded(read_at, silent.then(|| error.to_string()));
                    if let JetStreamError::Replaced { .. } = error
                        && run >= REPLACED_SETTLE
                    {
                        replaced.send_if_modified(|seen| {
                            let first = seen.is_none();
                            seen.get_or_insert_with(|| error.to_string());
                            first
                        });
                    }
                    // A stream deleted (or created again) was not logged at all while the
                    // replica stayed connected (found by an adversarial run): said every 30 s.
                    let unfollowable = matches!(
                        error,
                        JetStreamError::Refused { .. } | JetStreamError::Replaced { .. }
                    );
                    if unfollowable
                        && warned.is_none_or(|at| at.elapsed() >= STREAM_WARNING_INTERVAL)
                    {
                        warned = Some(tokio::time::Instant::now());
                        tracing::warn!(%error, "the update stream cannot be followed: not ready");
                    } else if !unfollowable {
                        tracing::debug!(%error, "stream bounds not read");
                    }
                }
            }
            publish_readiness(&status, &ready_tx);
        }
    });
    ready
}

/// Sends whether the replica is ready now on `ready`, if that changed.
fn publish_readiness(status: &ReplicaStatus, ready: &watch::Sender<bool>) {
    let now_ready = status.not_ready_reason().is_none();
    ready.send_if_modified(|ready| std::mem::replace(ready, now_ready) != now_ready);
}
