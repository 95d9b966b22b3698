//! Operating the service: secret rotation and reload, webhook limits, the admin listener
//! (metrics, health, readiness), personal data kept out of logs, and SIGTERM.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use common::{TestService, at, durable_config, profile_updated};
use profile_state::Config;
use profile_state::metrics::Metrics;
use profile_state::pb;
use profile_state::sequencer::Sequencer;
use profile_state::store::Store;
use profile_state::webhook::secrets::{SecretStore, Secrets};
use profile_state::webhook::signature::SignatureCheck;
use profile_state::webhook::{Ingress, Limits, Verification};
use serde_json::{Value, json};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// `body` as bytes, and its signature under `secret`.
fn signed(body: &Value, secret: &str) -> (Vec<u8>, String) {
    let raw = serde_json::to_vec(body).unwrap();
    let signature = SignatureCheck::new(secret).sign(&raw);
    (raw, signature)
}

/// Posts `body` signed with `secret`, without a Content-Type (which the webhook accepts).
async fn post_signed(service: &TestService, body: &Value, secret: &str) -> (u16, Value) {
    let raw = serde_json::to_vec(body).unwrap();
    service.post_signed_as(raw, secret, None).await
}

fn with_secrets_file(path: &std::path::Path) -> Config {
    let mut config = Config::for_tests(common::SECRET);
    config.webhook_secret = None;
    config.webhook_secrets_file = Some(path.to_owned());
    config
}

#[tokio::test]
async fn rotated_secrets_are_all_accepted_until_a_reload_removes_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.toml");
    std::fs::write(&file, "[clients]\n\"2155\" = [\"new\", \"old\"]\n").unwrap();
    let server = profile_state::Server::bind(with_secrets_file(&file))
        .await
        .unwrap();
    let secrets = server.webhook_secrets().expect("signatures are checked");
    let service = TestService::serve(server);

    let update = |n| profile_updated("a", &at(n), json!({"total_points": n}));
    assert_eq!(post_signed(&service, &update(1), "new").await.0, 200);
    assert_eq!(post_signed(&service, &update(2), "old").await.0, 200);
    let mut other_client = update(3);
    other_client["client_id"] = json!("9999");
    let (status, answer) = post_signed(&service, &other_client, "new").await;
    assert_eq!(
        status, 401,
        "a client without secrets and no default: {answer}"
    );

    std::fs::write(&file, "[clients]\n\"2155\" = [\"new\"]\n").unwrap();
    secrets.reload().unwrap();
    assert_eq!(
        post_signed(&service, &update(4), "old").await.0,
        401,
        "old secret removed"
    );
    assert_eq!(post_signed(&service, &update(5), "new").await.0, 200);

    std::fs::write(&file, "[clients\n").unwrap();
    let error = secrets.reload().expect_err("a broken file is refused");
    assert!(error.to_string().contains("secrets.toml"), "{error}");
    assert_eq!(
        post_signed(&service, &update(6), "new").await.0,
        200,
        "old set kept"
    );
    service.stop().await;
}

/// Flags that keep a spawned binary in memory and on free loopback ports.
const LOOPBACK_EPHEMERAL: [&str; 7] = [
    "--ephemeral",
    "--webhook-listen",
    "127.0.0.1:0",
    "--grpc-listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
];

