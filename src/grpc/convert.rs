//! Domain values to protobuf messages. Pure functions, no I/O.

use std::collections::BTreeMap;

use prost_types::value::Kind;

use crate::pb;
use chrono::{DateTime, Utc};

use crate::profile::{Change, ChangeKind, Field, Origin, Profile, TierDirection, time};
use crate::status;
use crate::watch::WatchEvent;

/// A profile as the API shows it.
pub fn profile(profile: &Profile) -> pb::Profile {
    // One pass over the packed registers for all ten fields.
    let values = profile.values();
    let text = |field| values.text(field).map(str::to_owned);
    let int = |field| values.int(field);
    pb::Profile {
        client_id: profile.key.client_id.to_string(),
        customer_id: profile.key.customer_id.to_string(),
        gb_customer_id: int(Field::GbCustomerId).unwrap_or_default(),
        email: text(Field::Email),
        mobile_number: text(Field::MobileNumber),
        tier_name: text(Field::TierName),
        // The webhook adapter only lets i32-range values into this field.
        tier_order: int(Field::TierOrder).and_then(|order| i32::try_from(order).ok()),
        referral_code: text(Field::ReferralCode),
        referral_link: text(Field::ReferralLink),
        activated_points: int(Field::ActivatedPoints),
        pending_points: int(Field::PendingPoints),
        total_points: int(Field::TotalPoints),
        extra: extra(profile),
        updated_at: profile.updated_at().map(timestamp),
        revision: profile.revision,
        create_revision: profile.create_revision,
        version: profile.version,
    }
}

/// A profile's extra attributes as `Profile.extra`; `None` when it has none.
pub(super) fn extra(profile: &Profile) -> Option<prost_types::Struct> {
    let fields = profile
        .extras()
        .map(|(key, value)| (key.to_owned(), json_value(value)))
        .collect::<BTreeMap<_, _>>();
    (!fields.is_empty()).then(|| prost_types::Struct {
        fields: fields.into_iter().collect(),
    })
}

/// The one converter from a time to the `google.protobuf.Timestamp` the API emits: always a
/// valid one (`profile::time::servable`), for every time the service holds.
pub(crate) fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    let (seconds, nanos) = time::servable(at);
    prost_types::Timestamp {
        seconds,
        nanos: i32::try_from(nanos).expect("servable nanoseconds are below 10^9"),
    }
}

