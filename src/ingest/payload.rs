//! Gameball's webhook JSON, validated into domain updates.
//!
//! Knows the payload's shape (`event`, `client_id`, `customer_id`, `gb_customer_id`,
//! `created_at`, `data`) and every rule a field must meet, and names the field when one does
//! not. Topics other than `customer.profile.updated` are recognised and left alone: their
//! `data` may be anything (an array for `customer.notification.push`). Merging and storing are
//! not done here.
//!
//! A body is read one of two ways, held to the same rules by the same code (the `Json`
//! trait): [`Envelope::read`] deserializes the raw bytes in one pass into the six fields,
//! borrowing text from the body (the webhook's way, and the cheap one), and [`parse`] takes a
//! `serde_json::Value` (dead-letter replay, and every body the one pass declines: not JSON,
//! not an object, a repeated key). Both give the same answer for every body the one pass takes.
//!
//! Over 700 lines with its tests (about 260 of them): the rules and the one-pass reader are
//! one concept, and the tests that hold both to the same answers sit beside them.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::Error;
use crate::profile::{
    EventTime, Field, FieldKind, MAX_CLIENT_ID_BYTES, MAX_CUSTOMER_ID_BYTES, Origin, ProfileKey,
    ProfileUpdate, Scalar, time,
};

/// The topic this service applies.
pub const PROFILE_UPDATED: &str = "customer.profile.updated";

/// At most this many `data` keys are read in one pass; a larger `data` goes through a `Value`
/// (the one pass finds repeated keys by a linear scan, which must stay short).
const MAX_DATA_KEYS: usize = 64;

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
    let fields = Fields {
        event: body.get("event"),
        client_id: body.get("client_id"),
        customer_id: body.get("customer_id"),
        gb_customer_id: body.get("gb_customer_id"),
        created_at: body.get("created_at"),
        data: body.get("data"),
    };
    classify(fields, |data| {
        data.as_object()
            .map(|data| data.iter().map(|(name, value)| (name.as_str(), value)))
    })
}

/// A body's six fields, read in one pass over its bytes: what [`Envelope::validate`] needs and
/// nothing else (other top-level keys are checked as JSON and dropped).
#[derive(Debug, Default)]
pub struct Envelope<'a> {
    event: Option<Lite<'a>>,
    client_id: Option<Lite<'a>>,
    customer_id: Option<Lite<'a>>,
    gb_customer_id: Option<Lite<'a>>,
    created_at: Option<Lite<'a>>,
    data: Option<Lite<'a>>,
}

impl<'a> Envelope<'a> {
    /// Reads a body that is one JSON object with each of the six fields at most once, and at
    /// most `MAX_DATA_KEYS` distinct keys in an object `data`. `None` for anything else
    /// (including JSON that [`parse`] would refuse or read differently), which the caller then
    /// parses into a `Value`.
    pub fn read(raw: &'a [u8]) -> Option<Envelope<'a>> {
        // JSON is UTF-8 (RFC 8259), and a body that is not is refused by either reading. Checked
        // once here, serde_json then reads each string without checking it again (reading
        // from bytes, that was a fifth of this function's instructions); a body that fails
        // goes to the caller's `Value` parse, which refuses it as before.
        let text = std::str::from_utf8(raw).ok()?;
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let envelope = deserializer.deserialize_map(EnvelopeVisitor).ok()?;
        deserializer.end().ok()?;
        Some(envelope)
    }

    /// The `client_id`, if it is a string: which secrets may have signed the body.
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_ref().and_then(Lite::as_str)
    }

    /// Validates the body by the same rules as [`parse`], with the same answer.
    pub fn validate(&self) -> Result<Delivery, Error> {
        let fields = Fields {
            event: self.event.as_ref(),
            client_id: self.client_id.as_ref(),
            customer_id: self.customer_id.as_ref(),
            gb_customer_id: self.gb_customer_id.as_ref(),
            created_at: self.created_at.as_ref(),
            data: self.data.as_ref(),
        };
        classify(fields, |data| match data {
            Lite::Object(entries) => Some(entries.iter().map(|(name, value)| (&**name, value))),
            _ => None,
        })
    }
}

/// What the rules need to know of a JSON value, so that a `Value` and a [`Lite`] are judged
/// by the same code.
trait Json {
    fn is_null(&self) -> bool;
    fn as_str(&self) -> Option<&str>;
    fn as_number(&self) -> Option<&Number>;
    /// The value as a `serde_json::Value`, for an unmodeled `data` key.
    fn to_value(&self) -> Value;
}

impl Json for Value {
    fn is_null(&self) -> bool {
        Value::is_null(self)
    }
    fn as_str(&self) -> Option<&str> {
        Value::as_str(self)
    }
    fn as_number(&self) -> Option<&Number> {
        match self {
            Value::Number(number) => Some(number),
            _ => None,
        }
    }
    fn to_value(&self) -> Value {
        self.clone()
    }
}

/// A body's top-level fields, however the body was read.
struct Fields<'j, J> {
    event: Option<&'j J>,
    client_id: Option<&'j J>,
    customer_id: Option<&'j J>,
    gb_customer_id: Option<&'j J>,
    created_at: Option<&'j J>,
    data: Option<&'j J>,
}

