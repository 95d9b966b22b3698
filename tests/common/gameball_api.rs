//! A stand-in for Gameball's REST API on 127.0.0.1 port 0, for the reconciler's tests.
//!
//! It implements what the documentation says (gameball-docs `api-reference/openapi.json`,
//! "Gameball API 4.0.0"; the rate-limiting, authentication and error-code pages), not what our
//! client does: the endpoints `GET customers/{id}`, `/details`, `/balance`, `/tier-progress`,
//! `POST batch/balance-inquiry` and `GET batches/{id}/status` under `/api/v4.0|v4.1/integrations`;
//! the `APIKey` and `SecretKey` headers (the secret key on every endpoint but `customers/{id}` in
//! v4.0, on all of them in v4.1 or in High Security Mode); answers shaped like the
//! documentation's examples; errors as its error object (`code`, `type`, `message`,
//! `documentationUrl`, `requestId`) with its codes (1000, 1001, 1002, 3000, 7000); and the rate
//! limits per resource, a per-second and a per-30-second window, 429 beyond either. Every
//! request counts in its window, refused ones too, as a hammering client would find.
//!
//! Undocumented, so chosen here and said so: whether a 429 carries `Retry-After` (a switch,
//! off by default; when on, whole seconds until the window frees); the body of a 429 (none of
//! ours is read); the shape of one batch result (`customerId` plus the fields of `/balance`) and
//! of one batch error (`customerId`, `code`, `message`); `current: null` in `/tier-progress` for
//! a customer without a tier.
//!
//! Tests feed it customers, script trouble (slow answers, 429 storms, failing statuses,
//! replaced answers, failing batches) and read back what it saw: every request with its arrival
//! time and status, the busiest interval of any window, the most requests in flight at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The account's API key, as the stand-in knows it.
pub const API_KEY: &str = "stand-in-api-key";
/// The account's secret key.
pub const SECRET_KEY: &str = "stand-in-secret-key";

/// The endpoints, as the stand-in names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// `GET customers/{id}`.
    Customer,
    /// `GET customers/{id}/details`.
    Details,
    /// `GET customers/{id}/balance`.
    Balance,
    /// `GET customers/{id}/tier-progress`.
    TierProgress,
    /// `POST batch/balance-inquiry`.
    BalanceInquiry,
    /// `GET batches/{id}/status`.
    BatchStatus,
}

impl Api {
    /// The documented rate bucket it counts in.
    pub fn bucket(self) -> Bucket {
        match self {
            Api::Customer | Api::Details | Api::Balance | Api::TierProgress => Bucket::CustomersGet,
            Api::BalanceInquiry | Api::BatchStatus => Bucket::Others,
        }
    }
}

/// Gameball's rate buckets that these endpoints fall in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// Customers, GET: 100 per second, 1,200 per 30 s.
    CustomersGet,
    /// Others, any method: 30 per second, 360 per 30 s.
    Others,
}

/// What Gameball knows of one customer.
#[derive(Clone, Debug)]
pub struct Customer {
    /// The integrator's id.
    pub customer_id: String,
    /// Gameball's id.
    pub gameball_id: i64,
    /// `customerAttributes.email`.
    pub email: Option<String>,
    /// `customerAttributes.mobile`.
    pub mobile: Option<String>,
    /// `referralCode`.
    pub referral_code: Option<String>,
    /// `referralLink`.
    pub referral_link: Option<String>,
    /// The current tier: order and name.
    pub tier: Option<(i64, String)>,
    /// `availablePointsBalance`.
    pub available_points: i64,
    /// `pendingPoints`.
    pub pending_points: i64,
}

impl Customer {
    /// A customer with plausible values everywhere.
    pub fn new(customer_id: &str) -> Customer {
        Customer {
            customer_id: customer_id.to_owned(),
            gameball_id: 1000 + customer_id.len() as i64,
            email: Some(format!("{}@example.com", customer_id.len())),
            mobile: Some("+201000000000".into()),
            referral_code: Some("REF-CODE".into()),
            referral_link: Some("https://example.com/r/REF-CODE".into()),
            tier: Some((2, "Gold".into())),
            available_points: 1200,
            pending_points: 300,
        }
    }
}

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Which endpoint.
    pub api: Api,
    /// The version in its path.
    pub version: String,
    /// When it arrived.
    pub at: Instant,
    /// When it arrived, by the wall clock (to compare with an update's clock).
    pub wall: chrono::DateTime<chrono::Utc>,
    /// The status it was answered with.
    pub status: u16,
    /// The customers it was about (one, or a batch's).
    pub customers: Vec<String>,
}

