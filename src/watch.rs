//! Watch subscriptions: which changes a subscriber wants, and the task that feeds it.
//!
//! A subscriber owns a cursor (the next revision it has to look at) and reads the store's
//! history from there at its own pace, into a small bounded channel. No change is queued per
//! subscriber beyond that channel (a routed feed's mailbox, below, holds revision numbers),
//! and the writer never waits for a subscriber: a subscriber that does not read just stops
//! advancing its cursor. When it reads again it catches up from the history, or, if the
//! history has moved past a change it still has to send, gets a `Reset` and the full initial
//! state again.
//!
//! Feeds that name customers (`customer_ids`) are routed: at commit the store hands each
//! change to the [`Router`], which looks its customer up once in an index of such feeds and
//! queues the revision in the mailbox of each feed that wants it, waking only those. A routed
//! feed reads exactly those revisions from the history, so a change costs one lookup plus the
//! matching feeds, not every feed. Every other feed (all customers, of one account or all)
//! wakes on every published revision and reads the history from its cursor. A mailbox holds at
//! most [`MAILBOX_CAPACITY`] revisions (numbers, not changes): when it fills, the router stops
//! queueing for that feed and notes the first revision it skipped, and the feed reads the
//! history from there, as an unrouted feed would. Routing never decides whether a change is
//! sent; the history is still the only copy of the changes.
//!
//! This module produces domain events ([`WatchEvent`]); turning them into gRPC messages and
//! statuses is the adapter's job.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::profile::{Change, Field, FieldPath, Profile, ProfileKey};
use crate::store::{Compacted, Store};

/// How many history entries or profiles a subscriber takes per read.
const READ_BATCH: usize = 256;

/// Most revisions queued for one routed feed; past that it reads the history instead.
pub const MAILBOX_CAPACITY: usize = 256;

/// Which changes a subscriber wants, and from where.
#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    /// Only this account; `None` = all accounts.
    pub client_id: Option<Arc<str>>,
    /// Only these customers; empty = all.
    pub customer_ids: HashSet<Arc<str>>,
    /// Only changes touching one of these; empty = all changes.
    pub fields: Vec<FieldSelector>,
    /// First revision wanted from history; 0 = start now.
    pub start_revision: u64,
    /// With `start_revision` 0: send every matching profile first.
    pub send_initial_state: bool,
    /// Send `Progress` after this long without sending anything.
    pub progress_interval: Duration,
    /// Fail instead of resetting when the history no longer covers the cursor.
    pub fail_if_compacted: bool,
    /// The store `start_revision` belongs to, if the subscriber said: another store's
    /// revisions mean nothing here, so a different id resets (or fails).
    pub store_id: Option<Arc<str>>,
}

/// One entry of a `fields` filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldSelector {
    /// One modeled field or one extra key.
    Path(FieldPath),
    /// Any extra key (`extra`).
    AnyExtra,
}

impl FieldSelector {
    /// Parses a field name as the API spells it: `tier_name`, `extra.<key>`, or `extra`.
    pub fn parse(name: &str) -> Result<FieldSelector, String> {
        if name == "extra" {
            return Ok(FieldSelector::AnyExtra);
        }
        if let Some(key) = name.strip_prefix("extra.") {
            if key.is_empty() {
                return Err("`extra.` needs a key after the dot".into());
            }
            return Ok(FieldSelector::Path(FieldPath::Extra(key.into())));
        }
        Field::from_name(name)
            .map(|field| FieldSelector::Path(FieldPath::Field(field)))
            .ok_or_else(|| {
                let names: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
                format!(
                    "unknown field {name:?}; expected one of {}, extra or extra.<key>",
                    names.join(", ")
                )
            })
    }

    fn matches(&self, change: &Change) -> bool {
        match self {
            FieldSelector::Path(path) => change.touches(path),
            FieldSelector::AnyExtra => change.touches_any_extra(),
        }
    }
}

impl WatchSpec {
    fn wants_profile(&self, key: &ProfileKey) -> bool {
        self.client_id
            .as_ref()
            .is_none_or(|client| *client == key.client_id)
            && (self.customer_ids.is_empty() || self.customer_ids.contains(&key.customer_id))
    }

    fn wants_change(&self, change: &Change) -> bool {
        self.wants_profile(&change.profile.key) && self.wants_fields(change)
    }

    fn wants_fields(&self, change: &Change) -> bool {
        self.fields.is_empty() || self.fields.iter().any(|field| field.matches(change))
    }

    /// Whether the [`Router`] feeds this subscription: only when it names customers, so that
    /// the index has a key to file it under.
    fn is_routed(&self) -> bool {
        !self.customer_ids.is_empty()
    }
}

