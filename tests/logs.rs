//! The real binary's log output: colours only on a terminal and never with `NO_COLOR`; JSON
//! lines with the fields at the top level and no Rust `Debug` text; refused signatures at WARN,
//! rate-limited, with the client id and the reason and nothing from the body; a connection
//! refused at a listener's cap warned of with the flag that sets the cap (the webhook
//! listener's in process, where the journal's sync can be held).

use crate::common;
use crate::common::binary;

use std::process::{Command, Stdio};
use std::time::Instant;

use binary::{Binary, bare_command, command};
use common::{at, profile_updated};
use serde_json::{Value, json};

const ESCAPE: &str = "\x1b[";

/// Runs the binary so that it logs a WARN line and exits (a port in use): under a terminal
/// (`script` gives it one) when `terminal`, with `NO_COLOR` when given. Returns what it wrote.
fn warn_then_exit(terminal: bool, no_color: Option<&str>) -> String {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let args = [
        "--insecure-skip-signature",
        "--ephemeral",
        "--webhook-listen",
        &taken,
    ];
    let mut run = if terminal {
        let line = format!("{} {}", env!("CARGO_BIN_EXE_profile-state"), args.join(" "));
        let mut script = Command::new("script");
        // util-linux's script: a pseudo-terminal for the command; -e keeps its exit status.
        script.args(["-qec", &line, "/dev/null"]);
        script.env_remove("NO_COLOR").env_remove("RUST_LOG");
        script
    } else {
        bare_command(&args)
    };
    if let Some(value) = no_color {
        run.env("NO_COLOR", value);
    }
    let output = run
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) and the binary run");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(1), "port in use: {text}");
    assert!(text.contains("--insecure-skip-signature is set"), "{text}");
    text
}

#[test]
fn text_logs_have_colours_only_on_a_terminal_and_never_with_no_color() {
    assert!(
        warn_then_exit(true, None).contains(ESCAPE),
        "a terminal gets colours"
    );
    assert!(
        !warn_then_exit(true, Some("1")).contains(ESCAPE),
        "NO_COLOR=1"
    );
    assert!(
        !warn_then_exit(false, None).contains(ESCAPE),
        "a pipe gets none"
    );
}

/// What a string value would look like if a field were recorded with Rust's `Debug`.
fn debug_like(value: &str) -> bool {
    let variant = value.split_once(['(', ' ']).is_some_and(|(head, rest)| {
        head.chars().next().is_some_and(char::is_uppercase)
            && head.chars().all(char::is_alphanumeric)
            && (rest.starts_with('{') || value[head.len()..].starts_with('('))
    });
    variant || value.contains("Some(") || value == "None" || value.contains('"')
}

/// Checks every line: one JSON object, message and level at the top level, no nested field
/// or span objects, no value in Debug form.
fn assert_flat_json(lines: &[Value]) {
    assert!(!lines.is_empty());
    for line in lines {
        let object = line
            .as_object()
            .unwrap_or_else(|| panic!("not JSON: {line}"));
        assert!(object["message"].is_string(), "{line}");
        assert!(object["level"].is_string(), "{line}");
        for nested in ["fields", "span", "spans"] {
            assert!(!object.contains_key(nested), "{line}");
        }
        for (key, value) in object {
            assert!(!value.is_object() && !value.is_array(), "{key}: {line}");
            if let Some(text) = value.as_str() {
                assert!(!debug_like(text), "{key} looks like Debug: {line}");
            }
        }
    }
}

