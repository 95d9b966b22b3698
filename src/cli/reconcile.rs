//! `profile-state reconcile`: starts a reconcile job on a running server (AdminService
//! `ReconcileProfiles`) and, with `--wait`, follows it to the end (`GetReconcileJob`); with
//! `--cancel JOB_ID`, cancels one (`CancelReconcileJob`: exit 0 once it has ended).
//!
//! It never reads API keys: the server has them. Prints the job id (stdout); with `--wait`,
//! progress on stderr each second and the final counts and failures on stdout (one JSON object
//! with `--json`). Exit statuses: 0 when the job started (without `--wait`) or ended with no
//! failed customer; 1 when some customers failed, or the server cannot be reached or refuses;
//! 2 when the job stopped early (keys refused, journal unavailable, shutdown, or the server
//! gone or restarted while the job ran); 64 for a usage error. This module formats; the rules
//! are the server's.

use std::io::Write as _;
use std::time::Duration;

use serde_json::json;

use super::client::{AdminClient, Connection, refused, timeout_help};
use super::{Failure, Sources, printable};
use crate::pb;
use crate::pb::reconcile_profiles_request::Selection;

/// `profile-state reconcile ...`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["customer_id", "all", "not_updated_for", "cancel"])))]
#[command(group(clap::ArgGroup::new("outcome").args(["wait", "cancel"])))]
#[command(mut_arg(
    "timeout",
    timeout_help("each answer (with --wait: each look at the job, one a second)")
))]
// Written out: clap's usage leaves an argument that is only `required_unless_present` among
// the [OPTIONS], and so hid that --client-id is needed (a first-user review).
#[command(override_usage = USAGE)]
pub struct Args {
    /// The Gameball account (its API keys are in the server's secrets file).
    #[arg(long, required_unless_present = "cancel")]
    client_id: Option<String>,
    /// Reconcile this customer (repeatable; unknown ones are created from the API).
    #[arg(long = "customer-id", value_name = "ID")]
    customer_id: Vec<String>,
    /// Reconcile every profile of the account the server knows.
    #[arg(long)]
    all: bool,
    /// Reconcile the account's profiles not updated for this long (e.g. `7d`).
    #[arg(long, value_parser = age, value_name = "AGE")]
    not_updated_for: Option<Duration>,
    /// Cancel this running job instead (its id, as printed when it started), then print how it
    /// ended; a job that already ended is printed as it ended.
    #[arg(long, value_name = "JOB_ID", conflicts_with_all = ["client_id", "wait"])]
    cancel: Option<String>,
    /// Follow the job until it ends, then print its outcome.
    #[arg(long)]
    wait: bool,
    /// With --wait or --cancel, print the outcome as one JSON object.
    #[arg(long, requires = "outcome")]
    json: bool,
    #[command(flatten)]
    connection: Connection,
}

/// The two ways to run `reconcile`: start a job (of an account), or cancel one.
const USAGE: &str = "profile-state reconcile --client-id <CLIENT_ID> \
                     <--customer-id <ID>...|--all|--not-updated-for <AGE>> [--wait] [OPTIONS]\n       \
                     profile-state reconcile --cancel <JOB_ID> [OPTIONS]";

/// Parses `--not-updated-for`, with the server's words for a duration that is not one ("a
/// duration is a number and a unit, such as ..."; humantime's own named neither) and for one
/// that is zero ("must be more than zero": it was sent, and refused by the server, exit 1
/// after connecting). Not the server's year-long limit of its flags: the server takes an age
/// of up to 100 years, and says so itself.
fn age(text: &str) -> Result<Duration, String> {
    // The server's parser fails wherever humantime does, its message explained.
    let age = humantime::parse_duration(text).map_err(|error| {
        crate::config::duration(text)
            .err()
            .unwrap_or(error.to_string())
    })?;
    match age.is_zero() {
        true => Err(crate::config::ZERO_DURATION.to_owned()),
        false => Ok(age),
    }
}

