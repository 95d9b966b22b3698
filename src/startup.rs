//! Start-up of a durable store: opens the data directory, rebuilds the store from its
//! snapshot and journal through the sequencer's own merge, and opens the journal for appends.
//!
//! Recovery refuses damage rather than lose acknowledged updates, unless a newer snapshot
//! covers the damage: then it starts from that snapshot instead (`recover_store`), losing
//! only watch history. A journal that ends before a snapshot lost records it had synced: the
//! store starts from that snapshot, under a new store id. The one way past another
//! refusal short of a backup is the operator's `--discard-journal-from <segment>:<offset>`,
//! naming the very point the refusal printed: then the store first gets a new store id (so no
//! revision is ever reused under the same id, and every watcher that resumes is reset), the
//! journal is cut there, and recovery runs again. A point that does not match the refusal
//! gives nothing up, and one left set after it was used does nothing (the journal has no
//! damage there any more). This module serves nothing and knows no transport.

use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::data_dir::DataDir;
use crate::journal::{self, DiscardPoint, FaultSwitch, Journal, JournalError, Recovered};
use crate::sequencer::{self, Durability};
use crate::store::{HistoryLimits, Store};

/// Rebuilds a store (identified by `store_id`) from the snapshot and journal in `dir`, as
/// start-up does, without taking the directory's lock or opening the journal for appends.
///
/// Damage that a newer snapshot covers (a damaged snapshot, a damaged or missing stretch of
/// the journal before its newest segment: `journal::start_past`) is passed by starting from
/// that snapshot, with a warning: every acknowledged update is there, only the watch history
/// before it is not (watchers resuming before it get `Reset`). A damaged snapshot so passed
/// is renamed `<name>.damaged`. When no newer start recovers, the error is the damage none
/// passes if it names a point to give up from (its `--discard-journal-from` gives up least),
/// else the first damage met. A journal that ends before a snapshot lost records it had
/// synced: recovery starts from that snapshot instead ([`start_past_journal_end`]), and the
/// caller must give the store a new id (`Recovered::journal_ended_at`).
pub fn recover_store(
    dir: &Path,
    history: HistoryLimits,
    store_id: &str,
) -> Result<(Store, Recovered), JournalError> {
    let attempt = |at_least| {
        let store = Store::with_history(history, store_id);
        let replay = |records| sequencer::replay(&store, records);
        let recovered = journal::recover_from(dir, &store, at_least, replay)?;
        Ok((store, recovered))
    };
    let recovered = recover_passing_damage(dir, attempt)?;
    start_past_journal_end(dir, recovered, attempt)
}

/// `attempt` from any snapshot, then, while it fails on damage a newer snapshot covers, from
/// that snapshot (see [`recover_store`]).
fn recover_passing_damage(
    dir: &Path,
    attempt: impl Fn(u64) -> Result<(Store, Recovered), JournalError>,
) -> Result<(Store, Recovered), JournalError> {
    let mut damage = match attempt(0) {
        Ok(recovered) => return Ok(recovered),
        Err(error) => error,
    };
    let mut passed = Vec::new();
    while let Some(at_least) = journal::start_past(dir, &damage)? {
        passed.push(damage);
        match attempt(at_least) {
            Ok(recovered) => {
                passed_damage(&passed, &recovered.1)?;
                return Ok(recovered);
            }
            Err(error) => damage = error,
        }
    }
    if passed.is_empty() {
        return Err(damage);
    }
    // The damage no snapshot passes, if it names a point to give up from: giving up from the
    // first damage instead lost what the later point keeps (adversary round 13). Else the first.
    let passable: Vec<String> = passed.iter().map(ToString::to_string).collect();
    let (refusal, also) = match damage.discard_point() {
        Some(_) => (damage, passable),
        None => (passed.swap_remove(0), passable[1..].to_vec()),
    };
    if !also.is_empty() {
        tracing::warn!(
            damage = also.join("; "),
            "also damaged, each passable by a newer snapshot once the refused damage is mended"
        );
    }
    Err(refusal)
}

