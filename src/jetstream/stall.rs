//! Telling a stuck consumer from a slow one: the follower's decision to replace a consumer that
//! delivers nothing while the stream is known to hold what it waits for.
//!
//! An ordered consumer is one R1 consumer that the cluster places on any peer of the stream's
//! group, whatever server the client is connected to. When that peer hangs (a SIGSTOP, a frozen
//! VM) while the stream keeps its quorum, nothing arrives, and the client replaces the consumer
//! only after two missed idle heartbeats and a create: a replica on a healthy server applied
//! nothing for 9-10 s, its webhooks answered 503 (found by an adversarial run). The replica
//! knows better: its status poll reads the stream's last sequence from the leader. A consumer
//! that has delivered nothing for [`STALL_AFTER`] since the stream was known to hold the next
//! sequence is stuck. Each delivered message starts the wait over, so a consumer that delivers,
//! however slowly (a long catch-up, a large batch), is never taken for stuck; a stream that keeps
//! growing does not postpone it. This module decides; it reads nothing and replaces nothing.

use std::time::Duration;

use tokio::time::Instant;

/// How long a consumer may deliver nothing while the stream is known to hold the next sequence.
/// Long enough that a healthy peer, even on a loaded machine, has delivered a message the leader
/// already counts (a follower applies it with the leader's next append, milliseconds later); short
/// enough that a replica whose consumer's server hung is back within a few seconds.
pub(super) const STALL_AFTER: Duration = Duration::from_millis(1500);

/// When the consumer is to be taken for stuck, if it is waited for at all.
#[derive(Debug)]
pub(super) struct Stall {
    after: Duration,
    /// Since when the stream has been known to hold the next sequence while nothing came.
    since: Option<Instant>,
}

impl Stall {
    pub(super) fn new(after: Duration) -> Stall {
        Stall { after, since: None }
    }

    /// The consumer delivered a message, or is new, or a caller started waiting: the wait starts
    /// over, from `now` if the stream is known to end at or after `next`.
    pub(super) fn restart(&mut self, now: Instant, known_end: u64, next: u64) {
        self.since = (known_end >= next).then_some(now);
    }

    /// The stream is known to end at `known_end`: the wait starts if it was not running. A wait
    /// that runs is kept: a growing stream must not postpone it.
    pub(super) fn learned(&mut self, now: Instant, known_end: u64, next: u64) {
        if self.since.is_none() && known_end >= next {
            self.since = Some(now);
        }
    }

    /// When the consumer is stuck unless it delivers something first.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.since.map(|since| since + self.after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(1);

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn nothing_is_waited_for_until_the_stream_is_known_to_hold_the_next_sequence() {
        let t = Instant::now();
        let mut stall = Stall::new(AFTER);
        stall.restart(t, 9, 10);
        assert_eq!(stall.deadline(), None, "caught up: idle, not stuck");
        stall.learned(at(t, 300), 9, 10);
        assert_eq!(stall.deadline(), None);
        stall.learned(at(t, 500), 10, 10);
        assert_eq!(stall.deadline(), Some(at(t, 1500)));
    }

    #[test]
    fn a_stream_that_keeps_growing_does_not_postpone_a_consumer_that_delivers_nothing() {
        let t = Instant::now();
        let mut stall = Stall::new(AFTER);
        stall.restart(t, 10, 10);
        for millis in (200..2000).step_by(200) {
            stall.learned(at(t, millis), 10 + millis, 10);
        }
        assert_eq!(stall.deadline(), Some(at(t, 1000)));
    }

    #[test]
    fn a_consumer_that_delivers_slowly_is_never_stuck() {
        let t = Instant::now();
        let mut stall = Stall::new(AFTER);
        stall.restart(t, 1000, 1);
        // One message every 0.9 s, far behind a stream of 1000: each starts the wait over.
        for (index, millis) in (900..9000).step_by(900).enumerate() {
            let now = at(t, millis);
            assert!(
                stall.deadline().unwrap() > now,
                "stuck before message {index}"
            );
            stall.restart(now, 1000, 2 + index as u64);
        }
        // Caught up: nothing is waited for.
        stall.restart(at(t, 9500), 1000, 1001);
        assert_eq!(stall.deadline(), None);
    }
}
