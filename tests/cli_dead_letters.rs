//! `profile-state dead-letters list|show|replay|purge`: the real binary against a running
//! server, in plaintext from loopback and over TLS with a token; its exit statuses (0 done, 1
//! refused or unreachable, 64 usage).

use crate::common;
use crate::common::binary;

use std::path::Path;
use std::process::Output;

use binary::bare_command;
use common::{TestService, at, profile_updated};
use profile_state::pb::admin_service_client::AdminServiceClient;
use profile_state::{Config, pb};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::{Value, json};

/// Runs `profile-state dead-letters ARGS` with `envs` only; returns its output.
async fn cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = bare_command(&[&["dead-letters"], args].concat());
    command.envs(envs.iter().copied());
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Posts a signed update whose `data.tier_order` is a string (kept as a dead letter); returns
/// the body and the letter's id.
async fn dead_letter(service: &TestService, customer: &str) -> (Vec<u8>, String) {
    let body = profile_updated(customer, &at(1), json!({"tier_order": "2"}));
    let body = serde_json::to_vec(&body).unwrap();
    let (status, answer) = service.post_signed(&body).await;
    assert_eq!(status, 422, "{answer}");
    (body, answer["dead_letter_id"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_a_plaintext_listener_says_to_use_http() {
    let service = TestService::start().await;
    let https = format!("https://{}", service.grpc);
    let answer = cli(&["list", "--grpc", &https], &[]).await;
    assert_eq!(answer.status.code(), Some(1), "{}", stderr(&answer));
    assert!(
        stderr(&answer).contains("give --grpc as http://"),
        "{}",
        stderr(&answer)
    );
    service.stop().await;
}

/// A server that accepts the connection and never answers the TLS handshake kept the CLI
/// waiting for ever, `--timeout` notwithstanding (found by an adversarial run).
#[tokio::test]
async fn a_tls_handshake_that_never_completes_is_bounded_by_the_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let https = format!("https://{}", silent.local_addr().unwrap());
    let args = ["dead-letters", "list", "--grpc", &https, "--timeout", "1s"];
    let mut child = bare_command(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Polled, so that a CLI that never gives up fails the test instead of hanging it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("still waiting 20 s into a 1 s --timeout");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
    assert_eq!(exit.code(), Some(1), "{said}");
    assert!(said.contains("no answer within 1s (--timeout)"), "{said}");
    drop(silent);
}

/// A purge of a letter a replay holds leaves it: the binary says so per letter and exits 1,
/// where it said "not kept" and exited 0 (found by an adversarial run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_of_a_letter_a_replay_holds_says_so_and_fails() {
    let server = profile_state::Server::bind(Config::for_tests(common::SECRET))
        .await
        .unwrap();
    let letters = server.dead_letters();
    let service = TestService::serve(server);
    let (_, id) = dead_letter(&service, "held").await;
    let claim = letters
        .claim(&profile_state::dead_letters::DeadLetterId::parse(&id).unwrap())
        .await
        .unwrap();
    let grpc = service.grpc.to_string();
    let env = [("PROFILE_STATE_GRPC", grpc.as_str())];
    let purge = cli(&["purge", &id], &env).await;
    assert_eq!(purge.status.code(), Some(1), "{}", stderr(&purge));
    assert_eq!(
        stdout(&purge),
        format!("purged 0\n{id}: being replayed, not purged\n")
    );
    assert!(
        stderr(&purge).contains("1 dead letter(s) not purged: a replay held them"),
        "{}",
        stderr(&purge)
    );
    letters.release(claim, None).await.unwrap();
    let purge = cli(&["purge", &id], &env).await;
    assert!(purge.status.success(), "{}", stderr(&purge));
    assert_eq!(stdout(&purge), "purged 1\n");
    service.stop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_shown_replayed_and_purged_through_the_binary() {
    let service = TestService::start().await;
    let (body_a, a) = dead_letter(&service, "a").await;
    let (_, b) = dead_letter(&service, "b").await;
    let grpc = service.grpc.to_string();
    // The address from its variable, as an operator's shell would keep it.
    let env = [("PROFILE_STATE_GRPC", grpc.as_str())];

    let list = cli(&["list"], &env).await;
    assert!(list.status.success(), "{}", stderr(&list));
    let rows: Vec<String> = stdout(&list).lines().map(str::to_owned).collect();
    assert_eq!(rows.len(), 3, "a header and two letters: {rows:?}");
    assert!(rows[0].starts_with("ID\t"), "{rows:?}");
    for (row, id) in rows[1..].iter().zip([&a, &b]) {
        let columns: Vec<&str> = row.split('\t').collect();
        assert_eq!(columns[0], id, "{row}");
        assert!(columns[1].ends_with('Z'), "an RFC 3339 time: {row}");
        assert_eq!(columns[2..4], ["1", "data.tier_order"], "{row}");
        assert!(columns[4].contains("tier_order"), "{row}");
    }
    let json_list = cli(&["list", "--json"], &env).await;
    let objects: Vec<Value> = stdout(&json_list)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(objects.len(), 2);
    assert_eq!(objects[0]["id"], json!(a));
    assert_eq!(objects[0]["body_bytes"], json!(body_a.len()));

    let show = cli(&["show", &a], &env).await;
    assert!(show.status.success(), "{}", stderr(&show));
    let shown = stdout(&show);
    assert!(shown.starts_with(&format!("id: {a}\n")), "{shown}");
    assert!(shown.contains("\nfield: data.tier_order\n"), "{shown}");
    assert!(shown.ends_with(&format!("\n\n{}", String::from_utf8_lossy(&body_a))));
    let raw = cli(&["show", "--body-only", &a], &env).await;
    assert_eq!(raw.stdout, body_a, "the body byte for byte");

    // A body that is not JSON, with an escape sequence: shown escaped (it cleared the
    // terminal; an adversarial run), and byte for byte with --body-only.
    let hostile = b"not json \x1b[2J\x1b]0;title\x07\r\nsecond line".to_vec();
    let (status, answer) = service.post_signed(&hostile).await;
    assert_eq!(status, 422, "{answer}");
    let hostile_id = answer["dead_letter_id"].as_str().unwrap().to_owned();
    let show = cli(&["show", &hostile_id], &env).await;
    assert!(show.status.success(), "{}", stderr(&show));
    assert!(!show.stdout.contains(&0x1b) && !show.stdout.contains(&0x07));
    assert!(
        stdout(&show).ends_with("\n\nnot json \\u{1b}[2J\\u{1b}]0;title\\u{7}\\r\nsecond line"),
        "{}",
        stdout(&show)
    );
    let raw = cli(&["show", "--body-only", &hostile_id], &env).await;
    assert_eq!(raw.stdout, hostile, "the body byte for byte");
    let purge = cli(&["purge", &hostile_id], &env).await;
    assert!(purge.status.success(), "{}", stderr(&purge));

    // Still invalid: refused, kept, and the exit status says so.
    let replay = cli(&["replay", &a], &env).await;
    assert_eq!(replay.status.code(), Some(1), "{}", stderr(&replay));
    assert!(stderr(&replay).contains(&format!("replaying {a}: ")));
    assert!(stderr(&replay).contains("[FAILED_PRECONDITION]"));

    let never = "0".repeat(40);
    let purge = cli(&["purge", &a, &never], &env).await;
    assert!(purge.status.success(), "{}", stderr(&purge));
    assert_eq!(stdout(&purge), format!("purged 1\n{never}: not kept\n"));
    let missing = cli(&["show", &a], &env).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("[NOT_FOUND]"),
        "{}",
        stderr(&missing)
    );
    let all = cli(&["purge", "--all"], &env).await;
    assert_eq!(stdout(&all), "purged 1\n");
    let empty = cli(&["list"], &env).await;
    assert!(empty.status.success());
    assert_eq!(stdout(&empty).lines().count(), 1, "the header alone");
    assert!(stderr(&empty).contains("no dead letters"));

    // Usage errors, found before connecting: 64.
    for args in [
        &["show", "not-an-id"][..],
        &["purge"],
        &["purge", "--all", &b],
        &["replay"],
        &["list", "--grpc", "ftp://x:1"],
    ] {
        let refused = cli(args, &[]).await;
        assert_eq!(
            refused.status.code(),
            Some(64),
            "{args:?}: {}",
            stderr(&refused)
        );
    }
    service.stop().await;
}

/// A letter larger than one response (found by an adversarial run: `list` stopped at it, exit 1,
/// and `show` failed): `list` goes past it, `show` prints its body whole from its parts.
#[tokio::test(flavor = "multi_thread")]
async fn a_letter_larger_than_a_response_is_listed_past_and_shown_whole() {
    let mut config = Config::for_tests(common::SECRET);
    config.max_body_bytes = 1 << 20;
    config.grpc_max_message_bytes = 64 << 10;
    let service = TestService::start_with(config).await;
    let (_, before) = dead_letter(&service, "before").await;
    // Not JSON, and every 9 bytes different, so a part out of place would show.
    let large: Vec<u8> = (0..30_000u32)
        .flat_map(|n| format!("{n:08x} ").into_bytes())
        .collect();
    let (status, answer) = service.post_signed(&large).await;
    assert_eq!(status, 422, "{answer}");
    let big = answer["dead_letter_id"].as_str().unwrap().to_owned();
    let (_, after) = dead_letter(&service, "after").await;
    let grpc = service.grpc.to_string();
    let env = [("PROFILE_STATE_GRPC", grpc.as_str())];

    let list = cli(&["list", "--json"], &env).await;
    assert!(list.status.success(), "{}", stderr(&list));
    let objects: Vec<Value> = stdout(&list)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let ids: Vec<&str> = objects.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&before, &big, &after]);
    assert_eq!(
        objects[1]["body_bytes"],
        json!(large.len()),
        "the whole body's size"
    );

    let raw = cli(&["show", "--body-only", &big], &env).await;
    assert!(raw.status.success(), "{}", stderr(&raw));
    assert!(
        raw.stdout == large,
        "the body byte for byte, from its parts"
    );
    service.stop().await;
}

