//! `--reconcile-every CLIENT_ID=DURATION`: a periodic reconcile job per account.
//!
//! One task per account on the server's `TaskTracker`, stopped by the shutdown token. Periods
//! are slots of wall-clock time (slot `n` starts at `n × period` since the Unix epoch: `24h`
//! runs at midnight UTC), and a run starts at each slot's start, so a restart does not move the
//! schedule. (The first run used to come after a random delay within the period, counted from
//! each start: a server restarted more often than its period might never run; found by an
//! adversarial run.) Each run selects the profiles not updated for a period: a profile whose
//! webhooks keep arriving is fresh and skipped, one whose webhooks were lost gets old and is
//! read back. A slot that finds the account's last job still running, or `--reconcile-max-jobs`
//! jobs running (schedules of one period fall due together), waits for a job to end until the
//! next slot's start, and is skipped only then; a slot whose start passed while the one
//! before it waited runs at once.
//!
//! Replicated mode runs each slot on one replica, through [`SlotClaims`] (a JetStream KV
//! bucket, `crate::jetstream::ScheduleBucket`): every replica wakes at a slot's start and
//! tries to create the slot's key, and only the replica whose create succeeds runs it. There is
//! no leader to lose: a replica that dies simply stops claiming, and the next slot goes to a
//! survivor. Clocks need only agree to well within a period. When the bucket cannot be
//! reached, the slot is skipped (a run on every replica is what this avoids).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::jobs::ReconcileJobs;
use crate::config::ReconcileEvery;
use crate::error::Error;

/// A future [`SlotClaims::claim`] returns.
pub type ClaimFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;

/// Claims of schedule slots shared by every replica: a slot's first claim wins.
pub trait SlotClaims: Send + Sync + 'static {
    /// True if this replica is the first to claim `slot` (it runs it); false if another one
    /// was; an error if the claims cannot be reached.
    fn claim<'a>(&'a self, slot: &'a str) -> ClaimFuture<'a>;
}

/// Starts one schedule per entry of `every`: on this server alone, or on one replica per
/// period when `claims` are shared.
pub fn start(
    jobs: &ReconcileJobs,
    every: &[ReconcileEvery],
    tracker: &TaskTracker,
    stopping: &CancellationToken,
    claims: Option<Arc<dyn SlotClaims>>,
) {
    for entry in every {
        let (jobs, entry, stopping) = (jobs.clone(), entry.clone(), stopping.clone());
        // Operators asked when a schedule first runs; nothing said.
        let period = humantime::format_duration(entry.period).to_string();
        let now = since_epoch();
        let (_, next) = next_slot(now, entry.period);
        let first_run_at = chrono::DateTime::<chrono::Utc>::from(UNIX_EPOCH + now + next)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let first_run_in = humantime::format_duration(whole_seconds(next));
        let client_id = &entry.client_id;
        jobs.schedule_started(client_id, entry.period);
        match &claims {
            None => tracing::info!(
                %client_id,
                %period,
                %first_run_in,
                %first_run_at,
                "reconcile schedule started"
            ),
            Some(_) => tracing::info!(
                %client_id,
                %period,
                next_slot_in = %first_run_in,
                next_slot_at = %first_run_at,
                "reconcile schedule started (each period on one replica)"
            ),
        }
        tracker.spawn(run(jobs, entry, claims.clone(), stopping));
    }
}

/// The wall-clock time since the Unix epoch.
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `delay` to the second, for a log line.
fn whole_seconds(delay: Duration) -> Duration {
    Duration::from_secs(delay.as_secs())
}

/// The slot after `now` and how long until it starts.
fn next_slot(now: Duration, period: Duration) -> (u128, Duration) {
    let period_ms = period.as_millis().max(1);
    let slot = now.as_millis() / period_ms + 1;
    let start = Duration::from_millis(u64::try_from(slot * period_ms).unwrap_or(u64::MAX));
    (slot, start.saturating_sub(now))
}

/// The slot to wait for after `last_run`, and how long until it starts: normally the next one
/// to start; but if the slot after `last_run` started (less than a period ago) while
/// `last_run` was still waiting for room, that one, at once.
fn upcoming_slot(now: Duration, period: Duration, last_run: Option<u128>) -> (u128, Duration) {
    let (next, delay) = next_slot(now, period);
    match last_run {
        Some(last) if last + 2 == next => (last + 1, Duration::ZERO),
        _ => (next, delay),
    }
}

/// Whether `slot` runs at wall-clock time `now`: it has started, and it is later than the last
/// slot that ran.
fn due(slot: u128, now: Duration, period: Duration, last_run: Option<u128>) -> bool {
    let (next, _) = next_slot(now, period);
    next > slot && last_run.is_none_or(|last| slot > last)
}

