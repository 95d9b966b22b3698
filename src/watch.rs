//! Watch subscriptions: which changes a subscriber wants, and the task that feeds it.
//!
//! A subscriber owns a cursor (the next revision it has to look at) and reads the store's
//! history from there at its own pace, into a small bounded channel. Nothing is queued per
//! subscriber beyond that channel, and the writer never waits for a subscriber: a subscriber
//! that does not read just stops advancing its cursor. When it reads again it catches up from
//! the history, or, if the history has moved past its cursor, gets a `Reset` and the full
//! initial state again.
//!
//! This module produces domain events ([`WatchEvent`]); turning them into gRPC messages and
//! statuses is the adapter's job.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::profile::{Change, Field, FieldPath, Profile, ProfileKey};
use crate::store::{Compacted, Store};

/// How many history entries or profiles a subscriber takes per read.
const READ_BATCH: usize = 256;

/// Which changes a subscriber wants, and from where.
#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    /// Only this account; `None` = all accounts.
    pub client_id: Option<Arc<str>>,
    /// Only these customers; empty = all.
    pub customer_ids: HashSet<Arc<str>>,
    /// Only changes touching one of these; empty = all changes.
    pub fields: Vec<FieldSelector>,
    /// First revision wanted from history; 0 = start now.
    pub start_revision: u64,
    /// With `start_revision` 0: send every matching profile first.
    pub send_initial_state: bool,
    /// Send `Progress` after this long without sending anything.
    pub progress_interval: Duration,
    /// Fail instead of resetting when the history no longer covers the cursor.
    pub fail_if_compacted: bool,
}

/// One entry of a `fields` filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldSelector {
    /// One modeled field or one extra key.
    Path(FieldPath),
    /// Any extra key (`extra`).
    AnyExtra,
}

impl FieldSelector {
    /// Parses a field name as the API spells it: `tier_name`, `extra.<key>`, or `extra`.
    pub fn parse(name: &str) -> Result<FieldSelector, String> {
        if name == "extra" {
            return Ok(FieldSelector::AnyExtra);
        }
        if let Some(key) = name.strip_prefix("extra.") {
            if key.is_empty() {
                return Err("`extra.` needs a key after the dot".into());
            }
            return Ok(FieldSelector::Path(FieldPath::Extra(key.into())));
        }
        Field::from_name(name)
            .map(|field| FieldSelector::Path(FieldPath::Field(field)))
            .ok_or_else(|| {
                let names: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
                format!(
                    "unknown field {name:?}; expected one of {}, extra or extra.<key>",
                    names.join(", ")
                )
            })
    }

    fn matches(&self, change: &Change) -> bool {
        match self {
            FieldSelector::Path(path) => change.touches(path),
            FieldSelector::AnyExtra => change.touches_any_extra(),
        }
    }
}

impl WatchSpec {
    fn wants_profile(&self, key: &ProfileKey) -> bool {
        self.client_id
            .as_ref()
            .is_none_or(|client| *client == key.client_id)
            && (self.customer_ids.is_empty() || self.customer_ids.contains(&key.customer_id))
    }

    fn wants_change(&self, change: &Change) -> bool {
        self.wants_profile(&change.profile.key)
            && (self.fields.is_empty() || self.fields.iter().any(|field| field.matches(change)))
    }
}

/// What a subscriber receives.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// A profile as part of the initial state.
    Existing(Arc<Profile>),
    /// A change, in revision order.
    Change(Arc<Change>),
    /// Everything up to `revision` has been sent; what follows is live.
    Synced {
        /// The revision the subscriber is in sync with.
        revision: u64,
    },
    /// Heartbeat: every matching change up to `revision` has been sent.
    Progress {
        /// The revision the subscriber has seen up to.
        revision: u64,
    },
    /// The subscriber's position is gone; a full initial state and `Synced` follow.
    Reset {
        /// Which situation.
        kind: ResetKind,
        /// Why, in words.
        reason: String,
        /// The oldest revision the history still holds.
        revision: u64,
    },
    /// The stream ends with this error (shutdown, or compaction with `fail_if_compacted`).
    End(Error),
}

