//! The sequencer: the one writer. It turns validated updates into numbered, recorded changes.
//!
//! Callers hand it a [`ProfileUpdate`] and wait. A single task takes the updates in batches
//! (whatever queued up meanwhile), merges each into the latest state of its profile (earlier
//! updates of the same batch, and of the batch still being synced, included), gives each update
//! that changed something the next revision, encodes the batch as one journal frame and hands
//! it to the journal's thread (`journal::appender`), which writes and syncs it (group commit).
//! While one batch syncs, the next is sequenced and encoded on top of it (at most two in
//! flight). Batches are committed to the store (history, profiles, revision) strictly in
//! journal order, each once its sync succeeded, and only then are its callers answered.
//! Nothing reaches memory that is not on disk.
//!
//! When the journal cannot be written, the batch's callers get `Unavailable` (a 503, so Gameball
//! retries), and so do those of the batch in flight after it (numbered on top of it, it is
//! never written); nothing is committed, no revision is used, and the sequencer reports itself not
//! writable; every second it probes the path the next append will take (`Journal::probe`: the
//! new segment if one is due, a write as large as the one that failed) and reports writable
//! again only once that, or a real append, succeeds.
//! It also starts snapshots in the background. It does not parse, validate or know about HTTP.
//!
//! The sequencer owns the commit: after the store published a batch it tells its
//! [`CommitHook`] (the watch layer's router), so the store stays plain data that knows nothing
//! of watchers. Recovery (`replay`) commits through the same merge before the sequencer
//! starts, while nothing reads or watches the store yet.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::journal::appender::{Appended, Appender};
use crate::journal::codec::{self, BatchRecord, UpdateRecord};
use crate::journal::{Journal, snapshot};
use crate::metrics::Metrics;
use crate::profile::{Change, Profile, ProfileKey, ProfileUpdate};
use crate::store::Store;

/// How many waiting updates one batch takes at most.
const MAX_BATCH: usize = 512;
/// How often a sequencer that cannot write tries the disk again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Batches handed to the journal and not yet committed, at most: one being written and synced,
/// the next sequenced and encoded on top of it, waiting its turn.
const PIPELINE_DEPTH: usize = 2;

/// What applying an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The update changed the profile; the change got this revision.
    Changed {
        /// The revision of the change.
        revision: u64,
    },
    /// The profile already held everything the update carries (a duplicate, or older than what
    /// is stored): nothing changed, no revision was used.
    Unchanged {
        /// The profile's revision, which already reflects the update.
        revision: u64,
    },
}

/// `applied at revision 5` or `unchanged at revision 3`: for logs.
impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Applied::Changed { revision } => write!(f, "applied at revision {revision}"),
            Applied::Unchanged { revision } => write!(f, "unchanged at revision {revision}"),
        }
    }
}

/// Told of every committed batch, in revision order, right after the store published it: how
/// the watch layer learns of changes without the store knowing it exists.
///
/// Runs on the sequencer's task, between the commit and the answers to the batch's callers,
/// so it must be quick and must not block (the watch router only queues revision numbers).
pub trait CommitHook: Send + Sync {
    /// The batch just committed: consecutive revisions, the last one published.
    fn committed(&self, changes: &[Arc<Change>]);
}

/// The journal and when to snapshot: what makes the sequencer durable.
pub struct Durability {
    /// The journal, opened at its recovered tail.
    pub journal: Journal,
    /// Take a snapshot after this many records since the last one.
    pub snapshot_every_records: u64,
    /// Take a snapshot after this many journal bytes since the last one.
    pub snapshot_every_bytes: u64,
    /// The watch history size, which decides what compaction keeps.
    pub history_events: u64,
}

/// The hook of a sequencer nobody watches.
struct NoHook;

impl CommitHook for NoHook {
    fn committed(&self, _changes: &[Arc<Change>]) {}
}

struct Request {
    update: ProfileUpdate,
    reply: oneshot::Sender<Result<Applied, Error>>,
}

/// Handle to the sequencer task. Cloning it is cheap; the task ends when the last handle is
/// dropped, after answering everything already handed to it.
#[derive(Clone)]
pub struct Sequencer {
    requests: mpsc::Sender<Request>,
    writable: watch::Receiver<bool>,
    in_flight: watch::Receiver<usize>,
}

impl Sequencer {
    /// Starts the sequencer task on `tracker`, writing to `store`, durably when `durability` is
    /// given (else in memory only), telling no one of its commits: for tools and tests without
    /// watchers. The server uses [`Sequencer::start_with_hook`].
    pub fn start(
        store: Store,
        durability: Option<Durability>,
        metrics: Metrics,
        tracker: &TaskTracker,
    ) -> Sequencer {
        Sequencer::start_with_hook(store, durability, Arc::new(NoHook), metrics, tracker)
    }

