//! Where a webhook's signature is checked over its compact form: a thread of its own, at a low
//! CPU priority (nice 10), taking one check at a time from a queue.
//!
//! Why: a body whose bytes match no secret is checked over `JSON.stringify` of the body, which
//! anybody can ask for and which costs up to twenty times checking the bytes (nested deep,
//! numbers JavaScript writes longer; an adversarial run measured 11 to 22 times a plain body's
//! CPU at 64 KiB), all of it before anything says who sent the body. On the ingest thread
//! every delivery waited for it: one refused body of 16 MiB held a signed delivery up for
//! 1.2 s, and 16 senders of refused 64 KiB bodies made signed deliveries take 56 ms (median)
//! instead of 1.3 ms (BENCHMARKS.md, session 59). Here a signed delivery does not wait for it.
//! Nice 10: on a machine with no spare CPU the check gets about a tenth of a core (Linux gives
//! nice 10 a tenth of nice 0's weight), so a flood of such bodies cannot take a core from the
//! ingest thread or gRPC, and a delivery that is signed over its compact form (a sender that
//! re-serializes what it signs) is still checked; at nice 19 it got about a seventieth, and the
//! check of one 1 MiB body took 25 s beside two busy processes.
//!
//! Past half the in-flight slots (`--max-in-flight-webhooks`) waiting, one more is answered 503
//! at once (retried by its sender): such bodies cannot take every slot signed deliveries need,
//! as they could waiting for the ingest thread. The smallest body waiting is checked first,
//! and at a full queue a smaller body takes the place of the largest waiting (answered 503):
//! a check costs about its body's size, so a flood of large bodies, which keeps the queue full
//! the longest, cannot keep a delivery of ordinary size out (Gameball's are a few KiB), and
//! small bodies are checked in microseconds each. Not a shorter queue: a flood answered at
//! once comes back at once, and a flood answered 503 in a few hundred microseconds each (a queue of
//! 32) cost signed deliveries more than one that waited for its checks. A check whose
//! requester has gone (a sender that hung up, or one the handler stopped waiting for) is
//! skipped when its turn comes, and removed when the queue is full: senders that hang up as
//! soon as their body is sent filled it with checks nobody waited for, and a delivery signed
//! over its compact form got 503 (found by an adversarial run).
//!
//! Not here: what a check does (`webhook::Ingress::verify` hands the work over), statuses.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::metrics::Metrics;

/// The thread's nice value (module doc).
const NICE: i32 = 10;

/// The handle to the checking thread, started at the first check (most servers never need
/// one: a delivery signed over its bytes does not); the thread ends once this is dropped.
pub struct CompactChecks {
    queue: Arc<Queue>,
    /// Whether the thread was started (not when starting it failed: the next check tries).
    started: Mutex<bool>,
    /// The most checks waiting for their turn (the one under way not counted).
    queued: usize,
    metrics: Metrics,
}

/// The checks waiting for their turn, shared with the thread.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

#[derive(Default)]
struct QueueState {
    /// Each with its body's size beside it: the order and the full queue's choice look at
    /// every size, and up to 512 waiting (the default) are read without a pointer each.
    waiting: VecDeque<(usize, Box<dyn Job>)>,
    /// Set when the handle is dropped: the thread ends once the queue is empty.
    closed: bool,
}

impl Queue {
    /// The state; a panic while it was held (none of the code that holds it can panic) does
    /// not stop the checks.
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CompactChecks {
    /// No thread yet: it starts with the first check. At most half of `max_in_flight` checks
    /// wait for their turn.
    pub fn new(max_in_flight: usize, metrics: Metrics) -> Self {
        CompactChecks {
            queue: Arc::default(),
            started: Mutex::new(false),
            queued: (max_in_flight / 2).max(1),
            metrics,
        }
    }

    /// Runs `check` of a body of `size` bytes on the checking thread and returns what it
    /// returned, or why it was not run (503: the queue is full of bodies no larger, the
    /// thread could not be started, or a smaller body took its place). Dropped before its
    /// turn, the check is not run.
    pub async fn run<T: Send + 'static>(
        &self,
        size: usize,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        self.start()?;
        // Counted while its requester waits: one that left (a sender that hung up) is not,
        // though its check keeps its place until skipped or removed.
        let _counted = self.metrics.compact_signature_check();
        let (answer, answered) = oneshot::channel();
        self.enqueue(size, Box::new(Pending { check, answer }))?;
        self.queue.changed.notify_one();
        // Dropped unanswered only if the check panicked (the thread goes on with the next).
        answered
            .await
            .map_err(|_| unavailable("it failed (the server's log says why)".into()))?
    }