/// Every rule, in the order they are checked: the first broken one is the answer. `entries`
/// gives the keys and values of `data` in order when it is an object.
fn classify<'j, J, E>(
    body: Fields<'j, J>,
    entries: impl FnOnce(&'j J) -> Option<E>,
) -> Result<Delivery, Error>
where
    J: Json,
    E: Iterator<Item = (&'j str, &'j J)>,
{
    let event = required_str(body.event, "event")?;
    if event != PROFILE_UPDATED {
        return Ok(Delivery::Other {
            event: event.to_owned(),
        });
    }
    let client_id = required_id(body.client_id, "client_id", MAX_CLIENT_ID_BYTES)?;
    let customer_id = required_id(body.customer_id, "customer_id", MAX_CUSTOMER_ID_BYTES)?;
    let gb_customer_id = integer(
        required(body.gb_customer_id, "gb_customer_id")?,
        || "gb_customer_id",
        FieldKind::Int64,
    )?;
    let created_at = created_at(required_str(body.created_at, "created_at")?)?;
    let data = entries(required(body.data, "data")?)
        .ok_or_else(|| Error::invalid("data", "must be a JSON object"))?;

    // Sized once (growing it from one entry reallocated it three times for a usual body), for
    // at most every modeled field: the rest of a large `data` are extras.
    let mut fields = Vec::with_capacity(1 + data.size_hint().0.min(Field::ALL.len()));
    fields.push((Field::GbCustomerId, Some(Scalar::Int(gb_customer_id))));
    let mut extras = Vec::new();
    for (name, value) in data {
        if name.contains('\0') {
            return Err(Error::invalid("data", NUL_KEY));
        }
        match Field::from_name(name) {
            // gb_customer_id belongs at the top level; inside `data` it is just an extra.
            Some(field) if field != Field::GbCustomerId => {
                fields.push((field, scalar(value, field)?));
            }
            _ => {
                let value = (!value.is_null()).then(|| value.to_value());
                if let Some(value) = &value {
                    check_nesting(name, value)?;
                }
                extras.push((name.into(), value));
            }
        }
    }
    Ok(Delivery::ProfileUpdated(ProfileUpdate {
        key: ProfileKey::new(client_id, customer_id),
        at: created_at,
        fields,
        extras,
        origin: Origin::Webhook,
    }))
}

fn required<'j, J: Json>(value: Option<&'j J>, field: &str) -> Result<&'j J, Error> {
    match value {
        Some(value) if !value.is_null() => Ok(value),
        _ => Err(Error::invalid(field, "is required")),
    }
}

fn required_str<'j, J: Json>(value: Option<&'j J>, field: &str) -> Result<&'j str, Error> {
    required(value, field)?
        .as_str()
        .ok_or_else(|| Error::invalid(field, "must be a string"))
}

/// A profile's id: a non-empty string without NUL of at most `max_bytes`. Longer ids were
/// applied, then no watch could name their account or customer (found by an adversarial run).
fn required_id<'j, J: Json>(
    value: Option<&'j J>,
    field: &str,
    max_bytes: usize,
) -> Result<&'j str, Error> {
    let id = required_str(value, field)?;
    if id.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if id.len() > max_bytes {
        let reason = format!(
            "at most {max_bytes} bytes (what a watch may name), got {}",
            id.len()
        );
        return Err(Error::invalid(field, reason));
    }
    without_nul(id, || field)
}

/// `text` if it has no NUL character (`\u0000`): no customer's name, e-mail or id has one,
/// and text kept as it is in the journal must not carry runs of zero bytes, which recovery's
/// torn-write rules read as a disk sector that was never written (a NUL-filled value in the
/// last record could then excuse a flipped bit in it, and an acknowledged update be cut off).
fn without_nul<F: Into<String>>(text: &str, field: impl FnOnce() -> F) -> Result<&str, Error> {
    match text.contains('\0') {
        true => Err(Error::invalid(field(), NUL_VALUE)),
        false => Ok(text),
    }
}

const NUL_VALUE: &str = "must not contain a NUL character (\\u0000)";
const NUL_KEY: &str = "a key contains a NUL character (\\u0000)";

/// How deeply an extra's value may nest objects and arrays. Served as a protobuf `Struct`,
/// each level of an object costs three levels of messages, and the C++, Java and Python
/// decoders (and prost) refuse more than 100: a value of 33 levels, accepted, made its
/// profile unreadable for them in every read and watch of its account. 20 leaves room for the
/// messages around it (a watch's change holds the profile, `include_previous` a second one).
pub const MAX_EXTRA_NESTING: usize = 20;

/// Refuses an extra whose value nests deeper than [`MAX_EXTRA_NESTING`], naming its key.
fn check_nesting(key: &str, value: &Value) -> Result<(), Error> {
    match nesting(value, MAX_EXTRA_NESTING + 1) <= MAX_EXTRA_NESTING {
        true => Ok(()),
        false => Err(extra_too_deep(key)),
    }
}

