//! The webhook fuzzing model, shared by the cargo-fuzz target (`fuzz/fuzz_targets/webhook.rs`,
//! which decodes an [`Input`] from raw bytes with `arbitrary`) and by the proptest that runs in
//! `cargo test` (`tests/webhook_fuzz.rs`, which generates one with strategies). Both include
//! this file with `#[path]`, so it uses only crates both have: the main crate's dependencies.
//! Both also provide `crate::fixtures` (`tests/fixtures/mod.rs`, Gameball's signed samples,
//! the one copy every test shares).
//!
//! An [`Input`] is one delivery: a Content-Type, an `X-GB-Signature` (absent, right for the
//! body, wrong), a body (raw bytes, or Gameball's sample payload edited as JSON and then as
//! bytes) and how the body arrives (one piece, or a stream of chunks that may break off).
//! [`Harness::check`] posts it to the real axum router in-process (one current-thread runtime,
//! one ingress with an in-memory sequencer, per-client secrets, and dead letters kept on disk in
//! a scratch directory, on tmpfs where there is one) and returns an error when the answer breaks
//! the webhook's contract:
//!
//! - the status is a documented one (200, 400, 401, 413, 415, 422, 503) and the one the
//!   README's table and the order of checks predict for this input (415, 413 or 400 while the
//!   body is read, 401, then 422 for a signed body that cannot be applied, or whose update
//!   would grow its profile past the bound, then 200);
//! - a 200 is JSON with an `outcome` (`applied`/`unchanged` with a revision, `ignored` with the
//!   event); an error is JSON with `error` (and `field` on a 400 or 422);
//! - a 422 names the dead letter that holds exactly this body (id = its SHA-1), and the letters
//!   on disk load back as they are in memory (checked every [`LETTERS_BEFORE_PURGE`] letters,
//!   which are then purged);
//! - `applied` revisions only grow, and `unchanged` never names a revision not yet given.
//!
//! Beside the router, a body that parses goes straight through `payload::parse`, then
//! `Profile::merge` (merging into an empty profile changes it, merging again does not, and the
//! order of two updates does not matter) and the journal's records (an update and the merged
//! profile survive encode + decode, as recovery needs: this check found float extras drifting
//! through the journal while serde_json parsed floats lossily, before `float_roundtrip`).
//! Panics anywhere are the fuzzer's crash.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use prost::Message;
use serde_json::{Value, json};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use profile_state::data_dir::LockRef;
use profile_state::dead_letters::{DeadLetterId, DeadLetters, LocalLetters, Purge};
use profile_state::ingest::payload::{self, Delivery};
use profile_state::journal::codec::{ProfileRecord, UpdateRecord};
use profile_state::metrics::Metrics;
use profile_state::profile::{FieldPath, Profile, ProfileUpdate, check_growth};
use profile_state::sequencer::Sequencer;
use profile_state::store::Store;
use profile_state::webhook::secrets::{SecretStore, Secrets};
use profile_state::webhook::signature::{self, SignatureCheck};
use profile_state::webhook::{Ingress, Limits, PATH, Verification};

use crate::fixtures;

/// Gameball's sample `customer.profile.updated` delivery.
pub const FIXTURE: &[u8] = fixtures::PROFILE_UPDATED;
/// The secret for every client (the default).
pub const SECRET: &str = "test-secret";
/// A second secret, valid only for [`ROTATED_CLIENT`] (alongside [`SECRET`]).
pub const ROTATED_SECRET: &str = "rotated-secret";
/// The client whose secrets are being rotated: the fixture's.
pub const ROTATED_CLIENT: &str = "2155";
/// The ingress's body limit: small, so that 413 is reachable with short inputs.
pub const MAX_BODY_BYTES: usize = 4096;
/// How many dead letters pile up before they are checked against their files and purged (well
/// below `dead_letters::MAX_LETTERS`, past which the ingress answers 503).
pub const LETTERS_BEFORE_PURGE: usize = 64;

/// Keys that matter to the payload: the top level's and `data`'s.
pub const KEYS: &[&str] = &[
    "event",
    "client_id",
    "customer_id",
    "gb_customer_id",
    "created_at",
    "data",
    "email",
    "mobile_number",
    "tier_name",
    "tier_order",
    "referral_code",
    "referral_link",
    "activated_points",
    "pending_points",
    "total_points",
];

