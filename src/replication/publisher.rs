//! The publisher: what the ingest path records through in replicated mode.
//!
//! A caller hands over a validated [`ProfileUpdate`] and waits. One task takes what queued up
//! as one batch (group commit on the stream, as the sequencer does on the journal), cut where
//! its encoding would pass the server's `max_payload` (or the stream's smaller `max_msg_size`),
//! and publishes it as one stream message
//! with its content-derived `Nats-Msg-Id`. [`MAX_IN_FLIGHT`] batches are acknowledged at once
//! (one): what arrives while a publish waits for its quorum forms the next batch, exactly as
//! the journal's group commit waits for one fsync; after a batch of several, the next may wait
//! a bounded time for as many more (`super::linger`, `--nats-publish-linger`). Every stream
//! message costs each of the three nats-servers a Raft round with an fsync, far more than a
//! replica spends on it, so fewer, larger messages is what the cluster's throughput depends on
//! (BENCHMARKS.md, Replicas: 4 in flight gave 2-3 webhooks per message, 1 gives 6-7, with the
//! linger 14-15, each step cutting the cluster's CPU per webhook).
//! Should it be raised again, the order of concurrent batches does not matter (every replica
//! applies whatever order the stream gives, and each caller waits for its own outcome).
//! Once acknowledged, each caller waits until this replica's applier has
//! applied the message (`super::pending`), and is answered with the real outcome: `Changed`
//! with its revision, `Unchanged`, or refused for growing its profile past the bound
//! (`crate::profile::check_growth`). The stream drops a repeat of a refused update (a
//! Gameball retry, a dead letter's replay) as a duplicate, yet by then room may have been made:
//! such a repeat is published again under an id of its own and applied anew.
//!
//! An update whose message alone would pass the cap (the smaller of `max_payload` and the
//! stream's `max_msg_size`) is never published: it is refused as `InvalidArgument`, which the
//! ingest path keeps as a dead letter (422), as it would be on every retry.
//!
//! Failures: not connected, not acknowledged in `--nats-request-timeout`, or refused (the
//! stream full) is `Unavailable` (503): not recorded, or recorded without the ack reaching us,
//! in which case the retry is deduplicated or merges as unchanged. Acknowledged but not
//! applied here within the webhook's time is `Unavailable` too, saying the update is recorded
//! and a retry is harmless, and is counted. Nothing here merges, numbers or stores.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::linger::{Linger, Wait};
use super::pending::{Pending, Registered, Reply};
use crate::error::Error;
use crate::jetstream::{JetStreamError, Published, UpdateBatch, UpdateStream, delivery_id};
use crate::journal::codec::UpdateRecord;
use crate::metrics::Metrics;
use crate::profile::{Profile, ProfileKey, ProfileUpdate, check_growth};
use crate::sequencer::Applied;
use crate::store::Store;

/// How many waiting updates one batch takes at most (as the sequencer).
pub const MAX_BATCH: usize = 512;
/// Batches published and not yet acknowledged at once. One: more in flight cut the batches
/// into smaller stream messages, and each message costs the nats-servers far more than its
/// updates do (measured with `profile-state-bench cluster`, see the module doc).
pub(super) const MAX_IN_FLIGHT: usize = 1;
/// Room left under the server's `max_payload` for the message's headers.
const HEADROOM: usize = 1024;

struct Request {
    update: ProfileUpdate,
    reply: Reply,
    /// The stream sequence once acknowledged (0 until then): what a caller that runs out of
    /// time says about its update.
    acked: Arc<AtomicU64>,
}

/// Handle to the publisher task. Cloning it is cheap; the task ends once every handle is gone
/// and what it holds is answered, and then tells the applier it may stop.
#[derive(Clone)]
pub struct Publisher {
    requests: mpsc::Sender<Request>,
    apply_timeout: Duration,
    metrics: Metrics,
}

/// What the publisher task needs.
pub(super) struct Parts {
    pub stream: UpdateStream,
    pub pending: Arc<Pending>,
    pub store: Store,
    pub metrics: Metrics,
    /// How long a caller waits for its outcome (a little under the webhook timeout, so that
    /// the answer says what happened rather than the ingress's generic timeout).
    pub apply_timeout: Duration,
    /// Cancelled once the publisher has stopped and nobody waits for an apply any more.
    pub done: CancellationToken,
    /// The longest a batch waits for more updates (`--nats-publish-linger`; zero: never).
    pub linger: Duration,
    /// How often a failed publish is warned about: a full stream or an outage fails every one.
    pub failure_log: crate::logging::RateLimited,
    /// Whether the stream is still the one this replica follows.
    pub status: super::ReplicaStatus,
}

