//! Routing committed changes to the feeds that want them.
//!
//! The [`Router`] keeps an index of every live feed: those that name customers by customer id,
//! those of one account by `client_id`, the others in one list. After each commit it looks
//! every change's customer up once (and every account of the batch once) and queues the
//! revision in the [`Mailbox`] of each feed that wants it, field filter included, waking only
//! those: a feed never wakes for a change it does not want. A mailbox holds at most [`MAILBOX_CAPACITY`]
//! revisions (numbers, not changes): when it fills, the router stops queueing for that feed
//! and notes the first revision it skipped, and the feed reads the history from there. Routing
//! never decides whether a change is sent; the history is still the only copy of the changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use super::spec::WatchSpec;
use super::wakes::Wakes;
use crate::profile::Change;

/// Most revisions queued for one feed; past that it reads the history instead.
pub const MAILBOX_CAPACITY: usize = 256;

/// The index of every live feed: by customer id, by account, or neither.
///
/// Owned by the watch layer ([`super::Watchers`]), beside the store and not inside it: the
/// commit owner (the sequencer, through its commit hook) calls [`Router::route`] after each
/// batch is published; feeds register when they start and unregister when they end. The
/// index is behind an `RwLock`: the single writer reads it once per commit batch, and only
/// feeds opening or closing write it.
#[derive(Default)]
pub(super) struct Router {
    index: RwLock<Index>,
    /// The last revision routed: every routed change up to it is in its feeds' mailboxes.
    routed: AtomicU64,
    /// When the feeds routed to are woken.
    wakes: Arc<Wakes>,
}

/// Where each feed is filed, by what its spec names (`WatchSpec::route`).
#[derive(Default)]
struct Index {
    /// Feeds that name customers, under each customer id: one lookup per change. Each id's
    /// feeds by their mailbox's address, so that a feed leaves each of its (up to 1,000) ids at
    /// once: a list scanned per id made closing N feeds of the same ids cost N² times the ids,
    /// seconds under the write lock that every commit's routing waits for (adversary round 11,
    /// F3).
    by_customer: HashMap<Arc<str>, HashMap<usize, Arc<Mailbox>>>,
    /// Feeds of one account that name no customer, under its `client_id`: one lookup per
    /// account in a batch.
    by_account: HashMap<Arc<str>, Vec<Arc<Mailbox>>>,
    /// Feeds of every account that name no customer.
    everyone: Vec<Arc<Mailbox>>,
}

impl Router {
    /// Queues each change's revision for the feeds that want it and wakes them. Called by the
    /// single writer, in revision order, after the store published the revision.
    ///
    /// A feed filed by account or with everyone is served once per batch: its revisions of the
    /// batch go into its mailbox under one lock and one wake-up, so a batch costs the writer
    /// one visit per such feed, whatever its size. The wake-ups are made at once, or together
    /// with the next ones (`super::wakes`).
    pub(super) fn route(&self, changes: &[Arc<Change>]) {
        let Some(last) = changes.last().map(|change| change.revision) else {
            return;
        };
        let index = self.index.read().expect("router lock poisoned");
        let mut wakes = self.wakes.begin();
        if !index.by_customer.is_empty() {
            for change in changes {
                let Some(mailboxes) = index.by_customer.get(&*change.profile.key.customer_id)
                else {
                    continue;
                };
                for mailbox in mailboxes.values() {
                    if mailbox.spec.wants_change(change) && mailbox.push([change.revision]) {
                        wakes.add(mailbox);
                    }
                }
            }
        }
        if !index.by_account.is_empty() {
            for client_id in accounts(changes) {
                let Some(mailboxes) = index.by_account.get(client_id) else {
                    continue;
                };
                for mailbox in mailboxes {
                    if mailbox.push(wanted(changes, &mailbox.spec)) {
                        wakes.add(mailbox);
                    }
                }
            }
        }
        for mailbox in &index.everyone {
            if mailbox.push(wanted(changes, &mailbox.spec)) {
                wakes.add(mailbox);
            }
        }
        // Still under the read lock: a feed registering meanwhile either is in the index for
        // these changes or sees this revision as already routed.
        self.routed.store(last, Ordering::Release);
        wakes.finish();
    }

