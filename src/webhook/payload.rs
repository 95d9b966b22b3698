//! Gameball's webhook JSON, validated into domain updates.
//!
//! Knows the payload's shape (`event`, `client_id`, `customer_id`, `gb_customer_id`,
//! `created_at`, `data`) and every rule a field must meet, and names the field when one does
//! not. Topics other than `customer.profile.updated` are recognised and left alone: their
//! `data` may be anything (an array for `customer.notification.push`). Merging and storing are
//! not done here.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::profile::{Field, FieldKind, ProfileKey, ProfileUpdate, Scalar};

/// The topic this service applies.
pub const PROFILE_UPDATED: &str = "customer.profile.updated";

/// A delivery, classified.
#[derive(Debug, PartialEq)]
pub enum Delivery {
    /// A valid `customer.profile.updated`.
    ProfileUpdated(ProfileUpdate),
    /// Another topic, acknowledged and not applied.
    Other {
        /// Its `event` name.
        event: String,
    },
}

/// Validates a parsed body.
pub fn parse(body: &Value) -> Result<Delivery, Error> {
    let body = body
        .as_object()
        .ok_or_else(|| Error::invalid("body", "must be a JSON object"))?;
    let event = required_str(body, "event")?;
    if event != PROFILE_UPDATED {
        return Ok(Delivery::Other {
            event: event.to_owned(),
        });
    }
    let client_id = required_id(body, "client_id")?;
    let customer_id = required_id(body, "customer_id")?;
    let gb_customer_id = integer(
        required(body, "gb_customer_id")?,
        "gb_customer_id",
        FieldKind::Int64,
    )?;
    let created_at = created_at(required_str(body, "created_at")?)?;
    let data = required(body, "data")?
        .as_object()
        .ok_or_else(|| Error::invalid("data", "must be a JSON object"))?;

    let mut fields = vec![(Field::GbCustomerId, Some(Scalar::Int(gb_customer_id)))];
    let mut extras = Vec::new();
    for (name, value) in data {
        match Field::from_name(name) {
            // gb_customer_id belongs at the top level; inside `data` it is just an extra.
            Some(field) if field != Field::GbCustomerId => {
                fields.push((field, scalar(value, field)?));
            }
            _ => extras.push((
                name.as_str().into(),
                (!value.is_null()).then(|| value.clone()),
            )),
        }
    }
    Ok(Delivery::ProfileUpdated(ProfileUpdate {
        key: ProfileKey::new(client_id, customer_id),
        at: created_at,
        fields,
        extras,
    }))
}

fn required<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a Value, Error> {
    match body.get(field) {
        None | Some(Value::Null) => Err(Error::invalid(field, "is required")),
        Some(value) => Ok(value),
    }
}

fn required_str<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, Error> {
    required(body, field)?
        .as_str()
        .ok_or_else(|| Error::invalid(field, "must be a string"))
}

fn required_id<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, Error> {
    let id = required_str(body, field)?;
    if id.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    Ok(id)
}

fn created_at(text: &str) -> Result<DateTime<Utc>, Error> {
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|_| {
            Error::invalid(
                "created_at",
                "must be an RFC 3339 timestamp with an offset, like 2024-11-19T17:34:42.297Z",
            )
        })
}

/// A modeled `data` field's value; JSON `null` clears the field.
fn scalar(value: &Value, field: Field) -> Result<Option<Scalar>, Error> {
    let path = || format!("data.{}", field.name());
    match (value, field.kind()) {
        (Value::Null, _) => Ok(None),
        (Value::String(text), FieldKind::Text) => Ok(Some(Scalar::Text(text.as_str().into()))),
        (_, FieldKind::Text) => Err(Error::invalid(path(), "must be a string or null")),
        (value, kind) => integer(value, &path(), kind).map(|n| Some(Scalar::Int(n))),
    }
}