/// The refusal of the extra `key` for nesting past [`MAX_EXTRA_NESTING`].
fn extra_too_deep(key: &str) -> Error {
    let key: String = key.chars().take(64).collect();
    Error::invalid(
        "data",
        format!(
            "the value of {key:?} nests objects and arrays more than {MAX_EXTRA_NESTING} levels \
             deep, more than gRPC clients decode"
        ),
    )
}

/// The refusal of a body serde_json would not read for nesting to its limit (128 levels; 127
/// are read):
/// it said "not JSON: recursion limit exceeded", field `body`, of valid JSON, where a `data`
/// value 21 levels deep is told its key (found by an adversarial run). `None` when `err` is
/// another error. The key is found by [`too_deep_at`]; a value of `data` is refused as
/// [`check_nesting`] refuses one 21 levels deep, one outside it (a key the service does not
/// read) for the body.
pub fn too_deep(raw: &[u8], err: &serde_json::Error) -> Option<Error> {
    if !err.to_string().starts_with("recursion limit exceeded") {
        return None;
    }
    let error = match too_deep_at(raw) {
        [Some(top), Some(key)] if top == "data" => extra_too_deep(&key),
        [Some(top), _] if top == "data" => Error::invalid(
            "data",
            format!("nests objects and arrays more than {MAX_EXTRA_NESTING} levels deep"),
        ),
        [Some(top), _] => {
            let top: String = top.chars().take(64).collect();
            Error::invalid(
                "body",
                format!(
                    "the value of {top:?} nests objects and arrays deeper than this service \
                     reads (at most 127 levels, the body's own included)"
                ),
            )
        }
        [None, _] => Error::invalid(
            "body",
            "nests objects and arrays deeper than this service reads (at most 127 levels)",
        ),
    };
    Some(error)
}