    /// Starts the sequencer task like [`Sequencer::start`], telling `hook` of every committed
    /// batch (the watch layer, [`crate::watch::Watchers`]).
    pub fn start_with_hook(
        store: Store,
        durability: Option<Durability>,
        hook: Arc<dyn CommitHook>,
        metrics: Metrics,
        tracker: &TaskTracker,
    ) -> Sequencer {
        let (requests, inbox) = mpsc::channel(4 * MAX_BATCH);
        // A journal that could not even prepare its head (a full disk at start-up) starts not
        // writable, so readiness does not say ready before the first probe succeeds.
        let writable_now = durability
            .as_ref()
            .is_none_or(|durability| durability.journal.looks_writable());
        let (writable_tx, writable) = watch::channel(writable_now);
        let (in_flight_tx, in_flight) = watch::channel(0);
        let task = Task {
            store,
            hook,
            durable: durability.map(|durability| Durable {
                // Only fails when the OS cannot start a thread at all.
                appender: Appender::start(durability.journal).expect("the journal thread starts"),
                snapshot_every_records: durability.snapshot_every_records,
                snapshot_every_bytes: durability.snapshot_every_bytes,
                history_events: durability.history_events,
                records_since_snapshot: 0,
                bytes_since_snapshot: 0,
                snapshot_running: Arc::new(AtomicBool::new(false)),
            }),
            writable: writable_tx,
            metrics,
            tracker: tracker.clone(),
            in_flight: VecDeque::with_capacity(PIPELINE_DEPTH),
            in_flight_count: in_flight_tx,
            pending: HashMap::new(),
        };
        tracker.spawn(task.run(inbox));
        Sequencer {
            requests,
            writable,
            in_flight,
        }
    }

    /// Applies one update and returns once its outcome is recorded and visible to readers and
    /// watchers.
    pub async fn apply(&self, update: ProfileUpdate) -> Result<Applied, Error> {
        let (reply, outcome) = oneshot::channel();
        let stopped = || Error::Unavailable {
            reason: "the sequencer has stopped; retry later".into(),
        };
        self.requests
            .send(Request { update, reply })
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }

    /// How many batches are sequenced and waiting for the journal (at most two): what the
    /// pipeline tests wait on.
    pub fn batches_in_flight(&self) -> watch::Receiver<usize> {
        self.in_flight.clone()
    }

    /// Whether the last journal write succeeded: false while the disk refuses writes.
    pub fn writable(&self) -> watch::Receiver<bool> {
        self.writable.clone()
    }
}

struct Durable {
    /// The journal's thread.
    appender: Appender,
    snapshot_every_records: u64,
    snapshot_every_bytes: u64,
    history_events: u64,
    records_since_snapshot: u64,
    bytes_since_snapshot: u64,
    snapshot_running: Arc<AtomicBool>,
}

impl Durable {
    /// Starts a snapshot in the background when enough was written since the last one.
    fn maybe_snapshot(&mut self, store: &Store, tracker: &TaskTracker) {
        let due = self.records_since_snapshot >= self.snapshot_every_records
            || self.bytes_since_snapshot >= self.snapshot_every_bytes;
        if !due || self.snapshot_running.swap(true, Ordering::SeqCst) {
            return;
        }
        self.records_since_snapshot = 0;
        self.bytes_since_snapshot = 0;
        let dir = self.appender.dir().to_owned();
        let (store, history, running) = (
            store.clone(),
            self.history_events,
            Arc::clone(&self.snapshot_running),
        );
        tracker.spawn_blocking(move || {
            match snapshot::take(&dir, &store, history) {
                Ok(taken) => tracing::info!(
                    revision = taken.revision,
                    profiles = taken.profiles,
                    removed_files = taken.removed.len(),
                    "snapshot written"
                ),
                Err(error) => tracing::warn!(%error, "snapshot failed; the next one will retry"),
            }
            running.store(false, Ordering::SeqCst);
        });
    }
}

/// A batch sequenced and handed to the journal, not yet committed: its callers wait until its
/// append is synced and every batch before it committed.
struct InFlight {
    changes: Vec<Arc<Change>>,
    outcomes: Vec<Applied>,
    replies: Vec<oneshot::Sender<Result<Applied, Error>>>,
    /// The append, if the batch changed anything (else it only waits its turn).
    written: Option<Pin<Box<dyn Future<Output = std::io::Result<Appended>> + Send>>>,
}

