//! The power-loss test: the journal over a disk that keeps only what was synced
//! ([`FaultSwitch::lose_unsynced_writes`]), written through the real sequencer by concurrent
//! callers, the power cut while appends are in flight. A SIGKILL cannot test this (the page
//! cache survives a killed process); this is what `fdatasync` is for.

use tokio_util::task::TaskTracker;

use super::*;
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
    let durability = Durability {
        journal,
        snapshot_every_records: u64::MAX,
        snapshot_every_bytes: u64::MAX,
        history_events: 1_000_000,
    };
    let sequencer = Sequencer::start(store.clone(), Some(durability), Metrics::new(), tracker);
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
