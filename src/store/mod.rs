//! The store: every profile's current state, the recent history of changes, and the revision.
//!
//! Reads (Get, BatchGet, List, a watcher's initial state and history replay) go straight here
//! from any task. Writes come through `Store::commit`, one batch of consecutive revisions at
//! a time, from the sequencer's task (and, before any listener opens, from recovery, which
//! replays through the sequencer's own merge), and through `Store::restore` during recovery.
//! The store does not merge, validate or assign revisions, knows nothing of HTTP or gRPC, and
//! nothing of who watches it: the watch layer sits beside it (the `watch` module), told of each
//! commit by the sequencer.
//!
//! Order of a commit, which readers rely on: the changes are pushed to the history, then the
//! profiles are inserted, then the revision is published. So when a reader sees revision `R`,
//! every change up to `R` is both in the profiles and in the history (unless the history dropped
//! it), and every profile a reader can see has its change in the history ring.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use arcstr::ArcStr;
use tokio::sync::watch;

use crate::profile::{Change, Profile, ProfileKey};

mod profiles;

use profiles::ProfileMap;

/// Handle to the shared state. Cloning it is one reference-count increment; every clone sees
/// the same profiles, history and revision.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    // Random, made with the data directory; tells a wiped store from a continued one.
    store_id: Arc<str>,
    // A sharded set of profiles found by their own keys (`profiles.rs`): point reads from many
    // gRPC tasks at once rarely meet the single writer on the same shard, and a slot is one
    // pointer.
    profiles: ProfileMap,
    // Keys in (client_id, customer_id) order, for paging and initial state. Profiles are never
    // removed, so "the first key after the last one returned" pages stably under writes. An
    // RwLock: the sequencer writes it once per new profile; readers hold it for one short
    // range scan at a time.
    order: RwLock<BTreeSet<ProfileKey>>,
    // The newest changes, oldest first, revisions consecutive. A plain RwLock around a ring
    // buffer: pushes are O(1) and readers copy out a batch of `Arc`s and let go.
    history: RwLock<VecDeque<Arc<Change>>>,
    history_limits: HistoryLimits,
    // What the history holds now, by `change_bytes`; written only under the history's write
    // lock (so relaxed ordering is enough), read for metrics.
    history_bytes: AtomicUsize,
    // The published revision. A watch channel is both the value and the wake-up signal that
    // watchers wait on; it keeps only the latest value, so a slow watcher costs nothing here.
    revision: watch::Sender<u64>,
    // One copy of each account's `client_id`, shared by all its profiles: one `ArcStr` per
    // account instead of one per profile saves its allocation (32 bytes) per profile. Per
    // store, so two stores in one process (tests, replicas) share nothing and it goes with its
    // store. A plain mutex: taken once per new profile (and once per snapshot chunk account
    // change at recovery), never while another lock is held.
    client_ids: Mutex<HashSet<ArcStr>>,
    // Keys of profiles that recovery's replay created and that are not in `order` yet
    // (`commit_replayed`): one bulk build when recovery is done (`order_replayed`) costs a
    // fraction of a B-tree insert each. Empty outside recovery, which nobody reads during.
    replayed_keys: Mutex<Vec<ProfileKey>>,
}

/// How much of the recent history of changes the store keeps: at most `events` changes and
/// at most `bytes` of memory (each change counted with its profile before and after, by
/// [`Profile::memory_bytes`]), the oldest going first. The newest change always stays, so a
/// single change larger than `bytes` is kept until the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most changes kept (`--history-events`).
    pub events: usize,
    /// Most bytes kept (`--history-bytes`).
    pub bytes: usize,
}

impl HistoryLimits {
    /// At most `events` changes, whatever their size.
    pub fn events(events: usize) -> HistoryLimits {
        HistoryLimits {
            events,
            bytes: usize::MAX,
        }
    }
}

/// What a change in the history holds in memory, for [`HistoryLimits::bytes`]
/// ([`Change::memory_bytes`], counted when the change was made).
pub fn change_bytes(change: &Change) -> usize {
    change.memory_bytes()
}

/// About how many keys an async reader examines between yields to its worker's other tasks
/// ([`Store::scan_at_most`], [`AsOfScan::next_turn`]): a fraction of a millisecond of work.
pub const EXAMINE_PER_TURN: usize = 4096;

