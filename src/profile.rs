//! The profile and its merge rules: a pure function of (current state, update).
//!
//! A profile is a set of last-writer-wins registers, one per field. Each register remembers the
//! value it holds (or that it was cleared) and the `created_at` of the webhook that wrote it. An
//! update writes a register only when it is newer; equal timestamps are broken by comparing the
//! values, so the register holds `max((at, value))`. That makes merging commutative, associative
//! and idempotent: any delivery order of the same updates, with duplicates, ends in the same
//! profile. Cleared fields keep their timestamp, so an older value cannot resurrect them.
//!
//! This module does not know where updates come from (the webhook adapter builds them), nor
//! assigns revisions (only the sequencer does), nor stores anything.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

/// When Gameball created the event that carried a value: the clock of every register.
pub type EventTime = DateTime<Utc>;

/// Identifies a profile: the Gameball account and the integrator's own customer id.
///
/// The strings are reference counted, so cloning a key (the store keeps it in two places) costs
/// two counter increments, not two allocations.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProfileKey {
    /// Gameball account (`client_id`).
    pub client_id: Arc<str>,
    /// The integrator's id of the customer (`customer_id`).
    pub customer_id: Arc<str>,
}

impl ProfileKey {
    /// Builds a key from its two parts.
    pub fn new(client_id: impl Into<Arc<str>>, customer_id: impl Into<Arc<str>>) -> Self {
        Self {
            client_id: client_id.into(),
            customer_id: customer_id.into(),
        }
    }
}

impl fmt::Debug for ProfileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.client_id, self.customer_id)
    }
}

/// The fields this version models, besides the key. Anything else Gameball sends in `data`
/// lands in [`Profile::extra`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// Gameball's internal customer id (top level of every webhook).
    GbCustomerId,
    /// `data.email`.
    Email,
    /// `data.mobile_number`.
    MobileNumber,
    /// `data.tier_name`.
    TierName,
    /// `data.tier_order`.
    TierOrder,
    /// `data.referral_code`.
    ReferralCode,
    /// `data.referral_link`.
    ReferralLink,
    /// `data.activated_points`.
    ActivatedPoints,
    /// `data.pending_points`.
    PendingPoints,
    /// `data.total_points`.
    TotalPoints,
}

/// What values a modeled field takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// A string.
    Text,
    /// An integer that fits `i32`.
    Int32,
    /// An integer that fits `i64`.
    Int64,
}

impl Field {
    /// Every modeled field, in the order of the `Profile` message.
    pub const ALL: [Field; 10] = [
        Field::GbCustomerId,
        Field::Email,
        Field::MobileNumber,
        Field::TierName,
        Field::TierOrder,
        Field::ReferralCode,
        Field::ReferralLink,
        Field::ActivatedPoints,
        Field::PendingPoints,
        Field::TotalPoints,
    ];

    /// The field's name, as in the webhook's `data` and the gRPC `Profile` message.
    pub fn name(self) -> &'static str {
        match self {
            Field::GbCustomerId => "gb_customer_id",
            Field::Email => "email",
            Field::MobileNumber => "mobile_number",
            Field::TierName => "tier_name",
            Field::TierOrder => "tier_order",
            Field::ReferralCode => "referral_code",
            Field::ReferralLink => "referral_link",
            Field::ActivatedPoints => "activated_points",
            Field::PendingPoints => "pending_points",
            Field::TotalPoints => "total_points",
        }
    }

    /// The field with this name, if it is modeled.
    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|field| field.name() == name)
    }

    /// What values the field takes.
    pub fn kind(self) -> FieldKind {
        match self {
            Field::Email
            | Field::MobileNumber
            | Field::TierName
            | Field::ReferralCode
            | Field::ReferralLink => FieldKind::Text,
            Field::TierOrder => FieldKind::Int32,
            Field::GbCustomerId
            | Field::ActivatedPoints
            | Field::PendingPoints
            | Field::TotalPoints => FieldKind::Int64,
        }
    }

    /// The field's number in the `Profile` message: a stable id for stored data.
    pub fn number(self) -> u32 {
        match self {
            Field::GbCustomerId => 3,
            Field::Email => 4,
            Field::MobileNumber => 5,
            Field::TierName => 6,
            Field::TierOrder => 7,
            Field::ReferralCode => 8,
            Field::ReferralLink => 9,
            Field::ActivatedPoints => 10,
            Field::PendingPoints => 11,
            Field::TotalPoints => 12,
        }
    }

    /// The field with this `Profile` message number.
    pub fn from_number(number: u32) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|field| field.number() == number)
    }

    /// Whether the field is one of the three points balances.
    pub fn is_points(self) -> bool {
        matches!(
            self,
            Field::ActivatedPoints | Field::PendingPoints | Field::TotalPoints
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A value of a modeled field. Ordered (integers before text), which breaks timestamp ties.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scalar {
    /// An integer field's value (range checked against the field's kind by whoever builds it).
    Int(i64),
    /// A text field's value.
    Text(Box<str>),
}

impl Scalar {
    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Scalar::Int(value) => Some(*value),
            Scalar::Text(_) => None,
        }
    }

    /// The text, if this is text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Scalar::Text(value) => Some(value),
            Scalar::Int(_) => None,
        }
    }
}

