//! Reading the update stream in order from a sequence: one ordered consumer per replica.
//!
//! An ordered consumer (ephemeral, in memory, no acks) recreates itself after a gap or missed
//! heartbeats, but not when the server that held it restarted and forgot it (async-nats 0.51
//! surfaces "consumer not found" after ~15 s of retries). So the follower keeps the sequence
//! it must hand out next, and builds a new consumer from exactly there whenever the client
//! reconnects or the consumer fails, retrying while NATS is unreachable. Two pitfalls are
//! handled: a consumer recreated by the client before its first message restarts from the
//! beginning of the stream (anything below the next sequence is skipped); and a consumer asked
//! to start below the stream's first sequence silently starts at the first (the first sequence
//! is compared with the one wanted, before and while reading). Any other jump in sequence means
//! a message was removed, and is an error too: a replica must never apply past a hole. And a
//! consumer the client recreated may be reading another stream of the same name (the stream
//! was deleted and created again meanwhile): the first message of each consumer is taken only
//! once the stream is checked to be the one this replica followed (`UpdateStream::bounds`).
//!
//! The consumer is one R1 consumer on any peer of the stream's group. When that peer hangs
//! while the stream keeps its quorum, nothing arrives, and the client would replace it only after
//! two missed heartbeats (~9 s). Told what the stream is known to hold ([`Follower::follow_end`],
//! the replica's status poll), the follower replaces a consumer that delivered nothing for
//! `stall::STALL_AFTER` while the stream held the next sequence, and gives each create of a
//! replacement a short time of its own ([`CREATE_TIMEOUT`], growing after a few): the cluster
//! places the new consumer at random, perhaps on the hung peer again, whose answer never comes.
//! Creates are the meta leader's to answer: while one is being asked for, the next sequences are
//! read one at a time from the stream leader ([`Follower::replace`]), so that a meta leader lost
//! with the consumer does not stop the replica until another is elected.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};

use super::stall::{STALL_AFTER, Stall};
use super::stream::unavailable;
use super::{JetStreamError, UpdateBatch, UpdateStream};
use crate::poison::lock;

/// How long one pull request waits on an idle stream. The consumer's idle heartbeat is half of
/// it, and two missed heartbeats make it recreate itself, so a consumer lost on a node of a
/// cluster (while the client stays connected to another) is replaced within about this long
/// instead of the client's default 30 s. The cost is one small request per interval while idle.
/// The follower's own check (`stall`) replaces a stuck consumer sooner whenever the stream is
/// known to hold more; the heartbeats are what is left while nothing tells it so.
const PULL_EXPIRES: Duration = Duration::from_secs(4);
/// Longest pause between two attempts to rebuild the consumer while NATS is unreachable.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);
/// How long each of a rebuild's first [`QUICK_CREATES`] consumer creates may take before it is
/// asked for again; each further attempt may take twice as long as the one before, up to
/// `--nats-request-timeout`. The answer to a create comes from the server the cluster placed
/// the consumer on, at random among the stream's peers (a hung one is not known to be down for
/// a minute or more): it never comes from a hung one, and waiting the whole request timeout for
/// it (5 s by default) undid what replacing a stuck consumer gained. A healthy cluster answers
/// in milliseconds; one slower than this still gets its answer in time once the attempts grow.
const CREATE_TIMEOUT: Duration = Duration::from_millis(500);
/// How many creates get [`CREATE_TIMEOUT`] alone. Each lands on the hung server with one chance
/// in three (an R3 stream): six in a row, once in 700 rebuilds.
const QUICK_CREATES: u32 = 6;
/// How long after a read from the stream leader that got no message the next is tried (the
/// replacement consumer's creation goes on meanwhile).
const READ_RETRY: Duration = Duration::from_millis(200);
/// How long one read from the stream leader (two requests) may take before it is given up and
/// tried again. Without it a read waited `--nats-request-timeout` (5 s by default): on a
/// connection to a hung server, and after the reconnection too, for the answer to a request
/// the hung server had taken (found by an adversarial run). A healthy stream leader answers in
/// milliseconds, across regions in a few hundred.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a replacement may take before reading from the stream leader is warned of: past an
/// election's few seconds, creates are failing for another reason (a consumer limit, a
/// permission), and the replica would go on reading one message per request, unnoticed.
const SLOW_REPLACEMENT: Duration = Duration::from_secs(10);

/// One stream message, decoded.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its stream sequence.
    pub sequence: u64,
    /// When the stream stored it.
    pub published: DateTime<Utc>,
    /// Messages after this one in the stream when it was delivered (0 = caught up).
    pub pending: u64,
    /// The updates.
    pub batch: UpdateBatch,
}

/// Hands out every sequence after the start exactly once, in order, or an error naming what is
/// missing. Owns its consumer; dropping it stops reading (the server removes the consumer after
/// its inactivity threshold).
pub struct Follower {
    stream: UpdateStream,
    /// `None` after a failure or a reconnection: rebuilt from `next` before reading on.
    messages: Option<Ordered>,
    connections: watch::Receiver<u64>,
    /// False once the connection's sender is gone (a closed receiver would be ready forever).
    watch_connections: bool,
    /// The sequence that must come next.
    next: u64,
    /// The consumer whose messages were checked to come from this replica's stream: a new
    /// name means the client recreated its consumer, perhaps on a stream created again.
    checked_consumer: Option<String>,
    /// The last sequence the stream is known to hold, told from elsewhere (`follow_end`).
    known_end: Option<watch::Receiver<u64>>,
    /// When the consumer is to be taken for stuck.
    stall: Stall,
    /// The consumer being replaced, while `messages` is `None`: kept from one call to the
    /// next, so that the entries read from the stream leader meanwhile do not start it over.
    replacing: Option<Replacing>,
}

