//! A change: what the sequencer records, the history keeps and watchers receive, and what is
//! derived from it (tier change, points delta), and [`ChangedFields`], the compact set of
//! fields a change modified.

use std::sync::Arc;

use super::{Field, FieldPath, Profile};

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

/// What produced an update, and so the change it made.
///
/// The merge ignores it (per-field last-writer-wins does not care where a value came from), so
/// it changes no rule; it is recorded with the update (journal, replicated stream) so watchers
/// and metrics can tell a webhook's change from a reconciliation's, after a restart too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A Gameball webhook (received, or a dead letter replayed). What records written before
    /// origins existed read as.
    #[default]
    Webhook,
    /// Read back from Gameball's REST API by a reconciliation job.
    Reconcile,
}

impl Origin {
    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Webhook => "webhook",
            Origin::Reconcile => "reconcile",
        }
    }
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
    /// The fields the change modified.
    pub changed_fields: ChangedFields,
    /// What produced the update that made this change.
    pub origin: Origin,
    /// [`Change::memory_bytes`], counted once: the history and every subscriber's queue read
    /// it, and counting walks both profiles' extras. A `u32` (a change is a few MB at most)
    /// keeps the change in mimalloc's 64-byte class.
    memory_bytes: u32,
}

impl Change {
    /// A change, its memory counted.
    pub fn new(
        revision: u64,
        profile: Arc<Profile>,
        previous: Option<Arc<Profile>>,
        changed_fields: ChangedFields,
        origin: Origin,
    ) -> Change {
        let memory_bytes = std::mem::size_of::<Change>()
            + changed_fields.heap_bytes()
            + profile.memory_bytes()
            + previous.as_ref().map_or(0, |p| p.memory_bytes());
        let memory_bytes = u32::try_from(memory_bytes).unwrap_or(u32::MAX);
        Change {
            revision,
            profile,
            previous,
            changed_fields,
            origin,
            memory_bytes,
        }
    }

    /// What the change holds in memory: itself, its changed fields, and both profiles (the
    /// one before may be shared with an older change or the store, so this errs high).
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes as usize
    }

    /// Created or updated.
    pub fn kind(&self) -> ChangeKind {
        match self.previous {
            None => ChangeKind::Created,
            Some(_) => ChangeKind::Updated,
        }
    }

    /// Whether the change modified this field.
    pub fn touches(&self, path: &FieldPath) -> bool {
        self.changed_fields.contains(path)
    }

    /// Whether the change modified any extra key.
    pub fn touches_any_extra(&self) -> bool {
        self.changed_fields.extras.is_some()
    }

    /// The tier change, when `tier_name` or `tier_order` changed.
    pub fn tier_change(&self) -> Option<TierChange> {
        let tier = [Field::TierName, Field::TierOrder];
        if !tier.iter().any(|f| self.touches(&FieldPath::Field(*f))) {
            return None;
        }
        // Unpacked once per profile: this runs for every delivery to every subscriber.
        let before = self.previous.as_deref().map(Profile::values);
        let after = self.profile.values();
        let from_order = before.and_then(|p| p.int(Field::TierOrder));
        let to_order = after.int(Field::TierOrder);
        let direction = match (from_order, to_order) {
            (Some(from), Some(to)) if to > from => TierDirection::Up,
            (Some(from), Some(to)) if to < from => TierDirection::Down,
            (Some(_), Some(_)) => TierDirection::SameOrder,
            _ => TierDirection::Unknown,
        };
        Some(TierChange {
            from_name: before.and_then(|p| p.text(Field::TierName).map(str::to_owned)),
            from_order,
            to_name: after.text(Field::TierName).map(str::to_owned),
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
        // Unpacked once per profile, not once per balance (see `tier_change`).
        let before = self.previous.as_deref().map(Profile::values);
        let after = self.profile.values();
        let delta = |field| {
            let before = before.and_then(|p| p.int(field));
            after
                .int(field)
                .unwrap_or(0)
                .saturating_sub(before.unwrap_or(0))
        };
        Some(PointsDelta {
            activated: delta(Field::ActivatedPoints),
            pending: delta(Field::PendingPoints),
            total: delta(Field::TotalPoints),
        })
    }
}

/// The fields a change modified: a bit per modeled field and, when any changed, the extra keys.
///
/// The history holds the last 100,000 changes or more, so this is 16 bytes and allocates
/// nothing for a change of modeled fields only (most of them), where a `Vec<FieldPath>` cost
/// 24 bytes plus 16 per field (issue 12: about 17 bytes per profile at 1M profiles). Iterates
/// in [`FieldPath`]'s order, as the sorted list did: modeled fields in table order, then extras
/// by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangedFields {
    // Bit `i` is `Field::ALL[i]`.
    fields: u16,
    // Sorted, never empty. A thin box: extras changes are rare.
    extras: Option<Box<ExtraKeys>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ExtraKeys(Box<[Box<str>]>);

const _: () = assert!(Field::ALL.len() <= u16::BITS as usize);

impl ChangedFields {
    /// Whether `path` is among them.
    pub fn contains(&self, path: &FieldPath) -> bool {
        match path {
            FieldPath::Field(field) => self.fields & (1 << field.index()) != 0,
            FieldPath::Extra(key) => self
                .extras
                .as_ref()
                .is_some_and(|extras| extras.0.binary_search(key).is_ok()),
        }
    }

    /// Whether none changed.
    pub fn is_empty(&self) -> bool {
        self.fields == 0 && self.extras.is_none()
    }

    /// The fields, in [`FieldPath`] order.
    pub fn iter(&self) -> impl Iterator<Item = FieldPath> + '_ {
        let fields = Field::ALL
            .into_iter()
            .filter(|field| self.fields & (1 << field.index()) != 0)
            .map(FieldPath::Field);
        let extras = self.extras.iter().flat_map(|extras| extras.0.iter());
        fields.chain(extras.map(|key| FieldPath::Extra(key.clone())))
    }

    /// The heap bytes held beyond the value itself: the extra keys, when any changed.
    pub fn heap_bytes(&self) -> usize {
        self.extras.as_ref().map_or(0, |extras| {
            std::mem::size_of::<ExtraKeys>()
                + extras
                    .0
                    .iter()
                    .map(|key| std::mem::size_of::<Box<str>>() + key.len())
                    .sum::<usize>()
        })
    }

    /// The fields as a sorted list.
    pub fn to_vec(&self) -> Vec<FieldPath> {
        self.iter().collect()
    }
}