#[derive(Clone)]
struct Storm {
    until: Instant,
    retry_after: Option<u64>,
}

struct Batch {
    created: Instant,
    customers: Vec<String>,
}

#[derive(Default)]
struct Script {
    high_security: bool,
    forbidden: bool,
    retry_after: bool,
    storm: Option<Storm>,
    delays: HashMap<Api, Duration>,
    fail_next: HashMap<Api, VecDeque<u16>>,
    /// The message of those failures, if not the default.
    fail_message: Option<String>,
    answers: HashMap<Api, Value>,
    batch_processing: Duration,
    batch_fails: bool,
    batch_omits: HashSet<String>,
    /// How far Gameball's clock (its answers' `Date`) is behind this host's.
    clock_behind: Option<Duration>,
}

struct StandIn {
    customers: Mutex<HashMap<String, Customer>>,
    limits: Mutex<HashMap<Bucket, Vec<(usize, Duration)>>>,
    script: Mutex<Script>,
    seen: Mutex<Vec<Seen>>,
    batches: Mutex<HashMap<u64, Batch>>,
    next_batch: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A running stand-in. Dropping it stops the server.
pub struct GameballStandIn {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<StandIn>,
    _stop: oneshot::Sender<()>,
}

impl GameballStandIn {
    /// Starts a stand-in with the documented limits and no customers.
    pub async fn start() -> GameballStandIn {
        let second = Duration::from_secs(1);
        let thirty = Duration::from_secs(30);
        let state = Arc::new(StandIn {
            customers: Mutex::default(),
            limits: Mutex::new(HashMap::from([
                (Bucket::CustomersGet, vec![(100, second), (1200, thirty)]),
                (Bucket::Others, vec![(30, second), (360, thirty)]),
            ])),
            script: Mutex::default(),
            seen: Mutex::default(),
            batches: Mutex::default(),
            next_batch: AtomicU64::new(4100),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let base = "/api/{version}/integrations";
        let router = Router::new()
            .route(
                &format!("{base}/customers/{{id}}"),
                customer_endpoint(Api::Customer),
            )
            .route(
                &format!("{base}/customers/{{id}}/details"),
                customer_endpoint(Api::Details),
            )
            .route(
                &format!("{base}/customers/{{id}}/balance"),
                customer_endpoint(Api::Balance),
            )
            .route(
                &format!("{base}/customers/{{id}}/tier-progress"),
                customer_endpoint(Api::TierProgress),
            )
            .route(
                &format!("{base}/batch/balance-inquiry"),
                post(balance_inquiry),
            )
            .route(&format!("{base}/batches/{{id}}/status"), get(batch_status))
            .layer(axum::middleware::map_response_with_state(
                Arc::clone(&state),
                gameball_date,
            ))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = axum::serve(listener, router);
            // Stopping drops the server and every connection: slow handlers end with it.
            tokio::select! {
                _ = serve => {}
                _ = stopped => {}
            }
        });
        GameballStandIn {
            addr,
            state,
            _stop: stop,
        }
    }

    /// Answers with a `Date` this much behind this host's clock, as a Gameball whose clock runs
    /// behind.
    pub fn clock_behind(&self, behind: Duration) {
        self.state.script.lock().unwrap().clock_behind = Some(behind);
    }

    /// The base URL to configure the client with.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds or replaces customers.
    pub fn add(&self, customers: impl IntoIterator<Item = Customer>) {
        let mut known = self.state.customers.lock().unwrap();
        for customer in customers {
            known.insert(customer.customer_id.clone(), customer);
        }
    }

    /// Replaces a bucket's windows: `(limit, length)` each.
    pub fn set_limits(&self, bucket: Bucket, windows: &[(usize, Duration)]) {
        self.state
            .limits
            .lock()
            .unwrap()
            .insert(bucket, windows.to_vec());
    }

    /// Whether a 429 for a full window carries `Retry-After`.
    pub fn send_retry_after(&self, on: bool) {
        self.script().retry_after = on;
    }

    /// High Security Mode: the secret key on every endpoint.
    pub fn high_security(&self, on: bool) {
        self.script().high_security = on;
    }

    /// Answers every authenticated request 403 (code 1002).
    pub fn forbid(&self, on: bool) {
        self.script().forbidden = on;
    }

    /// Answers every request 429 for `length` from now, with `Retry-After` if given.
    pub fn storm(&self, length: Duration, retry_after: Option<u64>) {
        self.script().storm = Some(Storm {
            until: Instant::now() + length,
            retry_after,
        });
    }

    /// Holds each answer of `api` back for `delay`.
    pub fn slow(&self, api: Api, delay: Duration) {
        self.script().delays.insert(api, delay);
    }