/// The index of routed feeds by customer id, consulted once per committed change.
///
/// Owned by the store, which calls [`Router::route`] from `commit` after publishing the
/// revision; feeds register when they go live and unregister when they end. The index is
/// behind an `RwLock`: the single writer reads it once per commit batch, and only feeds
/// opening or closing write it.
#[derive(Default)]
pub(crate) struct Router {
    index: RwLock<HashMap<Arc<str>, Vec<Arc<Mailbox>>>>,
    /// The last revision routed: every routed change up to it is in its feeds' mailboxes.
    routed: AtomicU64,
}

impl Router {
    /// Queues each change's revision for the routed feeds that want it and wakes them. Called
    /// by the store's single writer, in revision order, after the revision is published.
    pub(crate) fn route(&self, changes: &[Arc<Change>]) {
        let Some(last) = changes.last().map(|change| change.revision) else {
            return;
        };
        let index = self.index.read().expect("router lock poisoned");
        if !index.is_empty() {
            for change in changes {
                let Some(mailboxes) = index.get(&*change.profile.key.customer_id) else {
                    continue;
                };
                for mailbox in mailboxes {
                    let spec = &mailbox.spec;
                    let client_matches = spec
                        .client_id
                        .as_ref()
                        .is_none_or(|client| *client == change.profile.key.client_id);
                    if client_matches && spec.wants_fields(change) {
                        mailbox.push(change.revision);
                    }
                }
            }
        }
        // Still under the read lock: a feed registering meanwhile either is in the index for
        // these changes or sees this revision as already routed.
        self.routed.store(last, Ordering::Release);
    }

    /// Files a feed under each of its customer ids.
    fn register(&self, spec: Arc<WatchSpec>) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox {
            spec,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        });
        let mut index = self.index.write().expect("router lock poisoned");
        for customer_id in &mailbox.spec.customer_ids {
            index
                .entry(Arc::clone(customer_id))
                .or_default()
                .push(Arc::clone(&mailbox));
        }
        mailbox
    }

    fn unregister(&self, mailbox: &Arc<Mailbox>) {
        let mut index = self.index.write().expect("router lock poisoned");
        for customer_id in &mailbox.spec.customer_ids {
            if let Some(mailboxes) = index.get_mut(&**customer_id) {
                mailboxes.retain(|other| !Arc::ptr_eq(other, mailbox));
                if mailboxes.is_empty() {
                    index.remove(&**customer_id);
                }
            }
        }
    }

    /// How many customer ids have at least one routed feed (for tests).
    #[cfg(test)]
    fn indexed_customers(&self) -> usize {
        self.index.read().expect("router lock poisoned").len()
    }
}

/// Where the router leaves a routed feed's revisions.
struct Mailbox {
    spec: Arc<WatchSpec>,
    // A plain mutex: the writer holds it for one push, the feed for one take.
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    /// Revisions to send, ascending.
    revisions: Vec<u64>,
    /// The queue was full: from this revision on, nothing was queued.
    overflow_from: Option<u64>,
}

/// What a feed takes from its mailbox at once.
struct Taken {
    /// Every routed change up to here was queued (or skipped past `overflow_from`).
    routed: u64,
    revisions: Vec<u64>,
    overflow_from: Option<u64>,
}

impl Mailbox {
    fn push(&self, revision: u64) {
        {
            let mut queue = self.queue.lock().expect("mailbox lock poisoned");
            if queue.overflow_from.is_none() {
                if queue.revisions.len() < MAILBOX_CAPACITY {
                    queue.revisions.push(revision);
                } else {
                    queue.overflow_from = Some(revision);
                }
            }
        }
        // Stores a permit when the feed is not waiting, so a push between its take and its
        // wait is not lost.
        self.wake.notify_one();
    }

    fn take(&self, router: &Router) -> Taken {
        // The routed revision first: every push up to it happened before it was stored, so the
        // queue taken below holds them all.
        let routed = router.routed.load(Ordering::Acquire);
        let mut queue = self.queue.lock().expect("mailbox lock poisoned");
        Taken {
            routed,
            revisions: std::mem::take(&mut queue.revisions),
            overflow_from: queue.overflow_from.take(),
        }
    }
}

/// A feed's place in the router; leaves the index when dropped, however the feed ends.
struct Registration {
    store: Store,
    mailbox: Arc<Mailbox>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.store.router().unregister(&self.mailbox);
    }
}

/// What a subscriber receives.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// A profile as part of the initial state.
    Existing(Arc<Profile>),
    /// A change, in revision order.
    Change(Arc<Change>),
    /// Everything up to `revision` has been sent; what follows is live.
    Synced {
        /// The revision the subscriber is in sync with.
        revision: u64,
    },
    /// Heartbeat: every matching change up to `revision` has been sent.
    Progress {
        /// The revision the subscriber has seen up to.
        revision: u64,
    },
    /// The subscriber's position is gone; a full initial state and `Synced` follow.
    Reset {
        /// Which situation.
        kind: ResetKind,
        /// Why, in words.
        reason: String,
        /// The oldest revision the history still holds.
        revision: u64,
    },
    /// The stream ends with this error (shutdown, or compaction with `fail_if_compacted`).
    End(Error),
}