/// A new consumer being created, and what was read from the stream leader meanwhile
/// ([`Follower::replace`]).
struct Replacing {
    /// The creation (`rebuild`).
    consumer: Pin<Box<dyn Future<Output = Result<Ordered, JetStreamError>> + Send>>,
    /// The follower's next sequence, kept current as messages are read: where each attempt of
    /// the creation starts its consumer, and what it checks the stream still holds.
    next: Arc<AtomicU64>,
    /// When it started.
    since: tokio::time::Instant,
    /// Messages read from the stream leader since.
    read: u64,
    /// When the next read may be made (after one that got no message).
    next_read: tokio::time::Instant,
    /// Why the creation's latest attempt failed, if one did.
    failure: Arc<Mutex<Option<String>>>,
    /// Whether [`SLOW_REPLACEMENT`] was warned of.
    warned: bool,
    /// The client's reconnections, seen apart from the follower's.
    connections: watch::Receiver<u64>,
    /// False once the connection's sender is gone.
    watch_connections: bool,
}

impl Replacing {
    /// A consumer of `stream` being created from `next`, from `now`.
    fn new(stream: UpdateStream, next: u64, now: tokio::time::Instant) -> Replacing {
        let (next, failure) = (Arc::new(AtomicU64::new(next)), Arc::default());
        let mut connections = stream.nats().connections();
        connections.mark_unchanged();
        Replacing {
            connections,
            watch_connections: true,
            consumer: Box::pin(rebuild(stream, Arc::clone(&next), Arc::clone(&failure))),
            next,
            since: now,
            read: 0,
            next_read: now,
            failure,
            warned: false,
        }
    }

    /// Warns, once, of a replacement that has taken [`SLOW_REPLACEMENT`] while messages are read
    /// from the stream leader.
    fn warn_if_slow(&mut self) {
        let waited = self.since.elapsed();
        if self.warned || waited < SLOW_REPLACEMENT {
            return;
        }
        self.warned = true;
        let failure = lock(&self.failure).clone();
        tracing::warn!(
            waited_s = waited.as_secs(),
            read = self.read,
            failure = failure.as_deref().unwrap_or("none yet"),
            "the replica's stream consumer could not be replaced: the replica reads the stream \
             from its leader, two requests per message, until a consumer can be created"
        );
    }
}

impl Follower {
    /// Starts reading after `applied` (0: from the beginning). Fails at once if the stream no
    /// longer holds `applied + 1`, ends before `applied`, or cannot be reached.
    pub async fn start(stream: &UpdateStream, applied: u64) -> Result<Follower, JetStreamError> {
        let mut connections = stream.nats().connections();
        connections.mark_unchanged();
        let mut follower = Follower {
            stream: stream.clone(),
            messages: None,
            connections,
            watch_connections: true,
            next: applied + 1,
            checked_consumer: None,
            known_end: None,
            stall: Stall::new(STALL_AFTER),
            replacing: None,
        };
        check_bounds(stream, follower.next).await?;
        follower.messages = Some(consume_from(stream, follower.next).await?);
        Ok(follower)
    }

    /// The sequence the next entry will have.
    pub fn next_sequence(&self) -> u64 {
        self.next
    }

    /// Tells the follower the last sequence the stream is known to hold, as it learns more:
    /// a consumer that delivers nothing while the stream holds the next sequence is replaced
    /// (see the module doc). Without it, only the client's heartbeats catch a stuck consumer.
    pub fn follow_end(&mut self, known_end: watch::Receiver<u64>) {
        self.known_end = Some(known_end);
    }

    /// The last sequence the stream is known to hold (0 when nothing tells).
    fn known_end(&self) -> u64 {
        self.known_end.as_ref().map_or(0, |end| *end.borrow())
    }

    /// The wait for the consumer starts over: a message came, a consumer is new, or a caller
    /// started waiting (time between two calls is the caller's, not the consumer's).
    fn restart_stall(&mut self) {
        let now = tokio::time::Instant::now();
        self.stall.restart(now, self.known_end(), self.next);
    }