/// The real binary, killed when dropped.
struct Binary {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Binary {
    fn start(args: &[&str]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_profile-state"))
            .args(args)
            .args(["--log-format", "json"])
            .args(LOOPBACK_EPHEMERAL)
            .env_remove("PROFILE_STATE_WEBHOOK_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Binary { child, lines }
    }

    /// The next log line whose message is `message`, as JSON.
    fn wait_for(&self, message: &str) -> Value {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no log line {message:?} within 30 s"));
            let json: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if json["message"] == message {
                return json;
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sighup_reloads_the_secrets_file_of_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.json");
    std::fs::write(&file, r#"{"default": ["first"]}"#).unwrap();
    let binary = Binary::start(&["--webhook-secrets-file", file.to_str().unwrap()]);
    let listening = binary.wait_for("profile-state listening");
    let url = format!(
        "http://{}/webhooks/gameball",
        listening["webhook"].as_str().unwrap()
    );
    let post = async |n: u32, secret: &str| {
        let (raw, signature) = signed(&profile_updated("a", &at(n), json!({})), secret);
        reqwest::Client::new()
            .post(&url)
            .header("x-gb-signature", signature)
            .body(raw)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post(1, "first").await, 200);
    std::fs::write(&file, r#"{"default": ["second"]}"#).unwrap();
    binary.signal("HUP");
    binary.wait_for("webhook secrets reloaded");
    assert_eq!(post(2, "first").await, 401);
    assert_eq!(post(3, "second").await, 200);
}

/// With no `default`, a delivery that no secret applies to is not logged as a bad signature:
/// the log line says no secret applied (a first-user review was told "this client_id" of a body
/// that had none), and the 401 says whether its `client_id` could be read at all. Whether one
/// is configured for a readable `client_id` is the log's to say: the 401 is the same as a wrong
/// signature's for a configured one, or anyone could learn a server's accounts by trying ids.
#[tokio::test]
async fn a_delivery_no_secret_applies_to_says_why_and_is_not_logged_as_a_bad_signature() {
    use profile_state::webhook::signature::{MISMATCH, NO_SECRET_FOR_CLIENT, UNREADABLE_CLIENT_ID};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.toml");
    std::fs::write(&file, "[clients]\n\"2155\" = [\"known\"]\n").unwrap();
    let binary = Binary::start(&["--webhook-secrets-file", file.to_str().unwrap()]);
    let listening = binary.wait_for("profile-state listening");
    let url = format!(
        "http://{}/webhooks/gameball",
        listening["webhook"].as_str().unwrap()
    );
    let post_signed = async |raw: Vec<u8>, signature: Option<&str>| {
        let mut request = reqwest::Client::new().post(&url).body(raw);
        if let Some(signature) = signature {
            request = request.header("x-gb-signature", signature);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };
    let wrong = "a".repeat(40);
    let post = async |raw: Vec<u8>| post_signed(raw, Some(&wrong)).await;
    // One line per 10 s: the unknown account's is the one looked at.
    let mut unknown = profile_updated("a", &at(1), json!({}));
    unknown["client_id"] = json!("7777");
    let (status, answer) = post(serde_json::to_vec(&unknown).unwrap()).await;
    assert_eq!(status, 401, "{answer}");
    let line = binary.wait_for("webhook refused: no secret for the account");
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["client_id"], "7777", "{line}");
    assert_eq!(line["reason"], NO_SECRET_FOR_CLIENT, "{line}");
    let known = profile_updated("a", &at(1), json!({}));
    assert_eq!(known["client_id"], "2155");
    let (known_status, known_answer) = post(serde_json::to_vec(&known).unwrap()).await;
    assert_eq!((status, &answer), (known_status, &known_answer));
    assert_eq!(answer["error"], MISMATCH);
    // Nor does a header that is missing or cannot be a signature tell them apart.
    for signature in [None, Some("not hex")] {
        let unknown = post_signed(serde_json::to_vec(&unknown).unwrap(), signature).await;
        let known = post_signed(serde_json::to_vec(&known).unwrap(), signature).await;
        assert_eq!(unknown, known, "{signature:?}");
        assert_eq!(unknown.0, 401);
        assert_ne!(unknown.1["error"], MISMATCH, "{signature:?} is named");
    }

    let (status, answer) = post(b"garbage".to_vec()).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["error"], UNREADABLE_CLIENT_ID);
}

#[tokio::test]
async fn sigterm_ends_watchers_with_a_resume_point_and_exits_zero_in_time() {
    let binary = Binary::start(&["--webhook-secret", common::SECRET, "--shutdown-grace", "5s"]);
    let listening = binary.wait_for("profile-state listening");
    let grpc = listening["grpc"].as_str().unwrap().to_owned();
    let mut client =
        pb::profile_service_client::ProfileServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
    let mut stream = client
        .watch_profiles(pb::WatchProfilesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some(), "Synced");

    let mut binary = binary;
    binary.signal("TERM");
    let mut last = None;
    let status = loop {
        match stream.message().await {
            Ok(Some(message)) => last = message.event,
            Ok(None) => panic!("the stream must end with a status"),
            Err(status) => break status,
        }
    };
    assert!(
        matches!(last, Some(pb::watch_profiles_response::Event::Progress(_))),
        "{last:?} then {status:?}"
    );
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("resume from revision 1"),
        "{}",
        status.message()
    );
    let exited = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = binary.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            std::thread::yield_now();
        }
    });
    let (exit, took) = tokio::time::timeout(Duration::from_secs(10), exited)
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// A client that sent half a request to the admin listener (a slowloris) held the stop for the
/// whole `--shutdown-grace`, and the admin listener stopped accepting as soon as the stop
/// began, so `/readyz` could not say "shutting down" while webhooks drained (found by an
/// adversarial run). Here a webhook whose body is held keeps the drain going: `/readyz` answers
/// 503 "shutting down" meanwhile; once the body arrives the webhook is applied and answered,
/// and the process exits at once, the half request notwithstanding (the grace is 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_answers_through_the_stop_and_does_not_hold_it() {
    use std::io::{Read, Write};
    let mut binary = Binary::start(&[
        "--webhook-secret",
        common::SECRET,
        "--shutdown-grace",
        "60s",
        "--webhook-body-timeout",
        "60s",
    ]);
    let listening = binary.wait_for("profile-state listening");
    let address = |name: &str| listening[name].as_str().unwrap().to_owned();
    let (admin, webhook) = (address("admin"), address("webhook"));
    let mut slowloris = std::net::TcpStream::connect(&admin).unwrap();
    slowloris
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (raw, signature) = signed(&profile_updated("held", &at(1), json!({})), common::SECRET);
    let mut held = std::net::TcpStream::connect(&webhook).unwrap();
    let head = format!(
        "POST /webhooks/gameball HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Expect: 100-continue\r\nX-GB-Signature: {signature}\r\nContent-Length: {}\r\n\r\n",
        raw.len()
    );
    held.write_all(head.as_bytes()).unwrap();
    // The 100 Continue says the handler is reading the body: the request is in progress, so
    // the stop waits for it (sent before that, a stop could close the connection as idle).
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut continued = [0u8; 25];
    tokio::task::block_in_place(|| held.read_exact(&mut continued)).unwrap();
    assert_eq!(&continued, b"HTTP/1.1 100 Continue\r\n\r\n");
    held.write_all(&raw[..10]).unwrap();

