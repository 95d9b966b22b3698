//! Webhooks waiting for their own replica to apply what they published.
//!
//! The publisher learns a batch's stream sequence `S` from the acknowledgement; the applier
//! learns each update's outcome when it applies `S`. Whichever comes second answers: both take
//! one lock, the applier to record `S`'s outcomes and wake its waiters, the publisher to look
//! `S` up or leave a waiter, so no wake-up is lost between the two. A waiter is keyed by
//! `(S, index in the batch)`: a duplicate acknowledgement names the original `S`, and the same
//! message id means the same content, so the indices agree.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::sequencer::{Applied, Outcome};

/// Outcomes of this many recently applied sequences are kept for acknowledgements that arrive
/// after their message was applied (the applier is often faster than the ack's way back).
const RECENT: usize = 4096;

/// Where a caller's outcome will come from.
pub(super) enum Registered {
    /// Applied already: the reply was sent its outcome.
    Now,
    /// Applied so long ago that its outcome is no longer kept (a duplicate of an old message):
    /// merging it again changed nothing, so the caller answers the reply with `Unchanged` and
    /// the profile's revision (a repeat of a refused update never gets here: the publisher
    /// publishes it anew, `publisher::refused_before`).
    Old(Reply),
    /// Not applied yet: the reply will be sent when it is.
    Waiting,
}

/// The answer to a caller whose update is in the stream at `sequence` but will not be applied
/// here: this replica's applier stopped.
fn not_applied_here(sequence: u64) -> Error {
    Error::Unavailable {
        reason: format!(
            "the update is recorded in the replicated log (stream sequence {sequence}) but this \
             replica stopped applying it; a retry, on another replica, is harmless"
        ),
    }
}

/// Shared between the publisher and the applier.
pub(super) struct Pending {
    state: Mutex<State>,
}

/// A caller's reply: the outcome or why there is none.
pub(super) type Reply = oneshot::Sender<Result<Applied, Error>>;

#[derive(Default)]
struct State {
    /// The last sequence the applier completed.
    applied_through: u64,
    /// Outcomes of the last [`RECENT`] sequences, oldest first, sequences increasing.
    recent: VecDeque<(u64, Arc<[Outcome]>)>,
    /// Callers waiting for a sequence, with their index in its batch.
    waiters: HashMap<u64, Vec<(usize, Reply)>>,
    /// Set once the applier stopped for good: nothing waits for it any more.
    stopped: bool,
}