    /// Files a feed where its spec says.
    fn register(&self, spec: Arc<WatchSpec>) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox {
            spec,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        });
        let mut index = self.index.write().expect("router lock poisoned");
        let spec = &mailbox.spec;
        match (&spec.client_id, spec.customer_ids.is_empty()) {
            (_, false) => {
                for customer_id in &spec.customer_ids {
                    index
                        .by_customer
                        .entry(Arc::clone(customer_id))
                        .or_default()
                        .insert(mailbox.address(), Arc::clone(&mailbox));
                }
            }
            (Some(client_id), true) => index
                .by_account
                .entry(Arc::clone(client_id))
                .or_default()
                .push(Arc::clone(&mailbox)),
            (None, true) => index.everyone.push(Arc::clone(&mailbox)),
        }
        mailbox
    }

    fn unregister(&self, mailbox: &Arc<Mailbox>) {
        let mut index = self.index.write().expect("router lock poisoned");
        let spec = &mailbox.spec;
        let other = |other: &Arc<Mailbox>| !Arc::ptr_eq(other, mailbox);
        match (&spec.client_id, spec.customer_ids.is_empty()) {
            (_, false) => {
                for customer_id in &spec.customer_ids {
                    if let Some(mailboxes) = index.by_customer.get_mut(&**customer_id) {
                        mailboxes.remove(&mailbox.address());
                        if mailboxes.is_empty() {
                            index.by_customer.remove(&**customer_id);
                        }
                    }
                }
            }
            (Some(client_id), true) => remove_from(&mut index.by_account, client_id, other),
            (None, true) => index.everyone.retain(other),
        }
    }

    /// How many keys and feeds the index holds: (customer ids, accounts, feeds with
    /// everyone), for tests.
    #[cfg(test)]
    pub(super) fn indexed(&self) -> (usize, usize, usize) {
        let index = self.index.read().expect("router lock poisoned");
        (
            index.by_customer.len(),
            index.by_account.len(),
            index.everyone.len(),
        )
    }
}

/// Keeps the feeds under `key` that `keep` says, and the key only while one is left.
fn remove_from(
    map: &mut HashMap<Arc<str>, Vec<Arc<Mailbox>>>,
    key: &str,
    keep: impl FnMut(&Arc<Mailbox>) -> bool,
) {
    if let Some(mailboxes) = map.get_mut(key) {
        mailboxes.retain(keep);
        if mailboxes.is_empty() {
            map.remove(key);
        }
    }
}

/// The distinct accounts of a batch, in order of first appearance (a batch rarely holds more
/// than a few, so a scan of what was found so far beats hashing).
fn accounts(changes: &[Arc<Change>]) -> Vec<&str> {
    let mut accounts: Vec<&str> = Vec::new();
    for change in changes {
        let client_id = &*change.profile.key.client_id;
        if !accounts.contains(&client_id) {
            accounts.push(client_id);
        }
    }
    accounts
}

/// The revisions of `changes` that `spec` wants, ascending.
fn wanted<'a>(changes: &'a [Arc<Change>], spec: &'a WatchSpec) -> impl Iterator<Item = u64> + 'a {
    changes
        .iter()
        .filter(|change| spec.wants_change(change))
        .map(|change| change.revision)
}

/// Where the router leaves a routed feed's revisions.
pub(super) struct Mailbox {
    spec: Arc<WatchSpec>,
    // A plain mutex: the writer holds it for one push, the feed for one take.
    queue: Mutex<Queue>,
    /// Wakes the feed when a revision is queued.
    pub(super) wake: Notify,
}

#[derive(Default)]
struct Queue {
    /// Revisions to send, ascending.
    revisions: Vec<u64>,
    /// The queue was full: from this revision on, nothing was queued.
    overflow_from: Option<u64>,
}

/// What a feed takes from its mailbox at once.
pub(super) struct Taken {
    /// Every routed change up to here was queued (or skipped past `overflow_from`).
    pub(super) routed: u64,
    /// The revisions queued, ascending.
    pub(super) revisions: Vec<u64>,
    /// The queue was full from this revision on.
    pub(super) overflow_from: Option<u64>,
}

impl Mailbox {
    /// What the index files it under beside others of the same key: its address, which no
    /// other live mailbox shares.
    fn address(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// A mailbox in no router's index.
    #[cfg(test)]
    pub(super) fn unfiled() -> Arc<Mailbox> {
        Arc::new(Mailbox {
            spec: Arc::default(),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        })
    }

    /// Queues `revisions` (ascending) under one lock; whether any came (the feed is to be
    /// woken, `Wakes` decides when).
    fn push(&self, revisions: impl IntoIterator<Item = u64>) -> bool {
        let mut pushed = false;
        {
            let mut queue = self.queue.lock().expect("mailbox lock poisoned");
            for revision in revisions {
                pushed = true;
                if queue.overflow_from.is_some() {
                    break;
                }
                if queue.revisions.len() < MAILBOX_CAPACITY {
                    queue.revisions.push(revision);
                } else {
                    queue.overflow_from = Some(revision);
                }
            }
        }
        pushed
    }

    pub(super) fn take(&self, router: &Router) -> Taken {
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
pub(super) struct Registration {
    router: Arc<Router>,
    /// Where the router leaves this feed's revisions.
    pub(super) mailbox: Arc<Mailbox>,
}

impl Registration {
    /// Files a feed with `spec` in `router`'s index until the registration is dropped.
    pub(super) fn new(router: &Arc<Router>, spec: Arc<WatchSpec>) -> Registration {
        Registration {
            router: Arc::clone(router),
            mailbox: router.register(spec),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.router.unregister(&self.mailbox);
    }
}
