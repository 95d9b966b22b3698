//! `--reconcile-every CLIENT_ID=DURATION`: a periodic reconcile job per account.
//!
//! One task per account on the server's `TaskTracker`, stopped by the shutdown token. The
//! first run comes after a random delay within the period, so replicas and restarts do not
//! all call Gameball at once; then one run per period. Each run selects the profiles not
//! updated for a period: a profile whose webhooks keep arriving is fresh and skipped, one whose
//! webhooks were lost gets old and is read back. A tick is skipped while the account's
//! previous job still runs. Replicated mode (issue 13) will have to run schedules on one
//! replica only; nothing here knows of replicas yet.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::jobs::{ReconcileJobs, Selection};
use crate::config::ReconcileEvery;

/// Starts one schedule per entry of `every`.
pub fn start(
    jobs: &ReconcileJobs,
    every: &[ReconcileEvery],
    tracker: &TaskTracker,
    stopping: &CancellationToken,
) {
    for entry in every {
        let first = first_delay(entry.period);
        tracker.spawn(run(jobs.clone(), entry.clone(), first, stopping.clone()));
    }
}

/// A random delay within the period.
fn first_delay(period: Duration) -> Duration {
    let millis = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(fastrand::u64(0..millis))
}

async fn run(
    jobs: ReconcileJobs,
    every: ReconcileEvery,
    first: Duration,
    stopping: CancellationToken,
) {
    let mut delay = first;
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopping.cancelled() => return,
        }
        delay = every.period;
        tick(&jobs, &every);
    }
}

fn tick(jobs: &ReconcileJobs, every: &ReconcileEvery) {
    let client_id = every.client_id.as_str();
    if let Some(job_id) = jobs.running(client_id) {
        tracing::warn!(client_id, %job_id, "scheduled reconcile skipped: the last one still runs");
        return;
    }
    match jobs.start(client_id, Selection::NotUpdatedFor(every.period)) {
        Ok(report) => {
            tracing::info!(client_id, job_id = %report.job_id, "scheduled reconcile started")
        }
        Err(error) => tracing::warn!(client_id, %error, "scheduled reconcile not started"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_run_is_somewhere_within_the_period() {
        let period = Duration::from_secs(3600);
        let delays: Vec<Duration> = (0..50).map(|_| first_delay(period)).collect();
        assert!(delays.iter().all(|delay| *delay < period));
        assert!(
            delays.iter().any(|delay| *delay != delays[0]),
            "not all alike"
        );
    }
}