struct Task {
    store: Store,
    hook: Arc<dyn CommitHook>,
    durable: Option<Durable>,
    writable: watch::Sender<bool>,
    metrics: Metrics,
    tracker: TaskTracker,
    /// Batches handed to the journal, oldest first; at most [`PIPELINE_DEPTH`].
    in_flight: VecDeque<InFlight>,
    /// `in_flight.len()`, for [`Sequencer::batches_in_flight`].
    in_flight_count: watch::Sender<usize>,
    /// The newest profile of every key that an in-flight batch changed: the next batch merges
    /// into these, not into the store's older copies.
    pending: HashMap<ProfileKey, Arc<Profile>>,
}

impl Task {
    async fn run(mut self, mut inbox: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut open = true;
        while open || !self.in_flight.is_empty() {
            let room = self.in_flight.len() < PIPELINE_DEPTH;
            let idle = self.in_flight.is_empty();
            let writable = *self.writable.borrow();
            tokio::select! {
                biased;
                written = front_written(&mut self.in_flight), if !idle => {
                    self.finish_front(written);
                    self.in_flight_count.send_replace(self.in_flight.len());
                }
                received = inbox.recv_many(&mut batch, MAX_BATCH), if open && room => {
                    if received == 0 {
                        open = false;
                    } else {
                        self.start(&mut batch);
                        self.in_flight_count.send_replace(self.in_flight.len());
                    }
                }
                () = tokio::time::sleep(PROBE_INTERVAL), if idle && !writable => {
                    self.probe().await;
                }
            }
        }
        // The last step of a clean shutdown: recovery then knows where the journal ends, and
        // treats any difference there as damage rather than a torn write.
        if let Some(durable) = self.durable.take() {
            match durable.appender.close().await {
                Ok(()) => tracing::debug!(revision = self.store.revision(), "journal closed"),
                Err(error) => {
                    tracing::warn!(%error, "journal not marked closed; the next start checks it as after a crash")
                }
            }
        }
        tracing::debug!("sequencer stopped");
    }

    /// Sequences `batch` on top of the in-flight batches and hands it to the journal (or, in
    /// memory only with nothing in flight, commits it at once).
    fn start(&mut self, batch: &mut Vec<Request>) {
        let (updates, replies): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .map(|Request { update, reply }| (update, reply))
            .unzip();
        let first_revision = self.store.revision() + 1 + self.in_flight_changes();
        let Sequenced { changes, outcomes } =
            sequence_after(&self.store, &self.pending, first_revision, &updates);
        let written = self.durable.as_ref().and_then(|durable| {
            let frame = encode(&updates, &outcomes)?;
            let revisions = Some((first_revision, first_revision + changes.len() as u64 - 1));
            let written = durable.appender.append(frame, revisions);
            Some(Box::pin(written) as Pin<Box<dyn Future<Output = _> + Send>>)
        });
        for change in &changes {
            let profile = &change.profile;
            self.pending
                .insert(profile.key.clone(), Arc::clone(profile));
        }
        self.in_flight.push_back(InFlight {
            changes,
            outcomes,
            replies,
            written,
        });
    }

    fn in_flight_changes(&self) -> u64 {
        self.in_flight
            .iter()
            .map(|batch| batch.changes.len() as u64)
            .sum()
    }

    /// The oldest in-flight batch's append finished: commit and answer it, or fail it and
    /// every batch after it (they were numbered on top of it).
    fn finish_front(&mut self, written: Option<std::io::Result<Appended>>) {
        let batch = self.in_flight.pop_front().expect("a batch in flight");
        match written {
            None => self.commit(batch),
            Some(Ok(appended)) => {
                self.metrics
                    .journal_append(appended.took.as_secs_f64(), appended.bytes);
                if let Some(durable) = &mut self.durable {
                    durable.records_since_snapshot += batch.changes.len() as u64;
                    durable.bytes_since_snapshot += appended.bytes;
                }
                if !*self.writable.borrow() {
                    tracing::info!("journal writes succeed again");
                    self.writable.send_replace(true);
                }
                self.commit(batch);
                if let Some(durable) = &mut self.durable {
                    durable.maybe_snapshot(&self.store, &self.tracker);
                }
            }
            Some(Err(error)) => {
                self.metrics.journal_failure();
                tracing::error!(%error, "journal write failed: answering 503 until a write succeeds");
                self.writable.send_replace(false);
                let failed = std::iter::once(batch).chain(self.in_flight.drain(..));
                for batch in failed {
                    for reply in batch.replies {
                        let _ = reply.send(Err(Error::Unavailable {
                            reason: "the update could not be recorded durably; retry later".into(),
                        }));
                    }
                }
                // Nothing numbered after the failure reaches the disk (the journal thread
                // refused it), so its revisions are free again.
                self.pending.clear();
                if let Some(durable) = &self.durable {
                    durable.appender.resume();
                }
            }
        }
    }

