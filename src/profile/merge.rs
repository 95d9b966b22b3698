//! The merge rules: a register holds the largest `(created_at, value)` written to it, cleared
//! below every value, so merging is commutative, associative and idempotent.

use super::registers::{Clock, Registers, Slot};
use super::{EventTime, ExtraValue, FieldPath, Profile, ProfileUpdate, Scalar};

/// One last-writer-wins register: the value (or `None` once cleared) and when it was written.
///
/// Extras are kept as `Register<ExtraValue>`; modeled fields are packed inside the profile and
/// read out as `Register<ScalarRef>` ([`Profile::field_registers`]) or rebuilt from
/// `Register<Scalar>` ([`Profile::from_registers`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Register<T> {
    /// The current value; `None` when the newest write cleared the field.
    pub value: Option<T>,
    /// `created_at` of the webhook that wrote the current value.
    pub at: EventTime,
}

/// Decides whether a write `(at, value)` beats a register's current `(at, value)` content
/// (`None`: never written).
///
/// The winner is the larger `(at, value)` pair with `None` (cleared) below every value, so the
/// outcome does not depend on the order writes arrive in. `cmp_values` orders two values.
pub(super) fn beats<C: Ord, T>(
    current: Option<(&C, Option<&T>)>,
    at: &C,
    value: Option<&T>,
    cmp_values: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> bool {
    use std::cmp::Ordering;
    let Some((current_at, current_value)) = current else {
        return true;
    };
    match at.cmp(current_at) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => match (value, current_value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(new), Some(old)) => cmp_values(new, old) == Ordering::Greater,
        },
    }
}

