use super::*;
use crate::profile::{Field, ProfileUpdate, Scalar};

fn change(revision: u64, client: &str, customer: &str, tier: &str) -> Arc<Change> {
    let fields = vec![
        (Field::GbCustomerId, Some(Scalar::Int(1))),
        (Field::TierName, Some(Scalar::Text(tier.into()))),
    ];
    change_of(revision, ProfileKey::new(client, customer), fields, vec![])
}

/// The change that creates `key`'s profile from one update at `revision` (its time too).
fn change_of(
    revision: u64,
    key: ProfileKey,
    fields: Vec<(Field, Option<Scalar>)>,
    extras: Vec<(Box<str>, Option<serde_json::Value>)>,
) -> Arc<Change> {
    let mut profile = Profile::empty(key.clone());
    let changed = profile
        .merge(&ProfileUpdate {
            key,
            at: chrono::DateTime::from_timestamp(revision as i64, 0).unwrap(),
            fields,
            extras,
            origin: crate::profile::Origin::Webhook,
        })
        .unwrap();
    profile.revision = revision;
    Arc::new(Change::new(
        revision,
        Arc::new(profile),
        None,
        changed.into(),
        crate::profile::Origin::Webhook,
    ))
}

#[test]
fn replayed_profiles_join_the_key_order_once_recovery_orders_them() {
    let store = Store::new(100, "test");
    let restored: Vec<Profile> = ["b", "d"]
        .iter()
        .map(|customer| Profile::clone(&change(1, "2155", customer, "Gold").profile))
        .collect();
    store.restore(2, &mut std::iter::once(restored), 1);
    store.commit_replayed(&[
        change(2, "2155", "c", "Gold"),
        change(3, "2155", "a", "Gold"),
        change(4, "2155", "b", "Silver"),
    ]);
    let listed = |store: &Store| -> Vec<String> {
        let scan = store.scan(None, None, 10, |_| true);
        scan.profiles
            .iter()
            .map(|profile| profile.key.customer_id.to_string())
            .collect()
    };
    // Readable by key at once; in the order only once recovery is done.
    assert!(store.get(&ProfileKey::new("2155", "a")).is_some());
    assert_eq!(listed(&store), ["b", "d"]);
    store.order_replayed();
    assert_eq!(listed(&store), ["a", "b", "c", "d"]);
    assert_eq!(store.revision(), 4);
    assert_eq!(store.len(), 4);
    // Nothing held back any more: a second call changes nothing.
    store.order_replayed();
    assert_eq!(listed(&store), ["a", "b", "c", "d"]);
}

/// Every profile of `store`, in its key order, as `account/customer@revision`.
fn listed_with_revisions(store: &Store) -> Vec<String> {
    store
        .scan(None, None, usize::MAX, |_| true)
        .profiles
        .iter()
        .map(|profile| format!("{:?}@{}", profile.key, profile.revision))
        .collect()
}

#[test]
fn a_snapshot_in_key_order_and_one_out_of_order_restore_alike() {
    let profile = |account: &str, customer: usize, revision: u64| {
        let key = ProfileKey::new(account, format!("c{customer:05}"));
        let mut profile = Profile::empty(key);
        profile.revision = revision;
        profile
    };
    let in_order: Vec<Profile> = ["a", "b"]
        .iter()
        .flat_map(|account| (0..1500).map(move |n| profile(account, n, n as u64 + 1)))
        .collect();
    let expected: Vec<String> = in_order
        .iter()
        .map(|profile| format!("{:?}@{}", profile.key, profile.revision))
        .collect();
    // As snapshots are: in key order, in chunks.
    let sorted = Store::new(10, "test");
    let mut chunks = in_order.chunks(1024).map(<[Profile]>::to_vec);
    sorted.restore(in_order.len(), &mut chunks, 5);
    assert_eq!(sorted.len(), 3000);
    assert_eq!(listed_with_revisions(&sorted), expected);
    // Out of order, and one key twice: the later one is kept, as the map's inserts keep it.
    let mut shuffled = in_order.clone();
    shuffled.reverse();
    shuffled.swap(10, 2000);
    shuffled.push(profile("a", 7, 99));
    let unsorted = Store::new(10, "test");
    unsorted.restore(shuffled.len(), &mut std::iter::once(shuffled), 5);
    assert_eq!(unsorted.len(), 3000);
    let mut expected = expected;
    expected[7] = "a/c00007@99".into();
    assert_eq!(listed_with_revisions(&unsorted), expected);
    for store in [&sorted, &unsorted] {
        let found = store
            .get(&ProfileKey::new("b", "c01499"))
            .expect("the last profile");
        assert_eq!(found.revision, 1500);
        assert!(store.get(&ProfileKey::new("b", "c01500")).is_none());
    }
}

