//! Where a replica stands: the stream sequence and revision it has applied, what it knows of
//! the stream's end, how far behind it is, and whether it is ready for webhooks.
//!
//! Lag is measured without trusting any clock but this process's: the replica remembers the
//! last moment it *knew* it had applied everything the stream held (`caught_up_at`). It learns
//! that only from a barrier: the stream's last sequence, read from the stream leader by a
//! request sent at some moment `t` (a poll every [`POLL_INTERVAL`]), once applied, proves that
//! everything published before `t` is applied. The lag in seconds is `now - caught_up_at`: an
//! upper bound on the age of the oldest message not applied yet, exact to about one poll
//! interval, and growing while the replica is stopped, cut off from NATS or stuck, which is
//! what readiness needs. A replica that has not passed a barrier since it started is not ready,
//! however young it is. A leader that has not heard from a quorum of its group lately gives no
//! barrier (`JetStreamError::NoQuorum`): cut off from its peers, it still answers with its own
//! end, and the replica is not ready while it does.
//!
//! A delivered message's count of messages pending after it is not such a proof: it is the
//! server's count when it sent the message, which may be long before this process reads it (a
//! process paused, or starved of CPU, reads what the client had buffered). Taken at the time of
//! reading, a 0 there made a replica 20 s behind report itself caught up and ready. It still
//! raises what the replica knows of the stream's end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::poll_findings::{Finding, Runs};
use crate::jetstream::Nats;
use crate::poison::lock;

/// How often a replica reads the stream's last sequence (its barrier), idle or not.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What a replica has applied: published together by the applier, so a reader never sees a
/// revision paired with the wrong sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// The last stream sequence applied (0: none).
    pub sequence: u64,
    /// The store revision after it.
    pub revision: u64,
}

/// How far a replica is behind its stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lag {
    /// Stream messages known to exist that are not applied yet.
    pub messages: u64,
    /// Time since the replica last knew it had applied everything (see the module doc).
    pub seconds: f64,
}

/// A replica's standing. Cloning it is one reference-count increment.
#[derive(Clone)]
pub struct ReplicaStatus {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    nats: Nats,
    max_lag: Duration,
    started: Instant,
    position: watch::Sender<Position>,
    /// The highest last sequence of the stream seen (from deliveries and barrier reads); the
    /// follower watches it to tell a stuck consumer (`Follower::follow_end`).
    stream_last: watch::Sender<u64>,
    /// A plain mutex: a few words, taken once per applied message and once per poll.
    clock: Mutex<Clock>,
    /// Why the applier stopped, if it did (a hole, a malformed message: operator action).
    failed: Mutex<Option<String>>,
    /// The least room the stream must have left: one webhook of `--max-body-bytes`.
    min_room: u64,
    /// The room the stream had at the last poll, when it had less than `min_room`.
    short_of_room: Mutex<Option<(u64, u64)>>,
    /// The polls' current run of finding the stream missing, or replaced (`poll_findings`).
    runs: Mutex<Runs>,
    /// Told at each poll that finds the stream missing once its run has lasted
    /// [`MISSING_SETTLE`]: what publishes in flight wait on (`ReplicaStatus::until_missing`),
    /// without a timer each.
    missing_settled: Notify,
    /// The latest answered read of the stream's end, and the latest poll a leader short of its
    /// quorum answered. What catch-ups wait on (`ReplicaStatus::last_read_after`) rather than
    /// each sending a request of its own.
    reads: watch::Sender<Reads>,
}

/// What the polls last learnt of the stream's end.
#[derive(Clone, Debug, Default)]
struct Reads {
    /// The latest read that bounded it.
    bound: Option<Bound>,
    /// The latest poll, if it was answered by a leader that had not heard from a quorum of its
    /// group lately (`JetStreamError::NoQuorum`): when it was sent, and why.
    silent: Option<(Instant, String)>,
}

/// One read of the stream's end.
#[derive(Clone, Copy, Debug)]
struct Bound {
    /// When it was sent.
    read_at: Instant,
    /// The moment its leader last heard from a quorum of its group, no later than it answered
    /// (`read_at` less `Bounds::heard`: the answer was made at or after `read_at`, so an answer
    /// seen late makes this earlier, never later): what was acknowledged anywhere before then is
    /// at or below `last`. `None` when that is before this clock's start.
    as_of: Option<Instant>,
    /// The stream's last sequence.
    last: u64,
}

impl Reads {
    /// What the polls have found for a caller that came at `since`, once they have: the last
    /// sequence of a read that bounds everything acknowledged before `since`, or why a leader
    /// asked after `since` could not show that it still held its quorum.
    fn answer_after(&self, since: Instant) -> Option<Result<u64, &str>> {
        if let Some(bound) = self.bound
            && bound.as_of.is_some_and(|as_of| as_of >= since)
        {
            return Some(Ok(bound.last));
        }
        let (read_at, reason) = self.silent.as_ref()?;
        (*read_at >= since).then_some(Err(reason.as_str()))
    }
}