/// The key at the top of the body, and the key within that one's object, whose value is the
/// first to nest past serde_json's limit: a scan of the bytes, which serde_json would not
/// read. A key is decoded as JSON (escapes), else taken as it is.
fn too_deep_at(raw: &[u8]) -> [Option<String>; 2] {
    const LIMIT: usize = 127;
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let (mut string_start, mut last_string) = (0, None::<&[u8]>);
    let mut keys: [Option<&[u8]>; 2] = [None, None];
    for (at, &byte) in raw.iter().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => {
                    in_string = false;
                    last_string = Some(&raw[string_start..=at]);
                }
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => (in_string, string_start) = (true, at),
            b':' if (1..=2).contains(&depth) => keys[depth - 1] = last_string,
            b'{' | b'[' => {
                depth += 1;
                if depth > LIMIT {
                    break;
                }
                if depth <= 2 {
                    keys[depth - 1..].fill(None);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    keys.map(|key| {
        key.map(|quoted| {
            serde_json::from_slice(quoted)
                .unwrap_or_else(|_| String::from_utf8_lossy(quoted).into_owned())
        })
    })
}

/// Why a number past the double range is refused, for a field that is not a modeled integer.
const BEYOND_DOUBLE: &str =
    "out of range: a number beyond ±1.8e308, more than a 64-bit float holds";

/// The refusal of a body serde_json would not read for a number past the double range (`1e400`,
/// 400 digits): it said "not JSON: number out of range", field `body`, of valid JSON (RFC 8259
/// leaves the range to implementations), where `1e30` in the same field is told its field
/// (found by an adversarial run). `None` when `err` is another error. The number is found by
/// [`out_of_range_at`] and named by where it is: a modeled integer (or `gb_customer_id`) as
/// any integer out of its range is, another `data` key (an extra, or a text field) as
/// `data.<key>`, one of the envelope's fields by its name, and a key the service does not read
/// for the body (as [`too_deep`] does), the key in the message.
pub fn out_of_range(raw: &[u8], err: &serde_json::Error) -> Option<Error> {
    if !err.to_string().starts_with("number out of range") {
        return None;
    }
    let error = match out_of_range_at(raw) {
        [Some(top), Some(key)] if top == "data" => {
            let key: String = key.chars().take(64).collect();
            match Field::from_name(&key) {
                Some(field) if field != Field::GbCustomerId && field.kind() != FieldKind::Text => {
                    Error::invalid(format!("data.{key}"), integer_out_of_range(field.kind()))
                }
                _ => Error::invalid(format!("data.{key}"), BEYOND_DOUBLE),
            }
        }
        [Some(top), _] if top == "gb_customer_id" => {
            Error::invalid("gb_customer_id", integer_out_of_range(FieldKind::Int64))
        }
        [Some(top), _]
            if ["event", "client_id", "customer_id", "created_at", "data"].contains(&&*top) =>
        {
            Error::invalid(top, BEYOND_DOUBLE)
        }
        [Some(top), _] => {
            let top: String = top.chars().take(64).collect();
            Error::invalid("body", format!("the value of {top:?} is {BEYOND_DOUBLE}"))
        }
        [None, _] => Error::invalid("body", BEYOND_DOUBLE),
    };
    Some(error)
}

/// The key at the top of the body, and the key within that one's object, whose value holds
/// the first number literal past the double range (what serde_json stops at): a scan of the
/// bytes, which serde_json would not read. A key is decoded as JSON (escapes), else taken as
/// it is; `[None, None]` when no such number is found.
fn out_of_range_at(raw: &[u8]) -> [Option<String>; 2] {
    // Each open object or array, and for an object the last string read directly in it. The
    // bytes before the number serde_json stopped at are JSON, so that string is the key of the
    // member the scan is in: a string value is followed by a comma and the next key before
    // any object, array or number in the same object.
    let mut open: Vec<(bool, Option<&[u8]>)> = Vec::new();
    let mut at = 0;
    while let Some(&byte) = raw.get(at) {
        match byte {
            b'"' => {
                let mut end = at + 1;
                while let Some(&byte) = raw.get(end) {
                    match byte {
                        b'\\' => end += 2,
                        b'"' => break,
                        _ => end += 1,
                    }
                }
                if let Some((true, key)) = open.last_mut() {
                    *key = Some(raw.get(at..=end).unwrap_or(&raw[at..]));
                }
                at = end + 1;
                continue;
            }
            b'{' | b'[' => open.push((byte == b'{', None)),
            b'}' | b']' => {
                open.pop();
            }
            b'-' | b'0'..=b'9' => {
                let length = raw[at..]
                    .iter()
                    .take_while(|byte| {
                        matches!(byte, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                    })
                    .count();
                let literal = std::str::from_utf8(&raw[at..at + length]).unwrap_or_default();
                if literal.parse::<f64>().is_ok_and(f64::is_infinite) {
                    let key = |open: Option<&(bool, Option<&[u8]>)>| {
                        let quoted = open?.1?;
                        Some(
                            serde_json::from_slice(quoted)
                                .unwrap_or_else(|_| String::from_utf8_lossy(quoted).into_owned()),
                        )
                    };
                    return [key(open.first()), key(open.get(1))];
                }
                at += length;
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    [None, None]
}

/// How many levels of objects and arrays `value` nests (a scalar: 0), counting no further
/// than `cap`.
fn nesting(value: &Value, cap: usize) -> usize {
    let inner = |children: &mut dyn Iterator<Item = &Value>| {
        children
            .map(|child| nesting(child, cap - 1))
            .max()
            .unwrap_or(0)
    };
    match value {
        _ if cap == 0 => 0,
        Value::Array(items) => 1 + inner(&mut items.iter()),
        Value::Object(entries) => 1 + inner(&mut entries.values()),
        _ => 0,
    }
}

/// `created_at` as the service keeps it (`profile::time`): a leap second becomes the last
/// nanosecond before it; a year outside 1..=9999, which no API client could read back, is
/// refused.
fn created_at(text: &str) -> Result<EventTime, Error> {
    let out_of_range =
        |out_of_range: time::OutOfRange| Error::invalid("created_at", out_of_range.to_string());
    let at = DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|_| {
            if past_year_9999(text) {
                return out_of_range(time::OutOfRange);
            }
            Error::invalid(
                "created_at",
                "must be an RFC 3339 timestamp with an offset, like 2024-11-19T17:34:42.297Z",
            )
        })?;
    time::event_time(at).map_err(out_of_range)
}

/// Whether `text` is a well-formed timestamp but for a year of five digits or more, which RFC
/// 3339 cannot write: its problem is the range, as for year 0, not the format (a first-user
/// review got the format message for `10000-01-01T00:00:00Z`).
fn past_year_9999(text: &str) -> bool {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    // 2000 is a leap year, so a 29 February of a leap year past 9999 is judged by its format.
    digits > 4
        && !text.starts_with('0')
        && DateTime::parse_from_rfc3339(&format!("2000{}", &text[digits..])).is_ok()
}

/// A modeled `data` field's value; JSON `null` clears the field.
fn scalar<J: Json>(value: &J, field: Field) -> Result<Option<Scalar>, Error> {
    // Only an error names the field: its path is formatted then, not for every valid field.
    let path = || format!("data.{}", field.name());
    if value.is_null() {
        return Ok(None);
    }
    match (value.as_str(), field.kind()) {
        (Some(text), FieldKind::Text) => Ok(Some(Scalar::Text(without_nul(text, path)?.into()))),
        (None, FieldKind::Text) => Err(Error::invalid(path(), "must be a string or null")),
        (_, kind) => integer(value, path, kind).map(|n| Some(Scalar::Int(n))),
    }
}

fn integer<J: Json, F: Into<String>>(
    value: &J,
    field: impl Fn() -> F,
    kind: FieldKind,
) -> Result<i64, Error> {
    let (low, high) = match kind {
        FieldKind::Int32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
        _ => (i64::MIN, i64::MAX),
    };
    let out_of_range = || Error::invalid(field(), integer_out_of_range(kind));
    match value.as_number() {
        Some(number) if number.is_i64() => number
            .as_i64()
            .filter(|n| (low..=high).contains(n))
            .ok_or_else(out_of_range),
        Some(number) if number.is_u64() => Err(out_of_range()),
        // Neither i64 nor u64: serde_json read it as a float. A whole number past u64 (2^64)
        // lands here too, and is out of range, not a fraction.
        Some(number) => match number.as_f64() {
            // `-0` is an integer literal, but serde_json keeps its sign by reading it as a
            // float, so it cannot be told from `-0.0` or `0e0` here; the message names them all
            // (an adversarial run got "without a decimal point or exponent" for `-0`).
            Some(0.0) => Err(Error::invalid(
                field(),
                "must be written as the integer 0: not -0, and without a decimal point or exponent",
            )),
            Some(float) if float.fract() == 0.0 => {
                // Open bounds one past the range: for 64 bits they round to -2^63 and 2^63
                // themselves, which an integer literal just past the range also parses to.
                if float > low as f64 - 1.0 && float < high as f64 + 1.0 {
                    Err(Error::invalid(
                        field(),
                        "must be written as an integer, without a decimal point or exponent",
                    ))
                } else {
                    Err(out_of_range())
                }
            }
            _ => Err(Error::invalid(
                field(),
                "must be an integer, not a fraction",
            )),
        },
        None => Err(Error::invalid(field(), "must be an integer")),
    }
}

/// Why an integer field's value is out of range.
fn integer_out_of_range(kind: FieldKind) -> &'static str {
    match kind {
        FieldKind::Int32 => "out of range: must be a 32-bit signed integer",
        _ => "out of range: must be a 64-bit signed integer",
    }
}

/// A JSON value as the one pass keeps it: scalars as they are, text borrowed from the body
/// when it has no escapes, `data`'s object as its entries in order, and any other array or
/// object (or a boolean) as a `Value`, built the way `serde_json` builds one.
#[derive(Debug)]
enum Lite<'a> {
    Null,
    Number(Number),
    Str(Cow<'a, str>),
    /// `data` when it is an object: distinct keys, in order.
    Object(Vec<(Cow<'a, str>, Lite<'a>)>),
    /// Boxed: rare, and a `Value` would make every field of the envelope several times larger.
    Other(Box<Value>),
}

impl Json for Lite<'_> {
    fn is_null(&self) -> bool {
        matches!(self, Lite::Null)
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Lite::Str(text) => Some(text),
            _ => None,
        }
    }
    fn as_number(&self) -> Option<&Number> {
        match self {
            Lite::Number(number) => Some(number),
            _ => None,
        }
    }
    fn to_value(&self) -> Value {
        match self {
            Lite::Null => Value::Null,
            Lite::Number(number) => Value::Number(number.clone()),
            Lite::Str(text) => Value::String(text.as_ref().to_owned()),
            Lite::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(name, value)| (name.as_ref().to_owned(), value.to_value()))
                    .collect(),
            ),
            Lite::Other(value) => Value::clone(value),
        }
    }
}