/// A snapshot past the end of the journal `recovered` proves that the journal lost records it
/// had synced (and so acknowledged): its newest segment's end cut after an unclean
/// stop (which recovery takes for a torn write), that segment and `JOURNAL_HEAD` lost, or the
/// operator's `--discard-journal-from`. Recovery starts again from the newest such snapshot
/// that loads, which holds every update up to it; appends go to a new segment after it (`tail`
/// `None`: the old segment's frames end before the snapshot, and the revisions must not jump
/// inside a segment). Revisions after the snapshot may have been acknowledged and will be
/// assigned again: `journal_ended_at` tells the caller, which gives the store a new id.
/// Serving the cut journal instead lost what the snapshot held, under the same id (adversarial
/// round 41a). A past-end snapshot that cannot be loaded is set aside as `<name>.damaged` and
/// the next older one is tried (setting them all aside lost what an intact older one held,
/// round 42); when none loads, the journal's end stands, still with `journal_ended_at` set.
fn start_past_journal_end(
    dir: &Path,
    (store, recovered): (Store, Recovered),
    attempt: impl Fn(u64) -> Result<(Store, Recovered), JournalError>,
) -> Result<(Store, Recovered), JournalError> {
    let end = store.revision();
    let mut past: Vec<_> = journal::snapshot::list(dir)?
        .into_iter()
        .filter(|(revision, _)| *revision > end)
        .collect();
    if past.is_empty() {
        return Ok((store, recovered));
    }
    let (mut store, mut recovered) = (store, recovered);
    while let Some((revision, path)) = past.pop() {
        match attempt(revision) {
            Ok(started) => {
                (store, recovered) = started;
                break;
            }
            Err(JournalError::DamagedSnapshot { path: damaged, .. }) if damaged == path => {
                let aside = journal::snapshot::set_aside(&path, ".damaged")?;
                tracing::warn!(
                    snapshot = %path.display(),
                    set_aside_as = %aside.display(),
                    journal_ends_at = end,
                    "a snapshot past the journal's end is damaged: set aside; an older one past \
                     the end is tried, if any"
                );
            }
            Err(error) => return Err(error),
        }
    }
    recovered.tail = None;
    recovered.journal_ended_at = Some(end);
    Ok((store, recovered))
}

/// Says that recovery passed `passed` (the damage each start stopped at) by starting from a
/// newer snapshot, and sets each damaged snapshot it passed aside.
fn passed_damage(passed: &[JournalError], recovered: &Recovered) -> Result<(), JournalError> {
    for damage in passed {
        if let JournalError::DamagedSnapshot { path, .. } = damage {
            journal::snapshot::set_aside(path, ".damaged")?;
        }
    }
    let passed: Vec<String> = passed.iter().map(|damage| damage.to_string()).collect();
    tracing::warn!(
        damage = passed.join("; then "),
        started_from_snapshot = recovered.snapshot,
        "recovery started from a newer snapshot that covers the damaged file, so no \
         acknowledged update is lost; the watch history before that snapshot is gone \
         (watchers resuming before it get Reset). A damaged snapshot is renamed \
         <name>.damaged; a damaged journal segment stays until compaction removes it, and \
         each start reads up to it again meanwhile. Check the disk."
    );
    Ok(())
}

/// Opens the data directory of `config`, rebuilds the store from it (giving records up only
/// where `--discard-journal-from` says), and opens the journal for appends.
pub fn open_durable(
    config: &Config,
    faults: FaultSwitch,
) -> anyhow::Result<(Store, Durability, DataDir)> {
    let started = std::time::Instant::now();
    let mut dir = DataDir::open(&config.data_dir)?;
    let mut renewed = renew_id_if_head_lost(&mut dir)?;
    let wanted = config.discard_journal_from.as_ref();
    let (store, recovered) = match recover_store(dir.path(), config.history(), dir.store_id()) {
        Ok(recovered) => {
            if let Some(point) = wanted {
                tracing::warn!(
                    %point,
                    "--discard-journal-from is set but the journal has no damage there: nothing \
                     was given up; remove the flag"
                );
            }
            recovered
        }
        Err(error) => match (wanted, error.discard_point()) {
            (Some(wanted), Some((found, first_lost))) if *wanted == found => {
                give_up(&mut dir, &found, first_lost)?;
                renewed = true;
                recover_store(dir.path(), config.history(), dir.store_id())
                    .context("recovery after giving records up")?
            }
            (Some(wanted), _) => {
                return Err(anyhow::Error::new(error).context(format!(
                    "--discard-journal-from {wanted} does not name where start-up stopped, so \
                     nothing was given up"
                )));
            }
            (None, _) => return Err(error.into()),
        },
    };
    let (store, recovered) = match recovered.journal_ended_at {
        Some(_) => renew_id_past_journal_end(&mut dir, config, renewed, (store, recovered))?,
        None => (store, recovered),
    };
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
        snapshot = recovered.snapshot,
        replayed = recovered.replayed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        snapshot_ms = recovered.took.snapshot.as_millis() as u64,
        replay_ms = recovered.took.replay.as_millis() as u64,
        key_order_ms = recovered.took.key_order.as_millis() as u64,
        "recovered"
    );
    let durability = Durability {
        journal,
        snapshot_every_records: config.snapshot_every_records,
        // Counted from start-up, the count began again at every restart: a server restarted
        // more often than every --snapshot-every-records records never snapshotted, so never
        // compacted, and replayed its whole journal at every start (adversarial round 41a).
        records_since_snapshot: store
            .revision()
            .saturating_sub(newest_snapshot(dir.path())?),
        snapshot_every_bytes: config.snapshot_every_bytes,
        history_events: config.history_events as u64,
        lock: dir.lock_ref(),
        // Webhooks waiting on such a write are half way to their 503: readiness tells load
        // balancers before they time out.
        stalled_after: config.webhook_timeout / 2,
    };
    Ok((store, durability, dir))
}

