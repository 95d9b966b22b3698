//! A subscriber's feed: the task that sends it initial state, history and live changes.
//!
//! A feed owns a cursor (the next revision it has to look at) and reads the store's history
//! from there at its own pace into a small bounded channel; the writer never waits for it.
//! Once caught up, a feed follows its mailbox (`super::router`), which names the revisions it
//! wants, and wakes only for those. A feed that falls behind the history gets a
//! `Reset` and the full initial state again, never a silent gap.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::outbox::{Outbox, TrySendError};
use super::router::{Mailbox, Registration, Router};
use super::spec::WatchSpec;
use super::{ResetKind, WatchEvent};
use crate::error::Error;
use crate::profile::Change;
use crate::store::{Compacted, Store};

/// The end of a stream stopped in the middle of an initial state (on request or after a
/// `Reset`): the profiles sent are not the whole state, and no revision of it is a resume point.
const INCOMPLETE_STATE: &str = "server shutting down before the initial state was complete: \
    the profiles sent so far are not the whole state; watch again with start_revision 0 and \
    send_initial_state";

/// How many history entries or profiles a subscriber takes per read.
const READ_BATCH: usize = 256;

/// Where a subscription starts, decided when it is opened.
#[derive(Debug)]
enum Start {
    /// Live changes after `synced`.
    Live { synced: u64 },
    /// Initial state, then live.
    InitialState,
    /// History from `from`; `Synced` once `synced` has been passed.
    Replay { from: u64, synced: u64 },
    /// The requested position is gone: reset, then initial state.
    Reset {
        kind: ResetKind,
        reason: String,
        oldest: u64,
    },
}

/// An opened subscription, ready to run.
pub struct Watch {
    spec: WatchSpec,
    store: Store,
    router: Arc<Router>,
    start: Start,
}

/// The subscriber is gone or the server is stopping: stop producing.
struct Stop;

impl Watch {
    /// Checks the request against the store and pins its starting point. Errors here fail the
    /// call before any stream starts.
    pub(super) fn open(
        store: &Store,
        router: &Arc<Router>,
        spec: WatchSpec,
    ) -> Result<Watch, Error> {
        let current = store.revision();
        let next = current + 1;
        // Resuming another store's revisions: they mean something else here.
        let other_store = spec
            .store_id
            .as_deref()
            .filter(|id| spec.start_revision > 0 && *id != store.store_id());
        let start = match spec.start_revision {
            _ if other_store.is_some() => {
                let requested = other_store.unwrap_or_default().to_owned();
                if spec.fail_if_compacted {
                    return Err(Error::StoreChanged {
                        requested,
                        current: store.store_id().to_owned(),
                    });
                }
                Start::Reset {
                    kind: ResetKind::StoreChanged,
                    reason: format!(
                        "store_id {} is not this server's store {}: the revisions it knows \
                         mean something else here",
                        crate::error::echoed(&requested),
                        store.store_id()
                    ),
                    oldest: store.oldest_in_history(),
                }
            }
            0 if spec.send_initial_state => Start::InitialState,
            0 => Start::Live { synced: current },
            requested if requested > next => {
                return Err(Error::RevisionInFuture { requested, next });
            }
            requested => {
                let oldest = store.oldest_in_history();
                if requested >= oldest {
                    Start::Replay {
                        from: requested,
                        synced: current,
                    }
                } else if spec.fail_if_compacted {
                    return Err(Error::Compacted { requested, oldest });
                } else {
                    Start::Reset {
                        kind: ResetKind::CompactedStart,
                        reason: format!(
                            "start_revision {requested} is older than the oldest revision in \
                             history {oldest}"
                        ),
                        oldest,
                    }
                }
            }
        };
        Ok(Watch {
            spec,
            store: store.clone(),
            router: Arc::clone(router),
            start,
        })
    }

    /// Feeds the subscriber until it goes away or `shutdown` fires; on shutdown the last event
    /// is an `End` naming the revision to resume from.
    pub async fn run(self, events: Outbox, shutdown: CancellationToken) {
        let mut feed = Feed {
            spec: Arc::new(self.spec),
            store: self.store,
            router: self.router,
            events,
            shutdown,
            last_sent: Instant::now(),
        };
        let mut cursor = 0;
        if let Err(Stop) = feed.run(self.start, &mut cursor).await
            && feed.shutdown.is_cancelled()
        {
            feed.last_words(cursor).await;
        }
    }
}

