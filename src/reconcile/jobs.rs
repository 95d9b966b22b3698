//! Reconciliation jobs: select profiles, fetch them from Gameball's API, apply every answer
//! through the ingest path (the sequencer, or a replica's stream) as an update of origin
//! `Reconcile`, and report progress.
//!
//! [`ReconcileJobs`] is the one handle (cloning it clones an `Arc`). A job is started with
//! [`ReconcileJobs::start`] (the admin RPC and the schedules call it) and runs on the server's
//! `TaskTracker` under a child of the shutdown token: shutdown cancels it, the fetch returns
//! within one request, and the job ends as `Cancelled`. At most `max_jobs` jobs run at once
//! and one per account; finished jobs are kept for an hour (at most the last 100).
//!
//! Every fetched customer is applied, even when nothing drifted (the lead's decision, "always
//! apply"): the fetched values pin the fields' clocks at the fetch time, so any order of
//! webhooks and reconciles ends in the same state. Drift (what the answer actually changed) is
//! measured before applying and counted (`changed` against `unchanged`, a metric per field).
//! The cost: a profile whose values all match still gets a revision, and watchers a change
//! with empty `changed_fields` (the README says so).
//!
//! Explicit customer ids the store does not know are created from the API (a backfill; their
//! `gb_customer_id` stays unset until a webhook brings it). `All` and `NotUpdatedFor` walk the
//! store's known profiles of the account, 1,000 keys at a time.
//!
//! This module knows nothing of tonic or axum: the gRPC adapter (`crate::grpc::reconcile`)
//! only translates requests and [`JobReport`]s. Errors are `crate::error::Error`s.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::account::Account;
use super::client::{ClientOptions, GameballClient, RequestObserver};
use super::fetch::{FetchOptions, FetchSummary, Fetcher, Outcome, Stopped};
use super::mapping::drift;
use super::waiting::WaitingLine;
use crate::error::Error;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::poison::lock;
use crate::profile::{Field, Profile, ProfileKey, ProfileUpdate};
use crate::sequencer::Applied;
use crate::store::Store;
use crate::webhook::secrets::SecretStore;

/// Most customer ids one request may name.
pub const MAX_CUSTOMER_IDS: usize = 10_000;
/// Failures a report lists one by one; the counts cover all.
pub const MAX_LISTED_FAILURES: usize = 100;
/// The most characters of a listed failure's detail; its customer id is cut as error messages
/// cut a caller's text (`crate::error::echoed`). Whole, a webhook's customer id of 60 KB made
/// a report of 100 failures too large for a gRPC message: the job could no longer be read,
/// nor cancelled (found by an adversarial run).
const MAX_DETAIL_CHARS: usize = 512;
/// Keys read from the store per page of a paged selection.
const PAGE: usize = 1_000;
/// How often a journal that refuses writes is tried again for one customer, before the job
/// stops (nothing acknowledged is lost: nothing was).
const RECORD_ATTEMPTS: u32 = 4;

/// The failure reason of a customer fetched but not recorded (the journal refused it).
pub const NOT_RECORDED: &str = "not_recorded";
/// The failure reason of a customer whose update was refused as it is (too large for a stream
/// message): recording it again would be refused the same way.
pub const UPDATE_REFUSED: &str = "update_refused";

/// How jobs call Gameball and how many may run.
#[derive(Clone, Debug)]
pub struct ReconcileOptions {
    /// Timeouts, retries, in-flight bound of each account's client.
    pub client: ClientOptions,
    /// The balance inquiry batch and the update clock margin.
    pub fetch: FetchOptions,
    /// Jobs running at once (`--reconcile-max-jobs`).
    pub max_jobs: usize,
    /// Finished jobs kept for `GetReconcileJob`, at most.
    pub keep_finished: usize,
    /// How long a finished job is kept.
    pub keep_finished_for: Duration,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            client: ClientOptions::default(),
            fetch: FetchOptions::default(),
            max_jobs: 2,
            keep_finished: 100,
            keep_finished_for: Duration::from_secs(3600),
        }
    }
}