    /// The next entry; waits for it, through disconnections, server restarts and a stream
    /// missing for a while. An error is about the stream itself (a hole, a purge past `next`,
    /// a malformed message, another stream under its name) and is final: handle it, then start
    /// a new follower.
    pub async fn next(&mut self) -> Result<Entry, JetStreamError> {
        self.restart_stall();
        loop {
            let Some(messages) = self.messages.as_mut() else {
                match self.replace().await? {
                    Some(entry) => return Ok(entry),
                    None => continue,
                }
            };
            let stalled = self.stall.deadline();
            let item = tokio::select! {
                // A message the client holds is taken before any timer: a process starved of
                // CPU wakes with both ready, and the consumer was not stuck.
                biased;
                item = messages.next() => item,
                changed = self.connections.changed(), if self.watch_connections => {
                    match changed {
                        Ok(()) => {
                            tracing::debug!(next = self.next, "nats reconnected: new consumer");
                            self.messages = None;
                        }
                        // The connection is gone for good; the consumer's errors will say so.
                        Err(_) => self.watch_connections = false,
                    }
                    continue;
                }
                changed = changed_end(&mut self.known_end) => {
                    match changed {
                        Some(end) => {
                            let now = tokio::time::Instant::now();
                            self.stall.learned(now, end, self.next);
                        }
                        None => self.known_end = None,
                    }
                    continue;
                }
                () = sleep_until(stalled) => {
                    tracing::info!(
                        next = self.next,
                        known_end = self.known_end(),
                        waited_ms = STALL_AFTER.as_millis() as u64,
                        "the consumer delivered nothing while the stream holds more (its \
                         server may hang): new consumer"
                    );
                    self.messages = None;
                    continue;
                }
            };
            self.restart_stall();
            let message = match item {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::debug!(next = self.next, error = %err, "consumer failed: new consumer");
                    self.messages = None;
                    continue;
                }
                None => {
                    self.messages = None;
                    continue;
                }
            };
            if let Some(entry) = self.accept(message).await? {
                return Ok(entry);
            }
        }
    }

    /// While the consumer is replaced: the next entry, read from the stream leader once the
    /// stream is known to hold it, or `None` once the new consumer is created (or the stream
    /// is known to hold more, or a read may be tried again).
    ///
    /// Why read from the leader: creating a consumer is the cluster's meta leader's work, and
    /// when the server that held the consumer was the meta leader too and hung or died, no
    /// create is answered until the others have elected a new one. Meanwhile the stream's own
    /// leader still stores and serves its messages: a replica applied nothing for 6-8 s, its
    /// webhooks waited that long for their answers and it was not ready (found by an
    /// adversarial run, reproduced in `tests/replicas.rs`). The read takes exactly the next
    /// sequence, from the stream checked to be the one followed after it answered; a read that
    /// gets anything else is left to the new consumer, whose checks say what is wrong. Each
    /// attempt at the new consumer starts where the follower is then (`Replacing::next`); what
    /// it delivers that was read meanwhile is skipped.
    async fn replace(&mut self) -> Result<Option<Entry>, JetStreamError> {
        let now = tokio::time::Instant::now();
        let known_end = self.known_end();
        let next = self.next;
        let replacing = self
            .replacing
            .get_or_insert_with(|| Replacing::new(self.stream.clone(), next, now));
        let read_now = known_end >= next && now >= replacing.next_read;
        let read_later = known_end >= next && now < replacing.next_read;
        tokio::select! {
            biased;
            created = &mut replacing.consumer => {
                // Taken whatever the outcome: a finished creation is never polled again.
                let replaced = self.replacing.take();
                self.replaced(replaced, created?);
                Ok(None)
            }
            read = tokio::time::timeout(READ_TIMEOUT, read_from_leader(&self.stream, next, known_end)), if read_now => {
                Ok(self.read_meanwhile(read.ok().flatten(), known_end))
            }
            // Not while a read is under way: the stream's end is told at every poll (200 ms)
            // while it grows, and a read slower than that (two requests, across regions or on
            // a loaded machine) would be started over at each, never to finish.
            changed = changed_end(&mut self.known_end), if !read_now => {
                if changed.is_none() {
                    self.known_end = None;
                }
                Ok(None)
            }
            () = tokio::time::sleep_until(replacing.next_read), if read_later => Ok(None),
            // A read sent before a reconnection may wait for an answer that will not come: the
            // next is sent at once, on the new connection.
            // (Its own receiver: the follower's still makes a consumer created before the
            // reconnection be replaced after it.)
            changed = replacing.connections.changed(), if replacing.watch_connections => {
                match changed {
                    Ok(()) => replacing.next_read = now,
                    Err(_) => replacing.watch_connections = false,
                }
                Ok(None)
            }
        }
    }

    /// The consumer `created` by the replacement `replaced`: read from on.
    fn replaced(&mut self, replaced: Option<Replacing>, created: Ordered) {
        if let Some(Replacing { since, read, .. }) = replaced.filter(|replaced| replaced.read > 0) {
            tracing::info!(
                read,
                waited_ms = since.elapsed().as_millis() as u64,
                next = self.next,
                "a new consumer was created, after messages were read from the stream leader"
            );
        }
        self.messages = Some(created);
        self.restart_stall();
    }

    /// What a read from the stream leader gave while the consumer is replaced: the next entry,
    /// taken, or nothing (the next read after [`READ_RETRY`]).
    fn read_meanwhile(&mut self, read: Option<Entry>, known_end: u64) -> Option<Entry> {
        let replacing = self.replacing.as_mut()?;
        let Some(entry) = read else {
            replacing.next_read = tokio::time::Instant::now() + READ_RETRY;
            return None;
        };
        if replacing.read == 0 {
            tracing::info!(
                next = self.next,
                known_end,
                "the consumer is being replaced: reading the stream from its leader meanwhile"
            );
        }
        replacing.read += 1;
        replacing.warn_if_slow();
        self.next += 1;
        replacing.next.store(self.next, Ordering::Relaxed);
        Some(entry)
    }

    /// The entry in `message` if it is the next one; `None` if it is an old one to skip.
    async fn accept(
        &mut self,
        message: async_nats::jetstream::Message,
    ) -> Result<Option<Entry>, JetStreamError> {
        let info = message.info().map_err(unavailable("consume"))?;
        let (sequence, pending, published) = (info.stream_sequence, info.pending, info.published);
        if self.checked_consumer.as_deref() != Some(info.consumer) {
            // Checked before anything of the new consumer is taken, skipped ones included.
            match check_bounds_settled(&self.stream, self.next, SETTLE).await {
                Ok(()) => self.checked_consumer = Some(info.consumer.to_owned()),
                // Consumers are recreated when NATS nodes come and go, when the check may not
                // be answered, or the stream be missing for a while: not an error of the
                // stream. Rebuilt from `next` (this message again), the check runs with
                // `rebuild`'s retries.
                Err(
                    JetStreamError::Unavailable { .. }
                    | JetStreamError::NoQuorum { .. }
                    | JetStreamError::Refused { .. },
                ) => {
                    self.messages = None;
                    return Ok(None);
                }
                Err(error) => return Err(error),
            }
        }
        if sequence < self.next {
            // A consumer the client recreated before its first message starts from the first.
            return Ok(None);
        }
        if sequence > self.next {
            check_bounds(&self.stream, self.next).await?;
            return Err(JetStreamError::Gap {
                stream: self.stream.name().to_string(),
                expected: self.next,
                got: sequence,
            });
        }
        let batch = UpdateBatch::decode_payload(&message.payload).map_err(|reason| {
            JetStreamError::Malformed {
                stream: self.stream.name().to_string(),
                sequence,
                reason,
            }
        })?;
        self.next += 1;
        Ok(Some(Entry {
            sequence,
            published,
            pending,
            batch,
        }))
    }
}

