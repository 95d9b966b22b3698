//! What was fetched for one customer, as a [`ProfileUpdate`] for the sequencer, and how far the
//! stored profile drifted from it.
//!
//! The update's clock is the fetch time: the send time of the *oldest* request whose answer it
//! uses, less a small margin for clock skew between this host and Gameball (whose clock stamps
//! the webhooks' `created_at`). An answer reflects the customer at some moment after its request
//! was sent, so this clock is never later than the truth it carries: a webhook created after the
//! fetch still wins, an older one still loses, by the merge rules every webhook goes through.
//!
//! Only the fields the API gave are in the update (see `answers`): a field it did not give is
//! left untouched, never cleared. `gb_customer_id` is not written either: every webhook carries
//! it, it never changes, and the documentation does not say that `gameballId` is the same
//! number. This module does no I/O.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::answers::{Contact, Points, Referral, Tier};
use crate::profile::{Field, FieldPath, Origin, Profile, ProfileKey, ProfileUpdate, Scalar};

/// Everything fetched for one customer.
#[derive(Clone, Debug, PartialEq)]
pub struct Fetched {
    /// The customer.
    pub customer_id: String,
    /// From `/details` (absent when contact fields are not read).
    pub contact: Option<Contact>,
    /// From `/details` or `/customers/{id}`.
    pub referral: Option<Referral>,
    /// From `/tier-progress`.
    pub tier: Option<Tier>,
    /// From `/balance` or a balance inquiry batch.
    pub points: Option<Points>,
    /// When the oldest request whose answer is used here was sent.
    pub oldest_sent_at: DateTime<Utc>,
}

impl Fetched {
    /// The update for the sequencer: the given fields, at `oldest_sent_at - clock_margin`.
    pub fn to_update(&self, client_id: &Arc<str>, clock_margin: Duration) -> ProfileUpdate {
        let margin = chrono::Duration::from_std(clock_margin).unwrap_or(chrono::Duration::MAX);
        let at = self
            .oldest_sent_at
            .checked_sub_signed(margin)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut fields = Vec::new();
        // A value with a NUL character is left out, as a webhook carrying one is refused: text
        // is journaled as it is, and runs of zero bytes in a record weaken recovery's
        // torn-write rules (`ingest::payload`).
        let mut text = |field, value: &Option<String>| {
            if let Some(value) = value.as_ref().filter(|value| !value.contains('\0')) {
                fields.push((field, Some(Scalar::Text(value.as_str().into()))));
            }
        };
        if let Some(contact) = &self.contact {
            text(Field::Email, &contact.email);
            text(Field::MobileNumber, &contact.mobile);
        }
        if let Some(tier) = &self.tier {
            text(Field::TierName, &tier.name);
        }
        if let Some(referral) = &self.referral {
            text(Field::ReferralCode, &referral.code);
            text(Field::ReferralLink, &referral.link);
        }
        let mut int = |field, value: Option<i64>| {
            if let Some(value) = value {
                fields.push((field, Some(Scalar::Int(value))));
            }
        };
        if let Some(tier) = &self.tier {
            int(Field::TierOrder, tier.order);
        }
        if let Some(points) = &self.points {
            int(Field::ActivatedPoints, points.available);
            int(Field::PendingPoints, points.pending);
            int(Field::TotalPoints, points.total);
        }
        fields.sort_by_key(|(field, _)| *field);
        ProfileUpdate {
            key: ProfileKey::new(Arc::clone(client_id), self.customer_id.as_str()),
            at,
            fields,
            extras: Vec::new(),
            origin: Origin::Reconcile,
        }
    }
}