/// Which profiles a job reads back.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// These customers (1 to [`MAX_CUSTOMER_IDS`]); unknown ones are created from the API.
    CustomerIds(Vec<String>),
    /// Every profile of the account the store knows.
    All,
    /// Known profiles of the account not updated for longer than this.
    NotUpdatedFor(Duration),
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Still fetching or applying.
    Running,
    /// Ran to the end (some customers may have failed: `failed`).
    Succeeded,
    /// Stopped early: `error` says why (keys refused, journal unavailable).
    Failed,
    /// Stopped by shutdown or [`ReconcileJobs::cancel`].
    Cancelled,
}

impl JobState {
    /// The label of `profile_state_reconcile_jobs_total{result}`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// One customer that could not be reconciled.
#[derive(Clone, Debug, PartialEq)]
pub struct CustomerFailure {
    /// The customer.
    pub customer_id: String,
    /// A reason label (`FailureReason::as_str`, [`NOT_RECORDED`] or [`UPDATE_REFUSED`]).
    pub reason: &'static str,
    /// What Gameball said, or what failed (never a key).
    pub detail: String,
}

/// A job's progress and outcome.
#[derive(Clone, Debug)]
pub struct JobReport {
    /// The job's id.
    pub job_id: String,
    /// The account.
    pub client_id: String,
    /// Where it is.
    pub state: JobState,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Customers selected so far (a paged selection grows while it is walked).
    pub total: u64,
    /// Customers whose fetched values changed the profile (drift).
    pub changed: u64,
    /// Customers applied whose values the profile already held.
    pub unchanged: u64,
    /// Customers that failed.
    pub failed: u64,
    /// Customers never attempted because the job stopped.
    pub not_attempted: u64,
    /// Failures by reason label.
    pub failures_by_reason: BTreeMap<&'static str, u64>,
    /// The first [`MAX_LISTED_FAILURES`] failures.
    pub failures: Vec<CustomerFailure>,
    /// Why the job stopped early.
    pub error: Option<String>,
    /// Gameball API calls made, retries included.
    pub api_requests: u64,
}

impl JobReport {
    /// Customers finished: changed, unchanged or failed.
    pub fn done(&self) -> u64 {
        self.changed + self.unchanged + self.failed
    }

    fn fail(&mut self, customer_id: String, reason: &'static str, detail: String) {
        self.failed += 1;
        *self.failures_by_reason.entry(reason).or_default() += 1;
        if self.failures.len() < MAX_LISTED_FAILURES {
            self.failures.push(CustomerFailure {
                customer_id: crate::error::echoed(&customer_id).into_owned(),
                reason,
                detail: crate::error::cut_to(&detail, MAX_DETAIL_CHARS).into_owned(),
            });
        }
    }
}

/// A job's report, shared by its task and readers. A std mutex: held only to copy or bump.
type JobCell = Arc<Mutex<JobReport>>;

/// The jobs: running and recently finished, and each account's client.
#[derive(Clone)]
pub struct ReconcileJobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    ingest: Ingest,
    secrets: Option<SecretStore>,
    metrics: Metrics,
    options: ReconcileOptions,
    tracker: TaskTracker,
    stopping: CancellationToken,
    table: Mutex<Table>,
    /// Woken whenever a job ends or a waiting schedule leaves the line: the waiting schedules
    /// try again.
    line_moved: Notify,
    /// One client per account, rebuilt when a reload changed the account's settings.
    clients: Mutex<HashMap<Arc<str>, CachedClient>>,
}

/// An account's client, and the settings it was built from (compared by pointer: a reload
/// makes new ones).
type CachedClient = (Arc<Account>, GameballClient);

#[derive(Default)]
struct Table {
    jobs: HashMap<String, JobCell>,
    /// Running job per account.
    running: HashMap<String, String>,
    /// Each running job's cancel token (its own, a child of the server's) and the token its
    /// end cancels, by job id.
    controls: HashMap<String, (CancellationToken, CancellationToken)>,
    /// Finished jobs, oldest first, with when they finished.
    finished: VecDeque<(Instant, String)>,
    /// Scheduled jobs waiting for room, and who goes first.
    line: WaitingLine,
}