/// A body of bidi controls and zero-width spaces, read in parts that end inside a character:
/// `show` prints each one escaped, as `reconcile`, `backup` and `restore` do, and none raw (a
/// first-user review: it escaped control bytes only, so a U+202E reordered the terminal's line).
#[tokio::test(flavor = "multi_thread")]
async fn show_escapes_bidi_controls_even_when_a_part_ends_inside_one() {
    let mut config = Config::for_tests(common::SECRET);
    config.max_body_bytes = 1 << 20;
    config.grpc_max_message_bytes = 64 << 10;
    let service = TestService::start_with(config).await;
    let invisible = "\u{202e}\u{200b}".repeat(20_000);
    let body = format!("bad\x1b[31mRED\nline2{invisible}");
    let (status, answer) = service.post_signed(body.as_bytes()).await;
    assert_eq!(status, 422, "{answer}");
    let id = answer["dead_letter_id"].as_str().unwrap().to_owned();
    // The first part ends inside a character, or this test would not test that.
    let mut admin = AdminServiceClient::new(service.channel().await);
    let request = pb::GetDeadLetterRequest {
        id: id.clone(),
        body_offset: 0,
    };
    let first = admin.get_dead_letter(request).await.unwrap().into_inner();
    let first = first.dead_letter.unwrap();
    assert!(first.body_truncated);
    let cut = std::str::from_utf8(&first.body).unwrap_err();
    assert_eq!(cut.error_len(), None, "a character cut at the part's end");

    let grpc = service.grpc.to_string();
    let show = cli(&["show", &id], &[("PROFILE_STATE_GRPC", grpc.as_str())]).await;
    assert!(show.status.success(), "{}", stderr(&show));
    let shown = stdout(&show);
    assert!(!shown.contains('\u{202e}') && !shown.contains('\u{200b}'));
    let escaped = "\\u{202e}\\u{200b}".repeat(20_000);
    assert!(
        shown.ends_with(&format!("\n\nbad\\u{{1b}}[31mRED\nline2{escaped}")),
        "{}",
        shown.chars().take(200).collect::<String>()
    );
    service.stop().await;
}