/// Why a subscriber was reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    /// It asked to start from a revision the history no longer holds.
    CompactedStart,
    /// It read too slowly and the history moved past it.
    FellBehind,
    /// The history moved on while its initial state was being sent.
    InitialState,
    /// It resumed revisions of another store id (the store was replaced or cut back).
    StoreChanged,
}

impl ResetKind {
    /// A short, fixed name (metrics label).
    pub fn label(self) -> &'static str {
        match self {
            ResetKind::CompactedStart => "compacted_start",
            ResetKind::FellBehind => "fell_behind",
            ResetKind::InitialState => "initial_state",
            ResetKind::StoreChanged => "store_changed",
        }
    }
}

/// Where a subscription starts, decided when it is opened.
#[derive(Debug)]
enum Start {
    /// Live changes after `synced`.
    Live { synced: u64 },
    /// Initial state, then live.
    InitialState,
    /// History from `from`; `Synced` once `synced` has been passed.
    Replay { from: u64, synced: u64 },
    /// The requested position is gone: reset, then initial state.
    Reset {
        kind: ResetKind,
        reason: String,
        oldest: u64,
    },
}

/// An opened subscription, ready to run.
pub struct Watch {
    spec: WatchSpec,
    store: Store,
    start: Start,
}

/// The subscriber is gone or the server is stopping: stop producing.
struct Stop;

impl Watch {
    /// Checks the request against the store and pins its starting point. Errors here fail the
    /// call before any stream starts.
    pub fn open(store: &Store, spec: WatchSpec) -> Result<Watch, Error> {
        let current = store.revision();
        let next = current + 1;
        // Resuming another store's revisions: they mean something else here.
        let other_store = spec
            .store_id
            .as_deref()
            .filter(|id| spec.start_revision > 0 && *id != store.store_id());
        let start = match spec.start_revision {
            _ if other_store.is_some() => {
                let requested = other_store.unwrap_or_default().to_owned();
                if spec.fail_if_compacted {
                    return Err(Error::StoreChanged {
                        requested,
                        current: store.store_id().to_owned(),
                    });
                }
                Start::Reset {
                    kind: ResetKind::StoreChanged,
                    reason: format!(
                        "store_id {requested} is not this server's store {}: the revisions it \
                         knows mean something else here",
                        store.store_id()
                    ),
                    oldest: store.oldest_in_history(),
                }
            }
            0 if spec.send_initial_state => Start::InitialState,
            0 => Start::Live { synced: current },
            requested if requested > next => {
                return Err(Error::RevisionInFuture { requested, next });
            }
            requested => {
                let oldest = store.oldest_in_history();
                if requested >= oldest {
                    Start::Replay {
                        from: requested,
                        synced: current,
                    }
                } else if spec.fail_if_compacted {
                    return Err(Error::Compacted { requested, oldest });
                } else {
                    Start::Reset {
                        kind: ResetKind::CompactedStart,
                        reason: format!(
                            "start_revision {requested} is older than the oldest revision in \
                             history {oldest}"
                        ),
                        oldest,
                    }
                }
            }
        };
        Ok(Watch {
            spec,
            store: store.clone(),
            start,
        })
    }

    /// Feeds the subscriber until it goes away or `shutdown` fires; on shutdown the last event
    /// is an `End` naming the revision to resume from.
    pub async fn run(self, events: mpsc::Sender<WatchEvent>, shutdown: CancellationToken) {
        let mut feed = Feed {
            spec: Arc::new(self.spec),
            store: self.store,
            events,
            shutdown,
            last_sent: Instant::now(),
        };
        let mut cursor = 0;
        if let Err(Stop) = feed.run(self.start, &mut cursor).await
            && feed.shutdown.is_cancelled()
        {
            // A last resume point, then the end. Best effort: a subscriber whose channel is
            // full is not waited for, and its status still names the revision.
            if cursor > 0 {
                let revision = cursor - 1;
                let _ = feed.events.try_send(WatchEvent::Progress { revision });
            }
            let reason = format!("server shutting down; resume from revision {cursor}");
            let _ = feed
                .events
                .try_send(WatchEvent::End(Error::Unavailable { reason }));
        }
    }
}

/// The running side of a subscription.
struct Feed {
    spec: Arc<WatchSpec>,
    store: Store,
    events: mpsc::Sender<WatchEvent>,
    shutdown: CancellationToken,
    last_sent: Instant,
}

