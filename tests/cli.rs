//! The command line of the real binary: every usage or configuration error exits 64 and, when
//! the value came from an environment variable, names it; switches from the environment take
//! the usual spellings; listen addresses take host names; ports are bound before the data
//! directory is touched; a bad `RUST_LOG` is reported; `--help` and `--version` exit 0.

use crate::common::binary;

use std::process::Output;

use binary::{Binary, bare_command, refused_command};

/// Runs the binary with `args` and `envs` (nothing else from the caller's environment),
/// expecting it to exit without serving.
async fn exits(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = bare_command(args);
    command.envs(envs.iter().copied());
    refused_command(command).await
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The note a usage error carries when `flag` was set by `variable`.
fn note(flag: &str, variable: &str) -> String {
    format!("note: --{flag} was set by the environment variable {variable}")
}

const SECRET: [&str; 2] = ["--webhook-secret", "s"];

/// A refused start: (args, environment, what stderr must say, the note it must carry).
type Case<'a> = (
    Vec<&'a str>,
    Vec<(&'a str, &'a str)>,
    &'a str,
    Option<String>,
);

#[tokio::test]
async fn every_usage_error_exits_64_and_names_the_variable_the_value_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("no-such-tokens");
    let secrets = dir.path().join("secrets");
    std::fs::write(&secrets, "[clients]\n\"2155\" = [\"topsecret\"\n").unwrap();
    let padded = dir.path().join("padded");
    std::fs::write(&padded, "[clients]\n\"2155\" = [\" topsecret\"]\n").unwrap();
    let (tokens, secrets) = (tokens.to_str().unwrap(), secrets.to_str().unwrap());
    let padded = padded.to_str().unwrap();
    let ephemeral = [SECRET[0], SECRET[1], "--ephemeral"];
    let secrets_says = format!("--webhook-secrets-file: {secrets} is not a valid secrets file");
    let tokens_says = format!("--grpc-auth-tokens-file: {tokens}: read: ");
    let cases: Vec<Case> = vec![
        (
            vec!["--bogus"],
            vec![],
            "unexpected argument '--bogus'",
            None,
        ),
        (
            ephemeral.to_vec(),
            vec![("PROFILE_STATE_MAX_BODY_BYTES", "64k")],
            "invalid value '64k' for '--max-body-bytes",
            Some(note("max-body-bytes", "PROFILE_STATE_MAX_BODY_BYTES")),
        ),
        (
            ephemeral.to_vec(),
            vec![("PROFILE_STATE_HISTORY_EVENTS", "0")],
            "--history-events must be at least 1",
            Some(note("history-events", "PROFILE_STATE_HISTORY_EVENTS")),
        ),
        (
            [&ephemeral[..], &["--history-events", "0"]].concat(),
            vec![],
            "--history-events must be at least 1",
            None,
        ),
        // A secret with a newline from its file or variable: every signature failed, 401s
        // only (found by an adversarial run).
        (
            vec!["--ephemeral"],
            vec![("PROFILE_STATE_WEBHOOK_SECRET", "topsecret\n")],
            "--webhook-secret begins or ends with whitespace",
            Some(note("webhook-secret", "PROFILE_STATE_WEBHOOK_SECRET")),
        ),
        (
            vec!["--ephemeral", "--webhook-secrets-file", padded],
            vec![],
            "a secret begins or ends with whitespace",
            None,
        ),
        // Values at the edge of what a number or a clock holds were panics at their first use
        // (found by an adversarial run).
        (
            [&ephemeral[..], &["--shutdown-grace", "400000y"]].concat(),
            vec![],
            "400000y is longer than the longest a flag takes, a year",
            None,
        ),
        (
            ephemeral.to_vec(),
            vec![("PROFILE_STATE_GRPC_KEEPALIVE_INTERVAL", "5000years")],
            "longer than the longest a flag takes",
            Some(note(
                "grpc-keepalive-interval",
                "PROFILE_STATE_GRPC_KEEPALIVE_INTERVAL",
            )),
        ),
        (
            [
                &ephemeral[..],
                &["--max-in-flight-webhooks", "18446744073709551615"],
            ]
            .concat(),
            vec![],
            "--max-in-flight-webhooks must be at most 1048576",
            None,
        ),
        // What one body makes of a journal record or a profile must fit a journal frame.
        (
            [&ephemeral[..], &["--max-body-bytes", "16777217"]].concat(),
            vec![],
            "--max-body-bytes must be at most 16777216",
            None,
        ),
        (
            [&ephemeral[..], &["--grpc-max-message-bytes", "10"]].concat(),
            vec![],
            "--grpc-max-message-bytes must be at least 1024",
            None,
        ),
        // Beside secrets it turned authentication off with only a warning: a development
        // switch left in the environment (found by a first-user review; a fresh-eyes run
        // before had found the secrets dropped without a word).
        (
            vec!["--ephemeral", "--webhook-secret", "s"],
            vec![("PROFILE_STATE_INSECURE_SKIP_SIGNATURE", "1")],
            "--insecure-skip-signature accepts unsigned webhooks, so it cannot be used with \
             --webhook-secret or --webhook-secrets-file",
            Some(note(
                "insecure-skip-signature",
                "PROFILE_STATE_INSECURE_SKIP_SIGNATURE",
            )),
        ),
        (
            vec!["--ephemeral", "--insecure-skip-signature"],
            vec![("PROFILE_STATE_WEBHOOK_SECRETS_FILE", "/etc/secrets.toml")],
            "cannot be used with --webhook-secret or --webhook-secrets-file",
            Some(note(
                "webhook-secrets-file",
                "PROFILE_STATE_WEBHOOK_SECRETS_FILE",
            )),
        ),
        // NATS settings that cannot work exited 1, for a supervisor to restart them forever
        // (found by an adversarial run).
        (
            [&ephemeral[..], &["--nats-url="]].concat(),
            vec![],
            "--nats-url: is empty",
            None,
        ),
        (
            [&ephemeral[..], &["--nats-url", "nats://127.0.0.1:4222"]].concat(),
            vec![("PROFILE_STATE_NATS_CREDS", "/no/such.creds")],
            "--nats-creds: /no/such.creds: No such file or directory",
            Some(note("nats-creds", "PROFILE_STATE_NATS_CREDS")),
        ),
        (
            [
                &ephemeral[..],
                &[
                    "--nats-url",
                    "nats://127.0.0.1:4222",
                    "--nats-creds",
                    secrets,
                ],
            ]
            .concat(),
            vec![],
            "not a NATS credentials file",
            None,
        ),
        (
            [
                &ephemeral[..],
                &[
                    "--nats-url",
                    "nats://127.0.0.1:4222",
                    "--nats-tls-ca",
                    "/no/ca.pem",
                ],
            ]
            .concat(),
            vec![],
            "--nats-tls-ca: /no/ca.pem: No such file or directory",
            None,
        ),
        // A zero timeout answered recorded webhooks with 503 (found by a first-user review).
        (
            [&ephemeral[..], &["--webhook-timeout", "0s"]].concat(),
            vec![],
            "--webhook-timeout must be more than zero",
            None,
        ),
        (
            ephemeral.to_vec(),
            vec![("PROFILE_STATE_GRPC_KEEPALIVE_TIMEOUT", "0ms")],
            "--grpc-keepalive-timeout must be more than zero",
            Some(note(
                "grpc-keepalive-timeout",
                "PROFILE_STATE_GRPC_KEEPALIVE_TIMEOUT",
            )),
        ),
        (
            [&ephemeral[..], &["--backup-stall-timeout", "500ms"]].concat(),
            vec![],
            "--backup-stall-timeout must be at least 1s",
            None,
        ),
        (
            SECRET.to_vec(),
            vec![("PROFILE_STATE_EPHEMERAL", "maybe")],
            "invalid value 'maybe' for '--ephemeral'",
            Some(note("ephemeral", "PROFILE_STATE_EPHEMERAL")),
        ),
        (
            ephemeral.to_vec(),
            vec![("PROFILE_STATE_DATA_DIR", "/var/lib/x")],
            "--ephemeral keeps nothing on disk, so it cannot be used with --data-dir",
            Some(note("data-dir", "PROFILE_STATE_DATA_DIR")),
        ),
        (
            [&SECRET[..], &["--data-dir", "/tmp/x"]].concat(),
            vec![("PROFILE_STATE_EPHEMERAL", "yes")],
            "cannot be used with --data-dir",
            Some(note("ephemeral", "PROFILE_STATE_EPHEMERAL")),
        ),
        (
            [&ephemeral[..], &["--data-dir", "/tmp/x"]].concat(),
            vec![],
            "cannot be used with --data-dir",
            None,
        ),
        // A listen address's reason follows clap's naming of the flag and the value, as every
        // flag's does (it repeated the value, quoted, before the reason).
        (
            ephemeral.to_vec(),
            vec![("PROFILE_STATE_GRPC_LISTEN", "[fd00::1]")],
            "invalid value '[fd00::1]' for '--grpc-listen <GRPC_LISTEN>': no port: write \
             HOST:PORT",
            Some(note("grpc-listen", "PROFILE_STATE_GRPC_LISTEN")),
        ),
        (
            [&ephemeral[..], &["--webhook-listen", "host:http"]].concat(),
            vec![],
            "invalid value 'host:http' for '--webhook-listen <WEBHOOK_LISTEN>': the port must \
             be a number from 0 to 65535",
            None,
        ),
        (
            ephemeral.to_vec(),
            vec![("PROFILE_STATE_GRPC_AUTH_TOKENS_FILE", tokens)],
            "--grpc-auth-tokens-file",
            Some(note(
                "grpc-auth-tokens-file",
                "PROFILE_STATE_GRPC_AUTH_TOKENS_FILE",
            )),
        ),
        (
            vec!["--ephemeral", "--webhook-secrets-file", secrets],
            vec![],
            "is not a valid secrets file (TOML): line 2, column 22",
            None,
        ),
        // A file flag is named as the others are, `--flag: PATH: ...` (it was `--flag PATH`
        // here alone: found by a first-user review).
        (
            vec![
                "--ephemeral",
                "--webhook-secrets-file",
                "/no/such/secrets.toml",
            ],
            vec![],
            "--webhook-secrets-file: /no/such/secrets.toml: read: No such file",
            None,
        ),
        (
            vec!["--ephemeral", "--webhook-secrets-file", secrets],
            vec![],
            &secrets_says,
            None,
        ),
        (
            [&ephemeral[..], &["--grpc-auth-tokens-file", tokens]].concat(),
            vec![],
            &tokens_says,
            None,
        ),
        // A count is told "at least 1", a duration "more than zero", whatever the flag (both
        // were said of counts: found by a first-user review).
        (
            [&ephemeral[..], &["--max-webhook-connections", "0"]].concat(),
            vec![],
            "--max-webhook-connections must be at least 1",
            None,
        ),
        (
            [&ephemeral[..], &["--nats-url", "nats://127.0.0.1:4222"]].concat(),
            vec![("PROFILE_STATE_MAX_LAG", "0s")],
            "--max-lag must be more than zero",
            Some(note("max-lag", "PROFILE_STATE_MAX_LAG")),
        ),
        // Zero was taken as the smallest segment, silently (found by a first-user review).
        (
            [&ephemeral[..], &["--segment-bytes", "0"]].concat(),
            vec![],
            "--segment-bytes must be at least 1",
            None,
        ),
        // Without a secrets file, "no settings in --webhook-secrets-file" sent a first-user
        // review looking for a file that was never given.
        (
            [&ephemeral[..], &["--reconcile-every", "2155=24h"]].concat(),
            vec![],
            "--reconcile-every 2155: reconciliation needs --webhook-secrets-file with a \
             [gameball_api.\"2155\"] table (api_key and secret_key), and no secrets file is given",
            None,
        ),
        // A NATS URL that does not parse was echoed whole, password included (found by an
        // adversarial run).
        (
            [
                SECRET[0],
                SECRET[1],
                "--nats-url",
                "nats://u:topsecret@127.0.0.1:99999",
            ]
            .to_vec(),
            vec![],
            "\"nats://***@127.0.0.1:99999\" is not a NATS URL",
            None,
        ),
        (
            SECRET.to_vec(),
            vec![("PROFILE_STATE_NATS_URL", "ws://u:topsecret@[::1")],
            "\"ws://***@[::1\"",
            Some(note("nats-url", "PROFILE_STATE_NATS_URL")),
        ),
        (
            ephemeral.to_vec(),
            vec![("RUST_LOG", "warning")],
            "RUST_LOG=\"warning\" is not a usable filter",
            None,
        ),
        (
            ephemeral.to_vec(),
            vec![("RUST_LOG", "profile_state=loud")],
            "RUST_LOG=\"profile_state=loud\"",
            None,
        ),
    ];
    for (args, envs, says, note) in cases {
        let output = exits(&args, &envs).await;
        let stderr = stderr(&output);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{args:?} {envs:?}: {stderr}"
        );
        assert!(stderr.contains(says), "{args:?} {envs:?}: {stderr}");
        match note {
            Some(note) => assert!(stderr.contains(&note), "{envs:?}: {stderr}"),
            None => assert!(!stderr.contains("note: --"), "{args:?}: {stderr}"),
        }
        // The OS error appears once, and no secret from a file is echoed.
        assert!(stderr.matches("(os error").count() <= 1, "{stderr}");
        assert!(!stderr.contains("topsecret"), "{stderr}");
    }
}