impl Profile {
    /// Merges an update into this profile's content.
    ///
    /// Returns `None` when the profile is exactly as before (a duplicate, or an update older
    /// than every field it carries). Otherwise returns the fields whose visible value changed,
    /// sorted: it may be empty when a newer webhook only repeated the values it holds, which
    /// still moves their clocks (and `updated_at`). The clock move must be kept: without it an
    /// update between the two timestamps would win in one delivery order and lose in another.
    ///
    /// Only content changes: revision, create_revision and version are the sequencer's to set.
    pub fn merge(&mut self, update: &ProfileUpdate) -> Option<Vec<FieldPath>> {
        debug_assert_eq!(
            self.key, update.key,
            "an update merged into another profile"
        );
        let mut wrote = false;
        let mut changed = Vec::new();
        // Room for every path at the first change (growing from four took three allocations
        // a merge), and none taken when nothing changes (a duplicate delivery).
        let room = update.fields.len() + update.extras.len();
        let note = |changed: &mut Vec<FieldPath>, path| {
            if changed.capacity() == 0 {
                changed.reserve_exact(room);
            }
            changed.push(path);
        };
        if !update.fields.is_empty() {
            let at = Clock::of(update.at);
            let mut slots = self.registers.unpack();
            let mut wrote_fields = false;
            for (field, value) in &update.fields {
                let value = value.as_ref().map(Scalar::view);
                let slot = &mut slots[field.index()];
                let current = slot.as_ref().map(|slot| (&slot.at, slot.value.as_ref()));
                if beats(current, &at, value.as_ref(), Ord::cmp) {
                    wrote_fields = true;
                    // Visible values: a null where nothing was set changes none (it told
                    // watchers of the field that it changed; found by an adversarial run).
                    if slot.and_then(|slot| slot.value) != value {
                        note(&mut changed, FieldPath::Field(*field));
                    }
                    *slot = Some(Slot { at, value });
                }
            }
            if wrote_fields {
                wrote = true;
                self.registers = Registers::pack(&slots);
            }
        }
        for (key, value) in &update.extras {
            let value = value.clone().map(ExtraValue);
            let current = self.extra.as_ref().and_then(|extra| extra.get(key));
            let by_text = |new: &ExtraValue, old: &ExtraValue| new.sort_key().cmp(&old.sort_key());
            let current_register = current.map(|register| (&register.at, register.value.as_ref()));
            if beats(current_register, &update.at, value.as_ref(), by_text) {
                wrote = true;
                if current.and_then(|register| register.value.as_ref()) != value.as_ref() {
                    note(&mut changed, FieldPath::Extra(key.clone()));
                }
                self.extra.get_or_insert_default().insert(
                    key.clone(),
                    Register {
                        value,
                        at: update.at,
                    },
                );
            }
        }
        changed.sort();
        wrote.then_some(changed)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{DateTime, Utc};
    use proptest::prelude::*;

    use super::super::testing::{at, key, text, update};
    use super::*;
    use crate::profile::{Field, ScalarRef};

    #[test]
    fn newer_write_wins_and_older_is_ignored() {
        let mut profile = Profile::empty(key());
        let changed = profile.merge(&update(10, &[(Field::TierName, text("gold"))]));
        assert_eq!(changed, Some(vec![FieldPath::Field(Field::TierName)]));

        let changed = profile.merge(&update(5, &[(Field::TierName, text("basic"))]));
        assert_eq!(changed, None, "an older write must not overwrite");
        assert_eq!(profile.get_text(Field::TierName), Some("gold"));

        let changed = profile.merge(&update(11, &[(Field::TierName, text("silver"))]));
        assert_eq!(changed, Some(vec![FieldPath::Field(Field::TierName)]));
        assert_eq!(profile.get_text(Field::TierName), Some("silver"));
    }

    /// A null for a field or extra that was never set changes no visible value: it is kept
    /// (its clock orders later writes) but names no field, so watchers of that field are not
    /// told of a change (they were; found by an adversarial run). A value after it does.
    #[test]
    fn a_null_where_nothing_was_set_changes_no_visible_field() {
        let mut profile = Profile::empty(key());
        let changed = profile.merge(&update(1, &[(Field::Email, None)]));
        assert_eq!(changed, Some(vec![]), "kept, naming nothing");
        let mut null_extra = update(2, &[]);
        null_extra.extras = vec![("k".into(), None)];
        assert_eq!(profile.merge(&null_extra), Some(vec![]));
        let changed = profile.merge(&update(3, &[(Field::Email, text("a@example.com"))]));
        assert_eq!(changed, Some(vec![FieldPath::Field(Field::Email)]));
        // Older than the null: it does not bring a value back.
        let mut older = update(1, &[]);
        older.extras = vec![("k".into(), Some(serde_json::json!(1)))];
        assert_eq!(profile.merge(&older), None);
    }

    #[test]
    fn omitted_fields_stay_and_null_clears() {
        let mut profile = Profile::empty(key());
        profile.merge(&update(
            1,
            &[
                (Field::Email, text("a@example.com")),
                (Field::TotalPoints, Some(Scalar::Int(100))),
            ],
        ));
        let changed = profile.merge(&update(2, &[(Field::Email, None)]));
        assert_eq!(changed, Some(vec![FieldPath::Field(Field::Email)]));
        assert_eq!(profile.get(Field::Email), None);
        assert_eq!(profile.get_int(Field::TotalPoints), Some(100));

        // The clear keeps its clock: an older value must not bring the email back.
        let changed = profile.merge(&update(1, &[(Field::Email, text("old@example.com"))]));
        assert_eq!(changed, None);
        assert_eq!(profile.get(Field::Email), None);
        assert_eq!(profile.updated_at(), Some(at(2)));
    }

    #[test]
    fn equal_timestamps_pick_the_larger_value_in_any_order() {
        let gold = update(3, &[(Field::TierName, text("gold"))]);
        let basic = update(3, &[(Field::TierName, text("basic"))]);
        let mut one = Profile::empty(key());
        one.merge(&gold);
        one.merge(&basic);
        let mut other = Profile::empty(key());
        other.merge(&basic);
        other.merge(&gold);
        assert_eq!(one.get_text(Field::TierName), Some("gold"));
        assert!(one.same_content(&other));
    }

    #[test]
    fn same_value_newer_moves_the_clock_but_changes_no_field() {
        let mut profile = Profile::empty(key());
        profile.merge(&update(1, &[(Field::TotalPoints, Some(Scalar::Int(5)))]));
        let newer = update(3, &[(Field::TotalPoints, Some(Scalar::Int(5)))]);
        assert_eq!(profile.merge(&newer), Some(vec![]));
        assert_eq!(profile.updated_at(), Some(at(3)));
        assert_eq!(profile.merge(&newer), None, "a duplicate changes nothing");
        // The moved clock is what keeps a write from between the two from winning.
        let between = update(2, &[(Field::TotalPoints, Some(Scalar::Int(7)))]);
        assert_eq!(profile.merge(&between), None);
        assert_eq!(profile.get_int(Field::TotalPoints), Some(5));
    }

    #[test]
    fn extras_follow_the_same_rules() {
        let mut profile = Profile::empty(key());
        let mut with_extra = update(1, &[]);
        with_extra.extras = vec![("birthday".into(), Some(serde_json::json!("1990-01-01")))];
        assert_eq!(
            profile.merge(&with_extra),
            Some(vec![FieldPath::Extra("birthday".into())])
        );
        assert_eq!(
            profile.extras().collect::<Vec<_>>(),
            vec![("birthday", &serde_json::json!("1990-01-01"))]
        );
        let mut cleared = update(2, &[]);
        cleared.extras = vec![("birthday".into(), None)];
        assert_eq!(
            profile.merge(&cleared),
            Some(vec![FieldPath::Extra("birthday".into())])
        );
        assert_eq!(profile.extras().count(), 0);
        assert_eq!(profile.merge(&with_extra), None, "older extra resurrected");
    }

    // A small value space makes timestamp ties and repeated values frequent.
    fn arb_update() -> impl Strategy<Value = ProfileUpdate> {
        let scalar = prop_oneof![
            Just(None),
            (0i64..3).prop_map(|n| Some(Scalar::Int(n))),
            "[ab]".prop_map(|s| Some(Scalar::Text(s.into()))),
        ];
        let field = (0..Field::ALL.len()).prop_map(|i| Field::ALL[i]);
        let extra_value = prop_oneof![
            Just(None),
            (0i64..3).prop_map(|n| Some(serde_json::json!(n))),
            Just(Some(serde_json::json!({"a": [1, 2]}))),
        ];
        (
            0i64..4,
            proptest::collection::btree_map(field, scalar, 0..4),
            proptest::collection::btree_map("[xy]", extra_value, 0..2),
        )
            .prop_map(|(second, fields, extras)| ProfileUpdate {
                key: key(),
                at: at(second),
                fields: fields.into_iter().collect(),
                extras: extras
                    .into_iter()
                    .map(|(k, v)| (k.into_boxed_str(), v))
                    .collect(),
                origin: crate::profile::Origin::Webhook,
            })
    }

    fn merged(updates: &[ProfileUpdate]) -> Profile {
        let mut profile = Profile::empty(key());
        for update in updates {
            profile.merge(update);
        }
        profile
    }

    proptest! {
        #[test]
        fn any_order_with_duplicates_converges(
            updates in proptest::collection::vec(arb_update(), 1..8),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 1..24),
        ) {
            let in_order = merged(&updates);
            // Any sequence that delivers each update at least once, shuffled, with repeats.
            let mut delivered: Vec<ProfileUpdate> = updates.clone();
            delivered.extend(order.iter().map(|index| index.get(&updates).clone()));
            let mut shuffled = delivered.clone();
            let len = shuffled.len();
            for (i, index) in order.iter().enumerate() {
                shuffled.swap(i % len, index.index(len));
            }
            let other = merged(&shuffled);
            prop_assert!(in_order.same_content(&other), "{in_order:?}\n!=\n{other:?}");
            prop_assert_eq!(in_order.updated_at(), other.updated_at());
        }

        #[test]
        fn merging_again_changes_nothing(updates in proptest::collection::vec(arb_update(), 1..6)) {
            let mut profile = merged(&updates);
            for update in &updates {
                prop_assert_eq!(profile.merge(update), None);
            }
        }
    }

