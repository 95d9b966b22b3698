//! The HTTP client for one Gameball account: the endpoints a reconcile reads, with the account's
//! keys, its rate limits, bounded concurrency, timeouts and retries.
//!
//! Every call goes the same way ([`GameballClient::call`]): wait for an in-flight slot, then for
//! the rate limiter of the endpoint's bucket, send, read at most `max_answer_bytes` of the
//! answer within `request_timeout`, and classify it. Transient failures (429, 5xx, timeouts,
//! broken connections, Gameball's "concurrent request in progress") are retried up to
//! `max_attempts` times with exponential backoff and jitter; a 429 also pauses the whole bucket
//! for its `Retry-After` (seconds or an HTTP date) or, without one, for the backoff, so
//! concurrent callers back off together. A `Retry-After` longer than `max_retry_after` is not
//! waited for: the call fails as rate limited, saying how long Gameball asked for (and the job
//! stops, `super::fetch`). Nothing is retried forever.
//!
//! This module returns answers as JSON with the time their request was sent; `answers` reads
//! them. It knows nothing of profiles, the sequencer, axum or tonic, and never logs a key or a
//! customer id.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use reqwest::header::{ACCEPT, DATE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::account::Account;
use super::error::{ApiError, Endpoint, FailureReason};
use super::limiter::RateLimiter;

/// How hard the client tries, and how long it waits.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Longest time for one attempt, from sending to the end of the answer.
    pub request_timeout: Duration,
    /// Longest time to open a connection.
    pub connect_timeout: Duration,
    /// Requests in flight at once, across every caller of this client.
    pub max_in_flight: usize,
    /// Attempts per call, the first included (at least 1).
    pub max_attempts: u32,
    /// The first retry waits between half of this and this; each further one twice as long.
    pub base_delay: Duration,
    /// No backoff is longer than this.
    pub max_delay: Duration,
    /// A 429 asking to wait longer than this fails the call instead.
    pub max_retry_after: Duration,
    /// Larger answers are refused (a batch status with 1,000 results is about 300 KB).
    pub max_answer_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_in_flight: 8,
            // 1 + 2 + 4 + 8 + 16 s of backoff outlasts Gameball's 30 s quota window.
            max_attempts: 6,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            max_answer_bytes: 4 << 20,
        }
    }
}

/// A successful answer: its JSON, and when the request that got it was sent.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The body.
    pub body: Value,
    /// A time the value is at least as fresh as, on Gameball's clock when its answer says
    /// (`Date`, less the round trip: [`gameball_time`]), which is the clock its webhooks'
    /// `created_at` use; otherwise this host's, when the successful attempt was sent.
    pub sent_at: DateTime<Utc>,
    /// The HTTP status (a 2xx).
    pub status: u16,
}

/// Told of every attempt the client makes and of every pause a 429 causes: how metrics count
/// the API's cost without this module knowing them.
pub trait RequestObserver: Send + Sync {
    /// One attempt at `endpoint` ended with `status` (a label of [`status_label`]) after
    /// `seconds`.
    fn attempted(&self, endpoint: Endpoint, status: &'static str, seconds: f64);
    /// A 429 paused the endpoint's rate bucket for `seconds`.
    fn paused(&self, endpoint: Endpoint, seconds: f64);
}

/// Every value [`status_label`] gives, for metrics that exist at zero.
pub const STATUS_LABELS: [&str; 11] = [
    "200",
    "401",
    "403",
    "404",
    "429",
    "4xx",
    "5xx",
    "timeout",
    "unreachable",
    "other",
    CANCELLED,
];

/// The status label of an attempt dropped before its answer (its job cancelled or stopped):
/// sent, and counted by Gameball against the account's limits.
pub const CANCELLED: &str = "cancelled";
/// The longest URL a request can carry: the `http` crate's bound on a URI.
const MAX_URL_BYTES: usize = u16::MAX as usize - 1;

/// The status label of one attempt: the HTTP codes the reconciler treats apart, a class for
/// the others, or why there was no answer. A fixed set, so metrics stay bounded.
pub fn status_label(status: Option<u16>, reason: Option<FailureReason>) -> &'static str {
    match (status, reason) {
        (Some(200), _) => "200",
        (Some(401), _) => "401",
        (Some(403), _) => "403",
        (Some(404), _) => "404",
        (Some(429), _) => "429",
        (Some(400..=499), _) => "4xx",
        (Some(500..=599), _) => "5xx",
        (None, Some(FailureReason::Timeout)) => "timeout",
        (None, Some(FailureReason::Unreachable)) => "unreachable",
        _ => "other",
    }
}