/// JSON to `google.protobuf.Value`; numbers become doubles, as Struct requires.
fn json_value(value: &serde_json::Value) -> prost_types::Value {
    use serde_json::Value as Json;
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(flag) => Kind::BoolValue(*flag),
        Json::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(f64::NAN)),
        Json::String(text) => Kind::StringValue(text.clone()),
        Json::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_value).collect(),
        }),
        Json::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map
                .iter()
                .map(|(key, value)| (key.clone(), json_value(value)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A change as a stream message.
pub fn change(change: &Change, include_previous: bool) -> pb::ProfileChange {
    let kind = match change.kind() {
        ChangeKind::Created => pb::ChangeType::Created,
        ChangeKind::Updated => pb::ChangeType::Updated,
    };
    pb::ProfileChange {
        r#type: kind.into(),
        profile: Some(profile(&change.profile)),
        previous: change
            .previous
            .as_deref()
            .filter(|_| include_previous)
            .map(profile),
        changed_fields: change
            .changed_fields
            .iter()
            .map(|path| path.to_string())
            .collect(),
        revision: change.revision,
        tier_change: change.tier_change().map(|tier| pb::TierChange {
            from_name: tier.from_name.unwrap_or_default(),
            from_order: tier
                .from_order
                .and_then(|o| i32::try_from(o).ok())
                .unwrap_or(0),
            to_name: tier.to_name.unwrap_or_default(),
            to_order: tier
                .to_order
                .and_then(|o| i32::try_from(o).ok())
                .unwrap_or(0),
            direction: match tier.direction {
                TierDirection::Unknown => pb::TierDirection::Unspecified,
                TierDirection::Up => pb::TierDirection::Up,
                TierDirection::Down => pb::TierDirection::Down,
                TierDirection::SameOrder => pb::TierDirection::SameOrder,
            }
            .into(),
        }),
        points_delta: change.points_delta().map(|delta| pb::PointsDelta {
            activated: delta.activated,
            pending: delta.pending,
            total: delta.total,
        }),
        origin: match change.origin {
            Origin::Webhook => pb::ChangeOrigin::Webhook,
            Origin::Reconcile => pb::ChangeOrigin::Reconcile,
        }
        .into(),
    }
}

/// A change as a whole stream message.
pub fn watch_change(changed: &Change, include_previous: bool) -> pb::WatchProfilesResponse {
    use pb::watch_profiles_response::Event;
    pb::WatchProfilesResponse {
        event: Some(Event::Change(change(changed, include_previous))),
    }
}

/// A watch event as a stream item; `End` becomes the stream's final status.
pub fn watch_event(
    event: WatchEvent,
    include_previous: bool,
    store_id: &str,
) -> Result<pb::WatchProfilesResponse, tonic::Status> {
    use pb::watch_profiles_response::Event;
    let event = match event {
        WatchEvent::Existing(existing) => Event::Change(pb::ProfileChange {
            r#type: pb::ChangeType::Existing.into(),
            revision: existing.revision,
            profile: Some(profile(&existing)),
            ..Default::default()
        }),
        WatchEvent::Change(changed) => Event::Change(change(&changed, include_previous)),
        WatchEvent::Synced { revision } => Event::Synced(pb::Synced {
            revision,
            store_id: store_id.to_owned(),
        }),
        WatchEvent::Progress { revision } => Event::Progress(pb::Progress { revision }),
        WatchEvent::Reset {
            reason, revision, ..
        } => Event::Reset(pb::Reset {
            reason,
            revision,
            store_id: store_id.to_owned(),
        }),
        WatchEvent::End(error) => return Err(status::grpc_status(&error)),
    };
    Ok(pb::WatchProfilesResponse { event: Some(event) })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::profile::{ProfileKey, Register, Scalar};

    /// Any time chrono holds, leap seconds (nanoseconds up to 2 * 10^9 - 1) included, with
    /// the edges of the Timestamp range (years 1 and 9999) drawn often.
    fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
        let min = DateTime::<Utc>::MIN_UTC.timestamp();
        let max = DateTime::<Utc>::MAX_UTC.timestamp();
        let edge = |seconds: i64| seconds - 2..seconds + 2;
        prop_oneof![
            (min..=max, 0u32..2_000_000_000),
            (edge(time::EARLIEST_SECONDS), 0u32..2_000_000_000),
            (edge(time::LATEST_SECONDS), 0u32..2_000_000_000),
        ]
        .prop_filter_map("not a time chrono holds", |(seconds, nanos)| {
            DateTime::from_timestamp(seconds, nanos)
        })
    }

    fn valid(timestamp: &prost_types::Timestamp) -> bool {
        (time::EARLIEST_SECONDS..=time::LATEST_SECONDS).contains(&timestamp.seconds)
            && (0..1_000_000_000).contains(&timestamp.nanos)
    }

    proptest! {
        #[test]
        fn every_timestamp_the_api_emits_is_valid(at in any_time(), other in any_time()) {
            prop_assert!(valid(&timestamp(at)), "{at:?}");
            // A profile whose registers hold such times (as a journal written before the rule
            // may have them) is served with a valid updated_at.
            let register = |at| Register { value: Some(Scalar::Int(1)), at };
            let stored = Profile::from_registers(
                ProfileKey::new("2155", "c"),
                [(Field::TotalPoints, register(at)), (Field::TierOrder, register(other))],
                [],
                1,
                1,
                1,
            );
            let served = super::profile(&stored).updated_at.expect("an updated_at");
            prop_assert!(valid(&served), "{served:?}");
        }
    }
}