#[test]
fn history_keeps_the_newest_changes_and_reports_compaction() {
    let store = Store::new(3, "test");
    store.commit(
        &(1..=5)
            .map(|r| change(r, "a", &r.to_string(), "t"))
            .collect::<Vec<_>>(),
    );
    assert_eq!(store.revision(), 5);
    assert_eq!(store.oldest_in_history(), 3);
    let revisions = |from, max| -> Vec<u64> {
        store
            .history_from(from, max)
            .unwrap()
            .iter()
            .map(|c| c.revision)
            .collect()
    };
    assert_eq!(revisions(3, 10), vec![3, 4, 5]);
    assert_eq!(revisions(4, 1), vec![4]);
    assert_eq!(revisions(6, 10), Vec::<u64>::new());
    assert_eq!(
        store.history_from(2, 10).unwrap_err(),
        Compacted { oldest: 3 }
    );
}

/// A change of `customer` to a profile with an extra of `extra_bytes` bytes.
fn large_change(revision: u64, customer: &str, extra_bytes: usize) -> Arc<Change> {
    let text = serde_json::Value::String("x".repeat(extra_bytes));
    let extras = vec![("notes".into(), Some(text))];
    change_of(revision, ProfileKey::new("a", customer), vec![], extras)
}

#[test]
fn history_is_bounded_by_bytes_too_oldest_first() {
    let limits = HistoryLimits {
        events: 1000,
        bytes: 200_000,
    };
    let store = Store::with_history(limits, "test");
    for revision in 1..=20 {
        store.commit(&[large_change(revision, &revision.to_string(), 50_000)]);
        assert!(
            store.history_bytes() <= limits.bytes,
            "{}",
            store.history_bytes()
        );
    }
    // Four changes of ~50 KB fit in 200 KB only just not: three stay, the newest ones.
    let oldest = store.oldest_in_history();
    assert_eq!(oldest, 18);
    assert!(matches!(
        store.history_from(1, 10),
        Err(Compacted { oldest: 18 })
    ));
    assert_eq!(store.history_from(18, 10).unwrap().len(), 3);
    // A change larger than the whole bound still stays, alone, until the next one.
    store.commit(&[large_change(21, "huge", 300_000)]);
    assert_eq!(store.oldest_in_history(), 21);
    assert!(store.history_bytes() > limits.bytes);
    store.commit(&[large_change(22, "small", 10)]);
    assert_eq!(store.oldest_in_history(), 22);
    assert!(store.history_bytes() < 1000);
}