impl Pending {
    /// For an applier that starts after stream sequence `applied` (its snapshot's): what it
    /// holds already is applied. Starting from 0, a repeated delivery of an update the snapshot
    /// holds (a Gameball retry the stream drops as a duplicate) waited for an apply that could
    /// not come, on a replica with no message after its snapshot, and got 503 at every retry
    /// (found by an adversarial run).
    pub(super) fn after(applied: u64) -> Pending {
        let state = State {
            applied_through: applied,
            ..State::default()
        };
        Pending {
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every change is a few inserts and removals: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The applier applied `sequence` with these outcomes (one per update of its batch).
    pub(super) fn complete(&self, sequence: u64, outcomes: Arc<[Outcome]>) {
        let waiting = {
            let mut state = self.state();
            state.applied_through = sequence;
            if state.recent.len() == RECENT {
                state.recent.pop_front();
            }
            state.recent.push_back((sequence, Arc::clone(&outcomes)));
            state.waiters.remove(&sequence)
        };
        for (index, reply) in waiting.into_iter().flatten() {
            let outcome = outcomes
                .get(index)
                .copied()
                .map(|outcome| outcome.map_err(Error::from))
                .unwrap_or_else(|| Err(Error::Unavailable {
                    reason: format!(
                        "stream message {sequence} holds no update {index}; retry (the update is \
                     recorded)"
                    ),
                }));
            // A caller that gave up (timed out, went away) no longer listens.
            let _ = reply.send(outcome);
        }
    }

    /// The publisher learned that the update at `index` of its batch is stream message
    /// `sequence`: the outcome now, or a promise to send it to `reply`.
    pub(super) fn register(&self, sequence: u64, index: usize, reply: Reply) -> Registered {
        let mut state = self.state();
        if state.stopped && sequence > state.applied_through {
            let _ = reply.send(Err(not_applied_here(sequence)));
            return Registered::Now;
        }
        if sequence <= state.applied_through {
            let found = state
                .recent
                .binary_search_by_key(&sequence, |(applied, _)| *applied)
                .ok()
                .and_then(|at| state.recent[at].1.get(index).copied());
            drop(state);
            return match found {
                Some(outcome) => {
                    let _ = reply.send(outcome.map_err(Error::from));
                    Registered::Now
                }
                None => Registered::Old(reply),
            };
        }
        // Callers whose webhook timed out leave closed replies behind when the applier stops;
        // they go whenever the map has grown.
        if state.waiters.len() >= RECENT {
            state.waiters.retain(|_, waiting| {
                waiting.retain(|(_, reply)| !reply.is_closed());
                !waiting.is_empty()
            });
        }
        state
            .waiters
            .entry(sequence)
            .or_default()
            .push((index, reply));
        Registered::Waiting
    }

    /// The last stream sequence the applier completed.
    pub(super) fn applied_through(&self) -> u64 {
        self.state().applied_through
    }

    /// What the applier made of the update at `index` of stream message `sequence`: `None`
    /// while it is not applied, `Some(None)` when it was applied too long ago for its outcome
    /// to be kept.
    pub(super) fn settled(&self, sequence: u64, index: usize) -> Option<Option<Outcome>> {
        let state = self.state();
        if sequence > state.applied_through {
            return None;
        }
        let kept = state
            .recent
            .binary_search_by_key(&sequence, |(applied, _)| *applied)
            .ok()
            .and_then(|at| state.recent[at].1.get(index).copied());
        Some(kept)
    }

    /// The applier stopped for good: every caller waiting for it is answered now, and later
    /// ones at once (they waited out the webhook timeout for an apply that could not come).
    pub(super) fn applier_stopped(&self) {
        let waiting = {
            let mut state = self.state();
            state.stopped = true;
            std::mem::take(&mut state.waiters)
        };
        for (sequence, replies) in waiting {
            for (_, reply) in replies {
                let _ = reply.send(Err(not_applied_here(sequence)));
            }
        }
    }

    /// Whether any caller still waits for an apply (shutdown waits until none does).
    pub(super) fn has_waiters(&self) -> bool {
        self.state()
            .waiters
            .values()
            .flatten()
            .any(|(_, reply)| !reply.is_closed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(revision: u64) -> Outcome {
        Ok(Applied::Changed { revision })
    }

    #[tokio::test]
    async fn whichever_comes_second_answers() {
        let pending = Pending::after(0);
        // Acknowledged first, applied second.
        let (reply, outcome) = oneshot::channel();
        assert!(matches!(pending.register(5, 1, reply), Registered::Waiting));
        assert!(pending.has_waiters());
        pending.complete(5, Arc::from([changed(9), changed(10)]));
        assert_eq!(outcome.await.unwrap(), changed(10).map_err(Error::from));
        assert!(!pending.has_waiters());
        // Applied first, acknowledged second (a duplicate ack names the same sequence).
        let (reply, outcome) = oneshot::channel();
        assert!(matches!(pending.register(5, 0, reply), Registered::Now));
        assert_eq!(outcome.await.unwrap(), changed(9).map_err(Error::from));
        // A refused update is answered as the error it maps to, now and later.
        let refused = crate::profile::TooLarge {
            extras_json_bytes: 300_000,
        };
        let (reply, outcome) = oneshot::channel();
        assert!(matches!(pending.register(6, 0, reply), Registered::Waiting));
        pending.complete(6, Arc::from([Err(refused)]));
        let error = outcome.await.unwrap().unwrap_err();
        assert_eq!(error, Error::from(refused));
        assert_eq!(error.field(), Some("data"));
        let (reply, outcome) = oneshot::channel();
        assert!(matches!(pending.register(6, 0, reply), Registered::Now));
        assert_eq!(outcome.await.unwrap(), Err(Error::from(refused)));
    }

    #[tokio::test]
    async fn sequences_older_than_the_recent_window_are_old() {
        let pending = Pending::after(0);
        for sequence in 1..=(RECENT as u64 + 1) {
            pending.complete(sequence, Arc::from([changed(sequence)]));
        }
        let (reply, _outcome) = oneshot::channel();
        assert!(matches!(pending.register(1, 0, reply), Registered::Old(_)));
        let (reply, _outcome) = oneshot::channel();
        assert!(matches!(pending.register(2, 0, reply), Registered::Now));
        // An index the batch does not have is an error to its caller, not a panic.
        let (reply, outcome) = oneshot::channel();
        assert!(matches!(
            pending.register(RECENT as u64 + 2, 3, reply),
            Registered::Waiting
        ));
        pending.complete(RECENT as u64 + 2, Arc::from([changed(1)]));
        assert!(outcome.await.unwrap().is_err());
    }

    /// A replica cut off with webhooks waiting held them for the whole webhook timeout, and
    /// its stop with them (found by an adversarial run): they are answered when the applier
    /// stops, and later ones at once.
    #[test]
    fn what_the_starting_snapshot_holds_is_applied_already() {
        let pending = Pending::after(7);
        let (reply, _outcome) = oneshot::channel();
        assert!(matches!(pending.register(7, 0, reply), Registered::Old(_)));
        assert_eq!(
            pending.settled(3, 0),
            Some(None),
            "applied, outcome not kept"
        );
        assert_eq!(pending.settled(8, 0), None);
        let (reply, _outcome) = oneshot::channel();
        assert!(matches!(pending.register(8, 0, reply), Registered::Waiting));
    }

    #[test]
    fn waiters_are_answered_when_the_applier_stops_and_later_ones_at_once() {
        let pending = Pending::after(0);
        let (reply, mut waiting) = oneshot::channel();
        assert!(matches!(pending.register(5, 0, reply), Registered::Waiting));
        pending.applier_stopped();
        let answer = waiting.try_recv().expect("answered at the stop");
        assert!(
            matches!(&answer, Err(Error::Unavailable { reason }) if reason.contains("sequence 5")),
            "{answer:?}"
        );
        assert!(!pending.has_waiters());
        let (reply, mut late) = oneshot::channel();
        assert!(matches!(pending.register(6, 0, reply), Registered::Now));
        assert!(late.try_recv().expect("answered at once").is_err());
    }
}