/// A schedule's place in the waiting line, left when dropped (started, given up, or the
/// wait dropped at shutdown), which wakes the others: the next in line may start now.
struct Turn<'a> {
    jobs: &'a ReconcileJobs,
    ticket: u64,
}

impl<'a> Turn<'a> {
    fn join(jobs: &'a ReconcileJobs, client_id: &str) -> Turn<'a> {
        let ticket = lock(&jobs.inner.table).line.join(client_id);
        Turn { jobs, ticket }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        lock(&self.jobs.inner.table).line.leave(self.ticket);
        self.jobs.inner.line_moved.notify_waiters();
    }
}

impl ReconcileJobs {
    /// Jobs applying through `ingest`, reading accounts from `secrets` (`None`: no account
    /// is configured), running on `tracker` until `stopping`.
    pub fn new(
        store: Store,
        ingest: Ingest,
        secrets: Option<SecretStore>,
        metrics: Metrics,
        options: ReconcileOptions,
        tracker: TaskTracker,
        stopping: CancellationToken,
    ) -> ReconcileJobs {
        ReconcileJobs {
            inner: Arc::new(Inner {
                store,
                ingest,
                secrets,
                metrics,
                options,
                tracker,
                stopping,
                table: Mutex::default(),
                line_moved: Notify::new(),
                clients: Mutex::default(),
            }),
        }
    }

    /// Whether `client_id` has API settings (for the schedules' start-up check).
    pub fn configured(&self, client_id: &str) -> bool {
        self.account(client_id).is_some()
    }

    /// Starts a job; its first report.
    pub fn start(&self, client_id: &str, selection: Selection) -> Result<JobReport, Error> {
        self.start_job(client_id, selection, None)
    }

    /// Starts a job of the account's `--reconcile-every` schedule, as [`ReconcileJobs::start`];
    /// if it runs to its end, the schedule's last success is now
    /// (`profile_state_reconcile_schedule_last_success_timestamp_seconds`). While the
    /// account's last job or `--reconcile-max-jobs` jobs still run, it waits in line
    /// (`super::waiting`: the account longest without a scheduled job first) and tries again
    /// as jobs end, for up to `wait` (a schedule waits until its next slot). Schedules of one
    /// period fall due together: more accounts than the cap left the rest unreconciled until
    /// the next slot, and the same ones again every slot. `Err` is the last refusal once
    /// `wait` ran out, or any other refusal at once. `waits` hears of the first refusal that
    /// makes it wait (the schedule logs it, naming its slot).
    pub async fn start_scheduled_within(
        &self,
        client_id: &str,
        period: Duration,
        wait: Duration,
        waits: impl FnOnce(&Error),
    ) -> Result<JobReport, Error> {
        let deadline = tokio::time::Instant::now() + wait;
        let turn = Turn::join(self, client_id);
        let mut waits = Some(waits);
        loop {
            // Registered before the attempt, so a job ending between the two is not missed.
            let moved = self.inner.line_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let selection = Selection::NotUpdatedFor(period);
            let refused = match self.start_job(client_id, selection, Some(turn.ticket)) {
                Err(
                    error
                    @ (Error::ReconcileJobRunning { .. } | Error::TooManyReconcileJobs { .. }),
                ) => error,
                started_or_refused => return started_or_refused,
            };
            if let Some(waits) = waits.take() {
                waits(&refused);
            }
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                return Err(refused);
            }
        }
    }

    /// Tells the metrics that the account's schedule started (see
    /// `Metrics::reconcile_schedule_started`).
    pub fn schedule_started(&self, client_id: &str, period: Duration) {
        self.inner
            .metrics
            .reconcile_schedule_started(client_id, period);
    }