/// The running side of a subscription.
struct Feed {
    spec: Arc<WatchSpec>,
    store: Store,
    router: Arc<Router>,
    events: Outbox,
    shutdown: CancellationToken,
    last_sent: Instant,
}

impl Feed {
    /// The subscription's life; `cursor` is kept current (the next revision to look at) so
    /// that a stop can say where to resume.
    async fn run(&mut self, start: Start, cursor: &mut u64) -> Result<(), Stop> {
        // In the router's index from its first event on: every change routed after this point
        // that the feed wants reaches its mailbox. It still reads the history below until it
        // has caught up with the published revision, and only then follows its mailbox.
        let registration = Registration::new(&self.router, Arc::clone(&self.spec));
        let mailbox = Arc::clone(&registration.mailbox);
        let mut synced_at = self.begin(start, cursor).await?;
        loop {
            if let Some(synced) = synced_at.filter(|synced| *cursor > *synced) {
                synced_at = None;
                self.send(WatchEvent::Synced { revision: synced }).await?;
            }
            match self.store.history_from(*cursor, READ_BATCH) {
                // Caught up with the published revision, and every later change is routed:
                // follow the mailbox until the history has to be read again.
                Ok(changes) if changes.is_empty() => self.follow(&mailbox, cursor).await?,
                Ok(changes) => self.send_changes(changes, cursor, &mut synced_at).await?,
                Err(Compacted { oldest }) if self.spec.fail_if_compacted => {
                    let error = Error::Compacted {
                        requested: *cursor,
                        oldest,
                    };
                    self.send(WatchEvent::End(error)).await?;
                    return Ok(());
                }
                Err(Compacted { oldest }) => {
                    synced_at = None;
                    self.fell_behind(cursor, oldest).await?;
                }
            }
        }
    }

    /// Takes the subscription to its starting point; `cursor` is where it reads the history
    /// from next (0 until a start with an initial state has sent its `Synced`: no resume
    /// point before that). Returns the revision a replay sends `Synced` after, if any.
    async fn begin(&mut self, start: Start, cursor: &mut u64) -> Result<Option<u64>, Stop> {
        match start {
            Start::Live { synced } => {
                *cursor = synced + 1;
                self.send(WatchEvent::Synced { revision: synced }).await?;
            }
            Start::InitialState => *cursor = self.initial_state().await?,
            Start::Replay { from, synced } => {
                *cursor = from;
                return Ok(Some(synced));
            }
            Start::Reset {
                kind,
                reason,
                oldest,
            } => {
                self.send(WatchEvent::Reset {
                    kind,
                    reason,
                    revision: oldest,
                })
                .await?;
                *cursor = self.initial_state().await?;
            }
        }
        Ok(None)
    }

    /// Sends the changes of a history read that the subscriber wants, moving `cursor` past
    /// each, and `Synced` once a replay passes `synced_at`.
    async fn send_changes(
        &mut self,
        changes: Vec<Arc<Change>>,
        cursor: &mut u64,
        synced_at: &mut Option<u64>,
    ) -> Result<(), Stop> {
        let mut changes = changes.into_iter();
        while let Some(change) = changes.next() {
            let revision = change.revision;
            if self.spec.wants_change(&change)
                && let Some(event) = self.try_send(WatchEvent::Change(change))?
            {
                // No room: the rest of the read is let go before the wait, and read again
                // from the history afterwards (`run`), so a subscriber that stopped reading
                // keeps no batch of changes alive that the history has dropped since.
                drop(changes);
                self.send(event).await?;
                *cursor = revision + 1;
                return Ok(());
            }
            *cursor = revision + 1;
            if *synced_at == Some(revision) {
                *synced_at = None;
                self.send(WatchEvent::Synced { revision }).await?;
            }
        }
        Ok(())
    }

    /// The history no longer holds `cursor`: `Reset`, then the initial state again; moves
    /// `cursor` past it. From the `Reset` on there is no resume point until the new state's
    /// `Synced` (`cursor` 0): the subscriber drops what it has, and a stop before the end must
    /// not make it resume on top of half a state. Until the `Reset` is sent, its old position
    /// stands.
    async fn fell_behind(&mut self, cursor: &mut u64, oldest: u64) -> Result<(), Stop> {
        let reason = format!(
            "subscriber fell behind the history: revision {cursor} is gone, the oldest \
             available is {oldest}"
        );
        self.send(WatchEvent::Reset {
            kind: ResetKind::FellBehind,
            reason,
            revision: oldest,
        })
        .await?;
        *cursor = 0;
        *cursor = self.initial_state().await?;
        Ok(())
    }

