//! The power-loss test: the journal over a disk that keeps only what was synced
//! ([`FaultSwitch::lose_unsynced_writes`]), written through the real sequencer by concurrent
//! callers, the power cut while appends are in flight. A SIGKILL cannot test this (the page
//! cache survives a killed process); this is what `fdatasync` is for.

use tokio_util::task::TaskTracker;

use super::*;
use crate::data_dir::LockRef;
use crate::metrics::Metrics;
use crate::profile::{Field, ProfileKey, ProfileUpdate, Scalar};
use crate::sequencer::{self, Applied, Durability, Sequencer};
use crate::store::Store;

/// Callers, each with one update in flight at a time, so batches hold several.
const CALLERS: usize = 12;
/// Acknowledged updates before the power is cut.
const ACKNOWLEDGED_BEFORE_CUT: u64 = 300;
/// Small segments, so the run rotates a few times.
const SEGMENT_BYTES: u64 = 4096;

fn update(caller: usize, n: i64) -> ProfileUpdate {
    ProfileUpdate {
        key: ProfileKey::new("2155", format!("caller-{caller}")),
        at: chrono::DateTime::from_timestamp(1_700_000_000 + n, 0).unwrap(),
        fields: vec![
            (Field::GbCustomerId, Some(Scalar::Int(caller as i64))),
            (Field::TotalPoints, Some(Scalar::Int(n))),
        ],
        extras: vec![],
        origin: crate::profile::Origin::Webhook,
    }
}

/// The journal, never snapshotting, in a directory nobody locked.
fn durability(journal: Journal) -> Durability {
    Durability {
        journal,
        snapshot_every_records: u64::MAX,
        records_since_snapshot: 0,
        snapshot_every_bytes: u64::MAX,
        history_events: 1_000_000,
        lock: LockRef::unlocked(),
        stalled_after: std::time::Duration::from_secs(3600),
    }
}

/// A sequencer over `dir`'s journal, recovered first; the store it writes.
fn start(dir: &Path, faults: &FaultSwitch, tracker: &TaskTracker) -> (Store, Sequencer) {
    let store = Store::new(1_000_000, "test");
    let recovered = recover(dir, &store, |records| sequencer::replay(&store, records)).unwrap();
    let journal = Journal::open(
        dir,
        recovered.tail,
        store.revision() + 1,
        SEGMENT_BYTES,
        faults.clone(),
    )
    .unwrap();
    let durability = durability(journal);
    let sequencer = Sequencer::start(store.clone(), Some(durability), Metrics::new(), tracker);
    (store, sequencer)
}

/// A sequencer over a new journal in `dir` (nothing to recover), telling `hook` of its commits.
fn start_empty(
    dir: &Path,
    faults: &FaultSwitch,
    tracker: &TaskTracker,
    hook: std::sync::Arc<dyn sequencer::CommitHook>,
) -> (Store, Sequencer) {
    let store = Store::new(1_000_000, "test");
    let journal = Journal::open(dir, None, 1, SEGMENT_BYTES, faults.clone()).unwrap();
    let durability = durability(journal);
    let sequencer = Sequencer::start_with_hook(
        store.clone(),
        Some(durability),
        hook,
        Metrics::new(),
        tracker,
    );
    (store, sequencer)
}

/// Applies `caller`'s updates 1, 2, 3, ... until one is refused; the acknowledged ones as
/// `(points, revision)`.
async fn apply_until_refused(
    sequencer: Sequencer,
    caller: usize,
    acknowledged: tokio::sync::watch::Sender<u64>,
) -> Vec<(i64, u64)> {
    let mut answered = Vec::new();
    for n in 1.. {
        match sequencer.apply(update(caller, n)).await {
            Ok(Applied::Changed { revision }) => answered.push((n, revision)),
            Ok(unchanged) => panic!("update {n} of caller {caller}: {unchanged}"),
            Err(_) => break,
        }
        acknowledged.send_modify(|count| *count += 1);
    }
    answered
}

