//! What a poll of the update stream found, and for how long polls have found the stream
//! missing or replaced: the two findings that make a replica refuse webhooks (fast 503s) or
//! stop its applier, so each counts only once polls have found it for a while.
//!
//! A run lasts while every poll that answers finds the same thing, and it has lasted as long
//! as its first and its latest finding are apart. A poll that gets no answer neither ends a
//! run nor adds to it. Counted as part of a run (the clock running from its first finding), a
//! moment's "not found" during a leader election followed by silent polls made a replica
//! refuse webhooks, and give up on publishes in flight that could still succeed, for a stream
//! that was there all along. Taken as its end, an election while the stream really was gone
//! sent webhooks to publish again, and wait seconds for a 503 (found by an adversarial run).
//! It also keeps why the latest poll got no answer, while it got none: what readiness names
//! when a replica falls behind because its polls go unanswered (a stream short of its quorum
//! has no leader, and its followers' answers are no answer: `UpdateStream::bounds`).
//! This module reads no clock: callers give the time.

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
    /// No answer (NATS unreachable, a timeout, an election under way, no leader): nothing
    /// known of the stream, and why.
    NoAnswer(String),
}

impl Finding {
    /// What a read of the stream's bounds found.
    pub(crate) fn of(read: &Result<Bounds, JetStreamError>) -> Finding {
        match read {
            Ok(_) => Finding::Stream,
            Err(error @ JetStreamError::Refused { .. }) => Finding::Missing(error.to_string()),
            Err(error @ JetStreamError::Replaced { .. }) => Finding::Replaced(error.to_string()),
            Err(error) => Finding::NoAnswer(error.to_string()),
        }
    }
}

/// One finding that the polls that answered made without a break.
#[derive(Debug)]
struct Run {
    /// The first poll that made it.
    first: Instant,
    /// The latest poll that made it.
    latest: Instant,
    /// The first poll's reason.
    reason: String,
}

impl Run {
    fn lasted(&self) -> Duration {
        self.latest.saturating_duration_since(self.first)
    }
}

/// The current runs of "missing" and of "replaced" (at most one is under way), and why the
/// latest poll got no answer, if it got none.
#[derive(Debug, Default)]
pub(crate) struct Runs {
    missing: Option<Run>,
    replaced: Option<Run>,
    unanswered: Option<String>,
}

impl Runs {
    /// Records a poll's `finding` made at `now`: how long the run it continues has lasted
    /// (zero for a run it starts, for a finding that ends both, and for no answer).
    pub(crate) fn observe(&mut self, finding: Finding, now: Instant) -> Duration {
        match finding {
            Finding::Missing(reason) => {
                (self.replaced, self.unanswered) = (None, None);
                continued(&mut self.missing, reason, now)
            }
            Finding::Replaced(reason) => {
                (self.missing, self.unanswered) = (None, None);
                continued(&mut self.replaced, reason, now)
            }
            Finding::Stream => {
                *self = Runs::default();
                Duration::ZERO
            }
            Finding::NoAnswer(reason) => {
                self.unanswered = Some(reason);
                Duration::ZERO
            }
        }
    }

    /// Why the latest poll got no answer, if it got none.
    pub(crate) fn unanswered(&self) -> Option<&str> {
        self.unanswered.as_deref()
    }

    /// Why the stream is missing, if polls have found so for at least `settle`.
    pub(crate) fn missing(&self, settle: Duration) -> Option<&str> {
        self.missing
            .as_ref()
            .filter(|run| run.lasted() >= settle)
            .map(|run| run.reason.as_str())
    }

    /// Why the stream is replaced, if the last poll that answered found so.
    pub(crate) fn replaced(&self) -> Option<&str> {
        self.replaced.as_ref().map(|run| run.reason.as_str())
    }
}