    binary.signal("TERM");
    binary.wait_for("shutting down");
    let readyz = format!("http://{admin}/readyz");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let response = reqwest::get(&readyz)
            .await
            .expect("/readyz answers while stopping");
        let answer = (response.status().as_u16(), response.text().await.unwrap());
        if answer.0 != 200 || std::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(answer, (503, "shutting down\n".to_string()));

    held.write_all(&raw[10..]).unwrap();
    let mut answered = [0u8; 12];
    tokio::task::block_in_place(|| held.read_exact(&mut answered)).unwrap();
    assert_eq!(&answered, b"HTTP/1.1 200", "the held webhook is applied");
    // Polled, so that a process that does not exit fails the test instead of hanging it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = binary.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running 10 s after its last webhook was answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(exit.success(), "{exit}");
    drop(slowloris);
}

/// The admin listener had no cap and no timeouts: connections held open there (half a request,
/// or none) stayed for ever, each with an open file the webhook listener may need (found while
/// fixing the slowloris above). A half-sent request is closed after 10 s, and at most 256
/// connections are held: one more closes the connection idle the longest and is served (256
/// idle connections held by one client kept every probe and scraper out; an adversarial run),
/// counted as closed idle. HTTP/2 is not served there: unread streams each held a rendered
/// `/metrics` (1.6 GB from 60 connections, found by an adversarial run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_caps_its_connections_and_closes_a_slow_request() {
    use std::io::{Read, Write};
    let service = TestService::start().await;
    let connect = || std::net::TcpStream::connect(service.admin).unwrap();
    // Closed: end of file, or a reset when the server closed before reading what was sent.
    let closed = |read: &std::io::Result<usize>| match read {
        Ok(0) => true,
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    let mut slowloris = connect();
    slowloris
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slowloris
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let since = std::time::Instant::now();
    let read = tokio::task::block_in_place(|| slowloris.read(&mut [0u8; 1]));
    assert!(
        closed(&read),
        "half a request is closed, not answered: {read:?}"
    );
    assert!(
        since.elapsed() < Duration::from_secs(20),
        "{:?}",
        since.elapsed()
    );

    let mut held: Vec<_> = (0..256).map(|_| connect()).collect();
    // Each of them accepted before the next (a request answered on the last).
    let mut last = held.last().unwrap();
    last.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    tokio::task::block_in_place(|| last.read(&mut [0u8; 1])).unwrap();
    let mut newcomer = connect();
    newcomer
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    tokio::task::block_in_place(|| newcomer.read_to_string(&mut answer)).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the 257th is served: {answer}"
    );
    // The idlest made room: the first held, or, while the others are less than a second old
    // with no request yet (they may still be sending their first, and go only when none else
    // can), the last one, idle since its answer. Which one depends on the time by design.
    let ended = |stream: std::net::TcpStream| async move {
        use tokio::io::AsyncReadExt;
        stream.set_nonblocking(true).unwrap();
        let mut stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let read = stream.read_to_end(&mut Vec::new()).await.map(|_| 0);
        assert!(closed(&read), "{read:?}");
    };
    let (first, last) = (held.remove(0), held.pop().unwrap());
    let made_room = async {
        tokio::select! {
            () = ended(first) => {}
            () = ended(last) => {}
        }
    };
    tokio::time::timeout(Duration::from_secs(10), made_room)
        .await
        .expect("the idlest connection made room");
    drop(held);

    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let over_http2 = h2c.get(format!("http://{}/livez", service.admin)).send();
    assert!(over_http2.await.is_err(), "HTTP/2 is refused");
    let (status, metrics) = service.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let refused = r#"profile_state_connections_refused_total{listener="admin"}"#;
    assert_eq!(sample(&metrics, refused), Some(0.0), "{metrics}");
    let header = r#"profile_state_connections_timed_out_total{listener="admin",timeout="header"}"#;
    assert_eq!(sample(&metrics, header), Some(1.0), "{metrics}");
    let idle = r#"profile_state_connections_timed_out_total{listener="admin",timeout="idle"}"#;
    assert_eq!(sample(&metrics, idle), Some(1.0), "{metrics}");
    service.stop().await;
}