impl Feed {
    /// The subscription's life; `cursor` is kept current (the next revision to look at) so
    /// that a stop can say where to resume.
    async fn run(&mut self, start: Start, cursor: &mut u64) -> Result<(), Stop> {
        // A routed feed is in the index from its first event on: every change routed after
        // this point reaches its mailbox. It still reads the history below until it has
        // caught up with the published revision, and only then follows its mailbox.
        let registration = self.spec.is_routed().then(|| Registration {
            store: self.store.clone(),
            mailbox: self.store.router().register(Arc::clone(&self.spec)),
        });
        let mut synced_at = None;
        match start {
            Start::Live { synced } => {
                *cursor = synced + 1;
                self.send(WatchEvent::Synced { revision: synced }).await?;
            }
            Start::InitialState => *cursor = self.initial_state().await?,
            Start::Replay { from, synced } => {
                *cursor = from;
                synced_at = Some(synced);
            }
            Start::Reset {
                kind,
                reason,
                oldest,
            } => {
                *cursor = oldest;
                self.send(WatchEvent::Reset {
                    kind,
                    reason,
                    revision: oldest,
                })
                .await?;
                *cursor = self.initial_state().await?;
            }
        }
        let mut revisions = self.store.subscribe();
        loop {
            if let Some(synced) = synced_at.filter(|synced| *cursor > *synced) {
                synced_at = None;
                self.send(WatchEvent::Synced { revision: synced }).await?;
            }
            // Mark the current revision seen before reading, so a commit that lands after the
            // read still wakes the wait below.
            revisions.borrow_and_update();
            match self.store.history_from(*cursor, READ_BATCH) {
                Ok(changes) if changes.is_empty() => match &registration {
                    // Caught up with the published revision, and every later change is
                    // routed: follow the mailbox until the history has to be read again.
                    Some(registration) => {
                        let mailbox = Arc::clone(&registration.mailbox);
                        self.follow(&mailbox, cursor).await?;
                    }
                    None => self.wait_for_changes(&mut revisions, *cursor - 1).await?,
                },
                Ok(changes) => {
                    for change in changes {
                        let revision = change.revision;
                        if self.spec.wants_change(&change) {
                            self.send(WatchEvent::Change(change)).await?;
                        }
                        *cursor = revision + 1;
                        if synced_at == Some(revision) {
                            synced_at = None;
                            self.send(WatchEvent::Synced { revision }).await?;
                        }
                    }
                }
                Err(Compacted { oldest }) if self.spec.fail_if_compacted => {
                    let error = Error::Compacted {
                        requested: *cursor,
                        oldest,
                    };
                    self.send(WatchEvent::End(error)).await?;
                    return Ok(());
                }
                Err(Compacted { oldest }) => {
                    let reason = format!(
                        "subscriber fell behind the history: revision {} is gone, the oldest \
                         available is {oldest}",
                        *cursor
                    );
                    self.send(WatchEvent::Reset {
                        kind: ResetKind::FellBehind,
                        reason,
                        revision: oldest,
                    })
                    .await?;
                    synced_at = None;
                    *cursor = self.initial_state().await?;
                }
            }
        }
    }

    /// Sends every matching profile as of one revision `R`, then `Synced{R}`; returns `R + 1`.
    ///
    /// Profiles are read while writes go on ([`crate::store::AsOfScan`]). If the history drops
    /// the changes needed to read them as of `R` meanwhile, the subscriber gets a `Reset` and
    /// the initial state starts over.
    async fn initial_state(&mut self) -> Result<u64, Stop> {
        loop {
            let mut scan = self.store.scan_as_of(self.spec.client_id.clone());
            loop {
                let spec = &self.spec;
                let chunk = scan.next_chunk(&self.store, READ_BATCH, |profile| {
                    spec.wants_profile(&profile.key)
                });
                if chunk.is_empty() {
                    break;
                }
                for profile in chunk {
                    self.send(WatchEvent::Existing(profile)).await?;
                }
            }
            match scan.resolve_newer(&self.store) {
                Ok(profiles) => {
                    for profile in profiles {
                        self.send(WatchEvent::Existing(profile)).await?;
                    }
                    self.send(WatchEvent::Synced {
                        revision: scan.as_of,
                    })
                    .await?;
                    return Ok(scan.as_of + 1);
                }
                Err(Compacted { oldest }) => {
                    let reason = "the history moved on while the initial state was sent";
                    self.send(WatchEvent::Reset {
                        kind: ResetKind::InitialState,
                        reason: reason.into(),
                        revision: oldest,
                    })
                    .await?;
                }
            }
        }
    }