    /// The merge as it was before the registers were packed (ten `Option<Register<Scalar>>`
    /// with `DateTime` clocks, extras in a map), written as the rule it implements: a register
    /// holds the largest `(at, value)` written to it, cleared below every value.
    #[derive(Default)]
    struct Reference {
        fields: BTreeMap<Field, Register<Scalar>>,
        extra: BTreeMap<Box<str>, Register<ExtraValue>>,
    }

    impl Reference {
        fn merge(&mut self, update: &ProfileUpdate) -> Option<Vec<FieldPath>> {
            let mut wrote = false;
            let mut changed = Vec::new();
            for (field, value) in &update.fields {
                let current = self.fields.get(field);
                if current.is_none_or(|old| (&update.at, value) > (&old.at, &old.value)) {
                    wrote = true;
                    if current.and_then(|old| old.value.as_ref()) != value.as_ref() {
                        changed.push(FieldPath::Field(*field));
                    }
                    let register = Register {
                        value: value.clone(),
                        at: update.at,
                    };
                    self.fields.insert(*field, register);
                }
            }
            for (key, value) in &update.extras {
                let value = value.clone().map(ExtraValue);
                let text = |value: &Option<ExtraValue>| value.as_ref().map(ExtraValue::sort_key);
                let current = self.extra.get(key);
                if current.is_none_or(|old| (update.at, text(&value)) > (old.at, text(&old.value)))
                {
                    wrote = true;
                    if current.and_then(|old| old.value.as_ref()) != value.as_ref() {
                        changed.push(FieldPath::Extra(key.clone()));
                    }
                    let register = Register {
                        value,
                        at: update.at,
                    };
                    self.extra.insert(key.clone(), register);
                }
            }
            changed.sort();
            wrote.then_some(changed)
        }
    }