/// A CA and a `localhost` server certificate in `dir` (`ca.pem`, `server.pem`, `server.key`).
fn certificates(dir: &Path) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_the_token_is_needed_and_taken_from_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    std::fs::write(dir.path().join("tokens"), "admin-token\n").unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_tls_cert = Some(dir.path().join("server.pem"));
    config.grpc_tls_key = Some(dir.path().join("server.key"));
    config.grpc_auth_tokens_file = Some(dir.path().join("tokens"));
    let service = TestService::start_with(config).await;
    let ca = dir.path().join("ca.pem");
    let grpc = format!("localhost:{}", service.grpc.port());
    let args = ["list", "--grpc", &grpc, "--ca", ca.to_str().unwrap()];

    let without = cli(&args, &[]).await;
    assert_eq!(without.status.code(), Some(1), "{}", stderr(&without));
    assert!(stderr(&without).contains("[UNAUTHENTICATED]"));
    assert!(stderr(&without).contains("PROFILE_STATE_TOKEN"), "the hint");
    assert_eq!(stdout(&without), "", "no header over a refusal");

    let with = cli(&args, &[("PROFILE_STATE_TOKEN", "admin-token")]).await;
    assert!(with.status.success(), "{}", stderr(&with));
    assert!(stdout(&with).starts_with("ID\t"));
    assert!(!stderr(&with).contains("warning"), "TLS: no warning");

    // An https:// address without --ca: the system's CAs (here SSL_CERT_FILE, which
    // rustls-native-certs reads first), and without the server's CA among them, a refusal
    // that says what to give.
    let https = format!("https://{grpc}");
    let token = ("PROFILE_STATE_TOKEN", "admin-token");
    let trusted = [("SSL_CERT_FILE", ca.to_str().unwrap()), token];
    let system = cli(&["list", "--grpc", &https], &trusted).await;
    assert!(system.status.success(), "{}", stderr(&system));
    let other_ca = dir.path().join("other-ca.pem");
    let other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let other = other
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(&other_ca, other.pem()).unwrap();
    let untrusted = [("SSL_CERT_FILE", other_ca.to_str().unwrap()), token];
    let refused = cli(&["list", "--grpc", &https], &untrusted).await;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--ca"), "{}", stderr(&refused));

    // Plaintext to a TLS listener fails, and says what to try.
    let plain = cli(&["list", "--grpc", &grpc, "--timeout", "5s"], &[]).await;
    assert_eq!(plain.status.code(), Some(1));
    assert!(
        stderr(&plain).contains("give its CA with --ca"),
        "{}",
        stderr(&plain)
    );
    // An unreadable --ca from the environment is a usage error naming the variable.
    let bad_ca = cli(&["list"], &[("PROFILE_STATE_CA", "/no/such/ca.pem")]).await;
    assert_eq!(bad_ca.status.code(), Some(64));
    assert!(
        stderr(&bad_ca).contains("--ca was set by the environment variable PROFILE_STATE_CA"),
        "{}",
        stderr(&bad_ca)
    );
    service.stop().await;
}