    /// Starts a job: a scheduled one when it holds a `turn` in the waiting line.
    fn start_job(
        &self,
        client_id: &str,
        selection: Selection,
        turn: Option<u64>,
    ) -> Result<JobReport, Error> {
        check(client_id, &selection)?;
        let account = self
            .account(client_id)
            .ok_or_else(|| Error::ReconcileNotConfigured {
                client_id: client_id.to_owned(),
                secrets_file: self
                    .inner
                    .secrets
                    .as_ref()
                    .is_some_and(SecretStore::reloads_a_file),
            })?;
        let client = self.client(account)?;
        let (job, cancel) = self.register(client_id, turn)?;
        let scheduled = turn.is_some();
        let report = lock(&job).clone();
        let jobs = self.clone();
        let client_id = client_id.to_owned();
        self.inner.tracker.spawn(async move {
            jobs.inner.metrics.reconcile_job_started();
            let (state, error) = jobs.run(&job, client, selection, &cancel).await;
            // Before the job counts as finished: whoever sees it finished sees this too.
            if scheduled && state == JobState::Succeeded {
                jobs.inner.metrics.reconcile_schedule_succeeded(&client_id);
            }
            jobs.finish(&job, state, error);
        });
        Ok(report)
    }

    /// Cancels a running job: it starts no new customer, drops the requests in flight, and
    /// counts the rest as not attempted. Waits up to `wait` for it to end; its report then
    /// (still running if it has not ended by then). A job that already ended is left as it
    /// ended.
    pub async fn cancel(&self, job_id: &str, wait: Duration) -> Result<JobReport, Error> {
        let control = {
            let mut table = lock(&self.inner.table);
            self.prune(&mut table);
            if !table.jobs.contains_key(job_id) {
                return Err(Error::ReconcileJobNotFound {
                    job_id: job_id.to_owned(),
                });
            }
            table.controls.get(job_id).cloned()
        };
        if let Some((cancel, ended)) = control {
            cancel.cancel();
            let _ = tokio::time::timeout(wait, ended.cancelled()).await;
        }
        self.get(job_id)
    }

    /// A job's report.
    pub fn get(&self, job_id: &str) -> Result<JobReport, Error> {
        let mut table = lock(&self.inner.table);
        self.prune(&mut table);
        table
            .jobs
            .get(job_id)
            .map(|job| lock(job).clone())
            .ok_or_else(|| Error::ReconcileJobNotFound {
                job_id: job_id.to_owned(),
            })
    }

    fn account(&self, client_id: &str) -> Option<Arc<Account>> {
        let secrets = self.inner.secrets.as_ref()?.current();
        secrets.api_account(client_id).cloned()
    }

    /// The account's client, built again when its settings changed (a reload), keeping its
    /// rate limiters ([`GameballClient::reloaded`]).
    fn client(&self, account: Arc<Account>) -> Result<GameballClient, Error> {
        let mut clients = lock(&self.inner.clients);
        let built = match clients.get(&account.client_id) {
            Some((cached, client)) if Arc::ptr_eq(cached, &account) => return Ok(client.clone()),
            Some((_, client)) => client.reloaded(Account::clone(&account)),
            None => {
                let observer: Arc<dyn RequestObserver> = Arc::new(self.inner.metrics.clone());
                let options = self.inner.options.client.clone();
                GameballClient::observed(Account::clone(&account), options, Some(observer))
            }
        };
        let client = built.map_err(|error| {
            tracing::error!(%error, "cannot build the gameball client");
            Error::Unavailable {
                reason: "cannot build the gameball api client; see the server log".into(),
            }
        })?;
        clients.insert(account.client_id.clone(), (account, client.clone()));
        Ok(client)
    }