    /// A routed feed that has caught up: sends the changes its mailbox names, in order.
    ///
    /// Returns when the history has to be read from `cursor` again: the mailbox overflowed
    /// (`cursor` is where queueing stopped) or a revision it names is no longer in the
    /// history (`cursor` is that revision, so the read reports the compaction). Changes
    /// below `cursor` in the mailbox were already read from the history and are skipped.
    /// Whenever the mailbox is empty, everything up to the routed revision has been seen, so
    /// `cursor` moves past it: `Progress` and the resume point on shutdown name it even when
    /// no change of this feed's customers came.
    async fn follow(&mut self, mailbox: &Mailbox, cursor: &mut u64) -> Result<(), Stop> {
        loop {
            let taken = mailbox.take(self.store.router());
            let pending: Vec<u64> = taken
                .revisions
                .iter()
                .copied()
                .filter(|revision| *revision >= *cursor)
                .collect();
            for (first, count) in runs(&pending) {
                let changes = match self.store.history_from(first, count) {
                    Ok(changes) if changes.len() == count => changes,
                    // Gone from the history (or, which cannot happen, not published): the
                    // history read at `first` decides, as for any feed.
                    _ => {
                        *cursor = first;
                        return Ok(());
                    }
                };
                for change in changes {
                    let revision = change.revision;
                    self.send(WatchEvent::Change(change)).await?;
                    *cursor = revision + 1;
                }
            }
            if let Some(from) = taken.overflow_from {
                *cursor = (*cursor).max(from);
                return Ok(());
            }
            *cursor = (*cursor).max(taken.routed + 1);
            if !pending.is_empty() {
                continue;
            }
            let heartbeat = self.last_sent + self.spec.progress_interval;
            if Instant::now() >= heartbeat {
                self.send(WatchEvent::Progress {
                    revision: *cursor - 1,
                })
                .await?;
                continue;
            }
            tokio::select! {
                () = mailbox.wake.notified() => {}
                // The loop takes what came meanwhile, then sends the heartbeat.
                () = tokio::time::sleep_until(heartbeat) => {}
                () = self.shutdown.cancelled() => {
                    self.advance_idle(mailbox, cursor);
                    return Err(Stop);
                }
                // A subscriber that hung up while nothing was happening.
                () = self.events.closed() => return Err(Stop),
            }
        }
    }

    /// Moves an idle routed feed's cursor past the routed revision, for its last resume point.
    fn advance_idle(&self, mailbox: &Mailbox, cursor: &mut u64) {
        let taken = mailbox.take(self.store.router());
        if taken.revisions.iter().all(|r| *r < *cursor) && taken.overflow_from.is_none() {
            *cursor = (*cursor).max(taken.routed + 1);
        }
    }

    /// Waits for a new revision; sends `Progress{seen}` whenever the interval passes with
    /// nothing sent.
    async fn wait_for_changes(
        &mut self,
        revisions: &mut tokio::sync::watch::Receiver<u64>,
        seen: u64,
    ) -> Result<(), Stop> {
        loop {
            let heartbeat = self.last_sent + self.spec.progress_interval;
            tokio::select! {
                changed = revisions.changed() => {
                    // The store never drops its sender while a subscriber holds it.
                    return changed.map_err(|_| Stop);
                }
                () = tokio::time::sleep_until(heartbeat) => {
                    self.send(WatchEvent::Progress { revision: seen }).await?;
                }
                () = self.shutdown.cancelled() => return Err(Stop),
                // A subscriber that hung up while nothing was happening.
                () = self.events.closed() => return Err(Stop),
            }
        }
    }

    /// Sends one event, waiting while the subscriber's channel is full.
    async fn send(&mut self, event: WatchEvent) -> Result<(), Stop> {
        tokio::select! {
            sent = self.events.send(event) => sent.map_err(|_| Stop)?,
            () = self.shutdown.cancelled() => return Err(Stop),
        }
        self.last_sent = Instant::now();
        Ok(())
    }
}