/// `--timeout 0s` failed every call and blamed TLS, and `--grpc localhost` went to port 80
/// (found by a first-user review).
#[tokio::test]
async fn a_zero_timeout_or_an_address_without_a_port_is_a_usage_error() {
    let zero = cli(&["list", "--timeout", "0s"], &[]).await;
    assert_eq!(zero.status.code(), Some(64), "{}", stderr(&zero));
    assert!(
        stderr(&zero)
            .contains("invalid value '0s' for '--timeout <TIMEOUT>': must be more than zero"),
        "{}",
        stderr(&zero)
    );
    // An address without its port went to port 80 (found by the same review).
    for address in ["localhost", "[::1]", "127.0.0.1:"] {
        let portless = cli(&["list", "--grpc", address], &[]).await;
        assert_eq!(portless.status.code(), Some(64), "{}", stderr(&portless));
        assert!(
            stderr(&portless).contains("has no port"),
            "{}",
            stderr(&portless)
        );
    }
}

/// A client key that does not match `--cert` was blamed on `--ca` (found by a first-user
/// review): the message names all three.
#[tokio::test]
async fn a_client_key_that_does_not_match_its_certificate_names_cert_and_key() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let args = [
        "list",
        "--grpc",
        "localhost:1",
        "--ca",
        &path("ca.pem"),
        "--cert",
        &path("server.pem"),
        "--key",
        &path("other.key"),
    ];
    let mismatched = cli(&args, &[]).await;
    assert_eq!(
        mismatched.status.code(),
        Some(64),
        "{}",
        stderr(&mismatched)
    );
    assert!(
        stderr(&mismatched).contains("--ca, --cert or --key: "),
        "{}",
        stderr(&mismatched)
    );
}