impl Publisher {
    /// Starts the publisher task on `tracker`.
    pub(super) fn start(parts: Parts, tracker: &TaskTracker) -> Publisher {
        let (requests, inbox) = mpsc::channel(4 * MAX_BATCH);
        let publisher = Publisher {
            requests,
            apply_timeout: parts.apply_timeout,
            metrics: parts.metrics.clone(),
        };
        let task = Task {
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tracker: tracker.clone(),
            parts: Arc::new(parts),
        };
        tracker.spawn(task.run(inbox));
        publisher
    }

    /// Records one update in the stream and returns once this replica has applied it, with
    /// its outcome.
    pub async fn apply(&self, update: ProfileUpdate) -> Result<Applied, Error> {
        let (reply, outcome) = oneshot::channel();
        let acked = Arc::new(AtomicU64::new(0));
        let request = Request {
            update,
            reply,
            acked: Arc::clone(&acked),
        };
        let stopped = || Error::Unavailable {
            reason: "the replica is stopping; retry".into(),
        };
        self.requests.send(request).await.map_err(|_| stopped())?;
        let answer = tokio::time::timeout(self.apply_timeout, outcome).await;
        match (answer, acked.load(Ordering::Acquire)) {
            (Ok(Ok(result)), _) => result,
            // Still being published when the wait ran out: it may yet be recorded.
            (_, 0) => Err(Error::Unavailable {
                reason: "the update was not confirmed in the replicated log in time (it may \
                         still be recorded); a retry is harmless"
                    .into(),
            }),
            (_, sequence) => {
                self.metrics.replication_recorded_not_applied();
                Err(Error::Unavailable {
                    reason: format!(
                        "the update is recorded in the replicated log (stream sequence \
                         {sequence}) but this replica has not applied it yet; a retry is \
                         harmless"
                    ),
                })
            }
        }
    }
}