#[tokio::test]
async fn help_and_version_exit_zero_on_stdout() {
    for (flag, says) in [
        ("--help", "PROFILE_STATE_EPHEMERAL"),
        ("--version", "profile-state "),
    ] {
        let output = bare_command(&[flag]).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{flag}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains(says),
            "{flag}: {output:?}"
        );
    }
}

/// `reconcile --not-updated-for 1` explains what a duration is, as the server's duration flags
/// do (it said only humantime's "time unit needed"; a first-user review).
#[tokio::test]
async fn a_duration_the_reconcile_subcommand_cannot_read_is_explained() {
    let age = ["reconcile", "--client-id", "2155", "--not-updated-for", "1"];
    let age = exits(&age, &[]).await;
    assert_eq!(age.status.code(), Some(64));
    assert!(
        stderr(&age).contains("a duration is a number and a unit, such as 500ms"),
        "{}",
        stderr(&age)
    );
}

/// `reconcile --not-updated-for 0` was sent, and only the server refused it (exit 1, after
/// connecting): a zero age is a usage error before connecting, in the words the server's
/// duration flags use for zero. The address given is one nothing listens on, so a command that
/// connected would fail otherwise (exit 1).
#[tokio::test]
async fn a_zero_age_for_the_reconcile_subcommand_is_refused_before_connecting() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    for zero in ["0", "0s", "0ms"] {
        let args = ["reconcile", "--client-id", "2155", "--grpc", &closed];
        let output = exits(&[&args[..], &["--not-updated-for", zero]].concat(), &[]).await;
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(64), "{zero}: {text}");
        assert!(
            text.contains(&format!(
                "invalid value '{zero}' for '--not-updated-for <AGE>': must be more than zero"
            )),
            "{zero}: {text}"
        );
        assert!(!text.contains("cannot connect"), "{zero}: {text}");
    }
}