async fn stop(sequencer: Sequencer, tracker: &TaskTracker) {
    drop(sequencer);
    tracker.close();
    tracker.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_update_survives_a_power_cut_and_no_revision_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultSwitch::default();
    faults.lose_unsynced_writes();
    let tracker = TaskTracker::new();
    let (_, sequencer) = start(dir.path(), &faults, &tracker);

    let (acknowledged, mut count) = tokio::sync::watch::channel(0);
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            tokio::spawn(apply_until_refused(
                sequencer.clone(),
                caller,
                acknowledged.clone(),
            ))
        })
        .collect();
    count
        .wait_for(|count| *count >= ACKNOWLEDGED_BEFORE_CUT)
        .await
        .unwrap();
    // The power cut: no write or sync succeeds from here on, and stopping the sequencer drops
    // the journal with whatever it wrote since its last sync.
    faults.fail_writes(true);
    let mut answered = Vec::new();
    for caller in callers {
        answered.push(caller.await.unwrap());
    }
    stop(sequencer, &tracker).await;
    assert!(
        answered.iter().map(Vec::len).sum::<usize>() as u64 >= ACKNOWLEDGED_BEFORE_CUT,
        "the callers stopped early"
    );

    // Back on: every acknowledged update is there, at the revision it was answered with.
    let faults = FaultSwitch::default();
    faults.lose_unsynced_writes();
    let tracker = TaskTracker::new();
    let (store, sequencer) = start(dir.path(), &faults, &tracker);
    let recovered_revision = store.revision();
    let history = store.history_from(1, 1_000_000).unwrap();
    assert_eq!(
        history.len() as u64,
        recovered_revision,
        "every record replayed"
    );
    for (caller, answered) in answered.iter().enumerate() {
        let key = ProfileKey::new("2155", format!("caller-{caller}"));
        for &(points, revision) in answered {
            let change = history
                .get(revision as usize - 1)
                .unwrap_or_else(|| panic!("acknowledged revision {revision} lost"));
            assert_eq!(change.revision, revision);
            assert_eq!(change.profile.key, key, "revision {revision}");
            assert_eq!(change.profile.get_int(Field::TotalPoints), Some(points));
        }
    }

    // The next update takes the revision after the recovered ones: none is used twice, even
    // those a lost write had taken before the cut.
    let next = sequencer.apply(update(99, 1)).await.unwrap();
    assert_eq!(
        next,
        Applied::Changed {
            revision: recovered_revision + 1
        }
    );
    stop(sequencer, &tracker).await;
    let tracker = TaskTracker::new();
    let (store, sequencer) = start(dir.path(), &faults, &tracker);
    assert_eq!(store.revision(), recovered_revision + 1);
    let last = store.history_from(recovered_revision + 1, 1).unwrap();
    assert_eq!(last[0].profile.key, ProfileKey::new("2155", "caller-99"));
    stop(sequencer, &tracker).await;
}

/// A recording commit hook: every change made visible to watchers, in order.
#[derive(Default)]
struct Visible(std::sync::Mutex<Vec<(u64, ProfileKey)>>);

impl sequencer::CommitHook for Visible {
    fn committed(&self, changes: &[std::sync::Arc<crate::profile::Change>]) {
        let mut seen = self.0.lock().unwrap();
        seen.extend(
            changes
                .iter()
                .map(|change| (change.revision, change.profile.key.clone())),
        );
    }
}

/// Holds every sync, then applies caller 1's update 1 (batch A: written, its sync held) and
/// update 2 (batch B: sequenced on top of A, queued behind it); returns once both are in flight.
async fn two_batches_in_flight(
    sequencer: &Sequencer,
    faults: &FaultSwitch,
) -> (
    tokio::task::JoinHandle<Result<Applied, crate::error::Error>>,
    tokio::task::JoinHandle<Result<Applied, crate::error::Error>>,
) {
    faults.hold_syncs(true);
    let mut held = faults.syncs_waited();
    let batch_a = tokio::spawn({
        let sequencer = sequencer.clone();
        async move { sequencer.apply(update(1, 1)).await }
    });
    held.wait_for(|held| *held >= 1).await.unwrap();
    let batch_b = tokio::spawn({
        let sequencer = sequencer.clone();
        async move { sequencer.apply(update(1, 2)).await }
    });
    sequencer
        .batches_in_flight()
        .wait_for(|count| *count == 2)
        .await
        .unwrap();
    (batch_a, batch_b)
}

