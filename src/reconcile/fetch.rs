//! Fetching whole customers: which endpoints to call for each, the balance inquiry batch when
//! many are fetched at once, bounded concurrency, cancellation, and stopping early when the
//! account's keys are refused or Gameball asks to wait longer than the client waits.
//!
//! For each customer, one after another (so Gameball never sees two requests for the same
//! customer at once, which it may refuse with code 2001): `/details` (or `/customers/{id}` when
//! the account does not read contact fields), `/tier-progress`, and `/balance`. A customer's
//! first failed call ends that customer: it fails as a whole, no partial update is made.
//!
//! Ids go in chunks of equal size, at most 1,000, one chunk after another. A chunk of at least
//! `bulk_threshold` customers gets a balance inquiry batch, created first; the other endpoints
//! are read while Gameball works on it, and its results replace the `/balance` calls (the
//! batch's calls count in the "Others" bucket, not in the scarcer Customers GET one). Customers
//! the batch gives no readable result for, or every customer of a batch that failed, timed out
//! or could not be read, are asked one by one.
//!
//! The caller receives an [`Outcome`] per customer attempted, as soon as it is known, on a
//! channel (bounded: a slow consumer slows fetching down) and a [`FetchSummary`] at the end.
//! This module does not apply updates; the job that calls it does.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::answers::{self, BatchState, Points};
use super::client::{Answer, GameballClient};
use super::error::{ApiError, Endpoint, FailureReason};
use super::mapping::Fetched;
use crate::profile::ProfileUpdate;

/// Gameball takes at most this many customers per batch.
pub const MAX_BATCH: usize = 1000;

/// When to use the batch, how to wait for it, and the clock margin of updates.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Fetch points with a balance inquiry batch when at least this many customers are fetched
    /// together (0 or 1: always).
    pub bulk_threshold: usize,
    /// How often a batch's status is asked for.
    pub batch_poll_interval: Duration,
    /// A batch not completed by then is given up (its customers are asked one by one).
    pub batch_timeout: Duration,
    /// Subtracted from the fetch time to make an update's clock (clock skew to Gameball).
    pub clock_margin: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            bulk_threshold: 25,
            batch_poll_interval: Duration::from_secs(2),
            batch_timeout: Duration::from_secs(300),
            clock_margin: Duration::from_secs(1),
        }
    }
}

/// What fetching one customer gave.
#[derive(Debug)]
pub struct Outcome {
    /// The customer.
    pub customer_id: String,
    /// Its update, or why there is none.
    pub result: Result<ProfileUpdate, ApiError>,
}

/// Why a fetch stopped before every customer was attempted.
#[derive(Clone, Debug, PartialEq)]
pub enum Stopped {
    /// The cancellation token fired, or the outcome receiver was dropped.
    Cancelled,
    /// Gameball refused the account's keys (401 or 403): no later call could succeed.
    AccountRefused(ApiError),
    /// Gameball asked to wait longer than the client waits (a 429's `Retry-After`): calling on
    /// sent every other customer into the same refusal, against an account asked to pause
    /// (found by an adversarial run).
    AskedToWait(ApiError),
}

/// Counts of a whole fetch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FetchSummary {
    /// Customers with an update.
    pub fetched: usize,
    /// Customers whose fetch failed (each outcome says why).
    pub failed: usize,
    /// Customers never attempted, because the fetch stopped.
    pub not_attempted: usize,
    /// Why it stopped early, if it did.
    pub stopped: Option<Stopped>,
    /// Balance inquiry batches created.
    pub batches: usize,
    /// Customers whose points were asked for one by one although they were in a batch.
    pub batch_fallbacks: usize,
}

/// Fetches customers of one account.
#[derive(Clone)]
pub struct Fetcher {
    client: GameballClient,
    options: FetchOptions,
}

/// State shared by the tasks of one `fetch_many`.
struct Run<'a> {
    cancel: &'a CancellationToken,
    /// The first refusal of the account's keys, or ask to wait longer than the client waits;
    /// once set, nothing new is started.
    refused: OnceLock<ApiError>,
    /// Set once a balance inquiry was forbidden or asked to wait too long: the chunks left are
    /// asked one by one.
    no_batches: AtomicBool,
}