/// The next value of `known_end` once it changes; `None` once its sender is gone (never, when
/// nothing tells).
async fn changed_end(known_end: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    let Some(end) = known_end.as_mut() else {
        return std::future::pending().await;
    };
    end.changed().await.ok()?;
    Some(*end.borrow_and_update())
}

/// Waits until `deadline`; forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

// Free functions over the stream rather than `&self` methods: a `&Follower` held across an
// await would make the applier's future not `Send` (the consumer's stream is not `Sync`).

/// A new consumer from `next`, retrying (with backoff) while NATS cannot be reached and while
/// the stream is missing.
///
/// A missing stream is waited out, not an error: the replica's status poll already makes it
/// not ready and answers webhooks 503 while it is, and stops it if the stream comes back as
/// another one (`Replaced`, from the bounds check here too). Taken as final, a "not found" at
/// a reconnection stopped the applier for good: the stream's return was then seen by no one,
/// and every replica that had reconnected stayed up, not ready, until restarted by hand (found
/// by an adversarial run).
///
/// Each attempt starts from the follower's next sequence as it is then (`next`, moved on by the
/// messages read from the stream leader meanwhile), not as it was when the replacement began:
/// a purge of the stream between the two, which leaves all the replica still needs, stopped
/// the replica as purged past (found by an adversarial run).
async fn rebuild(
    stream: UpdateStream,
    next: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
) -> Result<Ordered, JetStreamError> {
    let stream = &stream;
    let failed = |why: String| *lock(&failure) = Some(why);
    let mut delay = Duration::from_millis(50);
    let mut creates = 0;
    let mut missing_said = false;
    loop {
        let next = next.load(Ordering::Relaxed);
        let attempt = match check_bounds_settled(stream, next, SETTLE).await {
            Ok(()) => {
                let timeout = create_timeout(creates, stream.nats().request_timeout());
                creates += 1;
                match tokio::time::timeout(timeout, consume_from(stream, next)).await {
                    Ok(created) => created,
                    Err(_) => {
                        // Waited already: asked again at once. A create given up on may still
                        // be carried out; the server removes that consumer once it is idle.
                        tracing::debug!(?timeout, next, "consumer create unanswered, asked again");
                        failed(format!("a create unanswered within {timeout:?}"));
                        continue;
                    }
                }
            }
            Err(err) => Err(err),
        };
        match attempt {
            Ok(messages) => return Ok(messages),
            Err(JetStreamError::Unavailable { operation, reason }) => {
                tracing::debug!(operation, reason, "consumer rebuild failed, retrying");
                failed(format!("{operation}: {reason}"));
            }
            Err(error @ JetStreamError::NoQuorum { .. }) => {
                tracing::debug!(%error, "consumer rebuild failed, retrying");
                failed(error.to_string());
            }
            Err(error @ JetStreamError::Refused { .. }) => {
                if !missing_said {
                    tracing::info!(
                        %error,
                        next,
                        "the update stream is missing: the consumer waits for it"
                    );
                }
                missing_said = true;
                failed(error.to_string());
            }
            Err(err) => return Err(err),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Stream message `next` read from the stream leader, as an entry (`known_end` gives its
/// pending count), if the stream holds it on the updates' subject and is still the one
/// followed once it has answered; `None` for anything else (see [`Follower::replace`]).
async fn read_from_leader(stream: &UpdateStream, next: u64, known_end: u64) -> Option<Entry> {
    let message = stream.message(next).await.ok()??;
    if message.sequence != next || message.subject.as_str() != stream.subject() {
        return None;
    }
    let batch = UpdateBatch::decode_payload(&message.payload).ok()?;
    Some(Entry {
        sequence: next,
        published: message.time,
        pending: known_end.saturating_sub(next),
        batch,
    })
}

/// How long a running follower keeps asking when the stream seems to end before what it applied.
const SETTLE: Duration = Duration::from_secs(15);

/// [`check_bounds`] for a running follower: an answer that the stream ends before what was
/// applied is asked again for `settle`. A nats-server back from a pause may answer as the
/// stream leader it was, from its old state, while the cluster went on: two replicas stopped
/// for good on such an answer at a reconnection (found by an adversarial run). A stream that
/// really is behind (replaced, or restored from an older copy) stays so.
async fn check_bounds_settled(
    stream: &UpdateStream,
    next: u64,
    settle: Duration,
) -> Result<(), JetStreamError> {
    let started = tokio::time::Instant::now();
    let mut asked_again = false;
    loop {
        match check_bounds(stream, next).await {
            Err(error @ JetStreamError::AheadOfStream { .. }) if started.elapsed() < settle => {
                // Said once per check at INFO: whether this ever happens in production is
                // what decides if the 15 s are right.
                if !asked_again {
                    tracing::info!(%error, "the stream seems to end before this replica; asking again");
                }
                asked_again = true;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            checked => {
                if asked_again && checked.is_ok() {
                    let waited_ms = started.elapsed().as_millis() as u64;
                    tracing::info!(
                        waited_ms,
                        "the stream holds what this replica applied after all"
                    );
                }
                return checked;
            }
        }
    }
}

/// The stream must still hold `next` (not purged past it) and not end before `next - 1`.
async fn check_bounds(stream: &UpdateStream, next: u64) -> Result<(), JetStreamError> {
    let bounds = stream.bounds().await?;
    let applied = next - 1;
    if bounds.last < applied {
        return Err(JetStreamError::AheadOfStream {
            stream: stream.name().to_string(),
            applied,
            last: bounds.last,
        });
    }
    if bounds.first > next {
        return Err(JetStreamError::StartBelowFirst {
            stream: stream.name().to_string(),
            requested: next,
            first: bounds.first,
        });
    }
    Ok(())
}

/// How long create number `attempt` (from 0) of one rebuild may take (see [`CREATE_TIMEOUT`]).
fn create_timeout(attempt: u32, ceiling: Duration) -> Duration {
    let doublings = attempt.saturating_sub(QUICK_CREATES - 1).min(16);
    (CREATE_TIMEOUT * 2u32.pow(doublings)).min(ceiling)
}

async fn consume_from(stream: &UpdateStream, next: u64) -> Result<Ordered, JetStreamError> {
    let deliver_policy = match next {
        1 => DeliverPolicy::All,
        next => DeliverPolicy::ByStartSequence {
            start_sequence: next,
        },
    };
    let consumer = stream
        .handle()
        .create_consumer(OrderedConfig {
            filter_subject: stream.subject().to_string(),
            deliver_policy,
            max_expires: PULL_EXPIRES,
            ..Default::default()
        })
        .await
        .map_err(unavailable("consumer create"))?;
    consumer
        .messages()
        .await
        .map_err(unavailable("consumer messages"))
}

#[cfg(test)]
mod tests {
    //! What the follower does with each delivered sequence, with messages crafted as a
    //! consumer would deliver them (a real server cannot be made to produce a hole or a
    //! consumer restarted from the first sequence on demand), against a real stream.

    use prost::Message as _;

    use super::*;
    use crate::jetstream::{Nats, StreamSettings};

    fn delivered(
        stream: &UpdateStream,
        sequence: u64,
        payload: Vec<u8>,
    ) -> async_nats::jetstream::Message {
        delivered_by(stream, "test", sequence, payload)
    }

    fn delivered_by(
        stream: &UpdateStream,
        consumer: &str,
        sequence: u64,
        payload: Vec<u8>,
    ) -> async_nats::jetstream::Message {
        // `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<nanos>.<pending>`
        let reply = format!(
            "$JS.ACK.{}.{consumer}.1.{sequence}.{sequence}.1764500000000000000.0",
            stream.name()
        );
        async_nats::jetstream::Message {
            message: async_nats::Message {
                subject: stream.subject().into(),
                reply: Some(reply.into()),
                payload: payload.into(),
                headers: None,
                status: None,
                description: None,
                length: 0,
            },
            context: stream.nats().context().clone(),
        }
    }

    #[test]
    fn creates_are_asked_for_again_quickly_then_given_more_time_up_to_the_request_timeout() {
        let ceiling = Duration::from_secs(5);
        let timeouts: Vec<_> = (0..10).map(|n| create_timeout(n, ceiling)).collect();
        let ms = |ms| Duration::from_millis(ms);
        let quick = vec![ms(500); QUICK_CREATES as usize];
        assert_eq!(timeouts[..QUICK_CREATES as usize], quick);
        assert_eq!(
            timeouts[QUICK_CREATES as usize..],
            [ms(1000), ms(2000), ms(4000), ms(5000)]
        );
        assert_eq!(create_timeout(u32::MAX, ceiling), ceiling);
        assert_eq!(create_timeout(0, ms(200)), ms(200));
    }

    /// A nats-server of its own, a client of it, and an R1 update stream `name` on it.
    async fn single_server_stream(name: &str) -> (nats_harness::NatsCluster, Nats, UpdateStream) {
        let nats = nats_harness::NatsCluster::single().await.unwrap();
        let mut config = crate::Config::for_tests("s").nats;
        config.urls = nats.client_urls();
        let client = Nats::connect(&config, "test").await.unwrap();
        let stream = UpdateStream::ensure(&client, &stream_settings(name, 1)).await;
        (nats, client, stream.unwrap())
    }

    #[tokio::test]
    async fn seen_sequences_are_skipped_and_holes_purges_and_garbage_are_errors() {
        let (nats, client, stream) = single_server_stream("ACCEPT").await;
        let batch = UpdateBatch::default();
        // Published without a message id, so the equal payloads are not deduplicated.
        let publish = || async {
            let message = async_nats::jetstream::message::PublishMessage::build()
                .payload(batch.encode_to_vec().into());
            let ack = client
                .context()
                .send_publish(stream.subject().to_string(), message);
            ack.await.unwrap().await.unwrap();
        };
        for _ in 1..=5 {
            publish().await;
        }
        // A stream that really ends before what was applied is reported once asked again.
        let asked = std::time::Instant::now();
        let behind = check_bounds_settled(&stream, 9, Duration::from_millis(1200)).await;
        assert!(
            matches!(
                behind,
                Err(JetStreamError::AheadOfStream {
                    applied: 8,
                    last: 5,
                    ..
                })
            ),
            "{behind:?}"
        );
        assert!(
            asked.elapsed() >= Duration::from_millis(1200),
            "asked again meanwhile"
        );

        let mut follower = Follower::start(&stream, 3).await.unwrap();
        let payload = || batch.encode_to_vec();

        // A consumer restarted from the beginning delivers what was applied: skipped.
        for old in [1, 2, 3] {
            let accepted = follower.accept(delivered(&stream, old, payload())).await;
            assert!(matches!(accepted, Ok(None)), "{old}: {accepted:?}");
        }
        let entry = follower
            .accept(delivered(&stream, 4, payload()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((entry.sequence, follower.next_sequence()), (4, 5));

        let garbage = follower
            .accept(delivered(&stream, 5, vec![0xff, 0xff]))
            .await
            .unwrap_err();
        assert!(
            matches!(garbage, JetStreamError::Malformed { sequence: 5, .. }),
            "{garbage}"
        );
        assert_eq!(
            follower.next_sequence(),
            5,
            "nothing past a malformed message"
        );

        let hole = follower
            .accept(delivered(&stream, 7, payload()))
            .await
            .unwrap_err();
        let expected = JetStreamError::Gap {
            stream: "ACCEPT".into(),
            expected: 5,
            got: 7,
        };
        assert_eq!(hole, expected);

        // A recreated consumer's first message while the stream cannot be asked whether it is
        // still the one followed: not an error; the consumer is rebuilt from the same place.
        nats.nodes()[0].pause().unwrap();
        let unanswered = follower
            .accept(delivered_by(&stream, "recreated", 5, payload()))
            .await;
        nats.nodes()[0].resume().unwrap();
        assert!(matches!(unanswered, Ok(None)), "{unanswered:?}");
        assert!(follower.messages.is_none(), "rebuilt before reading on");
        assert_eq!(follower.next_sequence(), 5);
        let entry = follower
            .accept(delivered_by(&stream, "recreated", 5, payload()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(entry.sequence, 5);

        publish().await;
        stream.purge_below(7).await.unwrap();
        let purged = follower
            .accept(delivered(&stream, 8, payload()))
            .await
            .unwrap_err();
        let expected = JetStreamError::StartBelowFirst {
            stream: "ACCEPT".into(),
            requested: 6,
            first: 7,
        };
        assert_eq!(purged, expected);
    }

    /// What is read from the stream leader while a consumer is replaced: exactly the sequence
    /// asked for, when the stream holds it as an update batch, and nothing else.
    #[tokio::test]
    async fn a_read_from_the_leader_gives_the_sequence_asked_for_or_nothing() {
        let (_nats, client, stream) = single_server_stream("LEADER").await;
        let publish = |payload| publish_raw(&client, &stream, payload);
        assert_eq!(publish(batch("c1").encode_to_vec()).await, 1);
        assert_eq!(publish(batch("c2").encode_to_vec()).await, 2);
        assert_eq!(publish(vec![0xff, 0xff]).await, 3);

        let entry = read_from_leader(&stream, 2, 3).await.expect("sequence 2");
        assert_eq!((entry.sequence, entry.pending), (2, 1));
        assert_eq!(entry.batch, batch("c2"));
        assert!(read_from_leader(&stream, 3, 3).await.is_none(), "garbage");
        assert!(read_from_leader(&stream, 4, 4).await.is_none(), "not held");
        stream.purge_below(2).await.unwrap();
        assert!(read_from_leader(&stream, 1, 3).await.is_none(), "purged");
        assert!(read_from_leader(&stream, 2, 3).await.is_some());
    }

    /// While the replacement consumer is not created (here: never), the follower hands out the
    /// next sequences, read from the stream leader, in order and up to what the stream is known
    /// to hold, however often that is told again meanwhile (as the polls do while it grows).
    #[tokio::test]
    async fn while_a_consumer_is_replaced_the_next_sequences_come_from_the_stream_leader() {
        let (_nats, client, stream) = single_server_stream("REPLACE").await;
        for customer in ["c1", "c2", "c3"] {
            publish_raw(&client, &stream, batch(customer).encode_to_vec()).await;
        }
        let (mut follower, end) = never_replaced(&stream, 2).await;
        let now = follower.replacing.as_ref().unwrap().since;
        let logs = Logs::default();
        let _logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(logs.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::WARN)
                .finish(),
        );
        let told = Arc::new(AtomicU64::new(2));
        let telling = {
            let told = Arc::clone(&told);
            tokio::spawn(async move {
                // Told at every turn of the runtime: a read started over at each news of the
                // end would never finish.
                loop {
                    end.send_replace(told.load(Ordering::SeqCst));
                    tokio::task::yield_now().await;
                }
            })
        };
        let in_time = Duration::from_secs(5);
        for (sequence, customer) in [(1, "c1"), (2, "c2")] {
            let entry = tokio::time::timeout(in_time, follower.next()).await;
            let entry = entry.expect("read in time").unwrap();
            assert_eq!((entry.sequence, entry.batch), (sequence, batch(customer)));
        }
        let waited = tokio::time::timeout(Duration::from_millis(300), follower.next()).await;
        assert!(waited.is_err(), "read past the known end: {waited:?}");
        told.store(3, Ordering::SeqCst);
        let entry = tokio::time::timeout(in_time, follower.next()).await;
        let entry = entry.expect("read in time").unwrap();
        assert_eq!((entry.sequence, entry.batch), (3, batch("c3")));
        assert_eq!(follower.replacing.as_ref().map(|r| r.read), Some(3));
        assert_eq!(
            logs.text(),
            "",
            "warned of a replacement under way for less than 10 s"
        );

        // Under way for longer than SLOW_REPLACEMENT: warned of once, with the latest failure.
        let replacing = follower.replacing.as_mut().unwrap();
        replacing.since = now.checked_sub(SLOW_REPLACEMENT).unwrap();
        *replacing.failure.lock().unwrap() = Some("a create unanswered within 500ms".into());
        for (sequence, customer) in [(4, "c4"), (5, "c5")] {
            publish_raw(&client, &stream, batch(customer).encode_to_vec()).await;
            told.store(sequence, Ordering::SeqCst);
            let entry = tokio::time::timeout(in_time, follower.next()).await;
            assert_eq!(entry.expect("read in time").unwrap().sequence, sequence);
        }
        let text = logs.text();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("WARN")
                && text.contains("could not be replaced")
                && text.contains("a create unanswered within 500ms"),
            "{text}"
        );
        telling.abort();
    }

    /// A purge that leaves all the replica still needs, made while its replacement consumer was
    /// being created and after messages were read from the stream leader past where the
    /// replacement began: the consumer is created from where the replica is, not taken for
    /// purged past (which stopped the replica).
    #[tokio::test]
    async fn a_purge_below_what_was_read_meanwhile_does_not_stop_the_replacement() {
        let (_nats, client, stream) = single_server_stream("PURGED").await;
        for customer in ["c1", "c2", "c3", "c4", "c5"] {
            publish_raw(&client, &stream, batch(customer).encode_to_vec()).await;
        }
        let mut follower = Follower::start(&stream, 0).await.unwrap();
        let (_end, known_end) = watch::channel(3);
        follower.follow_end(known_end);
        follower.messages = None;
        // The creation held until told, as while no meta leader answers.
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        let replacing = Replacing::new(stream.clone(), 1, tokio::time::Instant::now());
        let created = replacing.consumer;
        follower.replacing = Some(Replacing {
            consumer: Box::pin(async move {
                let _ = answered.await;
                created.await
            }),
            ..replacing
        });
        let in_time = Duration::from_secs(5);
        for sequence in 1..=3 {
            let entry = tokio::time::timeout(in_time, follower.next()).await;
            assert_eq!(entry.expect("read in time").unwrap().sequence, sequence);
        }
        stream.purge_below(3).await.unwrap();
        answer.send(()).unwrap();
        for (sequence, customer) in [(4, "c4"), (5, "c5")] {
            let entry = tokio::time::timeout(in_time, follower.next()).await;
            let entry = entry.expect("delivered in time").unwrap();
            assert_eq!((entry.sequence, entry.batch), (sequence, batch(customer)));
        }
        assert!(follower.replacing.is_none() && follower.messages.is_some());
    }

    /// A read from the stream leader whose request the server took and never answered (paused,
    /// then killed and started again): once the follower has reconnected, the entry comes
    /// within a few seconds, not after the request timeout (30 s here).
    #[tokio::test]
    async fn a_read_lost_with_its_server_is_sent_again_once_reconnected() {
        let mut nats = nats_harness::NatsCluster::single().await.unwrap();
        let client = patient_client(nats.client_urls()).await;
        let stream = two_batches(&client, "LOST", 1).await;
        let (mut follower, _end) = never_replaced(&stream, 2).await;
        let first = tokio::time::timeout(Duration::from_secs(5), follower.next()).await;
        assert_eq!(first.expect("read in time").unwrap().sequence, 1);

        nats.nodes()[0].pause().unwrap();
        let reading =
            tokio::spawn(async move { follower.next().await.map(|entry| entry.sequence) });
        // The read of 2 is sent, and taken by the server with the rest of its connection's bytes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        nats.nodes_mut()[0].restart().await.unwrap();
        let restarted = std::time::Instant::now();
        let second = tokio::time::timeout(Duration::from_secs(10), reading).await;
        let second = second.expect("read again within 10 s of the restart");
        assert_eq!(second.unwrap().unwrap(), 2);
        eprintln!("read again {:?} after the restart", restarted.elapsed());
    }

    /// A read whose request the stream leader took and never answered (paused, then killed),
    /// while the follower's own connection, to another server, stays up: the next read goes
    /// out after the read's deadline (1 s) and is answered by the leader elected meanwhile,
    /// not after the request timeout (30 s here).
    #[tokio::test]
    async fn a_read_the_stream_leader_took_with_it_is_sent_again_after_its_deadline() {
        let mut nats = nats_harness::NatsCluster::three().await.unwrap();
        let observer = patient_client(nats.client_urls()).await;
        two_batches(&observer, "DEADLINE", 3).await;
        let info = observer.context().get_stream("DEADLINE").await.unwrap();
        let leader = info.cached_info().cluster.clone().and_then(|c| c.leader);
        let leader = leader.expect("a stream leader");
        let elsewhere = nats.nodes().iter().find(|node| node.name() != leader);
        let client = patient_client(vec![elsewhere.unwrap().client_url()]).await;
        let followed = UpdateStream::ensure(&client, &stream_settings("DEADLINE", 3)).await;
        let followed = followed.unwrap();
        let (mut follower, _end) = never_replaced(&followed, 2).await;
        let first = tokio::time::timeout(Duration::from_secs(5), follower.next()).await;
        assert_eq!(first.expect("read in time").unwrap().sequence, 1);

        let at = nats.nodes().iter().position(|node| node.name() == leader);
        let at = at.unwrap();
        nats.nodes()[at].pause().unwrap();
        let reading =
            tokio::spawn(async move { follower.next().await.map(|entry| entry.sequence) });
        // The read of 2 is sent to the paused leader, then lost with it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        nats.nodes_mut()[at].kill();
        let killed = std::time::Instant::now();
        let second = tokio::time::timeout(Duration::from_secs(20), reading).await;
        let second = second.expect("read again within 20 s of the kill");
        assert_eq!(second.unwrap().unwrap(), 2);
        eprintln!(
            "read again {:?} after the leader was killed",
            killed.elapsed()
        );
    }

    /// What a test's log subscriber wrote.
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Logs {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
        type Writer = Logs;

        fn make_writer(&'a self) -> Logs {
            self.clone()
        }
    }

    /// A follower of `stream` from its start whose consumer is being replaced by one that is
    /// never created, told that the stream ends at `known_end` (and later what the sender
    /// tells).
    async fn never_replaced(
        stream: &UpdateStream,
        known_end: u64,
    ) -> (Follower, watch::Sender<u64>) {
        let mut follower = Follower::start(stream, 0).await.unwrap();
        let (end, known) = watch::channel(known_end);
        follower.follow_end(known);
        follower.messages = None;
        follower.replacing = Some(Replacing {
            consumer: Box::pin(std::future::pending()),
            ..Replacing::new(stream.clone(), 1, tokio::time::Instant::now())
        });
        (follower, end)
    }

    /// A client of the servers at `urls` whose requests wait 30 s for their answers.
    async fn patient_client(urls: Vec<String>) -> Nats {
        let mut config = crate::Config::for_tests("s").nats;
        config.urls = urls;
        config.request_timeout = Duration::from_secs(30);
        Nats::connect(&config, "test").await.unwrap()
    }

    /// An update stream `name` of `replicas`.
    fn stream_settings(name: &str, replicas: usize) -> StreamSettings {
        StreamSettings {
            name: name.into(),
            replicas,
            duplicate_window: Duration::from_secs(60),
            max_bytes: None,
        }
    }

    /// The update stream `name` of `replicas`, created with batches `c1` and `c2` in it.
    async fn two_batches(client: &Nats, name: &str, replicas: usize) -> UpdateStream {
        let stream = UpdateStream::ensure(client, &stream_settings(name, replicas)).await;
        let stream = stream.unwrap();
        for customer in ["c1", "c2"] {
            publish_raw(client, &stream, batch(customer).encode_to_vec()).await;
        }
        stream
    }

    /// Publishes `payload` to `stream`'s subject as it is; its sequence.
    async fn publish_raw(client: &Nats, stream: &UpdateStream, payload: Vec<u8>) -> u64 {
        let message =
            async_nats::jetstream::message::PublishMessage::build().payload(payload.into());
        let ack = client
            .context()
            .send_publish(stream.subject().to_string(), message);
        ack.await.unwrap().await.unwrap().sequence
    }

    /// A batch of one update, of `customer`.
    fn batch(customer: &str) -> UpdateBatch {
        UpdateBatch {
            updates: vec![crate::journal::codec::UpdateRecord {
                customer_id: customer.into(),
                ..Default::default()
            }],
        }
    }
}