#[test]
fn the_debug_check_catches_debug() {
    for debug in [
        "Some(\"/data/snapshot\")",
        "None",
        "Changed { revision: 5 }",
        "Applied(Changed { revision: 5 })",
        "[\"a\"]",
    ] {
        assert!(debug_like(debug), "{debug}");
    }
    for plain in [
        "applied at revision 5",
        "X-GB-Signature",
        "127.0.0.1:50051",
        "off",
    ] {
        assert!(!debug_like(plain), "{plain}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_flat_with_no_debug_text_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, snapshots and history: the restart starts from a snapshot.
    let args = [
        "--snapshot-every-records",
        "2",
        "--history-events",
        "1",
        "--segment-bytes",
        "1",
    ];
    let start = || {
        let mut command = command(dir.path(), &args);
        command.env("RUST_LOG", "info,profile_state=debug");
        Binary::spawn(command)
    };
    let binary = start().await;
    for second in 1..=5 {
        let body = profile_updated("c1", &at(second), json!({"total_points": second}));
        assert_eq!(binary.post(&body).await.0, 200);
    }
    let invalid = profile_updated("c1", &at(9), json!({"tier_order": "two"}));
    assert_eq!(binary.post(&invalid).await.0, 422);
    let first = binary.stop_collecting();
    let binary = start().await;
    let recovered = binary
        .seen
        .iter()
        .find(|line| line["message"] == "recovered")
        .cloned();
    let recovered = recovered.expect("a recovered line");
    assert!(recovered["snapshot"].is_u64(), "{recovered}");
    // Where start-up time went: each part in milliseconds, together no more than the whole.
    let part = |name: &str| {
        recovered[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {recovered}"))
    };
    let parts = part("snapshot_ms") + part("replay_ms") + part("key_order_ms");
    assert!(parts <= part("elapsed_ms"), "{recovered}");
    let second = binary.stop_collecting();
    let messages: Vec<&str> = first
        .iter()
        .chain(&second)
        .filter_map(|l| l["message"].as_str())
        .collect();
    for expected in ["webhook applied", "kept a delivery", "recovered", "stopped"] {
        assert!(
            messages.iter().any(|m| m.starts_with(expected)),
            "{expected}: {messages:?}"
        );
    }
    // A dead letter needs an operator (Gameball will not send it again): WARN, not INFO
    // (found by a first-user review).
    let kept = first
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("kept a delivery"))
        })
        .unwrap();
    assert_eq!(kept["level"], "WARN", "{kept}");
    assert_flat_json(&first);
    assert_flat_json(&second);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_signatures_are_warned_rate_limited_without_the_body() {
    // Distinctive: `c1"` matched a random store id or temp dir name ending in "c1" (a CI run
    // failed on it), which is no body content.
    const CUSTOMER: &str = "customer-of-a-refused-body";
    let dir = tempfile::tempdir().unwrap();
    let binary = Binary::start(dir.path(), &[]).await;
    let email = "rate-limit-probe@example.com";
    let forged = "a".repeat(40);
    let url = format!("http://{}/webhooks/gameball", binary.webhook);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut refused = 0;
    for n in 0..30u32 {
        let mut body = profile_updated(CUSTOMER, &at(n), json!({"email": email}));
        if n == 0 {
            // The claimed client id is unauthenticated input: control characters are replaced.
            body["client_id"] = json!("2155\nINFO forged line");
        }
        let mut request = client.post(&url).body(serde_json::to_vec(&body).unwrap());
        if n % 2 == 0 {
            request = request.header("x-gb-signature", &forged);
        }
        let status = request.send().await.unwrap().status().as_u16();
        assert_eq!(status, 401);
        refused += 1;
    }
    let elapsed = started.elapsed().as_secs();
    let lines = binary.stop_collecting();
    let warnings: Vec<&Value> = lines
        .iter()
        .filter(|line| line["message"] == "webhook refused: bad signature")
        .collect();
    let most = 1 + elapsed / 10 + 1;
    assert!(
        !warnings.is_empty() && warnings.len() as u64 <= most,
        "{warnings:?}"
    );
    let first = warnings[0];
    assert_eq!(first["level"], "WARN");
    assert_eq!(first["client_id"], "2155?INFO?forged?line");
    assert_eq!(first["reason"], profile_state::webhook::signature::MISMATCH);
    assert_eq!(first["suppressed"], 0);
    let counted: u64 = warnings.len() as u64
        + warnings
            .iter()
            .skip(1)
            .map(|w| w["suppressed"].as_u64().unwrap())
            .sum::<u64>();
    assert!(counted <= refused, "{counted} of {refused}");
    for secret in [email, "rate-limit-probe", &forged, "total_points", CUSTOMER] {
        let line = lines.iter().find(|line| line.to_string().contains(secret));
        assert!(line.is_none(), "{secret} in the logs: {line:?}");
    }
}

/// A SIGKILL between appends leaves the journal's runway (zeros written ahead of its frames)
/// at the end of the newest segment: the restart cuts it off with an info line, and never
/// warns of a torn record, which would send an operator looking for damage there is none of.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_a_kill_cuts_the_runway_off_without_warning_of_a_torn_record() {
    let dir = tempfile::tempdir().unwrap();
    let binary = Binary::start(dir.path(), &[]).await;
    for second in 1..=3 {
        let body = profile_updated("c1", &at(second), json!({"total_points": second}));
        assert_eq!(binary.post(&body).await.0, 200);
    }
    drop(binary); // SIGKILL
    let binary = Binary::start(dir.path(), &[]).await;
    let cut = binary
        .seen
        .iter()
        .find(|line| {
            line["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("the newest segment ends in zeros"))
        })
        .cloned()
        .unwrap_or_else(|| panic!("no line about the runway in {:?}", binary.seen));
    assert_eq!(cut["level"], "INFO", "{cut}");
    assert!(cut["zero_bytes"].as_u64().unwrap() > 0, "{cut}");
    assert!(
        !binary.seen.iter().any(|line| line["level"] == "WARN"),
        "{:?}",
        binary.seen
    );
    assert_eq!(binary.server_info().await.revision, 3);
    let body = profile_updated("c1", &at(4), json!({"total_points": 4}));
    assert_eq!(binary.post(&body).await.0, 200);
}

/// A connection refused at a listener's cap is warned of with the listener, the cap and the
/// flag that sets it (`flag`: the limit alone said nothing of where to raise it, a first-user
/// review; no test read the field). The gRPC listener's one connection has a watch open, so
/// it cannot be closed to make room.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_refused_at_a_cap_is_warned_of_with_the_flag_that_sets_the_cap() {
    use crate::limits::{connect, until_closed};
    use pb::profile_service_client::ProfileServiceClient;
    use profile_state::pb;
    let dir = tempfile::tempdir().unwrap();
    let mut binary = Binary::start(dir.path(), &["--max-grpc-connections", "1"]).await;
    let url = format!("http://{}", binary.grpc);
    let mut client = ProfileServiceClient::connect(url).await.unwrap();
    let request = pb::WatchProfilesRequest::default();
    let mut watch = client.watch_profiles(request).await.unwrap().into_inner();
    assert!(watch.message().await.unwrap().is_some(), "Synced");
    assert_eq!(
        until_closed(&mut connect(binary.grpc, b"").await).await,
        b""
    );
    let warned = binary
        .wait_for("connection refused: too many connections open")
        .await;
    assert_eq!(warned["level"], "WARN");
    assert_eq!(warned["listener"], "grpc");
    assert_eq!(warned["limit"], 1);
    assert_eq!(warned["flag"], "--max-grpc-connections", "{warned}");
    drop((watch, client));
    binary.stop();
}