#[derive(Default)]
struct Clock {
    /// The last moment everything the stream held was known to be applied.
    caught_up_at: Option<Instant>,
    /// A barrier read and not applied yet: (when it was read, the last sequence then).
    barrier: Option<(Instant, u64)>,
}

/// How long the polls that answer must find the stream missing before webhooks are answered
/// 503 without a publish: a moment's "not found" while a cluster elects its leaders is ridden
/// out.
const MISSING_SETTLE: Duration = Duration::from_secs(2);

impl ReplicaStatus {
    /// A replica named `name` that starts at `position`, not caught up yet.
    pub(crate) fn new(
        name: String,
        nats: Nats,
        (max_lag, min_room): (Duration, u64),
        position: Position,
    ) -> Self {
        ReplicaStatus {
            inner: Arc::new(Inner {
                name,
                nats,
                max_lag,
                started: Instant::now(),
                position: watch::channel(position).0,
                stream_last: watch::channel(position.sequence).0,
                clock: Mutex::default(),
                failed: Mutex::default(),
                min_room,
                short_of_room: Mutex::default(),
                runs: Mutex::default(),
                missing_settled: Notify::new(),
                reads: watch::channel(Reads::default()).0,
            }),
        }
    }

    /// The stream had `room` bytes left at a poll (`None`: it has no size limit). Less than
    /// one webhook's worth makes the replica not ready: every publish would be refused (its
    /// discard policy is `new`), until a snapshot's purge or the operator makes room.
    pub(crate) fn observed_room(&self, room: Option<u64>) {
        let short = room
            .filter(|room| *room < self.inner.min_room)
            .map(|room| (room, self.inner.min_room));
        *lock(&self.inner.short_of_room) = short;
    }

    /// A poll found `finding`: how long the run it continues has lasted (a replaced stream's
    /// run is what stops the applier). Once the polls that answered have found the stream
    /// missing for [`MISSING_SETTLE`], each such poll also wakes the publishes waiting on it
    /// ([`ReplicaStatus::until_missing`]).
    pub(crate) fn observed(&self, finding: Finding) -> Duration {
        let now = Instant::now();
        let (lasted, settled) = {
            let mut runs = lock(&self.inner.runs);
            let lasted = runs.observe(finding, now);
            (lasted, runs.missing(MISSING_SETTLE).is_some())
        };
        if settled {
            self.inner.missing_settled.notify_waiters();
        }
        lasted
    }

    /// Why the stream is missing, once the polls that answered have found it so for
    /// [`MISSING_SETTLE`] (`poll_findings`): a publish then would wait out
    /// `--nats-request-timeout` for a stream that no longer exists (the client retries "no
    /// responders", which a leader election answers for a moment), and webhooks got their
    /// 503 after a median 9 s, a fifth of them after the sender gave up (found by an
    /// adversarial run).
    pub(crate) fn missing(&self) -> Option<String> {
        lock(&self.inner.runs)
            .missing(MISSING_SETTLE)
            .map(str::to_owned)
    }

    /// Why the stream is missing, once [`ReplicaStatus::missing`] says so (within a poll of
    /// it): what a publish in flight is raced against.
    pub(crate) async fn until_missing(&self) -> String {
        loop {
            // Made before the look, so that a poll's notice between the two is not missed.
            let settled = self.inner.missing_settled.notified();
            if let Some(reason) = self.missing() {
                return reason;
            }
            settled.await;
        }
    }

    /// Why the stream is not the one this replica follows, if the last poll found so: what it
    /// would publish to is another stream, whose outcomes it cannot know.
    pub(crate) fn replaced(&self) -> Option<String> {
        lock(&self.inner.runs).replaced().map(str::to_owned)
    }

    /// Whether the stream had less room than one webhook at the last poll.
    pub(crate) fn short_of_room(&self) -> bool {
        lock(&self.inner.short_of_room).is_some()
    }

    /// The replica's name (`--replica-name`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What it has applied.
    pub fn position(&self) -> Position {
        *self.inner.position.borrow()
    }

    /// A receiver that wakes whenever the position moves.
    pub fn subscribe(&self) -> watch::Receiver<Position> {
        self.inner.position.subscribe()
    }

    /// The highest last sequence of the stream this replica has seen.
    pub fn stream_last(&self) -> u64 {
        *self.inner.stream_last.borrow()
    }

    /// A receiver that wakes whenever [`ReplicaStatus::stream_last`] rises.
    pub(crate) fn watch_stream_last(&self) -> watch::Receiver<u64> {
        self.inner.stream_last.subscribe()
    }