impl Run<'_> {
    fn should_stop(&self) -> bool {
        self.cancel.is_cancelled() || self.refused.get().is_some()
    }

    fn note(&self, error: &ApiError) {
        if error.reason.refuses_account() || error.asked_to_wait.is_some() {
            let _ = self.refused.set(error.clone());
        }
    }

    /// As `note`, for the balance inquiry, which is only a shortcut: a 403 there may be the
    /// key's permissions for batches alone, and a 429 there is about its own bucket (its
    /// customers are then asked one by one, and a refusal of those stops the job). Stopping on
    /// either failed every job of 25 customers or more of such an account, or while batches
    /// were limited (found by adversarial runs).
    fn note_batch(&self, error: &ApiError) {
        if error.reason == FailureReason::Forbidden || error.asked_to_wait.is_some() {
            self.no_batches.store(true, Ordering::Relaxed);
        } else {
            self.note(error);
        }
    }
}

/// A customer's answers other than points, and the points if they were asked for alone.
type Partial = Result<Fetched, ApiError>;

impl Fetcher {
    /// A fetcher calling through `client`.
    pub fn new(client: GameballClient, options: FetchOptions) -> Fetcher {
        Fetcher { client, options }
    }

    /// The client it calls through.
    pub fn client(&self) -> &GameballClient {
        &self.client
    }

    /// Fetches one customer, every endpoint, no batch.
    pub async fn fetch_one(&self, customer_id: &str) -> Result<ProfileUpdate, ApiError> {
        let fetched = self.customer(customer_id, true).await?;
        Ok(self.update(&fetched))
    }

    /// Fetches `customer_ids`, sending an outcome per customer attempted to `out`, and returns
    /// the counts once every customer was attempted or the fetch stopped.
    pub async fn fetch_many(
        &self,
        customer_ids: &[String],
        cancel: &CancellationToken,
        out: &mpsc::Sender<Outcome>,
    ) -> FetchSummary {
        // A child token: a dropped receiver stops this fetch without cancelling the caller's.
        let cancel = &cancel.child_token();
        let run = Run {
            cancel,
            refused: OnceLock::new(),
            no_batches: AtomicBool::new(false),
        };
        let mut summary = FetchSummary::default();
        // Chunks of equal size (1,001 ids: 501 and 500, not 1,000 and a batch of one).
        let chunks = customer_ids.len().div_ceil(MAX_BATCH).max(1);
        let chunk_size = customer_ids.len().div_ceil(chunks).max(1);
        for chunk in customer_ids.chunks(chunk_size) {
            let bulk = chunk.len() >= self.options.bulk_threshold
                && !run.no_batches.load(Ordering::Relaxed);
            if run.should_stop() {
                break;
            }
            let work = async {
                if bulk {
                    self.chunk_with_batch(chunk, &run, out, &mut summary).await
                } else {
                    self.chunk_one_by_one(chunk, &run, out, &mut summary).await
                }
            };
            let receiver_gone = tokio::select! {
                receiver_gone = work => receiver_gone,
                () = cancel.cancelled() => false,
            };
            if receiver_gone {
                cancel.cancel();
            }
        }
        summary.not_attempted = customer_ids.len() - summary.fetched - summary.failed;
        summary.stopped = match run.refused.into_inner() {
            Some(error) if error.asked_to_wait.is_some() => Some(Stopped::AskedToWait(error)),
            Some(error) => Some(Stopped::AccountRefused(error)),
            None if cancel.is_cancelled() && summary.not_attempted > 0 => Some(Stopped::Cancelled),
            None => None,
        };
        tracing::info!(
            client_id = %self.client.account().client_id,
            fetched = summary.fetched,
            failed = summary.failed,
            not_attempted = summary.not_attempted,
            batches = summary.batches,
            batch_fallbacks = summary.batch_fallbacks,
            "gameball fetch finished"
        );
        summary
    }