/// A value of an unmodeled `data` field, kept as the JSON Gameball sent.
///
/// Ordered by its compact JSON text: timestamp ties between two different extras are broken by
/// that order, which is total and the same on every replica.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtraValue(pub serde_json::Value);

impl ExtraValue {
    fn sort_key(&self) -> String {
        self.0.to_string()
    }
}

/// One last-writer-wins register: the value (or `None` once cleared) and when it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Register<T> {
    /// The current value; `None` when the newest write cleared the field.
    pub value: Option<T>,
    /// `created_at` of the webhook that wrote the current value.
    pub at: EventTime,
}

/// Decides whether a write `(at, value)` beats the register's current content.
///
/// The winner is the larger `(at, value)` pair with `None` (cleared) below every value, so the
/// outcome does not depend on the order writes arrive in. `cmp_values` orders two values.
fn beats<T>(
    current: Option<&Register<T>>,
    at: EventTime,
    value: Option<&T>,
    cmp_values: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> bool {
    use std::cmp::Ordering;
    let Some(current) = current else {
        return true;
    };
    match at.cmp(&current.at) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => match (value, current.value.as_ref()) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(new), Some(old)) => cmp_values(new, old) == Ordering::Greater,
        },
    }
}

/// A field an update writes: a modeled field or an extra `data` key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FieldPath {
    /// A modeled field.
    Field(Field),
    /// An unmodeled `data` key.
    Extra(Box<str>),
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldPath::Field(field) => f.write_str(field.name()),
            FieldPath::Extra(key) => write!(f, "extra.{key}"),
        }
    }
}

/// A validated `customer.profile.updated` event: which profile, when, and what it writes.
///
/// `None` values clear the field (the webhook carried JSON `null`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileUpdate {
    /// The profile it is about.
    pub key: ProfileKey,
    /// `created_at` of the webhook.
    pub at: EventTime,
    /// Modeled fields it carries, each at most once.
    pub fields: Vec<(Field, Option<Scalar>)>,
    /// Unmodeled `data` keys it carries, each at most once.
    pub extras: Vec<(Box<str>, Option<serde_json::Value>)>,
}

/// The state of one profile: its registers plus the revision bookkeeping the sequencer keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Which profile this is.
    pub key: ProfileKey,
    /// One register per modeled field, indexed by `Field as usize`; `None` = never written.
    fields: [Option<Register<Scalar>>; Field::ALL.len()],
    /// Registers of unmodeled `data` keys, ordered by key.
    extra: BTreeMap<Box<str>, Register<ExtraValue>>,
    /// Revision of the last change to this profile.
    pub revision: u64,
    /// Revision of the change that created this profile.
    pub create_revision: u64,
    /// How many changes were applied to this profile.
    pub version: u64,
}

impl Profile {
    /// An empty profile (no field ever written), not yet in any revision.
    pub fn empty(key: ProfileKey) -> Self {
        Self {
            key,
            fields: Default::default(),
            extra: BTreeMap::new(),
            revision: 0,
            create_revision: 0,
            version: 0,
        }
    }

    /// The current value of a modeled field; `None` when unset or cleared.
    pub fn get(&self, field: Field) -> Option<&Scalar> {
        self.fields[field.index()].as_ref()?.value.as_ref()
    }

    /// The current integer value of an integer field.
    pub fn get_int(&self, field: Field) -> Option<i64> {
        self.get(field).and_then(Scalar::as_int)
    }

    /// The current text value of a text field.
    pub fn get_text(&self, field: Field) -> Option<&str> {
        self.get(field).and_then(Scalar::as_text)
    }

    /// The extras currently set (cleared keys left out), ordered by key.
    pub fn extras(&self) -> impl Iterator<Item = (&str, &serde_json::Value)> {
        self.extra
            .iter()
            .filter_map(|(key, register)| Some((&**key, &register.value.as_ref()?.0)))
    }

    /// The registers of modeled fields ever written (cleared ones included), in field order.
    pub fn field_registers(&self) -> impl Iterator<Item = (Field, &Register<Scalar>)> {
        Field::ALL
            .into_iter()
            .filter_map(|field| Some((field, self.fields[field.index()].as_ref()?)))
    }

    /// The registers of extra keys ever written (cleared ones included), ordered by key.
    pub fn extra_registers(&self) -> impl Iterator<Item = (&str, &Register<ExtraValue>)> {
        self.extra.iter().map(|(key, register)| (&**key, register))
    }

