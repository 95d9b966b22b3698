//! The one ingest path, transport-free: what happens to an authenticated delivery.
//!
//! A body is validated into a [`Delivery`] by Gameball's rules ([`payload`], every error naming
//! the field), then recorded ([`Ingest::record`]: applied, unchanged, or another topic
//! acknowledged and not applied): through the sequencer and its local journal on a single
//! node, or, in replicated mode, through the replica's publisher (the update goes to the
//! stream, and the answer waits until this replica has applied it). Both answer the same
//! [`Applied`], so nothing above this module knows which mode runs. A body that fails validation was authenticated,
//! so it is kept as a dead letter before anyone is answered ([`Ingest::accept`]); replaying a
//! dead letter ([`Ingest::replay`]) takes the same validate-then-record path, minus the
//! signature, which was checked when the body arrived.
//!
//! Both adapters call this: the HTTP ingress (`crate::webhook`) after its checks of method,
//! media type, size and signature, and the AdminService (`crate::grpc::dead_letters`) to replay
//! a letter. Neither keeps rules of its own, and this module knows nothing of HTTP or gRPC:
//! transport-level refusals (too large, not JSON, unauthenticated) are the adapters' own
//! (`crate::status::Rejection`).

pub mod payload;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::dead_letters::{DeadLetterId, DeadLetters};
use crate::error::Error;
use crate::logging::RateLimited;
use crate::metrics::Metrics;
use crate::profile::ProfileUpdate;
use crate::replication::Publisher;
use crate::sequencer::{Applied, Sequencer};
pub use payload::Delivery;

/// What became of an applicable delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A profile update, recorded: changed (with its revision) or unchanged.
    Applied(Applied),
    /// Another topic, acknowledged and not applied; its `event`.
    Ignored(String),
}

/// `applied at revision 5`, `unchanged at revision 3`, `ignored event customer.x`: for logs.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Applied(applied) => applied.fmt(f),
            Outcome::Ignored(event) => write!(f, "ignored event {event}"),
        }
    }
}

/// Validates an authenticated body, parsed once by the caller: not JSON, or a field that
/// breaks a rule, is an [`Error::InvalidArgument`] naming the field. The first half of the path
/// every authenticated body takes, on arrival and on a dead letter's replay.
pub fn validate(
    raw: &[u8],
    parsed: Result<&serde_json::Value, &serde_json::Error>,
) -> Result<Delivery, Error> {
    let parsed = parsed.map_err(|err| {
        payload::too_deep(raw, err)
            .or_else(|| payload::out_of_range(raw, err))
            .unwrap_or_else(|| Error::invalid("body", not_json(raw, err)))
    })?;
    payload::parse(parsed)
}

/// The UTF-8 encoding of U+FEFF, the byte-order mark.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// How far ahead of this server's clock a delivery's `created_at` may be. Gameball's clocks
/// and ours differ by seconds; a day ahead is a clock gone wrong, and such an update's fields
/// would win the merge over every update (and every reconciliation) until that time came:
/// the profile would freeze, silently (found by an adversarial run).
pub const MAX_CLOCK_LEAD: Duration = Duration::from_secs(24 * 3600);

/// Refuses `update` if its `created_at` is more than [`MAX_CLOCK_LEAD`] ahead of `now`, naming
/// the field: kept as a dead letter, it can be replayed once its time has come.
pub fn check_clock_lead(update: &ProfileUpdate, now: DateTime<Utc>) -> Result<(), Error> {
    let ahead = update.at.signed_duration_since(now);
    match ahead.to_std() {
        Ok(ahead) if ahead > MAX_CLOCK_LEAD => Err(Error::invalid(
            "created_at",
            format!(
                "is {} ahead of this server's clock, more than the {} allowed: its fields would \
                 win over every update until then (check the sender's clock, and this server's)",
                humantime::format_duration(Duration::from_secs(ahead.as_secs())),
                humantime::format_duration(MAX_CLOCK_LEAD)
            ),
        )),
        _ => Ok(()),
    }
}