fn integer(value: &Value, field: &str, kind: FieldKind) -> Result<i64, Error> {
    let (low, high, range) = match kind {
        FieldKind::Int32 => (i64::from(i32::MIN), i64::from(i32::MAX), "a 32-bit"),
        _ => (i64::MIN, i64::MAX, "a 64-bit"),
    };
    let out_of_range = || Error::invalid(field, format!("must be {range} signed integer"));
    match value {
        Value::Number(number) if number.is_i64() => number
            .as_i64()
            .filter(|n| (low..=high).contains(n))
            .ok_or_else(out_of_range),
        Value::Number(number) if number.is_u64() => Err(out_of_range()),
        Value::Number(_) => Err(Error::invalid(field, "must be an integer, not a fraction")),
        _ => Err(Error::invalid(field, "must be an integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        serde_json::from_slice(include_bytes!("../../tests/fixtures/profile-updated.json")).unwrap()
    }

    fn error_field(body: Value) -> String {
        match parse(&body) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn the_documented_example_parses() {
        let Delivery::ProfileUpdated(update) = parse(&valid()).unwrap() else {
            panic!("not a profile update");
        };
        assert_eq!(update.key, ProfileKey::new("2155", "webhook-test"));
        assert_eq!(update.at.to_rfc3339(), "2024-11-19T17:34:42.297+00:00");
        assert!(
            update
                .fields
                .contains(&(Field::TierOrder, Some(Scalar::Int(1))))
        );
        assert!(
            update
                .fields
                .contains(&(Field::GbCustomerId, Some(Scalar::Int(1234))))
        );
        assert!(update.extras.is_empty());
    }

    #[test]
    fn other_topics_are_recognised_whatever_their_data() {
        let body: Value = serde_json::from_slice(include_bytes!(
            "../../tests/fixtures/notification-push.json"
        ))
        .unwrap();
        assert_eq!(
            parse(&body).unwrap(),
            Delivery::Other {
                event: "customer.notification.push".into()
            }
        );
    }

    #[test]
    fn each_required_field_is_named_when_missing_or_mistyped() {
        for field in [
            "event",
            "client_id",
            "customer_id",
            "gb_customer_id",
            "created_at",
            "data",
        ] {
            let mut body = valid();
            body.as_object_mut().unwrap().remove(field);
            assert_eq!(error_field(body), field, "missing {field}");
            let mut body = valid();
            body[field] = json!([1]);
            assert_eq!(error_field(body), field, "mistyped {field}");
        }
    }

    #[test]
    fn values_are_checked() {
        let with = |path: &[&str], value: Value| {
            let mut body = valid();
            match path {
                [top] => body[*top] = value,
                [top, inner] => body[*top][*inner] = value,
                _ => unreachable!(),
            }
            error_field(body)
        };
        assert_eq!(with(&["client_id"], json!("")), "client_id");
        assert_eq!(with(&["customer_id"], json!("")), "customer_id");
        assert_eq!(
            with(&["created_at"], json!("2024-11-19 17:34")),
            "created_at"
        );
        assert_eq!(
            with(&["created_at"], json!("2024-11-19T17:34:42")),
            "created_at"
        );
        assert_eq!(with(&["gb_customer_id"], json!(1.5)), "gb_customer_id");
        assert_eq!(with(&["gb_customer_id"], json!(u64::MAX)), "gb_customer_id");
        assert_eq!(
            with(&["data", "tier_order"], json!(i64::from(i32::MAX) + 1)),
            "data.tier_order"
        );
        assert_eq!(
            with(&["data", "total_points"], json!("100")),
            "data.total_points"
        );
        assert_eq!(with(&["data", "email"], json!(5)), "data.email");
        assert_eq!(error_field(json!([1, 2])), "body");
    }

    #[test]
    fn null_clears_and_unknown_data_fields_become_extras() {
        let mut body = valid();
        body["data"] = json!({"email": null, "birthday": "1990-01-01", "gone": null});
        let Delivery::ProfileUpdated(update) = parse(&body).unwrap() else {
            panic!("not a profile update");
        };
        assert!(update.fields.contains(&(Field::Email, None)));
        assert_eq!(
            update.extras,
            vec![
                ("birthday".into(), Some(json!("1990-01-01"))),
                ("gone".into(), None)
            ]
        );
    }
}
