//! What a poll of the update stream found, and for how long polls in a row have found the
//! stream missing or replaced: the two findings that make a replica refuse webhooks (fast
//! 503s) or stop its applier, so each counts only once it has lasted a while.
//!
//! A run lasts while every poll finds the same thing. Any other outcome ends it, a poll that
//! got no answer included: during a leader election a stream can be "not found" for a moment
//! and then not answer at all, and a run that skipped over the silent polls made a replica
//! refuse webhooks (and give up on publishes in flight that could still succeed) for a stream
//! that was there all along. This module reads no clock: callers give the time.

use std::time::Duration;

use tokio::time::Instant;

use crate::jetstream::{Bounds, JetStreamError};

/// What one poll of the stream found.
#[derive(Debug, PartialEq)]
pub(crate) enum Finding {
    /// The stream this replica follows.
    Stream,
    /// No stream of that name (deleted or lost), and why.
    Missing(String),
    /// Another incarnation under that name (restored, or deleted and created again), and why.
    Replaced(String),
    /// No answer (NATS unreachable, a timeout, an election under way): nothing known.
    NoAnswer,
}

impl Finding {
    /// What a read of the stream's bounds found.
    pub(crate) fn of(read: &Result<Bounds, JetStreamError>) -> Finding {
        match read {
            Ok(_) => Finding::Stream,
            Err(error @ JetStreamError::Refused { .. }) => Finding::Missing(error.to_string()),
            Err(error @ JetStreamError::Replaced { .. }) => Finding::Replaced(error.to_string()),
            Err(_) => Finding::NoAnswer,
        }
    }
}

/// One finding polls have made without a break: since when, and the first poll's reason.
type Run = Option<(Instant, String)>;

/// The current runs of "missing" and of "replaced" (at most one is under way).
#[derive(Debug, Default)]
pub(crate) struct Runs {
    missing: Run,
    replaced: Run,
}

impl Runs {
    /// Records a poll's `finding` made at `now`: how long the run it continues has lasted
    /// (zero for a run it starts, and for a finding that ends both).
    pub(crate) fn observe(&mut self, finding: Finding, now: Instant) -> Duration {
        match finding {
            Finding::Missing(reason) => {
                self.replaced = None;
                continued(&mut self.missing, reason, now)
            }
            Finding::Replaced(reason) => {
                self.missing = None;
                continued(&mut self.replaced, reason, now)
            }
            Finding::Stream | Finding::NoAnswer => {
                *self = Runs::default();
                Duration::ZERO
            }
        }
    }

    /// Why the stream is missing, if every poll has found so for at least `settle` by `now`.
    pub(crate) fn missing(&self, settle: Duration, now: Instant) -> Option<&str> {
        self.missing
            .as_ref()
            .filter(|(since, _)| now.saturating_duration_since(*since) >= settle)
            .map(|(_, reason)| reason.as_str())
    }

    /// Why the stream is replaced, if the last poll that answered found so.
    pub(crate) fn replaced(&self) -> Option<&str> {
        self.replaced.as_ref().map(|(_, reason)| reason.as_str())
    }
}

/// Extends `run` to `now` (starting it with `reason` if none is under way): how long it has
/// lasted.
fn continued(run: &mut Run, reason: String, now: Instant) -> Duration {
    let (since, _) = run.get_or_insert((now, reason));
    now.saturating_duration_since(*since)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(2);

    fn missing() -> Finding {
        Finding::Missing("stream PROFILE_STATE not found".into())
    }

    #[test]
    fn polls_that_find_the_stream_missing_for_the_settle_time_make_it_missing() {
        let (mut runs, t0) = (Runs::default(), Instant::now());
        assert_eq!(runs.observe(missing(), t0), Duration::ZERO);
        let later = t0 + Duration::from_millis(1_900);
        assert_eq!(runs.observe(missing(), later), Duration::from_millis(1_900));
        assert_eq!(runs.missing(SETTLE, later), None);
        let settled = t0 + SETTLE;
        assert_eq!(runs.observe(missing(), settled), SETTLE);
        assert_eq!(
            runs.missing(SETTLE, settled),
            Some("stream PROFILE_STATE not found")
        );
    }

    #[test]
    fn a_poll_that_gets_no_answer_ends_a_run_of_missing() {
        let (mut runs, t0) = (Runs::default(), Instant::now());
        runs.observe(missing(), t0);
        runs.observe(Finding::NoAnswer, t0 + Duration::from_secs(1));
        let after = t0 + Duration::from_millis(2_500);
        assert_eq!(runs.observe(missing(), after), Duration::ZERO);
        assert_eq!(runs.missing(SETTLE, after), None);
        assert!(runs.missing(SETTLE, after + SETTLE).is_some());
    }

    #[test]
    fn a_poll_that_gets_no_answer_ends_a_run_of_replaced() {
        let (mut runs, t0) = (Runs::default(), Instant::now());
        let replaced = || Finding::Replaced("the stream was created again".into());
        runs.observe(replaced(), t0);
        assert_eq!(runs.replaced(), Some("the stream was created again"));
        runs.observe(Finding::NoAnswer, t0 + Duration::from_secs(1));
        assert_eq!(runs.replaced(), None);
        let after = t0 + Duration::from_secs(3);
        assert_eq!(runs.observe(replaced(), after), Duration::ZERO);
    }

    #[test]
    fn finding_the_stream_or_the_other_finding_ends_a_run() {
        let (mut runs, t0) = (Runs::default(), Instant::now());
        runs.observe(missing(), t0);
        runs.observe(Finding::Stream, t0 + Duration::from_secs(1));
        assert_eq!(runs.observe(missing(), t0 + SETTLE), Duration::ZERO);
        runs.observe(Finding::Replaced("again".into()), t0 + SETTLE * 2);
        assert_eq!(runs.missing(SETTLE, t0 + SETTLE * 3), None);
        assert_eq!(runs.observe(missing(), t0 + SETTLE * 3), Duration::ZERO);
        assert_eq!(runs.replaced(), None);
    }

    #[test]
    fn a_read_that_timed_out_or_could_not_be_sent_is_no_answer() {
        let unavailable = JetStreamError::Unavailable {
            operation: "stream info",
            reason: "timed out".into(),
        };
        assert_eq!(Finding::of(&Err(unavailable)), Finding::NoAnswer);
        let unconfirmed = JetStreamError::Unconfirmed {
            operation: "stream info",
            reason: "timed out".into(),
        };
        assert_eq!(Finding::of(&Err(unconfirmed)), Finding::NoAnswer);
        let not_found = JetStreamError::Refused {
            operation: "stream info",
            reason: "stream PROFILE_STATE not found".into(),
        };
        assert_eq!(
            Finding::of(&Err(not_found)),
            Finding::Missing(
                "jetstream refused stream info: stream PROFILE_STATE not found".into()
            )
        );
        let bounds = Bounds {
            first: 1,
            last: 2,
            room: None,
        };
        assert_eq!(Finding::of(&Ok(bounds)), Finding::Stream);
    }
}