/// Why a body is not JSON. serde_json calls a `\u` escape of half a UTF-16 surrogate pair
/// (`"\ud800"` with no low half after it) an "unexpected end of hex escape", which reads as a
/// cut-off escape: the answer names the likelier cause first. A body that starts with a UTF-8
/// byte-order mark is named so: serde_json's "expected value at line 1 column 1" points at
/// a character editors do not show (found by a first-user review). It is refused, not skipped:
/// JSON sent over a network has no byte-order mark (RFC 8259, section 8.1), Gameball sends
/// none, and the signature covers the body's bytes as they are.
fn not_json(raw: &[u8], err: &serde_json::Error) -> String {
    if raw.starts_with(UTF8_BOM) {
        return "not JSON: it starts with a UTF-8 byte-order mark (EF BB BF), which JSON sent \
                over a network must not have; send the body without it"
            .to_owned();
    }
    let reason = err.to_string();
    if reason.contains("hex escape") {
        return format!(
            "not JSON: a \\u escape is not a whole Unicode character (half of a UTF-16 \
             surrogate pair, or cut short): {reason}"
        );
    }
    format!("not JSON: {reason}")
}

/// How a string from a delivery (its `event`, its `client_id`) may appear in a log line: as
/// it is when it looks like a name (at most 64 ASCII letters, digits and `._-:`), otherwise
/// only its length. Such a string is the sender's: written as it is, a newline would forge a
/// log line, an escape sequence would reach the operator's terminal, and an e-mail address put
/// there would land in the logs.
pub fn loggable(text: &str) -> std::borrow::Cow<'_, str> {
    let name_like = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':');
    if !text.is_empty() && text.len() <= 64 && text.chars().all(name_like) {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(format!("<withheld: {} bytes>", text.len()))
    }
}

/// The ingest path's handle: what it records through and the dead letters it keeps. Cloning
/// it clones four handles (a few reference counts).
#[derive(Clone)]
pub struct Ingest {
    recorder: Recorder,
    dead_letters: DeadLetters,
    metrics: Metrics,
    /// Bodies that could not be kept as dead letters are logged at most every 10 s: while the
    /// letters cannot be written (a replica's bucket without a stream leader, a full disk)
    /// that was an ERROR per webhook, 145 in a second (found by an adversarial run).
    keep_failures: Arc<RateLimited>,
}

/// Where updates are recorded.
#[derive(Clone)]
enum Recorder {
    /// A single node: the sequencer and its journal.
    Local(Sequencer),
    /// A replica: the stream, then this replica's apply.
    Replicated(Publisher),
}

impl Ingest {
    /// Records through `sequencer`, keeps what cannot be applied in `dead_letters`, and counts
    /// the letters it keeps in `metrics`.
    pub fn new(sequencer: Sequencer, dead_letters: DeadLetters, metrics: Metrics) -> Ingest {
        Ingest {
            recorder: Recorder::Local(sequencer),
            dead_letters,
            metrics,
            keep_failures: Arc::default(),
        }
    }

    /// Records through a replica's `publisher` (replicated mode); otherwise as [`Ingest::new`].
    pub fn replicated(publisher: Publisher, dead_letters: DeadLetters, metrics: Metrics) -> Ingest {
        Ingest {
            recorder: Recorder::Replicated(publisher),
            dead_letters,
            metrics,
            keep_failures: Arc::default(),
        }
    }

    /// The dead letters this path keeps.
    pub fn dead_letters(&self) -> &DeadLetters {
        &self.dead_letters
    }

    /// The same path, keeping dead letters in `dead_letters` instead.
    pub fn with_dead_letters(self, dead_letters: DeadLetters) -> Ingest {
        Ingest {
            dead_letters,
            ..self
        }
    }

    /// Takes an authenticated body (`raw`) and what validating it gave: records a valid
    /// delivery, or keeps the body as a dead letter and answers [`Error::DeadLettered`] (or
    /// [`Error::Unavailable`] if it could not be kept, so the sender retries). A valid delivery
    /// that recording refuses (it would grow its profile past the bound) is kept too.
    pub async fn accept(
        &self,
        raw: &[u8],
        validated: Result<Delivery, Error>,
    ) -> Result<Outcome, Error> {
        let cause = match validated {
            Ok(delivery) => match self.record(delivery).await {
                Err(refused @ Error::InvalidArgument { .. }) => refused,
                recorded => return recorded,
            },
            Err(cause) => cause,
        };
        Err(self.dead_letter(raw, cause).await)
    }