/// The client for one account. Cloning shares the connection pool, the limiters and the
/// in-flight bound.
#[derive(Clone)]
pub struct GameballClient {
    inner: Arc<Inner>,
}

struct Inner {
    account: Account,
    http: reqwest::Client,
    customers_get: Arc<RateLimiter>,
    others: Arc<RateLimiter>,
    in_flight: Semaphore,
    options: ClientOptions,
    /// Attempts made, retries included: what the client cost.
    attempts: AtomicU64,
    observer: Option<Arc<dyn RequestObserver>>,
}

/// One attempt's outcome before retrying is decided.
enum Attempt {
    Done(Answer),
    Failed {
        error: ApiError,
        retry: bool,
        retry_after: Option<Duration>,
    },
}

/// An attempt on its way: dropped before its answer (a cancelled job drops the requests it has
/// in flight), it still counts, as `cancelled`. Such requests were sent, and Gameball counted
/// them, but the job's `api_requests` and the requests metric did not (found by an
/// adversarial run).
struct Unanswered<'a> {
    client: &'a GameballClient,
    endpoint: Endpoint,
    started: Instant,
    answered: bool,
}

impl Unanswered<'_> {
    /// The answer came: counted by the caller instead. When the attempt started.
    fn answered(mut self) -> Instant {
        self.answered = true;
        self.started
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let took = self.started.elapsed();
            self.client.count(self.endpoint, CANCELLED, took);
        }
    }
}

impl GameballClient {
    /// A client for `account`. Fails only if the TLS setup fails.
    pub fn new(account: Account, options: ClientOptions) -> Result<GameballClient, String> {
        GameballClient::observed(account, options, None)
    }

    /// A client for `account` that tells `observer` of every attempt and pause.
    pub fn observed(
        account: Account,
        options: ClientOptions,
        observer: Option<Arc<dyn RequestObserver>>,
    ) -> Result<GameballClient, String> {
        let mut headers = HeaderMap::new();
        for (name, key) in [
            ("apikey", account.api_key()),
            ("secretkey", account.secret_key()),
        ] {
            // Checked when the account was built: visible ASCII only.
            let mut value = HeaderValue::from_str(key).expect("keys are checked header values");
            value.set_sensitive(true);
            headers.insert(HeaderName::from_static(name), value);
        }
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let agent = concat!("profile-state/", env!("CARGO_PKG_VERSION"), " (reconcile)");
        headers.insert(USER_AGENT, HeaderValue::from_static(agent));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(options.connect_timeout)
            // Redirects would carry the keys to another place: an answer is what it is.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| format!("cannot build the gameball http client: {err}"))?;
        Ok(GameballClient {
            inner: Arc::new(Inner {
                customers_get: Arc::new(RateLimiter::new(&account.limits.customers_get)),
                others: Arc::new(RateLimiter::new(&account.limits.others)),
                in_flight: Semaphore::new(options.max_in_flight.max(1)),
                account,
                http,
                options,
                attempts: AtomicU64::new(0),
                observer,
            }),
        })
    }