/// Starts the job (and follows it); returns the exit status.
pub fn run(args: Args, sources: &Sources) -> std::process::ExitCode {
    super::block_on(sources, async move {
        let mut client = args.connection.admin().await?;
        if let Some(job_id) = args.cancel {
            return cancel(&mut client, job_id, args.json).await;
        }
        let selection = if args.all {
            Selection::All(true)
        } else if let Some(age) = args.not_updated_for {
            Selection::NotUpdatedFor(prost_types::Duration {
                seconds: i64::try_from(age.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(age.subsec_nanos()).unwrap_or(0),
            })
        } else {
            Selection::CustomerIds(pb::CustomerIds {
                ids: args.customer_id,
            })
        };
        let started = client
            .reconcile_profiles(pb::ReconcileProfilesRequest {
                client_id: args.client_id.unwrap_or_default(),
                selection: Some(selection),
            })
            .await
            .map_err(|status| refused("starting the reconcile job", &status))?
            .into_inner();
        if !args.wait {
            return write(&format!("{}\n", started.job_id));
        }
        eprintln!("profile-state: reconcile job {}", started.job_id);
        let job = follow(&mut client, &started.job_id).await?;
        print_report(&job, args.json)?;
        outcome(&job)
    })
}

/// Cancels the job and prints how it ended: exit 0 once it has ended, whichever way (a job
/// that had ended already is left as it was); 1 if it still ran when the server answered.
async fn cancel(client: &mut AdminClient, job_id: String, json: bool) -> Result<(), Failure> {
    let what = format!("cancelling reconcile job {job_id}");
    let request = pb::CancelReconcileJobRequest { job_id };
    let job = client
        .cancel_reconcile_job(request)
        .await
        .map_err(|status| refused(&what, &status))?
        .into_inner()
        .job
        .ok_or_else(|| Failure::Failed(format!("{what}: the server sent no job")))?;
    print_report(&job, json)?;
    match job.state() {
        pb::ReconcileJobState::Running => Err(Failure::Failed(format!(
            "reconcile job {} has not ended yet; GetReconcileJob tells when it has",
            job.job_id
        ))),
        _ => Ok(()),
    }
}

/// How long `--wait` keeps asking a server it lost before it says the job ended with it.
const SERVER_GONE_AFTER: Duration = Duration::from_secs(5);

/// Polls the job each second until it ends, showing progress on stderr.
async fn follow(client: &mut AdminClient, job_id: &str) -> Result<pb::ReconcileJob, Failure> {
    let mut unreachable_since = None;
    // The last progress shown: a line only when it moved (the same line came every second).
    let mut shown = None;
    loop {
        let request = pb::GetReconcileJobRequest {
            job_id: job_id.to_owned(),
        };
        let job = match client.get_reconcile_job(request).await {
            Ok(answer) => answer.into_inner().job,
            Err(status) => {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                match lost_server(job_id, &status, since.elapsed()) {
                    Some(failure) => return Err(failure),
                    None => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
        };
        unreachable_since = None;
        let job =
            job.ok_or_else(|| Failure::Failed(format!("reconcile job {job_id}: no job sent")))?;
        if job.state() != pb::ReconcileJobState::Running {
            return Ok(job);
        }
        let progress = (job.done, job.total, job.changed, job.failed);
        if shown != Some(progress) {
            eprintln!("profile-state: {}", progress_line(&job));
            shown = Some(progress);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A running job's progress, as `--wait` shows it.
fn progress_line(job: &pb::ReconcileJob) -> String {
    match job.total {
        // Its customers are not chosen yet ("0 of 0 done" said nothing; a fresh-eyes run).
        0 => "choosing the customers to read back".to_owned(),
        total => format!(
            "{} of {total} done ({} changed, {} failed)",
            job.done, job.changed, job.failed
        ),
    }
}

/// What a failed poll of a job already running means, or `None` to ask again. Jobs live in
/// their server's memory: a server that stopped (unreachable for [`SERVER_GONE_AFTER`]) or
/// restarted (the job unknown) ended the job with it, exit 2 as for any job stopped early;
/// it used to read as a failed connection, exit 1.
fn lost_server(job_id: &str, status: &tonic::Status, unreachable_for: Duration) -> Option<Failure> {
    let ended = |how: &str| {
        Failure::Stopped(format!(
            "reconcile job {job_id} stopped early: {how}, which ends the jobs it runs; start \
             the job again once the server is back ({}: {})",
            crate::metrics::grpc_code_name(status.code()),
            printable(status.message())
        ))
    };
    // A status with a source was made by this client's transport (a connection reset or
    // closed, as a proxy does when the server behind it goes away), not sent by the server.
    let unreachable =
        status.code() == tonic::Code::Unavailable || std::error::Error::source(status).is_some();
    match status.code() {
        _ if unreachable && unreachable_for < SERVER_GONE_AFTER => None,
        _ if unreachable => Some(ended(&format!(
            "the server has been unreachable for {}s (it stopped or restarted; if only the \
             network dropped, the job may still run: GetReconcileJob tells)",
            unreachable_for.as_secs()
        ))),
        tonic::Code::NotFound => Some(ended(
            "the server no longer knows it (it restarted, or the job ended and left the \
             server's last 100 finished jobs)",
        )),
        _ => Some(refused(&format!("reconcile job {job_id}"), status)),
    }
}

/// Prints the job's counts and failures.
fn print_report(job: &pb::ReconcileJob, json: bool) -> Result<(), Failure> {
    let state = match job.state() {
        pb::ReconcileJobState::Running => "running",
        pb::ReconcileJobState::Succeeded => "succeeded",
        pb::ReconcileJobState::Failed => "failed",
        pb::ReconcileJobState::Cancelled => "cancelled",
        _ => "unknown",
    };
    let text = if json {
        let failures: Vec<_> = job
            .failures
            .iter()
            .map(|f| json!({"customer_id": f.customer_id, "reason": f.reason, "detail": f.detail}))
            .collect();
        let by_reason: serde_json::Map<_, _> = job
            .failures_by_reason
            .iter()
            .map(|r| (r.reason.clone(), json!(r.count)))
            .collect();
        format!(
            "{}\n",
            json!({
                "job_id": job.job_id, "client_id": job.client_id, "state": state,
                "total": job.total, "changed": job.changed, "unchanged": job.unchanged,
                "failed": job.failed, "not_attempted": job.not_attempted,
                "failures_by_reason": by_reason, "failures": failures,
                "error": job.error, "api_requests": job.api_requests,
            })
        )
    } else {
        let mut text = format!(
            "job {} {state}: {} customers, {} changed, {} unchanged, {} failed, {} not attempted, \
             {} API requests\n",
            job.job_id,
            job.total,
            job.changed,
            job.unchanged,
            job.failed,
            job.not_attempted,
            job.api_requests
        );
        for failure in &job.failures {
            text += &format!(
                "{}\t{}\t{}\n",
                printable(&failure.customer_id),
                printable(&failure.reason),
                printable(&failure.detail)
            );
        }
        text
    };
    write(&text)
}

/// The failure a followed job's end sets the exit status by, if any.
fn outcome(job: &pb::ReconcileJob) -> Result<(), Failure> {
    match job.state() {
        pb::ReconcileJobState::Succeeded if job.failed == 0 => Ok(()),
        pb::ReconcileJobState::Succeeded => Err(Failure::Failed(format!(
            "{} customer(s) could not be reconciled",
            job.failed
        ))),
        _ => Err(Failure::Stopped(format!(
            "reconcile job {} stopped early: {}",
            job.job_id,
            printable(&job.error)
        ))),
    }
}

fn write(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|error| Failure::Failed(format!("writing to stdout: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_counted_once_the_customers_are_chosen() {
        let mut job = pb::ReconcileJob::default();
        assert_eq!(progress_line(&job), "choosing the customers to read back");
        (job.total, job.done, job.changed, job.failed) = (10, 4, 2, 1);
        assert_eq!(progress_line(&job), "4 of 10 done (2 changed, 1 failed)");
    }

    #[test]
    fn a_job_its_server_forgot_names_the_code_as_grpc_does() {
        let status = tonic::Status::not_found("no job abc");
        let failure = lost_server("abc", &status, Duration::ZERO).unwrap();
        let text = failure.to_string();
        assert!(text.ends_with("(NOT_FOUND: no job abc)"), "{text}");
    }

    #[test]
    fn the_written_usage_names_every_way_to_run_the_command() {
        use clap::Args as _;
        let command = Args::augment_args(clap::Command::new("reconcile"));
        let selection = command
            .get_groups()
            .find(|group| group.get_id() == "selection");
        let client_id = clap::Id::from("client_id");
        let mut named = selection.unwrap().get_args().collect::<Vec<_>>();
        named.push(&client_id);
        for id in named {
            let arg = command.get_arguments().find(|arg| arg.get_id() == id);
            let long = arg.unwrap().get_long().unwrap();
            assert!(
                USAGE.contains(&format!("--{long} <")) || USAGE.contains(&format!("--{long}|")),
                "{long}"
            );
        }
    }
}
