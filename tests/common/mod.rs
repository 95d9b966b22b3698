//! Test harness: the whole service in-process on 127.0.0.1 port 0, a signed-webhook client,
//! a connected gRPC client, the durable configuration, and Gameball's signed fixtures.

#![allow(dead_code)]

pub mod binary;
#[path = "../fixtures/mod.rs"]
pub mod fixtures;
pub mod gameball_api;
pub mod reflection;
pub mod stream_backup;
pub mod stuck_file;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use profile_state::pb;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use profile_state::webhook::signature::SignatureCheck;
use profile_state::{Config, Server};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The secret every test service uses.
pub const SECRET: &str = "test-secret";
/// The Content-Type of every well-behaved delivery.
pub const JSON: &str = "application/json";

/// The test configuration, durable: journal, snapshots and dead letters in `dir`.
pub fn durable_config(dir: &Path) -> Config {
    let mut config = Config::for_tests(SECRET);
    config.ephemeral = false;
    config.data_dir = dir.to_owned();
    config
}

/// GetServerInfo through `client`.
pub async fn server_info(
    client: &mut ProfileServiceClient<Channel>,
) -> Result<pb::GetServerInfoResponse, tonic::Status> {
    client
        .get_server_info(pb::GetServerInfoRequest {})
        .await
        .map(tonic::Response::into_inner)
}

