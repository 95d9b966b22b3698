//! When the router wakes the feeds it queued revisions for: at once, unless it woke feeds
//! less than [`WAKE_SPACING`] ago; then all together, that long after the last wake.
//!
//! Why: on a single node the router runs on the ingest thread, and a feed runs on the gRPC
//! runtime. At the rates a busy service takes webhooks, those workers are parked between
//! sparse deliveries, so each wake from the ingest thread unparked one (a futex, an
//! inter-processor wake, two context switches), on the thread that bounds ingest:
//! BENCHMARKS.md, session 39, measured about 1.4 context switches per delivery and a fifth
//! fewer webhooks a second with 1,000 customer-filtered watchers. Woken together, a burst of
//! feeds costs about one unpark. A delivery waits at most the spacing for it (plus the
//! runtime's time to run the timer), and only while deliveries come closer together than
//! that: a change after a quiet spell, such as each of 100 updates a second, wakes its feeds
//! at once.
//!
//! Not here: which feeds want a change (`router`), what a feed sends (`feed`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::router::Mailbox;
use crate::poison::lock;

/// The least time between two wakes of routed feeds, while they have to wait for it.
pub(super) const WAKE_SPACING: Duration = Duration::from_micros(500);

/// How late a scheduled wake may be before the next wake is made at once instead: its task
/// was dropped (a runtime ending) or starved.
const OVERDUE: Duration = Duration::from_millis(100);

/// The router's wakes: when the last were made, and those deferred to the next.
#[derive(Default)]
pub(super) struct Wakes {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When feeds were last woken.
    last: Option<Instant>,
    /// Feeds to wake at the next wake, which is scheduled while this is not empty.
    deferred: Vec<Arc<Mailbox>>,
    /// When the next wake is due, while one is scheduled.
    due: Option<Instant>,
}

impl Wakes {
    /// Starts the wakes of one routing: feeds added to it are woken at once, or at the next
    /// wake (see the module's docs), decided here for the whole routing.
    pub(super) fn begin(self: &Arc<Self>) -> WakeBatch<'_> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        if let Some(due) = state.due
            && now >= due + OVERDUE
        {
            // The timer's task never ran (its runtime ended): no feed waits on it any more.
            state.due = None;
            notify(std::mem::take(&mut state.deferred));
        }
        let defer = match (state.due, state.last) {
            (Some(_), _) => true,
            // Outside a runtime (nothing could run the timer) every wake is made at once.
            (None, Some(last)) => {
                now < last + WAKE_SPACING && tokio::runtime::Handle::try_current().is_ok()
            }
            (None, None) => false,
        };
        WakeBatch {
            wakes: self,
            now,
            deferred: defer.then(Vec::new),
            woke: false,
        }
    }

    /// Adds `deferred` to the next wake, scheduling it if none is.
    fn defer(self: &Arc<Self>, deferred: Vec<Arc<Mailbox>>) {
        let mut state = lock(&self.state);
        state.deferred.extend(deferred);
        if state.due.is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Nothing could run the timer: woken at once.
            notify(std::mem::take(&mut state.deferred));
            return;
        };
        let due = (state.last).map_or_else(Instant::now, |last| last + WAKE_SPACING);
        state.due = Some(due);
        drop(state);
        let wakes = Arc::clone(self);
        runtime.spawn(async move {
            tokio::time::sleep_until(due).await;
            wakes.wake_deferred();
        });
    }

    fn wake_deferred(&self) {
        let deferred = {
            let mut state = lock(&self.state);
            (state.last, state.due) = (Some(Instant::now()), None);
            std::mem::take(&mut state.deferred)
        };
        notify(deferred);
    }
}

/// The wakes of one routing.
pub(super) struct WakeBatch<'a> {
    wakes: &'a Arc<Wakes>,
    now: Instant,
    /// `Some` when this routing's wakes wait for the next wake.
    deferred: Option<Vec<Arc<Mailbox>>>,
    /// Whether a feed was woken at once.
    woke: bool,
}

impl WakeBatch<'_> {
    /// Wakes `mailbox`'s feed, now or with the next wake.
    pub(super) fn add(&mut self, mailbox: &Arc<Mailbox>) {
        match &mut self.deferred {
            Some(deferred) => deferred.push(Arc::clone(mailbox)),
            None => {
                // Stores a permit when the feed is not waiting, so a push between its take
                // and its wait is not lost.
                mailbox.wake.notify_one();
                self.woke = true;
            }
        }
    }

    /// Ends the routing: its deferred wakes are scheduled, or the time of its wakes noted.
    pub(super) fn finish(self) {
        match self.deferred {
            Some(deferred) if !deferred.is_empty() => self.wakes.defer(deferred),
            Some(_) => {}
            None if self.woke => lock(&self.wakes.state).last = Some(self.now),
            None => {}
        }
    }
}

fn notify(mailboxes: Vec<Arc<Mailbox>>) {
    for mailbox in mailboxes {
        mailbox.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One routing that wakes `mailbox`'s feed.
    fn wake(wakes: &Arc<Wakes>, mailbox: &Arc<Mailbox>) {
        let mut batch = wakes.begin();
        batch.add(mailbox);
        batch.finish();
    }

    /// Whether the feed of `mailbox` has been woken (its permit taken).
    fn woken(mailbox: &Mailbox) -> bool {
        let notified = mailbox.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable()
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_closer_than_the_spacing_are_made_together_after_it() {
        let wakes = Arc::new(Wakes::default());
        let [first, second, third] = [(); 3].map(|()| Mailbox::unfiled());
        wake(&wakes, &first);
        assert!(woken(&first), "the first wake is made at once");
        wake(&wakes, &second);
        wake(&wakes, &third);
        assert!(
            !woken(&second) && !woken(&third),
            "too soon after the first"
        );
        tokio::time::sleep(WAKE_SPACING / 2).await;
        assert!(!woken(&second) && !woken(&third), "not due yet");
        tokio::time::sleep(WAKE_SPACING).await;
        assert!(
            woken(&second) && woken(&third),
            "made together once it is due"
        );

        // After a quiet spell, at once again.
        tokio::time::sleep(WAKE_SPACING).await;
        wake(&wakes, &first);
        assert!(woken(&first));
    }

    /// A scheduled wake whose task never runs (its runtime ended) does not keep feeds waiting
    /// for good: the next wake after it was due makes them all.
    #[test]
    fn wakes_deferred_on_a_runtime_that_ended_are_made_by_the_next() {
        let wakes = Arc::new(Wakes::default());
        let [first, second, third] = [(); 3].map(|()| Mailbox::unfiled());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            wake(&wakes, &first);
            wake(&wakes, &second);
        });
        drop(runtime);
        assert!(!woken(&second));
        // The time is what is tested: past the scheduled wake by more than OVERDUE.
        std::thread::sleep(OVERDUE + WAKE_SPACING);
        wake(&wakes, &third);
        for mailbox in [&first, &second, &third] {
            assert!(woken(mailbox));
        }
    }
}