/// Two batches in flight (one held in its sync, the next sequenced on top of it and queued):
/// nothing of either is visible before its sync; the second builds on the first's profile;
/// then the power is cut in that sync, and both fail, neither survives, and their revisions
/// are taken by the next updates without any trace of the lost ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_batches_in_flight_nothing_is_visible_before_its_sync_and_a_cut_fails_both() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultSwitch::default();
    faults.lose_unsynced_writes();
    let tracker = TaskTracker::new();
    let visible = std::sync::Arc::new(Visible::default());
    let (store, sequencer) = start_empty(dir.path(), &faults, &tracker, visible.clone());
    let first = sequencer.apply(update(0, 1)).await.unwrap();
    assert_eq!(first, Applied::Changed { revision: 1 });

    let (batch_a, batch_b) = two_batches_in_flight(&sequencer, &faults).await;
    // Written (A) or sequenced (B), not synced: invisible to readers and watchers.
    assert_eq!(store.revision(), 1);
    assert!(store.get(&update(1, 1).key).is_none());
    assert_eq!(visible.0.lock().unwrap().len(), 1);

    // The cut, during A's sync: A fails, and B, numbered on top of it, with it.
    faults.fail_writes(true);
    faults.hold_syncs(false);
    assert!(batch_a.await.unwrap().is_err());
    assert!(batch_b.await.unwrap().is_err());
    assert_eq!(store.revision(), 1);
    assert_eq!(visible.0.lock().unwrap().len(), 1);
    stop(sequencer, &tracker).await;

    let faults = FaultSwitch::default();
    let tracker = TaskTracker::new();
    let (store, sequencer) = start(dir.path(), &faults, &tracker);
    assert_eq!(store.revision(), 1, "neither in-flight batch survives");
    assert!(store.get(&update(1, 1).key).is_none());
    // Their revisions are free: the next update takes 2, as a fresh profile.
    let next = sequencer.apply(update(1, 3)).await.unwrap();
    assert_eq!(next, Applied::Changed { revision: 2 });
    let profile = store.get(&update(1, 3).key).unwrap();
    assert_eq!((profile.version, profile.create_revision), (1, 2));
    stop(sequencer, &tracker).await;
}

/// The same two batches in flight, the sync let go: both commit in order, the second merged
/// into the first's profile, each visible only once synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_batches_in_flight_commit_in_order_the_second_on_top_of_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultSwitch::default();
    let tracker = TaskTracker::new();
    let (store, sequencer) = start(dir.path(), &faults, &tracker);
    let (batch_a, batch_b) = two_batches_in_flight(&sequencer, &faults).await;
    assert_eq!(store.revision(), 0);
    faults.hold_syncs(false);
    assert_eq!(
        batch_a.await.unwrap().unwrap(),
        Applied::Changed { revision: 1 }
    );
    assert_eq!(
        batch_b.await.unwrap().unwrap(),
        Applied::Changed { revision: 2 }
    );
    let profile = store.get(&update(1, 2).key).unwrap();
    assert_eq!((profile.version, profile.create_revision), (2, 1));
    assert_eq!(profile.get_int(Field::TotalPoints), Some(2));
    stop(sequencer, &tracker).await;
    let (store, sequencer) = start(dir.path(), &faults, &TaskTracker::new());
    assert_eq!(store.revision(), 2);
    drop(sequencer);
}

/// How many changes each committed batch had.
#[derive(Default)]
struct BatchSizes(std::sync::Mutex<Vec<usize>>);

impl sequencer::CommitHook for BatchSizes {
    fn committed(&self, changes: &[std::sync::Arc<crate::profile::Change>]) {
        self.0.lock().unwrap().push(changes.len());
    }
}

/// More updates arrive during one sync than a batch may hold: the batch after it takes
/// `MAX_BATCH` of them and the rest wait for the one after (a batch once took up to twice as
/// many, when it was already started as the rest arrived). On a current-thread runtime all the
/// callers below have sent before the sequencer runs again, so it finds them all waiting.
#[tokio::test]
async fn a_batch_never_takes_more_than_max_batch_updates() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultSwitch::default();
    let tracker = TaskTracker::new();
    let sizes = std::sync::Arc::new(BatchSizes::default());
    let (store, sequencer) = start_empty(dir.path(), &faults, &tracker, sizes.clone());
    // Batch A held in its sync, batch B (one update) started on top of it.
    let (batch_a, batch_b) = two_batches_in_flight(&sequencer, &faults).await;
    let callers = sequencer::MAX_BATCH + 200;
    let waiting: Vec<_> = (0..callers)
        .map(|caller| {
            let sequencer = sequencer.clone();
            tokio::spawn(async move { sequencer.apply(update(caller + 10, 1)).await })
        })
        .collect();
    tokio::task::yield_now().await;
    faults.hold_syncs(false);
    batch_a.await.unwrap().unwrap();
    batch_b.await.unwrap().unwrap();
    for caller in waiting {
        assert!(matches!(caller.await.unwrap(), Ok(Applied::Changed { .. })));
    }
    let sizes = sizes.0.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), callers + 2, "{sizes:?}");
    assert!(
        sizes.iter().all(|&size| size <= sequencer::MAX_BATCH),
        "a batch over {}: {sizes:?}",
        sequencer::MAX_BATCH
    );
    // B and the first MAX_BATCH - 1 callers make one full batch.
    assert!(sizes.contains(&sequencer::MAX_BATCH), "{sizes:?}");
    assert_eq!(store.revision(), (callers + 2) as u64);
    stop(sequencer, &tracker).await;
}