#[test]
fn profiles_of_one_account_share_their_client_id() {
    let store = Store::new(10, "test");
    let one =
        Profile::empty(store.shared_key(ProfileKey::new(String::from("shared-account"), "a")));
    let other =
        Profile::empty(store.shared_key(ProfileKey::new(String::from("shared-account"), "b")));
    assert!(arcstr::ArcStr::ptr_eq(
        &one.key.client_id,
        &other.key.client_id
    ));
    // A profile loaded from a snapshot gets the same copy.
    let rebuilt = Profile::from_registers(
        ProfileKey::new(String::from("shared-account"), "c"),
        [],
        [],
        1,
        1,
        1,
    );
    store.restore(1, &mut std::iter::once(vec![rebuilt]), 1);
    let rebuilt = store.get(&ProfileKey::new("shared-account", "c")).unwrap();
    assert!(arcstr::ArcStr::ptr_eq(
        &one.key.client_id,
        &rebuilt.key.client_id
    ));
    // Another store in the same process keeps its own copies.
    let elsewhere =
        Store::new(10, "other").shared_key(ProfileKey::new(String::from("shared-account"), "d"));
    assert!(!arcstr::ArcStr::ptr_eq(
        &one.key.client_id,
        &elsewhere.client_id
    ));
}

#[test]
fn scan_pages_by_client_and_filter() {
    let store = Store::new(10, "test");
    let mut changes = Vec::new();
    for (i, (client, customer, tier)) in [
        ("a", "1", "gold"),
        ("a", "2", "basic"),
        ("a", "3", "gold"),
        ("b", "1", "gold"),
    ]
    .into_iter()
    .enumerate()
    {
        changes.push(change(i as u64 + 1, client, customer, tier));
    }
    store.commit(&changes);
    let ids = |scan: &Scan| -> Vec<String> {
        scan.profiles
            .iter()
            .map(|p| format!("{:?}", p.key))
            .collect()
    };
    let page = store.scan(Some("a"), None, 2, |_| true);
    assert_eq!(ids(&page), vec!["a/1", "a/2"]);
    let next = page.next.expect("more keys remain");
    assert_eq!(next, ProfileKey::new("a", "2"));
    let page = store.scan(Some("a"), Some(&next), 2, |_| true);
    assert_eq!(ids(&page), vec!["a/3"]);
    assert_eq!(page.next, None);
    let gold = store.scan(None, None, 10, |p| {
        p.get_text(Field::TierName) == Some("gold")
    });
    assert_eq!(ids(&gold), vec!["a/1", "a/3", "b/1"]);
}

/// 1,000 profiles of account `a` (`c0000`..`c0999`), every hundredth of tier `gold`.
fn thousand_with_ten_gold() -> Store {
    let store = Store::new(10, "test");
    let changes: Vec<_> = (0..1000u64)
        .map(|i| {
            let tier = if i % 100 == 0 { "gold" } else { "basic" };
            change(i + 1, "a", &format!("c{i:04}"), tier)
        })
        .collect();
    store.commit(&changes);
    store
}

fn gold(profile: &Profile) -> bool {
    profile.get_text(Field::TierName) == Some("gold")
}

#[test]
fn a_scan_bounded_by_keys_examined_stops_early_and_resumes_where_it_stopped() {
    let store = thousand_with_ten_gold();
    // Chunks of 256 keys: past 300 examined it stops at the end of the second chunk.
    let first = store.scan_at_most(Some("a"), None, 10, 300, gold);
    let customers = |scan: &Scan| -> Vec<String> {
        scan.profiles
            .iter()
            .map(|p| p.key.customer_id.to_string())
            .collect()
    };
    assert_eq!(
        customers(&first),
        ["c0000", "c0100", "c0200", "c0300", "c0400", "c0500"]
    );
    assert_eq!(first.next, Some(ProfileKey::new("a", "c0511")));

    // Turn after turn, the same profiles as one unbounded scan, each once.
    let mut found = customers(&first);
    let mut after = first.next;
    let mut turns = 1;
    while let Some(next) = after.clone().filter(|_| found.len() < 10) {
        let scan = store.scan_at_most(Some("a"), Some(&next), 10 - found.len(), 300, gold);
        found.extend(customers(&scan));
        after = scan.next;
        turns += 1;
    }
    assert_eq!(turns, 2);
    let whole = store.scan(Some("a"), None, 10, gold);
    assert_eq!(found, customers(&whole));
    assert_eq!(after, whole.next, "both stop after the tenth");
    assert_eq!(found.len(), 10);
}