    /// Enters a new job in the table, unless the server is stopping, or the account's or the
    /// server's limit refuses it, or (a scheduled job, holding a `turn`) a schedule before it
    /// in the waiting line could take the place; the job's cancel token.
    fn register(
        &self,
        client_id: &str,
        turn: Option<u64>,
    ) -> Result<(JobCell, CancellationToken), Error> {
        // A job started now would be cancelled at once: a waiting schedule woken by the jobs
        // that shutdown ended started jobs after it had begun (an adversarial run).
        if self.inner.stopping.is_cancelled() {
            return Err(Error::Unavailable {
                reason: "the server is stopping: it starts no reconcile job".into(),
            });
        }
        let mut guard = lock(&self.inner.table);
        let table = &mut *guard;
        self.prune(table);
        if let Some(job_id) = table.running.get(client_id) {
            return Err(Error::ReconcileJobRunning {
                client_id: client_id.to_owned(),
                job_id: job_id.clone(),
            });
        }
        let max = self.inner.options.max_jobs.max(1);
        if table.running.len() >= max {
            return Err(Error::TooManyReconcileJobs { max });
        }
        if let Some(ticket) = turn {
            let running = &table.running;
            if !table
                .line
                .is_next(ticket, |account| !running.contains_key(account))
            {
                // The place goes to a schedule that has waited longer without a job.
                return Err(Error::TooManyReconcileJobs { max });
            }
            table.line.started(client_id, Instant::now());
        }
        let job_id = uuid::Uuid::new_v4().simple().to_string();
        let job = Arc::new(Mutex::new(JobReport {
            job_id: job_id.clone(),
            client_id: client_id.to_owned(),
            state: JobState::Running,
            started_at: Utc::now(),
            finished_at: None,
            total: 0,
            changed: 0,
            unchanged: 0,
            failed: 0,
            not_attempted: 0,
            failures_by_reason: BTreeMap::new(),
            failures: Vec::new(),
            error: None,
            api_requests: 0,
        }));
        let cancel = self.inner.stopping.child_token();
        let control = (cancel.clone(), CancellationToken::new());
        table.controls.insert(job_id.clone(), control);
        table.jobs.insert(job_id.clone(), Arc::clone(&job));
        table.running.insert(client_id.to_owned(), job_id);
        Ok((job, cancel))
    }

    /// Forgets finished jobs older than `keep_finished_for`, or beyond `keep_finished`.
    fn prune(&self, table: &mut Table) {
        let options = &self.inner.options;
        while let Some((finished, job_id)) = table.finished.front() {
            let expired = finished.elapsed() > options.keep_finished_for;
            if !expired && table.finished.len() <= options.keep_finished {
                break;
            }
            let job_id = job_id.clone();
            table.jobs.remove(&job_id);
            table.finished.pop_front();
        }
    }

    fn finish(&self, job: &JobCell, state: JobState, error: Option<String>) {
        let (job_id, client_id) = {
            let mut report = lock(job);
            report.state = state;
            report.error = error;
            report.finished_at = Some(Utc::now());
            tracing::info!(
                job_id = %report.job_id,
                client_id = %report.client_id,
                state = state.as_str(),
                total = report.total,
                changed = report.changed,
                unchanged = report.unchanged,
                failed = report.failed,
                not_attempted = report.not_attempted,
                api_requests = report.api_requests,
                error = report.error.as_deref().unwrap_or(""),
                "reconcile job finished"
            );
            (report.job_id.clone(), report.client_id.clone())
        };
        self.inner.metrics.reconcile_job_finished(state.as_str());
        let mut table = lock(&self.inner.table);
        table.running.remove(&client_id);
        if let Some((_, ended)) = table.controls.remove(&job_id) {
            ended.cancel();
        }
        table.finished.push_back((Instant::now(), job_id));
        self.prune(&mut table);
        drop(table);
        self.inner.line_moved.notify_waiters();
    }

    /// Fetches and applies concurrently; the state the job ends in and why it stopped early.
    async fn run(
        &self,
        job: &JobCell,
        client: GameballClient,
        selection: Selection,
        cancel: &CancellationToken,
    ) -> (JobState, Option<String>) {
        let attempts_before = client.attempts();
        let fetcher = Fetcher::new(client.clone(), self.inner.options.fetch.clone());
        // The applier stops the fetch (not the server) when the journal refuses the updates.
        let stop = cancel.child_token();
        let (out, outcomes) = mpsc::channel(64);
        let fetch = self.fetch(job, &fetcher, selection, &stop, out);
        let apply = self.apply_all(job, outcomes, &stop);
        let (fetch_error, apply_error) = tokio::join!(fetch, apply);
        let left = {
            let mut report = lock(job);
            report.api_requests = client.attempts() - attempts_before;
            report.not_attempted
        };
        // A cancel that came once every customer was done changed nothing: the job ran to its
        // end (it was reported cancelled, and `--wait` exited 2; found by an adversarial run).
        let cancelled = cancel.is_cancelled() && left > 0;
        match apply_error.or(fetch_error) {
            Some(error) => (JobState::Failed, Some(error)),
            None if cancelled && self.inner.stopping.is_cancelled() => {
                (JobState::Cancelled, Some("server shutting down".into()))
            }
            None if cancelled => (
                JobState::Cancelled,
                Some("cancelled (CancelReconcileJob)".into()),
            ),
            None => (JobState::Succeeded, None),
        }
    }