    /// Sends every matching profile as of one revision `R`, then `Synced{R}`; returns `R + 1`.
    ///
    /// Profiles are read while writes go on ([`crate::store::AsOfScan`]). If the history drops
    /// the changes needed to read them as of `R` meanwhile, the subscriber gets a `Reset` and
    /// the initial state starts over.
    async fn initial_state(&mut self) -> Result<u64, Stop> {
        loop {
            let mut scan = self.store.scan_as_of(self.spec.client_id.clone());
            while !scan.done() {
                let spec = &self.spec;
                let chunk = scan.next_turn(
                    &self.store,
                    READ_BATCH,
                    crate::store::EXAMINE_PER_TURN,
                    |profile| spec.wants_profile(&profile.key),
                );
                if chunk.is_empty() {
                    // Many keys examined, none wanted: nothing was sent that would have seen a
                    // shutdown or a subscriber gone, so look before the next turn; then let the
                    // worker's other tasks run.
                    self.stop_if_unwanted()?;
                    tokio::task::yield_now().await;
                    continue;
                }
                for profile in chunk {
                    self.send(WatchEvent::Existing(profile)).await?;
                }
            }
            match scan.resolve_newer(&self.store) {
                Ok(profiles) => {
                    for profile in profiles {
                        self.send(WatchEvent::Existing(profile)).await?;
                    }
                    self.send(WatchEvent::Synced {
                        revision: scan.as_of,
                    })
                    .await?;
                    return Ok(scan.as_of + 1);
                }
                Err(Compacted { oldest }) => {
                    let reason = "the history moved on while the initial state was sent";
                    self.send(WatchEvent::Reset {
                        kind: ResetKind::InitialState,
                        reason: reason.into(),
                        revision: oldest,
                    })
                    .await?;
                }
            }
        }
    }

    /// A feed that has caught up: sends the changes its mailbox names, in order.
    ///
    /// Returns when the history has to be read from `cursor` again: the mailbox overflowed
    /// (`cursor` is where queueing stopped) or a revision it names is no longer in the
    /// history (`cursor` is that revision, so the read reports the compaction). Changes
    /// below `cursor` in the mailbox were already read from the history and are skipped.
    /// Whenever the mailbox is empty, everything up to the routed revision has been seen, so
    /// `cursor` moves past it: `Progress` and the resume point on shutdown name it even when
    /// no change of this feed's customers came.
    ///
    /// The shutdown wait and the heartbeat timer are made once per call, not per wake-up: the
    /// shutdown token's waiters and the timer wheel are shared by every feed, and registering
    /// in both on each of 1,000 feeds' wake-ups per change was a lock round trip each.
    async fn follow(&mut self, mailbox: &Mailbox, cursor: &mut u64) -> Result<(), Stop> {
        let stopping = self.shutdown.clone().cancelled_owned();
        let timer = tokio::time::sleep_until(self.last_sent + self.spec.progress_interval);
        tokio::pin!(stopping, timer);
        loop {
            let taken = mailbox.take(&self.router);
            let pending: Vec<u64> = taken
                .revisions
                .iter()
                .copied()
                .filter(|revision| *revision >= *cursor)
                .collect();
            for (first, count) in runs(&pending) {
                let changes = match self.store.history_from(first, count) {
                    Ok(changes) if changes.len() == count => changes,
                    // Gone from the history (or, which cannot happen, not published): the
                    // history read at `first` decides, as for any feed.
                    _ => {
                        *cursor = first;
                        return Ok(());
                    }
                };
                let mut changes = changes.into_iter();
                while let Some(change) = changes.next() {
                    let revision = change.revision;
                    if let Some(event) = self.try_send(WatchEvent::Change(change))? {
                        // As in `send_changes`: nothing else held while it waits; what the
                        // mailbox named after this is read from the history again.
                        drop(changes);
                        self.send(event).await?;
                        *cursor = revision + 1;
                        return Ok(());
                    }
                    *cursor = revision + 1;
                }
            }
            if let Some(from) = taken.overflow_from {
                *cursor = (*cursor).max(from);
                return Ok(());
            }
            *cursor = (*cursor).max(taken.routed + 1);
            if !pending.is_empty() {
                continue;
            }
            let heartbeat = self.last_sent + self.spec.progress_interval;
            if Instant::now() >= heartbeat {
                self.send(WatchEvent::Progress {
                    revision: *cursor - 1,
                })
                .await?;
                continue;
            }
            // Sends since the timer was set moved the heartbeat later: the timer may fire
            // early, and is set again then (once per heartbeat interval at most).
            if timer.is_elapsed() {
                timer.as_mut().reset(heartbeat);
            }
            tokio::select! {
                () = mailbox.wake.notified() => {}
                // The loop takes what came meanwhile, then sends the heartbeat if it is due.
                () = &mut timer => {}
                () = &mut stopping => {
                    self.advance_idle(mailbox, cursor);
                    return Err(Stop);
                }
                // A subscriber that hung up while nothing was happening.
                () = self.events.closed() => return Err(Stop),
            }
        }
    }