    fn raise_stream_last(&self, last: u64) {
        self.inner
            .stream_last
            .send_if_modified(|seen| last > std::mem::replace(seen, (*seen).max(last)));
    }

    /// How far behind it is now.
    pub fn lag(&self) -> Lag {
        self.lag_since(lock(&self.inner.clock).caught_up_at)
    }

    /// How far behind it is, last shown current at `caught_up_at` (never: since it started).
    fn lag_since(&self, caught_up_at: Option<Instant>) -> Lag {
        let applied = self.position().sequence;
        let messages = self.stream_last().saturating_sub(applied);
        let since = caught_up_at.unwrap_or(self.inner.started);
        Lag {
            messages,
            seconds: since.elapsed().as_secs_f64(),
        }
    }

    /// Whether the connection to NATS is up.
    pub fn nats_connected(&self) -> bool {
        self.inner.nats.is_connected()
    }

    /// Why this replica should not take webhooks now, if it should not: NATS unreachable, the
    /// applier stopped, the stream replaced, missing or full, its leader short of its quorum at
    /// the latest poll, or further behind than `--max-lag`.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(reason) = lock(&self.inner.failed).as_ref() {
            return Some(format!("replica stopped applying the stream: {reason}"));
        }
        if !self.nats_connected() {
            return Some("not connected to NATS; webhooks get 503".into());
        }
        if let Some(reason) = self.replaced() {
            return Some(format!(
                "the stream this replica follows was replaced ({reason}); it stops, to start \
                 again on the new one"
            ));
        }
        if let Some(reason) = self.missing() {
            return Some(format!(
                "the update stream is missing ({reason}): it was deleted or lost; webhooks get \
                 503 until it is restored (README, \"Backing up the stream\")"
            ));
        }
        if let Some((_, reason)) = &self.inner.reads.borrow().silent {
            return Some(format!(
                "the stream's leader cannot show that it still holds its quorum ({reason}): \
                 this replica may be cut off from the cluster with it"
            ));
        }
        if let Some((room, needed)) = *lock(&self.inner.short_of_room) {
            return Some(format!(
                "the stream is full: {room} bytes left, less than one webhook of \
                 --max-body-bytes ({needed}); webhooks get 503 until a snapshot's purge or the \
                 operator makes room (--nats-max-bytes)"
            ));
        }
        let caught_up_at = lock(&self.inner.clock).caught_up_at;
        let lag = self.lag_since(caught_up_at);
        if caught_up_at.is_none() {
            return Some(format!(
                "replica catching up since it started: not yet shown to have applied the \
                 whole stream, {} messages behind{}",
                lag.messages,
                self.unanswered_note()
            ));
        }
        if lag.seconds > self.inner.max_lag.as_secs_f64() {
            return Some(format!(
                "replica lagging: {:.1} s since it last had applied the whole stream \
                 (--max-lag {}), {} messages behind{}",
                lag.seconds,
                humantime::format_duration(self.inner.max_lag),
                lag.messages,
                self.unanswered_note()
            ));
        }
        None
    }

    /// Why the stream's polls go unanswered, if the latest got no answer: the cause of a lag
    /// that grows while the replica applies everything it is sent (a stream short of its
    /// quorum, a timeout), which "lagging" alone hid from operators.
    fn unanswered_note(&self) -> String {
        if let Some(reason) = self.unanswered() {
            return format!("; the stream's latest poll got no answer: {reason}");
        }
        // A poll still waiting for its answer has no reason yet, for up to
        // --nats-request-timeout: its age says why the lag grows meanwhile (it said
        // "0 messages behind" and nothing else; a session-41 leftover).
        let last_read = self.inner.reads.borrow().bound;
        let since = match last_read {
            Some(bound) => bound.read_at,
            None => self.inner.started,
        };
        match since.elapsed() {
            age if age > 2 * POLL_INTERVAL => format!(
                "; the stream's end was last read {:.1} s ago, and the poll since has no answer \
                 yet",
                age.as_secs_f64()
            ),
            _ => String::new(),
        }
    }

    /// The applier applied stream message `sequence` (sent by the server with `pending`
    /// messages after it), leaving the store at `revision`.
    pub(crate) fn applied(&self, sequence: u64, revision: u64, pending: u64) {
        self.inner
            .position
            .send_replace(Position { sequence, revision });
        self.raise_stream_last(sequence + pending);
        let mut clock = lock(&self.inner.clock);
        if let Some((read_at, last)) = clock.barrier
            && sequence >= last
        {
            clock.barrier = None;
            clock.caught_up(read_at);
        }
    }

    /// The stream's last sequence was `last` when read at `read_at`, its leader having last
    /// heard from a quorum of its group `heard` before it answered. Readiness takes the read as
    /// of `read_at`: within `jetstream`'s quorum window (3 s), no peer cut off together with the
    /// others has called an election yet, and a lag measured to the poll is what routing
    /// webhooks needs (measured to `heard`, an idle cluster's 2 s between heartbeats would put
    /// every replica past the default --max-lag of 1 s half the time). Catch-ups take it as of
    /// `heard` before (`ReplicaStatus::last_read_after`).
    pub(crate) fn observed_last(&self, last: u64, read_at: Instant, heard: Duration) {
        let bound = Bound {
            read_at,
            as_of: read_at.checked_sub(heard),
            last,
        };
        self.inner.reads.send_modify(|reads| {
            reads.bound = Some(bound);
            reads.silent = None;
        });
        self.raise_stream_last(last);
        let applied = self.position().sequence;
        let mut clock = lock(&self.inner.clock);
        if applied >= last {
            clock.barrier = None;
            clock.caught_up(read_at);
        } else if clock.barrier.is_none() {
            // An older barrier still waiting is kept: it is passed sooner.
            clock.barrier = Some((read_at, last));
        }
    }

    /// A poll sent at `read_at` got no bound of the stream: `silent` says why, when its answer
    /// came from a leader short of its quorum.
    pub(crate) fn observed_unbounded(&self, read_at: Instant, silent: Option<String>) {
        self.inner.reads.send_if_modified(|reads| {
            let changed = reads.silent.is_some() || silent.is_some();
            reads.silent = silent.map(|reason| (read_at, reason));
            changed
        });
    }

    /// The stream's last sequence as read by the first of the polls' reads whose leader heard
    /// from a quorum of its group at or after `since`: it bounds everything acknowledged
    /// anywhere before `since` (a read merely sent after it did not: a peer cut off from the
    /// leader alone may have won a vote and had more acknowledged meanwhile, `Bounds::heard`).
    /// Waits for it (while the stream's end cannot be read, for as long as that lasts: callers
    /// bound the wait), or `Err` with why a leader asked after `since` could not show it still
    /// held its quorum: cut off from its peers, it may stay so, and the caller is answered at
    /// once rather than after its whole wait.
    /// The polls read every [`POLL_INTERVAL`] anyway, so any number of waiters cost the stream
    /// no request: one each let any client drive the stream leader's load with watches and
    /// reads past the replica's revision, and a read that failed ended a watch's wait at
    /// once, while the stream elected a leader (both found by an adversarial run).
    pub(crate) async fn last_read_after(&self, since: Instant) -> Result<u64, String> {
        let mut reads = self.inner.reads.subscribe();
        let answer = (reads
            .wait_for(|reads| reads.answer_after(since).is_some())
            .await)
            .ok()
            .and_then(|reads| {
                reads
                    .answer_after(since)
                    .map(|answer| answer.map_err(str::to_owned))
            });
        match answer {
            Some(answer) => answer,
            // The sender lives as long as this status: never closed while borrowed here.
            None => std::future::pending().await,
        }
    }

    /// Why the latest read of the stream's end got no answer, if it got none.
    pub(crate) fn unanswered(&self) -> Option<String> {
        lock(&self.inner.runs).unanswered().map(str::to_owned)
    }

    /// The applier stopped for good, for `reason`.
    pub(crate) fn fail(&self, reason: String) {
        *lock(&self.inner.failed) = Some(reason);
    }

    /// Why the applier stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.failed).clone()
    }
}