    /// Rebuilds a profile from its registers and bookkeeping, as [`Profile::field_registers`]
    /// and [`Profile::extra_registers`] gave them (the journal's snapshots).
    pub fn from_registers(
        key: ProfileKey,
        fields: impl IntoIterator<Item = (Field, Register<Scalar>)>,
        extras: impl IntoIterator<Item = (Box<str>, Register<ExtraValue>)>,
        revision: u64,
        create_revision: u64,
        version: u64,
    ) -> Profile {
        let mut profile = Profile::empty(key);
        for (field, register) in fields {
            profile.fields[field.index()] = Some(register);
        }
        profile.extra = extras.into_iter().collect();
        profile.revision = revision;
        profile.create_revision = create_revision;
        profile.version = version;
        profile
    }

    /// The newest `created_at` among the registers, cleared ones included: when this profile's
    /// content last changed at the source. Independent of delivery order.
    pub fn updated_at(&self) -> Option<EventTime> {
        let fields = self.fields.iter().flatten().map(|register| register.at);
        let extras = self.extra.values().map(|register| register.at);
        fields.chain(extras).max()
    }

    /// Whether two profiles hold the same content, revision bookkeeping aside.
    pub fn same_content(&self, other: &Profile) -> bool {
        self.key == other.key && self.fields == other.fields && self.extra == other.extra
    }

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
        for (field, value) in &update.fields {
            let register = &mut self.fields[field.index()];
            if beats(register.as_ref(), update.at, value.as_ref(), Ord::cmp) {
                wrote = true;
                if register.as_ref().map(|register| &register.value) != Some(value) {
                    changed.push(FieldPath::Field(*field));
                }
                *register = Some(Register {
                    value: value.clone(),
                    at: update.at,
                });
            }
        }
        for (key, value) in &update.extras {
            let value = value.clone().map(ExtraValue);
            let current = self.extra.get(key);
            let by_text = |new: &ExtraValue, old: &ExtraValue| new.sort_key().cmp(&old.sort_key());
            if beats(current, update.at, value.as_ref(), by_text) {
                wrote = true;
                if current.map(|register| &register.value) != Some(&value) {
                    changed.push(FieldPath::Extra(key.clone()));
                }
                self.extra.insert(
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

/// How a tier moved, judged by `tier_order`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierDirection {
    /// One side has no tier order.
    Unknown,
    /// To a higher order.
    Up,
    /// To a lower order.
    Down,
    /// Same order (for example a renamed tier).
    SameOrder,
}

/// A change of VIP tier, derived from the profile before and after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierChange {
    /// Tier name before (`None` when unset).
    pub from_name: Option<String>,
    /// Tier order before.
    pub from_order: Option<i64>,
    /// Tier name after.
    pub to_name: Option<String>,
    /// Tier order after.
    pub to_order: Option<i64>,
    /// Direction, from the orders.
    pub direction: TierDirection,
}

/// Points balances after minus before, an unset balance counting as zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointsDelta {
    /// Change of activated points.
    pub activated: i64,
    /// Change of pending points.
    pub pending: i64,
    /// Change of total points.
    pub total: i64,
}

/// Whether a change created the profile or updated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// The first change to this profile.
    Created,
    /// A later change.
    Updated,
}

/// One applied change: the unit the sequencer records, the history keeps and watchers receive.
#[derive(Clone, Debug)]
pub struct Change {
    /// The store revision this change produced.
    pub revision: u64,
    /// The profile after the change.
    pub profile: Arc<Profile>,
    /// The profile before the change; `None` when the change created it.
    pub previous: Option<Arc<Profile>>,
    /// The fields the change modified, sorted.
    pub changed_fields: Vec<FieldPath>,
}

impl Change {
    /// Created or updated.
    pub fn kind(&self) -> ChangeKind {
        match self.previous {
            None => ChangeKind::Created,
            Some(_) => ChangeKind::Updated,
        }
    }

    /// Whether the change modified this field.
    pub fn touches(&self, path: &FieldPath) -> bool {
        self.changed_fields.binary_search(path).is_ok()
    }

    /// Whether the change modified any extra key.
    pub fn touches_any_extra(&self) -> bool {
        self.changed_fields
            .iter()
            .any(|path| matches!(path, FieldPath::Extra(_)))
    }

