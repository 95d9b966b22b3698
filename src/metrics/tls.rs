//! The gRPC listener's TLS series: failed handshakes by reason, and when the served
//! certificate expires (what an alert on renewal watches) and became valid.
//! `crate::server::tls` counts the handshakes; `crate::server` sets the dates once the
//! certificate is read at start-up.

use prometheus::{IntCounter, IntGauge, Registry};

use super::{Metrics, counter_vec, gauge};

pub(super) struct Tls {
    refused: IntCounter,
    closed: IntCounter,
    certificate_expiry: IntGauge,
    certificate_valid_from: IntGauge,
}

impl Tls {
    pub(super) fn new(r: &Registry) -> Tls {
        let failed = counter_vec(
            r,
            "profile_state_tls_handshakes_failed_total",
            "gRPC TLS handshakes that failed, by reason: refused (a TLS error, such as a client \
             certificate from another CA, expired, or missing, or no common protocol version) \
             or closed (the client went away or reset the connection mid-handshake; a TCP \
             probe does that). Timeouts are profile_state_connections_timed_out_total.",
            &["reason"],
        );
        Tls {
            refused: failed.with_label_values(&["refused"]),
            closed: failed.with_label_values(&["closed"]),
            certificate_expiry: gauge(
                r,
                "profile_state_tls_certificate_expiry_timestamp_seconds",
                "When the certificate chain the gRPC listener serves (--grpc-tls-cert, leaf \
                 and intermediates) first expires, in Unix seconds; 0 without TLS. Read at \
                 start-up: a renewed certificate needs a restart.",
            ),
            certificate_valid_from: gauge(
                r,
                "profile_state_tls_certificate_valid_from_timestamp_seconds",
                "When every certificate of the chain the gRPC listener serves has become valid \
                 (the latest not-before), in Unix seconds; 0 without TLS. Later than now: \
                 clients refuse the certificate until then.",
            ),
        }
    }
}

/// Counts one listener's failed TLS handshakes; cheap to clone.
#[derive(Clone)]
pub struct HandshakeMetrics {
    refused: IntCounter,
    closed: IntCounter,
}

impl HandshakeMetrics {
    /// A handshake refused by TLS itself (`refused`).
    pub fn refused(&self) {
        self.refused.inc();
    }

    /// A handshake the client abandoned (`closed`).
    pub fn closed(&self) {
        self.closed.inc();
    }
}

impl Metrics {
    /// The gRPC listener's handshake counters.
    pub fn tls_handshakes(&self) -> HandshakeMetrics {
        HandshakeMetrics {
            refused: self.inner.tls.refused.clone(),
            closed: self.inner.tls.closed.clone(),
        }
    }

    /// When the served certificate expires, in Unix seconds.
    pub fn tls_certificate_expiry(&self, unix_seconds: i64) {
        self.inner.tls.certificate_expiry.set(unix_seconds);
    }

    /// When the served certificate became (or becomes) valid, in Unix seconds.
    pub fn tls_certificate_valid_from(&self, unix_seconds: i64) {
        self.inner.tls.certificate_valid_from.set(unix_seconds);
    }
}
