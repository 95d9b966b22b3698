//! Helpers for the profile module's unit tests.

use chrono::DateTime;

use super::{EventTime, Field, ProfileKey, ProfileUpdate, Scalar};

pub(super) fn at(second: i64) -> EventTime {
    DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap()
}

pub(super) fn key() -> ProfileKey {
    ProfileKey::new("2155", "c1")
}

pub(super) fn update(second: i64, fields: &[(Field, Option<Scalar>)]) -> ProfileUpdate {
    ProfileUpdate {
        key: key(),
        at: at(second),
        fields: fields.to_vec(),
        extras: vec![],
        origin: crate::profile::Origin::Webhook,
    }
}

pub(super) fn text(value: &str) -> Option<Scalar> {
    Some(Scalar::Text(value.into()))
}