/// At each slot's start, runs it: on this server alone, or if this replica claims it first.
async fn run(
    jobs: ReconcileJobs,
    every: ReconcileEvery,
    claims: Option<Arc<dyn SlotClaims>>,
    stopping: CancellationToken,
) {
    let account = hex::encode(every.client_id.as_bytes());
    let mut last_run = None;
    loop {
        let (slot, delay) = upcoming_slot(since_epoch(), every.period, last_run);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopping.cancelled() => return,
        }
        // The wait is on the monotonic clock: a wall clock stepped back meanwhile (an NTP step,
        // a resumed VM) woke this before the slot's start, and the slot came round again and ran
        // twice (found by an adversarial run). Then it waits again.
        if !due(slot, since_epoch(), every.period, last_run) {
            continue;
        }
        last_run = Some(slot);
        // Every line of the slot names it: a start late in slot n (it waited for room) and one
        // on time in slot n + 1 look alike otherwise.
        let slot_start = slot_start(slot, every.period);
        let Some(claims) = &claims else {
            tick(&jobs, &every, &slot_start, &stopping).await;
            continue;
        };
        let key = format!("reconcile.{account}.{}.{slot}", every.period.as_millis());
        let client_id = every.client_id.as_str();
        match claims.claim(&key).await {
            Ok(true) => tick(&jobs, &every, &slot_start, &stopping).await,
            Ok(false) => tracing::debug!(
                client_id,
                slot = %slot_start,
                key,
                "another replica runs this slot"
            ),
            Err(error) => tracing::warn!(
                client_id,
                slot = %slot_start,
                %error,
                "scheduled reconcile skipped: its slot could not be claimed"
            ),
        }
    }
}

/// When `slot` starts, for a log line (RFC 3339, UTC, to the second).
fn slot_start(slot: u128, period: Duration) -> String {
    let millis = i64::try_from(slot * period.as_millis()).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("slot {slot}"))
}

/// Starts the slot's job, waiting for room until the next slot starts (or the server stops).
async fn tick(
    jobs: &ReconcileJobs,
    every: &ReconcileEvery,
    slot: &str,
    stopping: &CancellationToken,
) {
    let client_id = every.client_id.as_str();
    let (_, until_next_slot) = next_slot(since_epoch(), every.period);
    let waits = |refused: &Error| {
        tracing::info!(
            client_id,
            slot,
            reason = %refused,
            "scheduled reconcile waits for a running job to end"
        )
    };
    let start = jobs.start_scheduled_within(client_id, every.period, until_next_slot, waits);
    let started = tokio::select! {
        started = start => started,
        () = stopping.cancelled() => return,
    };
    match started {
        Ok(report) => {
            tracing::info!(client_id, slot, job_id = %report.job_id, "scheduled reconcile started")
        }
        Err(error @ (Error::ReconcileJobRunning { .. } | Error::TooManyReconcileJobs { .. })) => {
            tracing::warn!(
                client_id,
                slot,
                %error,
                "scheduled reconcile not started: no room for it before its next slot"
            )
        }
        Err(error) => tracing::warn!(client_id, slot, %error, "scheduled reconcile not started"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_wall_clock_periods() {
        let period = Duration::from_secs(60);
        assert_eq!(
            next_slot(Duration::from_secs(120), period),
            (3, Duration::from_secs(60))
        );
        assert_eq!(
            next_slot(Duration::from_millis(179_999), period),
            (3, Duration::from_millis(1))
        );
    }

    #[test]
    fn a_slot_runs_once_and_not_before_its_start() {
        let period = Duration::from_secs(60);
        let start = Duration::from_secs(180);
        assert!(due(3, start, period, None));
        assert!(due(3, start + Duration::from_secs(5), period, Some(2)));
        // The wall clock stepped back while the wait ran: early.
        assert!(!due(3, start - Duration::from_secs(13), period, Some(2)));
        // The same slot again, or an older one after a step back of a whole period.
        assert!(!due(3, start, period, Some(3)));
        assert!(!due(2, start, period, Some(3)));
    }

    #[test]
    fn a_slot_is_named_by_its_start() {
        assert_eq!(
            slot_start(3, Duration::from_secs(60)),
            "1970-01-01T00:03:00Z"
        );
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(slot_start(20_427, day), "2025-12-05T00:00:00Z");
    }

    #[test]
    fn a_slot_that_started_while_the_last_one_waited_runs_at_once() {
        let period = Duration::from_secs(60);
        // Slot 3 ran at 180 s; its wait for room ended past 240 s, slot 4's start.
        let (slot, delay) = upcoming_slot(Duration::from_secs(241), period, Some(3));
        assert_eq!((slot, delay), (4, Duration::ZERO));
        assert!(due(slot, Duration::from_secs(241), period, Some(3)));
        // Slot 3 ran, and the clock is still in slot 3: the next is slot 4, at its start.
        assert_eq!(
            upcoming_slot(Duration::from_secs(200), period, Some(3)),
            (4, Duration::from_secs(40))
        );
        // Nothing ran yet (a start), or the last run was long ago (a suspended machine): the
        // next slot to start, never one whose start has passed.
        for last_run in [None, Some(1)] {
            assert_eq!(
                upcoming_slot(Duration::from_secs(241), period, last_run),
                (5, Duration::from_secs(59))
            );
        }
        // The wall clock stepped back past the last run: not that slot again.
        assert_eq!(
            upcoming_slot(Duration::from_secs(130), period, Some(3)),
            (3, Duration::from_secs(50))
        );
        assert!(!due(3, Duration::from_secs(180), period, Some(3)));
    }
}
