//! The one table from [`Error`] to an HTTP status and a gRPC status, so the webhook and the
//! gRPC API can never disagree on what an error means.
//!
//! Validation errors carry the field: HTTP puts it in the JSON body (the webhook adapter does
//! that), gRPC in `google.rpc.BadRequest` details. A dead-lettered delivery is 422 over HTTP
//! (the webhook adds the dead letter's id) and FAILED_PRECONDITION over gRPC (a replay that
//! still fails), with `google.rpc.PreconditionFailure` naming the letter. The descriptors of
//! those detail messages, which reflection serves so clients can decode them, come from here
//! too. Nothing else here.

use axum::http::StatusCode;
use prost::Message;
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// The HTTP status for an error.
pub fn http_status(error: &Error) -> StatusCode {
    match error {
        Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
        Error::NotFound { .. } => StatusCode::NOT_FOUND,
        Error::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
        Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Error::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Error::RevisionInFuture { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        Error::Compacted { .. } => StatusCode::GONE,
        Error::DeadLettered { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Error::DeadLetterNotFound { .. } => StatusCode::NOT_FOUND,
        Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The gRPC status for an error.
pub fn grpc_status(error: &Error) -> tonic::Status {
    let message = error.to_string();
    let code = match error {
        Error::InvalidArgument { field, reason } => {
            let details = ErrorDetails::with_bad_request_violation(field, reason);
            return tonic::Status::with_error_details(
                tonic::Code::InvalidArgument,
                message,
                details,
            );
        }
        Error::DeadLettered { id, cause } => {
            // Kept, not applicable as it stands: a precondition (a fix) is missing, and the
            // field that failed, if any, is named as for any invalid argument.
            let mut details = ErrorDetails::with_precondition_failure_violation(
                "INVALID_PAYLOAD",
                format!("dead_letters/{id}"),
                cause.to_string(),
            );
            if let Error::InvalidArgument { field, reason } = &**cause {
                details.add_bad_request_violation(field, reason);
            }
            return tonic::Status::with_error_details(
                tonic::Code::FailedPrecondition,
                message,
                details,
            );
        }
        Error::NotFound { .. } | Error::DeadLetterNotFound { .. } => tonic::Code::NotFound,
        Error::Unauthenticated { .. } => tonic::Code::Unauthenticated,
        Error::PayloadTooLarge { .. } => tonic::Code::ResourceExhausted,
        Error::UnsupportedMediaType { .. } => tonic::Code::InvalidArgument,
        Error::RevisionInFuture { .. } => tonic::Code::OutOfRange,
        Error::Compacted { .. } => tonic::Code::FailedPrecondition,
        Error::Unavailable { .. } => tonic::Code::Unavailable,
    };
    tonic::Status::new(code, message)
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