/// Why a subscriber was reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    /// It asked to start from a revision the history no longer holds.
    CompactedStart,
    /// It read too slowly and the history moved past it.
    FellBehind,
    /// The history moved on while its initial state was being sent.
    InitialState,
}

impl ResetKind {
    /// A short, fixed name (metrics label).
    pub fn label(self) -> &'static str {
        match self {
            ResetKind::CompactedStart => "compacted_start",
            ResetKind::FellBehind => "fell_behind",
            ResetKind::InitialState => "initial_state",
        }
    }
}

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
    Reset { reason: String, oldest: u64 },
}

/// An opened subscription, ready to run.
pub struct Watch {
    spec: WatchSpec,
    store: Store,
    start: Start,
}

/// The subscriber is gone or the server is stopping: stop producing.
struct Stop;

impl Watch {
    /// Checks the request against the store and pins its starting point. Errors here fail the
    /// call before any stream starts.
    pub fn open(store: &Store, spec: WatchSpec) -> Result<Watch, Error> {
        let current = store.revision();
        let next = current + 1;
        let start = match spec.start_revision {
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
            start,
        })
    }

    /// Feeds the subscriber until it goes away or `shutdown` fires; on shutdown the last event
    /// is an `End` naming the revision to resume from.
    pub async fn run(self, events: mpsc::Sender<WatchEvent>, shutdown: CancellationToken) {
        let mut feed = Feed {
            spec: self.spec,
            store: self.store,
            events,
            shutdown,
            last_sent: Instant::now(),
        };
        let mut cursor = 0;
        if let Err(Stop) = feed.run(self.start, &mut cursor).await
            && feed.shutdown.is_cancelled()
        {
            // A last resume point, then the end. Best effort: a subscriber whose channel is
            // full is not waited for, and its status still names the revision.
            if cursor > 0 {
                let revision = cursor - 1;
                let _ = feed.events.try_send(WatchEvent::Progress { revision });
            }
            let reason = format!("server shutting down; resume from revision {cursor}");
            let _ = feed
                .events
                .try_send(WatchEvent::End(Error::Unavailable { reason }));
        }
    }
}

/// The running side of a subscription.
struct Feed {
    spec: WatchSpec,
    store: Store,
    events: mpsc::Sender<WatchEvent>,
    shutdown: CancellationToken,
    last_sent: Instant,
}

impl Feed {
    /// The subscription's life; `cursor` is kept current (the next revision to look at) so
    /// that a stop can say where to resume.
    async fn run(&mut self, start: Start, cursor: &mut u64) -> Result<(), Stop> {
        let mut synced_at = None;
        match start {
            Start::Live { synced } => {
                *cursor = synced + 1;
                self.send(WatchEvent::Synced { revision: synced }).await?;
            }
            Start::InitialState => *cursor = self.initial_state().await?,
            Start::Replay { from, synced } => {
                *cursor = from;
                synced_at = Some(synced);
            }
            Start::Reset { reason, oldest } => {
                *cursor = oldest;
                self.send(WatchEvent::Reset {
                    kind: ResetKind::CompactedStart,
                    reason,
                    revision: oldest,
                })
                .await?;
                *cursor = self.initial_state().await?;
            }
        }
        let mut revisions = self.store.subscribe();
        loop {
            if let Some(synced) = synced_at.filter(|synced| *cursor > *synced) {
                synced_at = None;
                self.send(WatchEvent::Synced { revision: synced }).await?;
            }
            // Mark the current revision seen before reading, so a commit that lands after the
            // read still wakes the wait below.
            revisions.borrow_and_update();
            match self.store.history_from(*cursor, READ_BATCH) {
                Ok(changes) if changes.is_empty() => {
                    self.wait_for_changes(&mut revisions, *cursor - 1).await?
                }
                Ok(changes) => {
                    for change in changes {
                        let revision = change.revision;
                        if self.spec.wants_change(&change) {
                            self.send(WatchEvent::Change(change)).await?;
                        }
                        *cursor = revision + 1;
                        if synced_at == Some(revision) {
                            synced_at = None;
                            self.send(WatchEvent::Synced { revision }).await?;
                        }
                    }
                }
                Err(Compacted { oldest }) if self.spec.fail_if_compacted => {
                    let error = Error::Compacted {
                        requested: *cursor,
                        oldest,
                    };
                    self.send(WatchEvent::End(error)).await?;
                    return Ok(());
                }
                Err(Compacted { oldest }) => {
                    let reason = format!(
                        "subscriber fell behind the history: revision {} is gone, the oldest \
                         available is {oldest}",
                        *cursor
                    );
                    self.send(WatchEvent::Reset {
                        kind: ResetKind::FellBehind,
                        reason,
                        revision: oldest,
                    })
                    .await?;
                    synced_at = None;
                    *cursor = self.initial_state().await?;
                }
            }
        }
    }

