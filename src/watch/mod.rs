//! Watch subscriptions: which changes a subscriber wants, and the tasks that feed them.
//!
//! The watch layer sits beside the store, not inside it (as etcd's watchable store wraps its
//! store): the store is plain data and knows nothing of who watches. [`Watchers`] is the
//! layer's handle: it opens subscriptions and, as the sequencer's [`CommitHook`], hears of
//! every committed batch right after the store published it.
//!
//! - [`spec`](WatchSpec): what a subscriber asks for (accounts, customers, fields, start).
//! - `router`: the index of every live feed: by customer id (feeds that name `customer_ids`),
//!   by account (a `client_id` and no customer), or in one list (neither). At each commit it
//!   looks every change's customer up once, every account of the batch once, and queues the
//!   revision in the mailbox of each feed that wants it (field filter included), waking only
//!   those (`wakes` decides when: at once, or batched while deliveries come close together): a change costs a lookup plus the feeds that want it, and a feed wakes only for a
//!   change it wants. A mailbox holds at most [`MAILBOX_CAPACITY`] revisions (numbers, not
//!   changes); when it fills, the feed reads the history instead.
//! - `feed`: one subscriber's task. It owns a cursor (the next revision it has to look at)
//!   and reads the store's history from there at its own pace, into its outbox (`outbox`:
//!   at most 64 events and 256 KiB of changes). No change is queued per subscriber beyond
//!   that, and the writer never waits for a
//!   subscriber: one that does not read just stops advancing its cursor. When it reads again
//!   it catches up from the history, or, if the history has moved past a change it still has
//!   to send, gets a `Reset` and the full initial state again.
//!
//! Routing never decides whether a change is sent; the history is the only copy of the
//! changes.
//!
//! On a replica (replicated mode), a watch that resumes beyond the replica's revision may hold
//! a revision another replica already assigned: [`Watchers::open_caught_up`] first waits for
//! the replica to catch up with its cluster ([`CatchUp`]), so such a watcher is served once
//! the revision is here, never refused for it. This module produces domain events ([`WatchEvent`]); turning them into gRPC
//! messages and statuses is the adapter's job.

mod feed;
mod outbox;
mod router;
mod spec;
#[cfg(test)]
mod tests;
mod wakes;

use std::sync::Arc;

use futures_util::future::BoxFuture;

pub use feed::Watch;
pub use outbox::{Inbox, OUTBOX_BYTES, OUTBOX_EVENTS, Outbox, QueuedBytes, outbox, outbox_telling};
pub use router::MAILBOX_CAPACITY;
pub use spec::{FieldSelector, WatchSpec};

use crate::error::Error;
use crate::profile::{Change, Profile};
use crate::sequencer::CommitHook;
use crate::store::Store;
use router::Router;

/// The watch layer's handle: opens subscriptions on a store, and routes that store's committed
/// changes to the feeds that want them. Cloning it is one reference-count increment per
/// field; every clone shares the same index of feeds.
#[derive(Clone)]
pub struct Watchers {
    store: Store,
    router: Arc<Router>,
    /// How a replica catches up with its cluster; `None` on a single node, whose revision is
    /// the only one.
    catch_up: Option<Arc<dyn CatchUp>>,
}

/// How a server waits until it has applied everything its cluster had assigned when asked:
/// what makes a watch that resumes on a lagging replica wait instead of fail. The watch layer
/// knows nothing of how (`crate::replication` reads the stream's last sequence).
pub trait CatchUp: Send + Sync {
    /// Returns once everything acknowledged anywhere in the cluster when it was called is
    /// applied here; `Unavailable` (naming the applied revision) when that takes too long.
    fn caught_up(&self) -> BoxFuture<'_, Result<(), Error>>;
}

impl Watchers {
    /// The watch layer of `store`, with no subscription yet. Give it to the sequencer as its
    /// commit hook ([`crate::sequencer::Sequencer::start_with_hook`]), or feeds never hear of
    /// live changes.
    pub fn new(store: Store) -> Watchers {
        Watchers {
            store,
            router: Arc::default(),
            catch_up: None,
        }
    }

    /// The watch layer of a replica's store: watches resuming beyond its revision wait for
    /// `catch_up` first ([`Watchers::open_caught_up`]).
    pub fn with_catch_up(mut self, catch_up: Arc<dyn CatchUp>) -> Watchers {
        self.catch_up = Some(catch_up);
        self
    }

    /// How this replica catches up with its cluster (`None` on a single node): reads with a
    /// `min_revision` beyond the store's use it as watches do.
    pub fn catch_up(&self) -> Option<&Arc<dyn CatchUp>> {
        self.catch_up.as_ref()
    }

    /// [`Watchers::open`], after catching up when the subscription resumes beyond this
    /// replica's revision: a revision the cluster assigned is then here, and only one it never
    /// assigned is refused (OUT_OF_RANGE). The wait ends as soon as the store reaches the
    /// subscription's start, whatever the barrier still waits for (a read of the stream's end
    /// from a leader that heard from a quorum after the call came: up to a heartbeat's 2 s on
    /// an idle cluster). On a single node, the same as `open`.
    pub async fn open_caught_up(&self, spec: WatchSpec) -> Result<Watch, Error> {
        let reached = |revision: &u64| spec.start_revision <= revision + 1;
        let same_store = spec
            .store_id
            .as_deref()
            .is_none_or(|id| id == self.store.store_id());
        if let Some(catch_up) = &self.catch_up
            && !reached(&self.store.revision())
            && same_store
        {
            let mut revisions = self.store.subscribe();
            tokio::select! {
                caught_up = catch_up.caught_up() => caught_up?,
                // Only closed with the store, which this holds.
                _ = revisions.wait_for(reached) => {}
            }
        }
        self.open(spec)
    }

    /// Checks a subscription against the store and pins its starting point. Errors here fail
    /// the call before any stream starts.
    pub fn open(&self, spec: WatchSpec) -> Result<Watch, Error> {
        Watch::open(&self.store, &self.router, spec)
    }
}

impl CommitHook for Watchers {
    /// Wakes the feeds that want a change of the batch. Runs on the writer, after the store
    /// published the batch's last revision, so a feed never sees a revision above the
    /// published one.
    fn committed(&self, changes: &[Arc<Change>]) {
        self.router.route(changes);
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
    /// Every kind (the metrics create a series for each at zero): keep it next to the enum.
    pub const ALL: [ResetKind; 4] = [
        ResetKind::CompactedStart,
        ResetKind::FellBehind,
        ResetKind::InitialState,
        ResetKind::StoreChanged,
    ];

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