    /// Walks the selection and fetches it, page by page; why it stopped early, if it did.
    async fn fetch(
        &self,
        job: &JobCell,
        fetcher: &Fetcher,
        selection: Selection,
        stop: &CancellationToken,
        out: mpsc::Sender<Outcome>,
    ) -> Option<String> {
        let client_id = lock(job).client_id.clone();
        let keep: Box<dyn Fn(&Profile) -> bool + Send + Sync> = match selection {
            Selection::CustomerIds(ids) => {
                // Each customer once, in the order given: a repeated id cost its API calls
                // again and counted again in the report (found by an adversarial run).
                let mut seen = HashSet::new();
                let ids: Vec<String> = ids
                    .into_iter()
                    .filter(|id| seen.insert(id.clone()))
                    .collect();
                lock(job).total = ids.len() as u64;
                let summary = fetcher.fetch_many(&ids, stop, &out).await;
                return self.fetched(job, &summary);
            }
            Selection::All => Box::new(|_| true),
            Selection::NotUpdatedFor(age) => {
                // An age past what a timestamp holds selects what was never updated.
                let cutoff = chrono::Duration::from_std(age)
                    .ok()
                    .and_then(|age| Utc::now().checked_sub_signed(age))
                    .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
                Box::new(move |profile| profile.updated_at().is_none_or(|at| at < cutoff))
            }
        };
        let mut after = None;
        let mut error = None;
        while !stop.is_cancelled() && error.is_none() {
            let scan = self
                .inner
                .store
                .scan(Some(&client_id), after.as_ref(), PAGE, |profile| {
                    keep(profile)
                });
            let ids: Vec<String> = scan
                .profiles
                .iter()
                .map(|profile| profile.key.customer_id.to_string())
                .collect();
            lock(job).total += ids.len() as u64;
            if !ids.is_empty() {
                let summary = fetcher.fetch_many(&ids, stop, &out).await;
                error = self.fetched(job, &summary);
            }
            match scan.next {
                Some(next) => after = Some(next),
                None => return error,
            }
        }
        self.count_unattempted(job, &client_id, after, &keep).await;
        error
    }

    /// Counts the rest of a selection a job stopped before, from `after` on, as selected and
    /// not attempted: a job stopped early reported only the pages it had reached, as if that
    /// were the whole selection (found by an adversarial run).
    async fn count_unattempted(
        &self,
        job: &JobCell,
        client_id: &str,
        mut after: Option<ProfileKey>,
        keep: &(dyn Fn(&Profile) -> bool + Send + Sync),
    ) {
        let mut rest = 0;
        loop {
            let scan = self
                .inner
                .store
                .scan(Some(client_id), after.as_ref(), PAGE, |profile| {
                    keep(profile)
                });
            rest += scan.profiles.len() as u64;
            match scan.next {
                Some(next) => after = Some(next),
                None => break,
            }
            // A page at a time, as the fetch: other tasks run in between.
            tokio::task::yield_now().await;
        }
        let mut report = lock(job);
        report.total += rest;
        report.not_attempted += rest;
        drop(report);
        self.inner.metrics.reconcile_profiles("not_attempted", rest);
    }

