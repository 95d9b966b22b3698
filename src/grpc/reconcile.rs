//! The gRPC adapter for AdminService's reconciliation RPCs (`ReconcileProfiles`,
//! `GetReconcileJob`, `CancelReconcileJob`): it checks the request's shape, calls [`ReconcileJobs`], and converts
//! the [`JobReport`]. Rules (limits, selection, what a job does) are the domain's
//! (`crate::reconcile::jobs`); errors go through `crate::status`.

use std::time::Duration;

use tonic::Status;

use super::convert::timestamp;
use crate::error::Error;
use crate::pb;
use crate::reconcile::{JobReport, JobState, ReconcileJobs, Selection};
use crate::status::grpc_status;

/// Starts a job.
pub(super) fn reconcile_profiles(
    jobs: &ReconcileJobs,
    request: pb::ReconcileProfilesRequest,
) -> Result<pb::ReconcileProfilesResponse, Status> {
    use pb::reconcile_profiles_request::Selection as Pb;
    let selection = match request.selection {
        Some(Pb::CustomerIds(ids)) => Selection::CustomerIds(ids.ids),
        Some(Pb::All(true)) => Selection::All,
        Some(Pb::All(false)) => {
            return Err(grpc_status(Error::invalid("all", "must be true when set")));
        }
        Some(Pb::NotUpdatedFor(age)) => Selection::NotUpdatedFor(duration(&age)?),
        None => {
            return Err(grpc_status(Error::invalid(
                "selection",
                "set one of customer_ids, all, not_updated_for",
            )));
        }
    };
    let report = jobs
        .start(&request.client_id, selection)
        .map_err(grpc_status)?;
    Ok(pb::ReconcileProfilesResponse {
        job_id: report.job_id.clone(),
        job: Some(job(&report)),
    })
}

/// A job's report.
pub(super) fn get_reconcile_job(
    jobs: &ReconcileJobs,
    request: pb::GetReconcileJobRequest,
) -> Result<pb::GetReconcileJobResponse, Status> {
    if request.job_id.is_empty() {
        return Err(grpc_status(Error::invalid("job_id", "required")));
    }
    let report = jobs.get(&request.job_id).map_err(grpc_status)?;
    Ok(pb::GetReconcileJobResponse {
        job: Some(job(&report)),
    })
}

/// How long CancelReconcileJob waits for the job to end before it answers.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// Cancels a job; its report once it ended (or after [`CANCEL_WAIT`]).
pub(super) async fn cancel_reconcile_job(
    jobs: &ReconcileJobs,
    request: pb::CancelReconcileJobRequest,
) -> Result<pb::CancelReconcileJobResponse, Status> {
    if request.job_id.is_empty() {
        return Err(grpc_status(Error::invalid("job_id", "required")));
    }
    let report = jobs
        .cancel(&request.job_id, CANCEL_WAIT)
        .await
        .map_err(grpc_status)?;
    Ok(pb::CancelReconcileJobResponse {
        job: Some(job(&report)),
    })
}

/// The longest `not_updated_for`: older than anything a store holds, and far from the edge of
/// what a timestamp can hold (a larger age was a panic in the job's cutoff).
const MAX_NOT_UPDATED_FOR: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

fn duration(age: &prost_types::Duration) -> Result<Duration, Status> {
    let invalid = |reason: &str| grpc_status(Error::invalid("not_updated_for", reason));
    let seconds = u64::try_from(age.seconds).map_err(|_| invalid("must be positive"))?;
    let nanos = u32::try_from(age.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .ok_or_else(|| invalid("nanos must be from 0 to 999,999,999"))?;
    if seconds > MAX_NOT_UPDATED_FOR.as_secs() {
        return Err(invalid("must be at most 100 years"));
    }
    let age = Duration::new(seconds, nanos);
    if age.is_zero() {
        return Err(invalid("must be positive"));
    }
    Ok(age)
}

fn job(report: &JobReport) -> pb::ReconcileJob {
    pb::ReconcileJob {
        job_id: report.job_id.clone(),
        client_id: report.client_id.clone(),
        state: match report.state {
            JobState::Running => pb::ReconcileJobState::Running,
            JobState::Succeeded => pb::ReconcileJobState::Succeeded,
            JobState::Failed => pb::ReconcileJobState::Failed,
            JobState::Cancelled => pb::ReconcileJobState::Cancelled,
        }
        .into(),
        started_at: Some(timestamp(report.started_at)),
        finished_at: report.finished_at.map(timestamp),
        total: report.total,
        done: report.done(),
        changed: report.changed,
        unchanged: report.unchanged,
        failed: report.failed,
        not_attempted: report.not_attempted,
        failures_by_reason: report
            .failures_by_reason
            .iter()
            .map(|(reason, count)| pb::ReasonCount {
                reason: (*reason).to_owned(),
                count: *count,
            })
            .collect(),
        failures: report
            .failures
            .iter()
            .map(|failure| pb::CustomerFailure {
                customer_id: failure.customer_id.clone(),
                reason: failure.reason.to_owned(),
                detail: failure.detail.clone(),
            })
            .collect(),
        error: report.error.clone().unwrap_or_default(),
        api_requests: report.api_requests,
    }
}
