//! The webhook ingress: `POST /webhooks/gameball`, the HTTP adapter in front of the sequencer.
//!
//! In order: Content-Type and Content-Encoding (415), a transfer-coding besides chunked (501),
//! the body, whole within its deadline (408) and within the size limit (413), the in-flight cap
//! (503 + `Retry-After`), signature (401: with the default secrets, or with the secrets of the
//! body's `client_id` when accounts have their own; 503 when a body whose bytes match no
//! secret cannot have its compact form checked now), JSON and field validation, then the
//! sequencer, whose answer is awaited within the request timeout (503, saying it may still be
//! recorded). Only complete bodies hold in-flight slots, so unauthenticated slow uploads cannot
//! starve signed deliveries. A body is not read before its signature matches (its raw bytes,
//! or its compact form, written in one pass: `stringify`, off the ingest thread and one at a
//! time, as it costs up to twenty times more); with account secrets, its
//! `client_id` comes from a walk of its top-level keys (`client_hint`), and the body read
//! must name the same. Read, it goes in one pass into its fields (`payload::Envelope`); only a
//! body that pass declines is parsed into a `serde_json::Value`.
//! What happens to an authenticated body is the ingest path's (`crate::ingest`, shared with a
//! dead letter's replay): validated, then recorded, or kept as a dead letter and answered 422
//! with its id (503 if it could not be kept). The answer is 200 only after the sequencer has
//! recorded the update and made it visible, so a 2xx means recorded. A refused signature is
//! logged at WARN with the claimed `client_id` and the reason, at most once per interval
//! (`rejection_log`). Nothing here merges or stores; statuses come from `crate::status`, the
//! one place that maps errors for both HTTP and gRPC.

pub mod client_hint;
mod compact_checks;
mod rejection_log;
pub mod secrets;
pub mod signature;
mod stringify;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::post;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::dead_letters::DeadLetters;
use crate::error::Error;
use crate::ingest::payload::{self, Delivery};
use crate::ingest::{self, Ingest, Outcome};
use crate::metrics::Metrics;
use crate::sequencer::{Applied, Sequencer};
use crate::status::{self, Rejection};
use compact_checks::CompactChecks;
use rejection_log::RejectionLog;
use secrets::{SecretStore, Secrets};
use signature::Signed;

/// The path Gameball posts to.
pub const PATH: &str = "/webhooks/gameball";

/// How deliveries are authenticated.
pub enum Verification {
    /// Check `X-GB-Signature` against the secrets of the delivery's `client_id`.
    Secrets(SecretStore),
    /// Accept unsigned deliveries (`--insecure-skip-signature`, development only).
    Skip,
}

/// Bounds on what one delivery, and all of them together, may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest body accepted (413 past it).
    pub max_body_bytes: usize,
    /// Most deliveries handled at once (503 with `Retry-After` past it).
    pub max_in_flight: usize,
    /// Longest a delivery's body may take to arrive whole (408 past it), before it holds a
    /// slot.
    pub body_timeout: Duration,
    /// Longest the ingest path may take to confirm a delivery before it is answered 503
    /// (saying it may still be recorded).
    pub timeout: Duration,
}

/// What the handler needs: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Ingress {
    ingest: Ingest,
    verification: Arc<Verification>,
    limits: Limits,
    in_flight: Arc<Semaphore>,
    metrics: Metrics,
    /// Refused signatures, logged at WARN at most once per interval.
    rejections: Arc<RejectionLog>,
    /// Where a signature is checked over a body's compact form ([`Ingress::verify`]).
    compact_checks: Arc<CompactChecks>,
    /// Cancelled when the server stops: a delivery still waiting for that check is answered
    /// 503 at once rather than holding the stop's grace.
    stopping: CancellationToken,
}

impl Ingress {
    /// An ingress that authenticates with `verification` and hands updates to `sequencer`.
    /// Deliveries that cannot be applied are kept in memory until
    /// [`with_dead_letters`](Ingress::with_dead_letters) says where.
    pub fn new(
        sequencer: Sequencer,
        verification: Verification,
        limits: Limits,
        metrics: Metrics,
    ) -> Self {
        let ingest = Ingest::new(sequencer, DeadLetters::in_memory(), metrics.clone());
        Ingress::with_ingest(ingest, verification, limits, metrics)
    }

