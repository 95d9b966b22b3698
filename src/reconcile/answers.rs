//! Gameball's API answers, read into the values a profile holds.
//!
//! The shapes are the documentation's (gameball-docs `api-reference/openapi.json`, "Gameball
//! API 4.0.0"): `/customers/{id}` and `/details` carry `customerId`, `referralCode`,
//! `referralLink` and `customerAttributes` (with `email` and `mobile` in `/details`);
//! `/balance` carries `availablePointsBalance`, `pendingPoints`, `totalPointsBalance`;
//! `/tier-progress` carries `current{order, name}`. Only those fields are read; every other
//! field is ignored, so fields Gameball adds later change nothing.
//!
//! A field that is absent, `null` or an empty string is *not given*: the reconciler leaves it
//! untouched rather than clearing it, because the documentation does not say that absence means
//! "none" (a partial answer must never erase a value a webhook delivered). A field of the wrong
//! type makes the whole answer bad, naming the field.
//!
//! Batch status answers come in two documented shapes, both read: the OpenAPI one
//! (`status: pending|processing|completed|failed`, `results[]`) and the batch tutorial's
//! (`status: queued|running|completed`, `response.successful[]`). The shape of one result is
//! not documented; a result is used when it is an object with `customerId` and at least one of
//! the balance fields above, and any customer without such a result is asked for one by one.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// Email and mobile number (`/details` `customerAttributes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contact {
    /// `customerAttributes.email`.
    pub email: Option<String>,
    /// `customerAttributes.mobile`.
    pub mobile: Option<String>,
}

/// Referral code and link (`/customers/{id}` or `/details`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Referral {
    /// `referralCode`.
    pub code: Option<String>,
    /// `referralLink`.
    pub link: Option<String>,
}

/// The current VIP tier (`/tier-progress` `current`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tier {
    /// `current.name`.
    pub name: Option<String>,
    /// `current.order`.
    pub order: Option<i64>,
}

/// Points balances (`/balance`, or one result of a balance inquiry batch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Points {
    /// `availablePointsBalance`: the webhook's `activated_points`.
    pub available: Option<i64>,
    /// `pendingPoints`.
    pub pending: Option<i64>,
    /// `totalPointsBalance`.
    pub total: Option<i64>,
}

impl Points {
    fn is_empty(&self) -> bool {
        self.available.is_none() && self.pending.is_none() && self.total.is_none()
    }
}

/// Where a batch job is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchState {
    /// Queued or processing: ask again later.
    Running,
    /// Done: its results are final.
    Completed,
    /// Gameball gave up on it.
    Failed,
}

/// A batch status answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchStatus {
    /// Where the job is.
    pub state: BatchState,
    /// The readable results so far, by customer id.
    pub results: HashMap<String, Points>,
}

/// Why an answer cannot be used: names the field (as in the answer) and why.
pub type BadAnswer = String;

/// `/customers/{id}`: the referral code and link.
pub fn customer(body: &Value, customer_id: &str) -> Result<Referral, BadAnswer> {
    let body = object(body, "answer")?;
    same_customer(body, customer_id)?;
    referral(body)
}

/// `/details`: contact and referral.
pub fn details(body: &Value, customer_id: &str) -> Result<(Contact, Referral), BadAnswer> {
    let body = object(body, "answer")?;
    same_customer(body, customer_id)?;
    let contact = match present(body.get("customerAttributes")) {
        None => Contact::default(),
        Some(attributes) => {
            let attributes = object(attributes, "customerAttributes")?;
            Contact {
                email: text(attributes, "email", "customerAttributes.email")?,
                mobile: text(attributes, "mobile", "customerAttributes.mobile")?,
            }
        }
    };
    Ok((contact, referral(body)?))
}

/// `/balance`.
pub fn balance(body: &Value) -> Result<Points, BadAnswer> {
    points(object(body, "answer")?)
}