/// Strings that matter to the payload: topics, ids, timestamps at the edges, odd text.
pub const STRINGS: &[&str] = &[
    "customer.profile.updated",
    "customer.notification.push",
    "",
    "2155",
    "webhook-test",
    "2024-11-19T17:34:42.297Z",
    "2024-11-19T17:34:43Z",
    "2024-11-19T17:34:42.297+02:00",
    "2024-11-19T17:34:42.297000001Z",
    "2016-12-31T23:59:60Z",
    "2016-12-31T23:59:60.999999999+01:30",
    "9999-12-31T23:59:59.999999999-23:59",
    "0000-01-01T00:00:00+23:59",
    "1970-01-01T00:00:00Z",
    "2024-11-19T17:34:42",
    "2024-11-19 17:34:42Z",
    "2024-13-45T25:61:61Z",
    "customer@example.com",
    "+20 100 000 0000",
    "ü€😀",
    "\u{0}",
    "\u{feff}",
    "null",
];

/// The Content-Type header.
#[derive(Clone, Debug)]
pub enum ContentType {
    /// `application/json`.
    Json,
    /// None at all (accepted).
    Absent,
    /// `application/json; charset=utf-8`.
    JsonCharset,
    /// `APPLICATION/JSON` (types are case-insensitive).
    JsonUppercase,
    /// `application/vnd.gameball+json` (a `+json` suffix).
    JsonSuffix,
    /// `text/plain` (refused).
    TextPlain,
    /// `application/x-www-form-urlencoded` (refused).
    Form,
    /// Any bytes; left out when they cannot be a header value.
    Raw(Vec<u8>),
}

/// The `X-GB-Signature` header.
#[derive(Clone, Debug)]
pub enum Signature {
    /// Hex SHA-1 of the raw body and [`SECRET`].
    Correct,
    /// No header.
    Absent,
    /// [`Signature::Correct`] in uppercase hex.
    CorrectUppercase,
    /// [`Signature::Correct`] with blanks around it.
    CorrectPadded,
    /// Over the compact re-serialization of the body (as Gameball's verifier computes it);
    /// over the raw body when it is not JSON.
    CorrectCompact,
    /// With [`ROTATED_SECRET`]: right only when the body's `client_id` is [`ROTATED_CLIENT`].
    Rotated,
    /// With a secret nobody has.
    WrongSecret,
    /// Any bytes; left out when they cannot be a header value.
    Garbage(Vec<u8>),
}

/// A key of a JSON object.
#[derive(Clone, Debug)]
pub enum Key {
    /// One of [`KEYS`] (index modulo its length).
    Known(usize),
    /// Any other.
    Other(String),
}

/// A JSON value to put somewhere.
#[derive(Clone, Debug)]
pub enum Val {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer (beyond `i64` when large).
    Big(u64),
    /// A float (non-finite ones become `null`, as in serde_json).
    Float(f64),
    /// One of [`STRINGS`] (index modulo its length).
    Known(usize),
    /// Any string.
    Str(String),
    /// A string of this many `x` (past the body limit when large).
    Long(usize),
    /// `[[[...]]]` this deep (capped at 300: past serde_json's nesting limit).
    Deep(usize),
    /// An array.
    Array(Vec<Val>),
    /// An object.
    Object(Vec<(Key, Val)>),
}

/// One edit of the fixture, as JSON.
#[derive(Clone, Debug)]
pub enum Edit {
    /// Sets a top-level key.
    SetTop(Key, Val),
    /// Removes a top-level key.
    RemoveTop(Key),
    /// Sets a key of `data` (when `data` is still an object).
    SetData(Key, Val),
    /// Removes a key of `data`.
    RemoveData(Key),
    /// Replaces the whole document.
    Root(Val),
}

/// One edit of the serialized body, as bytes. Positions are taken modulo the length.
#[derive(Clone, Debug)]
pub enum ByteEdit {
    /// Keeps only the first bytes.
    Truncate(usize),
    /// Overwrites one byte.
    Set(usize, u8),
    /// Inserts bytes.
    Insert(usize, Vec<u8>),
    /// Removes a run of bytes.
    Remove(usize, usize),
}

/// The body.
#[derive(Clone, Debug)]
pub enum BodySpec {
    /// The fixture, edited as JSON, serialized (compact or pretty), then edited as bytes.
    Fixture {
        /// JSON edits, in order.
        edits: Vec<Edit>,
        /// Pretty-printed instead of compact.
        pretty: bool,
        /// Byte edits, in order.
        bytes: Vec<ByteEdit>,
    },
    /// Bytes as they are.
    Raw(Vec<u8>),
}

