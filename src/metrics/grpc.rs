//! The per-RPC metrics with the names and labels of grpc-ecosystem's go-grpc-prometheus
//! (`grpc_server_started_total`, `grpc_server_handled_total`, `grpc_server_handling_seconds`),
//! resolved once per method so a call touches no label map. `crate::grpc::transport::MetricsLayer`
//! records them; this module does not know which RPCs exist.

use std::sync::Arc;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, Registry};
use tonic::Code;

use super::{Metrics, counter_vec, histogram_vec};

/// Every gRPC status code, in numeric order (`Code as usize` indexes it).
const GRPC_CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The canonical name of a gRPC status code, as the gRPC specification writes it
/// (`doc/statuscodes.md`) and the `grpc_code` label holds it: `OK`, `CANCELLED`, `NOT_FOUND`.
pub fn grpc_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The kind of an RPC, as the `grpc_type` label holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcType {
    /// One request, one response.
    Unary,
    /// A stream of requests, one response.
    ClientStream,
    /// One request, a stream of responses (WatchProfiles).
    ServerStream,
    /// Streams both ways.
    BidiStream,
}

impl GrpcType {
    /// The kind of an RPC from its descriptor's streaming flags.
    pub fn of(client_streaming: bool, server_streaming: bool) -> GrpcType {
        match (client_streaming, server_streaming) {
            (false, false) => GrpcType::Unary,
            (true, false) => GrpcType::ClientStream,
            (false, true) => GrpcType::ServerStream,
            (true, true) => GrpcType::BidiStream,
        }
    }

    /// The label value: `unary`, `client_stream`, `server_stream`, `bidi_stream`.
    pub fn label(self) -> &'static str {
        match self {
            GrpcType::Unary => "unary",
            GrpcType::ClientStream => "client_stream",
            GrpcType::ServerStream => "server_stream",
            GrpcType::BidiStream => "bidi_stream",
        }
    }
}

/// The go-grpc-prometheus `grpc_server_*` series.
pub(super) struct Grpc {
    started: IntCounterVec,
    handled: IntCounterVec,
    handling: HistogramVec,
}

/// The per-RPC metrics of one method, resolved once so a call touches no label map.
#[derive(Clone)]
pub struct GrpcMethodMetrics {
    started: IntCounter,
    /// Indexed by `Code as usize`.
    handled: Arc<[IntCounter]>,
    handling: Histogram,
}

impl GrpcMethodMetrics {
    /// Counts a call started.
    pub fn started(&self) {
        self.started.inc();
    }

    /// Counts a call finished with `code` after `seconds` (for a stream: its whole life).
    pub fn handled(&self, code: Code, seconds: f64) {
        self.handled[code as usize].inc();
        self.handling.observe(seconds);
    }
}

impl Grpc {
    pub(super) fn new(r: &Registry) -> Grpc {
        let labels = ["grpc_type", "grpc_service", "grpc_method"];
        Grpc {
            started: counter_vec(
                r,
                "grpc_server_started_total",
                "RPCs started on the server.",
                &labels,
            ),
            handled: counter_vec(
                r,
                "grpc_server_handled_total",
                "RPCs completed on the server, by status code, whatever the outcome.",
                &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            ),
            handling: histogram_vec(
                r,
                "grpc_server_handling_seconds",
                "Time from the start of an RPC to its status (for a stream: its whole life).",
                &labels,
            ),
        }
    }
}

impl Metrics {
    /// The metrics of one RPC, `/{service}/{method}`: its series appear now, at zero, with
    /// every status code.
    pub fn grpc_method(&self, kind: GrpcType, service: &str, method: &str) -> GrpcMethodMetrics {
        let labels = [kind.label(), service, method];
        let handled = GRPC_CODES
            .iter()
            .map(|&code| {
                let [kind, service, method] = labels;
                self.inner.grpc.handled.with_label_values(&[
                    kind,
                    service,
                    method,
                    grpc_code_name(code),
                ])
            })
            .collect();
        GrpcMethodMetrics {
            started: self.inner.grpc.started.with_label_values(&labels),
            handled,
            handling: self.inner.grpc.handling.with_label_values(&labels),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_the_canonical_ones_in_numeric_order() {
        for (number, code) in GRPC_CODES.iter().enumerate() {
            assert_eq!(*code as usize, number);
            assert_eq!(Code::from_i32(number as i32), *code);
        }
        assert_eq!(grpc_code_name(Code::Ok), "OK");
        assert_eq!(grpc_code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(grpc_code_name(Code::Cancelled), "CANCELLED");
        assert_eq!(grpc_code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }

    #[test]
    fn grpc_types_follow_the_streaming_flags() {
        assert_eq!(GrpcType::of(false, false).label(), "unary");
        assert_eq!(GrpcType::of(true, false).label(), "client_stream");
        assert_eq!(GrpcType::of(false, true).label(), "server_stream");
        assert_eq!(GrpcType::of(true, true).label(), "bidi_stream");
    }
}