    /// Commits a batch whose append is synced (every batch before it is committed), tells
    /// the hook, and answers its callers.
    fn commit(&mut self, batch: InFlight) {
        self.store.commit(&batch.changes);
        self.hook.committed(&batch.changes);
        for change in &batch.changes {
            let key = &change.profile.key;
            if self
                .pending
                .get(key)
                .is_some_and(|newest| Arc::ptr_eq(newest, &change.profile))
            {
                self.pending.remove(key);
            }
        }
        for (reply, outcome) in batch.replies.into_iter().zip(batch.outcomes) {
            // A caller that gave up (its HTTP client went away) no longer listens; the
            // update stays applied, which is what a retry would do.
            let _ = reply.send(Ok(outcome));
        }
    }

    /// Tries the path the next append will take (the segment it needs, a write as large as
    /// the one that failed, a sync): writable again only when that works.
    async fn probe(&mut self) {
        let Some(durable) = &mut self.durable else {
            self.writable.send_replace(true);
            return;
        };
        let next_revision = self.store.revision() + 1;
        match durable.appender.probe(next_revision).await {
            Ok(()) => {
                tracing::info!("journal writes succeed again");
                self.writable.send_replace(true);
            }
            // Once a second while the disk refuses: DEBUG, the failed appends log at ERROR.
            Err(error) => tracing::debug!(%error, "journal probe failed"),
        }
    }
}

/// The append of the oldest in-flight batch; `None` at once for a batch with nothing to write.
async fn front_written(in_flight: &mut VecDeque<InFlight>) -> Option<std::io::Result<Appended>> {
    match in_flight
        .front_mut()
        .and_then(|batch| batch.written.as_mut())
    {
        Some(written) => Some(written.await),
        None => None,
    }
}

/// The journal frame of a batch's changes; `None` when nothing changed.
fn encode(updates: &[ProfileUpdate], outcomes: &[Applied]) -> Option<Vec<u8>> {
    let records: Vec<UpdateRecord> = updates
        .iter()
        .zip(outcomes)
        .filter_map(|(update, outcome)| match outcome {
            Applied::Changed { revision } => Some(UpdateRecord::new(*revision, update)),
            Applied::Unchanged { .. } => None,
        })
        .collect();
    if records.is_empty() {
        return None;
    }
    let mut frame = Vec::new();
    codec::encode_frame(&BatchRecord { updates: records }, &mut frame);
    Some(frame)
}

/// A merged and numbered batch, not yet committed.
pub(crate) struct Sequenced {
    /// The changes, revisions consecutive after the store's.
    pub(crate) changes: Vec<Arc<Change>>,
    /// Each update's outcome, in order.
    pub(crate) outcomes: Vec<Applied>,
}

/// Merges a batch of updates in arrival order and numbers the changes after the store's
/// revision. Pure apart from reading the store. The one place revisions are assigned: the
/// sequencer's task calls it for the local journal, recovery through `replay`, and in
/// replicated mode the replica's applier (`crate::replication`) for each stream message, in
/// stream order, so that every replica assigns the same revisions.
pub(crate) fn sequence(store: &Store, updates: &[ProfileUpdate]) -> Sequenced {
    sequence_after(store, &HashMap::new(), store.revision() + 1, updates)
}

/// [`sequence`] on top of batches numbered but not committed yet: `pending` holds the newest
/// profile of every key they changed, and the first revision is `first_revision`.
fn sequence_after(
    store: &Store,
    pending: &HashMap<ProfileKey, Arc<Profile>>,
    first_revision: u64,
    updates: &[ProfileUpdate],
) -> Sequenced {
    let mut next_revision = first_revision;
    // Profiles this batch already changed: later updates of the same profile merge into these,
    // not into the store's older copy.
    // foldhash, as the store's map: SipHash here showed in recovery's replay profile.
    let mut latest: HashMap<ProfileKey, Arc<Profile>, foldhash::fast::RandomState> =
        HashMap::default();
    let mut changes = Vec::new();
    let mut outcomes = Vec::with_capacity(updates.len());
    for update in updates {
        let current = latest
            .get(&update.key)
            .or_else(|| pending.get(&update.key))
            .cloned()
            .or_else(|| store.get(&update.key));
        let mut profile = match &current {
            Some(current) => Profile::clone(current),
            None => Profile::empty(store.shared_key(update.key.clone())),
        };
        let outcome = match profile.merge(update) {
            None => Applied::Unchanged {
                revision: profile.revision,
            },
            Some(changed_fields) => {
                let revision = next_revision;
                next_revision += 1;
                profile.revision = revision;
                profile.version += 1;
                if current.is_none() {
                    profile.create_revision = revision;
                }
                let profile = Arc::new(profile);
                latest.insert(update.key.clone(), Arc::clone(&profile));
                changes.push(Arc::new(Change {
                    revision,
                    profile,
                    previous: current,
                    changed_fields,
                    origin: update.origin,
                }));
                Applied::Changed { revision }
            }
        };
        outcomes.push(outcome);
    }
    Sequenced { changes, outcomes }
}