    /// Counts what a fetch left unattempted; the job's error if the keys were refused.
    fn fetched(&self, job: &JobCell, summary: &FetchSummary) -> Option<String> {
        let not_attempted = summary.not_attempted as u64;
        lock(job).not_attempted += not_attempted;
        self.inner
            .metrics
            .reconcile_profiles("not_attempted", not_attempted);
        match &summary.stopped {
            Some(Stopped::AccountRefused(error)) => Some(format!(
                "gameball refused the account's keys, the job stopped: {error}"
            )),
            Some(Stopped::AskedToWait(error)) => Some(format!(
                "gameball asked to wait {} s before calling again, the job stopped (run it \
                 again later): {error}",
                error.asked_to_wait.unwrap_or_default().as_secs()
            )),
            Some(Stopped::Cancelled) | None => None,
        }
    }

    /// Applies each outcome as it comes; the job's error if the journal refused updates.
    async fn apply_all(
        &self,
        job: &JobCell,
        mut outcomes: mpsc::Receiver<Outcome>,
        stop: &CancellationToken,
    ) -> Option<String> {
        let mut error = None;
        while let Some(outcome) = outcomes.recv().await {
            let metrics = &self.inner.metrics;
            let update = match outcome.result {
                Ok(update) => update,
                Err(failure) => {
                    let reason = failure.reason.as_str();
                    metrics.reconcile_failure(reason);
                    lock(job).fail(outcome.customer_id, reason, failure.to_string());
                    continue;
                }
            };
            if error.is_some() {
                metrics.reconcile_failure(NOT_RECORDED);
                let detail = "not recorded: the job stopped".to_owned();
                lock(job).fail(outcome.customer_id, NOT_RECORDED, detail);
                continue;
            }
            match self.apply(update, stop).await {
                Ok(drifted) => self.applied(job, &drifted),
                // This customer's update itself was refused (larger than a stream message may
                // be, say): the others are still recorded. It stopped the job, blaming the
                // journal (found by an adversarial run).
                Err(refused @ Error::InvalidArgument { .. }) => {
                    metrics.reconcile_failure(UPDATE_REFUSED);
                    lock(job).fail(outcome.customer_id, UPDATE_REFUSED, refused.to_string());
                }
                Err(failure) => {
                    metrics.reconcile_failure(NOT_RECORDED);
                    lock(job).fail(outcome.customer_id, NOT_RECORDED, failure.to_string());
                    error = Some(format!(
                        "the journal refused the updates, the job stopped: {failure}"
                    ));
                    stop.cancel();
                }
            }
        }
        error
    }

    fn applied(&self, job: &JobCell, drifted: &[Field]) {
        let metrics = &self.inner.metrics;
        for field in drifted {
            metrics.reconcile_drift(field.name());
        }
        let mut report = lock(job);
        if drifted.is_empty() {
            report.unchanged += 1;
            metrics.reconcile_profiles("unchanged", 1);
        } else {
            report.changed += 1;
            metrics.reconcile_profiles("changed", 1);
        }
    }

