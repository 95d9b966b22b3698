//! The limits an attacker (or a careless client) could exhaust, and the smaller refusals of
//! issue 10: each test drives the real HTTP or gRPC surface of an in-process service.

mod common;

use common::{JSON, SECRET, TestService, at, profile_updated};
use profile_state::Config;
use serde_json::json;

#[tokio::test]
async fn an_integer_past_u64_is_out_of_range_not_a_fraction() {
    let service = TestService::start().await;
    let body = br#"{"event":"customer.profile.updated","client_id":"2155","customer_id":"big","gb_customer_id":1,"created_at":"2024-11-19T17:34:42Z","data":{"total_points":18446744073709551616}}"#;
    let (status, answer) = service.post_signed(body).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], "data.total_points");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("out of range"), "{error}");
    assert!(!error.contains("fraction"), "{error}");
    service.stop().await;
}

#[tokio::test]
async fn a_compressed_body_gets_415_and_is_not_kept() {
    let service = TestService::start().await;
    let body = serde_json::to_vec(&profile_updated("zipped", &at(1), json!({}))).unwrap();
    let signature = profile_state::webhook::signature::SignatureCheck::new(SECRET).sign(&body);
    for encoding in ["gzip", "br, gzip", "deflate"] {
        let headers = [
            ("content-type", JSON),
            ("content-encoding", encoding),
            ("x-gb-signature", signature.as_str()),
        ];
        let (status, answer) = service.post_raw(body.clone(), &headers).await;
        assert_eq!(status, 415, "{encoding}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains("content-encoding"), "{error}");
    }
    // `identity` is no encoding at all.
    let headers = [
        ("content-type", JSON),
        ("content-encoding", "identity"),
        ("x-gb-signature", signature.as_str()),
    ];
    let (status, answer) = service.post_raw(body, &headers).await;
    assert_eq!(status, 200, "{answer}");
    let (_, metrics) = service.admin_get("/metrics").await;
    assert!(
        metrics.contains("profile_state_webhook_dead_letters_total 0"),
        "a refused encoding was kept: {metrics}"
    );
    service.stop().await;
}

/// A writer into a shared buffer, for capturing log lines.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Current-thread runtime (the default): the server's tasks run on this thread, under the
// subscriber set for it.
#[tokio::test]
async fn strings_from_a_delivery_cannot_forge_log_lines_or_leak_into_them() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let service = TestService::start().await;
    let hostile = "x\nFORGED ERROR profile_state: \u{1b}[31mowned leak@example.com";
    let other_topic = json!({"event": hostile, "client_id": "2155", "data": {}});
    let (status, answer) = service.post(&other_topic).await;
    assert_eq!(status, 200, "{answer}");
    let mut update = profile_updated("logged", &at(1), json!({"tier_name": "gold"}));
    update["client_id"] = json!(hostile);
    let (status, answer) = service.post(&update).await;
    assert_eq!(status, 200, "{answer}");
    service.stop().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // Both deliveries were logged, so the checks below look at real lines.
    assert!(logs.contains("ignored a webhook of another topic"), "{logs}");
    assert!(logs.contains("webhook applied"), "{logs}");
    for line in logs.lines() {
        assert!(!line.starts_with("FORGED"), "a forged log line: {line:?}");
    }
    assert!(!logs.contains('\u{1b}'), "an escape sequence reached the logs");
    assert!(!logs.contains("example.com"), "an address reached the logs");
}

/// Opens a connection and starts an unsigned upload of `length` bytes that sends only its
/// first byte; returns once the handler is reading the body (hyper then answers the
/// `Expect: 100-continue` with `100 Continue`).
async fn start_slow_upload(webhook: std::net::SocketAddr, length: usize) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(webhook).await.unwrap();
    let head = format!(
        "POST /webhooks/gameball HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {length}\r\nexpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = [0; 25];
    stream.read_exact(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 100 Continue"), "{answer:?}");
    stream.write_all(b"{").await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_unsigned_bodies_do_not_starve_signed_deliveries() {
    let mut config = Config::for_tests(SECRET);
    config.max_in_flight_webhooks = 4;
    let service = TestService::start_with(config).await;
    let mut slow = Vec::new();
    for _ in 0..16 {
        slow.push(start_slow_upload(service.webhook, 5000).await);
    }
    for second in 0..8 {
        let body = profile_updated(&format!("c{second}"), &at(second), json!({}));
        let (status, answer) = service.post(&body).await;
        assert_eq!(status, 200, "a signed delivery was refused: {answer}");
    }
    drop(slow);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_for_an_update_that_was_applied_does_not_say_it_was_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::durable_config(dir.path());
    // Shorter than an fsync: answers run out while their updates are being recorded.
    config.webhook_timeout = std::time::Duration::from_micros(1);
    let service = std::sync::Arc::new(TestService::start_with(config).await);
    let mut posts = tokio::task::JoinSet::new();
    for customer in 0..400 {
        let service = std::sync::Arc::clone(&service);
        posts.spawn(async move {
            let body = profile_updated(&format!("late-{customer}"), &at(1), json!({}));
            (customer, service.post(&body).await)
        });
    }
    let mut client = service.client().await;
    let mut late_but_applied = 0;
    while let Some(posted) = posts.join_next().await {
        let (customer, (status, answer)) = posted.unwrap();
        if status == 200 {
            continue;
        }
        assert_eq!(status, 503, "{answer}");
        let request = profile_state::pb::GetProfileRequest {
            client_id: "2155".into(),
            customer_id: format!("late-{customer}"),
        };
        if client.get_profile(request).await.is_ok() {
            late_but_applied += 1;
            let error = answer["error"].as_str().unwrap();
            assert!(!error.contains("not recorded"), "applied, yet: {error}");
        }
    }
    assert!(late_but_applied > 0, "no answer ran out: the test proved nothing");
    std::sync::Arc::into_inner(service).unwrap().stop().await;
}