/// A body that never ends, as a stalled sender produces.
fn endless_body() -> Body {
    Body::from_stream(futures_stream_pending())
}

fn futures_stream_pending() -> impl tokio_stream::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    tokio_stream::pending()
}

fn ingress(limits: Limits) -> (axum::Router, TaskTracker) {
    let tracker = TaskTracker::new();
    let store = Store::new(10, "test");
    let sequencer = Sequencer::start(store, None, Metrics::new(), &tracker);
    let secrets = Verification::Secrets(SecretStore::new(
        Secrets::single(common::SECRET),
        None,
        None,
    ));
    (
        Ingress::new(sequencer, secrets, limits, Metrics::new()).router(),
        tracker,
    )
}

fn request(body: Body) -> axum::http::Request<Body> {
    axum::http::Request::post("/webhooks/gameball")
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_body_that_does_not_arrive_in_time_gets_408_and_holds_no_slot() {
    let limits = Limits {
        max_body_bytes: 1024,
        max_in_flight: 1,
        body_timeout: Duration::from_secs(3),
        timeout: Duration::from_secs(60),
    };
    let (router, _tracker) = ingress(limits);
    let started = tokio::time::Instant::now();
    let stalled = tokio::spawn(router.clone().oneshot(request(endless_body())));
    // The stalled upload holds no in-flight slot: a signed delivery still gets through.
    let (raw, signature) = signed(&profile_updated("a", &at(1), json!({})), common::SECRET);
    let mut signed_request = request(Body::from(raw));
    signed_request
        .headers_mut()
        .insert("x-gb-signature", signature.parse().unwrap());
    let answered = router.oneshot(signed_request).await.unwrap();
    assert_eq!(answered.status(), 200);
    let response = stalled.await.unwrap().unwrap();
    assert_eq!(response.status(), 408);
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

/// The runtime a stalled sequencer's task sits on; never driven, shut down without waiting.
struct Stalled(Option<tokio::runtime::Runtime>);

impl Drop for Stalled {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// An ingress whose sequencer never answers: its task was spawned on a runtime nobody drives,
/// so every update handed to it waits (as behind a disk that hangs).
fn stalled_ingress(limits: Limits) -> (axum::Router, Stalled) {
    // Built on a thread of its own: a runtime cannot be entered from inside the test's.
    let (elsewhere, sequencer) = std::thread::spawn(|| {
        let elsewhere = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let sequencer = elsewhere.block_on(async {
            let store = Store::new(10, "test");
            Sequencer::start(store, None, Metrics::new(), &TaskTracker::new())
        });
        (elsewhere, sequencer)
    })
    .join()
    .unwrap();
    let secrets = Verification::Secrets(SecretStore::new(
        Secrets::single(common::SECRET),
        None,
        None,
    ));
    let router = Ingress::new(sequencer, secrets, limits, Metrics::new()).router();
    (router, Stalled(Some(elsewhere)))
}

fn signed_request(customer: &str) -> axum::http::Request<Body> {
    let (raw, signature) = signed(
        &profile_updated(customer, &at(1), json!({})),
        common::SECRET,
    );
    let mut request = request(Body::from(raw));
    request
        .headers_mut()
        .insert("x-gb-signature", signature.parse().unwrap());
    request
}

#[tokio::test(start_paused = true)]
async fn webhooks_past_the_in_flight_cap_get_503_and_a_late_answer_does_not_deny_recording() {
    let limits = Limits {
        max_body_bytes: 1024,
        max_in_flight: 1,
        body_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(60),
    };
    let (router, _elsewhere) = stalled_ingress(limits);
    let held = tokio::spawn(router.clone().oneshot(signed_request("a")));
    // With the clock paused, time moves only once every task waits: the first delivery has
    // then taken the only slot and handed its update to the sequencer.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let refused = router.clone().oneshot(signed_request("b")).await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body = axum::body::to_bytes(refused.into_body(), 4096)
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    // The flag to raise is named (found by a first-user review).
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("(limit 1, --max-in-flight-webhooks)"),
        "{answer}"
    );

    // The held one times out; its update is with the sequencer, which may still record it.
    let late = held.await.unwrap().unwrap();
    assert_eq!(late.status(), 503);
    assert_eq!(late.headers()["retry-after"], "1");
    let body = axum::body::to_bytes(late.into_body(), 4096).await.unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let error = answer["error"].as_str().unwrap();
    assert!(!error.contains("not recorded"), "{error}");
    assert!(error.contains("may still be recorded"), "{error}");
}

/// The value of one sample line `name{labels} value` of a Prometheus text exposition.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn metrics_count_what_happened_and_health_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let service = TestService::start_with(durable_config(dir.path())).await;
    let body = profile_updated("a", &at(1), json!({"total_points": 1}));
    service.update(&body).await; // applied
    service.update(&body).await; // unchanged
    service
        .update(&json!({"event": "customer.notification.push", "data": []}))
        .await; // ignored
    assert_eq!(post_signed(&service, &body, "wrong").await.0, 401);
    // Signed over its compact form, sent pretty-printed: its bytes match no secret.
    let other = profile_updated("b", &at(1), json!({"total_points": 2}));
    let (compact, signature) = signed(&other, common::SECRET);
    let pretty = serde_json::to_vec_pretty(&other).unwrap();
    assert_ne!(pretty, compact);
    let headers = [("x-gb-signature", signature.as_str())];
    assert_eq!(service.post_raw(pretty, &headers).await.0, 200); // applied
    let mut client = service.client().await;
    let _watch = client
        .watch_profiles(pb::WatchProfilesRequest::default())
        .await
        .unwrap()
        .into_inner();

    let (status, text) = service.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let count =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        count(r#"profile_state_webhooks_total{outcome="applied",status="200"}"#),
        2.0
    );
    assert_eq!(
        count(r#"profile_state_webhooks_total{outcome="unchanged",status="200"}"#),
        1.0
    );
    assert_eq!(
        count(r#"profile_state_webhooks_total{outcome="ignored",status="200"}"#),
        1.0
    );
    assert_eq!(
        count(r#"profile_state_webhooks_total{outcome="rejected",status="401"}"#),
        1.0
    );
    assert_eq!(count("profile_state_webhook_signature_failures_total"), 1.0);
    // The three signed over their bytes (the ignored event too), not the refused one.
    let verified = r#"profile_state_webhook_signatures_verified_total{form="#;
    assert_eq!(count(&format!(r#"{verified}"raw"}}"#)), 3.0);
    assert_eq!(count(&format!(r#"{verified}"compact"}}"#)), 1.0);
    assert_eq!(
        count(r#"profile_state_webhook_duration_seconds_count{status="200"}"#),
        4.0
    );
    assert_eq!(count("profile_state_profiles"), 2.0);
    assert_eq!(count("profile_state_store_revision"), 2.0);
    assert_eq!(
        count("profile_state_journal_fsync_duration_seconds_count"),
        2.0
    );
    assert!(count("profile_state_journal_bytes_total") > 0.0);
    assert!(
        !text.contains("customer_id") && !text.contains("\"a\""),
        "no customer ids in labels"
    );

    assert_eq!(service.admin_get("/healthz").await.0, 200);
    assert_eq!(service.admin_get("/livez").await.0, 200);
    assert_eq!(
        service.admin_get("/readyz").await,
        (200, "ready\n".to_owned())
    );
    service.stop().await;
}

#[tokio::test]
async fn readiness_turns_false_while_the_journal_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = profile_state::Server::bind(durable_config(dir.path()))
        .await
        .unwrap();
    let faults = server.journal_faults();
    let service = TestService::serve(server);
    faults.fail_writes(true);
    let (status, _) = service.post(&profile_updated("a", &at(1), json!({}))).await;
    assert_eq!(status, 503);
    let (status, reason) = service.admin_get("/readyz").await;
    assert_eq!(status, 503);
    assert!(reason.contains("journal"), "{reason}");
    service.stop().await;
}

use common::CapturedLogs as Captured;

// The capturing subscriber is this thread's default: the test's current-thread runtime keeps
// the gRPC side here, and the ingest thread (webhooks, the sequencer) takes its creator's
// default as its own.
#[tokio::test]
async fn email_and_mobile_number_never_reach_the_logs_at_any_level() {
    let (captured, _guard) = Captured::on_this_thread(tracing::Level::TRACE);

    let service = TestService::start().await;
    let email = "pii-probe@example.com";
    let mobile = "+20-1234-567890";
    let data = json!({"email": email, "mobile_number": mobile, "total_points": 5});
    service
        .update(&profile_updated("a", &at(1), data.clone()))
        .await;
    service
        .update(&profile_updated("a", &at(1), data.clone()))
        .await;
    let mut invalid = profile_updated("a", &at(2), data);
    invalid["data"]["tier_order"] = json!("not a number");
    let (status, _) = service.post(&invalid).await;
    assert!(status >= 400);
    assert_eq!(post_signed(&service, &invalid, "wrong").await.0, 401);
    let mut client = service.client().await;
    let profile = client
        .get_profile(pb::GetProfileRequest {
            client_id: "2155".into(),
            customer_id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(profile.profile.unwrap().email.as_deref(), Some(email));
    service.stop().await;

    let logs = captured.text();
    assert!(
        logs.contains("profile-state listening"),
        "the capture works"
    );
    // Lines written on the ingest thread are captured too, or this test would prove nothing
    // about the webhook path.
    assert!(logs.contains("webhook applied"), "{logs}");
    assert!(logs.contains("kept a delivery"), "{logs}");
    assert!(!logs.contains(email), "email in the logs");
    assert!(!logs.contains(mobile), "mobile number in the logs");
    assert!(!logs.contains("pii-probe"), "part of the email in the logs");
}

#[test]
fn an_unreadable_secrets_file_exits_64_before_binding() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_profile-state"))
        .args(["--webhook-secrets-file", "/nonexistent/secrets.toml"])
        .args(LOOPBACK_EPHEMERAL)
        .env_remove("PROFILE_STATE_WEBHOOK_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "still running");
        std::thread::yield_now();
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("/nonexistent/secrets.toml"), "{stderr}");
    // The OS error once, not once per link of the error chain.
    assert_eq!(stderr.matches("(os error 2)").count(), 1, "{stderr}");
}

/// SIGTERM during a single node's recovery logged "stopped during start-up" and then waited
/// for the recovery to end: a large journal kept the process up for as long, a read that
/// hangs (a failing disk) for ever (found by an adversarial run). Here the store id is a FIFO
/// nobody writes to: the read hangs, and the process still exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hung_recovery_exits_at_once() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("STORE_ID");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let mut child = common::binary::command(dir.path(), &[])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Opening the FIFO's writing end succeeds once the recovery has it open for reading; held
    // open without a byte, it keeps that read waiting.
    const O_NONBLOCK: i32 = 0o4000;
    let deadline = std::time::Instant::now() + common::binary::PATIENCE;
    let _writer = loop {
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(&fifo);
        match opened {
            Ok(writer) => break writer,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("the recovery never read the store id: {error}"),
        }
    };
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let logged = tokio::task::block_in_place(|| {
        stdout.lines().any(|line| {
            line.unwrap()
                .contains("stopped during start-up, before serving")
        })
    });
    assert!(logged, "the stop is logged");
    // Polled, so that a process that never exits fails the test instead of hanging it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("still running 5 s after its stop was logged");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(exit.success(), "{exit}");
}