    /// The tier change, when `tier_name` or `tier_order` changed.
    pub fn tier_change(&self) -> Option<TierChange> {
        let tier = [Field::TierName, Field::TierOrder];
        if !tier.iter().any(|f| self.touches(&FieldPath::Field(*f))) {
            return None;
        }
        let before = self.previous.as_deref();
        let from_order = before.and_then(|p| p.get_int(Field::TierOrder));
        let to_order = self.profile.get_int(Field::TierOrder);
        let direction = match (from_order, to_order) {
            (Some(from), Some(to)) if to > from => TierDirection::Up,
            (Some(from), Some(to)) if to < from => TierDirection::Down,
            (Some(_), Some(_)) => TierDirection::SameOrder,
            _ => TierDirection::Unknown,
        };
        Some(TierChange {
            from_name: before.and_then(|p| p.get_text(Field::TierName).map(str::to_owned)),
            from_order,
            to_name: self.profile.get_text(Field::TierName).map(str::to_owned),
            to_order,
            direction,
        })
    }

    /// The points delta, when a points field changed.
    pub fn points_delta(&self) -> Option<PointsDelta> {
        if !Field::ALL
            .iter()
            .any(|f| f.is_points() && self.touches(&FieldPath::Field(*f)))
        {
            return None;
        }
        let delta = |field| {
            let before = self.previous.as_deref().and_then(|p| p.get_int(field));
            let after = self.profile.get_int(field);
            after.unwrap_or(0).saturating_sub(before.unwrap_or(0))
        };
        Some(PointsDelta {
            activated: delta(Field::ActivatedPoints),
            pending: delta(Field::PendingPoints),
            total: delta(Field::TotalPoints),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(second: i64) -> EventTime {
        DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap()
    }

    fn key() -> ProfileKey {
        ProfileKey::new("2155", "c1")
    }

    fn update(second: i64, fields: &[(Field, Option<Scalar>)]) -> ProfileUpdate {
        ProfileUpdate {
            key: key(),
            at: at(second),
            fields: fields.to_vec(),
            extras: vec![],
        }
    }

    fn text(value: &str) -> Option<Scalar> {
        Some(Scalar::Text(value.into()))
    }

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

    fn change(before: Option<Profile>, after: Profile, changed: Vec<FieldPath>) -> Change {
        Change {
            revision: 2,
            profile: Arc::new(after),
            previous: before.map(Arc::new),
            changed_fields: changed,
        }
    }

    #[test]
    fn tier_change_and_points_delta_are_derived_from_before_and_after() {
        let mut before = Profile::empty(key());
        before.merge(&update(
            1,
            &[
                (Field::TierName, text("basic")),
                (Field::TierOrder, Some(Scalar::Int(1))),
                (Field::ActivatedPoints, Some(Scalar::Int(90))),
                (Field::TotalPoints, Some(Scalar::Int(100))),
            ],
        ));
        let mut after = before.clone();
        let changed = after
            .merge(&update(
                2,
                &[
                    (Field::TierName, text("silver")),
                    (Field::TierOrder, Some(Scalar::Int(2))),
                    (Field::ActivatedPoints, Some(Scalar::Int(190))),
                    (Field::PendingPoints, Some(Scalar::Int(10))),
                    (Field::TotalPoints, Some(Scalar::Int(200))),
                ],
            ))
            .unwrap();
        let change = change(Some(before), after, changed);
        let tier = change.tier_change().unwrap();
        assert_eq!(tier.from_name.as_deref(), Some("basic"));
        assert_eq!(tier.to_order, Some(2));
        assert_eq!(tier.direction, TierDirection::Up);
        assert_eq!(
            change.points_delta(),
            Some(PointsDelta {
                activated: 100,
                pending: 10,
                total: 100
            })
        );
    }

    #[test]
    fn no_tier_change_or_points_delta_when_those_fields_did_not_change() {
        let mut before = Profile::empty(key());
        before.merge(&update(1, &[(Field::TierOrder, Some(Scalar::Int(3)))]));
        let mut after = before.clone();
        let changed = after
            .merge(&update(2, &[(Field::Email, text("x@example.com"))]))
            .unwrap();
        let change = change(Some(before), after, changed);
        assert_eq!(change.tier_change(), None);
        assert_eq!(change.points_delta(), None);
    }

    #[test]
    fn tier_direction_down_same_and_unknown() {
        let tiers = |from: Option<i64>, to: Option<i64>| {
            let mut before = Profile::empty(key());
            before.merge(&update(1, &[(Field::TierOrder, from.map(Scalar::Int))]));
            let mut after = before.clone();
            let changed = after.merge(&update(
                2,
                &[
                    (Field::TierOrder, to.map(Scalar::Int)),
                    (Field::TierName, text("renamed")),
                ],
            ));
            let changed = changed.unwrap();
            change(Some(before), after, changed)
                .tier_change()
                .unwrap()
                .direction
        };
        assert_eq!(tiers(Some(3), Some(1)), TierDirection::Down);
        assert_eq!(tiers(Some(2), Some(2)), TierDirection::SameOrder);
        assert_eq!(tiers(None, Some(2)), TierDirection::Unknown);
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
}