impl Clock {
    fn caught_up(&mut self, at: Instant) {
        if self.caught_up_at.is_none_or(|before| at > before) {
            self.caught_up_at = Some(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read bounds what came before its leader last heard from a quorum, not what came
    /// before it was sent; a leader short of its quorum answers those that came before its
    /// poll, and a later bound that covers them wins.
    #[test]
    fn a_caller_is_answered_by_a_quorum_heard_after_it_came_or_by_a_silent_leader() {
        let t0 = Instant::now();
        let at = |millis| t0 + Duration::from_millis(millis);
        let mut reads = Reads {
            bound: Some(Bound {
                read_at: at(2_000),
                as_of: Some(at(500)),
                last: 7,
            }),
            silent: None,
        };
        assert_eq!(reads.answer_after(at(400)), Some(Ok(7)));
        assert_eq!(
            reads.answer_after(at(1_000)),
            None,
            "sent after, heard before"
        );
        reads.silent = Some((at(3_000), "cut off".into()));
        assert_eq!(reads.answer_after(at(1_000)), Some(Err("cut off")));
        assert_eq!(reads.answer_after(at(3_500)), None);
        reads.bound = Some(Bound {
            read_at: at(4_000),
            as_of: Some(at(3_800)),
            last: 9,
        });
        assert_eq!(reads.answer_after(at(1_000)), Some(Ok(9)));
    }
}