/// Recovery: re-applies journaled records through the same merge, checking that each produces
/// the revision it was recorded with, and commits them (rebuilding the history).
pub(crate) fn replay(store: &Store, records: Vec<UpdateRecord>) -> Result<(), String> {
    let mut revisions = Vec::with_capacity(records.len());
    let mut updates = Vec::with_capacity(records.len());
    for record in records {
        revisions.push(record.revision);
        updates.push(record.into_update().map_err(|error| error.to_string())?);
    }
    let Sequenced { changes, outcomes } = sequence(store, &updates);
    for (recorded, outcome) in revisions.into_iter().zip(outcomes) {
        if outcome != (Applied::Changed { revision: recorded }) {
            return Err(format!(
                "the record of revision {recorded} replays as {outcome:?}"
            ));
        }
    }
    // No hook: recovery runs before anything can watch the store, or read it (the key order
    // of new profiles is built once at the end, `journal::recover`).
    store.commit_replayed(&changes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Field, FieldPath, Scalar};

    fn update(customer: &str, second: i64, points: i64) -> ProfileUpdate {
        ProfileUpdate {
            key: ProfileKey::new("2155", customer),
            at: chrono::DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap(),
            fields: vec![
                (Field::GbCustomerId, Some(Scalar::Int(7))),
                (Field::TotalPoints, Some(Scalar::Int(points))),
            ],
            extras: vec![],
            origin: crate::profile::Origin::Webhook,
        }
    }

    #[tokio::test]
    async fn changes_get_consecutive_revisions_and_duplicates_none() {
        let store = Store::new(100, "test");
        let tracker = TaskTracker::new();
        let sequencer = Sequencer::start(store.clone(), None, Metrics::new(), &tracker);

        let first = sequencer.apply(update("a", 1, 10)).await.unwrap();
        assert_eq!(first, Applied::Changed { revision: 1 });
        let again = sequencer.apply(update("a", 1, 10)).await.unwrap();
        assert_eq!(again, Applied::Unchanged { revision: 1 });
        let older = sequencer.apply(update("a", 0, 99)).await.unwrap();
        assert_eq!(older, Applied::Unchanged { revision: 1 });
        let other = sequencer.apply(update("b", 1, 5)).await.unwrap();
        assert_eq!(other, Applied::Changed { revision: 2 });
        let newer = sequencer.apply(update("a", 2, 20)).await.unwrap();
        assert_eq!(newer, Applied::Changed { revision: 3 });

        let a = store.get(&ProfileKey::new("2155", "a")).unwrap();
        assert_eq!((a.revision, a.create_revision, a.version), (3, 1, 2));
        let b = store.get(&ProfileKey::new("2155", "b")).unwrap();
        assert!(
            Arc::ptr_eq(&a.key.client_id, &b.key.client_id),
            "one client_id string per account"
        );
        assert_eq!(a.get_int(Field::TotalPoints), Some(20));
        let history = store.history_from(1, 10).unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(
            history[2].changed_fields,
            vec![FieldPath::Field(Field::TotalPoints)]
        );
        assert_eq!(history[2].previous.as_ref().unwrap().revision, 1);

        drop(sequencer);
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn updates_of_one_profile_within_a_batch_build_on_each_other() {
        let store = Store::new(100, "test");
        let updates = [update("a", 1, 10), update("a", 2, 20), update("a", 2, 20)];
        let Sequenced { changes, outcomes } = sequence(&store, &updates);
        assert_eq!(
            outcomes,
            vec![
                Applied::Changed { revision: 1 },
                Applied::Changed { revision: 2 },
                Applied::Unchanged { revision: 2 },
            ]
        );
        assert_eq!(changes[1].previous.as_ref().unwrap().revision, 1);
        assert_eq!(changes[1].profile.version, 2);
    }
}
