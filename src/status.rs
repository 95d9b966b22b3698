//! The one table from an error to an HTTP status and a gRPC status, so the webhook and the
//! gRPC API can never disagree on what an error means.
//!
//! Two kinds of error meet here: the domain's [`Error`], and [`Rejection`], which adds the
//! refusals an adapter makes at the transport level before a request reaches the domain (not
//! authenticated, not allowed from there, body too large, not JSON, compressed, too many watch streams). Both are mapped here and
//! nowhere else: adapters build every status they answer with through [`http_status`] and
//! [`grpc_status`].
//!
//! Validation errors carry the field: HTTP puts it in the JSON body (the webhook adapter does
//! that), gRPC in `google.rpc.BadRequest` details. A dead-lettered delivery is 422 over HTTP
//! (the webhook adds the dead letter's id) and FAILED_PRECONDITION over gRPC (a replay that
//! still fails), with `google.rpc.PreconditionFailure` naming the letter. A `min_revision` read
//! not served by its deadline is UNAVAILABLE with `google.rpc.ErrorInfo` holding the applied
//! revision. The descriptors of
//! those detail messages, which reflection serves so clients can decode them, come from here
//! too. Nothing else here.

use axum::http::StatusCode;
use prost::Message;
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// What an adapter refuses a request with: a domain [`Error`], or a refusal at the transport
/// level that never reaches the domain.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The domain refused or failed.
    #[error(transparent)]
    Domain(#[from] Error),
    /// A webhook's signature, or a gRPC call's bearer token, is missing or wrong.
    #[error("{reason}")]
    Unauthenticated {
        /// Which check failed (never the expected signature or token).
        reason: &'static str,
    },
    /// The caller may not use this service from where it is (AdminService from another machine
    /// on a server with no credentials configured).
    #[error("{reason}")]
    PermissionDenied {
        /// Why, and what the operator can configure.
        reason: &'static str,
    },
    /// The webhook body is larger than the configured limit.
    #[error("body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The webhook body did not arrive whole in time.
    #[error("the body did not arrive within {deadline:?}")]
    BodyTimeout {
        /// `--webhook-body-timeout`.
        deadline: std::time::Duration,
    },
    /// The webhook carries two Content-Type header lines.
    #[error("more than one content-type header; send one, application/json")]
    RepeatedContentType,
    /// The webhook's Content-Type is not JSON.
    #[error("content-type \"{content_type}\" is not JSON")]
    UnsupportedMediaType {
        /// What the request said, its bytes escaped as `escape_ascii` escapes them.
        content_type: String,
    },
    /// The webhook's body is compressed (`Content-Encoding`), which Gameball does not
    /// document: refused before anything reads it, never kept as a dead letter.
    #[error("content-encoding {encoding:?} is not supported; send the body uncompressed")]
    UnsupportedContentEncoding {
        /// What the request said.
        encoding: String,
    },
    /// The webhook's body carries a transfer-coding besides `chunked` (`Transfer-Encoding:
    /// gzip, chunked`): the HTTP layer takes the chunks apart and nothing would undo the
    /// rest, so it is refused (501, as RFC 9112 asks) rather than read as the bytes it is not.
    #[error("transfer-coding {coding:?} is not supported; send the body uncompressed")]
    UnsupportedTransferCoding {
        /// What the request said.
        coding: String,
    },
    /// `--max-watch-streams-per-connection` streams are open on this connection already.
    #[error(
        "too many watch streams open on this connection (limit {limit}, \
         --max-watch-streams-per-connection); open another connection or close a stream"
    )]
    TooManyConnectionWatchStreams {
        /// The limit.
        limit: usize,
    },
    /// `--max-watch-streams` streams are open already.
    #[error("too many watch streams open (limit {limit}, --max-watch-streams); retry later")]
    TooManyWatchStreams {
        /// The limit.
        limit: usize,
    },
    /// `limit` health `Watch` and reflection streams are open on this connection already.
    #[error(
        "too many health watch and reflection streams open on this connection (limit \
         {limit}, not configurable); close one, or open another connection"
    )]
    TooManyOpenStreams {
        /// The limit.
        limit: usize,
    },
    /// `limit` health `Check` calls are in progress on this connection already.
    #[error(
        "too many health checks in progress on this connection (limit {limit}, not \
         configurable): their answers wait for the client to read them; read them, or open \
         another connection"
    )]
    TooManyHealthChecks {
        /// The limit.
        limit: usize,
    },
}