/// A change revision no longer in history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// The oldest revision the history still holds.
    pub oldest: u64,
}

impl Store {
    /// An empty store at revision 0, identified by `store_id`, that keeps the last
    /// `history_capacity` changes, whatever their size.
    pub fn new(history_capacity: usize, store_id: impl Into<Arc<str>>) -> Self {
        Store::with_history(HistoryLimits::events(history_capacity), store_id)
    }

    /// An empty store at revision 0, identified by `store_id`, that keeps the recent history
    /// within `limits`.
    pub fn with_history(limits: HistoryLimits, store_id: impl Into<Arc<str>>) -> Self {
        let history_limits = HistoryLimits {
            events: limits.events.max(1),
            bytes: limits.bytes,
        };
        Store {
            inner: Arc::new(Inner {
                store_id: store_id.into(),
                profiles: ProfileMap::default(),
                order: RwLock::new(BTreeSet::new()),
                history: RwLock::new(VecDeque::with_capacity(history_limits.events.min(4096))),
                history_limits,
                history_bytes: AtomicUsize::new(0),
                revision: watch::channel(0).0,
                client_ids: Mutex::default(),
                replayed_keys: Mutex::default(),
            }),
        }
    }

    /// The store's id: the same across restarts on one data directory, new for a new one.
    pub fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    /// The store id, shared (an answer that carries it holds a reference, not a copy).
    pub fn shared_store_id(&self) -> Arc<str> {
        Arc::clone(&self.inner.store_id)
    }

    /// The published revision: every change up to it is visible.
    pub fn revision(&self) -> u64 {
        *self.inner.revision.borrow()
    }

    /// A receiver that wakes when the revision moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }

    /// How many profiles the store holds.
    pub fn len(&self) -> usize {
        self.inner.profiles.len()
    }

    /// Whether the store holds no profile.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `key` with its account's shared `client_id` (this store's one copy of that string),
    /// for a profile about to be created here. The set only grows, by the accounts that own a
    /// profile; profiles are never removed, so it never holds more than the store does.
    pub fn shared_key(&self, key: ProfileKey) -> ProfileKey {
        ProfileKey {
            client_id: self.shared_client_id(key.client_id),
            customer_id: key.customer_id,
        }
    }

    fn shared_client_id(&self, client_id: ArcStr) -> ArcStr {
        // A panic elsewhere while holding the lock cannot leave the set half-changed.
        let mut ids = self
            .inner
            .client_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match ids.get(&*client_id) {
            Some(shared) => shared.clone(),
            None => {
                ids.insert(client_id.clone());
                client_id
            }
        }
    }

    /// The current state of one profile.
    pub fn get(&self, key: &ProfileKey) -> Option<Arc<Profile>> {
        self.inner.profiles.get(key)
    }

    /// Up to `limit` profiles after `after` (or from the start of `client_id`'s range, or of
    /// everything), in key order, that `keep` accepts, and where to go on from.
    ///
    /// `next` is the last key examined when keys remain after it: pass it as `after` to
    /// continue. A filtered scan may examine many keys to fill a page.
    ///
    /// Keys are examined in chunks so the order lock is never held while profiles are read.
    pub fn scan(
        &self,
        client_id: Option<&str>,
        after: Option<&ProfileKey>,
        limit: usize,
        keep: impl FnMut(&Profile) -> bool,
    ) -> Scan {
        self.scan_at_most(client_id, after, limit, usize::MAX, keep)
    }