impl FromIterator<FieldPath> for ChangedFields {
    fn from_iter<I: IntoIterator<Item = FieldPath>>(paths: I) -> Self {
        let mut fields = 0u16;
        let mut extras = Vec::new();
        for path in paths {
            match path {
                FieldPath::Field(field) => fields |= 1 << field.index(),
                FieldPath::Extra(key) => extras.push(key),
            }
        }
        extras.sort();
        extras.dedup();
        ChangedFields {
            fields,
            extras: (!extras.is_empty()).then(|| Box::new(ExtraKeys(extras.into()))),
        }
    }
}

impl From<Vec<FieldPath>> for ChangedFields {
    fn from(paths: Vec<FieldPath>) -> Self {
        paths.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{key, text, update};
    use super::*;
    use crate::profile::Scalar;

    fn change(before: Option<Profile>, after: Profile, changed: Vec<FieldPath>) -> Change {
        let (after, before) = (Arc::new(after), before.map(Arc::new));
        Change::new(2, after, before, changed.into(), Origin::Webhook)
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

    #[test]
    fn changed_fields_keep_the_sorted_lists_order_and_answer_membership() {
        let extra = |key: &str| FieldPath::Extra(key.into());
        let paths = vec![
            extra("zodiac"),
            FieldPath::Field(Field::TotalPoints),
            extra("birthday"),
            FieldPath::Field(Field::GbCustomerId),
            FieldPath::Field(Field::TierName),
        ];
        let mut sorted = paths.clone();
        sorted.sort();
        let changed = ChangedFields::from(paths);
        assert_eq!(changed.to_vec(), sorted);
        assert!(changed.contains(&FieldPath::Field(Field::TierName)));
        assert!(!changed.contains(&FieldPath::Field(Field::Email)));
        assert!(changed.contains(&extra("birthday")));
        assert!(!changed.contains(&extra("anniversary")));
        assert!(changed.heap_bytes() > 0);

        let fields_only = ChangedFields::from(vec![FieldPath::Field(Field::Email)]);
        assert_eq!(fields_only.to_vec(), vec![FieldPath::Field(Field::Email)]);
        assert!(!fields_only.contains(&extra("birthday")));
        assert_eq!(fields_only.heap_bytes(), 0, "no allocation without extras");
        assert!(ChangedFields::default().is_empty() && !fields_only.is_empty());
    }

    #[test]
    fn a_change_fits_mimalloc_s_64_byte_class_behind_its_arc() {
        assert!(std::mem::size_of::<ChangedFields>() <= 16);
        // Two reference counts and the change.
        assert!(16 + std::mem::size_of::<Change>() <= 64);
    }
}