    /// Queues `job`, of a body of `size` bytes: at a full queue in place of the largest waiting
    /// body, if that is larger (the most recent of equals: the others have waited longer),
    /// which is answered 503.
    fn enqueue(&self, size: usize, job: Box<dyn Job>) -> Result<(), Error> {
        let mut state = self.queue.lock();
        if state.waiting.len() >= self.queued {
            state.waiting.retain(|(_, job)| job.wanted());
        }
        if state.waiting.len() >= self.queued {
            let full = || {
                format!(
                    "{} bodies whose bytes match no secret are waiting for it already (half \
                     of --max-in-flight-webhooks)",
                    self.queued
                )
            };
            let largest = (state.waiting.iter().enumerate())
                .max_by_key(|(_, (waiting, _))| *waiting)
                .filter(|(_, (waiting, _))| *waiting > size)
                .map(|(index, _)| index);
            let Some((_, displaced)) = largest.and_then(|index| state.waiting.remove(index)) else {
                return Err(unavailable(full()));
            };
            displaced.refuse(unavailable(format!(
                "{}, and a smaller body took this one's place",
                full()
            )));
        }
        state.waiting.push_back((size, job));
        Ok(())
    }

    /// Starts the thread unless it runs.
    fn start(&self) -> Result<(), Error> {
        let mut started = self.started.lock().unwrap_or_else(PoisonError::into_inner);
        if *started {
            return Ok(());
        }
        let queue = Arc::clone(&self.queue);
        let logs = tracing::dispatcher::get_default(Clone::clone);
        std::thread::Builder::new()
            .name("webhook-compact".into())
            .spawn(move || tracing::dispatcher::with_default(&logs, || serve(&queue)))
            .map_err(|why| unavailable(format!("its thread could not start ({why})")))?;
        *started = true;
        Ok(())
    }
}

impl Drop for CompactChecks {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.changed.notify_one();
    }
}

/// 503, saying why a body's signature was not checked over its compact form.
fn unavailable(why: String) -> Error {
    Error::Unavailable {
        reason: format!(
            "the body's bytes match no webhook secret, and its check over the compact form \
             (JSON.stringify of the body) could not be made now: {why}; retry shortly"
        ),
    }
}

/// A check waiting for its turn.
trait Job: Send {
    /// Whether anybody still waits for the answer.
    fn wanted(&self) -> bool;
    fn run(self: Box<Self>);
    /// Answers `why` instead of running the check.
    fn refuse(self: Box<Self>, why: Error);
}

struct Pending<T, F> {
    check: F,
    answer: oneshot::Sender<Result<T, Error>>,
}

impl<T: Send, F: FnOnce() -> T + Send> Job for Pending<T, F> {
    fn wanted(&self) -> bool {
        !self.answer.is_closed()
    }

    fn run(self: Box<Self>) {
        let Pending { check, answer } = *self;
        let _ = answer.send(Ok(check()));
    }

    fn refuse(self: Box<Self>, why: Error) {
        let _ = self.answer.send(Err(why));
    }
}

/// The checking thread: each check in turn, until the handle is dropped and none is left.
fn serve(queue: &Queue) {
    if let Err(error) = lower_priority() {
        tracing::warn!(
            %error,
            "the thread that checks webhook signatures over their compact form runs at \
             ordinary priority: a flood of bodies signed with no secret can take a core"
        );
    }
    while let Some(job) = next(queue) {
        if !job.wanted() {
            continue;
        }
        // A panic is a bug, reported by the panic hook; it must not end the thread, which
        // would leave every later check unanswered.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job.run()));
    }
}

