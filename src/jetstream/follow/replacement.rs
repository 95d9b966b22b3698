//! A follower's consumer being replaced: the new consumer's creation (`rebuild`: its retries,
//! each create's own short timeout), and meanwhile the next sequences read one at a time from
//! the stream leader ([`Follower::replace`]).
//!
//! Why both: creating a consumer is the cluster's meta leader's work, and placed at random it
//! may land on the hung server again; reading from the stream leader needs no meta leader.
//! Not here: when a consumer is taken for stuck (`stall`, the follower's `next`), and the checks
//! of what a consumer delivers (`Follower::accept`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Ordered;
use tokio::sync::watch;

use super::{Entry, Follower, SETTLE, changed_end, check_bounds_settled, consume_from};
use crate::jetstream::{JetStreamError, UpdateBatch, UpdateStream};
use crate::poison::lock;

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
pub(super) const QUICK_CREATES: u32 = 6;
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
pub(super) const SLOW_REPLACEMENT: Duration = Duration::from_secs(10);

/// A new consumer being created, and what was read from the stream leader meanwhile
/// ([`Follower::replace`]).
pub(super) struct Replacing {
    /// The creation (`rebuild`).
    pub(super) consumer: Pin<Box<dyn Future<Output = Result<Ordered, JetStreamError>> + Send>>,
    /// The follower's next sequence, kept current as messages are read: where each attempt of
    /// the creation starts its consumer, and what it checks the stream still holds.
    next: Arc<AtomicU64>,
    /// When it started.
    pub(super) since: tokio::time::Instant,
    /// Messages read from the stream leader since.
    pub(super) read: u64,
    /// When the next read may be made (after one that got no message).
    next_read: tokio::time::Instant,
    /// Why the creation's latest attempt failed, if one did.
    pub(super) failure: Arc<Mutex<Option<String>>>,
    /// Whether [`SLOW_REPLACEMENT`] was warned of.
    warned: bool,
    /// The client's reconnections, seen apart from the follower's.
    connections: watch::Receiver<u64>,
    /// False once the connection's sender is gone.
    watch_connections: bool,
}

impl Replacing {
    /// A consumer of `stream` being created from `next`, from `now`.
    pub(super) fn new(stream: UpdateStream, next: u64, now: tokio::time::Instant) -> Replacing {
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
    pub(super) async fn replace(&mut self) -> Result<Option<Entry>, JetStreamError> {
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
}

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
pub(super) async fn read_from_leader(
    stream: &UpdateStream,
    next: u64,
    known_end: u64,
) -> Option<Entry> {
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

/// How long create number `attempt` (from 0) of one rebuild may take (see [`CREATE_TIMEOUT`]).
pub(super) fn create_timeout(attempt: u32, ceiling: Duration) -> Duration {
    let doublings = attempt.saturating_sub(QUICK_CREATES - 1).min(16);
    (CREATE_TIMEOUT * 2u32.pow(doublings)).min(ceiling)
}