/// The webhook listener's refusal names its flag too. Its one connection has a webhook being
/// answered (the journal's sync held), the only kind of connection that does not make room:
/// an idle one does, and so does one still sending a body.
#[tokio::test]
async fn a_webhook_connection_refused_at_the_cap_is_warned_of_with_its_flag() {
    use crate::limits::{connect, until_closed};
    let (captured, _capturing) = common::CapturedLogs::on_this_thread(tracing::Level::WARN);
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::durable_config(dir.path());
    config.max_webhook_connections = 1;
    let server = profile_state::server::Server::bind(config).await.unwrap();
    let faults = server.journal_faults();
    let mut held = faults.syncs_waited();
    let service = common::TestService::serve(server);
    let release = common::HeldSyncs::hold(&faults);
    let answering = {
        let service_url = service.webhook_url();
        let body = serde_json::to_vec(&profile_updated("a", &at(1), json!({}))).unwrap();
        let signature =
            profile_state::webhook::signature::SignatureCheck::new(common::SECRET).sign(&body);
        let request = reqwest::Client::new()
            .post(service_url)
            .header("content-type", "application/json")
            .header("x-gb-signature", signature)
            .body(body);
        tokio::spawn(async move { request.send().await.map(|answer| answer.status()) })
    };
    held.wait_for(|syncs| *syncs >= 1).await.unwrap();
    assert_eq!(
        until_closed(&mut connect(service.webhook, b"").await).await,
        b""
    );
    let logs = captured.text();
    let warned = logs
        .lines()
        .find(|line| line.contains("connection refused: too many connections open"))
        .unwrap_or_else(|| panic!("no refusal warned of: {logs}"));
    assert!(warned.contains("WARN"), "{warned}");
    assert!(warned.contains(r#"listener="webhook""#), "{warned}");
    assert!(warned.contains("limit=1"), "{warned}");
    assert!(
        warned.contains(r#"flag="--max-webhook-connections""#),
        "{warned}"
    );
    drop(release);
    assert_eq!(answering.await.unwrap().unwrap(), 200);
    service.stop().await;
}

/// An HTTP/2 connection that opens and resets more streams than h2 lets it: the preface,
/// SETTINGS, then 40 HEADERS + RST_STREAM (CANCEL) pairs on `path`, in one write.
fn rapid_resets(path: &str) -> Vec<u8> {
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    };
    // HPACK: :method POST and :scheme http indexed; :path, :authority and content-type as
    // literals with indexed names (4, 1 and 31), without Huffman coding.
    let mut headers = vec![0x83, 0x86, 0x04, path.len() as u8];
    headers.extend(path.as_bytes());
    headers.extend([0x01, 1, b'x', 0x0f, 0x10, 16]);
    headers.extend(b"application/grpc");
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    for stream in (1..80).step_by(2) {
        bytes.extend(frame(0x1, 0x4, stream, &headers));
        bytes.extend(frame(0x3, 0, stream, &8u32.to_be_bytes()));
    }
    bytes
}

/// The error code of the first GOAWAY among the HTTP/2 frames `bytes` holds.
fn goaway_code(mut bytes: &[u8]) -> Option<u32> {
    while bytes.len() >= 9 {
        let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let payload = bytes.get(9..9 + length)?;
        if bytes[3] == 0x7 {
            return Some(u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?));
        }
        bytes = &bytes[9 + length..];
    }
    None
}

/// A client that resets more streams than h2 allows got the connection closed, and one WARN
/// line from h2 each time, unthrottled: 2,000 lines a second from one client without
/// credentials, on the gRPC port and the webhook port's h2c (found by an adversarial run).
/// With `RUST_LOG` unset, h2 logs errors only.
#[tokio::test(flavor = "multi_thread")]
async fn clients_resetting_streams_past_h2s_limit_log_no_line_each() {
    use crate::limits::{connect, until_closed};
    let dir = tempfile::tempdir().unwrap();
    let binary = Binary::spawn(command(dir.path(), &[])).await;
    let grpc = "/gameball.profiles.v1.ProfileService/GetProfile";
    for (address, path) in [(binary.grpc, grpc), (binary.webhook, "/webhooks/gameball")] {
        for _ in 0..5 {
            let answer = until_closed(&mut connect(address, &rapid_resets(path)).await).await;
            // GOAWAY with ENHANCE_YOUR_CALM: h2 refused it, as it logs.
            assert_eq!(goaway_code(&answer), Some(11), "{answer:?}");
        }
    }
    // h2 logs before it closes the connection: every such line is in before the exit.
    let lines = binary.stop_collecting();
    let from_h2: Vec<_> = (lines.iter())
        .filter(|line| line["target"].as_str().is_some_and(|t| t.starts_with("h2")))
        .collect();
    assert!(from_h2.is_empty(), "{from_h2:#?}");
}