impl Lite<'_> {
    fn as_str(&self) -> Option<&str> {
        Json::as_str(self)
    }
}

/// Reads the top-level object into an [`Envelope`]; a repeated field is an error (so the
/// caller falls back to a `Value`, where the last one wins).
struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
        let mut envelope = Envelope::default();
        while let Some(key) = map.next_key_seed(Text)? {
            let (slot, seed) = match &*key {
                "event" => (&mut envelope.event, LiteSeed::Scalar),
                "client_id" => (&mut envelope.client_id, LiteSeed::Scalar),
                "customer_id" => (&mut envelope.customer_id, LiteSeed::Scalar),
                "gb_customer_id" => (&mut envelope.gb_customer_id, LiteSeed::Scalar),
                "created_at" => (&mut envelope.created_at, LiteSeed::Scalar),
                "data" => (&mut envelope.data, LiteSeed::Data),
                _ => {
                    // Read as a Value, not skipped: skipping would not enforce serde_json's
                    // nesting limit, and a body `parse` refuses must not pass here.
                    map.next_value::<Value>()?;
                    continue;
                }
            };
            if slot.is_some() {
                return Err(de::Error::custom("repeated field"));
            }
            *slot = Some(map.next_value_seed(seed)?);
        }
        Ok(envelope)
    }
}

/// A string, borrowed from the body when it has no escapes.
struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = Cow<'de, str>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(text))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(text.to_owned()))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(text))
    }
}

/// How a value is kept: `Data` keeps an object's entries (for `data`), `Scalar` keeps any
/// array or object whole as a `Value`.
#[derive(Clone, Copy)]
enum LiteSeed {
    Scalar,
    Data,
}