/// `/tier-progress`: the current tier.
pub fn tier_progress(body: &Value) -> Result<Tier, BadAnswer> {
    let body = object(body, "answer")?;
    let Some(current) = present(body.get("current")) else {
        return Ok(Tier::default());
    };
    let current = object(current, "current")?;
    Ok(Tier {
        name: text(current, "name", "current.name")?,
        order: integer(
            current,
            "order",
            "current.order",
            i64::from(i32::MIN)..=i64::from(i32::MAX),
        )?,
    })
}

/// `POST /batch/balance-inquiry`: the job id (`jobId`, a number), as text for the status path.
pub fn batch_created(body: &Value) -> Result<String, BadAnswer> {
    let body = object(body, "answer")?;
    match body.get("jobId") {
        Some(Value::Number(id)) if id.is_u64() || id.is_i64() => Ok(id.to_string()),
        Some(Value::String(id)) if !id.is_empty() => Ok(id.clone()),
        _ => Err("jobId must be a number".into()),
    }
}

/// `GET /batches/{id}/status`.
pub fn batch_status(body: &Value) -> Result<BatchStatus, BadAnswer> {
    let body = object(body, "answer")?;
    let state = match body.get("status").and_then(Value::as_str) {
        Some("pending" | "queued" | "processing" | "running") => BatchState::Running,
        Some("completed") => BatchState::Completed,
        Some("failed") => BatchState::Failed,
        Some(other) => return Err(format!("status {other:?} is not a documented batch status")),
        None => return Err("status must be a string".into()),
    };
    let successful = body
        .get("response")
        .and_then(|response| response.get("successful"));
    let items = [body.get("results"), successful]
        .into_iter()
        .flatten()
        .filter_map(Value::as_array)
        .flatten();
    let mut results = HashMap::new();
    for item in items {
        let Some(item) = item.as_object() else {
            continue;
        };
        let Some(customer_id) = item.get("customerId").and_then(Value::as_str) else {
            continue;
        };
        // A result of an undocumented shape is skipped (that customer is asked for alone);
        // a documented field of the wrong type is still a bad answer.
        let points = points(item)?;
        if !points.is_empty() {
            results.insert(customer_id.to_owned(), points);
        }
    }
    Ok(BatchStatus { state, results })
}

fn referral(body: &Map<String, Value>) -> Result<Referral, BadAnswer> {
    Ok(Referral {
        code: text(body, "referralCode", "referralCode")?,
        link: text(body, "referralLink", "referralLink")?,
    })
}

fn points(body: &Map<String, Value>) -> Result<Points, BadAnswer> {
    Ok(Points {
        available: integer(body, "availablePointsBalance", "availablePointsBalance", ..)?,
        pending: integer(body, "pendingPoints", "pendingPoints", ..)?,
        total: integer(body, "totalPointsBalance", "totalPointsBalance", ..)?,
    })
}

