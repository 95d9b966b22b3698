//! The service's error type: what went wrong, with the fields a caller needs to fix it.
//!
//! Domain code returns these; the adapters never invent their own. `crate::status` maps each
//! variant to an HTTP status and a gRPC code in one place, so the two surfaces cannot disagree.
//! Refusals at the transport level (unauthenticated, too large, not JSON, too many streams)
//! are not domain errors: they are `crate::status::Rejection`'s, made by the adapters.
//! Messages are lowercase, without trailing punctuation, and never contain personal data.

/// An error and its sources, `: `-separated, each source's message once: tonic's transport
/// errors, reqwest's and hyper's body errors hide their cause (a body whose chunked framing
/// was broken was answered "error reading a body from connection", found by an adversarial
/// run).
pub fn with_sources(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Everything a request can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A request field is missing, mistyped or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Which field, as the caller named it (`data.tier_order`, `page_size`).
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No profile with that key was ever applied.
    #[error(
        "no profile for client_id {:?} and customer_id {:?}",
        echoed(.client_id),
        echoed(.customer_id)
    )]
    NotFound {
        /// The account asked for.
        client_id: String,
        /// The customer asked for.
        customer_id: String,
    },
    /// A watch asked to start after the next revision.
    #[error("start_revision {requested} is beyond the next revision {next}")]
    RevisionInFuture {
        /// The requested start revision.
        requested: u64,
        /// The revision the next change will get.
        next: u64,
    },
    /// A watch asked for changes the history no longer holds and did not want a reset.
    #[error(
        "revision {requested} is no longer in history; the oldest available revision is \
         {oldest}: read the current state and watch from there"
    )]
    Compacted {
        /// The revision asked for.
        requested: u64,
        /// The oldest revision still in history.
        oldest: u64,
    },
    /// A watch asked to resume revisions of another store (another store id) and did not want
    /// a reset.
    #[error(
        "store_id {:?} is not this server's store ({current:?}): the revisions it \
         knows mean something else here; read the current state and watch from there",
        echoed(.requested)
    )]
    StoreChanged {
        /// The store id the watcher resumed with.
        requested: String,
        /// This server's store id.
        current: String,
    },
    /// A delivery with a valid signature that cannot be applied (it fails validation, or is a
    /// schema we do not understand); it is kept as the dead letter `id`, with this cause.
    #[error("{cause}")]
    DeadLettered {
        /// The dead letter holding the delivery (`crate::dead_letters::DeadLetterId`).
        id: String,
        /// Why it cannot be applied: a validation error naming the field.
        cause: Box<Error>,
    },
    /// No dead letter with that id is kept (never stored, replayed or purged).
    #[error("no dead letter {id:?}")]
    DeadLetterNotFound {
        /// The id asked for.
        id: String,
    },
    /// Another replay (on this server or another replica) claimed this dead letter (and may
    /// have replayed it already): one replay applies a letter, never two.
    #[error(
        "dead letter {id:?} is being replayed, or was just replayed, by another call (or \
         another replica); get it again to see whether it is still kept"
    )]
    DeadLetterBeingReplayed {
        /// The letter.
        id: String,
    },
    /// The dead-letter bucket's entry under this id is not a letter (a value put there by
    /// hand or by another tool): nothing can be shown or replayed; a purge removes it.
    #[error(
        "the dead-letter bucket's entry {id} is not a dead letter ({reason}); `dead-letters \
         purge {id}` removes it"
    )]
    DeadLetterUnreadable {
        /// Its key.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A read asked for a `min_revision` beyond the store's that it never assigned: on a single
    /// node at once (a webhook is answered only once its revision is visible), on a replica
    /// once it holds everything its cluster had acknowledged when the read came. No wait can
    /// bring it; only unrelated later writes would reach the number.
    #[error(
        "min_revision {requested} was never assigned by this store (its latest revision is \
         {current}): a revision of another store, or of this one before it was emptied"
    )]
    RevisionNeverAssigned {
        /// The `min_revision` asked for.
        requested: u64,
        /// The store's revision.
        current: u64,
    },
    /// A read asked for `min_revision`, and this server had not applied it by the call's
    /// deadline: a replica behind its cluster, or a revision not assigned yet.
    #[error(
        "revision {requested} is not applied here yet (applied revision {applied}); retry, \
         here or on another replica"
    )]
    RevisionNotApplied {
        /// The `min_revision` asked for.
        requested: u64,
        /// The revision this server had applied at the deadline.
        applied: u64,
    },
    /// A read was waiting for `min_revision` when this server began to stop: it ends at once
    /// rather than holding the stop (and the read) for the whole `--shutdown-grace`.
    #[error(
        "this server is stopping before it applied revision {requested} (applied revision \
         {applied}); retry on another replica"
    )]
    StoppedBeforeRevision {
        /// The `min_revision` asked for.
        requested: u64,
        /// The revision this server had applied when it began to stop.
        applied: u64,
    },
    /// Reconciliation was asked for an account without `[gameball_api."<client_id>"]` settings
    /// in the secrets file, or of a server given no secrets file at all (which the message
    /// says: "in the secrets file" sent a first-user review looking for a file there was not).
    #[error("{}", reconcile_not_configured(.client_id, *.secrets_file))]
    ReconcileNotConfigured {
        /// The account asked for.
        client_id: String,
        /// Whether the server has a secrets file (`--webhook-secrets-file`).
        secrets_file: bool,
    },
    /// A reconciliation job of the account is running already.
    #[error(
        "reconcile job {job_id} of client_id {:?} is still running",
        echoed(.client_id)
    )]
    ReconcileJobRunning {
        /// The account asked for.
        client_id: String,
        /// The running job.
        job_id: String,
    },
    /// A backup is being streamed already; one at a time.
    #[error(
        "a backup is being taken already (one at a time: each holds a copy of the state); \
         retry when it ends"
    )]
    BackupRunning,
    /// A backup's client took no piece for `--backup-stall-timeout`: the backup was
    /// abandoned, so that it no longer holds the one backup slot.
    #[error(
        "the client took no piece of the backup for {}s (--backup-stall-timeout): the backup \
         was abandoned; take it again",
        .timeout.as_secs_f64()
    )]
    BackupStalled {
        /// `--backup-stall-timeout`.
        timeout: std::time::Duration,
    },
    /// `--reconcile-max-jobs` jobs are running.
    #[error(
        "{max} reconcile jobs are running, the most allowed (--reconcile-max-jobs); retry later"
    )]
    TooManyReconcileJobs {
        /// The limit.
        max: usize,
    },
    /// A read's answer would be larger than a message may be (`--grpc-max-message-bytes`).
    #[error(
        "the answer would take at least {bytes} bytes, more than the {limit} a message may \
         carry (--grpc-max-message-bytes); ask for fewer {field}"
    )]
    ResponseTooLarge {
        /// The request field that decides how much is answered (`customer_ids`).
        field: String,
        /// How large the answer would be at least, encoded (counting stops past the limit).
        bytes: usize,
        /// The largest message allowed.
        limit: usize,
    },
    /// One profile, alone, takes more than a message may carry (`--grpc-max-message-bytes`):
    /// limits that allow it (warned at start-up), or a profile an earlier build let grow.
    #[error(
        "the profile of customer_id {:?} (client_id {:?}) at revision {revision} takes {bytes} \
         bytes, more than the {limit} a message may carry (--grpc-max-message-bytes): raise \
         that limit, on this server and on the client if its own is lower, to read it",
        echoed(.customer_id),
        echoed(.client_id)
    )]
    ProfileTooLarge {
        /// The profile's account.
        client_id: String,
        /// The profile's customer id.
        customer_id: String,
        /// The revision of the profile (or of the change) that does not fit.
        revision: u64,
        /// How large the message would be, encoded.
        bytes: usize,
        /// The largest message allowed.
        limit: usize,
    },
    /// No reconcile job with that id is kept (never started, or finished long ago).
    #[error("no reconcile job {:?}", echoed(.job_id))]
    ReconcileJobNotFound {
        /// The id asked for.
        job_id: String,
    },
    /// The service cannot take the request now; the caller should retry.
    #[error("{reason}")]
    Unavailable {
        /// Why, and what to do.
        reason: String,
    },
}