    /// A client for `account`, this client's account with its settings reloaded: it keeps this
    /// client's rate limiters (the requests in their windows, and a pause a 429 asked for) when
    /// the limits are the same, as Gameball's count of them goes on. Every reload built new
    /// ones, so a SIGHUP, even one that changed nothing, forgot a pause Gameball had asked for
    /// (found by an adversarial run).
    pub fn reloaded(&self, account: Account) -> Result<GameballClient, String> {
        let same_limits = account.limits == self.inner.account.limits;
        let options = self.inner.options.clone();
        let mut client = GameballClient::observed(account, options, self.inner.observer.clone())?;
        if same_limits {
            let inner = Arc::get_mut(&mut client.inner).expect("a client just made is not shared");
            inner.customers_get = Arc::clone(&self.inner.customers_get);
            inner.others = Arc::clone(&self.inner.others);
        }
        Ok(client)
    }

    /// Attempts made so far, retries included.
    pub fn attempts(&self) -> u64 {
        self.inner.attempts.load(Ordering::Relaxed)
    }

    /// `text` from Gameball (an error's message, a value quoted in a bad answer's reason) made
    /// fit for reports and logs: this account's keys redacted, at most 200 bytes.
    pub fn reportable(&self, text: impl std::fmt::Display) -> String {
        let account = &self.inner.account;
        let mut text = text.to_string();
        reportable(&mut text, &[account.api_key(), account.secret_key()]);
        text
    }

    /// The account this client calls for.
    pub fn account(&self) -> &Account {
        &self.inner.account
    }

    /// The options it was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// `GET .../customers/{id}` (`Customer`, `Details`, `Balance` or `TierProgress`).
    pub async fn get_customer(
        &self,
        endpoint: Endpoint,
        customer_id: &str,
    ) -> Result<Answer, ApiError> {
        let tail = match endpoint {
            Endpoint::Customer => None,
            Endpoint::Details => Some("details"),
            Endpoint::Balance => Some("balance"),
            Endpoint::TierProgress => Some("tier-progress"),
            _ => unreachable!("{endpoint} is not a customer endpoint"),
        };
        // The URL crate drops `.` and `..` segments, which would name another endpoint.
        if customer_id.is_empty() || customer_id == "." || customer_id == ".." {
            return Err(ApiError::new(
                endpoint,
                FailureReason::Rejected,
                "this customer id cannot be put in a url path",
            ));
        }
        let mut segments = vec!["customers", customer_id];
        segments.extend(tail);
        let url = self.url(&segments);
        // Longer, the request cannot even be built: it was tried six times over 20 s and
        // reported as Gameball unreachable, counting requests never sent (found by an
        // adversarial run).
        if url.as_str().len() > MAX_URL_BYTES {
            let detail = format!(
                "this customer id ({} bytes) makes a url of {} bytes, longer than a request \
                 can carry ({MAX_URL_BYTES})",
                customer_id.len(),
                url.as_str().len()
            );
            return Err(ApiError::new(endpoint, FailureReason::Rejected, detail));
        }
        self.call(endpoint, Method::GET, url, None).await
    }

    /// `POST .../batch/balance-inquiry` for `customer_ids` (at most 1,000).
    pub async fn create_balance_inquiry(&self, customer_ids: &[&str]) -> Result<Answer, ApiError> {
        let items: Vec<Value> = customer_ids
            .iter()
            .map(|id| serde_json::json!({ "customerId": id }))
            .collect();
        let body = serde_json::json!({ "body": items });
        let url = self.url(&["batch", "balance-inquiry"]);
        self.call(Endpoint::BalanceInquiry, Method::POST, url, Some(body))
            .await
    }

    /// `GET .../batches/{batch_id}/status`.
    pub async fn batch_status(&self, batch_id: &str) -> Result<Answer, ApiError> {
        let url = self.url(&["batches", batch_id, "status"]);
        self.call(Endpoint::BatchStatus, Method::GET, url, None)
            .await
    }

