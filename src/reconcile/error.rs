//! Why a call to Gameball's API failed, classified so a job can report failures per reason and
//! metrics can count them.
//!
//! These are outcomes of outbound calls, not errors of a request to this service: a job reports
//! them per customer, and the next phase maps only the whole-job ones (an account without API
//! settings) onto `crate::error::Error`. Messages are lowercase and carry Gameball's own error
//! code and message, never a key and never a customer id.

use std::fmt;

/// The API endpoints the reconciler calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET .../customers/{id}`: referral code and link, no personal data.
    Customer,
    /// `GET .../customers/{id}/details`: the above plus email and mobile.
    Details,
    /// `GET .../customers/{id}/balance`: points.
    Balance,
    /// `GET .../customers/{id}/tier-progress`: the VIP tier.
    TierProgress,
    /// `POST .../batch/balance-inquiry`: points of up to 1,000 customers, as a batch job.
    BalanceInquiry,
    /// `GET .../batches/{id}/status`: a batch job's progress and results.
    BatchStatus,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 6] = [
        Endpoint::Customer,
        Endpoint::Details,
        Endpoint::Balance,
        Endpoint::TierProgress,
        Endpoint::BalanceInquiry,
        Endpoint::BatchStatus,
    ];

    /// A stable label (metrics, job reports).
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Customer => "customer",
            Endpoint::Details => "details",
            Endpoint::Balance => "balance",
            Endpoint::TierProgress => "tier_progress",
            Endpoint::BalanceInquiry => "balance_inquiry",
            Endpoint::BatchStatus => "batch_status",
        }
    }

    /// Whether Gameball counts it in the Customers GET bucket (else in "Others").
    pub fn is_customers_get(self) -> bool {
        matches!(
            self,
            Endpoint::Customer | Endpoint::Details | Endpoint::Balance | Endpoint::TierProgress
        )
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a fetch failed, one label per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// 401: the API key or secret key is missing, wrong or revoked (Gameball codes 1000, 1001).
    Unauthorized,
    /// 403: the keys are valid but may not read this (Gameball code 1002; a plan without the
    /// feature, 8000).
    Forbidden,
    /// 404: Gameball has no such customer (code 7000).
    NotFound,
    /// 429 on every attempt, or a `Retry-After` longer than the client will wait.
    RateLimited,
    /// No complete answer within the request timeout, on every attempt.
    Timeout,
    /// No connection, or it broke, on every attempt.
    Unreachable,
    /// 5xx on every attempt.
    ServerError,
    /// Any other refusal (4xx): Gameball did not take the request as sent.
    Rejected,
    /// A 2xx whose body is not what the documentation describes (the field is named).
    BadAnswer,
    /// Not attempted: the job was cancelled, or an earlier answer showed that the account's
    /// keys are refused.
    NotAttempted,
}

impl FailureReason {
    /// Every reason.
    pub const ALL: [FailureReason; 10] = [
        FailureReason::Unauthorized,
        FailureReason::Forbidden,
        FailureReason::NotFound,
        FailureReason::RateLimited,
        FailureReason::Timeout,
        FailureReason::Unreachable,
        FailureReason::ServerError,
        FailureReason::Rejected,
        FailureReason::BadAnswer,
        FailureReason::NotAttempted,
    ];

    /// A stable label (metrics, job reports).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Unauthorized => "unauthorized",
            FailureReason::Forbidden => "forbidden",
            FailureReason::NotFound => "not_found",
            FailureReason::RateLimited => "rate_limited",
            FailureReason::Timeout => "timeout",
            FailureReason::Unreachable => "unreachable",
            FailureReason::ServerError => "server_error",
            FailureReason::Rejected => "rejected",
            FailureReason::BadAnswer => "bad_answer",
            FailureReason::NotAttempted => "not_attempted",
        }
    }

    /// Whether the account's keys are refused: no further call of the job can succeed.
    pub fn refuses_account(self) -> bool {
        matches!(self, FailureReason::Unauthorized | FailureReason::Forbidden)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call (after its retries), with what Gameball said.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct ApiError {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The class of failure.
    pub reason: FailureReason,
    /// The HTTP status of the last answer, if there was one.
    pub status: Option<u16>,
    /// Gameball's error code from the answer's body (`code`, or `error` in the older shape).
    pub gameball_code: Option<i64>,
    /// What went wrong, in words: Gameball's message, or ours.
    pub detail: String,
    /// How many requests were sent (0 when none was).
    pub attempts: u32,
    /// Gameball asked to wait this long before calling again (a 429's `Retry-After`), longer
    /// than the client waits: the job stops rather than keep calling.
    pub asked_to_wait: Option<std::time::Duration>,
}

impl ApiError {
    /// A failure found without an answer from Gameball (or about one, like a bad body).
    pub fn new(endpoint: Endpoint, reason: FailureReason, detail: impl Into<String>) -> Self {
        ApiError {
            endpoint,
            reason,
            status: None,
            gameball_code: None,
            detail: detail.into(),
            attempts: 0,
            asked_to_wait: None,
        }
    }
}

impl ApiError {
    /// What a log line may say of it: the endpoint, the class, the statuses and the attempts,
    /// not Gameball's message, which may quote customer ids, e-mails or mobile numbers from
    /// the request (the job's report keeps it; found by an adversarial run).
    pub fn loggable(&self) -> String {
        let mut said = format!("gameball {} {}", self.endpoint, self.reason);
        match (self.status, self.gameball_code) {
            (Some(status), Some(code)) => said += &format!(" (http {status}, code {code})"),
            (Some(status), None) => said += &format!(" (http {status})"),
            _ => {}
        }
        if self.attempts > 1 {
            said += &format!(" (after {} attempts)", self.attempts);
        }
        said
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gameball {} {}", self.endpoint, self.reason)?;
        match (self.status, self.gameball_code) {
            (Some(status), Some(code)) => write!(f, " (http {status}, code {code})")?,
            (Some(status), None) => write!(f, " (http {status})")?,
            _ => {}
        }
        write!(f, ": {}", self.detail)?;
        if self.attempts > 1 {
            write!(f, " (after {} attempts)", self.attempts)?;
        }
        Ok(())
    }
}