impl Rejection {
    /// The request field this refusal is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Rejection::Domain(error) => error.field(),
            _ => None,
        }
    }
}

impl From<&Error> for Rejection {
    fn from(error: &Error) -> Rejection {
        Rejection::Domain(error.clone())
    }
}

impl From<&Rejection> for Rejection {
    fn from(rejection: &Rejection) -> Rejection {
        rejection.clone()
    }
}

/// The HTTP status for an error.
pub fn http_status(error: impl Into<Rejection>) -> StatusCode {
    match error.into() {
        Rejection::Domain(error) => match error {
            Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::RevisionInFuture { .. } | Error::RevisionNeverAssigned { .. } => {
                StatusCode::RANGE_NOT_SATISFIABLE
            }
            Error::Compacted { .. } | Error::StoreChanged { .. } => StatusCode::GONE,
            Error::DeadLettered { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::DeadLetterNotFound { .. } | Error::ReconcileJobNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            Error::ReconcileNotConfigured { .. } => StatusCode::PRECONDITION_FAILED,
            Error::ReconcileJobRunning { .. } | Error::DeadLetterBeingReplayed { .. } => {
                StatusCode::CONFLICT
            }
            // gRPC only (AdminService): DATA_LOSS pairs with 500.
            Error::DeadLetterUnreadable { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Error::TooManyReconcileJobs { .. } | Error::BackupRunning => {
                StatusCode::TOO_MANY_REQUESTS
            }
            // gRPC only (a streamed answer): as DEADLINE_EXCEEDED pairs with 408 for a request.
            Error::BackupStalled { .. } => StatusCode::REQUEST_TIMEOUT,
            // gRPC only (reads); as RESOURCE_EXHAUSTED pairs with 413 for a request.
            Error::ResponseTooLarge { .. } | Error::ProfileTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Error::Unavailable { .. }
            | Error::RevisionNotApplied { .. }
            | Error::StoppedBeforeRevision { .. } => StatusCode::SERVICE_UNAVAILABLE,
        },
        Rejection::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
        Rejection::PermissionDenied { .. } => StatusCode::FORBIDDEN,
        Rejection::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        Rejection::UnsupportedMediaType { .. }
        | Rejection::RepeatedContentType
        | Rejection::UnsupportedContentEncoding { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Rejection::UnsupportedTransferCoding { .. } => StatusCode::NOT_IMPLEMENTED,
        Rejection::TooManyWatchStreams { .. }
        | Rejection::TooManyConnectionWatchStreams { .. }
        | Rejection::TooManyOpenStreams { .. }
        | Rejection::TooManyHealthChecks { .. } => StatusCode::TOO_MANY_REQUESTS,
    }
}

/// The gRPC status for an error.
pub fn grpc_status(error: impl Into<Rejection>) -> tonic::Status {
    let rejection = error.into();
    let message = rejection.to_string();
    let code = match rejection {
        Rejection::Domain(error) => match error {
            Error::InvalidArgument { field, reason } => {
                let details = ErrorDetails::with_bad_request_violation(field, reason);
                return tonic::Status::with_error_details(
                    tonic::Code::InvalidArgument,
                    message,
                    details,
                );
            }
            Error::DeadLettered { id, cause } => {
                return tonic::Status::with_error_details(
                    tonic::Code::FailedPrecondition,
                    message,
                    dead_letter_details(&id, &cause),
                );
            }
            Error::RevisionNotApplied { requested, applied }
            | Error::StoppedBeforeRevision { requested, applied } => {
                return tonic::Status::with_error_details(
                    tonic::Code::Unavailable,
                    message,
                    revision_details(requested, applied),
                );
            }
            Error::NotFound { .. }
            | Error::DeadLetterNotFound { .. }
            | Error::ReconcileJobNotFound { .. } => tonic::Code::NotFound,
            Error::ReconcileNotConfigured { .. } => tonic::Code::FailedPrecondition,
            Error::ReconcileJobRunning { .. } => tonic::Code::AlreadyExists,
            Error::DeadLetterBeingReplayed { .. } => tonic::Code::Aborted,
            Error::DeadLetterUnreadable { .. } => tonic::Code::DataLoss,
            Error::TooManyReconcileJobs { .. }
            | Error::ResponseTooLarge { .. }
            | Error::ProfileTooLarge { .. }
            | Error::BackupRunning => tonic::Code::ResourceExhausted,
            Error::RevisionInFuture { .. } | Error::RevisionNeverAssigned { .. } => {
                tonic::Code::OutOfRange
            }
            Error::Compacted { .. } | Error::StoreChanged { .. } => tonic::Code::FailedPrecondition,
            Error::Unavailable { .. } => tonic::Code::Unavailable,
            Error::BackupStalled { .. } => tonic::Code::DeadlineExceeded,
        },
        Rejection::Unauthenticated { .. } => tonic::Code::Unauthenticated,
        Rejection::PermissionDenied { .. } => tonic::Code::PermissionDenied,
        Rejection::PayloadTooLarge { .. }
        | Rejection::TooManyWatchStreams { .. }
        | Rejection::TooManyConnectionWatchStreams { .. }
        | Rejection::TooManyOpenStreams { .. }
        | Rejection::TooManyHealthChecks { .. } => tonic::Code::ResourceExhausted,
        Rejection::UnsupportedMediaType { .. }
        | Rejection::RepeatedContentType
        | Rejection::UnsupportedContentEncoding { .. }
        | Rejection::UnsupportedTransferCoding { .. } => tonic::Code::InvalidArgument,
        Rejection::BodyTimeout { .. } => tonic::Code::DeadlineExceeded,
    };
    tonic::Status::new(code, message)
}

/// The reason a `min_revision` read could not be served, and the revision this server had
/// applied: `google.rpc.ErrorInfo` (reason `REVISION_NOT_APPLIED`, domain `profile-state`).
fn revision_details(requested: u64, applied: u64) -> ErrorDetails {
    ErrorDetails::with_error_info(
        "REVISION_NOT_APPLIED",
        "profile-state",
        [
            ("min_revision".to_string(), requested.to_string()),
            ("applied_revision".to_string(), applied.to_string()),
        ],
    )
}

/// Kept, not applicable as it stands: a precondition (a fix) is missing, and the field that
/// failed, if any, is named as for any invalid argument.
fn dead_letter_details(id: &str, cause: &Error) -> ErrorDetails {
    let mut details = ErrorDetails::with_precondition_failure_violation(
        "INVALID_PAYLOAD",
        format!("dead_letters/{id}"),
        cause.to_string(),
    );
    if let Error::InvalidArgument { field, reason } = cause {
        details.add_bad_request_violation(field, reason);
    }
    details
}

/// Descriptors of `google.rpc.Status` and of every `google.rpc` error detail message
/// (`BadRequest`, `PreconditionFailure`, ...), for gRPC reflection: with them grpcurl and other
/// reflection clients print the details [`grpc_status`] sends decoded, not as bytes.
///
/// tonic-types ships them under bare file names (`status.proto`); they are served under
/// googleapis' paths (`google/rpc/status.proto`), the names every other copy of them has, so
/// a client that already knows those files sees the same ones.
pub fn error_details_descriptors() -> prost_types::FileDescriptorSet {
    let mut set = prost_types::FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .expect("tonic-types ships a valid file descriptor set");
    for file in &mut set.file {
        if file.package() == "google.rpc" && !file.name().starts_with("google/rpc/") {
            file.name = Some(format!("google/rpc/{}", file.name()));
        }
    }
    set
}