/// The fields whose visible value `update` would change in `current` (every field it carries
/// when there is no profile yet), by the same merge the sequencer runs: a field whose stored
/// value is newer than the fetch is not drift, since the update would lose.
///
/// An empty answer means the stored profile already matches the source. Jobs apply the update
/// anyway (it pins the fields' clocks at the fetch time) and count it as unchanged.
pub fn drift(current: Option<&Profile>, update: &ProfileUpdate) -> Vec<Field> {
    let mut merged = current
        .cloned()
        .unwrap_or_else(|| Profile::empty(update.key.clone()));
    let changed = merged.merge(update).unwrap_or_default();
    changed
        .into_iter()
        .filter_map(|path| match path {
            FieldPath::Field(field) => Some(field),
            FieldPath::Extra(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(at: DateTime<Utc>) -> Fetched {
        Fetched {
            customer_id: "c-1".into(),
            contact: Some(Contact {
                email: Some("jo@example.com".into()),
                mobile: None,
            }),
            referral: Some(Referral {
                code: Some("REF1".into()),
                link: Some("https://example.com/r".into()),
            }),
            tier: Some(Tier {
                name: Some("Gold".into()),
                order: Some(2),
            }),
            points: Some(Points {
                available: Some(90),
                pending: Some(10),
                total: Some(100),
            }),
            oldest_sent_at: at,
        }
    }

    fn time(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn the_update_carries_the_given_fields_at_the_fetch_time_less_the_margin() {
        let client: Arc<str> = "2155".into();
        let update =
            fetched(time("2026-01-01T00:00:10Z")).to_update(&client, Duration::from_secs(1));
        assert_eq!(update.key, ProfileKey::new("2155", "c-1"));
        assert_eq!(update.at, time("2026-01-01T00:00:09Z"));
        let text = |value: &str| Some(Scalar::Text(value.into()));
        assert_eq!(
            update.fields,
            vec![
                (Field::Email, text("jo@example.com")),
                (Field::TierName, text("Gold")),
                (Field::TierOrder, Some(Scalar::Int(2))),
                (Field::ReferralCode, text("REF1")),
                (Field::ReferralLink, text("https://example.com/r")),
                (Field::ActivatedPoints, Some(Scalar::Int(90))),
                (Field::PendingPoints, Some(Scalar::Int(10))),
                (Field::TotalPoints, Some(Scalar::Int(100))),
            ],
            "mobile (not given) and gb_customer_id are left out, not cleared"
        );
        assert!(update.extras.is_empty());

        let mut bare = fetched(time("2026-01-01T00:00:10Z"));
        bare.contact = None;
        bare.points = None;
        let update = bare.to_update(&client, Duration::ZERO);
        assert!(
            update
                .fields
                .iter()
                .all(|(field, _)| !field.is_points() && *field != Field::Email)
        );
    }

    #[test]
    fn a_text_value_with_a_nul_character_is_left_out() {
        let client: Arc<str> = "2155".into();
        let mut nul = fetched(time("2026-01-01T00:00:10Z"));
        nul.tier.as_mut().unwrap().name = Some(format!("Gold{}", "\0".repeat(40)));
        let update = nul.to_update(&client, Duration::ZERO);
        assert!(
            update
                .fields
                .iter()
                .all(|(field, _)| *field != Field::TierName)
        );
        assert!(
            update
                .fields
                .iter()
                .any(|(field, _)| *field == Field::Email)
        );
    }

    #[test]
    fn drift_is_what_the_merge_would_change() {
        let client: Arc<str> = "2155".into();
        let update = fetched(time("2026-01-01T00:01:00Z")).to_update(&client, Duration::ZERO);
        assert_eq!(
            drift(None, &update).len(),
            8,
            "a new profile: every given field"
        );

        let mut profile = Profile::empty(update.key.clone());
        profile.merge(&update);
        assert!(
            drift(Some(&profile), &update).is_empty(),
            "same values: no drift"
        );

        // A lost webhook left the points wrong, and an older one the tier.
        let mut stale = update.clone();
        stale.at = time("2026-01-01T00:00:00Z");
        stale.fields = vec![
            (Field::TotalPoints, Some(Scalar::Int(40))),
            (Field::TierOrder, Some(Scalar::Int(1))),
        ];
        let mut wrong = Profile::empty(update.key.clone());
        wrong.merge(&stale);
        let drifted = drift(Some(&wrong), &update);
        assert!(drifted.contains(&Field::TotalPoints) && drifted.contains(&Field::TierOrder));

        // A webhook newer than the fetch is not drift: the fetch would lose.
        let mut newer = stale.clone();
        newer.at = time("2026-01-01T00:02:00Z");
        let mut ahead = Profile::empty(update.key.clone());
        ahead.merge(&update);
        ahead.merge(&newer);
        let drifted = drift(Some(&ahead), &update);
        assert!(!drifted.contains(&Field::TotalPoints) && !drifted.contains(&Field::TierOrder));
    }
}