    /// `<base>/api/<version>/integrations/<segments>`, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let account = &self.inner.account;
        let mut url = account.base_url.clone();
        url.path_segments_mut()
            .expect("the base URL was checked to be a base")
            .pop_if_empty()
            .extend(["api", account.api_version.as_str(), "integrations"])
            .extend(segments);
        url
    }

    fn limiter(&self, endpoint: Endpoint) -> &RateLimiter {
        if endpoint.is_customers_get() {
            &self.inner.customers_get
        } else {
            &self.inner.others
        }
    }

    /// One call: attempts until an answer, a failure not worth retrying, or the last attempt.
    async fn call(
        &self,
        endpoint: Endpoint,
        method: Method,
        url: Url,
        body: Option<Value>,
    ) -> Result<Answer, ApiError> {
        let options = &self.inner.options;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let attempt = {
                let _slot = self.inner.in_flight.acquire().await.expect("never closed");
                // Rate limiting last, so the request goes out right when it is counted.
                self.limiter(endpoint).acquire().await;
                let unanswered = Unanswered {
                    client: self,
                    endpoint,
                    started: Instant::now(),
                    answered: false,
                };
                let attempt = self
                    .attempt(endpoint, method.clone(), url.clone(), body.as_ref())
                    .await;
                let started = unanswered.answered();
                self.observe(endpoint, &attempt, started.elapsed());
                attempt
            };
            let (mut error, retry, retry_after) = match attempt {
                Attempt::Done(answer) => return Ok(answer),
                Attempt::Failed {
                    error,
                    retry,
                    retry_after,
                } => (error, retry, retry_after),
            };
            error.attempts = attempts;
            if !retry || attempts >= options.max_attempts.max(1) {
                return Err(error);
            }
            let delay = match retry_after {
                Some(asked) if asked > options.max_retry_after => {
                    error.detail = format!(
                        "asked to retry after {} s, longer than the {} s this client waits",
                        asked.as_secs(),
                        options.max_retry_after.as_secs()
                    );
                    error.asked_to_wait = Some(asked);
                    return Err(error);
                }
                Some(asked) => asked,
                None => backoff(options, attempts),
            };
            tracing::debug!(
                client_id = %self.inner.account.client_id,
                endpoint = endpoint.as_str(),
                reason = error.reason.as_str(),
                status = error.status,
                attempt = attempts,
                delay_ms = delay.as_millis() as u64,
                "gameball call failed, retrying"
            );
            if error.reason == FailureReason::RateLimited {
                let longer = self.limiter(endpoint).pause_for(delay);
                if let (Some(observer), false) = (&self.inner.observer, longer.is_zero()) {
                    observer.paused(endpoint, longer.as_secs_f64());
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Counts an attempt and tells the observer.
    fn observe(&self, endpoint: Endpoint, attempt: &Attempt, took: Duration) {
        let status = match attempt {
            Attempt::Done(answer) => status_label(Some(answer.status), None),
            Attempt::Failed { error, .. } => status_label(error.status, Some(error.reason)),
        };
        self.count(endpoint, status, took);
    }

    fn count(&self, endpoint: Endpoint, status: &'static str, took: Duration) {
        self.inner.attempts.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = &self.inner.observer {
            observer.attempted(endpoint, status, took.as_secs_f64());
        }
    }

    /// Sends once and reads the answer, all within the request timeout.
    async fn attempt(
        &self,
        endpoint: Endpoint,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Attempt {
        let mut request = self.inner.http.request(method, url);
        if let Some(body) = body {
            request = request.json(body);
        }
        let sent_at = Utc::now();
        let timeout = self.inner.options.request_timeout;
        let limit = self.inner.options.max_answer_bytes;
        let exchange = async {
            let mut response = request.send().await?;
            let date = response.headers().get(DATE).cloned();
            let sent_at = gameball_time(date.as_ref(), sent_at, Utc::now());
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, SystemTime::now()));
            let mut bytes = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if bytes.len() + chunk.len() > limit {
                    return Ok((status, retry_after, None, sent_at));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, retry_after, Some(bytes), sent_at))
        };
        let failed = |reason, detail: String, retry| Attempt::Failed {
            error: ApiError::new(endpoint, reason, detail),
            retry,
            retry_after: None,
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => failed(
                FailureReason::Timeout,
                format!("no complete answer within {} ms", timeout.as_millis()),
                true,
            ),
            Ok(Err(err)) => failed(
                FailureReason::Unreachable,
                // Without the URL: it holds the customer id, which is personal data.
                format!("request failed: {}", error_chain(&err.without_url())),
                true,
            ),
            Ok(Ok((status, _, None, _))) => Attempt::Failed {
                error: ApiError {
                    status: Some(status.as_u16()),
                    ..ApiError::new(
                        endpoint,
                        FailureReason::BadAnswer,
                        format!("answer larger than {limit} bytes"),
                    )
                },
                retry: false,
                retry_after: None,
            },
            Ok(Ok((status, retry_after, Some(bytes), sent_at))) => {
                let mut attempt = classify(endpoint, status, retry_after, &bytes, sent_at);
                if let Attempt::Failed { error, .. } = &mut attempt {
                    let account = &self.inner.account;
                    reportable(
                        &mut error.detail,
                        &[account.api_key(), account.secret_key()],
                    );
                }
                attempt
            }
        }
    }
}

