//! The watch layer's tests: feeds over a real store and sequencer, routed and unrouted.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::feed::runs;
use super::*;
use crate::profile::{Field, FieldPath, ProfileKey, ProfileUpdate, Scalar};
use crate::sequencer::Sequencer;
use tokio_util::task::TaskTracker;

/// The watch layer of a store keeping `history` changes, and the sequencer that writes
/// the store (on the tracker) and routes through the watch layer.
fn store_with_sequencer(history: usize) -> (Watchers, TaskTracker, Sequencer) {
    let watchers = Watchers::new(Store::new(history, "test"));
    let tracker = TaskTracker::new();
    let sequencer = Sequencer::start_with_hook(
        watchers.store.clone(),
        None,
        Arc::new(watchers.clone()),
        crate::metrics::Metrics::new(),
        &tracker,
    );
    (watchers, tracker, sequencer)
}

fn points(customer: &str, second: i64, total: i64) -> ProfileUpdate {
    ProfileUpdate {
        key: ProfileKey::new("2155", customer),
        at: chrono::DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap(),
        fields: vec![
            (Field::GbCustomerId, Some(Scalar::Int(1))),
            (Field::TotalPoints, Some(Scalar::Int(total))),
        ],
        extras: vec![],
        origin: crate::profile::Origin::Webhook,
    }
}

#[tokio::test(start_paused = true)]
async fn progress_is_sent_after_an_interval_without_other_events() {
    let (watchers, tracker, sequencer) = store_with_sequencer(10);
    let interval = Duration::from_secs(5);
    let spec = WatchSpec {
        progress_interval: interval,
        ..WatchSpec::default()
    };
    let watch = watchers.open(spec).unwrap();
    let (events, mut received) = super::outbox(8, usize::MAX);
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
    let (watchers, tracker, sequencer) = store_with_sequencer(1000);
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
    let watch = watchers.open(spec).unwrap();
    // A one-slot channel holds the feed back: it has read only the first chunk of keys
    // when the first profile arrives here.
    let (events, mut received) = super::outbox(1, usize::MAX);
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
    // The subscriber goes: a feed's last words wait for room as long as it is there.
    drop(received);
    drop(sequencer);
    tracker.close();
    tracker.wait().await;
}

fn tier(customer: &str, second: i64, name: &str) -> ProfileUpdate {
    ProfileUpdate {
        key: ProfileKey::new("2155", customer),
        at: chrono::DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap(),
        fields: vec![
            (Field::GbCustomerId, Some(Scalar::Int(1))),
            (Field::TierName, Some(Scalar::Text(name.into()))),
        ],
        extras: vec![],
        origin: crate::profile::Origin::Webhook,
    }
}

fn customers(ids: &[&str]) -> HashSet<Arc<str>> {
    ids.iter().map(|id| Arc::from(*id)).collect()
}

/// Runs a feed on its own task; the handle ends when the feed does.
fn spawn_feed(
    watchers: &Watchers,
    spec: WatchSpec,
    capacity: usize,
    shutdown: &CancellationToken,
) -> (super::Inbox, tokio::task::JoinHandle<()>) {
    let watch = watchers.open(spec).unwrap();
    let (events, received) = super::outbox(capacity, usize::MAX);
    let task = tokio::spawn(watch.run(events, shutdown.clone()));
    (received, task)
}

/// What one feed received, in order, until its stream ended.
#[derive(Debug, Default)]
struct Received {
    synced: Vec<u64>,
    changes: Vec<u64>,
    progress: Vec<u64>,
    resets: usize,
    end: Option<String>,
}