    /// Sends every matching profile as of one revision `R`, then `Synced{R}`; returns `R + 1`.
    ///
    /// Profiles are read while writes go on ([`crate::store::AsOfScan`]). If the history drops
    /// the changes needed to read them as of `R` meanwhile, the subscriber gets a `Reset` and
    /// the initial state starts over.
    async fn initial_state(&mut self) -> Result<u64, Stop> {
        loop {
            let mut scan = self.store.scan_as_of(self.spec.client_id.clone());
            loop {
                let spec = &self.spec;
                let chunk = scan.next_chunk(&self.store, READ_BATCH, |profile| {
                    spec.wants_profile(&profile.key)
                });
                if chunk.is_empty() {
                    break;
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

    /// Waits for a new revision; sends `Progress{seen}` whenever the interval passes with
    /// nothing sent.
    async fn wait_for_changes(
        &mut self,
        revisions: &mut tokio::sync::watch::Receiver<u64>,
        seen: u64,
    ) -> Result<(), Stop> {
        loop {
            let heartbeat = self.last_sent + self.spec.progress_interval;
            tokio::select! {
                changed = revisions.changed() => {
                    // The store never drops its sender while a subscriber holds it.
                    return changed.map_err(|_| Stop);
                }
                () = tokio::time::sleep_until(heartbeat) => {
                    self.send(WatchEvent::Progress { revision: seen }).await?;
                }
                () = self.shutdown.cancelled() => return Err(Stop),
                // A subscriber that hung up while nothing was happening.
                () = self.events.closed() => return Err(Stop),
            }
        }
    }

    /// Sends one event, waiting while the subscriber's channel is full.
    async fn send(&mut self, event: WatchEvent) -> Result<(), Stop> {
        tokio::select! {
            sent = self.events.send(event) => sent.map_err(|_| Stop)?,
            () = self.shutdown.cancelled() => return Err(Stop),
        }
        self.last_sent = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{ProfileUpdate, Scalar};
    use crate::sequencer::Sequencer;
    use tokio_util::task::TaskTracker;

    fn points(customer: &str, second: i64, total: i64) -> ProfileUpdate {
        ProfileUpdate {
            key: ProfileKey::new("2155", customer),
            at: chrono::DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap(),
            fields: vec![
                (Field::GbCustomerId, Some(Scalar::Int(1))),
                (Field::TotalPoints, Some(Scalar::Int(total))),
            ],
            extras: vec![],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn progress_is_sent_after_an_interval_without_other_events() {
        let store = Store::new(10, "test");
        let tracker = TaskTracker::new();
        let sequencer = Sequencer::start(
            store.clone(),
            None,
            crate::metrics::Metrics::new(),
            &tracker,
        );
        let interval = Duration::from_secs(5);
        let spec = WatchSpec {
            progress_interval: interval,
            ..WatchSpec::default()
        };
        let watch = Watch::open(&store, spec).unwrap();
        let (events, mut received) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        tracker.spawn(watch.run(events, shutdown.clone()));

        let started = Instant::now();
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Synced { revision: 0 })
        ));
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Progress { revision: 0 })
        ));
        assert_eq!(started.elapsed(), interval);

        // A change restarts the interval; the next heartbeat names the revision seen.
        tokio::time::advance(Duration::from_secs(2)).await;
        sequencer.apply(points("a", 1, 10)).await.unwrap();
        let changed_at = Instant::now();
        assert!(
            matches!(received.recv().await, Some(WatchEvent::Change(change)) if change.revision == 1)
        );
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Progress { revision: 1 })
        ));
        assert_eq!(changed_at.elapsed(), interval);

        shutdown.cancel();
        assert!(matches!(
            received.recv().await,
            Some(WatchEvent::Progress { revision: 1 })
        ));
        match received.recv().await {
            Some(WatchEvent::End(Error::Unavailable { reason })) => {
                assert!(reason.contains("resume from revision 2"), "{reason}");
            }
            other => panic!("expected the shutdown end, got {other:?}"),
        }
        assert!(received.recv().await.is_none(), "nothing after the end");
        drop(sequencer);
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn initial_state_is_as_of_one_revision_while_writes_land_during_the_scan() {
        let store = Store::new(1000, "test");
        let tracker = TaskTracker::new();
        let sequencer = Sequencer::start(
            store.clone(),
            None,
            crate::metrics::Metrics::new(),
            &tracker,
        );
        for n in 0..300 {
            sequencer
                .apply(points(&format!("c{n:03}"), 1, n))
                .await
                .unwrap();
        }
        let spec = WatchSpec {
            send_initial_state: true,
            progress_interval: Duration::from_secs(3600),
            ..WatchSpec::default()
        };
        let watch = Watch::open(&store, spec).unwrap();
        // A one-slot channel holds the feed back: it has read only the first chunk of keys
        // when the first profile arrives here.
        let (events, mut received) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        tracker.spawn(watch.run(events, shutdown.clone()));
        let first = received.recv().await;
        assert!(matches!(&first, Some(WatchEvent::Existing(p)) if p.revision == 1));

        // Writes the scan has not reached yet: updates of late keys and brand new profiles.
        for n in 280..290 {
            sequencer
                .apply(points(&format!("c{n:03}"), 2, 1000 + n))
                .await
                .unwrap();
        }
        for n in 0..5 {
            sequencer
                .apply(points(&format!("d{n}"), 2, n))
                .await
                .unwrap();
        }

        let mut existing = vec![];
        let synced = loop {
            match received.recv().await {
                Some(WatchEvent::Existing(profile)) => existing.push(profile),
                Some(WatchEvent::Synced { revision }) => break revision,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(
            synced, 300,
            "the state is as of the revision when the watch began"
        );
        assert_eq!(
            existing.len(),
            299,
            "every profile of revision 300 once, but the first"
        );
        for profile in &existing {
            let n: i64 = profile.key.customer_id[1..].parse().unwrap();
            assert_eq!(
                profile.get_int(Field::TotalPoints),
                Some(n),
                "{profile:?} is as of 300"
            );
            assert!(profile.revision <= 300);
        }
        for revision in 301..=315 {
            match received.recv().await {
                Some(WatchEvent::Change(change)) => assert_eq!(change.revision, revision),
                other => panic!("expected change {revision}, got {other:?}"),
            }
        }
        shutdown.cancel();
        drop(sequencer);
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn field_selectors_parse_api_names() {
        assert_eq!(
            FieldSelector::parse("tier_name"),
            Ok(FieldSelector::Path(FieldPath::Field(Field::TierName)))
        );
        assert_eq!(
            FieldSelector::parse("extra.birthday"),
            Ok(FieldSelector::Path(FieldPath::Extra("birthday".into())))
        );
        assert_eq!(FieldSelector::parse("extra"), Ok(FieldSelector::AnyExtra));
        let unknown = FieldSelector::parse("tier").unwrap_err();
        assert!(unknown.contains("unknown field \"tier\""), "{unknown}");
        assert!(FieldSelector::parse("extra.").is_err());
    }
}