    /// [`Store::scan`] that also stops once it has examined about `examine` keys (a few
    /// hundred more at most), with fewer than `limit` profiles then and `next` set: what an
    /// async caller does between yields, so a filtered scan that matches little does not hold
    /// its tokio worker (and the calls and watch streams queued on it) for the whole range.
    pub fn scan_at_most(
        &self,
        client_id: Option<&str>,
        after: Option<&ProfileKey>,
        limit: usize,
        examine: usize,
        mut keep: impl FnMut(&Profile) -> bool,
    ) -> Scan {
        const CHUNK: usize = 256;
        let mut examined = 0usize;
        let first = ProfileKey::new(client_id.unwrap_or(""), "");
        let mut cursor = match after {
            Some(after) if *after >= first => Bound::Excluded(after.clone()),
            _ => Bound::Included(first),
        };
        let mut profiles = Vec::new();
        loop {
            let keys: Vec<ProfileKey> = {
                let order = self.inner.order.read().expect("order lock poisoned");
                order
                    .range((cursor.clone(), Bound::Unbounded))
                    .take_while(|key| client_id.is_none_or(|id| *key.client_id == *id))
                    .take(CHUNK)
                    .cloned()
                    .collect()
            };
            let exhausted = keys.len() < CHUNK;
            for key in &keys {
                if profiles.len() == limit {
                    // `key` itself is not examined yet, so something remains.
                    let next = profiles
                        .last()
                        .map(|profile: &Arc<Profile>| profile.key.clone());
                    return Scan { profiles, next };
                }
                if let Some(profile) = self.get(key).filter(|profile| keep(profile)) {
                    profiles.push(profile);
                }
            }
            examined += keys.len();
            match keys.last() {
                Some(last) if !exhausted && examined >= examine => {
                    return Scan {
                        profiles,
                        next: Some(last.clone()),
                    };
                }
                Some(last) if !exhausted => cursor = Bound::Excluded(last.clone()),
                _ => {
                    return Scan {
                        profiles,
                        next: None,
                    };
                }
            }
        }
    }

    /// The memory the history holds now, as [`HistoryLimits::bytes`] counts it.
    pub fn history_bytes(&self) -> usize {
        self.inner.history_bytes.load(Ordering::Relaxed)
    }

    /// The oldest revision the history holds; the next revision when it holds none.
    pub fn oldest_in_history(&self) -> u64 {
        let history = self.inner.history.read().expect("history lock poisoned");
        history
            .front()
            .map_or_else(|| self.revision() + 1, |change| change.revision)
    }

    /// Up to `max` changes from revision `from` on, oldest first. Empty when `from` is past
    /// the published revision; `Compacted` when the history no longer holds `from`.
    pub fn history_from(&self, from: u64, max: usize) -> Result<Vec<Arc<Change>>, Compacted> {
        let published = self.revision();
        if from > published {
            return Ok(Vec::new());
        }
        let history = self.inner.history.read().expect("history lock poisoned");
        let oldest = history
            .front()
            .map_or(published + 1, |change| change.revision);
        if from < oldest {
            return Err(Compacted { oldest });
        }
        // Revisions are consecutive, so a revision's place in the ring is an offset. Changes
        // pushed but not yet published are left for the next read.
        let skip = usize::try_from(from - oldest).unwrap_or(usize::MAX);
        let published_count = usize::try_from(published - from + 1).unwrap_or(usize::MAX);
        let take = published_count.min(max);
        Ok(history.iter().skip(skip).take(take).cloned().collect())
    }

    /// Makes a batch of changes visible: history, profiles, then the revision.
    ///
    /// Called by one writer at a time, with consecutive revisions following the published one:
    /// the sequencer's task or a replica's applier (recovery, before either starts, uses
    /// [`Store::commit_replayed`]). History
    /// first, so that a profile anyone can read already has its change in the ring
    /// ([`AsOfScan`] relies on it).
    pub(crate) fn commit(&self, changes: &[Arc<Change>]) {
        let Some(last) = self.push_history(changes) else {
            return;
        };
        for change in changes {
            self.insert(&change.profile);
        }
        self.inner.revision.send_replace(last);
    }

    /// [`Store::commit`] for recovery's replay, before anyone reads: the keys of new profiles
    /// wait for [`Store::order_replayed`] instead of going into the key order one by one.
    pub(crate) fn commit_replayed(&self, changes: &[Arc<Change>]) {
        let Some(last) = self.push_history(changes) else {
            return;
        };
        let mut pending = self
            .inner
            .replayed_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for change in changes {
            if self.inner.profiles.insert(Arc::clone(&change.profile)) {
                pending.push(change.profile.key.clone());
            }
        }
        drop(pending);
        self.inner.revision.send_replace(last);
    }