/// Every profile `client` serves, paged through ListProfiles, and the highest store revision a
/// page reported.
pub async fn list_all(client: &mut ProfileServiceClient<Channel>) -> (Vec<pb::Profile>, u64) {
    let (mut profiles, mut page_token, mut revision) = (Vec::new(), String::new(), 0);
    loop {
        let page = client
            .list_profiles(pb::ListProfilesRequest {
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("ListProfiles answers")
            .into_inner();
        revision = revision.max(page.store_revision);
        profiles.extend(page.profiles);
        if page.next_page_token.is_empty() {
            return (profiles, revision);
        }
        page_token = page.next_page_token;
    }
}

/// The journal's syncs held (`FaultSwitch::hold_syncs`) until this drops: released however a
/// test ends, so a failed assertion does not leave the journal's thread waiting for ever.
pub struct HeldSyncs(profile_state::journal::FaultSwitch);

impl HeldSyncs {
    pub fn hold(faults: &profile_state::journal::FaultSwitch) -> HeldSyncs {
        faults.hold_syncs(true);
        HeldSyncs(faults.clone())
    }
}

impl Drop for HeldSyncs {
    fn drop(&mut self) {
        self.0.hold_syncs(false);
    }
}

/// Log lines written into a shared buffer, for tests that capture them.
#[derive(Clone, Default)]
pub struct CapturedLogs(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// Captures this thread's log lines at `level` and above until the guard drops. A test's
    /// current-thread runtime runs the server's tasks here, and the ingest thread takes its
    /// creator's default subscriber as its own, so their lines are captured too.
    ///
    /// Whatever other tests do on their threads meanwhile: while a single dispatcher is
    /// registered, tracing-core decides whether a log line's call site is wanted at all by
    /// asking only the default subscriber of the thread that reaches the call site first
    /// (`has_just_one` in its `callsite.rs`), and keeps the answer for every thread. Another
    /// test's thread, with no subscriber, reaching a call site first (the reconcile schedule's
    /// "waits" line, run by two tests at once) made it never wanted, and this capture lost
    /// every such line. A second dispatcher registered for as long as the capture makes
    /// tracing ask every registered one, this capture's included.
    pub fn on_this_thread(level: tracing::Level) -> (CapturedLogs, Capturing) {
        let captured = CapturedLogs::default();
        let writer = captured.clone();
        // Plain text, no colours: tests match fields as they are written (`listener="webhook"`).
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // Registering it asks every registered dispatcher again about every call site known,
        // those another thread reached while this capture was the only one included.
        let second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let capturing = Capturing {
            _guard: guard,
            _second: second,
        };
        (captured, capturing)
    }

    /// What was captured so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// A capture in progress ([`CapturedLogs::on_this_thread`]): this thread's default
/// subscriber, and the second dispatcher that keeps tracing asking it, until dropped.
pub struct Capturing {
    _guard: tracing::subscriber::DefaultGuard,
    _second: tracing::Dispatch,
}

/// A running service. Dropping it without `stop` aborts nothing: call `stop` to shut it down.
pub struct TestService {
    pub webhook: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestService {
    /// Starts a service with the test defaults.
    pub async fn start() -> TestService {
        Self::start_with(Config::for_tests(SECRET)).await
    }

    /// Starts a service with this configuration (addresses should use port 0).
    pub async fn start_with(config: Config) -> TestService {
        Self::serve(Server::bind(config).await.expect("service binds"))
    }

    /// Serves an already bound server.
    pub fn serve(server: Server) -> TestService {
        let webhook = server.webhook_addr();
        let grpc = server.grpc_addr();
        let admin = server.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestService {
            webhook,
            grpc,
            admin,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The webhook URL.
    pub fn webhook_url(&self) -> String {
        format!("http://{}/webhooks/gameball", self.webhook)
    }

    /// GETs a path of the admin listener; returns status and body text.
    /// (Until `Server::run` has started monitoring, `/readyz` answers 503 "starting" and
    /// `/metrics` the start-up exposition: asked again, as a probe would.)
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let deadline = std::time::Instant::now() + binary::PATIENCE;
        loop {
            let response = self
                .http
                .get(format!("http://{}{path}", self.admin))
                .send()
                .await
                .expect("admin answers");
            let answer = (response.status().as_u16(), response.text().await.unwrap());
            let starting = answer == (503, "starting\n".into())
                || answer.1.contains("\nprofile_state_starting 1\n");
            if !starting {
                return answer;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path}: still starting"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reads `/metrics` until `check` holds for it (failing after `binary::PATIENCE`): the
    /// server counts a connection or a stream on its own tasks, a moment after the client
    /// sees it.
    pub async fn metrics_until(&self, check: impl Fn(&str) -> bool) -> String {
        tokio::time::timeout(binary::PATIENCE, async {
            loop {
                let (_, text) = self.admin_get("/metrics").await;
                if check(&text) {
                    return text;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the metrics reach the expected state")
    }

    /// A gRPC client connected to the service.
    pub async fn client(&self) -> ProfileServiceClient<Channel> {
        ProfileServiceClient::new(self.channel().await)
    }

    /// A raw channel to the gRPC listener.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .expect("gRPC connects")
    }

    /// Every profile, paged through ListProfiles, and the highest store revision a page
    /// reported.
    pub async fn all_profiles(&self) -> (Vec<pb::Profile>, u64) {
        list_all(&mut self.client().await).await
    }

    /// GetServerInfo, which must answer.
    pub async fn server_info(&self) -> pb::GetServerInfoResponse {
        server_info(&mut self.client().await)
            .await
            .expect("GetServerInfo answers")
    }

    /// Posts `body` signed with the test secret; returns status and JSON answer.
    pub async fn post(&self, body: &Value) -> (u16, Value) {
        self.post_signed(&serde_json::to_vec(body).unwrap()).await
    }

    /// Posts exact bytes signed with the test secret, as JSON.
    pub async fn post_signed(&self, body: &[u8]) -> (u16, Value) {
        self.post_signed_as(body.to_vec(), SECRET, Some(JSON)).await
    }

    /// Posts exact bytes signed with `secret`, with this Content-Type (none if `None`).
    pub async fn post_signed_as(
        &self,
        body: Vec<u8>,
        secret: &str,
        content_type: Option<&str>,
    ) -> (u16, Value) {
        let signature = SignatureCheck::new(secret).sign(&body);
        let mut headers = vec![("x-gb-signature", signature.as_str())];
        headers.extend(content_type.map(|value| ("content-type", value)));
        self.post_raw(body, &headers).await
    }

    /// Posts raw bytes with exactly these headers.
    pub async fn post_raw(&self, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self.http.post(self.webhook_url()).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("webhook request is answered");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    /// Posts a profile update and asserts it was answered 200; returns the answer.
    pub async fn update(&self, body: &Value) -> Value {
        let (status, answer) = self.post(body).await;
        assert_eq!(status, 200, "webhook refused: {answer}");
        answer
    }

    /// Shuts the service down and waits for it, failing if that takes longer than `within`.
    pub async fn stop_within(mut self, within: Duration) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(within, task)
            .await
            .expect("service stops in time")
            .expect("service task does not panic")
            .expect("service stops cleanly");
    }

    /// Waits for the service to stop by itself, with no signal sent, failing if that takes
    /// longer than `within`; returns how it ended.
    pub async fn stopped_by_itself(mut self, within: Duration) -> anyhow::Result<()> {
        let task = self.task.take().unwrap();
        tokio::time::timeout(within, task)
            .await
            .expect("service stops by itself")
            .expect("service task does not panic")
    }

    /// Shuts the service down.
    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(10)).await
    }
}

/// Sets one metadata entry of the stream `name`, as an operator or another release might have.
pub async fn set_stream_metadata(
    context: &async_nats::jetstream::Context,
    name: &str,
    key: &str,
    value: &str,
) {
    let stream = context.get_stream(name).await.expect("the stream exists");
    let mut config = stream.cached_info().config.clone();
    config.metadata.insert(key.into(), value.into());
    context
        .update_stream(config)
        .await
        .expect("the stream updates");
}

/// A `customer.profile.updated` body for `customer` at `created_at` with these `data` fields.
pub fn profile_updated(customer: &str, created_at: &str, data: Value) -> Value {
    json!({
        "event": "customer.profile.updated",
        "client_id": "2155",
        "customer_id": customer,
        "gb_customer_id": 1234,
        "created_at": created_at,
        "data": data,
    })
}

/// An RFC 3339 timestamp `second` seconds into a fixed day.
pub fn at(second: u32) -> String {
    format!(
        "2024-11-19T{:02}:{:02}:{:02}.000Z",
        second / 3600 % 24,
        second / 60 % 60,
        second % 60
    )
}

/// A purge leaves the letter `id` to a replay that holds it, and removes it once the replay has
/// given it back: through the `DeadLetters` handle of either backend.
pub async fn assert_purge_leaves_a_held_letter(
    letters: &profile_state::dead_letters::DeadLetters,
    id: &profile_state::dead_letters::DeadLetterId,
) {
    use profile_state::dead_letters::{Purge, Purged};
    let purge = || Purge::Ids(vec![id.clone()]);
    let claim = letters.claim(id).await.unwrap();
    let left = Purged {
        removed: vec![],
        replaying: vec![id.clone()],
    };
    assert_eq!(letters.purge(purge()).await.unwrap(), left);
    assert_eq!(letters.purge(Purge::All).await.unwrap(), left);
    assert!(
        letters.get(id).await.unwrap().is_some(),
        "left to the replay"
    );
    letters.release(claim, None).await.unwrap();
    let purged = Purged {
        removed: vec![id.clone()],
        replaying: vec![],
    };
    assert_eq!(letters.purge(purge()).await.unwrap(), purged);
    assert!(letters.get(id).await.unwrap().is_none());
}

/// The value of the one sample of `name` whose labels are exactly `labels` (any order).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, found) = match series.split_once('{') {
            Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let mut found: Vec<String> = found
            .split(',')
            .filter(|label| !label.is_empty())
            .map(str::to_owned)
            .collect();
        found.sort();
        (metric == name && found == wanted).then(|| value.parse().ok())?
    })
}