/// Ascending revisions as runs of consecutive ones: `(first, count)`.
fn runs(revisions: &[u64]) -> Vec<(u64, usize)> {
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for &revision in revisions {
        match runs.last_mut() {
            Some((first, count)) if *first + *count as u64 == revision => *count += 1,
            _ => runs.push((revision, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{ProfileUpdate, Scalar};
    use crate::sequencer::Sequencer;
    use tokio_util::task::TaskTracker;

    /// A store keeping `history` changes, and the sequencer that writes it (on the tracker).
    fn store_with_sequencer(history: usize) -> (Store, TaskTracker, Sequencer) {
        let store = Store::new(history, "test");
        let tracker = TaskTracker::new();
        let sequencer = Sequencer::start(
            store.clone(),
            None,
            crate::metrics::Metrics::new(),
            &tracker,
        );
        (store, tracker, sequencer)
    }

    fn points(customer: &str, second: i64, total: i64) -> ProfileUpdate {
        ProfileUpdate {
            key: ProfileKey::new("2155", customer),
            at: chrono::DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap(),
            fields: vec![
                (Field::GbCustomerId, Some(Scalar::Int(1))),
                (Field::TotalPoints, Some(Scalar::Int(total))),
            ],
            extras: vec![],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn progress_is_sent_after_an_interval_without_other_events() {
        let (store, tracker, sequencer) = store_with_sequencer(10);
        let interval = Duration::from_secs(5);
        let spec = WatchSpec {
            progress_interval: interval,
            ..WatchSpec::default()
        };
        let watch = Watch::open(&store, spec).unwrap();
        let (events, mut received) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        tracker.spawn(watch.run(events, shutdown.clone()));

        let started = Instant::now();
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Synced { revision: 0 })
        ));
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Progress { revision: 0 })
        ));
        assert_eq!(started.elapsed(), interval);

        // A change restarts the interval; the next heartbeat names the revision seen.
        tokio::time::advance(Duration::from_secs(2)).await;
        sequencer.apply(points("a", 1, 10)).await.unwrap();
        let changed_at = Instant::now();
        assert!(
            matches!(received.recv().await, Some(WatchEvent::Change(change)) if change.revision == 1)
        );
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Progress { revision: 1 })
        ));
        assert_eq!(changed_at.elapsed(), interval);

        shutdown.cancel();
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Progress { revision: 1 })
        ));
        match received.recv().await {
            Some(WatchEvent::End(Error::Unavailable { reason })) => {
                assert!(reason.contains("resume from revision 2"), "{reason}");
            }
            other => panic!("expected the shutdown end, got {other:?}"),
        }
        assert!(received.recv().await.is_none(), "nothing after the end");
        drop(sequencer);
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn initial_state_is_as_of_one_revision_while_writes_land_during_the_scan() {
        let (store, tracker, sequencer) = store_with_sequencer(1000);
        for n in 0..300 {
            sequencer
                .apply(points(&format!("c{n:03}"), 1, n))
                .await
                .unwrap();
        }
        let spec = WatchSpec {
            send_initial_state: true,
            progress_interval: Duration::from_secs(3600),
            ..WatchSpec::default()
        };
        let watch = Watch::open(&store, spec).unwrap();
        // A one-slot channel holds the feed back: it has read only the first chunk of keys
        // when the first profile arrives here.
        let (events, mut received) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        tracker.spawn(watch.run(events, shutdown.clone()));
        let first = received.recv().await;
        assert!(matches!(&first, Some(WatchEvent::Existing(p)) if p.revision == 1));

        // Writes the scan has not reached yet: updates of late keys and brand new profiles.
        for n in 280..290 {
            sequencer
                .apply(points(&format!("c{n:03}"), 2, 1000 + n))
                .await
                .unwrap();
        }
        for n in 0..5 {
            sequencer
                .apply(points(&format!("d{n}"), 2, n))
                .await
                .unwrap();
        }

        let mut existing = vec![];
        let synced = loop {
            match received.recv().await {
                Some(WatchEvent::Existing(profile)) => existing.push(profile),
                Some(WatchEvent::Synced { revision }) => break revision,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(
            synced, 300,
            "the state is as of the revision when the watch began"
        );
        assert_eq!(
            existing.len(),
            299,
            "every profile of revision 300 once, but the first"
        );
        for profile in &existing {
            let n: i64 = profile.key.customer_id[1..].parse().unwrap();
            assert_eq!(
                profile.get_int(Field::TotalPoints),
                Some(n),
                "{profile:?} is as of 300"
            );
            assert!(profile.revision <= 300);
        }
        for revision in 301..=315 {
            match received.recv().await {
                Some(WatchEvent::Change(change)) => assert_eq!(change.revision, revision),
                other => panic!("expected change {revision}, got {other:?}"),
            }
        }
        shutdown.cancel();
        drop(sequencer);
        tracker.close();
        tracker.wait().await;
    }

    fn tier(customer: &str, second: i64, name: &str) -> ProfileUpdate {
        ProfileUpdate {
            key: ProfileKey::new("2155", customer),
            at: chrono::DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap(),
            fields: vec![
                (Field::GbCustomerId, Some(Scalar::Int(1))),
                (Field::TierName, Some(Scalar::Text(name.into()))),
            ],
            extras: vec![],
        }
    }

    fn customers(ids: &[&str]) -> HashSet<Arc<str>> {
        ids.iter().map(|id| Arc::from(*id)).collect()
    }

    /// Runs a feed on its own task; the handle ends when the feed does.
    fn spawn_feed(
        store: &Store,
        spec: WatchSpec,
        capacity: usize,
        shutdown: &CancellationToken,
    ) -> (mpsc::Receiver<WatchEvent>, tokio::task::JoinHandle<()>) {
        let watch = Watch::open(store, spec).unwrap();
        let (events, received) = mpsc::channel(capacity);
        let task = tokio::spawn(watch.run(events, shutdown.clone()));
        (received, task)
    }

    /// What one feed received, in order, until its stream ended.
    #[derive(Debug, Default)]
    struct Received {
        synced: Vec<u64>,
        changes: Vec<u64>,
        progress: Vec<u64>,
        resets: usize,
        end: Option<String>,
    }

    /// Collects a feed's events until its stream ends; `latest` follows the `Synced` revision
    /// and the last change.
    async fn collect(
        mut received: mpsc::Receiver<WatchEvent>,
        latest: tokio::sync::watch::Sender<(Option<u64>, u64)>,
    ) -> Received {
        let mut all = Received::default();
        while let Some(event) = received.recv().await {
            match event {
                WatchEvent::Synced { revision } => {
                    all.synced.push(revision);
                    latest.send_modify(|(synced, _)| *synced = Some(revision));
                }
                WatchEvent::Change(change) => {
                    all.changes.push(change.revision);
                    latest.send_modify(|(_, last)| *last = change.revision);
                }
                WatchEvent::Progress { revision } => all.progress.push(revision),
                WatchEvent::Reset { .. } => all.resets += 1,
                WatchEvent::End(error) => all.end = Some(error.to_string()),
                WatchEvent::Existing(_) => {}
            }
        }
        all
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routed_feeds_get_every_matching_change_and_no_other_while_feeds_come_and_go() {
        const WRITERS: u64 = 4;
        const PER_WRITER: u64 = 600;
        let (store, tracker, sequencer) = store_with_sequencer(100_000);
        // Writers commit concurrently (so batches hold several changes), each to its own 5 of
        // 20 customers with rising times, so every update is a change: every third a tier
        // change, the others points.
        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let sequencer = sequencer.clone();
            writers.push(tokio::spawn(async move {
                for n in 0..PER_WRITER {
                    let i = writer * PER_WRITER + n;
                    let customer = format!("c{}", writer * 5 + n % 5);
                    let second = i64::try_from(i).unwrap() + 1;
                    let update = if i.is_multiple_of(3) {
                        tier(&customer, second, &format!("t{i}"))
                    } else {
                        points(&customer, second, second)
                    };
                    sequencer.apply(update).await.unwrap();
                }
            }));
        }

        // While they run, open a feed at every 100 revisions, with varied filters and starts;
        // every third one is dropped once the next one opens.
        let shutdown = CancellationToken::new();
        let mut revisions = store.subscribe();
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for round in 0..16u64 {
            let _ = revisions
                .wait_for(|revision| *revision >= round * 100)
                .await
                .unwrap();
            let ids: Vec<String> = (0..1 + round % 3)
                .map(|k| format!("c{}", (round * 7 + k * 5) % 20))
                .collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let spec = WatchSpec {
                client_id: match round % 4 {
                    0 => None,
                    3 => Some("other".into()),
                    _ => Some("2155".into()),
                },
                customer_ids: customers(&ids),
                fields: if round % 5 == 1 {
                    vec![FieldSelector::Path(FieldPath::Field(Field::TierName))]
                } else {
                    vec![]
                },
                // Some replay from a past revision, through the history then the mailbox.
                start_revision: if round % 2 == 1 { round * 50 + 1 } else { 0 },
                progress_interval: Duration::from_secs(3600),
                ..WatchSpec::default()
            };
            let (received, task) = spawn_feed(&store, spec.clone(), 64, &shutdown);
            if round % 3 == 2 {
                dropped.push((received, task));
            } else {
                let (latest, watch_latest) = tokio::sync::watch::channel((None, 0));
                let collected = tokio::spawn(collect(received, latest));
                kept.push((spec, collected, watch_latest, task));
            }
            if round % 3 == 0
                && let Some((received, task)) = dropped.pop()
            {
                drop(received);
                task.await.unwrap();
            }
        }
        for writer in writers {
            writer.await.unwrap();
        }
        for (received, task) in dropped {
            drop(received);
            task.await.unwrap();
        }
        let last = store.revision();
        assert_eq!(last, WRITERS * PER_WRITER);
        let history = store.history_from(1, usize::MAX).unwrap();
        assert_eq!(history.len() as u64, last);

        // Each feed gets exactly the matching changes from where it started, in order. Wait
        // until each has its last one, then stop them all: each names the end of the
        // history as its resume point, whether or not its last change was the last commit.
        let mut results = Vec::new();
        for (spec, collected, mut latest, task) in kept {
            // A live feed starts after its Synced, a replay at its start revision.
            let synced = latest
                .wait_for(|(synced, _)| synced.is_some())
                .await
                .unwrap()
                .0
                .unwrap_or_default();
            let start = match spec.start_revision {
                0 => synced + 1,
                from => from,
            };
            let wanted: Vec<u64> = history
                .iter()
                .filter(|change| change.revision >= start && spec.wants_change(change))
                .map(|change| change.revision)
                .collect();
            if let Some(&last_wanted) = wanted.last() {
                // Bounded, so a missed change fails the comparison below instead of hanging.
                let arrived = latest.wait_for(|(_, last)| *last >= last_wanted);
                let _ = tokio::time::timeout(Duration::from_secs(20), arrived).await;
            }
            results.push((spec, wanted, collected, task));
        }
        // The dropped feeds left the index; the others (all past their Synced) are in it.
        let still_watched: HashSet<&Arc<str>> = results
            .iter()
            .flat_map(|(spec, ..)| &spec.customer_ids)
            .collect();
        assert_eq!(store.router().indexed_customers(), still_watched.len());
        shutdown.cancel();
        for (spec, wanted, collected, task) in results {
            task.await.unwrap();
            let received = collected.await.unwrap();
            assert_eq!(received.resets, 0, "{spec:?}");
            assert_eq!(received.synced.len(), 1, "{spec:?}: {received:?}");
            assert_eq!(received.changes, wanted, "{spec:?}");
            assert_eq!(received.progress, vec![last], "{spec:?}");
            let end = received.end.unwrap_or_default();
            assert!(
                end.contains(&format!("resume from revision {}", last + 1)),
                "{spec:?}: {end}"
            );
        }
        tracker.close();
        drop(sequencer);
        tracker.wait().await;
        assert_eq!(
            store.router().indexed_customers(),
            0,
            "every feed left the index"
        );
    }

    /// A routed feed that does not read while more than its mailbox holds arrives.
    async fn overflowing_feed(history: usize) -> (Received, u64) {
        let (store, tracker, sequencer) = store_with_sequencer(history);
        let spec = WatchSpec {
            customer_ids: customers(&["a"]),
            progress_interval: Duration::from_secs(3600),
            ..WatchSpec::default()
        };
        let shutdown = CancellationToken::new();
        let (mut received, task) = spawn_feed(&store, spec, 1, &shutdown);
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Synced { revision: 0 })
        ));
        // Far more changes of "a" than the channel and the mailbox hold, with others between.
        let changes = MAILBOX_CAPACITY as i64 * 3;
        for n in 1..=changes {
            sequencer.apply(points("a", n, n)).await.unwrap();
            sequencer.apply(points("b", n, n)).await.unwrap();
        }
        let last = store.revision();
        let (latest, mut watch_latest) = tokio::sync::watch::channel((None, 0));
        let collected = tokio::spawn(collect(received, latest));
        let _ = watch_latest
            .wait_for(|(synced, last_change)| *last_change == last - 1 || synced.is_some())
            .await;
        shutdown.cancel();
        task.await.unwrap();
        drop(sequencer);
        tracker.close();
        tracker.wait().await;
        (collected.await.unwrap(), last)
    }

    #[tokio::test]
    async fn a_routed_feed_that_overflows_its_mailbox_catches_up_from_history() {
        let (received, last) = overflowing_feed(100_000).await;
        let every_change_of_a: Vec<u64> = (1..last).step_by(2).collect();
        assert_eq!(received.changes, every_change_of_a);
        assert_eq!(received.resets, 0);
        assert_eq!(received.progress, vec![last]);
    }

    #[tokio::test]
    async fn a_routed_feed_whose_changes_left_the_history_is_reset() {
        let (received, last) = overflowing_feed(100).await;
        assert_eq!(received.resets, 1, "{received:?}");
        // Changes without a gap up to the reset, then the state as of the end.
        let before_reset = received.changes.len();
        assert!(before_reset > 0 && before_reset < MAILBOX_CAPACITY);
        assert_eq!(
            received.changes,
            (1..last).step_by(2).take(before_reset).collect::<Vec<_>>()
        );
        assert_eq!(received.synced, vec![last]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_routed_feed_without_matching_changes_still_advances_its_resume_point() {
        let (store, tracker, sequencer) = store_with_sequencer(10);
        let interval = Duration::from_secs(5);
        let spec = WatchSpec {
            customer_ids: customers(&["x"]),
            progress_interval: interval,
            ..WatchSpec::default()
        };
        let shutdown = CancellationToken::new();
        let (mut received, task) = spawn_feed(&store, spec, 8, &shutdown);
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Synced { revision: 0 })
        ));
        // More changes than the history holds, none of them of "x": no reset, and the
        // heartbeat names the newest revision.
        for n in 1..=25 {
            sequencer.apply(points("a", n, n)).await.unwrap();
        }
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Progress { revision: 25 })
        ));
        sequencer.apply(points("a", 26, 26)).await.unwrap();
        shutdown.cancel();
        task.await.unwrap();
        let received = collect(received, tokio::sync::watch::channel((None, 0)).0).await;
        assert!(received.changes.is_empty());
        assert_eq!(received.resets, 0);
        assert_eq!(
            received.progress,
            vec![26],
            "the last resume point is current"
        );
        let end = received.end.unwrap_or_default();
        assert!(end.contains("resume from revision 27"), "{end}");
        drop(sequencer);
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn runs_group_consecutive_revisions() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[3, 4, 5, 7, 9, 10]), vec![(3, 3), (7, 1), (9, 2)]);
    }

    #[test]
    fn field_selectors_parse_api_names() {
        assert_eq!(
            FieldSelector::parse("tier_name"),
            Ok(FieldSelector::Path(FieldPath::Field(Field::TierName)))
        );
        assert_eq!(
            FieldSelector::parse("extra.birthday"),
            Ok(FieldSelector::Path(FieldPath::Extra("birthday".into())))
        );
        assert_eq!(FieldSelector::parse("extra"), Ok(FieldSelector::AnyExtra));
        let unknown = FieldSelector::parse("tier").unwrap_err();
        assert!(unknown.contains("unknown field \"tier\""), "{unknown}");
        assert!(FieldSelector::parse("extra.").is_err());
    }
}