    /// An ingress that authenticates with `verification` and hands what it authenticated to
    /// `ingest` (the server shares one with the AdminService).
    pub fn with_ingest(
        ingest: Ingest,
        verification: Verification,
        limits: Limits,
        metrics: Metrics,
    ) -> Self {
        Ingress {
            compact_checks: Arc::new(CompactChecks::new(limits.max_in_flight, metrics.clone())),
            ingest,
            verification: Arc::new(verification),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            limits,
            metrics,
            rejections: Arc::default(),
            stopping: CancellationToken::new(),
        }
    }

    /// Answers 503 at once, from when `stopping` is cancelled, a delivery still waiting for its
    /// check over the compact form: a queue of refused 16 MiB bodies otherwise held the stop
    /// for its whole grace, answered one by one (found by an adversarial run).
    pub fn with_stopping(mut self, stopping: CancellationToken) -> Self {
        self.stopping = stopping;
        self
    }

    /// Keeps deliveries that cannot be applied in `dead_letters`.
    pub fn with_dead_letters(mut self, dead_letters: DeadLetters) -> Self {
        self.ingest = self.ingest.with_dead_letters(dead_letters);
        self
    }

    /// The axum router serving the webhook path.
    pub fn router(self) -> Router {
        // Behind one `Arc`: axum clones the state for every request, and a clone of the
        // handle itself is a dozen reference counts, some on lines other threads write too
        // (the sequencer's and dead letters' handles).
        Router::new()
            .route(PATH, post(receive))
            .with_state(Arc::new(self))
    }
}