/// The operator subcommands' help and usage errors say what each needs (a first-user review):
/// `reconcile`'s usage shows `--client-id` as required (clap left it among the [OPTIONS]);
/// each subcommand's `--timeout` names that subcommand's answers (every one named a backup's
/// pieces).
#[tokio::test]
async fn the_operator_subcommands_say_what_they_need() {
    let help = |args: &[&str]| {
        let output = bare_command(args).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let reconcile = help(&["reconcile", "--help"]);
    assert!(
        reconcile.contains("Usage: profile-state reconcile --client-id <CLIENT_ID> <--customer-id")
            && reconcile.contains("\n       profile-state reconcile --cancel <JOB_ID> [OPTIONS]"),
        "{reconcile}"
    );
    let missing = exits(&["reconcile", "--all"], &[]).await;
    assert_eq!(missing.status.code(), Some(64));
    assert!(stderr(&missing).contains("reconcile --client-id <CLIENT_ID> <"));

    for (args, answers) in [
        (&["dead-letters", "list"][..], "each page of the list"),
        (&["dead-letters", "show"], "each part of the letter"),
        (&["dead-letters", "replay"], "each letter's replay"),
        (&["dead-letters", "purge"], "the purge"),
        (
            &["backup"],
            "the backup's first answer and each piece after it",
        ),
        (&["reconcile"], "each answer (with --wait"),
    ] {
        let text = help(&[args, &["--help"]].concat());
        // On the flag's line, or the next one when the help is long.
        let lines: Vec<&str> = text.lines().collect();
        let at = lines.iter().position(|line| line.contains("--timeout <"));
        let timeout = lines[at.unwrap()..][..2].join(" ");
        assert!(
            timeout.contains(&format!(
                "How long to wait for the connection, and for {answers}"
            )),
            "{args:?}: {timeout}"
        );
        let backups = text.matches("backup").count();
        assert!(args[0] == "backup" || backups == 0, "{args:?}: {text}");
    }
}

/// The binary with JSON logs on loopback ports, `args` and `envs` added.
/// Listeners not in `args` are on loopback port 0.
async fn start(args: &[&str], envs: &[(&str, &str)]) -> Binary {
    let mut command = bare_command(&["--log-format", "json", "--webhook-secret", "s"]);
    for flag in ["--webhook-listen", "--grpc-listen", "--admin-listen"] {
        if !args.contains(&flag) {
            command.args([flag, "127.0.0.1:0"]);
        }
    }
    command.args(args).envs(envs.iter().copied());
    Binary::spawn(command).await
}

#[tokio::test(flavor = "multi_thread")]
async fn switches_from_the_environment_take_the_usual_spellings() {
    for yes in ["1", "true", "yes", "on", "TRUE", "Yes"] {
        let binary = start(&[], &[("PROFILE_STATE_EPHEMERAL", yes)]).await;
        assert!(!binary.server_info().await.durable, "{yes}");
        binary.stop();
    }
    for no in ["0", "false", "no", "off"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let args = ["--data-dir", data.to_str().unwrap()];
        let binary = start(&args, &[("PROFILE_STATE_EPHEMERAL", no)]).await;
        assert!(binary.server_info().await.durable, "{no}");
        binary.stop();
        assert!(data.join("STORE_ID").exists(), "{no}: durable");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_addresses_take_host_names_and_bracketed_ipv4() {
    let args = [
        "--ephemeral",
        "--grpc-listen",
        "localhost:0",
        "--admin-listen",
        "[127.0.0.1]:0",
    ];
    let binary = start(&args, &[]).await;
    assert!(binary.grpc.ip().is_loopback(), "{}", binary.grpc);
    assert_eq!(binary.admin.ip().to_string(), "127.0.0.1");
    assert_eq!(binary.server_info().await.profile_count, 0);
    assert_eq!(binary.ready().await, 200);
    binary.stop();
}

/// A `--data-dir` that is a file was told "create: File exists (os error 17)" (found by a
/// first-user review): it is told it is not a directory, and the file is left as it was. It is
/// bad configuration, exit 64 as every other, in single-node and replicated mode alike (it
/// exited 1, the status of a start worth trying again), found before anything binds or
/// connects (a port taken is not what is reported, nor the NATS URL without a server), and
/// named by its flag, so a value from the environment gets its note.
#[tokio::test]
async fn a_data_dir_that_is_a_file_is_told_it_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, "mine").unwrap();
    let path = file.to_str().unwrap();
    let mut listens = vec![SECRET[0], SECRET[1]];
    listens.extend([
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let loopback = [&listens[..], &["--webhook-listen", "127.0.0.1:0"]].concat();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let port_taken = [&listens[..], &["--webhook-listen", &taken]].concat();
    let replicated = [&loopback[..], &["--nats-url", "nats://127.0.0.1:1"]].concat();
    let flag = ["--data-dir", path];
    let cases = [
        ([&loopback[..], &flag].concat(), vec![]),
        ([&port_taken[..], &flag].concat(), vec![]),
        ([&replicated[..], &flag].concat(), vec![]),
        (loopback.clone(), vec![("PROFILE_STATE_DATA_DIR", path)]),
    ];
    for (args, envs) in cases {
        let output = exits(&args, &envs).await;
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {text}");
        assert!(
            text.contains(&format!(
                "--data-dir: {path} is not a directory (a file is in its place)"
            )),
            "{args:?}: {text}"
        );
        assert!(!text.contains("File exists"), "{text}");
        let noted = text.contains(&note("data-dir", "PROFILE_STATE_DATA_DIR"));
        assert_eq!(noted, !envs.is_empty(), "{text}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    }
}

#[tokio::test]
async fn ports_are_bound_before_the_data_directory_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    // Another process holds the port: worth a restart, so exit 1, not 64.
    let args = [SECRET[0], SECRET[1], "--data-dir", data_arg];
    let output = exits(&[&args[..], &["--grpc-listen", &taken]].concat(), &[]).await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    // The flag, the value, the reason, as every flag's error names them (`--flag: VALUE: `).
    assert!(
        text.contains(&format!("--grpc-listen: {taken}: ")),
        "{text}"
    );
    assert!(text.contains("in use"), "{text}");
    assert!(!data.exists(), "no data directory, no store id");
    // A host name that does not resolve is configuration: 64.
    let unknown = ["--admin-listen", "no-such-host.invalid:0"];
    let output = exits(&[&args[..], &unknown].concat(), &[]).await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(64), "{text}");
    assert!(
        text.contains("--admin-listen: no-such-host.invalid:0: cannot resolve the host name"),
        "{text}"
    );
    assert!(!data.exists());
}