/// The deploy kit's operator commands run inside the service's container, which has no shell
/// to set PROFILE_STATE_TOKEN in and whose tokens are on (found by a first-user review): the
/// CLI reads the server's own tokens file, through its variable, or one given by --token-file.
#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_read_from_the_servers_tokens_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# operators\n\n  admin-token  \nother-token\n").unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_auth_tokens_file = Some(tokens.clone());
    let service = TestService::start_with(config).await;
    let grpc = service.grpc.to_string();
    let tokens = tokens.to_str().unwrap();

    let server_variable = [("PROFILE_STATE_GRPC_AUTH_TOKENS_FILE", tokens)];
    let listed = cli(&["list", "--grpc", &grpc], &server_variable).await;
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(stdout(&listed).starts_with("ID\t"), "{}", stdout(&listed));
    let flag = cli(&["list", "--grpc", &grpc, "--token-file", tokens], &[]).await;
    assert!(flag.status.success(), "{}", stderr(&flag));

    // --token wins over the file.
    let wrong = [
        &["list", "--grpc", &grpc, "--token", "wrong"][..],
        &["--token-file", tokens],
    ];
    let refused = cli(&wrong.concat(), &[]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("[UNAUTHENTICATED]"),
        "{}",
        stderr(&refused)
    );
    let without = cli(&["list", "--grpc", &grpc], &[]).await;
    assert_eq!(without.status.code(), Some(1), "{}", stderr(&without));
    assert!(
        stderr(&without).contains("--token-file"),
        "the hint: {}",
        stderr(&without)
    );

    // A file without a token, or none there, is a usage error naming the flag and the file.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "# none yet\n").unwrap();
    let empty = empty.to_str().unwrap();
    let no_token = cli(&["list", "--grpc", &grpc, "--token-file", empty], &[]).await;
    assert_eq!(no_token.status.code(), Some(64), "{}", stderr(&no_token));
    assert!(
        stderr(&no_token).contains(&format!("--token-file {empty} holds no token")),
        "{}",
        stderr(&no_token)
    );
    let missing = [("PROFILE_STATE_GRPC_AUTH_TOKENS_FILE", "/no/such/tokens")];
    let unreadable = cli(&["list", "--grpc", &grpc], &missing).await;
    assert_eq!(
        unreadable.status.code(),
        Some(64),
        "{}",
        stderr(&unreadable)
    );
    assert!(
        stderr(&unreadable).contains(
            "--token-file was set by the environment variable PROFILE_STATE_GRPC_AUTH_TOKENS_FILE"
        ),
        "{}",
        stderr(&unreadable)
    );
    service.stop().await;
}

/// `replay` printed each letter it could not replay with `eprintln!`, where every other
/// failure of the subcommands goes through one path (`Failure::report`): the same refusal that
/// `list` follows with the note that `--token` came from PROFILE_STATE_TOKEN had no note.
/// Now each refusal is printed as `list`'s is, then the count; exit 1 as before.
#[tokio::test]
async fn a_refused_replay_is_printed_as_every_other_failure_is() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "admin-token\n").unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_auth_tokens_file = Some(tokens);
    let service = TestService::start_with(config).await;
    let (_, id) = dead_letter(&service, "refused-replay").await;
    let grpc = service.grpc.to_string();
    let wrong = [("PROFILE_STATE_TOKEN", "wrong-token")];
    let note = "  note: --token was set by the environment variable PROFILE_STATE_TOKEN";

    let listed = cli(&["list", "--grpc", &grpc], &wrong).await;
    assert_eq!(listed.status.code(), Some(1), "{}", stderr(&listed));
    let listed = stderr(&listed);
    let lines: Vec<&str> = listed.lines().collect();
    assert!(
        lines[0].starts_with("profile-state: listing dead letters: "),
        "{listed}"
    );
    assert_eq!(lines[1..], [note], "{listed}");

    let replayed = cli(&["replay", &id, "--grpc", &grpc], &wrong).await;
    assert_eq!(replayed.status.code(), Some(1), "{}", stderr(&replayed));
    let replayed = stderr(&replayed);
    let lines: Vec<&str> = replayed.lines().collect();
    let refusal = lines[0]
        .strip_prefix(&format!("profile-state: replaying {id}: "))
        .unwrap_or_else(|| panic!("{replayed}"));
    // The refusal's words as `list` has them, after what was being done.
    let (_, listed_refusal) = listed
        .lines()
        .next()
        .unwrap()
        .split_at("profile-state: listing dead letters: ".len());
    assert_eq!(refusal, listed_refusal, "{replayed}");
    assert_eq!(
        lines[1..],
        [note, "profile-state: 1 dead letter(s) not replayed"],
        "{replayed}"
    );
    service.stop().await;
}

/// A client certificate the server refuses (another CA) was answered with the hint to give the
/// server's CA with --ca, which had been given (found by an adversarial run): the hint now
/// names the client certificate too.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_client_certificate_is_hinted_at() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::tls::Pki::new();
    let service = TestService::start_with(common::tls::tls_config(dir.path(), &pki, true)).await;
    let (cert, key) = common::tls::Pki::new().issue("client");
    std::fs::write(dir.path().join("client.pem"), cert).unwrap();
    std::fs::write(dir.path().join("client.key"), key).unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let grpc = format!("localhost:{}", service.grpc.port());
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let args = [
        "list",
        "--grpc",
        &grpc,
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
        "--timeout",
        "5s",
    ];
    let refused = cli(&args, &[]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("check --cert and --key"),
        "{}",
        stderr(&refused)
    );
    service.stop().await;
}
