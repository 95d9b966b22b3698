//! The sequencer: the one writer. It turns validated updates into numbered, recorded changes.
//!
//! Callers hand it a [`ProfileUpdate`] and wait. A single task takes the updates in batches
//! (whatever queued up meanwhile), merges each into the latest state of its profile (earlier
//! updates of the same batch, and of the batch still being synced, included), gives each update
//! that changed something the next revision, encodes the batch as one journal frame and hands
//! it to the journal's thread (`journal::appender`), which writes and syncs it (group commit).
//! While one batch syncs, the next is sequenced and encoded on top of it as its updates arrive
//! (each record encoded once, into the frame that will be written), and handed over whole as
//! soon as the journal's thread is free: at most two batches in flight. Batches are committed
//! to the store (history, profiles, revision) strictly in journal order, each once its sync
//! succeeded, and only then are its callers answered. Nothing reaches memory that is not on
//! disk.
//!
//! When the journal cannot be written, the batch's callers get `Unavailable` (a 503, so Gameball
//! retries), and so do those of the batch after it (numbered on top of it, it is never
//! written); nothing is committed, no revision is used, and the sequencer reports itself not
//! writable; every second it probes the path the next append will take (`Journal::probe`: the
//! new segment if one is due, a write as large as the one that failed) and reports writable
//! again only once that, or a real append, succeeds. An append that has not returned for
//! [`Durability::stalled_after`] (a disk that hangs rather than fails) makes it report the
//! journal stalled until the append returns.
//! It also starts snapshots in the background, one at a time: one that comes due while another
//! runs starts as that one ends (written to or idle). It does not parse, validate or know about
//! HTTP.
//!
//! The sequencer owns the commit: after the store published a batch it tells its
//! [`CommitHook`] (the watch layer's router), so the store stays plain data that knows nothing
//! of watchers. Recovery (`replay`) commits through the same merge before the sequencer
//! starts, while nothing reads or watches the store yet.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::data_dir::LockRef;
use crate::error::Error;
use crate::journal::appender::{Appended, Appender, WriteClock};
use crate::journal::codec::{BatchFrame, UpdateRecord};
use crate::journal::{self, Journal, snapshot};
use crate::metrics::Metrics;
use crate::profile::{Change, Profile, ProfileKey, ProfileUpdate, TooLarge, check_growth};
use crate::store::Store;

/// How many waiting updates one batch takes at most.
pub(crate) const MAX_BATCH: usize = 512;
/// How often a sequencer that cannot write tries the disk again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Records the journal holds since the newest snapshot (or since its start, without one)
    /// at start-up: counted toward the next snapshot, so that a server restarted more often
    /// than every `snapshot_every_records` records still snapshots (and compacts).
    pub records_since_snapshot: u64,
    /// Take a snapshot after this many journal bytes since the last one.
    pub snapshot_every_bytes: u64,
    /// The watch history size, which decides what compaction keeps.
    pub history_events: u64,
    /// The data directory's lock: the journal's thread holds a share of it until it ends, and
    /// so does each snapshot ([`LockRef::unlocked`]: a directory nobody locked, in tests).
    pub lock: LockRef,
    /// How long an append may go without returning before the journal counts as stalled
    /// ([`JournalState::Stalled`]).
    pub stalled_after: Duration,
}