/// One delivery.
#[derive(Clone, Debug)]
pub struct Input {
    /// The Content-Type header.
    pub content_type: ContentType,
    /// The signature header.
    pub signature: Signature,
    /// The body.
    pub body: BodySpec,
    /// Empty: the body in one piece. Else it is streamed in chunks of these sizes (the rest in
    /// a last chunk; empty chunks included).
    pub chunks: Vec<usize>,
    /// The upload breaks off (the stream fails) after the whole body was sent.
    pub broken_off: bool,
}

impl Val {
    fn to_json(&self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => json!(b),
            Val::Int(n) => json!(n),
            Val::Big(n) => json!(n),
            Val::Float(f) => Value::from(*f),
            Val::Known(i) => json!(STRINGS[i % STRINGS.len()]),
            Val::Str(s) => json!(s),
            Val::Long(n) => json!("x".repeat(*n % (3 * MAX_BODY_BYTES))),
            Val::Deep(depth) => {
                let mut value = json!([]);
                for _ in 0..(*depth).min(300) {
                    value = json!([value]);
                }
                value
            }
            Val::Array(items) => Value::Array(items.iter().map(Val::to_json).collect()),
            Val::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(key, value)| (key.name().to_owned(), value.to_json()))
                    .collect(),
            ),
        }
    }
}

impl Key {
    fn name(&self) -> &str {
        match self {
            Key::Known(i) => KEYS[i % KEYS.len()],
            Key::Other(name) => name,
        }
    }
}

impl BodySpec {
    /// The body's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            BodySpec::Raw(bytes) => bytes.clone(),
            BodySpec::Fixture {
                edits,
                pretty,
                bytes,
            } => {
                let mut document = fixtures::json(FIXTURE);
                for edit in edits {
                    apply(&mut document, edit);
                }
                let mut out = if *pretty {
                    serde_json::to_vec_pretty(&document)
                } else {
                    serde_json::to_vec(&document)
                }
                .expect("a JSON value encodes");
                for edit in bytes {
                    edit_bytes(&mut out, edit);
                }
                out
            }
        }
    }
}

fn apply(document: &mut Value, edit: &Edit) {
    match edit {
        Edit::Root(value) => *document = value.to_json(),
        Edit::SetTop(key, value) => {
            if let Some(object) = document.as_object_mut() {
                object.insert(key.name().to_owned(), value.to_json());
            }
        }
        Edit::RemoveTop(key) => {
            if let Some(object) = document.as_object_mut() {
                object.shift_remove(key.name());
            }
        }
        Edit::SetData(key, value) => {
            if let Some(data) = document.get_mut("data").and_then(Value::as_object_mut) {
                data.insert(key.name().to_owned(), value.to_json());
            }
        }
        Edit::RemoveData(key) => {
            if let Some(data) = document.get_mut("data").and_then(Value::as_object_mut) {
                data.shift_remove(key.name());
            }
        }
    }
}

fn edit_bytes(bytes: &mut Vec<u8>, edit: &ByteEdit) {
    let at = |position: usize, len: usize| if len == 0 { 0 } else { position % (len + 1) };
    match edit {
        ByteEdit::Truncate(keep) => bytes.truncate(at(*keep, bytes.len())),
        ByteEdit::Set(position, byte) => {
            if !bytes.is_empty() {
                let i = position % bytes.len();
                bytes[i] = *byte;
            }
        }
        ByteEdit::Insert(position, insert) => {
            let i = at(*position, bytes.len());
            bytes.splice(i..i, insert.iter().copied());
        }
        ByteEdit::Remove(position, count) => {
            let i = at(*position, bytes.len());
            let end = i.saturating_add(*count).min(bytes.len());
            bytes.drain(i..end);
        }
    }
}