    /// Applies a validated delivery (another topic is only acknowledged) and returns once it is
    /// recorded and visible here. The second half of the path. [`Error::InvalidArgument`] (on
    /// `data`) when the update would grow its profile past the bound
    /// (`crate::profile::check_growth`), or (on `created_at`) when it is too far ahead of this
    /// server's clock ([`check_clock_lead`]): refused whole, nothing recorded.
    pub async fn record(&self, delivery: Delivery) -> Result<Outcome, Error> {
        match delivery {
            Delivery::Other { event } => {
                let logged = loggable(&event);
                tracing::debug!(event = %logged, "ignored a webhook of another topic");
                Ok(Outcome::Ignored(event))
            }
            Delivery::ProfileUpdated(update) => {
                check_clock_lead(&update, Utc::now())?;
                let client_id = update.key.client_id.clone();
                let applied = self.apply(update).await?;
                let client_id = loggable(&client_id);
                tracing::debug!(%client_id, %applied, "webhook applied");
                Ok(Outcome::Applied(applied))
            }
        }
    }

    /// Records an update and returns once it is recorded and visible here: through the
    /// sequencer on a single node, through the stream on a replica. Webhooks come here through
    /// [`Ingest::record`]; reconcile jobs (`crate::reconcile`) directly, so that a replica's
    /// corrections reach every replica too.
    pub async fn apply(&self, update: ProfileUpdate) -> Result<Applied, Error> {
        match &self.recorder {
            Recorder::Local(sequencer) => sequencer.apply(update).await,
            Recorder::Replicated(publisher) => publisher.apply(update).await,
        }
    }

    /// Keeps an authenticated body that cannot be applied; the error to answer with.
    async fn dead_letter(&self, raw: &[u8], cause: Error) -> Error {
        match self
            .dead_letters
            .store(raw, &cause, chrono::Utc::now())
            .await
        {
            Ok(id) => {
                self.metrics.dead_letter();
                // WARN: Gameball will not send it again, so someone must replay or purge it
                // (it was INFO: found by a first-user review).
                tracing::warn!(
                    dead_letter_id = %id,
                    error = %cause,
                    "kept a delivery that cannot be applied as a dead letter"
                );
                Error::DeadLettered {
                    id: id.to_string(),
                    cause: Box::new(cause),
                }
            }
            Err(error) => {
                if let Some(suppressed) = self.keep_failures.due() {
                    tracing::error!(
                        %error,
                        suppressed,
                        "could not keep a delivery that cannot be applied; answering 503 so the \
                         sender retries (logged at most every 10 s; `suppressed`: since the last)"
                    );
                }
                Error::Unavailable {
                    reason: "the delivery cannot be applied and could not be kept as a dead \
                             letter; retry later"
                        .into(),
                }
            }
        }
    }

    /// Replays the dead letter `id` through the path a webhook takes: still invalid (or refused
    /// by the record), it stays kept with the new reason ([`Error::DeadLettered`]); valid now, it is recorded and then
    /// removed. The letter is claimed first, so two replicas replaying it at once apply it once
    /// (the other gets [`Error::DeadLetterBeingReplayed`]). Applied first, removed second: if
    /// the removal fails, replaying again is harmless (the update is then unchanged).
    pub async fn replay(&self, id: &DeadLetterId) -> Result<Outcome, Error> {
        let claim = self.dead_letters.claim(id).await?;
        let parsed = serde_json::from_slice::<serde_json::Value>(&claim.letter.body);
        let recorded = match validate(&claim.letter.body, parsed.as_ref()) {
            Ok(delivery) => self.record(delivery).await,
            Err(cause) => Err(cause),
        };
        let outcome = match recorded {
            Ok(outcome) => outcome,
            // Invalid still, or refused by the record: kept, with the reason of this attempt.
            Err(cause @ Error::InvalidArgument { .. }) => {
                self.dead_letters.release(claim, Some(&cause)).await?;
                tracing::info!(
                    dead_letter_id = %id,
                    error = %cause,
                    "replayed dead letter still cannot be applied"
                );
                return Err(Error::DeadLettered {
                    id: id.to_string(),
                    cause: Box::new(cause),
                });
            }
            Err(error) => {
                if let Err(release) = self.dead_letters.release(claim, None).await {
                    tracing::warn!(dead_letter_id = %id, error = %release, "could not release a replay's claim; it expires");
                }
                return Err(error);
            }
        };
        self.dead_letters.finish(claim).await?;
        tracing::info!(dead_letter_id = %id, %outcome, "dead letter replayed and removed");
        Ok(outcome)
    }
}