/// Gameball's message made fit for job reports and logs: without `keys` (an answer may echo
/// the request's keys, "Forbidden: <api key>"), then cut to 200 bytes (after the redaction, so
/// the cut cannot leave part of a key).
fn reportable(detail: &mut String, keys: &[&str]) {
    // Longest first, so a key that begins another cannot leave the other's rest behind; as
    // written, and percent-encoded (an echoed URL or form), in any case.
    let mut forms: Vec<String> = keys
        .iter()
        .filter(|key| !key.is_empty())
        .flat_map(|key| [key.to_string(), percent_encoded(key)])
        .collect();
    forms.sort_by_key(|form| std::cmp::Reverse(form.len()));
    for form in &forms {
        *detail = replace_ignoring_case(detail, form, "[redacted]");
    }
    truncate(detail, 200);
}

/// `key` with every byte but the unreserved ones of RFC 3986 as `%XX`.
fn percent_encoded(key: &str) -> String {
    key.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// `text` with every ASCII-case-insensitive occurrence of `pattern` (ASCII) replaced.
fn replace_ignoring_case(text: &str, pattern: &str, with: &str) -> String {
    let (lower, pattern) = (text.to_ascii_lowercase(), pattern.to_ascii_lowercase());
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(found) = lower[from..].find(&pattern) {
        out.push_str(&text[from..from + found]);
        out.push_str(with);
        from += found + pattern.len();
    }
    out.push_str(&text[from..]);
    out
}

/// Turns an answer into a result, or a classified failure that says whether to retry.
fn classify(
    endpoint: Endpoint,
    status: StatusCode,
    retry_after: Option<Duration>,
    bytes: &[u8],
    sent_at: DateTime<Utc>,
) -> Attempt {
    if status.is_success() {
        return match serde_json::from_slice(bytes) {
            Ok(body) => Attempt::Done(Answer {
                body,
                sent_at,
                status: status.as_u16(),
            }),
            Err(err) => Attempt::Failed {
                error: ApiError {
                    status: Some(status.as_u16()),
                    ..ApiError::new(
                        endpoint,
                        FailureReason::BadAnswer,
                        format!("not json: {err}"),
                    )
                },
                retry: false,
                retry_after: None,
            },
        };
    }
    // Gameball's documented error object is {code, type, message, requestId}; its OpenAPI
    // schema says {error, message}. Read either, and nothing else of the body.
    let error_body: Option<Value> = serde_json::from_slice(bytes).ok();
    let field = |name: &str| error_body.as_ref().and_then(|body| body.get(name));
    let code = field("code")
        .or_else(|| field("error"))
        .and_then(Value::as_i64);
    // Cut to 200 characters by `GameballClient::attempt`, once the keys are redacted.
    let message = field("message").and_then(Value::as_str).map(str::to_owned);
    let (reason, retry) = match status.as_u16() {
        401 => (FailureReason::Unauthorized, false),
        403 => (FailureReason::Forbidden, false),
        404 => (FailureReason::NotFound, false),
        429 => (FailureReason::RateLimited, true),
        // 2001: "another request is already being processed for the same customer".
        422 if code == Some(2001) => (FailureReason::Rejected, true),
        500..=599 => (
            FailureReason::ServerError,
            status != StatusCode::NOT_IMPLEMENTED,
        ),
        _ => (FailureReason::Rejected, false),
    };
    let detail = message.unwrap_or_else(|| {
        status
            .canonical_reason()
            .unwrap_or("unexpected status")
            .to_lowercase()
    });
    let mut error = ApiError::new(endpoint, reason, detail);
    error.status = Some(status.as_u16());
    error.gameball_code = code;
    Attempt::Failed {
        error,
        retry,
        // Only a 429 or 503 asks for a pause; honour it for those.
        retry_after: retry_after.filter(|_| matches!(status.as_u16(), 429 | 503)),
    }
}

/// `Retry-After` as seconds (`120`) or an HTTP date, as a delay from `now`.
/// When a request sent at `sent` (this host's clock) was at the latest received, on Gameball's
/// clock: its answer's `Date` less the round trip (`answered - sent`), which bounds how long
/// Gameball took. A value read then is at least that fresh by the clock Gameball stamps its
/// webhooks' `created_at` with, so a webhook of a later change wins over it even when this
/// host's clock runs ahead of Gameball's (reconcile stamped with this host's clock lost such
/// webhooks). `Date` is truncated to the second, which only makes the time earlier. Never
/// later than `sent`; without a usable `Date`, `sent`.
fn gameball_time(
    date: Option<&HeaderValue>,
    sent: DateTime<Utc>,
    answered: DateTime<Utc>,
) -> DateTime<Utc> {
    let date = date
        .and_then(|value| value.to_str().ok())
        .and_then(|value| httpdate::parse_http_date(value).ok());
    match date {
        // Never later than this host's clock at sending: a `Date` far ahead (a misconfigured
        // proxy, a hostile answer) would make the reconciled values win over every webhook to
        // come. An earlier time only lets webhooks win more often.
        Some(date) => {
            let gameball =
                DateTime::<Utc>::from(date) - (answered - sent).max(chrono::TimeDelta::zero());
            gameball.min(sent)
        }
        None => sent,
    }
}

fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The wait before retry number `attempts`: between half and all of `base × 2^(attempts-1)`,
/// capped at `max_delay` ("equal jitter": spread out, yet never hurried).
fn backoff(options: &ClientOptions, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(20);
    let full = options
        .base_delay
        .saturating_mul(1 << exponent)
        .min(options.max_delay);
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

/// An error and its sources, for a detail line (reqwest's own message is terse).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = crate::error::with_sources(err);
    truncate(&mut text, 300);
    text
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by an adversarial run: a key echoed percent-encoded or in another case, and a
    /// secret key that begins with the API key, reached reports.
    #[test]
    fn keys_are_redacted_in_any_case_percent_encoded_and_longest_first() {
        let (api, secret) = ("APIKEY-1234+/=ab", "APIKEY-1234+/=abS3CR3T");
        let mut detail =
            "a apikey-1234+/=ab b APIKEY-1234%2B%2F%3Dab c APIKEY-1234+/=abS3CR3T d".to_owned();
        reportable(&mut detail, &[api, secret]);
        assert_eq!(detail, "a [redacted] b [redacted] c [redacted] d");
    }

    #[test]
    fn keys_are_redacted_before_a_long_message_is_cut() {
        let key = "k".repeat(40);
        let mut detail = format!("{}{key} and {key}", "x".repeat(190));
        reportable(&mut detail, &[&key, "other"]);
        assert!(!detail.contains("kkkk"), "{detail}");
        assert_eq!(detail, format!("{}[redacted]…", "x".repeat(190)));
    }

    #[test]
    fn an_answer_is_as_fresh_as_its_date_less_the_round_trip_on_gameballs_clock() {
        let at = |text: &str| text.parse::<DateTime<Utc>>().unwrap();
        // This host runs two minutes ahead of Gameball.
        let sent = at("2026-12-03T10:02:05.200Z");
        let answered = at("2026-12-03T10:02:05.500Z");
        let date = HeaderValue::from_static("Thu, 03 Dec 2026 10:00:05 GMT");
        assert_eq!(
            gameball_time(Some(&date), sent, answered),
            at("2026-12-03T10:00:04.700Z")
        );
        // No Date, or one that is not an HTTP date: this host's clock at sending.
        assert_eq!(gameball_time(None, sent, answered), sent);
        let garbage = HeaderValue::from_static("yesterday");
        assert_eq!(gameball_time(Some(&garbage), sent, answered), sent);
        // A Date far ahead would make reconciled values beat every later webhook: never later
        // than this host's clock at sending.
        let ahead = HeaderValue::from_static("Fri, 01 Jan 2100 00:00:00 GMT");
        assert_eq!(gameball_time(Some(&ahead), sent, answered), sent);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_the_cap() {
        let options = ClientOptions {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            ..ClientOptions::default()
        };
        for _ in 0..200 {
            let first = backoff(&options, 1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff(&options, 3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = backoff(&options, 40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn answers_are_classified_with_gameballs_code_and_message() {
        let now = Utc::now();
        let failure = |status: u16, body: &str| {
            let status = StatusCode::from_u16(status).unwrap();
            match classify(
                Endpoint::Details,
                status,
                Some(Duration::from_secs(2)),
                body.as_bytes(),
                now,
            ) {
                Attempt::Failed {
                    error,
                    retry,
                    retry_after,
                } => (error, retry, retry_after),
                Attempt::Done(_) => panic!("{status} succeeded"),
            }
        };
        let (error, retry, _) = failure(
            401,
            r#"{"code":1001,"type":"Authentication Error","message":"Secret Key Required"}"#,
        );
        assert_eq!(error.reason, FailureReason::Unauthorized);
        assert_eq!(error.gameball_code, Some(1001));
        assert!(!retry);
        assert_eq!(
            error.to_string(),
            "gameball details unauthorized (http 401, code 1001): Secret Key Required"
        );
        let (error, _, _) = failure(403, r#"{"error":1002,"message":"Forbidden"}"#);
        assert_eq!(
            (error.reason, error.gameball_code),
            (FailureReason::Forbidden, Some(1002))
        );
        assert_eq!(failure(404, "").0.reason, FailureReason::NotFound);
        let (error, retry, retry_after) = failure(429, "");
        assert_eq!(error.reason, FailureReason::RateLimited);
        assert!(retry);
        assert_eq!(retry_after, Some(Duration::from_secs(2)));
        assert_eq!(error.detail, "too many requests");
        assert!(
            failure(422, r#"{"code":2001}"#).1,
            "concurrent request: retried"
        );
        assert!(!failure(422, r#"{"code":3003}"#).1);
        let (error, retry, retry_after) = failure(502, "<html>");
        assert_eq!(
            (error.reason, retry, retry_after),
            (FailureReason::ServerError, true, None)
        );
        assert!(!failure(501, "").1);
        assert_eq!(failure(400, "").0.reason, FailureReason::Rejected);

        let ok = classify(Endpoint::Details, StatusCode::OK, None, b"{\"a\":1}", now);
        assert!(
            matches!(ok, Attempt::Done(answer) if answer.body["a"] == 1 && answer.sent_at == now)
        );
        let bad = classify(Endpoint::Details, StatusCode::OK, None, b"<html>", now);
        assert!(matches!(bad, Attempt::Failed { error, retry: false, .. }
            if error.reason == FailureReason::BadAnswer && error.detail.starts_with("not json")));
    }

    #[test]
    fn customer_ids_are_one_path_segment_whatever_they_hold() {
        let account = Account::new("2155", "k", "s").unwrap();
        let client = GameballClient::new(account, ClientOptions::default()).unwrap();
        let url = client.url(&["customers", "a/b?c#d %e", "details"]);
        assert_eq!(
            url.as_str(),
            "https://api.gameball.co/api/v4.0/integrations/customers/a%2Fb%3Fc%23d%20%25e/details"
        );
    }
}