    /// Every endpoint per customer. Returns whether the outcome receiver is gone.
    async fn chunk_one_by_one(
        &self,
        chunk: &[String],
        run: &Run<'_>,
        out: &mpsc::Sender<Outcome>,
        summary: &mut FetchSummary,
    ) -> bool {
        let mut customers = self.customers(chunk, run, true);
        while let Some((customer_id, partial)) = customers.next().await {
            let result = partial.map(|fetched| self.update(&fetched));
            if self.send(out, summary, &customer_id, result).await {
                return true;
            }
        }
        false
    }

    /// A balance inquiry batch for the chunk, the other endpoints per customer meanwhile, then
    /// `/balance` for whoever the batch gave nothing for. Returns whether the receiver is gone.
    async fn chunk_with_batch(
        &self,
        chunk: &[String],
        run: &Run<'_>,
        out: &mpsc::Sender<Outcome>,
        summary: &mut FetchSummary,
    ) -> bool {
        summary.batches += 1;
        let (batch, partials) = tokio::join!(
            self.balance_inquiry(chunk, run),
            self.customers(chunk, run, false)
                .collect::<Vec<(String, Partial)>>()
        );
        let (mut points, batch_sent_at) = batch.unwrap_or_default();
        let mut fallback = Vec::new();
        let mut ready = Vec::new();
        for (customer_id, partial) in partials {
            match partial {
                Ok(mut fetched) => match points.remove(&customer_id) {
                    Some(batch_points) => {
                        fetched.points = Some(batch_points);
                        if let Some(sent_at) = batch_sent_at {
                            fetched.oldest_sent_at = fetched.oldest_sent_at.min(sent_at);
                        }
                        ready.push((customer_id, Ok(fetched)));
                    }
                    None => fallback.push(fetched),
                },
                Err(error) => ready.push((customer_id, Err(error))),
            }
        }
        summary.batch_fallbacks += fallback.len();
        for (customer_id, result) in ready {
            let result = result.map(|fetched| self.update(&fetched));
            if self.send(out, summary, &customer_id, result).await {
                return true;
            }
        }
        let width = self.client.options().max_in_flight.max(1);
        let mut balances = stream::iter(fallback)
            .map(|fetched| async move {
                if run.should_stop() {
                    return None;
                }
                let customer_id = fetched.customer_id.clone();
                Some((customer_id, self.add_balance(fetched, run).await))
            })
            .buffer_unordered(width);
        while let Some(done) = balances.next().await {
            let Some((customer_id, result)) = done else {
                continue;
            };
            let result = result.map(|fetched| self.update(&fetched));
            if self.send(out, summary, &customer_id, result).await {
                return true;
            }
        }
        false
    }