impl ContentType {
    /// The header value, if any; `Err(())` when it is [`ContentType::Raw`], whose acceptance
    /// this model does not predict.
    fn header(&self) -> (Option<HeaderValue>, Result<bool, ()>) {
        let fixed =
            |text: &'static str, accepted| (Some(HeaderValue::from_static(text)), Ok(accepted));
        match self {
            ContentType::Json => fixed("application/json", true),
            ContentType::Absent => (None, Ok(true)),
            ContentType::JsonCharset => fixed("application/json; charset=utf-8", true),
            ContentType::JsonUppercase => fixed("APPLICATION/JSON", true),
            ContentType::JsonSuffix => fixed("application/vnd.gameball+json", true),
            ContentType::TextPlain => fixed("text/plain", false),
            ContentType::Form => fixed("application/x-www-form-urlencoded", false),
            ContentType::Raw(bytes) => match HeaderValue::from_bytes(bytes) {
                Ok(value) => (Some(value), Err(())),
                Err(_) => (None, Ok(true)),
            },
        }
    }
}

impl Signature {
    /// The header value, if any, and whether it is right for this body.
    fn header(
        &self,
        raw: &[u8],
        parsed: Option<&Value>,
        compact: Option<&[u8]>,
    ) -> (Option<HeaderValue>, bool) {
        let sign = |secret: &str, bytes: &[u8]| SignatureCheck::new(secret).sign(bytes);
        let value = |text: String| HeaderValue::from_str(&text).expect("hex is a header value");
        // As the ingress chooses secrets: the parsed body's `client_id`, or, for a body
        // serde_json does not take, the top-level one a walk of it finds.
        let client = match parsed {
            Some(json) => json.get("client_id").and_then(Value::as_str),
            None => profile_state::webhook::client_hint::client_id(raw),
        };
        match self {
            Signature::Correct => (Some(value(sign(SECRET, raw))), true),
            Signature::Absent => (None, false),
            Signature::CorrectUppercase => (Some(value(sign(SECRET, raw).to_uppercase())), true),
            Signature::CorrectPadded => (Some(value(format!(" {}\t", sign(SECRET, raw)))), true),
            Signature::CorrectCompact => {
                let signed = sign(SECRET, compact.unwrap_or(raw));
                (Some(value(signed)), true)
            }
            Signature::Rotated => (
                Some(value(sign(ROTATED_SECRET, raw))),
                client == Some(ROTATED_CLIENT),
            ),
            Signature::WrongSecret => (Some(value(sign("not-the-secret", raw))), false),
            // A garbage header could only match by inverting SHA-1.
            Signature::Garbage(bytes) => (HeaderValue::from_bytes(bytes).ok(), false),
        }
    }
}

/// What an input should get, as far as the model can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    UnsupportedMediaType,
    TooLarge,
    /// 400: the body could not be read.
    Unreadable,
    Unauthenticated,
    /// 422: signed, but not JSON or a field fails validation; kept as a dead letter.
    DeadLettered,
    /// Another topic: 200 `ignored` with this event.
    Ignored,
    /// 200 `applied` or `unchanged`.
    Recorded,
}

/// What the router answered, for tests that want to see coverage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// `outcome` of a 200; else the status's reason.
    pub outcome: String,
}

/// The router under test and what the checks remember between inputs.
pub struct Harness {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _tracker: TaskTracker,
    dead_letters: LocalLetters,
    dead_letter_dir: std::path::PathBuf,
    /// The highest `applied` revision seen.
    newest_revision: AtomicU64,
    /// The fixture's own update, for the commutativity check.
    fixture_update: ProfileUpdate,
    /// The sequencer's store: what decides whether an update would grow its profile past the
    /// bound (most inputs are the fixture's customer, whose extras accumulate over a run).
    store: Store,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    /// One current-thread runtime and one ingress (in-memory sequencer; [`SECRET`] for every
    /// client, and [`ROTATED_SECRET`] too for [`ROTATED_CLIENT`]).
    pub fn new() -> Harness {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let tracker = TaskTracker::new();
        let dead_letter_dir = scratch_dir();
        let dead_letters = LocalLetters::open(&dead_letter_dir, LockRef::unlocked())
            .expect("a dead letter directory");
        let store = Store::new(64, "fuzz");
        let router = runtime.block_on(async {
            let metrics = Metrics::new();
            let sequencer = Sequencer::start(store.clone(), None, metrics.clone(), &tracker);
            let limits = Limits {
                max_body_bytes: MAX_BODY_BYTES,
                max_in_flight: 4,
                body_timeout: Duration::from_secs(30),
                timeout: Duration::from_secs(30),
            };
            Ingress::new(sequencer, Verification::Secrets(secrets()), limits, metrics)
                .with_dead_letters(DeadLetters::local(dead_letters.clone()))
                .router()
        });
        let fixture = fixtures::json(FIXTURE);
        let Ok(Delivery::ProfileUpdated(fixture_update)) = payload::parse(&fixture) else {
            panic!("the fixture is a valid profile update");
        };
        Harness {
            runtime,
            router,
            _tracker: tracker,
            dead_letters,
            dead_letter_dir,
            newest_revision: AtomicU64::new(0),
            fixture_update,
            store,
        }
    }