/// The next check, the smallest body's (the first of equals), waiting for one; `None` once
/// the handle is dropped and none is left.
fn next(queue: &Queue) -> Option<Box<dyn Job>> {
    let mut state = queue.lock();
    loop {
        let smallest = (state.waiting.iter().enumerate())
            .min_by_key(|(_, (size, _))| *size)
            .map(|(index, _)| index);
        if let Some((_, job)) = smallest.and_then(|index| state.waiting.remove(index)) {
            return Some(job);
        }
        if state.closed {
            return None;
        }
        state = queue
            .changed
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Gives this thread (only) the nice value [`NICE`]: on Linux each thread has its own.
#[cfg(target_os = "linux")]
fn lower_priority() -> std::io::Result<()> {
    let thread = rustix::thread::gettid();
    rustix::process::setpriority_process(Some(thread), NICE).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() -> std::io::Result<()> {
    Err(std::io::Error::other(
        "a thread's own priority is set on Linux only",
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// Polls `check` once: far enough to queue it.
    async fn queue<F: Future + Unpin>(check: &mut F) {
        tokio::select! {
            biased;
            _ = check => panic!("answered before its turn"),
            () = std::future::ready(()) => {}
        }
    }

    /// A check holds the thread until `release` is sent; returns once it runs.
    async fn hold(checks: &Arc<CompactChecks>) -> (std::sync::mpsc::Sender<()>, impl Future) {
        let (started, running) = oneshot::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let checks = Arc::clone(checks);
        let held = tokio::spawn(async move {
            let check = move || {
                let _ = started.send(());
                let _ = released.recv();
            };
            checks.run(1, check).await
        });
        running.await.unwrap();
        (release, held)
    }

    /// A sender that hung up left its check queued: skipped when its turn comes, and removed
    /// when the queue is full, which refuses one more past its length at once.
    #[tokio::test]
    async fn a_check_whose_requester_left_is_skipped_or_removed_and_a_full_queue_answers_at_once() {
        let checks = Arc::new(CompactChecks::new(4, Metrics::new()));
        let (release, held) = hold(&checks).await;
        let ran = Arc::new(AtomicBool::new(false));
        let left = || {
            let ran = Arc::clone(&ran);
            move || ran.store(true, Ordering::SeqCst)
        };
        let mut gone = Box::pin(checks.run(1, left()));
        queue(&mut gone).await;
        drop(gone);
        let mut second = Box::pin(checks.run(1, || 2));
        queue(&mut second).await;
        // Full (2): the check nobody waits for makes room.
        let mut third = Box::pin(checks.run(1, || 3));
        queue(&mut third).await;
        let Err(Error::Unavailable { reason }) = checks.run(1, || 4).await else {
            panic!("a fourth check queued behind two");
        };
        assert!(
            reason.contains("2 bodies whose bytes match no secret"),
            "{reason}"
        );
        drop(release);
        held.await;
        assert_eq!(second.await.unwrap(), 2);
        assert_eq!(third.await.unwrap(), 3);
        // Left while queued, with room: skipped when its turn comes.
        let (release, held) = hold(&checks).await;
        let mut gone = Box::pin(checks.run(1, left()));
        queue(&mut gone).await;
        drop(gone);
        drop(release);
        held.await;
        assert_eq!(checks.run(1, || 5).await.unwrap(), 5);
        assert!(!ran.load(Ordering::SeqCst), "a check nobody waits for ran");
    }

    /// A check that panics is answered 503, and the next one runs.
    #[tokio::test]
    async fn a_check_that_panics_leaves_the_thread_to_the_next() {
        let checks = CompactChecks::new(4, Metrics::new());
        let panicked = checks.run(1, || -> u8 { panic!("a bug in a check") }).await;
        assert!(
            matches!(panicked, Err(Error::Unavailable { .. })),
            "{panicked:?}"
        );
        assert_eq!(checks.run(1, || 7).await.unwrap(), 7);
    }

    /// The smallest body waiting is checked first, the first of equals first.
    #[tokio::test]
    async fn the_smallest_body_waiting_is_checked_first() {
        let checks = Arc::new(CompactChecks::new(16, Metrics::new()));
        let (release, held) = hold(&checks).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut queued = Vec::new();
        for (name, size) in [
            ("large", 900),
            ("small", 10),
            ("medium", 50),
            ("small too", 10),
        ] {
            let order = Arc::clone(&order);
            let mut check = Box::pin(checks.run(size, move || order.lock().unwrap().push(name)));
            queue(&mut check).await;
            queued.push(check);
        }
        drop(release);
        held.await;
        for check in queued {
            check.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, ["small", "small too", "medium", "large"]);
    }

    /// At a full queue a smaller body takes the place of the largest waiting (the latest of
    /// equals), answered 503 saying so; a body no smaller than any waiting is refused itself.
    #[tokio::test]
    async fn at_a_full_queue_a_smaller_body_takes_the_place_of_the_largest() {
        let checks = Arc::new(CompactChecks::new(4, Metrics::new()));
        let (release, held) = hold(&checks).await;
        let mut first = Box::pin(checks.run(1000, || "first large"));
        queue(&mut first).await;
        let mut second = Box::pin(checks.run(1000, || "second large"));
        queue(&mut second).await;
        let mut small = Box::pin(checks.run(20, || "small"));
        queue(&mut small).await;
        let Err(Error::Unavailable { reason }) = second.await else {
            panic!("the latest of the largest keeps its place");
        };
        assert!(
            reason.contains("2 bodies whose bytes match no secret")
                && reason.contains("a smaller body took this one's place"),
            "{reason}"
        );
        let Err(Error::Unavailable { reason }) = checks.run(1000, || "third large").await else {
            panic!("a body no smaller than those waiting queued at a full queue");
        };
        assert!(!reason.contains("took this one's place"), "{reason}");
        drop(release);
        held.await;
        assert_eq!(small.await.unwrap(), "small");
        assert_eq!(first.await.unwrap(), "first large");
    }
}