async fn receive(State(ingress): State<Arc<Ingress>>, request: Request) -> Response {
    let started = Instant::now();
    // The request taken whole: axum's `HeaderMap` extractor clones the headers (two vectors
    // copied and freed per webhook).
    let (parts, body) = request.into_parts();
    let handled = ingress.handle(&parts.headers, body).await;
    let (label, response) = match handled {
        Ok(Outcome::Applied(Applied::Changed { revision })) => {
            ("applied", recorded("applied", revision))
        }
        Ok(Outcome::Applied(Applied::Unchanged { revision })) => {
            ("unchanged", recorded("unchanged", revision))
        }
        Ok(Outcome::Ignored(event)) => (
            "ignored",
            (
                StatusCode::OK,
                Json(json!({"outcome": "ignored", "event": event})),
            )
                .into_response(),
        ),
        Err(error) => {
            if matches!(error, Rejection::Unauthenticated { .. }) {
                ingress.metrics.signature_failure();
            }
            let label = match error {
                Rejection::Domain(Error::Unavailable { .. }) => "unavailable",
                _ => "rejected",
            };
            (label, error_response(&error))
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    ingress
        .metrics
        .webhook(label, response.status().as_u16(), seconds);
    response
}

/// `{"outcome":"applied","revision":N}` (or `unchanged`), written out directly: the answer to
/// almost every delivery, so it is not built as a `serde_json::Value` and serialized.
fn recorded(outcome: &'static str, revision: u64) -> Response {
    // Room for the longest: `unchanged` and a 20-digit revision.
    let mut body = String::with_capacity(64);
    body.push_str(r#"{"outcome":""#);
    body.push_str(outcome);
    body.push_str(r#"","revision":"#);
    body.push_str(itoa::Buffer::new().format(revision));
    body.push('}');
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A body read once: in one pass into its fields when it can be, else into a `Value`.
enum Parsed<'a> {
    /// The usual case: one JSON object with each field at most once.
    Envelope(payload::Envelope<'a>),
    /// Anything else, or not JSON: [`ingest::validate`] answers it as it always has. With
    /// the raw body, for a `client_id` serde_json could not read (`client_hint`).
    General(Result<serde_json::Value, serde_json::Error>, &'a [u8]),
}

impl<'a> Parsed<'a> {
    fn read(raw: &'a [u8]) -> Parsed<'a> {
        match payload::Envelope::read(raw) {
            Some(envelope) => Parsed::Envelope(envelope),
            None => Parsed::General(serde_json::from_slice(raw), raw),
        }
    }

    fn client_id(&self) -> Option<&str> {
        match self {
            Parsed::Envelope(envelope) => envelope.client_id(),
            Parsed::General(Ok(parsed), _) => parsed.get("client_id")?.as_str(),
            Parsed::General(Err(_), raw) => client_hint::client_id(raw),
        }
    }

    fn validate(&self, raw: &[u8]) -> Result<Delivery, Error> {
        match self {
            Parsed::Envelope(envelope) => envelope.validate(),
            Parsed::General(parsed, _) => ingest::validate(raw, parsed.as_ref()),
        }
    }
}

/// A refusal of a body signed over its compact form, saying so when the field it names is a
/// number there that JavaScript changed: it reads numbers as doubles, so
/// `9223372036854775807` is `9223372036854776000` in the form the signature covers, and "out
/// of range" named a range the sender's own number was in (found by an adversarial run).
/// Neither value is quoted: a field's value may be personal data, and an echoed object made
/// answers and log lines twice a body's size (both found by an adversarial run).
fn as_signed(error: Error, raw: &[u8], compact: &[u8]) -> Error {
    let Error::InvalidArgument { field, reason } = error else {
        return error;
    };
    let pointer: String = field
        .split('.')
        .map(|key| format!("/{}", key.replace('~', "~0").replace('/', "~1")))
        .collect();
    let number_at = |body: &[u8]| {
        let body: serde_json::Value = serde_json::from_slice(body).ok()?;
        body.pointer(&pointer)?.as_number().cloned()
    };
    let reason = match (number_at(compact), number_at(raw)) {
        (Some(signed), Some(sent)) if !same_number(&signed, &sent) => format!(
            "{reason} (as the signature covers it: JavaScript's JSON.stringify of the body, \
             which reads every number as a double, so that this one is not written as it \
             was sent; an integer past 2^53 is rounded)"
        ),
        _ => reason,
    };
    Error::InvalidArgument { field, reason }
}

/// Whether two numbers are the same value, however serde_json holds each: `3e9` as sent is a
/// float, `3000000000` in the compact form an integer, and the note blamed a rounding that
/// changed nothing (found by an adversarial run). Integers, and floats without a fraction,
/// are compared exactly; a float with one only with another float.
fn same_number(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    let whole = |number: &serde_json::Number| {
        let float = || {
            let value = number.as_f64()?;
            // Within i128, and whole: `as` is exact.
            (value.fract() == 0.0 && value.abs() < 1e38).then_some(value as i128)
        };
        (number.as_i64().map(i128::from))
            .or_else(|| number.as_u64().map(i128::from))
            .or_else(float)
    };
    match (whole(a), whole(b)) {
        (Some(a), Some(b)) => a == b,
        (None, None) => a.as_f64() == b.as_f64(),
        _ => false,
    }
}

impl Ingress {
    /// Every check, then the ingest path. Until the signature is checked the body is
    /// anybody's, so it must arrive whole within `--webhook-body-timeout` before it may take
    /// one of the in-flight slots: slow uploads cannot hold the slots signed deliveries need.
    async fn handle(&self, headers: &HeaderMap, body: Body) -> Result<Outcome, Rejection> {
        check_content_type(headers)?;
        check_declared_length(headers, self.limits.max_body_bytes)?;
        let raw = read_body(body, self.limits.max_body_bytes, self.limits.body_timeout).await?;
        let _slot = Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| {
                Rejection::from(Error::Unavailable {
                    reason: format!(
                        "too many webhooks in flight (limit {}, --max-in-flight-webhooks); retry \
                         shortly",
                        self.limits.max_in_flight
                    ),
                })
            })?;
        let (signed, parsed) = match &*self.verification {
            Verification::Secrets(secrets) => {
                let verified = self.authenticate(secrets.current(), headers, &raw).await?;
                // Who depends on the compact form's check (slower, at nice 10, its queue
                // bounded) shows in the metrics.
                let compact = matches!(verified.0, Signed::Compact(_));
                self.metrics.signature_verified(compact);
                verified
            }
            Verification::Skip => (Signed::Raw, None),
        };
        // What the signature covers is what a dead letter keeps (`Signed::Compact`), and what
        // is applied: JSON.stringify rounds numbers (an integer past 2^53, `1.0` written `1`),
        // so the raw bytes can say what the signature does not, and a replay of the letter
        // reads the compact form.
        let (body, delivery) = match &signed {
            Signed::Raw => {
                let parsed = parsed.unwrap_or_else(|| Parsed::read(&raw));
                (&raw[..], parsed.validate(&raw))
            }
            Signed::Compact(compact) => {
                let delivery = Parsed::read(compact).validate(compact);
                let delivery = delivery.map_err(|error| as_signed(error, &raw, compact));
                (&compact[..], delivery)
            }
        };
        // Authenticated from here on (or unsigned by choice): the ingest path decides. Once
        // it has the update, the sequencer may record it whenever the answer comes, so a
        // timeout must not claim it was not recorded.
        let timeout = self.limits.timeout;
        match tokio::time::timeout(timeout, self.ingest.accept(body, delivery)).await {
            Ok(outcome) => Ok(outcome?),
            Err(_) => Err(Rejection::from(Error::Unavailable {
                reason: format!(
                    "the webhook was not confirmed within {timeout:?}; it may still be \
                     recorded: retry it, a repeated delivery changes nothing"
                ),
            })),
        }
    }

    /// Checks `X-GB-Signature` over `raw` with `secrets`, and says what it covers. A body is
    /// not read before it is authenticated: a refused body costs its hash and its compact
    /// form's, that form written as the body is read once (reading the body first built a
    /// `Value` of every key the envelope does not model: a 16 MiB body of small numbers took
    /// 1.2 GB, found by an adversarial run), and off this thread ([`Ingress::verify`]). With
    /// account secrets the body's `client_id` chooses them, found by a walk of its top-level
    /// keys (`client_hint::named_client_id`); once the signature holds, the body is read and
    /// must name the same `client_id`, or the secrets that checked it were not its account's.
    /// Returns the body read, when it was.
    async fn authenticate<'a>(
        &self,
        secrets: Arc<Secrets>,
        headers: &HeaderMap,
        raw: &'a Bytes,
    ) -> Result<(Signed, Option<Parsed<'a>>), Rejection> {
        let mut signatures = headers.get_all(signature::HEADER).iter();
        let claimed = signatures
            .next()
            .map(|value| value.to_str().unwrap_or_default());
        if signatures.next().is_some() {
            // Which one to check is anybody's guess, as with two Content-Types.
            let reason = "X-GB-Signature appears more than once; send one";
            // For a log line, at most one per interval, and by a walk of the top-level keys,
            // not a parse: the first refusal in an interval would otherwise read the body.
            self.rejections
                .refused(|| client_hint::named_client_id(raw), reason);
            return Err(Rejection::Unauthenticated { reason });
        }
        let refused = |refusal: &Rejection, client_id: &dyn Fn() -> Option<String>| {
            if let Rejection::Unauthenticated { reason } = refusal {
                self.rejections.refused(client_id, reason);
            }
        };
        if !secrets.has_account_secrets() && !secrets.for_client(None).is_empty() {
            // Every delivery is checked against the defaults, whatever it names.
            let verdict = self.verify(secrets, Signer::Defaults, claimed, raw).await;
            return verdict
                .map(|signed| (signed, None))
                .inspect_err(|refusal| refused(refusal, &|| client_hint::named_client_id(raw)));
        }
        // The client_id is only a hint for choosing secrets: the signature then covers the
        // whole body.
        let named = client_hint::named_client_id(raw);
        if secrets.for_client(named.as_deref()).is_empty() {
            // Nothing to check with: not a bad signature, an account missing from the secrets
            // file (or a body that names none).
            return Err(self.refuse_unknown(secrets, named, claimed, raw).await);
        }
        let signer = Signer::Account(named.as_deref());
        let signed = self.verify(secrets, signer, claimed, raw).await;
        let signed = signed.inspect_err(|refusal| refused(refusal, &|| named.clone()))?;
        let parsed = self.same_client_id(&signed, named, raw)?;
        Ok((signed, parsed))
    }

    /// The answer to a delivery no secret applies to: its `client_id` named none configured
    /// (checked against a secret nobody knows, as an account's delivery would be against its
    /// own, so that neither the answer nor its time tells which accounts are configured), or
    /// could not be read (refused at once: no account to choose by). The log tells them apart.
    async fn refuse_unknown(
        &self,
        secrets: Arc<Secrets>,
        named: Option<String>,
        claimed: Option<&str>,
        raw: &Bytes,
    ) -> Rejection {
        let mismatch = Rejection::Unauthenticated {
            reason: signature::MISMATCH,
        };
        let Some(client_id) = named else {
            let reason = signature::UNREADABLE_CLIENT_ID;
            self.rejections.no_secret(None, reason);
            return Rejection::Unauthenticated { reason };
        };
        let refusal = match self.verify(secrets, Signer::Unknown, claimed, raw).await {
            Err(refusal @ Rejection::Unauthenticated { .. }) => refusal,
            // Not checked (503): not refused either, so not logged as refused (a 503 was
            // logged "no secret for the account", found by an adversarial run).
            Err(not_checked) => return not_checked,
            // Refused all the same if it matched.
            Ok(_) => mismatch,
        };
        let why = signature::NO_SECRET_FOR_CLIENT;
        self.rejections.no_secret(Some(&client_id), why);
        refusal
    }

    /// Whether the body `signed` covers names the `client_id` its secrets were chosen by:
    /// the body read (its bytes, when they are what is signed), or 401.
    fn same_client_id<'a>(
        &self,
        signed: &Signed,
        named: Option<String>,
        raw: &'a [u8],
    ) -> Result<Option<Parsed<'a>>, Rejection> {
        // The body as it will be read: its bytes, or the compact form (read again by the
        // caller, from the bytes `signed` owns).
        let (parsed, same_client_id) = match signed {
            Signed::Raw => {
                let parsed = Parsed::read(raw);
                let same = parsed.client_id() == named.as_deref();
                (Some(parsed), same)
            }
            Signed::Compact(compact) => {
                let read = Parsed::read(compact);
                (None, read.client_id() == named.as_deref())
            }
        };
        if !same_client_id {
            // Only a body that is not JSON can get here (a key repeated or written with
            // escapes beside the damage): refused as when its parse chose the secrets.
            let reason = "the body's client_id reads differently from its top-level keys";
            self.rejections.refused(|| named, reason);
            return Err(Rejection::Unauthenticated {
                reason: signature::MISMATCH,
            });
        }
        Ok(parsed)
    }

    /// `signature::verify` of `raw` under `signer`'s secrets, its compact form written off
    /// this thread (the ingest thread, which answers every webhook and, on a single node,
    /// records them), on spare CPU: `compact_checks` says why.
    async fn verify(
        &self,
        secrets: Arc<Secrets>,
        signer: Signer<&str>,
        claimed: Option<&str>,
        raw: &Bytes,
    ) -> Result<Signed, Rejection> {
        let claimed = match signature::check_raw(signer.checks(&secrets), claimed, raw) {
            signature::RawCheck::Decided(verdict) => return verdict,
            signature::RawCheck::Unmatched(claimed) => claimed,
        };
        let (size, raw, signer) = (raw.len(), raw.clone(), signer.to_owned());
        let check = move || {
            let compact = signature::compact_body(&raw);
            let checks = signer.checks(&secrets);
            signature::check_compact(checks, secrets.most_checks(), &claimed, &raw, compact)
        };
        let not_made = |why: String| {
            Rejection::from(Error::Unavailable {
                reason: format!(
                    "the body's bytes match no webhook secret, and its check over the compact \
                     form (JSON.stringify of the body) was not made: {why}; retry shortly"
                ),
            })
        };
        let timeout = self.limits.timeout;
        // Dropped here, a check not yet under way is never run.
        tokio::select! {
            checked = self.compact_checks.run(size, check) => checked?,
            () = self.stopping.cancelled() => Err(not_made("the server is stopping".into())),
            // Behind a queue of refused 16 MiB bodies one waited 14.5 s, holding its slot and
            // its body (found by an adversarial run).
            () = tokio::time::sleep(timeout) => Err(not_made(format!(
                "it did not end within --webhook-timeout ({})",
                humantime::format_duration(timeout)
            ))),
        }
    }
}

/// Whose secrets a delivery is checked with: `Signer<&str>` where it is chosen, and owned
/// (`Signer<String>`) by a check made on another thread.
enum Signer<C> {
    /// The defaults (no account has secrets of its own).
    Defaults,
    /// The secrets of the account the body's `client_id` names (the defaults when it names
    /// none, or one without secrets of its own).
    Account(Option<C>),
    /// A secret nobody knows: no secret applies to the `client_id` it names.
    Unknown,
}

impl<C: AsRef<str>> Signer<C> {
    fn checks<'s>(&self, secrets: &'s Secrets) -> &'s [signature::SignatureCheck] {
        match self {
            Signer::Defaults => secrets.for_client(None),
            Signer::Account(client_id) => secrets.for_client(client_id.as_ref().map(C::as_ref)),
            Signer::Unknown => signature::unknown(),
        }
    }

    fn to_owned(&self) -> Signer<String> {
        match self {
            Signer::Defaults => Signer::Defaults,
            Signer::Account(client_id) => {
                Signer::Account(client_id.as_ref().map(|id| id.as_ref().to_owned()))
            }
            Signer::Unknown => Signer::Unknown,
        }
    }
}

/// A missing Content-Type is accepted (some senders omit it); anything but JSON is not. Nor is
/// a compressed body: Gameball documents none, and decoding one would let a small upload
/// expand past the body limit, so it is refused (415) rather than read as bytes and kept as a
/// dead letter. Every Content-Encoding line is checked (a second line adds an encoding), and
/// two Content-Type lines are refused: which one holds is anybody's guess. A transfer-coding
/// other than `chunked` (which the HTTP layer undoes) is refused the same way.
fn check_content_type(headers: &HeaderMap) -> Result<(), Rejection> {
    for codings in headers.get_all(header::TRANSFER_ENCODING) {
        let text = String::from_utf8_lossy(codings.as_bytes());
        if let Some(coding) = text
            .split(',')
            .map(str::trim)
            .find(|coding| !coding.eq_ignore_ascii_case("chunked"))
        {
            // Bounded: it is echoed in the answer.
            let coding = coding.chars().take(64).collect();
            return Err(Rejection::UnsupportedTransferCoding { coding });
        }
    }
    for encoding in headers.get_all(header::CONTENT_ENCODING) {
        let text = String::from_utf8_lossy(encoding.as_bytes());
        if !text.trim().eq_ignore_ascii_case("identity") {
            // Bounded: it is echoed in the answer.
            let encoding = text.chars().take(64).collect();
            return Err(Rejection::UnsupportedContentEncoding { encoding });
        }
    }
    let mut content_types = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = content_types.next() else {
        return Ok(());
    };
    if content_types.next().is_some() {
        return Err(Rejection::RepeatedContentType);
    }
    let text = value.to_str().unwrap_or_default();
    let essence = text.split(';').next().unwrap_or_default().trim();
    // Compared without a lowercased copy: this runs for every delivery.
    let bytes = essence.as_bytes();
    let json_suffix = bytes.len() >= 5 && bytes[bytes.len() - 5..].eq_ignore_ascii_case(b"+json");
    if essence.eq_ignore_ascii_case("application/json") || json_suffix {
        return Ok(());
    }
    // The header's bytes, escaped (`\xff`): `to_str` gives nothing for a value that is not
    // visible ASCII, and the answer said `content-type ""` (found by an adversarial run).
    // Bounded, as it is echoed in the answer: its first 64 bytes, cut before they are escaped
    // (cut after, an escape could lose its end), and `...` if there were more.
    let bytes = value.as_bytes();
    let shown = &bytes[..bytes.len().min(64)];
    let mut content_type = shown.escape_ascii().to_string();
    if shown.len() < bytes.len() {
        content_type.push_str("...");
    }
    Err(Rejection::UnsupportedMediaType { content_type })
}

/// A Content-Length above the limit is refused before any of the body is read: the sender
/// learns it at once (and one that asked `Expect: 100-continue` is not invited to upload it).
/// An unreadable Content-Length is hyper's to refuse; a body without one is counted as read.
fn check_declared_length(headers: &HeaderMap, limit: usize) -> Result<(), Rejection> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => Err(Rejection::PayloadTooLarge { limit }),
        _ => Ok(()),
    }
}

/// The whole body, at most `limit` bytes (413 past it), within `deadline` (408 past it).
async fn read_body(body: Body, limit: usize, deadline: Duration) -> Result<Bytes, Rejection> {
    let read = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(Rejection::BodyTimeout { deadline });
    };
    read.map_err(|err| {
        let too_large = std::error::Error::source(&err)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large {
            Rejection::PayloadTooLarge { limit }
        } else {
            let why = crate::error::with_sources(&err);
            Error::invalid("body", format!("could not be read: {why}")).into()
        }
    })
}

/// `{"error": "...", "field": "..."}` with the status `crate::status` assigns; a 422 adds
/// `dead_letter_id`. A 503 also says when to come back.
fn error_response(error: &Rejection) -> Response {
    let mut body = json!({"error": error.to_string()});
    if let Some(field) = error.field() {
        body["field"] = json!(field);
    }
    if let Rejection::Domain(Error::DeadLettered { id, .. }) = error {
        body["dead_letter_id"] = json!(id);
    }
    let status = status::http_status(error);
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}