/// Collects a feed's events until its stream ends; `latest` follows the `Synced` revision
/// and the last change.
async fn collect(
    mut received: super::Inbox,
    latest: tokio::sync::watch::Sender<(Option<u64>, u64)>,
) -> Received {
    let mut all = Received::default();
    while let Some(event) = received.recv().await {
        match event {
            WatchEvent::Synced { revision } => {
                all.synced.push(revision);
                latest.send_modify(|(synced, _)| *synced = Some(revision));
            }
            WatchEvent::Change(change) => {
                all.changes.push(change.revision);
                latest.send_modify(|(_, last)| *last = change.revision);
            }
            WatchEvent::Progress { revision } => all.progress.push(revision),
            WatchEvent::Reset { .. } => all.resets += 1,
            WatchEvent::End(error) => all.end = Some(error.to_string()),
            WatchEvent::Existing(_) => {}
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_of_every_filter_get_every_matching_change_and_no_other_while_feeds_come_and_go() {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 600;
    let (watchers, tracker, sequencer) = store_with_sequencer(100_000);
    // Writers commit concurrently (so batches hold several changes), each to its own 5 of
    // 20 customers with rising times, so every update is a change: every third a tier
    // change, the others points.
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let sequencer = sequencer.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..PER_WRITER {
                let i = writer * PER_WRITER + n;
                let customer = format!("c{}", writer * 5 + n % 5);
                let second = i64::try_from(i).unwrap() + 1;
                let update = if i.is_multiple_of(3) {
                    tier(&customer, second, &format!("t{i}"))
                } else {
                    points(&customer, second, second)
                };
                sequencer.apply(update).await.unwrap();
            }
        }));
    }

    // While they run, open a feed at every 100 revisions, with varied filters and starts;
    // every third one is dropped once the next one opens.
    let shutdown = CancellationToken::new();
    let mut revisions = watchers.store.subscribe();
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for round in 0..16u64 {
        let _ = revisions
            .wait_for(|revision| *revision >= round * 100)
            .await
            .unwrap();
        let ids: Vec<String> = (0..1 + round % 3)
            .map(|k| format!("c{}", (round * 7 + k * 5) % 20))
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let spec = WatchSpec {
            client_id: match round % 4 {
                0 => None,
                3 => Some("other".into()),
                _ => Some("2155".into()),
            },
            // Some name no customer: filed with everyone (4 and 12), or by account (6 with a
            // field filter, 13 replaying, 14 dropped: the writers'; 3 and 11 dropped: one
            // without changes).
            customer_ids: if matches!(round, 3 | 4 | 6 | 11 | 12 | 13 | 14) {
                HashSet::new()
            } else {
                customers(&ids)
            },
            fields: if round % 5 == 1 {
                vec![FieldSelector::Path(FieldPath::Field(Field::TierName))]
            } else {
                vec![]
            },
            // Some replay from a past revision, through the history then the mailbox.
            start_revision: if round % 2 == 1 { round * 50 + 1 } else { 0 },
            progress_interval: Duration::from_secs(3600),
            ..WatchSpec::default()
        };
        let (received, task) = spawn_feed(&watchers, spec.clone(), 64, &shutdown);
        if round % 3 == 2 {
            dropped.push((received, task));
        } else {
            let (latest, watch_latest) = tokio::sync::watch::channel((None, 0));
            let collected = tokio::spawn(collect(received, latest));
            kept.push((spec, collected, watch_latest, task));
        }
        if round % 3 == 0
            && let Some((received, task)) = dropped.pop()
        {
            drop(received);
            task.await.unwrap();
        }
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for (received, task) in dropped {
        drop(received);
        task.await.unwrap();
    }
    let last = watchers.store.revision();
    assert_eq!(last, WRITERS * PER_WRITER);
    let history = watchers.store.history_from(1, usize::MAX).unwrap();
    assert_eq!(history.len() as u64, last);

    // Each feed gets exactly the matching changes from where it started, in order. Wait
    // until each has its last one, then stop them all: each names the end of the
    // history as its resume point, whether or not its last change was the last commit.
    let mut results = Vec::new();
    for (spec, collected, mut latest, task) in kept {
        // A live feed starts after its Synced, a replay at its start revision.
        let synced = latest
            .wait_for(|(synced, _)| synced.is_some())
            .await
            .unwrap()
            .0
            .unwrap_or_default();
        let start = match spec.start_revision {
            0 => synced + 1,
            from => from,
        };
        let wanted: Vec<u64> = history
            .iter()
            .filter(|change| change.revision >= start && spec.wants_change(change))
            .map(|change| change.revision)
            .collect();
        if let Some(&last_wanted) = wanted.last() {
            // Bounded, so a missed change fails the comparison below instead of hanging.
            let arrived = latest.wait_for(|(_, last)| *last >= last_wanted);
            let _ = tokio::time::timeout(Duration::from_secs(20), arrived).await;
        }
        results.push((spec, wanted, collected, task));
    }
    // The dropped feeds left the index; the others (all past their Synced) are in it.
    let still_watched: HashSet<&Arc<str>> = results
        .iter()
        .flat_map(|(spec, ..)| &spec.customer_ids)
        .collect();
    let by_account: HashSet<&Arc<str>> = results
        .iter()
        .filter(|(spec, ..)| spec.customer_ids.is_empty())
        .filter_map(|(spec, ..)| spec.client_id.as_ref())
        .collect();
    let everyone = results
        .iter()
        .filter(|(spec, ..)| spec.customer_ids.is_empty() && spec.client_id.is_none())
        .count();
    assert_eq!(
        watchers.router.indexed(),
        (still_watched.len(), by_account.len(), everyone)
    );
    assert!(
        by_account.len() == 2 && everyone == 2,
        "every kind was kept"
    );
    shutdown.cancel();
    for (spec, wanted, collected, task) in results {
        task.await.unwrap();
        let received = collected.await.unwrap();
        assert_eq!(received.resets, 0, "{spec:?}");
        assert_eq!(received.synced.len(), 1, "{spec:?}: {received:?}");
        assert_eq!(received.changes, wanted, "{spec:?}");
        assert_eq!(received.progress, vec![last], "{spec:?}");
        let end = received.end.unwrap_or_default();
        assert!(
            end.contains(&format!("resume from revision {}", last + 1)),
            "{spec:?}: {end}"
        );
    }
    tracker.close();
    drop(sequencer);
    tracker.wait().await;
    assert_eq!(
        watchers.router.indexed(),
        (0, 0, 0),
        "every feed left the index"
    );
}