    /// Answers the next requests of `api` with these statuses, one each, before serving again.
    pub fn fail_next(&self, api: Api, statuses: &[u16]) {
        self.script()
            .fail_next
            .entry(api)
            .or_default()
            .extend(statuses);
    }

    /// As `fail_next`, each failure's message being `message` (Gameball's may quote the
    /// request: ids, e-mails, mobile numbers).
    pub fn fail_next_saying(&self, api: Api, statuses: &[u16], message: &str) {
        self.script().fail_message = Some(message.to_owned());
        self.fail_next(api, statuses);
    }

    /// Answers `api` with this body (status 200) instead of the customer's.
    pub fn answer(&self, api: Api, body: Value) {
        self.script().answers.insert(api, body);
    }

    /// How long a batch stays `processing` before it is `completed`.
    pub fn batch_processing(&self, length: Duration) {
        self.script().batch_processing = length;
    }

    /// Batches end `failed` instead of `completed`.
    pub fn batch_fails(&self, on: bool) {
        self.script().batch_fails = on;
    }

    /// Batches leave this customer out of both `results` and `errors`.
    pub fn batch_omits(&self, customer_id: &str) {
        self.script().batch_omits.insert(customer_id.to_owned());
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// How many requests `api` received.
    pub fn count(&self, api: Api) -> usize {
        self.seen().iter().filter(|seen| seen.api == api).count()
    }

    /// How many requests were answered `status`.
    pub fn count_status(&self, status: u16) -> usize {
        self.seen()
            .iter()
            .filter(|seen| seen.status == status)
            .count()
    }

    /// The most requests of `bucket` that arrived within any interval of `length`.
    pub fn busiest(&self, bucket: Bucket, length: Duration) -> usize {
        let times: Vec<Instant> = self
            .seen()
            .iter()
            .filter(|seen| seen.api.bucket() == bucket)
            .map(|seen| seen.at)
            .collect();
        let mut start = 0;
        let mut most = 0;
        for end in 0..times.len() {
            while times[end] - times[start] >= length {
                start += 1;
            }
            most = most.max(end - start + 1);
        }
        most
    }

    /// The most requests that were being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.state.script.lock().unwrap()
    }
}

/// Counts a request as in flight until dropped (also when the client gives up on it).
struct InFlight<'a>(&'a StandIn);