/// An update refused for growing its profile past the bound: the fault is in the webhook's
/// `data`, as with any other rule it breaks.
impl From<crate::profile::TooLarge> for Error {
    fn from(too_large: crate::profile::TooLarge) -> Self {
        Error::invalid("data", too_large.to_string())
    }
}

impl Error {
    /// An invalid-argument error for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The request field this error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument { field, .. } => Some(field),
            Error::DeadLettered { cause, .. } => cause.field(),
            Error::RevisionInFuture { .. } | Error::Compacted { .. } => Some("start_revision"),
            Error::RevisionNeverAssigned { .. } => Some("min_revision"),
            Error::StoreChanged { .. } => Some("store_id"),
            Error::ReconcileNotConfigured { .. } | Error::ReconcileJobRunning { .. } => {
                Some("client_id")
            }
            Error::ReconcileJobNotFound { .. } => Some("job_id"),
            Error::ResponseTooLarge { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// How many characters of a caller's text an error message repeats.
const ECHOED_CHARS: usize = 128;

/// The message of [`Error::ReconcileNotConfigured`].
fn reconcile_not_configured(client_id: &str, secrets_file: bool) -> String {
    let client_id = echoed(client_id);
    match secrets_file {
        true => format!(
            "client_id {client_id:?} has no [gameball_api] settings in the secrets file: \
             reconciliation needs its api_key and secret_key"
        ),
        false => format!(
            "client_id {client_id:?} cannot be reconciled: reconciliation needs \
             --webhook-secrets-file with a [gameball_api.{client_id:?}] table (api_key and \
             secret_key), and this server was given no secrets file"
        ),
    }
}

/// `text` as an error message repeats it: at most [`ECHOED_CHARS`] characters, then `…`. The
/// message travels in `grpc-message`, and gRPC's C core refuses metadata over 16 KiB: a caller
/// who sent a megabyte-long id must still be told NOT_FOUND, not RESOURCE_EXHAUSTED.
pub(crate) fn echoed(text: &str) -> std::borrow::Cow<'_, str> {
    cut_to(text, ECHOED_CHARS)
}

/// `text`, or its first `chars` characters then `…`.
pub(crate) fn cut_to(text: &str, chars: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(chars) {
        None => text.into(),
        Some((cut, _)) => format!("{}…", &text[..cut]).into(),
    }
}
