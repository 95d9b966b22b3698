//! The applier: the one writer of a replica's store. It applies the stream in stream order
//! through the sequencer's own merge and numbering (`sequencer::sequence`), commits to the
//! store, tells the watch layer (the [`CommitHook`]), publishes the new position, and answers
//! the webhooks waiting for that message. Same stream, same order, same pure merge: every
//! replica assigns the same revisions.
//!
//! It never skips: a hole in the stream or a malformed message stops it for good (readiness
//! false, logged), since applying past it would make this replica's revisions differ from the
//! others'. A stream purged past it (the replica was cut off longer than the stream keeps
//! messages after a snapshot) asks the server to stop instead: started again, the replica
//! loads the newest published snapshot, which the purge never passes. NATS being unreachable is
//! not an error here: the follower waits and resumes by itself.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pending::Pending;
use super::snapshots::Snapshots;
use super::status::ReplicaStatus;
use crate::jetstream::{Entry, Follower, JetStreamError};
use crate::metrics::Metrics;
use crate::sequencer::{Bound, CommitHook, Sequenced, sequence};
use crate::store::Store;

/// How often the applier looks whether the stream is full, or a snapshot publication is to be
/// tried again, while it waits for a message.
const ROOM_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Holds the applier between messages while paused: a test seam (the stand-in for a replica
/// that lags behind), reached through `Server::applier_pause`. Cloning shares the switch.
#[derive(Clone)]
pub struct ApplierPause(Arc<watch::Sender<bool>>);

impl Default for ApplierPause {
    fn default() -> Self {
        ApplierPause(Arc::new(watch::channel(false).0))
    }
}

impl ApplierPause {
    /// The applier stops before its next message.
    pub fn pause(&self) {
        self.0.send_replace(true);
    }

    /// The applier goes on.
    pub fn resume(&self) {
        self.0.send_replace(false);
    }

    /// Returns once not paused, or when `stop` is cancelled (false).
    async fn wait(&self, stop: &CancellationToken) -> bool {
        let mut paused = self.0.subscribe();
        tokio::select! {
            waited = paused.wait_for(|paused| !paused) => waited.is_ok(),
            () = stop.cancelled() => false,
        }
    }
}

/// What the applier task owns.
pub(super) struct Applier {
    pub follower: Follower,
    pub store: Store,
    pub hook: Arc<dyn CommitHook>,
    pub status: ReplicaStatus,
    pub pending: Arc<Pending>,
    pub metrics: Metrics,
    pub snapshots: Option<Snapshots>,
    /// Cancelled once the publisher has stopped and no webhook waits any more.
    pub stop: CancellationToken,
    /// Cancelled by the applier when the stream was purged past it: the server stops, so that
    /// the replica starts again from the newest published snapshot.
    pub restart: CancellationToken,
    pub pause: ApplierPause,
    /// The first stream sequence applied with the bound on profile growth
    /// (`UpdateStream::rules_from`).
    pub rules_from: u64,
    /// Why the status poll found the stream replaced for good, once it did (`super::poll`).
    pub replaced_seen: watch::Receiver<Option<String>>,
}

/// What the applier's wait for its next message ended with.
enum Woken {
    Next(Result<Entry, JetStreamError>),
    Stopped,
    /// The status poll found the stream replaced, for this reason.
    Replaced(String),
}

impl Applier {
    /// Applies the stream until stopped, or until the stream itself cannot be applied.
    pub(super) async fn run(mut self) {
        let mut room_checks = tokio::time::interval(ROOM_CHECK_INTERVAL);
        room_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The same `next` is polled across room checks: dropped half-way, it could lose a
            // message it had taken from the consumer (it awaits a bounds check after that),
            // and the next one would look like a hole.
            let woken = {
                let next = self.follower.next();
                tokio::pin!(next);
                loop {
                    tokio::select! {
                        next = &mut next => break Woken::Next(next),
                        () = self.stop.cancelled() => break Woken::Stopped,
                        // A stream restored shorter than what this replica applied sends no
                        // message: the consumer's check never came, and the replica stayed
                        // up on the old stream's state (found by an adversarial run).
                        Ok(()) = self.replaced_seen.changed() => {
                            if let Some(reason) = self.replaced_seen.borrow_and_update().clone() {
                                break Woken::Replaced(reason);
                            }
                        }
                        _ = room_checks.tick() => {
                            if let Some(snapshots) = &mut self.snapshots {
                                // A full stream refuses every publish, so nothing comes to
                                // apply.
                                if self.status.short_of_room() {
                                    snapshots.make_room(self.status.position());
                                } else {
                                    snapshots.retry_publication(self.status.position());
                                    snapshots.start_if_due(self.status.position());
                                }
                            }
                        }
                    }
                }
            };
            let next = match woken {
                Woken::Next(next) => next,
                Woken::Stopped => break,
                Woken::Replaced(reason) => {
                    self.replaced(reason);
                    break;
                }
            };
            let entry = match next {
                Ok(entry) => entry,
                Err(error @ JetStreamError::StartBelowFirst { .. }) => {
                    self.cut_off(error.to_string());
                    break;
                }
                Err(error @ JetStreamError::Replaced { .. }) => {
                    self.replaced(error.to_string());
                    break;
                }
                Err(error) => {
                    self.stopped(error.to_string());
                    break;
                }
            };
            if !self.pause.wait(&self.stop).await {
                break;
            }
            if let Err(reason) = self.apply(entry) {
                self.stopped(reason);
                break;
            }
        }
        tracing::debug!(position = ?self.status.position(), "applier stopped");
    }

    /// Applies one stream message.
    fn apply(&mut self, entry: Entry) -> Result<(), String> {
        let Entry {
            sequence: stream_sequence,
            published,
            pending,
            batch,
        } = entry;
        let bytes = prost::Message::encoded_len(&batch) as u64;
        let updates = batch
            .into_updates()
            .map_err(|reason| format!("stream message {stream_sequence}: {reason}"))?;
        // Messages from before the stream took rules 2 apply as replicas of rules 1 applied
        // them: without the bound.
        let bound = match stream_sequence >= self.rules_from {
            true => Bound::Checked,
            false => Bound::Waived,
        };
        let Sequenced { changes, outcomes } = sequence(&self.store, &updates, bound);
        self.store.commit(&changes);
        self.hook.committed(&changes);
        let revision = self.store.revision();
        self.status.applied(stream_sequence, revision, pending);
        self.pending.complete(stream_sequence, outcomes.into());
        let lag = (chrono::Utc::now() - published)
            .to_std()
            .unwrap_or_default();
        self.metrics.replication_applied(lag.as_secs_f64());
        if let Some(snapshots) = &mut self.snapshots {
            snapshots.after_apply(changes.len() as u64, bytes, stream_sequence, revision);
        }
        Ok(())
    }

    fn stopped(&self, reason: String) {
        tracing::error!(
            %reason,
            position = ?self.status.position(),
            "the replica stopped applying the stream: it is not ready and serves what it has; \
             fix the stream, or restart the replica (it loads the newest published snapshot \
             when the stream no longer holds what it needs)"
        );
        self.metrics.replication_applier_failed();
        self.status.fail(reason);
        self.pending.applier_stopped();
    }

    /// The stream no longer holds the next message: only a snapshot can bring this replica
    /// back, and loading one is what start-up does, so the server is asked to stop.
    fn cut_off(&self, reason: String) {
        tracing::error!(
            %reason,
            position = ?self.status.position(),
            "the stream was purged past this replica: it stops, to start again from the newest \
             published snapshot (under a supervisor that restarts it)"
        );
        self.restart_for(format!("the stream was purged past this replica: {reason}"));
    }

    /// The stream was created again: what this replica holds is the old stream's, and start-up
    /// sets it aside (`startup::prepare_dir`), so the server is asked to stop.
    fn replaced(&self, reason: String) {
        tracing::error!(
            %reason,
            position = ?self.status.position(),
            "the stream this replica followed was replaced: it stops, to start again on the new \
             one (under a supervisor that restarts it), setting its snapshots of the old one aside"
        );
        self.restart_for(reason);
    }

    fn restart_for(&self, reason: String) {
        self.metrics.replication_applier_failed();
        self.status.fail(reason);
        self.pending.applier_stopped();
        self.restart.cancel();
    }
}