    /// Each customer of `chunk` fetched, at most `max_in_flight` at once; customers not
    /// started because the run stopped are left out. Ids are cloned into the stream: borrowed
    /// items would keep the future from being `Send` (the compiler cannot prove it for the
    /// closures' higher-ranked lifetimes), and a job must spawn it.
    fn customers<'s>(
        &'s self,
        chunk: &'s [String],
        run: &'s Run<'_>,
        with_balance: bool,
    ) -> impl futures_util::Stream<Item = (String, Partial)> + Send + 's {
        let width = self.client.options().max_in_flight.max(1);
        stream::iter(chunk.iter().cloned())
            .map(move |customer_id| async move {
                if run.should_stop() {
                    return None;
                }
                let partial = self.customer(&customer_id, with_balance).await;
                if let Err(error) = &partial {
                    run.note(error);
                }
                Some((customer_id, partial))
            })
            .buffer_unordered(width)
            .filter_map(std::future::ready)
    }

    /// One customer's endpoints, one after another, stopping at the first failure.
    async fn customer(&self, customer_id: &str, with_balance: bool) -> Partial {
        let client = &self.client;
        let (contact, referral, first) = if client.account().read_contact {
            let answer = client.get_customer(Endpoint::Details, customer_id).await?;
            let (contact, referral) = answers::details(&answer.body, customer_id)
                .map_err(|why| self.bad_answer(Endpoint::Details, why))?;
            (Some(contact), referral, answer.sent_at)
        } else {
            let answer = client.get_customer(Endpoint::Customer, customer_id).await?;
            let referral = answers::customer(&answer.body, customer_id)
                .map_err(|why| self.bad_answer(Endpoint::Customer, why))?;
            (None, referral, answer.sent_at)
        };
        let answer = client
            .get_customer(Endpoint::TierProgress, customer_id)
            .await?;
        let tier = answers::tier_progress(&answer.body)
            .map_err(|why| self.bad_answer(Endpoint::TierProgress, why))?;
        let fetched = Fetched {
            customer_id: customer_id.to_owned(),
            contact,
            referral: Some(referral),
            tier: Some(tier),
            points: None,
            oldest_sent_at: first.min(answer.sent_at),
        };
        if with_balance {
            self.balance(fetched).await
        } else {
            Ok(fetched)
        }
    }

    async fn add_balance(&self, fetched: Fetched, run: &Run<'_>) -> Partial {
        let result = self.balance(fetched).await;
        if let Err(error) = &result {
            run.note(error);
        }
        result
    }

    async fn balance(&self, mut fetched: Fetched) -> Partial {
        let answer: Answer = self
            .client
            .get_customer(Endpoint::Balance, &fetched.customer_id)
            .await?;
        let points = answers::balance(&answer.body)
            .map_err(|why| self.bad_answer(Endpoint::Balance, why))?;
        fetched.points = Some(points);
        fetched.oldest_sent_at = fetched.oldest_sent_at.min(answer.sent_at);
        Ok(fetched)
    }

    /// Creates a balance inquiry for `chunk` and waits for its results. Empty when the batch
    /// cannot be used; then its customers are asked one by one.
    async fn balance_inquiry(
        &self,
        chunk: &[String],
        run: &Run<'_>,
    ) -> Option<(HashMap<String, Points>, Option<DateTime<Utc>>)> {
        let client_id = &self.client.account().client_id;
        // Only what cannot carry personal data or forge a line: Gameball's own words (an
        // error's message, an unreadable answer's values) stay out of the log.
        let give_up = |what: &str, detail: &str| {
            tracing::warn!(%client_id, customers = chunk.len(), detail, "{what}");
            None
        };
        let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let created = match self.client.create_balance_inquiry(&ids).await {
            Ok(created) => created,
            Err(error) => {
                run.note_batch(&error);
                let detail = error.loggable();
                return give_up("balance inquiry not created; asking one by one", &detail);
            }
        };
        let job_id = match answers::batch_created(&created.body) {
            Ok(job_id) => job_id,
            Err(_) => return give_up("balance inquiry answer unreadable", "asking one by one"),
        };
        let deadline = tokio::time::Instant::now() + self.options.batch_timeout;
        loop {
            tokio::time::sleep(self.options.batch_poll_interval).await;
            if run.should_stop() {
                return None;
            }
            let status = match self.client.batch_status(&job_id).await {
                Ok(answer) => answers::batch_status(&answer.body),
                Err(error) => {
                    run.note_batch(&error);
                    let detail = error.loggable();
                    return give_up("balance inquiry status failed; asking one by one", &detail);
                }
            };
            match status {
                Err(why) => return give_up("balance inquiry status unreadable", &why),
                Ok(status) if status.state == BatchState::Completed => {
                    return Some((status.results, Some(created.sent_at)));
                }
                Ok(status) if status.state == BatchState::Failed => {
                    let job = format!("job {job_id:?}");
                    return give_up("balance inquiry failed at gameball", &job);
                }
                Ok(_) if tokio::time::Instant::now() >= deadline => {
                    let job = format!("job {job_id:?}");
                    return give_up("balance inquiry not done in time", &job);
                }
                Ok(_) => {}
            }
        }
    }

    /// A 2xx answer that cannot be read; `why` may quote Gameball's values, so it is made
    /// reportable like an error's message (found by an adversarial run: a 100 KB status with
    /// the secret key in it went whole into a log line).
    fn bad_answer(&self, endpoint: Endpoint, why: String) -> ApiError {
        ApiError {
            status: Some(200),
            attempts: 1,
            ..ApiError::new(
                endpoint,
                FailureReason::BadAnswer,
                self.client.reportable(why),
            )
        }
    }

    fn update(&self, fetched: &Fetched) -> ProfileUpdate {
        fetched.to_update(&self.client.account().client_id, self.options.clock_margin)
    }

    /// Sends an outcome and, once it is sent, counts it. Returns whether the receiver is gone.
    /// Counted before, an outcome whose send a cancel dropped (the channel full with a batch's
    /// outcomes) was neither applied nor counted as not attempted: the job's counts missed a
    /// customer (found by an adversarial run).
    async fn send(
        &self,
        out: &mpsc::Sender<Outcome>,
        summary: &mut FetchSummary,
        customer_id: &str,
        result: Result<ProfileUpdate, ApiError>,
    ) -> bool {
        let fetched = result.is_ok();
        let outcome = Outcome {
            customer_id: customer_id.to_owned(),
            result,
        };
        if out.send(outcome).await.is_err() {
            return true;
        }
        match fetched {
            true => summary.fetched += 1,
            false => summary.failed += 1,
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{Account, ClientOptions};

    /// A 2xx answer's unreadable value went whole into a report and a log line, secret key
    /// included (found by an adversarial run): a bad answer's reason is made reportable.
    #[test]
    fn a_bad_answers_reason_is_redacted_and_cut() {
        let account = Account::new("2155", "api-key-123", "secret-key-456").unwrap();
        let client = GameballClient::new(account, ClientOptions::default()).unwrap();
        let fetcher = Fetcher::new(client, FetchOptions::default());
        let status =
            serde_json::json!({"status": format!("weird SECRET-KEY-456 {}", "z".repeat(100_000))});
        let why = answers::batch_status(&status).unwrap_err();
        let error = fetcher.bad_answer(Endpoint::Balance, why);
        assert!(
            error.detail.starts_with("status \"weird [redacted] zzz"),
            "{}",
            error.detail
        );
        assert!(
            error.detail.len() <= 200 + '…'.len_utf8(),
            "{}",
            error.detail.len()
        );
    }

    /// A send a cancel drops (the channel full) leaves the outcome uncounted, so that the
    /// summary's `not_attempted` covers it.
    #[tokio::test]
    async fn an_outcome_is_counted_once_sent_and_not_when_its_send_is_dropped() {
        let account = Account::new("2155", "k", "s").unwrap();
        let client = GameballClient::new(account, ClientOptions::default()).unwrap();
        let fetcher = Fetcher::new(client, FetchOptions::default());
        let failed = |customer: &str| ApiError {
            endpoint: Endpoint::Details,
            reason: FailureReason::NotFound,
            status: Some(404),
            gameball_code: None,
            detail: format!("{customer} not found"),
            attempts: 1,
            asked_to_wait: None,
        };
        let (out, mut outcomes) = mpsc::channel(1);
        let mut summary = FetchSummary::default();
        assert!(
            !fetcher
                .send(&out, &mut summary, "a", Err(failed("a")))
                .await
        );
        assert_eq!((summary.fetched, summary.failed), (0, 1));
        // The channel is full: the next send waits (polled first), and a cancel drops it.
        tokio::select! {
            biased;
            _ = fetcher.send(&out, &mut summary, "b", Err(failed("b"))) => panic!("sent"),
            () = tokio::task::yield_now() => {}
        }
        assert_eq!((summary.fetched, summary.failed), (0, 1));
        assert_eq!(outcomes.recv().await.unwrap().customer_id, "a");
        drop(outcomes);
        assert!(
            fetcher
                .send(&out, &mut summary, "c", Err(failed("c")))
                .await
        );
        assert_eq!(
            (summary.fetched, summary.failed),
            (0, 1),
            "the receiver was gone"
        );
    }

    /// A job spawns the fetch on the runtime, so its future must be `Send`.
    #[test]
    fn a_fetch_can_be_spawned() {
        fn spawnable<T: Send + 'static>(_: T) {}
        let account = Account::new("2155", "k", "s").unwrap();
        let client = GameballClient::new(account, ClientOptions::default()).unwrap();
        let fetcher = Fetcher::new(client, FetchOptions::default());
        let (out, _outcomes) = mpsc::channel(1);
        spawnable(async move {
            fetcher
                .fetch_many(&["a".to_owned()], &CancellationToken::new(), &out)
                .await
        });
    }
}
