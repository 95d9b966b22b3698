//! The publisher's linger: how long a batch may wait for more updates before it is published.
//!
//! Every stream message costs each nats-server a Raft round and two fsyncs, whatever it holds,
//! so the cluster's CPU per webhook falls as messages grow (BENCHMARKS.md, Replicas). With one
//! publish in flight, the batch that forms during a publish holds what arrived meanwhile; the
//! callers answered by that publish come back a moment after its acknowledgement and miss the
//! next batch, so the callers split into groups that alternate, and messages stay small.
//! The linger lets the next batch wait, a bounded time, for the callers who are likely to come
//! back (a sender with more deliveries queued sends the next one as soon as it is answered):
//!
//! - after a batch of several updates, the next one waits until it holds what was already
//!   queued when the publish slot freed plus as many as that batch did (after a batch of one it
//!   never waits, so a trickle is published at once). Counted from the moment the slot frees,
//!   not from the first arrival after it: when every sender was in the last batch, the first to
//!   come back is one of them, and a target of "one plus the last batch" would outnumber the
//!   senders and always wait out the bound;
//! - at most `--nats-publish-linger`, and at most half the last publish's round trip (so the
//!   added latency stays a fraction of what a webhook waits anyway).
//!
//! Pure policy: no clock, no channel. The publisher owns the waiting (`super::next_batch`).
//! Public so that the load tool's no-op replica batches by the same rule instead of a copy
//! that could drift.

use std::time::Duration;

/// The linger policy's state: the last published batch and its round trip.
#[derive(Debug, Clone)]
pub struct Linger {
    max: Duration,
    last_size: usize,
    last_round_trip: Duration,
}

/// What a batch should wait for: until it holds `updates`, or `for_at_most` has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Publish once the batch holds this many updates...
    pub updates: usize,
    /// ...or once this long has passed since the wait began.
    pub for_at_most: Duration,
}

impl Linger {
    /// A policy that never waits longer than `max` (zero: never waits).
    pub fn new(max: Duration) -> Linger {
        Linger {
            max,
            last_size: 0,
            last_round_trip: Duration::ZERO,
        }
    }

    /// Whether the next batch should wait for more, and for how many, given `queued` updates
    /// were waiting when the publish slot freed (before any that arrived since).
    pub fn wait(&self, queued: usize) -> Option<Wait> {
        let for_at_most = self.max.min(self.last_round_trip / 2);
        (self.last_size > 1 && !for_at_most.is_zero()).then_some(Wait {
            updates: queued + self.last_size,
            for_at_most,
        })
    }

    /// A batch of `size` updates was published and took `round_trip` to be acknowledged.
    pub fn published(&mut self, size: usize, round_trip: Duration) {
        self.last_size = size;
        self.last_round_trip = round_trip;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_trickle_never_waits() {
        let mut linger = Linger::new(5 * MS);
        assert_eq!(linger.wait(1), None, "nothing published yet");
        for _ in 0..10 {
            linger.published(1, 8 * MS);
            assert_eq!(linger.wait(1), None);
            assert_eq!(linger.wait(3), None);
        }
    }

    #[test]
    fn after_a_batch_of_several_the_next_waits_for_as_many_more_bounded_in_time() {
        let mut linger = Linger::new(5 * MS);
        linger.published(11, 8 * MS);
        let wait = Wait {
            updates: 21,
            for_at_most: 4 * MS,
        };
        assert_eq!(linger.wait(10), Some(wait), "half the round trip");
        linger.published(21, 30 * MS);
        assert_eq!(
            linger.wait(1).unwrap(),
            Wait {
                updates: 22,
                for_at_most: 5 * MS
            },
            "the flag caps it"
        );
        linger.published(21, Duration::ZERO);
        assert_eq!(linger.wait(7), None, "no round trip, no wait");
        linger.published(2, 8 * MS);
        assert_eq!(linger.wait(1).unwrap().updates, 3);
        // Nothing queued when the slot freed (one group in lockstep): as many as the last
        // batch. That the publisher counts `queued` before any arrival is its own test,
        // `a_group_in_lockstep_goes_once_all_are_back_not_after_the_bound`.
        linger.published(21, 4 * MS);
        assert_eq!(linger.wait(0).unwrap().updates, 21);
        // Two groups alternating: the one queued during the publish and the one it answered.
        linger.published(12, 4 * MS);
        assert_eq!(linger.wait(9).unwrap().updates, 21);
    }

    #[test]
    fn zero_turns_it_off() {
        let mut linger = Linger::new(Duration::ZERO);
        linger.published(50, 8 * MS);
        assert_eq!(linger.wait(1), None);
    }
}