    /// Whether the sequencer will refuse `update` for growing its profile past the bound
    /// (`profile::check_growth`): one input at a time, so the store is as the merge finds it.
    fn refused(&self, update: &ProfileUpdate) -> bool {
        let current = self.store.get(&update.key);
        let mut merged = match &current {
            Some(current) => Profile::clone(current),
            None => Profile::empty(update.key.clone()),
        };
        merged.merge(update).is_some() && check_growth(current.as_deref(), &merged, update).is_err()
    }

    /// Posts `input` to the router, then runs the body through the domain directly. `Err`
    /// names the broken rule; a panic anywhere is a bug too.
    pub fn check(&self, input: &Input) -> Result<Answer, String> {
        let raw = input.body.bytes();
        let parsed = serde_json::from_slice::<Value>(&raw).ok();
        let (content_type, content_type_ok) = input.content_type.header();
        // A signature over the compact form covers that form (`JSON.stringify`'s, made by the
        // crate, whose own tests hold it to node's): it is what is applied, and what a dead
        // letter keeps (README, "Dead letters").
        let compact = match input.signature {
            Signature::CorrectCompact => parsed.as_ref().map(signature::compact),
            _ => None,
        };
        let signed = compact.as_ref().map(|compact| {
            serde_json::from_slice::<Value>(compact).expect("the compact form is JSON")
        });
        let (signature, signature_ok) =
            input
                .signature
                .header(&raw, parsed.as_ref(), compact.as_deref());
        let delivery = signed.as_ref().or(parsed.as_ref()).map(payload::parse);

        // The README's table, in the ingress's order of checks.
        let later = if raw.len() > MAX_BODY_BYTES {
            Expect::TooLarge
        } else if input.broken_off {
            Expect::Unreadable
        } else if !signature_ok {
            Expect::Unauthenticated
        } else {
            match &delivery {
                None | Some(Err(_)) => Expect::DeadLettered,
                Some(Ok(Delivery::Other { .. })) => Expect::Ignored,
                Some(Ok(Delivery::ProfileUpdated(update))) if self.refused(update) => {
                    Expect::DeadLettered
                }
                Some(Ok(Delivery::ProfileUpdated(update)))
                    if profile_state::ingest::check_clock_lead(update, chrono::Utc::now())
                        .is_err() =>
                {
                    Expect::DeadLettered
                }
                Some(Ok(Delivery::ProfileUpdated(_))) => Expect::Recorded,
            }
        };
        let expected: &[Expect] = match content_type_ok {
            Ok(true) => &[later],
            Ok(false) => &[Expect::UnsupportedMediaType],
            Err(()) => &[Expect::UnsupportedMediaType, later],
        };

        let mut request = Request::post(PATH);
        if let Some(value) = content_type {
            request = request.header("content-type", value);
        }
        if let Some(value) = signature {
            request = request.header("x-gb-signature", value);
        }
        let request = request
            .body(body(&raw, &input.chunks, input.broken_off))
            .expect("a valid request");
        let (status, answer) = self.runtime.block_on(async {
            let response = self
                .router
                .clone()
                .oneshot(request)
                .await
                .expect("axum's router is infallible");
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("the answer's body reads");
            (status, bytes)
        });
        let answer: Value = serde_json::from_slice(&answer).map_err(|err| {
            format!(
                "{status}: the answer is not JSON ({err}): {:?}",
                String::from_utf8_lossy(&answer)
            )
        })?;
        let outcome = self.check_answer(status, &answer, expected, &delivery)?;
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            // A letter keeps the bytes the signature covers: the compact form when only it
            // matched (README, "Dead letters").
            self.check_dead_letter(compact.as_deref().unwrap_or(&raw), &answer)?;
        }