/// The revision of the newest snapshot in `dir` (0 without one).
fn newest_snapshot(dir: &Path) -> Result<u64, JournalError> {
    let snapshots = journal::snapshot::list(dir)?;
    Ok(snapshots.last().map_or(0, |(revision, _)| *revision))
}

/// The journal ended before a snapshot (`Recovered::journal_ended_at`), and recovery started
/// from the newest one that loads, if any: revisions after where it started may have been
/// acknowledged and will be assigned again, so the store gets a new id and is recovered again
/// under it (unless it `already` got one this start, before recovery).
fn renew_id_past_journal_end(
    dir: &mut DataDir,
    config: &Config,
    already: bool,
    (store, recovered): (Store, Recovered),
) -> anyhow::Result<(Store, Recovered)> {
    let ended_at = recovered.journal_ended_at.unwrap_or_default();
    let old_store_id = match already {
        true => "(named by the warning that renewed it)".to_owned(),
        false => dir.store_id().to_owned(),
    };
    if !already {
        dir.renew_store_id()?;
    }
    let new_store_id = dir.store_id();
    match recovered.snapshot.filter(|snapshot| *snapshot > ended_at) {
        Some(snapshot) => tracing::warn!(
            journal_ended_at = ended_at,
            started_from_snapshot = snapshot,
            %old_store_id,
            %new_store_id,
            "the journal ends before a snapshot, so it lost records it had synced (its end cut \
             or zeroed, its newest segment lost, or given up: check the disk). Started from \
             the newest such snapshot that loads, which holds every update up to it; updates \
             after it may be lost, and their revisions will be assigned again, so the store \
             has a new id and every watcher starts over"
        ),
        None => tracing::warn!(
            journal_ended_at = ended_at,
            %old_store_id,
            %new_store_id,
            "the journal ends before a snapshot, so it lost records it had synced, and no \
             snapshot past its end could be loaded (each was set aside as <name>.damaged): \
             the journal's end stands; updates after it are lost, and their revisions will be \
             assigned again, so the store has a new id and every watcher starts over"
        ),
    }
    if already {
        return Ok((store, recovered));
    }
    let recovered = recover_store(dir.path(), config.history(), dir.store_id())
        .context("recovery under the new store id")?;
    Ok(recovered)
}

/// Without `JOURNAL_HEAD` (removed, as its damage's refusal allows, or lost) recovery cannot
/// tell a journal whose end was cut or removed from a whole one, and would reuse the lost
/// revisions under the same id: the store gets a new id first, so watchers start over.
/// Whether it did.
fn renew_id_if_head_lost(dir: &mut DataDir) -> anyhow::Result<bool> {
    if !journal::head::lost(dir.path())? {
        return Ok(false);
    }
    let old_id = dir.store_id().to_owned();
    let new_id = dir.renew_store_id()?.to_owned();
    tracing::warn!(
        old_store_id = %old_id,
        new_store_id = %new_id,
        "JOURNAL_HEAD is missing from a data directory this build's journal format wrote (it \
         was removed or lost): whether the journal's end is whole cannot be checked, so the \
         store gets a new id and every watcher starts over"
    );
    Ok(true)
}

/// The operator's word: a new store id first (durably), then the journal cut at `point`.
fn give_up(dir: &mut DataDir, point: &DiscardPoint, first_lost: u64) -> anyhow::Result<()> {
    let old_id = dir.store_id().to_owned();
    let new_id = dir.renew_store_id()?.to_owned();
    let discarded = journal::discard(dir.path(), point)?;
    // No field when nothing was removed: an empty `removed=` read as a value left out (found
    // by a first-user review).
    let removed = (!discarded.removed.is_empty()).then(|| {
        discarded
            .removed
            .iter()
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    });
    tracing::warn!(
        %point,
        first_lost_revision = first_lost,
        cut_segment = discarded.cut.as_ref().map(|(path, _)| path.display().to_string()),
        cut_to_bytes = discarded.cut.as_ref().map(|(_, len)| *len),
        removed,
        old_store_id = %old_id,
        new_store_id = %new_id,
        "gave up the journal from the damage on, as --discard-journal-from asked: revisions \
         from first_lost_revision on are lost, and the store has a new id so every watcher \
         starts over; remove the flag"
    );
    Ok(())
}