/// An answer about another customer than the one asked for is not used (ids compare exactly).
fn same_customer(body: &Map<String, Value>, customer_id: &str) -> Result<(), BadAnswer> {
    match present(body.get("customerId")) {
        None => Ok(()),
        Some(Value::String(id)) if id == customer_id => Ok(()),
        Some(Value::String(_)) => Err("customerId is not the customer asked for".into()),
        Some(_) => Err("customerId must be a string".into()),
    }
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, BadAnswer> {
    value
        .as_object()
        .ok_or_else(|| format!("{path} must be a json object"))
}

/// The value unless it is absent or null.
fn present(value: Option<&Value>) -> Option<&Value> {
    value.filter(|value| !value.is_null())
}

/// The longest text a field of an answer may hold. Gameball's (e-mail, mobile, tier name,
/// referral code and link) are short, and a webhook's whole body is at most `--max-body-bytes`
/// (64 KiB by default): megabytes taken from an answer made a profile no gRPC message could
/// carry, and every page and watch of its account failed.
pub const MAX_TEXT_BYTES: usize = 8 * 1024;

fn text(body: &Map<String, Value>, key: &str, path: &str) -> Result<Option<String>, BadAnswer> {
    match present(body.get(key)) {
        None => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        Some(Value::String(text)) if text.len() > MAX_TEXT_BYTES => Err(format!(
            "{path} is {} bytes, more than the {MAX_TEXT_BYTES} a field takes",
            text.len()
        )),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(format!("{path} must be a string")),
    }
}

/// A documented "number" that must hold a whole value in `range` (`1500` or `1500.0`).
fn integer(
    body: &Map<String, Value>,
    key: &str,
    path: &str,
    range: impl std::ops::RangeBounds<i64>,
) -> Result<Option<i64>, BadAnswer> {
    let Some(value) = present(body.get(key)) else {
        return Ok(None);
    };
    let number = value
        .as_number()
        .ok_or_else(|| format!("{path} must be a number"))?;
    let out_of_range = || format!("{path} is out of range");
    let whole = match (number.as_i64(), number.as_f64()) {
        (Some(whole), _) => Some(whole),
        // Past i64 (u64, or a whole float beyond): whole, and out of range; called "not a
        // whole number" before (found by an adversarial run).
        (None, _) if number.is_u64() => return Err(out_of_range()),
        // Exactly representable and whole: 2^63 is excluded by the strict upper bound.
        (None, Some(float)) if float.fract() == 0.0 && float.abs() < 9.2e18 => Some(float as i64),
        (None, Some(float)) if float.fract() == 0.0 => return Err(out_of_range()),
        _ => None,
    };
    match whole {
        Some(whole) if range.contains(&whole) => Ok(Some(whole)),
        Some(_) => Err(out_of_range()),
        None => Err(format!("{path} must be a whole number")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_documented_examples_read() {
        // /balance and /tier-progress: the examples of openapi.json, verbatim.
        let balance_example = json!({
            "totalPointsBalance": 1500, "totalPointsValue": 75.0,
            "availablePointsBalance": 1200, "availablePointsValue": 60.0,
            "pendingPoints": 300, "pendingPointsValue": 15.0, "currency": "USD",
            "pointsName": "Reward Points", "nextExpiringPointsAmount": 200,
            "nextExpiringPointsValue": 10.0, "nextExpiringPointsDate": "2024-12-01T00:00:00",
            "totalEarnedPoints": 2500
        });
        assert_eq!(
            balance(&balance_example).unwrap(),
            Points {
                available: Some(1200),
                pending: Some(300),
                total: Some(1500)
            }
        );
        let tier_example = json!({
            "current": {"order": 1, "name": "Basic", "minProgress": 0,
                        "icon": "https://cdn.gameball.co/uploads/gb-library/levels-icons/level-a1.webp"},
            "next": {"order": 2, "name": "Gold", "minProgress": 190, "icon": "https://x/y.webp"},
            "progress": 50
        });
        assert_eq!(
            tier_progress(&tier_example).unwrap(),
            Tier {
                name: Some("Basic".into()),
                order: Some(1)
            }
        );
        let details_answer = json!({
            "customerId": "c-1", "gameballId": 99,
            "customerAttributes": {"displayName": "Jo", "email": "jo@example.com",
                                   "mobile": "+20100", "custom": {"a": 1}},
            "referralCode": "REF1", "referralLink": "https://example.com/r/REF1",
            "isReferred": false
        });
        let (contact, referral) = details(&details_answer, "c-1").unwrap();
        assert_eq!(contact.email.as_deref(), Some("jo@example.com"));
        assert_eq!(contact.mobile.as_deref(), Some("+20100"));
        assert_eq!(referral.code.as_deref(), Some("REF1"));
        assert_eq!(customer(&details_answer, "c-1").unwrap(), referral);
    }

    #[test]
    fn absent_null_and_empty_fields_are_not_given() {
        let (contact, referral) = details(
            &json!({"customerAttributes": {"email": null, "mobile": ""}, "referralCode": null}),
            "c-1",
        )
        .unwrap();
        assert_eq!(contact, Contact::default());
        assert_eq!(referral, Referral::default());
        assert_eq!(
            tier_progress(&json!({"current": null})).unwrap(),
            Tier::default()
        );
        assert_eq!(balance(&json!({})).unwrap(), Points::default());
        assert_eq!(
            balance(&json!({"pendingPoints": 5.0})).unwrap().pending,
            Some(5),
            "a whole number written as a float"
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let cases = [
            (
                balance(&json!({"pendingPoints": "5"})).unwrap_err(),
                "pendingPoints must be a number",
            ),
            (
                balance(&json!({"totalPointsBalance": 1.5})).unwrap_err(),
                "totalPointsBalance must be a whole",
            ),
            (
                balance(&json!([1])).unwrap_err(),
                "answer must be a json object",
            ),
            (
                tier_progress(&json!({"current": {"order": 4_000_000_000_i64}})).unwrap_err(),
                "current.order is out of range",
            ),
            // Whole numbers past i64, as an integer or written as a float.
            (
                balance(&json!({"totalPointsBalance": u64::MAX})).unwrap_err(),
                "totalPointsBalance is out of range",
            ),
            (
                balance(&json!({"totalPointsBalance": -1e19})).unwrap_err(),
                "totalPointsBalance is out of range",
            ),
            (
                tier_progress(&json!({"current": {"name": 3}})).unwrap_err(),
                "current.name must be",
            ),
            (
                details(&json!({"customerAttributes": {"email": 1}}), "c").unwrap_err(),
                "customerAttributes.email must be a string",
            ),
            (
                details(&json!({"customerId": "someone-else"}), "c").unwrap_err(),
                "customerId is not the customer asked for",
            ),
            (
                batch_created(&json!({})).unwrap_err(),
                "jobId must be a number",
            ),
            (
                batch_status(&json!({"status": "exploded"})).unwrap_err(),
                "not a documented",
            ),
        ];
        for (error, wanted) in cases {
            assert!(error.contains(wanted), "{error:?} lacks {wanted:?}");
        }
        assert!(
            !details(&json!({"customerId": "someone-else"}), "c")
                .unwrap_err()
                .contains("someone")
        );
    }

    #[test]
    fn batch_statuses_of_both_documented_shapes_read() {
        let openapi = json!({
            "batchId": "17", "status": "completed", "progress": 100, "totalItems": 3,
            "processedItems": 3, "failedItems": 1,
            "results": [
                {"customerId": "a", "availablePointsBalance": 10, "pendingPoints": 0, "totalPointsBalance": 10},
                {"customerId": "b", "somethingElse": true},
                "not an object"
            ],
            "errors": [{"customerId": "c", "message": "Customer not found"}]
        });
        let status = batch_status(&openapi).unwrap();
        assert_eq!(status.state, BatchState::Completed);
        assert_eq!(
            status.results.len(),
            1,
            "b has no balance, c failed: both asked alone"
        );
        assert_eq!(status.results["a"].available, Some(10));
        assert_eq!(batch_created(&json!({"jobId": 17})).unwrap(), "17");
        assert_eq!(batch_created(&json!({"jobId": "17a"})).unwrap(), "17a");

        let tutorial = json!({
            "operation": "Balance Inquiry Batch Job", "status": "running",
            "response": {"successful": [{"customerId": "a", "totalPointsBalance": 5}], "failed": []}
        });
        let status = batch_status(&tutorial).unwrap();
        assert_eq!(status.state, BatchState::Running);
        assert_eq!(status.results["a"].total, Some(5));
        for (status, state) in [
            ("pending", BatchState::Running),
            ("queued", BatchState::Running),
            ("processing", BatchState::Running),
            ("failed", BatchState::Failed),
        ] {
            assert_eq!(
                batch_status(&json!({"status": status})).unwrap().state,
                state
            );
        }
    }
}