/// The feeds the overflow tests run: customer "a" (every odd revision), the whole account
/// and everything (every revision).
fn overflow_specs() -> [(WatchSpec, u64); 3] {
    let spec = |client_id: Option<&str>, ids: &[&str]| WatchSpec {
        client_id: client_id.map(Arc::from),
        customer_ids: customers(ids),
        progress_interval: Duration::from_secs(3600),
        ..WatchSpec::default()
    };
    [
        (spec(None, &["a"]), 2),
        (spec(Some("2155"), &[]), 1),
        (spec(None, &[]), 1),
    ]
}

/// A feed that does not read while more than its mailbox holds arrives; changes of "a" and
/// "b" alternate, so "a" has the odd revisions. Returns what it received and the last revision.
async fn overflowing_feed(history: usize, spec: WatchSpec) -> (Received, u64) {
    let (watchers, tracker, sequencer) = store_with_sequencer(history);
    let every_change = spec.customer_ids.is_empty();
    let last_wanted = |last: u64| if every_change { last } else { last - 1 };
    let shutdown = CancellationToken::new();
    let (mut received, task) = spawn_feed(&watchers, spec, 1, &shutdown);
    assert!(matches!(
        received.recv().await,
        Some(WatchEvent::Synced { revision: 0 })
    ));
    // Far more changes of "a" than the channel and the mailbox hold, with others between.
    let changes = MAILBOX_CAPACITY as i64 * 3;
    for n in 1..=changes {
        sequencer.apply(points("a", n, n)).await.unwrap();
        sequencer.apply(points("b", n, n)).await.unwrap();
    }
    let last = watchers.store.revision();
    let (latest, mut watch_latest) = tokio::sync::watch::channel((None, 0));
    let collected = tokio::spawn(collect(received, latest));
    let _ = watch_latest
        .wait_for(|(synced, last_change)| *last_change == last_wanted(last) || synced.is_some())
        .await;
    shutdown.cancel();
    task.await.unwrap();
    drop(sequencer);
    tracker.close();
    tracker.wait().await;
    (collected.await.unwrap(), last)
}

#[tokio::test]
async fn a_feed_that_overflows_its_mailbox_catches_up_from_history() {
    for (spec, step) in overflow_specs() {
        let (received, last) = overflowing_feed(100_000, spec.clone()).await;
        let every_wanted: Vec<u64> = (1..=last).step_by(step as usize).collect();
        assert_eq!(received.changes, every_wanted, "{spec:?}");
        assert_eq!(received.resets, 0, "{spec:?}");
        assert_eq!(received.progress, vec![last], "{spec:?}");
    }
}