        if let Some(Ok(Delivery::ProfileUpdated(update))) = &delivery {
            self.check_update(update)?;
        }
        Ok(Answer {
            status: status.as_u16(),
            outcome,
        })
    }

    fn check_answer(
        &self,
        status: StatusCode,
        answer: &Value,
        expected: &[Expect],
        delivery: &Option<Result<Delivery, profile_state::error::Error>>,
    ) -> Result<String, String> {
        let fail = |why: &str| Err(format!("{status} {answer}: {why} (expected {expected:?})"));
        let got = match status.as_u16() {
            200 => None,
            400 => Some(Expect::Unreadable),
            422 => Some(Expect::DeadLettered),
            401 => Some(Expect::Unauthenticated),
            413 => Some(Expect::TooLarge),
            415 => Some(Expect::UnsupportedMediaType),
            // Documented, but only for a service that cannot record or keep: never with an
            // in-memory sequencer, a 30 s timeout, one request at a time and dead letters
            // purged long before their limit.
            503 => return fail("503 from an in-memory ingress"),
            _ => return fail("not a documented status"),
        };
        if let Some(got) = got {
            if !expected.contains(&got) {
                return fail("not the predicted status");
            }
            if !answer["error"].is_string() {
                return fail("an error answer without `error`");
            }
            let invalid = [StatusCode::BAD_REQUEST, StatusCode::UNPROCESSABLE_ENTITY];
            if invalid.contains(&status) && !answer["field"].is_string() {
                return fail("no `field`");
            }
            return Ok(status.canonical_reason().unwrap_or("?").to_owned());
        }
        let outcome = answer["outcome"].as_str().unwrap_or_default().to_owned();
        match outcome.as_str() {
            "ignored" => {
                if !expected.contains(&Expect::Ignored) {
                    return fail("ignored, not predicted");
                }
                let Some(Ok(Delivery::Other { event })) = delivery else {
                    return fail("ignored, but the body is no other topic");
                };
                if answer["event"] != json!(event) {
                    return fail("ignored names another event");
                }
            }
            "applied" | "unchanged" => {
                if !expected.contains(&Expect::Recorded) {
                    return fail("recorded, not predicted");
                }
                let Some(revision) = answer["revision"].as_u64() else {
                    return fail("no revision");
                };
                let newest = self.newest_revision.load(Ordering::SeqCst);
                if outcome == "applied" {
                    if revision != newest + 1 {
                        return fail(&format!("applied as {revision} after {newest}"));
                    }
                    self.newest_revision.store(revision, Ordering::SeqCst);
                } else if revision == 0 || revision > newest {
                    return fail(&format!("unchanged at {revision}, newest is {newest}"));
                }
            }
            _ => return fail("a 200 without a known `outcome`"),
        }
        Ok(outcome)
    }

    /// A 422's letter holds exactly this body; every so often, the letters' files load back as
    /// they are in memory, and are purged.
    fn check_dead_letter(&self, raw: &[u8], answer: &Value) -> Result<(), String> {
        let id = DeadLetterId::of(raw);
        if answer["dead_letter_id"] != json!(id.as_str()) {
            return Err(format!(
                "a 422 names another dead letter than {id}: {answer}"
            ));
        }
        let letter = self
            .dead_letters
            .get(&id)
            .ok_or_else(|| format!("dead letter {id} is not kept"))?;
        if letter.body != raw || letter.deliveries == 0 {
            return Err(format!(
                "dead letter {id} does not hold the body: {letter:?}"
            ));
        }
        if letter.field.as_deref() != answer["field"].as_str() {
            return Err(format!("dead letter {id} names another field: {letter:?}"));
        }
        if self.dead_letters.len() < LETTERS_BEFORE_PURGE {
            return Ok(());
        }
        let reloaded = LocalLetters::open(&self.dead_letter_dir, LockRef::unlocked())
            .map_err(|err| format!("the dead letters do not load back: {err}"))?;
        let kept = self.dead_letters.list(None, usize::MAX, usize::MAX).letters;
        let loaded = reloaded.list(None, usize::MAX, usize::MAX).letters;
        if kept != loaded {
            return Err(format!(
                "the dead letters load back different:\n{kept:?}\n{loaded:?}"
            ));
        }
        self.runtime
            .block_on(self.dead_letters.purge(Purge::All))
            .map_err(|err| format!("the dead letters cannot be purged: {err}"))?;
        Ok(())
    }

    /// The domain, straight: merge rules and the journal's records.
    fn check_update(&self, update: &ProfileUpdate) -> Result<(), String> {
        let mut profile = Profile::empty(update.key.clone());
        let changed = profile
            .merge(update)
            .ok_or("merging into an empty profile changed nothing")?;
        if !changed.is_sorted() {
            return Err(format!("changed fields not sorted: {changed:?}"));
        }
        for path in &changed {
            let carried = match path {
                FieldPath::Field(field) => update.fields.iter().any(|(f, _)| f == field),
                FieldPath::Extra(key) => update.extras.iter().any(|(k, _)| k == key),
            };
            if !carried {
                return Err(format!("{path} changed but the update does not carry it"));
            }
        }
        let once = profile.clone();
        if profile.merge(update).is_some() {
            return Err("merging the same update twice changed the profile again".into());
        }
        if profile != once {
            return Err("a merge that reported no change changed the profile".into());
        }

        let mut other = self.fixture_update.clone();
        other.key = update.key.clone();
        let mut ab = Profile::empty(update.key.clone());
        ab.merge(update);
        ab.merge(&other);
        let mut ba = Profile::empty(update.key.clone());
        ba.merge(&other);
        ba.merge(update);
        if !ab.same_content(&ba) {
            return Err(format!(
                "merge order matters:\n{ab:?}\n{ba:?}\nfor {update:?}"
            ));
        }

        let encoded = UpdateRecord::new(7, update).encode_to_vec();
        let decoded = UpdateRecord::decode(encoded.as_slice())
            .map_err(|err| format!("an update record does not decode: {err}"))?;
        if decoded.revision != 7 {
            return Err("an update record lost its revision".into());
        }
        let replayed = decoded
            .into_update()
            .map_err(|err| format!("an update record is malformed: {err:?}"))?;
        if &replayed != update {
            return Err(format!(
                "an update does not survive its journal record:\n{update:?}\n{replayed:?}"
            ));
        }
        profile.revision = 7;
        profile.create_revision = 3;
        profile.version = 2;
        let encoded = ProfileRecord::new(&profile).encode_to_vec();
        let restored = ProfileRecord::decode(encoded.as_slice())
            .map_err(|err| format!("a profile record does not decode: {err}"))?
            .into_profile()
            .map_err(|err| format!("a profile record is malformed: {err:?}"))?;
        if restored != profile {
            return Err(format!(
                "a profile does not survive its snapshot record:\n{profile:?}\n{restored:?}"
            ));
        }
        Ok(())
    }
}