    /// Puts the keys [`Store::restore_unordered`] and [`Store::commit_replayed`] held back into
    /// the key order: recovery calls it once it has replayed everything, before the store is
    /// read.
    pub(crate) fn order_replayed(&self) {
        let keys = std::mem::take(
            &mut *self
                .inner
                .replayed_keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if keys.is_empty() {
            return;
        }
        let mut order = self.inner.order.write().expect("order lock poisoned");
        // The held-back keys' vector takes the ordered ones (none at start-up): no second
        // vector of a million keys, fresh pages and a copy.
        let mut all = keys;
        all.extend(std::mem::take(&mut *order));
        // `from_iter` sorts (a snapshot's keys are one nearly sorted run, the replayed keys
        // follow), then builds the tree bottom up.
        *order = all.into_iter().collect();
    }

    /// Pushes a batch's changes to the history ring (oldest out first); the batch's last
    /// revision, `None` for an empty batch.
    fn push_history(&self, changes: &[Arc<Change>]) -> Option<u64> {
        let last = changes.last()?.revision;
        debug_assert_eq!(
            changes.first().map(|change| change.revision),
            Some(self.revision() + 1),
            "revisions must follow the published one"
        );
        let mut history = self.inner.history.write().expect("history lock poisoned");
        let limits = self.inner.history_limits;
        let mut bytes = self.inner.history_bytes.load(Ordering::Relaxed);
        for change in changes {
            let cost = change_bytes(change);
            // Oldest first; the newest change always stays.
            while history.len() == limits.events
                || (!history.is_empty() && bytes.saturating_add(cost) > limits.bytes)
            {
                let Some(oldest) = history.pop_front() else {
                    break;
                };
                bytes -= change_bytes(&oldest);
            }
            history.push_back(Arc::clone(change));
            bytes += cost;
        }
        self.inner.history_bytes.store(bytes, Ordering::Relaxed);
        Some(last)
    }

    fn insert(&self, profile: &Arc<Profile>) {
        if self.inner.profiles.insert(Arc::clone(profile)) {
            let mut order = self.inner.order.write().expect("order lock poisoned");
            order.insert(profile.key.clone());
        }
    }

    /// Makes room for `additional` more profiles, so adding them rehashes none of those held:
    /// recovery knows about how many the snapshot and the journal after it will add.
    pub(crate) fn reserve_profiles(&self, additional: usize) {
        self.inner.profiles.reserve(additional);
    }

    /// Loads a recovered state: profiles as of `revision`, in chunks, with an empty history.
    /// Only for a store nobody reads yet (recovery, before the listeners open). Each profile's
    /// key gets its account's shared `client_id`. `expected` is how many profiles the chunks
    /// hold (the snapshot's header says), so the map is sized once rather than grown.
    ///
    /// The profiles go into the map together once all chunks are in, and the key order is
    /// built once at the end from all keys: bulk work over the whole snapshot is several times
    /// cheaper than a million single inserts into either. Profiles in strictly increasing key
    /// order (every snapshot this service writes) are filed without looking for their keys
    /// first; any other order is inserted one by one, a repeated key's last profile kept.
    pub(crate) fn restore(
        &self,
        expected: usize,
        chunks: &mut dyn Iterator<Item = Vec<Profile>>,
        revision: u64,
    ) {
        self.restore_unordered(expected, chunks, revision);
        self.order_replayed();
    }

    /// [`Store::restore`] that leaves the key order to [`Store::order_replayed`], for a
    /// recovery that replays a journal next: the order is then built once, over the snapshot's
    /// keys and the replayed ones together, rather than built for the snapshot and rebuilt (a
    /// tenth of recovery's wall time at a million profiles, on one core).
    pub(crate) fn restore_unordered(
        &self,
        expected: usize,
        chunks: &mut dyn Iterator<Item = Vec<Profile>>,
        revision: u64,
    ) {
        debug_assert_eq!(self.revision(), 0, "restore into a fresh store only");
        self.inner.profiles.reserve(expected);
        let mut keys = std::mem::take(
            &mut *self
                .inner
                .replayed_keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        keys.reserve(expected);
        // Snapshots are in key order, so runs of one account follow each other: the shared
        // copy is looked up once per run, not once per profile.
        let mut account: Option<ArcStr> = None;
        // Each profile with its hash, taken while its key is in cache; inserted all at once
        // below (`insert_distinct`), in an order the map's memory likes.
        let mut loaded = Vec::with_capacity(expected);
        // Keys strictly increasing (as every snapshot this service writes has them) cannot
        // repeat, so nothing need be looked up before inserting into a map that held none.
        let mut distinct = self.inner.profiles.len() == 0;
        let before = keys.len();
        for chunk in chunks {
            keys.reserve(chunk.len());
            loaded.reserve(chunk.len());
            for mut profile in chunk {
                let shared = match &account {
                    Some(shared) if *shared == profile.key.client_id => shared.clone(),
                    _ => self.shared_client_id(profile.key.client_id.clone()),
                };
                profile.key.client_id = shared.clone();
                account = Some(shared);
                distinct &= keys[before..].last().is_none_or(|last| *last < profile.key);
                keys.push(profile.key.clone());
                loaded.push((self.inner.profiles.hash(&profile.key), Arc::new(profile)));
            }
        }
        if distinct {
            self.inner.profiles.insert_distinct(loaded);
        } else {
            // Out of order (not a snapshot of this service's): one at a time, a repeated key's
            // last profile kept, as the map's `insert` does.
            keys.truncate(before);
            for (_, profile) in loaded {
                let key = profile.key.clone();
                if self.inner.profiles.insert(profile) {
                    keys.push(key);
                }
            }
        }
        debug_assert!(
            self.inner
                .order
                .read()
                .expect("order lock poisoned")
                .is_empty(),
            "restore into a fresh store only"
        );
        *self
            .inner
            .replayed_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = keys;
        self.inner.revision.send_replace(revision);
    }

    /// Starts reading profiles of `client_id` (or all) as of the current revision while writes
    /// go on; see [`AsOfScan`].
    pub fn scan_as_of(&self, client_id: Option<Arc<str>>) -> AsOfScan {
        AsOfScan {
            as_of: self.revision(),
            client_id,
            after: None,
            scanned: false,
            newer: HashSet::new(),
        }
    }

    /// Like [`Store::scan_as_of`], as of `as_of`, a revision already published (at most the
    /// current one): a replica snapshots the state its last applied stream sequence left,
    /// which may be a little behind the revision by the time the scan starts.
    pub fn scan_as_of_revision(&self, client_id: Option<Arc<str>>, as_of: u64) -> AsOfScan {
        debug_assert!(as_of <= self.revision(), "only a published revision");
        AsOfScan {
            as_of: as_of.min(self.revision()),
            client_id,
            after: None,
            scanned: false,
            newer: HashSet::new(),
        }
    }

    /// The ring's changes after `after`, pushed whether or not published yet.
    fn history_after(&self, after: u64, max: usize) -> Result<Vec<Arc<Change>>, Compacted> {
        let history = self.inner.history.read().expect("history lock poisoned");
        let Some(oldest) = history.front().map(|change| change.revision) else {
            return Ok(Vec::new());
        };
        if after + 1 < oldest {
            return Err(Compacted { oldest });
        }
        let skip = usize::try_from(after + 1 - oldest).unwrap_or(usize::MAX);
        Ok(history.iter().skip(skip).take(max).cloned().collect())
    }
}

impl Store {
    /// Makes `profiles`, read while writes went on, what they were at `as_of` (read before
    /// them): each read at a later revision becomes its state then (the `previous` of its
    /// first change after `as_of`), and each created after `as_of` is taken out; returns the
    /// keys taken out, one per occurrence. Order kept; nothing done (nor allocated) when none
    /// is newer, as when no write landed during the reads. What a read of many profiles
    /// reports `as_of` for: read as they came, with the revision read after them, a page held
    /// a profile older than the revision it reported, and a client that watched on from there
    /// never got that change (found by an adversarial run).
    pub fn as_of(
        &self,
        profiles: &mut Vec<Arc<Profile>>,
        as_of: u64,
    ) -> Result<Vec<ProfileKey>, Compacted> {
        if profiles.iter().all(|profile| profile.revision <= as_of) {
            return Ok(Vec::new());
        }
        let newer: HashSet<ProfileKey> = (profiles.iter())
            .filter(|profile| profile.revision > as_of)
            .map(|profile| profile.key.clone())
            .collect();
        let then: std::collections::HashMap<_, _> =
            self.states_at(newer, as_of)?.into_iter().collect();
        let mut left_out = Vec::new();
        profiles.retain_mut(|profile| {
            if profile.revision <= as_of {
                return true;
            }
            match then.get(&profile.key).cloned().flatten() {
                Some(previous) => {
                    *profile = previous;
                    true
                }
                None => {
                    left_out.push(profile.key.clone());
                    false
                }
            }
        });
        Ok(left_out)
    }

    /// The state at `as_of` of each of `keys`, each read at a later revision (so each has a
    /// change after `as_of` in the ring, pushed before it was readable: `commit`): the
    /// `previous` of its first change after `as_of`, `None` for one created after it. In the
    /// order of those changes. What [`Store::as_of`] and [`AsOfScan::resolve_newer`] share.
    fn states_at(
        &self,
        mut keys: HashSet<ProfileKey>,
        as_of: u64,
    ) -> Result<Vec<StateThen>, Compacted> {
        let mut states = Vec::with_capacity(keys.len());
        let mut after = as_of;
        while !keys.is_empty() {
            let changes = self.history_after(after, 1024)?;
            let Some(last) = changes.last() else {
                // Cannot happen while commits push history first; if it did, starting over
                // (as after a compaction) is the safe answer.
                return Err(Compacted { oldest: as_of + 1 });
            };
            after = last.revision;
            for change in changes {
                if let Some(key) = keys.take(&change.profile.key) {
                    states.push((key, change.previous.clone()));
                }
            }
        }
        Ok(states)
    }
}

/// A profile's key and its state at a past revision (`None`: it did not exist yet).
type StateThen = (ProfileKey, Option<Arc<Profile>>);

/// A read of many profiles as of one revision `as_of`, taken while writes go on.
///
/// Chunks come in key order. A profile read at a revision above `as_of` is held back; once the
/// scan is done, [`AsOfScan::resolve_newer`] gives each such profile's state at `as_of` (the
/// `previous` of its first change after `as_of`, from the history), leaving out profiles
/// created after `as_of`. Used by watch initial states and snapshots.
pub struct AsOfScan {
    /// The revision the state is read as of.
    pub as_of: u64,
    client_id: Option<Arc<str>>,
    after: Option<ProfileKey>,
    scanned: bool,
    newer: HashSet<ProfileKey>,
}

impl AsOfScan {
    /// The next chunk of profiles at `as_of` that `keep` accepts; empty once the scan is done.
    pub fn next_chunk(
        &mut self,
        store: &Store,
        chunk: usize,
        mut keep: impl FnMut(&Profile) -> bool,
    ) -> Vec<Arc<Profile>> {
        loop {
            let found = self.next_turn(store, chunk, usize::MAX, &mut keep);
            if !found.is_empty() || self.scanned {
                return found;
            }
        }
    }

    /// One turn of the scan: up to `chunk` profiles at `as_of` that `keep` accepts, examining
    /// about `examine` keys at most. May come back empty before the scan is done
    /// ([`AsOfScan::done`] says when it is), so an async caller can yield between turns.
    pub fn next_turn(
        &mut self,
        store: &Store,
        chunk: usize,
        examine: usize,
        keep: impl FnMut(&Profile) -> bool,
    ) -> Vec<Arc<Profile>> {
        if self.scanned {
            return Vec::new();
        }
        let client_id = self.client_id.as_deref();
        let scan = store.scan_at_most(client_id, self.after.as_ref(), chunk, examine, keep);
        self.scanned = scan.next.is_none();
        self.after = scan.next;
        let (current, newer): (Vec<_>, Vec<_>) = scan
            .profiles
            .into_iter()
            .partition(|profile| profile.revision <= self.as_of);
        self.newer
            .extend(newer.into_iter().map(|profile| profile.key.clone()));
        current
    }

    /// Whether every key has been examined.
    pub fn done(&self) -> bool {
        self.scanned
    }

    /// After the scan: the state at `as_of` of every profile that was read newer than that.
    pub fn resolve_newer(&mut self, store: &Store) -> Result<Vec<Arc<Profile>>, Compacted> {
        debug_assert!(self.scanned, "resolve after the scan");
        let states = store.states_at(std::mem::take(&mut self.newer), self.as_of)?;
        Ok(states.into_iter().filter_map(|(_, then)| then).collect())
    }
}

/// One page of a [`Store::scan`].
pub struct Scan {
    /// The profiles found, in key order.
    pub profiles: Vec<Arc<Profile>>,
    /// Where to continue (the last key examined), when keys remain after it.
    pub next: Option<ProfileKey>,
}

#[cfg(test)]
mod tests;