#[tokio::test]
async fn a_feed_whose_changes_left_the_history_is_reset() {
    for (spec, step) in overflow_specs() {
        let (received, last) = overflowing_feed(100, spec.clone()).await;
        assert_eq!(received.resets, 1, "{spec:?}: {received:?}");
        // Changes without a gap up to the reset, then the state as of the end.
        let before_reset = received.changes.len();
        assert!(
            before_reset > 0 && before_reset < MAILBOX_CAPACITY,
            "{spec:?}"
        );
        assert_eq!(
            received.changes,
            (1..=last)
                .step_by(step as usize)
                .take(before_reset)
                .collect::<Vec<_>>(),
            "{spec:?}"
        );
        assert_eq!(received.synced, vec![last], "{spec:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_routed_feed_without_matching_changes_still_advances_its_resume_point() {
    let (watchers, tracker, sequencer) = store_with_sequencer(10);
    let interval = Duration::from_secs(5);
    let spec = WatchSpec {
        customer_ids: customers(&["x"]),
        progress_interval: interval,
        ..WatchSpec::default()
    };
    let shutdown = CancellationToken::new();
    let (mut received, task) = spawn_feed(&watchers, spec, 8, &shutdown);
    assert!(matches!(
        received.recv().await,
        Some(WatchEvent::Synced { revision: 0 })
    ));
    // More changes than the history holds, none of them of "x": no reset, and the
    // heartbeat names the newest revision.
    for n in 1..=25 {
        sequencer.apply(points("a", n, n)).await.unwrap();
    }
    assert!(matches!(
        received.recv().await,
        Some(WatchEvent::Progress { revision: 25 })
    ));
    sequencer.apply(points("a", 26, 26)).await.unwrap();
    shutdown.cancel();
    task.await.unwrap();
    let received = collect(received, tokio::sync::watch::channel((None, 0)).0).await;
    assert!(received.changes.is_empty());
    assert_eq!(received.resets, 0);
    assert_eq!(
        received.progress,
        vec![26],
        "the last resume point is current"
    );
    let end = received.end.unwrap_or_default();
    assert!(end.contains("resume from revision 27"), "{end}");
    drop(sequencer);
    tracker.close();
    tracker.wait().await;
}

#[test]
fn runs_group_consecutive_revisions() {
    assert_eq!(runs(&[]), vec![]);
    assert_eq!(runs(&[3, 4, 5, 7, 9, 10]), vec![(3, 3), (7, 1), (9, 2)]);
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
    assert_eq!(
        FieldSelector::parse("extra."),
        Ok(FieldSelector::Path(FieldPath::Extra("".into()))),
        "the empty key, as changed_fields names it"
    );
}

/// Reads a feed stopped in the middle of an initial state to its end (its last words wait for
/// room in the channel) and checks that end: more of the state at most, no `Progress` or
/// `Synced`, and an UNAVAILABLE that names no resume point but says to watch for the whole
/// state again. Returns how many profiles of the state came after the stop.
async fn stopped_during_a_state(
    mut received: super::Inbox,
    task: tokio::task::JoinHandle<()>,
) -> usize {
    let mut rest = Vec::new();
    while let Some(event) = received.recv().await {
        rest.push(event);
    }
    task.await.unwrap();
    let end = match rest.pop() {
        Some(WatchEvent::End(Error::Unavailable { reason })) => reason,
        other => panic!("expected the shutdown end, got {other:?}"),
    };
    assert!(
        rest.iter()
            .all(|event| matches!(event, WatchEvent::Existing(_))),
        "no Progress or Synced before the end: {rest:?}"
    );
    assert!(!end.contains("resume from"), "{end}");
    assert!(end.contains("send_initial_state"), "{end}");
    rest.len()
}

/// A stop in the middle of an initial state: the stream ends without a resume point, saying to
/// watch again (it used to say `Progress{oldest - 1}` and "resume from revision <oldest>" after
/// a Reset, so a client that resumed there never received the profiles not yet sent).
#[tokio::test]
async fn a_stop_during_an_initial_state_offers_no_resume_point() {
    let starts = [
        // Compacted start: Reset, then the state.
        WatchSpec {
            start_revision: 1,
            ..WatchSpec::default()
        },
        // Another store's revision: Reset, then the state.
        WatchSpec {
            start_revision: 1,
            store_id: Some(Arc::from("another store")),
            ..WatchSpec::default()
        },
        // The state on request.
        WatchSpec {
            send_initial_state: true,
            ..WatchSpec::default()
        },
    ];
    for spec in starts {
        let (watchers, tracker, sequencer) = store_with_sequencer(10);
        for n in 1..=30 {
            sequencer
                .apply(points(&format!("c{n}"), n, n))
                .await
                .unwrap();
        }
        let shutdown = CancellationToken::new();
        let (mut received, task) = spawn_feed(&watchers, spec.clone(), 1, &shutdown);
        let mut existing = 0;
        while existing < 5 {
            match received.recv().await {
                Some(WatchEvent::Existing(_)) => existing += 1,
                Some(WatchEvent::Reset { .. }) => {}
                other => panic!("{spec:?}: expected the state, got {other:?}"),
            }
        }
        shutdown.cancel();
        let rest = stopped_during_a_state(received, task).await;
        assert!(rest < 25, "{spec:?}: the state was cut short");
        drop(sequencer);
        tracker.close();
        tracker.wait().await;
    }
}

/// The same for a subscriber that fell behind: once its `Reset` is sent, a stop during the new
/// state offers no resume point (its old position would skip the profiles not re-sent yet).
#[tokio::test]
async fn a_stop_during_the_state_after_falling_behind_offers_no_resume_point() {
    let (watchers, tracker, sequencer) = store_with_sequencer(10);
    let shutdown = CancellationToken::new();
    let (mut received, task) = spawn_feed(&watchers, WatchSpec::default(), 1, &shutdown);
    assert!(matches!(
        received.recv().await,
        Some(WatchEvent::Synced { revision: 0 })
    ));
    // Far more than the channel, the mailbox and the history hold, for distinct customers.
    let customers = MAILBOX_CAPACITY as i64 * 3;
    for n in 1..=customers {
        sequencer
            .apply(points(&format!("c{n}"), n, n))
            .await
            .unwrap();
    }
    let mut existing = 0;
    let mut reset = false;
    while existing < 5 {
        match received.recv().await {
            Some(WatchEvent::Change(_) | WatchEvent::Progress { .. }) if !reset => {}
            Some(WatchEvent::Reset { .. }) => reset = true,
            Some(WatchEvent::Existing(_)) if reset => existing += 1,
            other => panic!("expected changes, a Reset and the state, got {other:?}"),
        }
    }
    shutdown.cancel();
    stopped_during_a_state(received, task).await;
    drop(sequencer);
    tracker.close();
    tracker.wait().await;
}

/// An initial state that finds nothing it wants sends nothing while it scans, so it has to look
/// for a shutdown (or a subscriber gone) between its turns: it stops within a turn or two, not
/// at the end of the account.
#[tokio::test]
async fn an_initial_state_that_finds_nothing_stops_between_turns_on_shutdown_or_hang_up() {
    let count = 10 * crate::store::EXAMINE_PER_TURN;
    let store = crate::sequencer::store_of_basic_profiles(count);
    let watchers = Watchers::new(store);
    for hang_up in [false, true] {
        let spec = WatchSpec {
            client_id: Some(Arc::from("a")),
            customer_ids: customers(&["nobody"]),
            send_initial_state: true,
            progress_interval: Duration::from_secs(3600),
            ..WatchSpec::default()
        };
        let shutdown = CancellationToken::new();
        let (received, feed) = spawn_feed(&watchers, spec, 4, &shutdown);
        // The stopper runs after the feed's first turn (a current-thread runtime runs its
        // tasks in the order they were woken).
        let mut kept = None;
        let stopper = if hang_up {
            tokio::spawn(async move { drop(received) })
        } else {
            kept = Some(received);
            let stopping = shutdown.clone();
            tokio::spawn(async move { stopping.cancel() })
        };
        let probe = crate::yield_probe::YieldProbe::spawn();
        feed.await.unwrap();
        let turns = probe.turns();
        stopper.await.unwrap();
        // Held open until the feed ended, in the shutdown case.
        drop(kept);
        assert!(
            turns <= 3,
            "hang_up {hang_up}: the feed went on for {turns} turns after it was stopped"
        );
    }
}

/// An initial state for one customer out of many examines every key of the account; the other
/// tasks of the worker (other calls, watch streams) run in between.
#[tokio::test]
async fn an_initial_state_that_wants_little_yields_to_the_workers_other_tasks_while_it_scans() {
    let count = 10 * crate::store::EXAMINE_PER_TURN;
    let store = crate::sequencer::store_of_basic_profiles(count);
    let watchers = Watchers::new(store);
    let last = format!("c{:06}", count - 1);
    let spec = WatchSpec {
        client_id: Some(Arc::from("a")),
        customer_ids: customers(&[&last]),
        send_initial_state: true,
        progress_interval: Duration::from_secs(3600),
        ..WatchSpec::default()
    };
    let probe = crate::yield_probe::YieldProbe::spawn();
    let shutdown = CancellationToken::new();
    let before = probe.turns();
    let (mut received, _feed) = spawn_feed(&watchers, spec, 4, &shutdown);
    let Some(WatchEvent::Existing(profile)) = received.recv().await else {
        panic!("the one wanted profile first");
    };
    let during = probe.turns() - before;
    drop(probe);
    assert_eq!(&*profile.key.customer_id, last.as_str());
    assert!(
        during >= 9,
        "the other task ran {during} times during the scan"
    );
    assert!(matches!(
        received.recv().await,
        Some(WatchEvent::Synced { .. })
    ));
    shutdown.cancel();
}

/// A subscriber that stops reading keeps alive at most its outbox's bytes of changes and the
/// one its feed waits to send, whatever the history has dropped since: neither its queue nor
/// the rest of the feed's history read pins more (an adversarial run stalled streams holding
/// 64 changes of large profiles each, 18 MB a stream, kept until the client left). Read
/// again, it gets what was queued, then a `Reset` and the state: never a gap.
#[tokio::test]
async fn a_subscriber_that_stops_reading_pins_at_most_its_outbox_bytes() {
    const HISTORY: u64 = 20;
    let (watchers, _tracker, sequencer) = store_with_sequencer(HISTORY as usize);
    let store = watchers.store.clone();
    let mut changes = Vec::new();
    let mut apply = async |n: u64| {
        let second = i64::try_from(n).unwrap();
        sequencer.apply(points("c1", second, second)).await.unwrap();
        let change = store.history_from(n, 1).unwrap().remove(0);
        assert_eq!(change.revision, n);
        changes.push(Arc::downgrade(&change));
        crate::store::change_bytes(&change)
    };
    // A history full before the feed starts: its first read from revision 1 takes 20 changes.
    apply(1).await;
    // Every later change holds the profile before it too: the larger ones.
    let one = apply(2).await;
    for n in 3..=HISTORY {
        apply(n).await;
    }
    let spec = WatchSpec {
        start_revision: 1,
        progress_interval: Duration::from_secs(3600),
        ..WatchSpec::default()
    };
    let watch = watchers.open(spec).unwrap();
    let (events, mut received) = super::outbox(64, 3 * one);
    let shutdown = CancellationToken::new();
    let _feed = tokio::spawn(watch.run(events, shutdown.clone()));
    // The feed runs until the outbox is full (this runtime has one thread: yielding lets it).
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    for n in HISTORY + 1..=10 * HISTORY {
        apply(n).await;
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let oldest_kept = 10 * HISTORY - HISTORY + 1;
    let pinned: Vec<u64> = changes
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .map(|change| change.revision)
        .filter(|revision| *revision < oldest_kept)
        .collect();
    // Three in the outbox, one waiting to go in.
    assert_eq!(
        pinned,
        [1, 2, 3, 4],
        "dropped by the history, kept by the feed"
    );

    let mut sent = Vec::new();
    loop {
        match received.recv().await.unwrap() {
            WatchEvent::Change(change) => sent.push(change.revision),
            WatchEvent::Reset { kind, .. } => {
                assert_eq!(kind, ResetKind::FellBehind);
                break;
            }
            other => panic!("{other:?} before the reset"),
        }
    }
    assert_eq!(
        sent,
        [1, 2, 3, 4],
        "what was queued, in order, then the reset"
    );
    assert!(matches!(
        received.recv().await,
        Some(WatchEvent::Existing(_))
    ));
    assert!(matches!(
        received.recv().await,
        Some(WatchEvent::Synced { revision }) if revision == 10 * HISTORY
    ));
    shutdown.cancel();
}

/// The same for a subscriber that had caught up: the changes its mailbox named, fetched
/// together, are not kept while it waits for room.
#[tokio::test]
async fn a_live_subscriber_that_stops_reading_pins_at_most_its_outbox_bytes() {
    const HISTORY: u64 = 20;
    let (watchers, _tracker, sequencer) = store_with_sequencer(HISTORY as usize);
    let store = watchers.store.clone();
    let update = |n: u64| {
        let second = i64::try_from(n).unwrap();
        points(&format!("c{n}"), second, second)
    };
    sequencer.apply(update(1)).await.unwrap();
    let spec = WatchSpec {
        progress_interval: Duration::from_secs(3600),
        ..WatchSpec::default()
    };
    let watch = watchers.open(spec).unwrap();
    // Room for three changes of the size of those below.
    let one = crate::store::change_bytes(&store.history_from(1, 1).unwrap()[0]);
    let (events, mut received) = super::outbox(64, 3 * one);
    let shutdown = CancellationToken::new();
    let _feed = tokio::spawn(watch.run(events, shutdown.clone()));
    assert!(matches!(
        received.recv().await,
        Some(WatchEvent::Synced { revision: 1 })
    ));
    // Twenty updates committed together: the feed's mailbox names them at once.
    let batch = (2..=HISTORY + 1).map(|n| sequencer.apply(update(n)));
    for applied in futures_util::future::join_all(batch).await {
        applied.unwrap();
    }
    let changes: Vec<_> = store
        .history_from(2, HISTORY as usize)
        .unwrap()
        .iter()
        .map(Arc::downgrade)
        .collect();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    for n in HISTORY + 2..=10 * HISTORY {
        sequencer.apply(update(n)).await.unwrap();
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let pinned: Vec<u64> = changes
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .map(|change| change.revision)
        .collect();
    assert_eq!(pinned, [2, 3, 4, 5], "three in the outbox, one waiting");
    let mut sent = Vec::new();
    let after = loop {
        match received.recv().await {
            Some(WatchEvent::Change(change)) => sent.push(change.revision),
            other => break other,
        }
    };
    assert_eq!(sent, [2, 3, 4, 5]);
    assert!(
        matches!(
            after,
            Some(WatchEvent::Reset {
                kind: ResetKind::FellBehind,
                ..
            })
        ),
        "{after:?}"
    );
    shutdown.cancel();
}

/// Feeds naming the same customers leave the index one by one, each leaving all its ids at
/// once, and the feeds left are still routed to: 300 feeds of the same 1,000 ids, half of them
/// dropped. (Each id's feeds were a list scanned at every leave, so closing N such feeds cost
/// N² times the ids under the index's write lock, seconds that every commit's routing waited
/// for: adversary round 11, F3.)
#[test]
fn feeds_of_the_same_customers_leave_the_index_and_the_others_are_still_routed_to() {
    use crate::profile::{Change, ChangedFields, Origin, Profile, Register};
    let router = Arc::new(router::Router::default());
    let ids: HashSet<Arc<str>> = (0..1000).map(|n| Arc::from(format!("c{n}"))).collect();
    let spec = Arc::new(WatchSpec {
        customer_ids: ids,
        ..WatchSpec::default()
    });
    let mut feeds: Vec<_> = (0..300)
        .map(|_| router::Registration::new(&router, Arc::clone(&spec)))
        .collect();
    let kept = feeds.split_off(150);
    drop(feeds);
    assert_eq!(router.indexed(), (1000, 0, 0));
    let register = Register {
        value: Some(Scalar::Int(5)),
        at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
    };
    let profile = Profile::from_registers(
        ProfileKey::new("2155", "c7"),
        [(Field::TotalPoints, register)],
        [],
        1,
        1,
        1,
    );
    let changed: ChangedFields = vec![FieldPath::Field(Field::TotalPoints)].into();
    let change = Change::new(1, Arc::new(profile), None, changed, Origin::Webhook);
    router.route(&[Arc::new(change)]);
    for feed in &kept {
        assert_eq!(feed.mailbox.take(&router).revisions, vec![1]);
    }
    drop(kept);
    assert_eq!(router.indexed(), (0, 0, 0));
}

/// A barrier that never answers: the cluster's end cannot be read, for as long as it takes.
struct Unanswered;

impl CatchUp for Unanswered {
    fn caught_up(&self) -> futures_util::future::BoxFuture<'_, Result<(), Error>> {
        Box::pin(std::future::pending())
    }
}

/// A watch resumed beyond the replica's revision opens as soon as the store reaches its start,
/// whatever the barrier still waits for: a read of the stream's end from a leader that heard
/// from a quorum after the call came takes up to a heartbeat (2 s) on an idle cluster.
#[tokio::test]
async fn a_watch_resumed_beyond_the_store_opens_once_the_store_reaches_its_start() {
    let (watchers, tracker, sequencer) = store_with_sequencer(10);
    let watchers = watchers.with_catch_up(Arc::new(Unanswered));
    sequencer.apply(points("a", 1, 10)).await.unwrap();
    let spec = WatchSpec {
        start_revision: 4,
        ..WatchSpec::default()
    };
    let opening = tokio::spawn({
        let watchers = watchers.clone();
        async move { watchers.open_caught_up(spec).await.map(|_| ()) }
    });
    sequencer.apply(points("b", 2, 20)).await.unwrap();
    tokio::task::yield_now().await;
    assert!(!opening.is_finished(), "revision 3 is not here yet");
    sequencer.apply(points("c", 3, 30)).await.unwrap();
    let opened = tokio::time::timeout(Duration::from_secs(10), opening).await;
    opened
        .expect("opened without the barrier")
        .unwrap()
        .unwrap();
    drop(sequencer);
    tracker.close();
    tracker.wait().await;
}

/// What an outbox holds past its byte bound (the one larger event it takes alone) is told as
/// it is queued and told back exactly once as it leaves: taken by the stream, or dropped with
/// it; an event within the bound, or refused, tells nothing. A count that leaked would keep a
/// connection's held bytes up for good, and one told twice would hide a stalled client.
#[tokio::test]
async fn an_outbox_tells_what_it_holds_past_its_bound_and_tells_it_back_once() {
    use std::sync::atomic::{AtomicIsize, Ordering};
    #[derive(Default)]
    struct Net(AtomicIsize);
    impl QueuedBytes for Net {
        fn queued(&self, bytes: usize) {
            self.0.fetch_add(bytes as isize, Ordering::SeqCst);
        }
        fn left(&self, bytes: usize) {
            self.0.fetch_sub(bytes as isize, Ordering::SeqCst);
        }
    }
    let profile = |extra_bytes: usize| {
        let mut profile = crate::profile::Profile::empty(ProfileKey::new("2155", "c1"));
        let mut update = points("c1", 1, 1);
        update.extras = vec![("k".into(), Some(serde_json::json!("x".repeat(extra_bytes))))];
        profile.merge(&update);
        Arc::new(profile)
    };
    let (small, big) = (profile(10), profile(100_000));
    let limit = 2 * small.memory_bytes();
    let past = big.memory_bytes() - limit;
    let net = Arc::new(Net::default());
    let told = || net.0.load(Ordering::SeqCst);
    let (events, mut received) =
        outbox_telling(4, limit, Some(Arc::clone(&net) as Arc<dyn QueuedBytes>));

    assert!(
        events
            .try_send(WatchEvent::Existing(Arc::clone(&small)))
            .is_ok()
    );
    assert_eq!(told(), 0, "within the bound");
    let refused = events.try_send(WatchEvent::Existing(Arc::clone(&big)));
    assert!(matches!(refused, Err(outbox::TrySendError::Full(_))));
    assert_eq!(told(), 0, "refused");
    received.recv().await.unwrap();
    assert!(
        events
            .try_send(WatchEvent::Existing(Arc::clone(&big)))
            .is_ok()
    );
    assert_eq!(told(), past as isize, "alone, past the bound");
    received.recv().await.unwrap();
    assert_eq!(told(), 0, "taken");
    events
        .send(WatchEvent::Existing(Arc::clone(&big)))
        .await
        .unwrap();
    assert_eq!(told(), past as isize);
    drop(received);
    assert_eq!(told(), 0, "dropped with the stream");
    assert!(events.try_send(WatchEvent::Existing(big)).is_err());
    assert_eq!(told(), 0, "the stream gone");
}