    // Clocks from across chrono's range (beyond i64 nanoseconds), a leap second, and instants
    // one nanosecond apart, few enough that ties are frequent.
    fn arb_time() -> impl Strategy<Value = EventTime> {
        let leap = DateTime::parse_from_rfc3339("2016-12-31T23:59:60.5Z")
            .unwrap()
            .with_timezone(&Utc);
        prop_oneof![
            Just(DateTime::<Utc>::MIN_UTC),
            Just(DateTime::<Utc>::MAX_UTC),
            Just(DateTime::from_timestamp(-1, 999_999_999).unwrap()),
            Just(DateTime::from_timestamp(0, 0).unwrap()),
            Just(leap),
            Just(DateTime::from_timestamp(1_483_228_799, 999_999_999).unwrap()),
            Just(DateTime::from_timestamp(1_483_228_800, 0).unwrap()),
            (0i64..3, 0u32..2)
                .prop_map(|(s, n)| DateTime::from_timestamp(1_700_000_000 + s, n).unwrap()),
        ]
    }

    fn arb_wide_update() -> impl Strategy<Value = ProfileUpdate> {
        let text = prop_oneof![
            Just(String::new()),
            "[ab]",
            Just("é".repeat(100)),
            Just("customer.00000001@example-mail.com".to_owned()),
        ];
        let scalar = prop_oneof![
            Just(None),
            prop_oneof![
                Just(i64::MIN),
                Just(-1i64),
                Just(0i64),
                Just(1i64),
                Just(300i64),
                Just(i64::MAX)
            ]
            .prop_map(|n| Some(Scalar::Int(n))),
            text.prop_map(|s| Some(Scalar::Text(s.into()))),
        ];
        let field = (0..Field::ALL.len()).prop_map(|i| Field::ALL[i]);
        let extra_value = prop_oneof![
            Just(None),
            (0i64..3).prop_map(|n| Some(serde_json::json!(n))),
        ];
        (
            arb_time(),
            proptest::collection::btree_map(field, scalar, 0..6),
            proptest::collection::btree_map("[xy]", extra_value, 0..2),
        )
            .prop_map(|(at, fields, extras)| ProfileUpdate {
                key: key(),
                at,
                fields: fields.into_iter().collect(),
                extras: extras
                    .into_iter()
                    .map(|(k, v)| (k.into_boxed_str(), v))
                    .collect(),
                origin: crate::profile::Origin::Webhook,
            })
    }

    fn owned_registers(profile: &Profile) -> BTreeMap<Field, Register<Scalar>> {
        profile
            .field_registers()
            .map(|(field, register)| {
                let value = register.value.map(ScalarRef::to_scalar);
                (
                    field,
                    Register {
                        value,
                        at: register.at,
                    },
                )
            })
            .collect()
    }

    proptest! {
        #[test]
        fn packed_registers_merge_exactly_like_the_reference(
            updates in proptest::collection::vec(arb_wide_update(), 1..10),
        ) {
            let mut profile = Profile::empty(key());
            let mut reference = Reference::default();
            for update in &updates {
                prop_assert_eq!(profile.merge(update), reference.merge(update));
                prop_assert_eq!(owned_registers(&profile), reference.fields.clone());
                let extras: BTreeMap<_, _> = profile
                    .extra_registers()
                    .map(|(key, register)| (Box::<str>::from(key), register.clone()))
                    .collect();
                prop_assert_eq!(&extras, &reference.extra);
                let newest = reference.fields.values().map(|register| register.at);
                let newest = newest.chain(reference.extra.values().map(|register| register.at));
                prop_assert_eq!(profile.updated_at(), newest.max());
                for field in Field::ALL {
                    let expected = reference.fields.get(&field).and_then(|r| r.value.as_ref());
                    prop_assert_eq!(profile.get(field), expected.map(Scalar::view));
                    prop_assert_eq!(profile.values().get(field), expected.map(Scalar::view));
                }
                // The snapshot path rebuilds the very same profile.
                let rebuilt = Profile::from_registers(
                    key(),
                    owned_registers(&profile),
                    extras,
                    0,
                    0,
                    0,
                );
                prop_assert_eq!(&rebuilt, &profile);
            }
        }
    }
}