#[test]
fn an_as_of_scan_in_bounded_turns_may_come_back_empty_before_it_is_done() {
    let store = thousand_with_ten_gold();
    let only_the_last = |profile: &Profile| &*profile.key.customer_id == "c0999";
    let mut scan = store.scan_as_of(None);
    let mut empty_turns = 0;
    let mut found = Vec::new();
    while !scan.done() {
        let turn = scan.next_turn(&store, 256, 256, only_the_last);
        if turn.is_empty() {
            empty_turns += 1;
        }
        found.extend(turn);
    }
    assert_eq!(found.len(), 1, "the one wanted profile, once");
    assert!(
        empty_turns >= 3,
        "turns of 256 keys find nothing before c0999: {empty_turns}"
    );

    // Unbounded, the same scan finds it in one call, and then reports the end.
    let mut scan = store.scan_as_of(None);
    assert_eq!(scan.next_chunk(&store, 256, only_the_last).len(), 1);
    assert!(scan.next_chunk(&store, 256, only_the_last).is_empty());
    assert!(scan.done());
}

/// `change` of a profile that `before` left: the same change, knowing its previous state.
fn change_after(before: &Change, revision: u64, tier: &str) -> Arc<Change> {
    let key = &before.profile.key;
    let after = change(revision, &key.client_id, &key.customer_id, tier);
    Arc::new(Change::new(
        revision,
        Arc::clone(&after.profile),
        Some(Arc::clone(&before.profile)),
        after.changed_fields.clone(),
        crate::profile::Origin::Webhook,
    ))
}

/// Profiles read after writes that followed `as_of` are made what they were at `as_of`: one
/// changed since as before its first change after it, one created since taken out (and
/// named), the others as read. A history that no longer reaches back says so.
#[test]
fn profiles_read_during_writes_are_made_what_they_were_at_the_revision_read_before_them() {
    let store = Store::new(100, "test");
    let a1 = change(1, "x", "a", "t1");
    let b1 = change(2, "x", "b", "t1");
    let c1 = change(3, "x", "c", "t1");
    store.commit(&[Arc::clone(&a1), Arc::clone(&b1), Arc::clone(&c1)]);
    let as_of = store.revision();
    let b2 = change_after(&b1, 4, "t2");
    let b3 = change_after(&b2, 5, "t3");
    store.commit(&[b2, b3, change(6, "x", "d", "t1")]);
    let read = |customer| store.get(&ProfileKey::new("x", customer)).unwrap();
    let mut then = vec![read("a"), read("b"), read("d")];
    assert_eq!(then[1].revision, 5);
    let left_out = store.as_of(&mut then, as_of).unwrap();
    assert_eq!(left_out, vec![ProfileKey::new("x", "d")], "created after");
    assert_eq!(then.len(), 2);
    assert!(Arc::ptr_eq(&then[0], &a1.profile), "unchanged: as read");
    assert!(
        Arc::ptr_eq(&then[1], &b1.profile),
        "before its first change"
    );
    let mut current = vec![Arc::clone(&c1.profile)];
    assert_eq!(store.as_of(&mut current, as_of).unwrap(), vec![]);
    assert!(Arc::ptr_eq(&current[0], &c1.profile));

    let small = Store::new(2, "test");
    let a = change(1, "x", "a", "t1");
    small.commit(&[Arc::clone(&a)]);
    let later = [2, 3, 4].map(|revision| change_after(&a, revision, "t"));
    small.commit(&later);
    let mut read = vec![small.get(&ProfileKey::new("x", "a")).unwrap()];
    assert_eq!(
        small.as_of(&mut read, 1).unwrap_err(),
        Compacted { oldest: 3 }
    );
}