    /// Applies one fetched customer through the ingest path (the sequencer, or a replica's
    /// stream); the fields it corrected.
    ///
    /// Always applied, even without drift: the fetch pins the fields' clocks. A journal that
    /// refuses writes is tried a few times (backing off) before giving up.
    async fn apply(
        &self,
        update: ProfileUpdate,
        stop: &CancellationToken,
    ) -> Result<Vec<Field>, Error> {
        let current = self.inner.store.get(&update.key);
        let drifted = drift(current.as_deref(), &update);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.inner.ingest.apply(update.clone()).await {
                Ok(Applied::Changed { .. }) => return Ok(drifted),
                // A newer webhook came in between: it holds at least what the fetch said.
                Ok(Applied::Unchanged { .. }) => return Ok(Vec::new()),
                Err(Error::Unavailable { .. }) if attempt < RECORD_ATTEMPTS => {
                    let delay = Duration::from_millis(200) * 2u32.pow(attempt);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// Checks a request: the account named, a selection within its limits.
/// What a NUL in an id is refused with.
const NUL: &str = "a NUL character (\\u0000)";

fn check(client_id: &str, selection: &Selection) -> Result<(), Error> {
    if client_id.is_empty() {
        return Err(Error::invalid("client_id", "required"));
    }
    // As a webhook's ids: the key is journaled as it is (see `ingest::payload`).
    if client_id.contains('\0') {
        return Err(Error::invalid("client_id", NUL));
    }
    match selection {
        Selection::CustomerIds(ids) if ids.is_empty() => Err(Error::invalid(
            "customer_ids.ids",
            "at least one customer id is required",
        )),
        Selection::CustomerIds(ids) if ids.len() > MAX_CUSTOMER_IDS => Err(Error::invalid(
            "customer_ids.ids",
            format!(
                "{} ids, more than the {MAX_CUSTOMER_IDS} allowed",
                ids.len()
            ),
        )),
        Selection::CustomerIds(ids) if ids.iter().any(String::is_empty) => {
            Err(Error::invalid("customer_ids.ids", "an empty customer id"))
        }
        Selection::CustomerIds(ids) if ids.iter().any(|id| id.contains('\0')) => Err(
            Error::invalid("customer_ids.ids", format!("a customer id with {NUL}")),
        ),
        Selection::NotUpdatedFor(age) if age.is_zero() => {
            Err(Error::invalid("not_updated_for", "must be positive"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_naming_the_field() {
        let field = |client_id: &str, selection: Selection| {
            check(client_id, &selection)
                .unwrap_err()
                .field()
                .map(str::to_owned)
        };
        assert_eq!(field("", Selection::All).as_deref(), Some("client_id"));
        let ids = |n: usize| Selection::CustomerIds(vec!["c".into(); n]);
        assert_eq!(field("2155", ids(0)).as_deref(), Some("customer_ids.ids"));
        assert_eq!(
            field("2155", ids(MAX_CUSTOMER_IDS + 1)).as_deref(),
            Some("customer_ids.ids")
        );
        assert!(check("2155", &ids(MAX_CUSTOMER_IDS)).is_ok());
        assert_eq!(
            field("2155", Selection::CustomerIds(vec![String::new()])).as_deref(),
            Some("customer_ids.ids")
        );
        assert_eq!(
            field("2155", Selection::NotUpdatedFor(Duration::ZERO)).as_deref(),
            Some("not_updated_for")
        );
        // Ids are journaled as they are: no NUL characters, as in a webhook.
        let nuls = format!("c{}", "\0".repeat(600));
        assert_eq!(
            field("2155", Selection::CustomerIds(vec!["c".into(), nuls])).as_deref(),
            Some("customer_ids.ids")
        );
        assert_eq!(
            field("21\u{0}55", Selection::All).as_deref(),
            Some("client_id")
        );
    }

    fn report() -> JobReport {
        JobReport {
            job_id: "j".into(),
            client_id: "2155".into(),
            state: JobState::Running,
            started_at: Utc::now(),
            finished_at: None,
            total: 0,
            changed: 1,
            unchanged: 1,
            failed: 0,
            not_attempted: 0,
            failures_by_reason: BTreeMap::new(),
            failures: Vec::new(),
            error: None,
            api_requests: 0,
        }
    }

    #[test]
    fn a_report_lists_the_first_failures_and_counts_all() {
        let mut report = report();
        for n in 0..MAX_LISTED_FAILURES + 5 {
            report.fail(
                format!("c-{n}"),
                "not_found",
                "gameball customer not_found".into(),
            );
        }
        assert_eq!(report.failures.len(), MAX_LISTED_FAILURES);
        assert_eq!(report.failed, (MAX_LISTED_FAILURES + 5) as u64);
        assert_eq!(report.failures_by_reason["not_found"], report.failed);
        assert_eq!(report.done(), report.failed + 2);
    }

    #[test]
    fn listed_failures_cut_long_ids_and_details() {
        let mut report = report();
        report.fail("é".repeat(60_000), "not_found", "x".repeat(100_000));
        report.fail("short".into(), "not_found", "said so".into());
        let [long, short] = report.failures.as_slice() else {
            panic!("{:?}", report.failures);
        };
        assert_eq!(long.customer_id, format!("{}…", "é".repeat(128)));
        assert_eq!(long.detail, format!("{}…", "x".repeat(MAX_DETAIL_CHARS)));
        assert_eq!((&*short.customer_id, &*short.detail), ("short", "said so"));
    }
}