/// Whether the journal takes writes, as readiness and health report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalState {
    /// The last append (or probe) succeeded.
    Writable,
    /// The last append or probe failed: webhooks get 503 until one succeeds.
    Failing,
    /// An append has not returned for [`Durability::stalled_after`]: the disk hangs, and
    /// webhooks wait for it until their timeout (a 503). Readiness said ready all along
    /// (found by an adversarial run).
    Stalled,
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
    journal_state: watch::Receiver<JournalState>,
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
        let stalled_after = durability
            .as_ref()
            .map(|durability| durability.stalled_after);
        let state_now = match writable_now {
            true => JournalState::Writable,
            false => JournalState::Failing,
        };
        let (journal_state_tx, journal_state) = watch::channel(state_now);
        let journal_state_tx = Arc::new(journal_state_tx);
        let (in_flight_tx, in_flight) = watch::channel(0);
        let stall_watch = CancellationToken::new();
        let task = Task {
            store,
            hook,
            durable: durability.map(|durability| Durable {
                // Only fails when the OS cannot start a thread at all.
                appender: Appender::start(
                    // A journal is only opened in a directory its caller holds.
                    durability
                        .lock
                        .share()
                        .expect("the data directory is held while its journal starts"),
                    durability.journal,
                )
                .expect("the journal thread starts"),
                lock: durability.lock,
                snapshot_every_records: durability.snapshot_every_records,
                snapshot_every_bytes: durability.snapshot_every_bytes,
                history_events: durability.history_events,
                records_since_snapshot: durability.records_since_snapshot,
                bytes_since_snapshot: 0,
                snapshot_running: Arc::new(AtomicBool::new(false)),
                snapshot_ended: Arc::new(Notify::new()),
                snapshot_waits: false,
                snapshot_watch: SnapshotWatch::default(),
                room_looked: None,
            }),
            journal_state: Arc::clone(&journal_state_tx),
            _stall_watch: stall_watch.clone().drop_guard(),
            metrics,
            tracker: tracker.clone(),
            writing: None,
            next: None,
            in_flight_count: in_flight_tx,
            pending: ProfileMap::default(),
        };
        if let (Some(durable), Some(stalled_after)) = (&task.durable, stalled_after) {
            let clock = durable.appender.write_clock();
            watch_for_stalls(journal_state_tx, clock, stalled_after, stall_watch, tracker);
        }
        tracker.spawn(task.run(inbox));
        Sequencer {
            requests,
            journal_state,
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

    /// Whether the journal takes writes: not while the disk refuses them or hangs.
    pub fn journal_state(&self) -> watch::Receiver<JournalState> {
        self.journal_state.clone()
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
    /// Told by each snapshot as it ends.
    snapshot_ended: Arc<Notify>,
    /// A snapshot came due while the last one ran: it starts as that one ends, not at the
    /// next write (an idle server would otherwise replay the journal since the older one at
    /// its next start, and keep every segment the new one would have let go).
    snapshot_waits: bool,
    snapshot_watch: SnapshotWatch,
    /// Where each snapshot takes its share of the directory's lock from: it writes and
    /// removes files there.
    lock: LockRef,
    /// When a write that failed for lack of space last looked for files to give up
    /// ([`Durable::make_room`]).
    room_looked: Option<Instant>,
}

impl Durable {
    /// What tells of the running snapshot's end, when another is due after it.
    fn waited_snapshot_end(&self) -> Option<Arc<Notify>> {
        self.snapshot_waits
            .then(|| Arc::clone(&self.snapshot_ended))
    }

    /// Starts a snapshot in the background when enough was written since the last one.
    fn maybe_snapshot(&mut self, store: &Store, tracker: &TaskTracker, metrics: &Metrics) {
        let due = self.records_since_snapshot >= self.snapshot_every_records
            || self.bytes_since_snapshot >= self.snapshot_every_bytes;
        if !due {
            return;
        }
        let Some(lock) = self.lock.share() else {
            // The server stopped and released the directory: no more files.
            return;
        };
        if self.snapshot_running.swap(true, Ordering::SeqCst) {
            self.snapshot_waits = true;
            if let Some(running) = self.snapshot_watch.overdue(Instant::now()) {
                tracing::warn!(
                    running_seconds = running.as_secs(),
                    records_since = self.records_since_snapshot,
                    "a snapshot is still running: the journal grows until it ends (a disk that \
                     stopped answering?)"
                );
            }
            return;
        }
        self.snapshot_waits = false;
        self.snapshot_watch.started(Instant::now());
        metrics.snapshot_started();
        self.records_since_snapshot = 0;
        self.bytes_since_snapshot = 0;
        let dir = self.appender.dir().to_owned();
        let (store, history, running, ended, metrics) = (
            store.clone(),
            self.history_events,
            Arc::clone(&self.snapshot_running),
            Arc::clone(&self.snapshot_ended),
            metrics.clone(),
        );
        tracker.spawn_blocking(move || {
            // Not into a directory that is no longer this server's (it was moved or replaced).
            let in_place = || journal::in_place(&lock, &dir, "snapshot into");
            let taken = snapshot::take_in_place(&dir, &store, history, &in_place);
            drop(lock);
            metrics.snapshot(taken.is_ok());
            match taken {
                Ok(taken) => tracing::info!(
                    revision = taken.revision,
                    profiles = taken.profiles,
                    removed_files = taken.removed.len(),
                    "snapshot written"
                ),
                Err(error) => tracing::warn!(%error, "snapshot failed; the next one will retry"),
            }
            running.store(false, Ordering::SeqCst);
            // After the flag: a sequencer that saw it set is told (a permit waits if it is
            // not listening yet; one left from an earlier snapshot costs it a look, no more).
            ended.notify_one();
        });
    }
}

/// How often journal writes failing for lack of space look for files to give up.
const ROOM_LOOKS_EVERY: Duration = Duration::from_secs(1);

/// The failures of those looks, logged at most every ten seconds.
static ROOM_FAILURES: crate::logging::RateLimited = crate::logging::RateLimited::new();

impl Durable {
    /// A journal write failed for lack of space at `revision`: removes, on the snapshots'
    /// thread (never beside a snapshot, which compacts after itself), the journal's files
    /// before its newest snapshot, which compaction keeps only for watchers resuming across a
    /// restart (`--history-events`). Recovery needs none of them, and while the disk is full
    /// no record is appended, so no snapshot comes due and nothing was ever removed: a disk
    /// filled with the journal's own files stayed full, every webhook answered 503, until an
    /// operator, told never to delete journal files, came (found by an adversarial run). The
    /// watch history in memory stays; after a restart it starts at that snapshot.
    fn make_room(&mut self, revision: u64, tracker: &TaskTracker) {
        let now = Instant::now();
        if (self.room_looked).is_some_and(|looked| now.duration_since(looked) < ROOM_LOOKS_EVERY) {
            return;
        }
        let Some(lock) = self.lock.share() else {
            return;
        };
        if self.snapshot_running.swap(true, Ordering::SeqCst) {
            return;
        }
        self.room_looked = Some(now);
        let dir = self.appender.dir().to_owned();
        let (running, ended) = (
            Arc::clone(&self.snapshot_running),
            Arc::clone(&self.snapshot_ended),
        );
        tracker.spawn_blocking(move || {
            let compacted = journal::in_place(&lock, &dir, "compact")
                .and_then(|()| snapshot::compact(&dir, revision, 0));
            drop(lock);
            match compacted {
                Ok(removed) if !removed.is_empty() => tracing::warn!(
                    removed_files = removed.len(),
                    "the disk is full: removed the journal files before the newest snapshot, \
                     kept for watchers resuming across a restart and needed by no recovery, so \
                     that the journal can be written again (after a restart, watchers resuming \
                     before that snapshot get Reset); free space on the disk"
                ),
                Ok(_) => tracing::debug!("the disk is full and no journal file can be given up"),
                // Tried once a second while the disk stays full: said every ten seconds at
                // most (the logs may live on that disk).
                Err(error) => {
                    if let Some(suppressed) = ROOM_FAILURES.due() {
                        tracing::warn!(
                            %error,
                            suppressed,
                            "the disk is full and giving up old journal files failed"
                        );
                    }
                }
            }
            running.store(false, Ordering::SeqCst);
            ended.notify_one();
        });
    }
}

/// A snapshot running this long when the next one is due is logged, once per this long: a
/// disk that stopped answering hangs it (nothing fails, so nothing else says so) while the
/// journal grows. `profile_state_snapshot_running_seconds` shows it too.
const SNAPSHOT_SLOW: Duration = Duration::from_secs(60);

/// When the last snapshot started and when it was last said to be slow.
#[derive(Default)]
struct SnapshotWatch {
    started: Option<Instant>,
    warned: Option<Instant>,
}

impl SnapshotWatch {
    fn started(&mut self, now: Instant) {
        self.started = Some(now);
        self.warned = None;
    }

    /// How long the snapshot still running at `now` has run, if past [`SNAPSHOT_SLOW`] and
    /// not said within the last [`SNAPSHOT_SLOW`].
    fn overdue(&mut self, now: Instant) -> Option<Duration> {
        let running = now.saturating_duration_since(self.started?);
        let said = |at: Instant| now.saturating_duration_since(at) < SNAPSHOT_SLOW;
        if running < SNAPSHOT_SLOW || self.warned.is_some_and(said) {
            return None;
        }
        self.warned = Some(now);
        Some(running)
    }
}

/// A batch sequenced and not committed yet: its callers wait until its append is synced and
/// every batch before it committed.
#[derive(Default)]
struct Batch {
    changes: Vec<Arc<Change>>,
    outcomes: Vec<Outcome>,
    replies: Vec<oneshot::Sender<Result<Applied, Error>>>,
    /// Its journal frame, built as updates join (durable only).
    frame: BatchFrame,
}

/// The batch the journal's thread is writing and syncing.
struct Writing {
    batch: Batch,
    written: Pin<Box<dyn Future<Output = std::io::Result<Appended>> + Send>>,
}

struct Task {
    store: Store,
    hook: Arc<dyn CommitHook>,
    durable: Option<Durable>,
    journal_state: Arc<watch::Sender<JournalState>>,
    /// Ends the stall watch when the task ends.
    _stall_watch: tokio_util::sync::DropGuard,
    metrics: Metrics,
    tracker: TaskTracker,
    /// The batch being written and synced.
    writing: Option<Writing>,
    /// The next batch, sequenced on top of `writing` and growing with every update that
    /// arrives until the journal's thread is free: then it is handed over whole, so each sync
    /// carries everything that queued up during the previous one (group commit).
    next: Option<Batch>,
    /// How many batches are in `writing` and `next`, for [`Sequencer::batches_in_flight`].
    in_flight_count: watch::Sender<usize>,
    /// The newest profile of every key that an uncommitted batch changed: later updates merge
    /// into these, not into the store's older copies.
    pending: ProfileMap,
}

impl Task {
    async fn run(mut self, mut inbox: mpsc::Receiver<Request>) {
        let mut requests = Vec::with_capacity(MAX_BATCH);
        let mut open = true;
        while open || self.writing.is_some() || self.next.is_some() {
            // How many more updates the next batch may take: a batch never exceeds MAX_BATCH.
            let room =
                MAX_BATCH.saturating_sub(self.next.as_ref().map_or(0, |next| next.replies.len()));
            let writing = self.writing.is_some();
            let probe = !writing
                && self.next.is_none()
                && *self.journal_state.borrow() == JournalState::Failing;
            // While a batch syncs, the updates that arrive are sequenced and encoded into the
            // next batch as they come, so the sync's end finds it ready to hand over: the
            // journal's thread waits only for this task to wake, not for the batch to be built
            // (measured: a tenth more durable webhooks/s, a lower p50). For webhook handlers,
            // on the ingest thread with this task, a wake-up is a local queue push, and each
            // takes whatever queued meanwhile. (`recv_many` answers 0 at once for a limit of
            // 0, which would read as a closed channel: hence `room > 0`.)
            let listen = open && room > 0;
            let snapshot_ended = self.durable.as_ref().and_then(Durable::waited_snapshot_end);
            tokio::select! {
                biased;
                written = written(&mut self.writing), if writing => {
                    self.finish_writing(written);
                    if open {
                        open = self.take_waiting(&mut inbox, &mut requests);
                    }
                    self.hand_over();
                }
                received = inbox.recv_many(&mut requests, room), if listen => {
                    if received == 0 {
                        open = false;
                    } else {
                        self.add(&mut requests);
                    }
                    self.hand_over();
                }
                // select! builds every branch's future on each turn; in a block, the sleep
                // (a clock read and a timer handle) is only made when the branch is polled.
                () = async { tokio::time::sleep(PROBE_INTERVAL).await }, if probe => {
                    self.probe().await;
                }
                () = async { snapshot_ended.as_ref().unwrap().notified().await },
                    if snapshot_ended.is_some() =>
                {
                    if let Some(durable) = &mut self.durable {
                        durable.maybe_snapshot(&self.store, &self.tracker, &self.metrics);
                    }
                }
            }
            let count = usize::from(self.writing.is_some()) + usize::from(self.next.is_some());
            if *self.in_flight_count.borrow() != count {
                self.metrics.journal_batches_in_flight(count);
                self.in_flight_count.send_replace(count);
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

    /// Sequences `requests` on top of every uncommitted batch into the next batch (in memory
    /// only: commits them at once).
    fn add(&mut self, requests: &mut Vec<Request>) {
        let (updates, replies): (Vec<_>, Vec<_>) = requests
            .drain(..)
            .map(|Request { update, reply }| (update, reply))
            .unzip();
        let first_revision = self.store.revision() + 1 + self.uncommitted_changes();
        let Sequenced { changes, outcomes } = sequence_after(
            &self.store,
            &self.pending,
            first_revision,
            &updates,
            Bound::Checked,
        );
        let mut next = self.next.take().unwrap_or_default();
        if self.durable.is_some() {
            for (update, outcome) in updates.iter().zip(&outcomes) {
                if let Ok(Applied::Changed { revision }) = outcome {
                    next.frame.push(&UpdateRecord::new(*revision, update));
                }
            }
            for change in &changes {
                let profile = &change.profile;
                self.pending
                    .insert(profile.key.clone(), Arc::clone(profile));
            }
        }
        next.changes.extend(changes);
        next.outcomes.extend(outcomes);
        next.replies.extend(replies);
        self.next = Some(next);
    }

    /// Adds the updates waiting in `inbox` to the next batch, without waiting for more (up to
    /// a batch's worth). False once every handle is gone and the inbox is empty.
    fn take_waiting(
        &mut self,
        inbox: &mut mpsc::Receiver<Request>,
        requests: &mut Vec<Request>,
    ) -> bool {
        let queued = self.next.as_ref().map_or(0, |next| next.replies.len());
        let mut open = true;
        while queued + requests.len() < MAX_BATCH {
            match inbox.try_recv() {
                Ok(request) => requests.push(request),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !requests.is_empty() {
            self.add(requests);
        }
        open
    }

    fn uncommitted_changes(&self) -> u64 {
        let writing = self.writing.as_ref().map_or(0, |w| w.batch.changes.len());
        let next = self.next.as_ref().map_or(0, |next| next.changes.len());
        (writing + next) as u64
    }

    /// Hands the next batch to the journal's thread once it is free (commits it at once if
    /// there is nothing to write: in memory only, or nothing changed).
    fn hand_over(&mut self) {
        if self.writing.is_some() {
            return;
        }
        let Some(mut batch) = self.next.take() else {
            return;
        };
        let durable = self.durable.as_ref();
        match (durable, batch.frame.revisions()) {
            (Some(durable), Some(revisions)) => {
                let frame = std::mem::take(&mut batch.frame).finish();
                let written = Box::pin(durable.appender.append(frame, Some(revisions)));
                self.writing = Some(Writing { batch, written });
            }
            _ => self.commit(batch),
        }
    }

    /// The batch being written was synced, or failed: commit and answer it, or fail it and the
    /// next batch (numbered on top of it).
    fn finish_writing(&mut self, written: std::io::Result<Appended>) {
        let Writing { batch, .. } = self.writing.take().expect("a batch being written");
        match written {
            Ok(appended) => {
                self.metrics
                    .journal_append(appended.took.as_secs_f64(), appended.bytes);
                // Read first: a send on every batch would wake every reader of the state
                // (health, readiness) once per sync.
                let was = *self.journal_state.borrow();
                match was {
                    JournalState::Writable => {}
                    JournalState::Failing => tracing::info!("journal writes succeed again"),
                    JournalState::Stalled => tracing::info!(
                        took_ms = appended.took.as_millis() as u64,
                        "the journal's stalled write returned"
                    ),
                }
                if was != JournalState::Writable {
                    self.journal_state.send_replace(JournalState::Writable);
                }
                let records = batch.changes.len() as u64;
                self.commit(batch);
                if let Some(durable) = &mut self.durable {
                    durable.records_since_snapshot += records;
                    durable.bytes_since_snapshot += appended.bytes;
                    durable.maybe_snapshot(&self.store, &self.tracker, &self.metrics);
                }
            }
            Err(error) => {
                self.metrics.journal_failure();
                // Once when writes start failing (the recovery is logged once too): while the
                // disk stays full every batch fails, a line per webhook would flood the logs,
                // which may well live on that disk. The metric counts every failure.
                // Only a change notifies: readiness watchers see one NotServing, not one a batch.
                if self.journal_state.send_if_modified(|state| {
                    std::mem::replace(state, JournalState::Failing) != JournalState::Failing
                }) {
                    tracing::error!(%error, "journal write failed: answering 503 until a write succeeds");
                } else {
                    tracing::debug!(%error, "journal write failed again");
                }
                for batch in std::iter::once(batch).chain(self.next.take()) {
                    for reply in batch.replies {
                        let _ = reply.send(Err(Error::Unavailable {
                            reason: "the update could not be recorded durably; retry later".into(),
                        }));
                    }
                }
                // Nothing numbered after the failure reached the journal, so its revisions
                // are free again.
                self.pending.clear();
                if let Some(durable) = &mut self.durable {
                    // A full disk, or a full quota (XFS project quotas, a container's
                    // ephemeral storage limit): the same room is made.
                    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
                    if matches!(error.kind(), StorageFull | QuotaExceeded) {
                        durable.make_room(self.store.revision(), &self.tracker);
                    }
                    durable.appender.resume();
                }
            }
        }
    }

    /// Commits a batch whose append is synced (every batch before it is committed), tells
    /// the hook, and answers its callers.
    fn commit(&mut self, batch: Batch) {
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
            let _ = reply.send(outcome.map_err(Error::from));
        }
    }

    /// Tries the path the next append will take (the segment it needs, a write as large as
    /// the one that failed, a sync): writable again only when that works.
    async fn probe(&mut self) {
        let Some(durable) = &mut self.durable else {
            self.journal_state.send_replace(JournalState::Writable);
            return;
        };
        let next_revision = self.store.revision() + 1;
        match durable.appender.probe(next_revision).await {
            Ok(()) => {
                tracing::info!("journal writes succeed again");
                self.journal_state.send_replace(JournalState::Writable);
            }
            // Once a second while the disk refuses: DEBUG, the failed appends log at ERROR.
            Err(error) => tracing::debug!(%error, "journal probe failed"),
        }
    }
}

/// How often the stall watch looks at the write out.
const STALL_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Reports the journal stalled while a write has been out for `stalled_after` (the append goes
/// on: it may still return, and then succeed, which makes the journal writable again), until
/// `stop`. The journal's thread clears its clock before it answers the append, the writer
/// looks at the state once it has the answer, and the state is set here only if the clock
/// still shows the stalled write, under the state's lock: a write that returns meanwhile is
/// never left reported stalled. The writer's own loop has no part in it: a timer polled there
/// cost about 1 µs a durable webhook (BENCHMARKS.md, session 42).
fn watch_for_stalls(
    journal_state: Arc<watch::Sender<JournalState>>,
    clock: Arc<WriteClock>,
    stalled_after: Duration,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let stalled = || clock.waited().filter(|waited| *waited >= stalled_after);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(STALL_CHECK_INTERVAL) => {}
            }
            let Some(waited) = stalled() else { continue };
            let reported = journal_state.send_if_modified(|state| {
                let now_stalled = *state == JournalState::Writable && stalled().is_some();
                if now_stalled {
                    *state = JournalState::Stalled;
                }
                now_stalled
            });
            if reported {
                tracing::error!(
                    waited_ms = waited.as_millis() as u64,
                    "the journal's write has not returned: not ready until it does (the \
                     webhooks waiting for it get 503 at their timeout)"
                );
            }
        }
    });
}

/// The append of the batch being written.
async fn written(writing: &mut Option<Writing>) -> std::io::Result<Appended> {
    match writing {
        Some(writing) => writing.written.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Profiles by key, hashed with foldhash as the store's map: SipHash showed in recovery's
/// replay profile.
type ProfileMap = HashMap<ProfileKey, Arc<Profile>, foldhash::fast::RandomState>;

/// What became of one update of a batch: applied (changed or unchanged), or refused whole
/// because it would grow its profile past the bound (`crate::profile::check_growth`).
pub(crate) type Outcome = Result<Applied, TooLarge>;

/// A merged and numbered batch, not yet committed.
pub(crate) struct Sequenced {
    /// The changes, revisions consecutive after the store's.
    pub(crate) changes: Vec<Arc<Change>>,
    /// Each update's outcome, in order.
    pub(crate) outcomes: Vec<Outcome>,
}

/// Whether a merge checks how large the update grows its profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bound {
    /// Live updates, local or from the stream: refused past the bound.
    Checked,
    /// Recovery's replay of the local journal, and stream messages from before the stream took
    /// this build's merge rules: accepted when they were written, perhaps by a build without
    /// the bound, they must apply as they did.
    Waived,
}

/// Merges a batch of updates in arrival order and numbers the changes after the store's
/// revision. Pure apart from reading the store. The one place revisions are assigned: the
/// sequencer's task calls it for the local journal, recovery through `replay`, and in
/// replicated mode the replica's applier (`crate::replication`) for each stream message, in
/// stream order, so that every replica assigns the same revisions.
pub(crate) fn sequence(store: &Store, updates: &[ProfileUpdate], bound: Bound) -> Sequenced {
    let first_revision = store.revision() + 1;
    sequence_after(
        store,
        &ProfileMap::default(),
        first_revision,
        updates,
        bound,
    )
}

/// For tests: a store of `count` profiles of account `a` (`c000000`, `c000001`, ...), each of
/// tier `basic`, committed as one batch.
#[cfg(test)]
pub(crate) fn store_of_basic_profiles(count: usize) -> Store {
    use crate::profile::{Field, Origin, ProfileKey, Scalar};
    let store = Store::new(10, "test");
    let updates: Vec<_> = (0..count)
        .map(|i| ProfileUpdate {
            key: ProfileKey::new("a", format!("c{i:06}")),
            at: chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("a valid time"),
            fields: vec![(Field::TierName, Some(Scalar::Text("basic".into())))],
            extras: vec![],
            origin: Origin::Webhook,
        })
        .collect();
    store.commit(&sequence(&store, &updates, Bound::Checked).changes);
    store
}

/// [`sequence`] on top of batches numbered but not committed yet: `pending` holds the newest
/// profile of every key they changed, and the first revision is `first_revision`.
fn sequence_after(
    store: &Store,
    pending: &ProfileMap,
    first_revision: u64,
    updates: &[ProfileUpdate],
    bound: Bound,
) -> Sequenced {
    let mut next_revision = first_revision;
    // Profiles this batch already changed: later updates of the same profile merge into these,
    // not into the store's older copy.
    // Sized once (growing it from empty rehashed it several times a batch: in recovery's
    // replay, a tenth of the merging thread); the last update is never put in it.
    let room = updates.len().saturating_sub(1);
    let mut latest = ProfileMap::with_capacity_and_hasher(room, Default::default());
    let mut changes = Vec::with_capacity(updates.len());
    let mut outcomes = Vec::with_capacity(updates.len());
    for (index, update) in updates.iter().enumerate() {
        let current = latest
            .get(&update.key)
            .or_else(|| pending.get(&update.key))
            .cloned()
            .or_else(|| store.get(&update.key));
        let mut profile = match &current {
            Some(current) => Profile::clone(current),
            None => Profile::empty(store.shared_key(update.key.clone())),
        };
        let merged = profile.merge(update);
        let refused = match bound {
            Bound::Checked if merged.is_some() => {
                check_growth(current.as_deref(), &profile, update).err()
            }
            _ => None,
        };
        let outcome = match (merged, refused) {
            // Refused whole: no revision, the profile as it was.
            (_, Some(too_large)) => Err(too_large),
            (None, None) => Ok(Applied::Unchanged {
                revision: profile.revision,
            }),
            (Some(changed_fields), None) => {
                let revision = next_revision;
                next_revision += 1;
                profile.revision = revision;
                profile.version += 1;
                if current.is_none() {
                    profile.create_revision = revision;
                }
                let profile = Arc::new(profile);
                // The last update has no later one to merge into it: no map to fill (a batch
                // of one fills none).
                if index + 1 < updates.len() {
                    latest.insert(update.key.clone(), Arc::clone(&profile));
                }
                changes.push(Arc::new(Change::new(
                    revision,
                    profile,
                    current,
                    changed_fields.into(),
                    update.origin,
                )));
                Ok(Applied::Changed { revision })
            }
        };
        outcomes.push(outcome);
    }
    Sequenced { changes, outcomes }
}

/// Recovery: re-applies journaled records through the same merge, checking that each produces
/// the revision it was recorded with, and commits them (rebuilding the history).
pub(crate) fn replay(store: &Store, records: Vec<(u64, ProfileUpdate)>) -> Result<(), String> {
    let (revisions, updates): (Vec<u64>, Vec<ProfileUpdate>) = records.into_iter().unzip();
    let Sequenced { changes, outcomes } = sequence(store, &updates, Bound::Waived);
    for (recorded, outcome) in revisions.into_iter().zip(outcomes) {
        if outcome != Ok(Applied::Changed { revision: recorded }) {
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

    /// A snapshot still running a minute after it started is said to be, then once a minute
    /// at most; one that started again is watched from its own start.
    #[test]
    fn a_snapshot_running_past_a_minute_is_said_to_be_once_a_minute() {
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        let mut watch = SnapshotWatch::default();
        assert_eq!(watch.overdue(at(600)), None, "none started");
        watch.started(start);
        assert_eq!(watch.overdue(at(59)), None);
        assert_eq!(watch.overdue(at(60)), Some(Duration::from_secs(60)));
        assert_eq!(watch.overdue(at(61)), None, "said a second ago");
        assert_eq!(watch.overdue(at(119)), None);
        assert_eq!(watch.overdue(at(120)), Some(Duration::from_secs(120)));
        watch.started(at(130));
        assert_eq!(watch.overdue(at(150)), None, "the new one runs for 20 s");
        assert_eq!(watch.overdue(at(190)), Some(Duration::from_secs(60)));
    }

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
            arcstr::ArcStr::ptr_eq(&a.key.client_id, &b.key.client_id),
            "one client_id string per account"
        );
        assert_eq!(a.get_int(Field::TotalPoints), Some(20));
        let history = store.history_from(1, 10).unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(
            history[2].changed_fields.to_vec(),
            vec![FieldPath::Field(Field::TotalPoints)]
        );
        assert_eq!(history[2].previous.as_ref().unwrap().revision, 1);

        drop(sequencer);
        tracker.close();
        tracker.wait().await;
    }

    /// `update` with one extra key holding `len` bytes of text.
    fn with_extra(customer: &str, second: i64, key: &str, len: usize) -> ProfileUpdate {
        let mut update = update(customer, second, 1);
        update.extras = vec![(key.into(), Some("x".repeat(len).into()))];
        update
    }

    #[test]
    fn an_update_past_the_bound_is_refused_whole_and_uses_no_revision() {
        let store = Store::new(100, "test");
        let half = crate::profile::MAX_EXTRAS_JSON_BYTES / 2 + 10;
        let updates = [
            with_extra("a", 1, "one", half),
            with_extra("a", 2, "two", half),
            update("b", 1, 5),
        ];
        let Sequenced { changes, outcomes } = sequence(&store, &updates, Bound::Checked);
        assert_eq!(outcomes[0], Ok(Applied::Changed { revision: 1 }));
        let Err(refused) = outcomes[1] else {
            panic!("the second extra is past the bound: {:?}", outcomes[1]);
        };
        assert!(refused.extras_json_bytes > crate::profile::MAX_EXTRAS_JSON_BYTES);
        assert_eq!(outcomes[2], Ok(Applied::Changed { revision: 2 }));
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].profile.extras().count(), 1);

        // Recovery replays what a journal holds as it was written, bound or not (an older
        // build may have let a profile grow past it).
        let replayed = Store::new(100, "test");
        let records = vec![(1, updates[0].clone()), (2, updates[1].clone())];
        replay(&replayed, records).expect("replays");
        let profile = replayed.get(&ProfileKey::new("2155", "a")).unwrap();
        assert_eq!((profile.revision, profile.extras().count()), (2, 2));
    }

    #[tokio::test]
    async fn updates_of_one_profile_within_a_batch_build_on_each_other() {
        let store = Store::new(100, "test");
        let updates = [update("a", 1, 10), update("a", 2, 20), update("a", 2, 20)];
        let Sequenced { changes, outcomes } = sequence(&store, &updates, Bound::Checked);
        assert_eq!(
            outcomes,
            vec![
                Ok(Applied::Changed { revision: 1 }),
                Ok(Applied::Changed { revision: 2 }),
                Ok(Applied::Unchanged { revision: 2 }),
            ]
        );
        assert_eq!(changes[1].previous.as_ref().unwrap().revision, 1);
        assert_eq!(changes[1].profile.version, 2);
    }
}