impl<'de> DeserializeSeed<'de> for LiteSeed {
    type Value = Lite<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for LiteSeed {
    type Value = Lite<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Lite::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Lite::Null)
    }
    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Self::Value, E> {
        Ok(Lite::Other(Box::new(Value::Bool(value))))
    }
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
        Ok(Lite::Number(value.into()))
    }
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
        Ok(Lite::Number(value.into()))
    }
    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
        // As serde_json's own Value does with a float that is not finite.
        Ok(Number::from_f64(value).map_or(Lite::Null, Lite::Number))
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Lite::Str(Cow::Borrowed(text)))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Lite::Str(Cow::Owned(text.to_owned())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Lite::Str(Cow::Owned(text)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Lite::Other(Box::new(Value::Array(items))))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        match self {
            LiteSeed::Scalar => {
                // Built as serde_json builds a Value: a repeated key keeps its first place and
                // its last value.
                let mut object = Map::new();
                while let Some((name, value)) = map.next_entry::<String, Value>()? {
                    object.insert(name, value);
                }
                Ok(Lite::Other(Box::new(Value::Object(object))))
            }
            LiteSeed::Data => {
                let mut entries: Vec<(Cow<'de, str>, Lite<'de>)> = Vec::new();
                while let Some(name) = map.next_key_seed(Text)? {
                    if entries.len() == MAX_DATA_KEYS || entries.iter().any(|(n, _)| *n == name) {
                        return Err(de::Error::custom("too many or repeated data keys"));
                    }
                    let value = map.next_value_seed(LiteSeed::Scalar)?;
                    entries.push((name, value));
                }
                Ok(Lite::Object(entries))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use proptest::prelude::*;
    use serde_json::json;

    fn valid() -> Value {
        fixtures::json(fixtures::PROFILE_UPDATED)
    }

    /// Validates `body` both ways, from a `Value` and in one pass over its bytes, checks
    /// that they agree, and returns the answer.
    fn parse_both(body: &Value) -> Result<Delivery, Error> {
        let general = parse(body);
        let raw = serde_json::to_vec(body).unwrap();
        if let Some(envelope) = Envelope::read(&raw) {
            assert_eq!(envelope.validate(), general, "one pass disagrees on {body}");
        } else {
            assert!(!body.is_object(), "one pass declined an object: {body}");
        }
        general
    }

    /// Like [`parse_both`] for raw bytes, which may hold what a `Value` cannot (repeated keys,
    /// escapes); `None` when the one pass declines them.
    fn agree(raw: &[u8]) -> Option<Result<Delivery, Error>> {
        let envelope = Envelope::read(raw)?;
        let general = serde_json::from_slice::<Value>(raw).expect("the one pass read JSON");
        assert_eq!(
            envelope.validate(),
            parse(&general),
            "one pass disagrees on {}",
            String::from_utf8_lossy(raw)
        );
        Some(envelope.validate())
    }

    fn error_field(body: Value) -> String {
        match parse_both(&body) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    /// The reason `raw` (a whole body) is refused for, through the one pass and a `Value`.
    fn reason(raw: &str) -> String {
        match agree(raw.as_bytes()).expect("the one pass reads it") {
            Err(Error::InvalidArgument { reason, .. }) => reason,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn an_extra_may_nest_twenty_levels_of_objects_or_arrays_and_no_more() {
        let nested = |levels: usize, array: bool| {
            (0..levels).fold(json!(1), |inner, level| match array && level % 2 == 0 {
                true => json!([inner]),
                false => json!({"k": inner}),
            })
        };
        for array in [false, true] {
            let mut body = valid();
            body["data"]["deep"] = nested(MAX_EXTRA_NESTING, array);
            body["data"]["flat"] = json!([]);
            assert!(parse_both(&body).is_ok(), "{MAX_EXTRA_NESTING} levels");
            body["data"]["deep"] = nested(MAX_EXTRA_NESTING + 1, array);
            assert_eq!(error_field(body.clone()), "data");
            let raw = serde_json::to_string(&body).unwrap();
            assert!(reason(&raw).contains("\"deep\" nests"), "{}", reason(&raw));
        }
    }

    #[test]
    fn nul_characters_are_refused_in_ids_text_fields_and_keys_not_in_extras_values() {
        let with = |pointer: &str, value: Value| {
            let mut body = valid();
            *body.pointer_mut(pointer).unwrap() = value;
            body
        };
        let nuls = format!("gold{}", "\0".repeat(600));
        for (pointer, field) in [
            ("/client_id", "client_id"),
            ("/customer_id", "customer_id"),
            ("/data/tier_name", "data.tier_name"),
        ] {
            let body = with(pointer, json!(nuls));
            assert_eq!(error_field(body.clone()), field);
            let raw = serde_json::to_string(&body).unwrap();
            assert_eq!(reason(&raw), NUL_VALUE, "{field}");
        }
        let mut body = valid();
        body["data"]["note\0"] = json!(1);
        assert_eq!(error_field(body), "data");
        // An extra's value is kept as JSON text, where a NUL is the escape `\u0000`.
        let mut body = valid();
        body["data"]["note"] = json!(nuls);
        assert!(parse_both(&body).is_ok());
    }

    #[test]
    fn integers_past_the_range_are_out_of_range_and_only_fractions_are_fractions() {
        let body = |points: &str| {
            format!(
                r#"{{"event":"customer.profile.updated","client_id":"1","customer_id":"2","gb_customer_id":3,"created_at":"2024-11-19T17:34:42Z","data":{{"total_points":{points}}}}}"#
            )
        };
        // 2^64 and beyond do not fit a u64 either: serde_json reads them as floats.
        for past in ["18446744073709551616", "1e30", "-9223372036854775809"] {
            let reason = reason(&body(past));
            assert!(reason.starts_with("out of range"), "{past}: {reason}");
            assert!(!reason.contains("fraction"), "{past}: {reason}");
        }
        assert!(reason(&body("9223372036854775808")).starts_with("out of range"));
        assert!(reason(&body("1.5")).contains("fraction"));
        let written_as_float = reason(&body("100.0"));
        assert!(
            written_as_float.contains("decimal point"),
            "{written_as_float}"
        );
        for zero in ["-0", "-0.0", "0.0", "0e0"] {
            let reason = reason(&body(zero));
            assert!(reason.contains("integer 0: not -0"), "{zero}: {reason}");
        }
        assert!(matches!(agree(body("0").as_bytes()), Some(Ok(_))));
    }

    #[test]
    fn the_documented_example_parses() {
        let Delivery::ProfileUpdated(update) = parse_both(&valid()).unwrap() else {
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
        let body = fixtures::json(fixtures::NOTIFICATION_PUSH);
        assert_eq!(
            parse_both(&body).unwrap(),
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
        // Ids as long as a watch may name pass; one byte more does not.
        let long = |bytes: usize| json!("é".repeat(bytes / 2) + &"x".repeat(bytes % 2));
        for (field, max) in [
            ("client_id", MAX_CLIENT_ID_BYTES),
            ("customer_id", MAX_CUSTOMER_ID_BYTES),
        ] {
            let mut body = valid();
            body[field] = long(max);
            assert!(parse_both(&body).is_ok(), "{field} of {max} bytes");
            assert_eq!(with(&[field], long(max + 1)), field);
        }
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
        let Delivery::ProfileUpdated(update) = parse_both(&body).unwrap() else {
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

    #[test]
    fn the_one_pass_declines_what_a_value_reads_differently_or_refuses() {
        let fixture = fixtures::PROFILE_UPDATED;
        assert!(agree(fixture).is_some());
        // A repeated field: a Value keeps the last one, so the general way decides.
        let repeated = br#"{"event":"other.topic","event":"customer.profile.updated"}"#;
        assert!(Envelope::read(repeated).is_none());
        let repeated_data = br#"{"event":"x","data":{"email":"a","email":null}}"#;
        assert!(Envelope::read(repeated_data).is_none());
        for declined in [
            &b"[1,2]"[..],
            b"null",
            b"\"event\"",
            b"{\"event\":",
            b"{} x",
            b"",
        ] {
            assert!(Envelope::read(declined).is_none(), "{declined:?}");
        }
        // Not UTF-8, in a string, a key, or outside both (a byte no JSON token has): the one
        // pass declines, and a Value refuses it too.
        for not_utf8 in [
            &b"{\"event\":\"customer.profile.updated\",\"client_id\":\"a\xff\"}"[..],
            b"{\"ev\xc3\x28nt\":\"x\"}",
            b"{\"event\":\"x\"}\xff",
            b"\xef\xbb\xbf{\"event\":\"x\"}",
        ] {
            assert!(Envelope::read(not_utf8).is_none(), "{not_utf8:?}");
            assert!(
                serde_json::from_slice::<Value>(not_utf8).is_err(),
                "{not_utf8:?}"
            );
        }
        // Nesting past serde_json's limit in a key nobody reads is still not JSON.
        let deep = format!(
            r#"{{"event":"x","other":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        assert!(Envelope::read(deep.as_bytes()).is_none());
    }

    /// The keys a body nested past serde_json's limit is refused for: found in the bytes,
    /// escapes decoded, strings holding brackets and quotes passed over.
    #[test]
    fn the_key_of_a_value_nested_past_the_readers_limit_is_found_in_the_bytes() {
        let deep = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        let owned = |keys: [Option<&str>; 2]| keys.map(|key| key.map(str::to_owned));
        let cases = [
            (
                format!(
                    r#"{{"a":"[[{{\"","data":{{"x":[1],"n\u00e9st":{}}}}}"#,
                    deep(200)
                ),
                [Some("data"), Some("nést")],
            ),
            (
                format!(r#"{{"data":{},"later":1}}"#, deep(200)),
                [Some("data"), None],
            ),
            (
                format!(r#"{{"data":{{}},"other":{}}}"#, deep(130)),
                [Some("other"), None],
            ),
            (deep(300), [None, None]),
        ];
        for (body, keys) in cases {
            let err = serde_json::from_str::<Value>(&body).unwrap_err();
            assert!(too_deep(body.as_bytes(), &err).is_some(), "{body}");
            assert_eq!(too_deep_at(body.as_bytes()), owned(keys), "{body}");
        }
        let not_json = serde_json::from_str::<Value>("{").unwrap_err();
        assert!(too_deep(b"{", &not_json).is_none());
    }

    /// A number past the double range is named by where it is, as `1e30` is, not answered
    /// "not JSON", field `body` (found by an adversarial run).
    #[test]
    fn a_number_past_the_double_range_is_named_by_its_field() {
        let body = |gb_customer_id: &str, data: &str| {
            format!(
                r#"{{"event":"customer.profile.updated","client_id":"2155","customer_id":"c","gb_customer_id":{gb_customer_id},"created_at":"2024-11-19T17:34:42.297Z","data":{data}}}"#
            )
        };
        let digits = "9".repeat(400);
        let int64 = "out of range: must be a 64-bit signed integer";
        let beyond = BEYOND_DOUBLE;
        let cases = [
            (
                body("7", r#"{"total_points":1e400}"#),
                "data.total_points",
                int64,
            ),
            (
                body("7", &format!(r#"{{"x":1,"tier_order":{digits}}}"#)),
                "data.tier_order",
                "32-bit",
            ),
            (body("-1e999", "{}"), "gb_customer_id", int64),
            (body("7", r#"{"score":-1E+999}"#), "data.score", beyond),
            (body("7", r#"{"email":1e400}"#), "data.email", beyond),
            (
                body("7", r#"{"gb_customer_id":1e400}"#),
                "data.gb_customer_id",
                beyond,
            ),
            // Deeper in an extra, after strings and numbers that look alike, and an escaped key.
            (
                body(
                    "7",
                    r#"{"a":{"1e400":"1e400 \" 1e400","b":[1,{"c":2}]},"k\"ey":[0,{"n":1e400}]}"#,
                ),
                "data.k\"ey",
                beyond,
            ),
            (body("7", r#"["x",1e400]"#), "data", beyond),
            (
                body("7", r#"{"a":{"b":1}},"created_at":1e400"#),
                "created_at",
                beyond,
            ),
            (
                r#"{"data":{"a":{"b":1}},"other":{"data":[1e400]}}"#.to_owned(),
                "body",
                r#"the value of "other" is out of range"#,
            ),
            ("1e400".to_owned(), "body", beyond),
            ("[0, 1e400]".to_owned(), "body", beyond),
        ];
        for (raw, field, why) in cases {
            let err = serde_json::from_str::<Value>(&raw).unwrap_err();
            let answer = crate::ingest::validate(raw.as_bytes(), Err(&err)).unwrap_err();
            assert_eq!(answer.field(), Some(field), "{raw}: {answer}");
            assert!(answer.to_string().contains(why), "{raw}: {answer}");
        }
        let not_json = serde_json::from_str::<Value>("{").unwrap_err();
        assert!(out_of_range(b"{", &not_json).is_none());
    }

    #[test]
    fn escapes_unusual_numbers_and_extras_read_the_same_both_ways() {
        let bodies: [&[u8]; 6] = [
            br#"{"\u0065vent":"customer.profile.updated","client_id":"21\"55","customer_id":"\u00e9","gb_customer_id":7,"created_at":"2024-11-19T17:34:42Z","data":{"tier_name":"gold\n","x":{"b":1,"a":[true,null],"b":2},"y":1e2,"z":-0.0}}"#,
            br#"{"event":"customer.profile.updated","client_id":"1","customer_id":"2","gb_customer_id":9223372036854775808,"created_at":"2024-11-19T17:34:42Z","data":{}}"#,
            br#"{"event":"customer.profile.updated","client_id":"1","customer_id":"2","gb_customer_id":1.0,"created_at":"2024-11-19T17:34:42Z","data":{}}"#,
            br#"{"event":"customer.profile.updated","client_id":"1","customer_id":"2","gb_customer_id":-3,"created_at":"2024-11-19T17:34:42Z","data":{"total_points":"5","gb_customer_id":4}}"#,
            br#"{"event":"customer.notification.push","data":[1,{"a":1}],"client_id":[],"event_id":{"k":"v"}}"#,
            br#" {"event":null,"client_id":"1"} "#,
        ];
        for body in bodies {
            assert!(agree(body).is_some(), "{}", String::from_utf8_lossy(body));
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            prop_oneof![Just(i64::from(i32::MAX) + 1), Just(i64::from(i32::MIN))]
                .prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z\"\\\\\u{e9}]{0,6}".prop_map(Value::from),
            Just(Value::from("2024-11-19T17:34:42.297Z")),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::vec(("[a-c]", inner), 0..3)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    fn data_key() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(Field::ALL.to_vec()).prop_map(|f| f.name().to_owned()),
            "[a-z_]{1,8}",
        ]
    }

    proptest::proptest! {
        /// Edits of the documented example, through both ways: they always agree.
        #[test]
        fn both_ways_agree_on_edited_bodies(
            top in proptest::collection::vec(
                (proptest::sample::select(vec![
                    "event", "client_id", "customer_id", "gb_customer_id", "created_at", "data",
                    "other",
                ]), proptest::option::of(json_value())),
                0..4,
            ),
            data in proptest::collection::vec(
                (data_key(), proptest::option::of(json_value())),
                0..6,
            ),
            profile_topic in proptest::bool::weighted(0.8),
        ) {
            let mut body = valid();
            if !profile_topic {
                body["event"] = Value::from("customer.notification.push");
            }
            for (key, value) in data {
                let object = body["data"].as_object_mut().unwrap();
                match value {
                    Some(value) => object.insert(key, value),
                    None => object.shift_remove(&key),
                };
            }
            for (key, value) in top {
                let object = body.as_object_mut().unwrap();
                match value {
                    Some(value) => object.insert(key.to_owned(), value),
                    None => object.shift_remove(key),
                };
            }
            let raw = serde_json::to_vec(&body).unwrap();
            proptest::prop_assert!(agree(&raw).is_some(), "declined {body}");
        }
    }
}
