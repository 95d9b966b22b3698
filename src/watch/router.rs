//! Routing committed changes to the feeds that name customers.
//!
//! The [`Router`] keeps an index of customer-filtered feeds by customer id. After each commit
//! it looks every change's customer up once and queues the revision in the [`Mailbox`] of each
//! feed that wants it, waking only those. A mailbox holds at most [`MAILBOX_CAPACITY`]
//! revisions (numbers, not changes): when it fills, the router stops queueing for that feed
//! and notes the first revision it skipped, and the feed reads the history from there. Routing
//! never decides whether a change is sent; the history is still the only copy of the changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use super::spec::WatchSpec;
use crate::profile::Change;

/// Most revisions queued for one routed feed; past that it reads the history instead.
pub const MAILBOX_CAPACITY: usize = 256;

/// The index of routed feeds by customer id, consulted once per committed change.
///
/// Owned by the watch layer ([`super::Watchers`]), beside the store and not inside it: the
/// commit owner (the sequencer, through its commit hook) calls [`Router::route`] after each
/// batch is published; feeds register when they go live and unregister when they end. The
/// index is behind an `RwLock`: the single writer reads it once per commit batch, and only
/// feeds opening or closing write it.
#[derive(Default)]
pub(super) struct Router {
    index: RwLock<HashMap<Arc<str>, Vec<Arc<Mailbox>>>>,
    /// The last revision routed: every routed change up to it is in its feeds' mailboxes.
    routed: AtomicU64,
}

impl Router {
    /// Queues each change's revision for the routed feeds that want it and wakes them. Called
    /// by the single writer, in revision order, after the store published the revision.
    pub(super) fn route(&self, changes: &[Arc<Change>]) {
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
    pub(super) fn indexed_customers(&self) -> usize {
        self.index.read().expect("router lock poisoned").len()
    }
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