impl<'a> InFlight<'a> {
    fn enter(state: &'a StandIn) -> InFlight<'a> {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The documented error object.
fn error(status: u16, code: u32, kind: &str, message: &str) -> Response {
    let body = json!({
        "code": code,
        "type": kind,
        "message": message,
        "documentationUrl": "https://developer.gameball.co/4.0/rest-api/api-reference",
        "requestId": uuid::Uuid::new_v4().simple().to_string(),
    });
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

fn too_many(retry_after: Option<u64>) -> Response {
    let mut response = StatusCode::TOO_MANY_REQUESTS.into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
    }
    response
}

impl StandIn {
    /// Everything before an endpoint's own answer: slow answers, storms, the rate limit
    /// refusal decided on arrival, scripted failures, versions, keys and replaced answers, in
    /// that order. `None`: go on.
    async fn gate(
        &self,
        api: Api,
        version: &str,
        headers: &HeaderMap,
        over_limit: Option<Response>,
    ) -> Option<Response> {
        let now = Instant::now();
        let (delay, storm) = {
            let script = self.script.lock().unwrap();
            let storm = script.storm.clone().filter(|storm| storm.until > now);
            (script.delays.get(&api).copied(), storm)
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(storm) = storm {
            return Some(too_many(storm.retry_after));
        }
        if over_limit.is_some() {
            return over_limit;
        }
        let mut script = self.script.lock().unwrap();
        if let Some(status) = script.fail_next.get_mut(&api).and_then(VecDeque::pop_front) {
            let message = script
                .fail_message
                .as_deref()
                .unwrap_or("Scripted failure.");
            return Some(error(status, 5000, "Server Error", message));
        }
        if version != "v4.0" && version != "v4.1" {
            return Some(StatusCode::NOT_FOUND.into_response());
        }
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        if header("apikey") != Some(API_KEY) {
            return Some(error(
                401,
                1000,
                "Authentication Error",
                "Unauthorized access.",
            ));
        }
        let needs_secret = api != Api::Customer || version == "v4.1" || script.high_security;
        if needs_secret && header("secretkey") != Some(SECRET_KEY) {
            let message = "A valid secret key is required.";
            return Some(error(401, 1001, "Authentication Error", message));
        }
        if script.forbidden {
            // Echoing the key, as a proxy or a verbose API may: it must not reach reports.
            let key = header("apikey").unwrap_or_default();
            let message = format!("No permission to access the resource with key {key}.");
            return Some(error(403, 1002, "Authentication Error", &message));
        }
        script
            .answers
            .get(&api)
            .map(|body| axum::Json(body.clone()).into_response())
    }

    /// A 429 if a request arriving `now` after `seen` exceeds a window of its bucket. Every
    /// arrival counts, refused or not.
    fn over_limit(&self, seen: &[Seen], api: Api, now: Instant) -> Option<Response> {
        let limits = self.limits.lock().unwrap()[&api.bucket()].clone();
        let earlier: Vec<Instant> = seen
            .iter()
            .filter(|seen| seen.api.bucket() == api.bucket())
            .map(|seen| seen.at)
            .collect();
        let mut frees_in = None;
        for (limit, length) in limits {
            let inside: Vec<&Instant> = earlier.iter().filter(|at| now - **at < length).collect();
            if inside.len() >= limit {
                let oldest = *inside[inside.len() - limit];
                let wait = length - (now - oldest);
                frees_in = Some(frees_in.map_or(wait, |other: Duration| other.max(wait)));
            }
        }
        let wait = frees_in?;
        let retry_after = self.script.lock().unwrap().retry_after;
        Some(too_many(
            retry_after.then(|| wait.as_secs_f64().ceil().max(1.0) as u64),
        ))
    }

    /// Serves one request: the gate, then `answer`; records it with its status.
    async fn serve(
        &self,
        api: Api,
        version: &str,
        headers: &HeaderMap,
        customers: Vec<String>,
        answer: impl FnOnce(&StandIn) -> Response,
    ) -> Response {
        let _in_flight = InFlight::enter(self);
        // Judge the limits and record the arrival under one lock, so concurrent arrivals are
        // counted as they come.
        let (index, over_limit) = {
            let mut seen = self.seen.lock().unwrap();
            let at = Instant::now();
            let over_limit = self.over_limit(&seen, api, at);
            seen.push(Seen {
                api,
                version: version.to_owned(),
                at,
                wall: chrono::Utc::now(),
                status: 0,
                customers,
            });
            (seen.len() - 1, over_limit)
        };
        let response = match self.gate(api, version, headers, over_limit).await {
            Some(response) => response,
            None => answer(self),
        };
        self.seen.lock().unwrap()[index].status = response.status().as_u16();
        response
    }

    fn customer_answer(customer: &Customer, with_pii: bool) -> Value {
        let mut attributes = json!({
            "gender": "F", "country": "EG", "city": "Cairo", "zip": "11511",
            "custom": {"favorite_color": "blue"}, "tags": ["vip"], "source": "web",
            "utMs": [], "utms": [], "devices": [], "paymentMethods": ["card"],
            "totalSpent": 250.5, "lastOrderDate": "2024-11-01T10:00:00", "totalOrders": 3,
            "manualDate": null,
        });
        if with_pii {
            let pii = json!({
                "displayName": "Jo", "firstName": "Jo", "lastName": "Doe",
                "email": customer.email, "mobile": customer.mobile,
                "dateOfBirth": "1990-01-01T00:00:00", "joinDate": "2023-03-10T00:00:00",
                "preferredLanguage": "en", "avgOrderAmount": 83.5, "channel": "web",
            });
            attributes
                .as_object_mut()
                .unwrap()
                .extend(pii.as_object().unwrap().clone());
        }
        json!({
            "gameballId": customer.gameball_id,
            "customerId": customer.customer_id,
            "customerAttributes": attributes,
            "referralCode": customer.referral_code,
            "referralLink": customer.referral_link,
            "isReferred": false,
            "dynamicReferralLink": customer.referral_link,
        })
    }

    fn balance_of(customer: &Customer) -> Value {
        let total = customer.available_points + customer.pending_points;
        json!({
            "totalPointsBalance": total,
            "totalPointsValue": total as f64 * 0.05,
            "availablePointsBalance": customer.available_points,
            "availablePointsValue": customer.available_points as f64 * 0.05,
            "pendingPoints": customer.pending_points,
            "pendingPointsValue": customer.pending_points as f64 * 0.05,
            "currency": "USD",
            "pointsName": "Reward Points",
            "nextExpiringPointsAmount": 200,
            "nextExpiringPointsValue": 10.0,
            "nextExpiringPointsDate": "2024-12-01T00:00:00",
            "totalEarnedPoints": total + 1000,
        })
    }

    fn tier_answer(customer: &Customer) -> Value {
        let icon = "https://cdn.gameball.co/uploads/gb-library/levels-icons/level-a1.webp";
        let current = customer.tier.as_ref().map(|(order, name)| {
            json!({"order": order, "name": name, "minProgress": order * 100, "icon": icon})
        });
        let next = customer.tier.as_ref().map(|(order, _)| {
            json!({"order": order + 1, "name": "Platinum", "minProgress": (order + 1) * 100,
                   "icon": icon})
        });
        json!({"current": current, "next": next, "progress": 50})
    }
}

/// The four `customers/{id}` endpoints: one handler, told which one it serves.
fn customer_endpoint(api: Api) -> MethodRouter<Arc<StandIn>> {
    get(
        move |State(state): State<Arc<StandIn>>,
              Path((version, id)): Path<(String, String)>,
              headers: HeaderMap| async move {
            let answer = |state: &StandIn| {
                let customers = state.customers.lock().unwrap();
                let Some(customer) = customers.get(&id) else {
                    return error(404, 7000, "Customer Error", "Customer not found.");
                };
                let body = match api {
                    Api::Customer => StandIn::customer_answer(customer, false),
                    Api::Details => StandIn::customer_answer(customer, true),
                    Api::Balance => StandIn::balance_of(customer),
                    _ => StandIn::tier_answer(customer),
                };
                axum::Json(body).into_response()
            };
            state
                .serve(api, &version, &headers, vec![id.clone()], answer)
                .await
        },
    )
}

async fn balance_inquiry(
    State(state): State<Arc<StandIn>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ids: Option<Vec<String>> = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|body| {
            body.get("body")?
                .as_array()?
                .iter()
                .map(|item| Some(item.get("customerId")?.as_str()?.to_owned()))
                .collect()
        });
    let answer = |state: &StandIn| match &ids {
        None => error(400, 3016, "Payload Error", "Invalid payload."),
        Some(ids) if ids.is_empty() || ids.len() > 1000 => error(
            400,
            3000,
            "Payload Error",
            "Between 1 and 1000 objects per batch.",
        ),
        Some(ids) => {
            let job_id = state.next_batch.fetch_add(1, Ordering::SeqCst);
            let batch = Batch {
                created: Instant::now(),
                customers: ids.clone(),
            };
            state.batches.lock().unwrap().insert(job_id, batch);
            axum::Json(json!({ "jobId": job_id })).into_response()
        }
    };
    let customers = ids.clone().unwrap_or_default();
    state
        .serve(Api::BalanceInquiry, &version, &headers, customers, answer)
        .await
}

async fn batch_status(
    State(state): State<Arc<StandIn>>,
    Path((version, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let answer = |state: &StandIn| {
        let batches = state.batches.lock().unwrap();
        let Some(batch) = id.parse().ok().and_then(|id: u64| batches.get(&id)) else {
            return error(404, 4004, "General Error", "Not found.");
        };
        let script = state.script.lock().unwrap();
        let done = batch.created.elapsed() >= script.batch_processing;
        let status = match (done, script.batch_fails) {
            (false, _) => "processing",
            (true, false) => "completed",
            (true, true) => "failed",
        };
        let customers = state.customers.lock().unwrap();
        let mut results = Vec::new();
        let mut errors = Vec::new();
        if status == "completed" {
            for customer_id in &batch.customers {
                if script.batch_omits.contains(customer_id) {
                    continue;
                }
                match customers.get(customer_id) {
                    Some(customer) => {
                        let mut result = StandIn::balance_of(customer);
                        result["customerId"] = json!(customer_id);
                        results.push(result);
                    }
                    None => errors.push(json!({"customerId": customer_id, "code": 7000,
                                               "message": "Customer not found."})),
                }
            }
        }
        axum::Json(json!({
            "batchId": id,
            "status": status,
            "progress": if done { 100 } else { 40 },
            "totalItems": batch.customers.len(),
            "processedItems": results.len() + errors.len(),
            "failedItems": errors.len(),
            "results": results,
            "errors": errors,
        }))
        .into_response()
    };
    state
        .serve(Api::BatchStatus, &version, &headers, vec![], answer)
        .await
}

/// The `Date` of every answer, on the stand-in's clock when it runs behind (hyper's own
/// otherwise).
async fn gameball_date(
    State(state): State<Arc<StandIn>>,
    mut response: axum::response::Response,
) -> axum::response::Response {
    let behind = state.script.lock().unwrap().clock_behind;
    if let Some(behind) = behind {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now() - behind);
        let value =
            axum::http::HeaderValue::from_str(&date).expect("an HTTP date is a header value");
        response
            .headers_mut()
            .insert(axum::http::header::DATE, value);
    }
    response
}
