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
//! `stall::STALL_AFTER` while the stream held the next sequence. The replacement is
//! `replacement`'s: each create gets a short time of its own, growing after a few (the cluster
//! places the new consumer at random, perhaps on the hung peer again, whose answer never comes),
//! and since creates are the meta leader's to answer, the next sequences are read one at a time
//! from the stream leader meanwhile, so that a meta leader lost with the consumer does not stop
//! the replica until another is elected.

mod replacement;
#[cfg(test)]
mod tests;

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};

use super::stall::{STALL_AFTER, Stall};
use super::stream::unavailable;
use super::{JetStreamError, UpdateBatch, UpdateStream};
use replacement::Replacing;

/// How long one pull request waits on an idle stream. The consumer's idle heartbeat is half of
/// it, and two missed heartbeats make it recreate itself, so a consumer lost on a node of a
/// cluster (while the client stays connected to another) is replaced within about this long
/// instead of the client's default 30 s. The cost is one small request per interval while idle.
/// The follower's own check (`stall`) replaces a stuck consumer sooner whenever the stream is
/// known to hold more; the heartbeats are what is left while nothing tells it so.
const PULL_EXPIRES: Duration = Duration::from_secs(4);

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