/// Extends `run` to `now` (starting it with `reason` if none is under way): how long it has
/// lasted.
fn continued(run: &mut Option<Run>, reason: String, now: Instant) -> Duration {
    let run = run.get_or_insert(Run {
        first: now,
        latest: now,
        reason,
    });
    run.latest = run.latest.max(now);
    run.lasted()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(2);

    fn missing() -> Finding {
        Finding::Missing("stream PROFILE_STATE not found".into())
    }

    fn silent() -> Finding {
        Finding::NoAnswer("jetstream unavailable during stream info: timed out".into())
    }

    fn secs(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn polls_that_find_the_stream_missing_for_the_settle_time_make_it_missing() {
        let (mut runs, t0) = (Runs::default(), Instant::now());
        assert_eq!(runs.observe(missing(), t0), Duration::ZERO);
        assert_eq!(runs.observe(missing(), t0 + secs(1_900)), secs(1_900));
        assert_eq!(runs.missing(SETTLE), None);
        assert_eq!(runs.observe(missing(), t0 + SETTLE), SETTLE);
        assert_eq!(runs.missing(SETTLE), Some("stream PROFILE_STATE not found"));
    }

    #[test]
    fn polls_that_get_no_answer_do_not_add_to_a_run_of_missing() {
        // An election: a moment's "not found", then silence, then the stream again.
        let (mut runs, t0) = (Runs::default(), Instant::now());
        runs.observe(missing(), t0);
        for quiet in [1_000, 2_500, 7_000] {
            assert_eq!(runs.observe(silent(), t0 + secs(quiet)), Duration::ZERO);
            assert_eq!(runs.missing(SETTLE), None, "after {quiet} ms");
        }
        runs.observe(Finding::Stream, t0 + secs(7_200));
        assert_eq!(runs.observe(missing(), t0 + secs(7_400)), Duration::ZERO);
    }

    #[test]
    fn polls_that_get_no_answer_do_not_end_a_run_of_missing() {
        // The stream really gone, and an election meanwhile: still missing, and confirmed by
        // the first poll that answers again.
        let (mut runs, t0) = (Runs::default(), Instant::now());
        runs.observe(missing(), t0);
        runs.observe(missing(), t0 + SETTLE);
        runs.observe(silent(), t0 + secs(3_000));
        assert!(runs.missing(SETTLE).is_some());
        assert_eq!(runs.observe(missing(), t0 + secs(9_000)), secs(9_000));

        let (mut runs, t0) = (Runs::default(), Instant::now());
        runs.observe(missing(), t0);
        runs.observe(silent(), t0 + secs(1_000));
        assert_eq!(runs.observe(missing(), t0 + secs(2_500)), secs(2_500));
        assert!(runs.missing(SETTLE).is_some());
    }

    #[test]
    fn a_run_of_replaced_lasts_through_polls_that_get_no_answer() {
        let (mut runs, t0) = (Runs::default(), Instant::now());
        let replaced = || Finding::Replaced("the stream was created again".into());
        runs.observe(replaced(), t0);
        assert_eq!(runs.replaced(), Some("the stream was created again"));
        runs.observe(silent(), t0 + secs(1_000));
        assert_eq!(runs.replaced(), Some("the stream was created again"));
        assert_eq!(runs.observe(replaced(), t0 + secs(3_000)), secs(3_000));
    }

    #[test]
    fn finding_the_stream_or_the_other_finding_ends_a_run() {
        let (mut runs, t0) = (Runs::default(), Instant::now());
        runs.observe(missing(), t0);
        runs.observe(Finding::Stream, t0 + secs(1_000));
        assert_eq!(runs.observe(missing(), t0 + SETTLE), Duration::ZERO);
        runs.observe(Finding::Replaced("again".into()), t0 + SETTLE * 2);
        assert_eq!(runs.missing(SETTLE), None);
        assert_eq!(runs.observe(missing(), t0 + SETTLE * 3), Duration::ZERO);
        assert_eq!(runs.replaced(), None);
    }

    #[test]
    fn the_reason_of_the_latest_poll_without_an_answer_lasts_until_a_poll_answers() {
        let (mut runs, t0) = (Runs::default(), Instant::now());
        assert_eq!(runs.unanswered(), None);
        runs.observe(silent(), t0);
        let no_leader = Finding::NoAnswer("stream PROFILE_STATE has no leader".into());
        runs.observe(no_leader, t0 + secs(200));
        assert_eq!(
            runs.unanswered(),
            Some("stream PROFILE_STATE has no leader")
        );
        runs.observe(Finding::Stream, t0 + secs(400));
        assert_eq!(runs.unanswered(), None);
        for answered in [missing(), Finding::Replaced("again".into())] {
            runs.observe(silent(), t0 + secs(600));
            assert!(runs.unanswered().is_some());
            runs.observe(answered, t0 + secs(800));
            assert_eq!(runs.unanswered(), None);
        }
    }

    #[test]
    fn a_read_that_timed_out_or_could_not_be_sent_is_no_answer() {
        let unavailable = JetStreamError::Unavailable {
            operation: "stream info",
            reason: "timed out".into(),
        };
        assert_eq!(
            Finding::of(&Err(unavailable)),
            Finding::NoAnswer("jetstream unavailable during stream info: timed out".into())
        );
        let unconfirmed = JetStreamError::Unconfirmed {
            operation: "stream info",
            reason: "timed out".into(),
        };
        assert!(matches!(
            Finding::of(&Err(unconfirmed)),
            Finding::NoAnswer(reason) if reason.contains("did not confirm stream info")
        ));
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
            heard: std::time::Duration::ZERO,
        };
        assert_eq!(Finding::of(&Ok(bounds)), Finding::Stream);
    }
}