    /// Moves an idle feed's cursor past the routed revision, for its last resume point.
    fn advance_idle(&self, mailbox: &Mailbox, cursor: &mut u64) {
        let taken = mailbox.take(&self.router);
        if taken.revisions.iter().all(|r| *r < *cursor) && taken.overflow_from.is_none() {
            *cursor = (*cursor).max(taken.routed + 1);
        }
    }

    /// At shutdown: a last resume point, then the end naming the revision to resume from; in
    /// the middle of an initial state (`cursor` 0) no resume point, and an end that says to
    /// watch again from the current state. Both wait for room in the subscriber's channel,
    /// however slowly it reads (until it hangs up): dropping them would end the stream with a clean OK after its buffered events, and
    /// the subscriber would not know it was cut off. One that never reads again is cut when
    /// the server stops at the end of `--shutdown-grace`: an error, never a clean end.
    async fn last_words(&self, cursor: u64) {
        let (reason, progress) = match cursor {
            0 => (INCOMPLETE_STATE.to_owned(), None),
            _ => (
                format!("server shutting down; resume from revision {cursor}"),
                Some(WatchEvent::Progress {
                    revision: cursor - 1,
                }),
            ),
        };
        let end = WatchEvent::End(Error::Unavailable { reason });
        for event in progress.into_iter().chain([end]) {
            tokio::select! {
                sent = self.events.send(event) => if sent.is_err() { return },
                () = self.events.closed() => return,
            }
        }
    }

    /// `Stop` when the server is shutting down or the subscriber has gone: no use going on.
    fn stop_if_unwanted(&self) -> Result<(), Stop> {
        if self.shutdown.is_cancelled() || self.events.is_closed() {
            return Err(Stop);
        }
        Ok(())
    }

    /// Sends one event, waiting while the subscriber's outbox is full.
    ///
    /// With room in the outbox (a subscriber that keeps up) the event goes in at once,
    /// without waiting on the shutdown token, whose waiters every feed shares.
    async fn send(&mut self, event: WatchEvent) -> Result<(), Stop> {
        let Some(event) = self.try_send(event)? else {
            return Ok(());
        };
        tokio::select! {
            sent = self.events.send(event) => sent.map_err(|()| Stop)?,
            () = self.shutdown.cancelled() => return Err(Stop),
        }
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Sends one event if there is room for it now; gives it back if not.
    fn try_send(&mut self, event: WatchEvent) -> Result<Option<WatchEvent>, Stop> {
        if self.shutdown.is_cancelled() {
            return Err(Stop);
        }
        match self.events.try_send(event) {
            Ok(()) => {
                self.last_sent = Instant::now();
                Ok(None)
            }
            Err(TrySendError::Closed) => Err(Stop),
            Err(TrySendError::Full(event)) => Ok(Some(event)),
        }
    }
}

/// Ascending revisions as runs of consecutive ones: `(first, count)`.
pub(super) fn runs(revisions: &[u64]) -> Vec<(u64, usize)> {
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for &revision in revisions {
        match runs.last_mut() {
            Some((first, count)) if *first + *count as u64 == revision => *count += 1,
            _ => runs.push((revision, 1)),
        }
    }
    runs
}