struct Task {
    parts: Arc<Parts>,
    in_flight: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl Task {
    async fn run(self, mut inbox: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut linger = Linger::new(self.parts.linger);
        // The last publish's round trip in µs (written by its task), and the size of the batch
        // it carried (known here), handed to the linger once its slot is free again.
        let round_trip = Arc::new(AtomicU64::new(0));
        let mut previous = None;
        loop {
            // A slot first, then the batch: what queues up while all slots are busy joins it.
            let permit = Arc::clone(&self.in_flight)
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            if let Some(size) = previous.take() {
                let micros = round_trip.load(Ordering::Acquire);
                linger.published(size, Duration::from_micros(micros));
            }
            if next_batch(&mut inbox, &mut batch, &linger).await == 0 {
                break;
            }
            previous = Some(batch.len());
            let limit = self.parts.stream.message_cap().saturating_sub(HEADROOM);
            let (parts, too_large) = split(batch.drain(..), limit);
            for (request, bytes) in too_large {
                answer_too_large(&self.parts, request, bytes, limit);
            }
            let mut permit = Some(permit);
            for part in parts {
                let slot = match permit.take() {
                    Some(slot) => slot,
                    None => Arc::clone(&self.in_flight)
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed"),
                };
                let parts = Arc::clone(&self.parts);
                let round_trip = Arc::clone(&round_trip);
                self.tracker.spawn(async move {
                    let started = Instant::now();
                    publish(&parts, part).await;
                    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    round_trip.store(micros, Ordering::Release);
                    drop(slot);
                });
            }
        }
        // Every handle is gone: let the publishes in flight finish, then the applies callers
        // wait for (they give up after the apply timeout anyway), then the applier may stop.
        let all = u32::try_from(MAX_IN_FLIGHT).expect("a few");
        let _all = self.in_flight.acquire_many(all).await;
        let deadline = Instant::now() + self.parts.apply_timeout;
        while self.parts.pending.has_waiters() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.parts.done.cancel();
        tracing::debug!("publisher stopped");
    }
}

/// Takes the next batch into `batch` once the publish slot is free: what is queued, or else the
/// first arrival, then what the linger waits for. Zero: every handle is gone. Public (and
/// generic over what is queued) so that the load tool's no-op replica batches by this very
/// code, not a copy.
pub async fn next_batch<T>(
    inbox: &mut mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    linger: &Linger,
) -> usize {
    // Counted before waiting for arrivals, so the last batch's callers are not counted twice
    // (`super::linger`).
    let queued = inbox.len();
    if inbox.recv_many(batch, MAX_BATCH).await == 0 {
        return 0;
    }
    if let Some(wait) = linger.wait(queued) {
        fill(inbox, batch, wait).await;
    }
    batch.len()
}

/// Adds what arrives to `batch` until it holds `wait.updates` or `wait.for_at_most` has passed
/// (or every handle is gone: the batch is published as it is).
async fn fill<T>(inbox: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, wait: Wait) {
    let deadline = tokio::time::Instant::now() + wait.for_at_most;
    let wanted = wait.updates.min(MAX_BATCH);
    while batch.len() < wanted {
        let room = MAX_BATCH - batch.len();
        match tokio::time::timeout_at(deadline, inbox.recv_many(batch, room)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A batch to publish: each caller with its record.
type Batch = Vec<(Request, UpdateRecord)>;

/// Cuts requests into batches whose encoding stays within `limit` bytes, in their order, and
/// sets aside each update whose message alone would pass it, with that message's size: no
/// stream message can carry it, now or on a retry ([`answer_too_large`]).
fn split(
    requests: impl Iterator<Item = Request>,
    limit: usize,
) -> (Vec<Batch>, Vec<(Request, usize)>) {
    let mut batches: Vec<Batch> = Vec::new();
    let mut too_large = Vec::new();
    let mut size = 0;
    for request in requests {
        let record = UpdateRecord::new(0, &request.update);
        let len = record_len(&record);
        if len > limit {
            too_large.push((request, len));
            continue;
        }
        match batches.last_mut() {
            Some(batch) if size + len <= limit => {
                size += len;
                batch.push((request, record));
            }
            _ => {
                size = len;
                batches.push(vec![(request, record)]);
            }
        }
    }
    (batches, too_large)
}

/// Answers an update whose stream message alone would be `bytes`, over `limit`: a permanent
/// refusal on `body` (the ingest path keeps it as a dead letter and answers 422), since a
/// retry would be refused the same way; counted as a `too_large` publish failure. It was a
/// 503 "retry later" for ever, and Gameball drops a delivery after its retries (found by an
/// adversarial run: JSON numbers such as `1e15` are kept re-serialized, several times longer).
fn answer_too_large(parts: &Parts, request: Request, bytes: usize, limit: usize) {
    parts.metrics.replication_publish_failed("too_large");
    let _ = request.reply.send(Err(Error::InvalidArgument {
        field: "body".into(),
        reason: format!(
            "the update's recorded form is {bytes} bytes, more than the {limit} bytes a message \
             of the replicated log may carry (the smaller of the NATS servers' max_payload and \
             the stream's max_msg_size, less {HEADROOM} for headers); raise those limits and \
             replay it"
        ),
    }));
}

/// Bytes a record takes in an [`UpdateBatch`]: its tag, its length and itself.
fn record_len(record: &UpdateRecord) -> usize {
    let len = prost::Message::encoded_len(record);
    1 + prost::length_delimiter_len(len) + len
}

/// Publishes one batch and hands each caller to the pending table (or answers it).
async fn publish(parts: &Parts, batch: Vec<(Request, UpdateRecord)>) {
    let (requests, records): (Vec<Request>, Vec<UpdateRecord>) = batch.into_iter().unzip();
    let message = UpdateBatch { updates: records };
    publish_as(
        parts,
        requests,
        message.message_id(),
        message,
        Repeat::First,
    )
    .await;
}

/// Which publish of an update this is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Under its content's id, as every update is published first.
    First,
    /// Again, alone, under its id and the revision of its profile here: a repeat of an update
    /// the merge refused ([`refused_before`]).
    Again,
}

/// [`publish`] under the message id `id`.
async fn publish_as(
    parts: &Parts,
    requests: Vec<Request>,
    id: String,
    message: UpdateBatch,
    repeat: Repeat,
) {
    let started = Instant::now();
    // Read before the publish: its message cannot have been applied before it existed (after,
    // it may be, as the delivery and the acknowledgement race).
    let applied_before = parts.pending.applied_through();
    if let Some(reason) = parts.status.replaced() {
        // Its outcome could not be known here: this replica holds the old stream's state.
        return answer_replaced(parts, requests, reason, NOT_RECORDED);
    }
    if let Some(reason) = parts.status.missing() {
        return answer_missing(parts, requests, reason, NOT_RECORDED);
    }
    let published = if parts.stream.nats().is_connected() {
        // Raced against the stream's status: a publish to a stream deleted meanwhile waits out
        // `--nats-request-timeout`, and every webhook queued behind it waited too, where those
        // after it are answered at once (adversarial run of session 38, F3).
        tokio::select! {
            biased;
            published = parts.stream.publish_as(&message, &id) => published,
            reason = parts.status.until_missing() => {
                return answer_missing(parts, requests, reason, MAY_BE_RECORDED);
            }
        }
    } else {
        // Fail fast: a publish while disconnected would sit in the client's buffer past the
        // caller's time, and might still reach the stream afterwards.
        Err(JetStreamError::Unavailable {
            operation: "publish",
            reason: "not connected to NATS".into(),
        })
    };
    match published {
        // A new message numbered at or below what this replica had applied before it was
        // sent: the stream is another one (restored, or created again, since the last poll),
        // and the outcome kept for that sequence is of another update: it was the answer
        // (found by an adversarial run).
        Ok(ack) if !ack.duplicate && ack.sequence <= applied_before => {
            let reason = format!(
                "new stream message {} is at or below what this replica had applied before \
                 sending it ({applied_before})",
                ack.sequence,
            );
            answer_replaced(parts, requests, reason, RECORDED_ELSEWHERE);
        }
        Ok(ack) => {
            parts
                .metrics
                .replication_published(started.elapsed().as_secs_f64(), ack.duplicate);
            hand_over(parts, requests, ack, repeat).await;
        }
        Err(error) => answer_failed(parts, requests, error),
    }
}

/// Hands each caller of a published message to the pending table, which answers it once this
/// replica applied the message; a repeat of an update the merge refused is published again or
/// answered here.
async fn hand_over(parts: &Parts, requests: Vec<Request>, ack: Published, repeat: Repeat) {
    for (index, request) in requests.into_iter().enumerate() {
        request.acked.store(ack.sequence, Ordering::Release);
        let refused = || refused_before(parts, ack.sequence, index, &request.update);
        if ack.duplicate && repeat == Repeat::First && refused() {
            // The stream dropped a repeat (a retry, a replay) of an update the merge
            // refused for want of room: published again under an id of its own, it is
            // applied to the profile as it is now. The id names the profile's revision:
            // while the profile has not changed, repeats are dropped again (and
            // refused again, below), so a retry costs two publishes at most.
            let record = UpdateRecord::new(0, &request.update);
            let revision = parts.store.get(&request.update.key).map(|p| p.revision);
            let id = format!("{}@{}", delivery_id(&record), revision.unwrap_or(0));
            let alone = UpdateBatch {
                updates: vec![record],
            };
            let again = publish_as(parts, vec![request], id, alone, Repeat::Again);
            Box::pin(again).await;
            continue;
        }
        if ack.duplicate && repeat == Repeat::Again && refused() {
            // Refused at this very revision of the profile already: nothing changed.
            let _ = request.reply.send(refusal(&parts.store, &request.update));
            continue;
        }
        if let Registered::Old(reply) = parts.pending.register(ack.sequence, index, request.reply) {
            let _ = reply.send(Ok(unchanged(&parts.store, &request.update.key)));
        }
    }
}

/// Answers every caller of a message whose publish failed 503, counts the failure by its kind
/// and warns (at most every 10 s).
fn answer_failed(parts: &Parts, requests: Vec<Request>, error: JetStreamError) {
    // A publish whose acknowledgement did not come may be in the stream: say so, as
    // the single node's timeout does; the retry is harmless either way.
    let (reason, answer) = match error {
        JetStreamError::TooLarge { .. } => ("too_large", NOT_RECORDED),
        JetStreamError::Refused { .. } => ("refused", NOT_RECORDED),
        JetStreamError::Unconfirmed { .. } => (
            "unconfirmed",
            "the replicated log did not confirm the update in time; it may still be \
             recorded: retry it, a repeated delivery changes nothing",
        ),
        _ => ("unavailable", NOT_RECORDED),
    };
    parts.metrics.replication_publish_failed(reason);
    // Counted every time (`profile_state_replication_publish_failures_total`).
    if let Some(suppressed) = parts.failure_log.due() {
        tracing::warn!(
            %error,
            updates = requests.len(),
            suppressed,
            "publish failed: answering 503 (warned at most every 10 s; `suppressed` \
             failures since the last warning)"
        );
    }
    for request in requests {
        let _ = request.reply.send(Err(Error::Unavailable {
            reason: answer.into(),
        }));
    }
}

const NOT_RECORDED: &str = "the update could not be recorded in the replicated log; retry later";
const MAY_BE_RECORDED: &str = "the replicated log did not confirm the update; it may still be \
     recorded: retry it, a repeated delivery changes nothing";
const RECORDED_ELSEWHERE: &str = "the update is recorded, but in a replicated log this replica \
     no longer follows; retry it, a repeated delivery changes nothing";

/// Answers `requests` 503 with `answer`: the stream is missing (`reason`), found so before
/// their publish (`NOT_RECORDED`) or while it waited (`MAY_BE_RECORDED`).
fn answer_missing(parts: &Parts, requests: Vec<Request>, reason: String, answer: &str) {
    parts.metrics.replication_publish_failed("unavailable");
    if let Some(suppressed) = parts.failure_log.due() {
        tracing::warn!(
            %reason,
            updates = requests.len(),
            suppressed,
            "the update stream is missing: answering 503 until it is restored"
        );
    }
    for request in requests {
        let _ = request.reply.send(Err(Error::Unavailable {
            reason: format!("{answer} (the update stream is missing: {reason})"),
        }));
    }
}

/// Answers `requests` 503: the stream is not the one this replica follows (`reason`), which
/// stops to start again on it (`super::poll`).
fn answer_replaced(parts: &Parts, requests: Vec<Request>, reason: String, answer: &str) {
    parts.metrics.replication_publish_failed("replaced");
    if let Some(suppressed) = parts.failure_log.due() {
        tracing::warn!(
            %reason,
            updates = requests.len(),
            suppressed,
            "the stream was replaced under this replica: answering 503 until it has started \
             again on the new one"
        );
    }
    for request in requests {
        let _ = request.reply.send(Err(Error::Unavailable {
            reason: format!("{answer} (the stream was replaced: {reason})"),
        }));
    }
}

/// Whether the update at `index` of stream message `sequence`, which the stream has already,
/// was refused when this replica applied it: its outcome says so while it is kept, and after
/// that the profile does (merged again, an applied update changes nothing: merging is
/// idempotent and only moves forward). Not applied here yet: not known, so no.
fn refused_before(parts: &Parts, sequence: u64, index: usize, update: &ProfileUpdate) -> bool {
    match parts.pending.settled(sequence, index) {
        Some(Some(outcome)) => outcome.is_err(),
        Some(None) => merged_now(&parts.store, update).1.is_some(),
        None => false,
    }
}

/// The profile `update` is about as this replica holds it, and what merging `update` into it
/// makes of it (`None`: nothing would change).
fn merged_now(store: &Store, update: &ProfileUpdate) -> (Option<Arc<Profile>>, Option<Profile>) {
    let current = store.get(&update.key);
    let mut merged = match &current {
        Some(current) => Profile::clone(current),
        None => Profile::empty(update.key.clone()),
    };
    let changed = merged.merge(update).is_some();
    (current, changed.then_some(merged))
}

/// The answer to a repeat of an update refused at the profile's current revision: the merge's
/// refusal, worked out again (the same profile, the same update: the same refusal).
fn refusal(store: &Store, update: &ProfileUpdate) -> Result<Applied, Error> {
    if let (current, Some(merged)) = merged_now(store, update) {
        check_growth(current.as_deref(), &merged, update)?;
    }
    Err(Error::Unavailable {
        reason: "the update was refused for growing its profile past the bound, which it no \
                 longer does; retry"
            .into(),
    })
}

/// The outcome of a duplicate of a message applied long ago, and not refused
/// ([`refused_before`]): nothing changed, so the profile's revision (it exists: the message
/// was applied).
fn unchanged(store: &Store, key: &ProfileKey) -> Applied {
    Applied::Unchanged {
        revision: store.get(key).map_or(0, |profile| profile.revision),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{EventTime, Field, Scalar};

    fn request(customer: &str, extra_bytes: usize) -> Request {
        Request {
            update: ProfileUpdate {
                key: ProfileKey::new("2155", customer),
                at: EventTime::from_timestamp(1_732_037_682, 0).unwrap(),
                fields: vec![(
                    Field::Email,
                    Some(Scalar::Text("x".repeat(extra_bytes).into())),
                )],
                extras: vec![],
                origin: Default::default(),
            },
            reply: oneshot::channel().0,
            acked: Arc::default(),
        }
    }

    #[test]
    fn batches_are_cut_below_the_limit_and_keep_their_order() {
        let requests = (0..10).map(|i| request(&format!("c{i}"), 100));
        let one = record_len(&UpdateRecord::new(0, &request("c0", 100).update));
        let (batches, too_large) = split(requests, 3 * one);
        assert!(too_large.is_empty());
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [3, 3, 3, 1]);
        for batch in &batches {
            let message = UpdateBatch {
                updates: batch.iter().map(|(_, record)| record.clone()).collect(),
            };
            assert!(prost::Message::encoded_len(&message) <= 3 * one);
        }
        let customers: Vec<String> = batches
            .iter()
            .flatten()
            .map(|(request, _)| request.update.key.customer_id.to_string())
            .collect();
        let expected: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        assert_eq!(customers, expected);
        // An update whose message alone is over the limit is set aside with its size; the
        // others around it are packed as before.
        let (batches, too_large) = split(
            [
                request("small", 1),
                request("big", 5000),
                request("other", 1),
            ]
            .into_iter(),
            1000,
        );
        let big = record_len(&UpdateRecord::new(0, &request("big", 5000).update));
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].len(), 2);
        assert_eq!(too_large.len(), 1);
        assert_eq!(too_large[0].0.update.key.customer_id.as_str(), "big");
        assert_eq!(too_large[0].1, big);
    }

    fn linger(updates: usize, ms: u64) -> Wait {
        Wait {
            updates,
            for_at_most: Duration::from_millis(ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_batch_goes_as_soon_as_it_is_full() {
        let (sender, mut inbox) = mpsc::channel(16);
        let mut batch = vec![request("first", 1)];
        let started = tokio::time::Instant::now();
        let late = arrive(sender, 3, Duration::from_millis(1));
        fill(&mut inbox, &mut batch, linger(4, 5)).await;
        assert_eq!(batch.len(), 4);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(1),
            "not the whole linger"
        );
        drop(late.await.unwrap());
    }

    /// Sends `count` requests after `after`, and hands the sender back.
    fn arrive(
        sender: mpsc::Sender<Request>,
        count: usize,
        after: Duration,
    ) -> tokio::task::JoinHandle<mpsc::Sender<Request>> {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            for i in 0..count {
                let customer = format!("back{i}");
                sender.send(request(&customer, 1)).await.ok().unwrap();
            }
            sender
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_in_lockstep_goes_once_all_are_back_not_after_the_bound() {
        // Three senders, all in the last batch (4 ms round trip: a 2 ms bound); nothing was
        // queued when the slot freed. They come back 1 ms later: the batch goes then.
        let (sender, mut inbox) = mpsc::channel(16);
        let mut linger = Linger::new(Duration::from_millis(5));
        linger.published(3, Duration::from_millis(4));
        let back = arrive(sender, 3, Duration::from_millis(1));
        let started = tokio::time::Instant::now();
        let mut batch = Vec::new();
        assert_eq!(next_batch(&mut inbox, &mut batch, &linger).await, 3);
        assert_eq!(started.elapsed(), Duration::from_millis(1), "no linger");
        let sender = back.await.unwrap();

        // Two groups alternating: two arrived during the publish, the three it answered are
        // waited for. (The same target as when it was counted after the first arrival: this
        // half guards that the fix did not shrink it; only the half above tells them apart.)
        for i in 0..2 {
            sender
                .send(request(&format!("other{i}"), 1))
                .await
                .ok()
                .unwrap();
        }
        let back = arrive(sender, 3, Duration::from_millis(1));
        let started = tokio::time::Instant::now();
        batch.clear();
        assert_eq!(next_batch(&mut inbox, &mut batch, &linger).await, 2 + 3);
        assert_eq!(started.elapsed(), Duration::from_millis(1));
        drop(back.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_batch_goes_when_the_time_is_up_or_everyone_has_gone() {
        let (sender, mut inbox) = mpsc::channel(16);
        let mut batch = vec![request("first", 1)];
        sender.send(request("second", 1)).await.ok().unwrap();
        let started = tokio::time::Instant::now();
        fill(&mut inbox, &mut batch, linger(10, 5)).await;
        assert_eq!(batch.len(), 2, "what came is taken");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(5),
            "no longer than the linger"
        );

        drop(sender);
        let started = tokio::time::Instant::now();
        fill(&mut inbox, &mut batch, linger(10, 5)).await;
        assert_eq!(batch.len(), 2);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "a closed inbox ends the wait"
        );
    }
}
