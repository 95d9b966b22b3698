//! The one table from [`Error`] to an HTTP status and a gRPC status, so the webhook and the
//! gRPC API can never disagree on what an error means.
//!
//! Validation errors carry the field: HTTP puts it in the JSON body (the webhook adapter does
//! that), gRPC in `google.rpc.BadRequest` details. Nothing else here.

use axum::http::StatusCode;
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
        Error::NotFound { .. } => tonic::Code::NotFound,
        Error::Unauthenticated { .. } => tonic::Code::Unauthenticated,
        Error::PayloadTooLarge { .. } => tonic::Code::ResourceExhausted,
        Error::UnsupportedMediaType { .. } => tonic::Code::InvalidArgument,
        Error::RevisionInFuture { .. } => tonic::Code::OutOfRange,
        Error::Compacted { .. } => tonic::Code::FailedPrecondition,
        Error::Unavailable { .. } => tonic::Code::Unavailable,
    };
    tonic::Status::new(code, message)
}