/// The secrets: [`SECRET`] by default; [`ROTATED_CLIENT`] rotating to [`ROTATED_SECRET`].
fn secrets() -> SecretStore {
    let path = std::env::temp_dir().join(format!(
        "profile-state-fuzz-secrets-{}-{:?}.json",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = json!({
        "default": [SECRET],
        "clients": {ROTATED_CLIENT: [ROTATED_SECRET, SECRET]},
    });
    std::fs::write(&path, file.to_string()).expect("the secrets file is written");
    let secrets = Secrets::load(&path, None).expect("the secrets file loads");
    let _ = std::fs::remove_file(&path);
    SecretStore::new(secrets, None, None)
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dead_letter_dir);
    }
}

/// A new directory for dead letters: on tmpfs if there is one (their fsyncs cost nothing
/// there), else in the temp directory. A harness in a `static` is never dropped, so its
/// directory stays when its process exits; the next harness removes those of processes that
/// are gone (each holds at most [`LETTERS_BEFORE_PURGE`] letters of 4 KiB).
fn scratch_dir() -> std::path::PathBuf {
    const PREFIX: &str = "profile-state-fuzz-";
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|name| {
            let rest = name.strip_prefix(PREFIX)?;
            rest.split('-').next()?.parse::<u32>().ok()
        });
        let gone = |pid: u32| !std::path::Path::new(&format!("/proc/{pid}")).exists();
        if pid.is_some_and(gone) && std::path::Path::new("/proc/self").exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = base.join(format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The body in one piece, or streamed in chunks; a broken-off upload ends with an error.
fn body(raw: &[u8], chunks: &[usize], broken_off: bool) -> Body {
    if chunks.is_empty() && !broken_off {
        return Body::from(raw.to_vec());
    }
    let mut rest = raw;
    let mut pieces = Vec::with_capacity(chunks.len() + 1);
    for &size in chunks {
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        pieces.push(Ok::<_, std::io::Error>(piece.to_vec()));
        rest = tail;
    }
    pieces.push(Ok(rest.to_vec()));
    if broken_off {
        pieces.push(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the upload broke off",
        )));
    }
    Body::from_stream(tokio_stream::iter(pieces))
}
