//! The real `profile-state` binary for end-to-end tests: started on a data directory with
//! loopback ports, its JSON log lines readable, its surfaces (webhook, readiness, health,
//! GetServerInfo) one call away; killed when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::SECRET;
use profile_state::pb;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use profile_state::webhook::signature::SignatureCheck;
use serde_json::Value;
use tokio::sync::mpsc;
use tonic_health::pb::health_client::HealthClient;

/// How long the tests wait for anything the service does by itself.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The binary with `args` alone, whatever `PROFILE_STATE_*`, `RUST_LOG` or `NO_COLOR` the
/// caller's environment holds.
pub fn bare_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_profile-state"));
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("PROFILE_STATE_")
            || name_text == "RUST_LOG"
            || name_text == "NO_COLOR"
        {
            command.env_remove(name);
        }
    }
    command.args(args);
    command
}

/// The command that runs the binary on `data_dir` with loopback ports, JSON logs and the test
/// secret, whatever `PROFILE_STATE_*` the caller's environment holds.
pub fn command(data_dir: &Path, args: &[&str]) -> Command {
    let mut command = bare_command(&[]);
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--webhook-secret", SECRET, "--log-format", "json"])
        .args([
            "--webhook-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(args);
    command
}

/// Runs the binary on `data_dir` expecting it to refuse to start; returns its output. One
/// that starts instead is killed and the test fails.
pub async fn refused(data_dir: &Path, args: &[&str]) -> Output {
    refused_command(command(data_dir, args)).await
}

/// Runs `command` expecting the binary to exit without serving; returns its output. One that
/// starts serving instead is killed and the test fails.
pub async fn refused_command(mut command: Command) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let pid = child.id().to_string();
    let exited = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    let output = match tokio::time::timeout(PATIENCE, exited).await {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("the binary did not refuse to start: still running after {PATIENCE:?}")
        }
    };
    assert!(
        !output.status.success(),
        "the binary was expected to refuse to start; stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    output
}

/// The real binary on a data directory, its JSON log lines on a channel; killed when dropped.
pub struct Binary {
    pub child: Child,
    pub lines: mpsc::UnboundedReceiver<Value>,
    /// Every line [`Binary::wait_for`] read, in order.
    pub seen: Vec<Value>,
    pub webhook: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Binary {
    /// Starts the binary on `data_dir` with `args` and waits for its "listening" line. Needs a
    /// multi-threaded test runtime (see [`Binary::stop`]).
    pub async fn start(data_dir: &Path, args: &[&str]) -> Binary {
        let mut command = command(data_dir, args);
        // The sequencer logs each failed probe at DEBUG: the tests wait for those lines.
        command.env("RUST_LOG", "info,profile_state::sequencer=debug");
        Binary::spawn(command).await
    }

    /// Starts `command` (which must ask for `--log-format json`) and waits for its "listening"
    /// line.
    pub async fn spawn(command: Command) -> Binary {
        let mut binary = Binary::spawn_starting(command);
        binary.wait_listening().await;
        binary
    }

    /// Starts the binary on `data_dir` with `args` and returns at once, while it starts up
    /// (its addresses are known after [`Binary::wait_listening`]).
    pub fn start_up(data_dir: &Path, args: &[&str]) -> Binary {
        let mut command = command(data_dir, args);
        command.env("RUST_LOG", "info");
        Binary::spawn_starting(command)
    }

    /// Waits for the "listening" line, which comes once start-up is over, and takes the
    /// addresses from it.
    pub async fn wait_listening(&mut self) {
        let listening = self.wait_for("profile-state listening").await;
        let address = |name: &str| listening[name].as_str().unwrap().parse().unwrap();
        (self.webhook, self.grpc, self.admin) =
            (address("webhook"), address("grpc"), address("admin"));
    }

    /// Starts `command` (which must ask for `--log-format json`), not waiting for anything.
    fn spawn_starting(mut command: Command) -> Binary {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let json = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if send.send(json).is_err() {
                    return;
                }
            }
        });
        let unbound: SocketAddr = ([0, 0, 0, 0], 0).into();
        Binary {
            child,
            lines,
            seen: Vec::new(),
            webhook: unbound,
            grpc: unbound,
            admin: unbound,
        }
    }

    /// The next log line whose message is `message`.
    pub async fn wait_for(&mut self, message: &str) -> Value {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let line = self.lines.recv().await.unwrap_or_else(|| {
                    panic!(
                        "the binary exited before logging {message:?}: {:?}",
                        self.child.wait()
                    )
                });
                self.seen.push(line.clone());
                if line["message"] == message {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line {message:?} within {PATIENCE:?}"))
    }

    /// The exit status of a binary that stops by itself (once it has said so); fails the test
    /// if it has not exited within [`PATIENCE`].
    pub fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        tokio::task::block_in_place(|| {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the binary did not exit within {PATIENCE:?}"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    }

    /// Posts `body` signed with the test secret; returns status and JSON answer.
    pub async fn post(&self, body: &Value) -> (u16, Value) {
        let raw = serde_json::to_vec(body).unwrap();
        let response = reqwest::Client::new()
            .post(format!("http://{}/webhooks/gameball", self.webhook))
            .header("content-type", "application/json")
            .header("x-gb-signature", SignatureCheck::new(SECRET).sign(&raw))
            .body(raw)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// The status of `/readyz`.
    pub async fn ready(&self) -> u16 {
        reqwest::get(format!("http://{}/readyz", self.admin))
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A gRPC health client.
    pub async fn health(&self) -> HealthClient<tonic::transport::Channel> {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
    }

    /// GetServerInfo.
    pub async fn server_info(&self) -> pb::GetServerInfoResponse {
        ProfileServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
            .get_server_info(pb::GetServerInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Sends the binary a signal by `kill`'s name for it (`"HUP"`, `"STOP"`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// SIGTERM, then waits for a clean exit. The wait blocks only this worker thread: the
    /// runtime must go on closing the test's connections, or the server waits for them.
    pub fn stop(mut self) {
        self.signal("TERM");
        let exit = tokio::task::block_in_place(|| self.child.wait().unwrap());
        assert!(exit.success(), "exits 0");
    }
}

impl Binary {
    /// SIGTERM, a clean exit, then every log line the binary wrote (those `wait_for` read
    /// first).
    pub fn stop_collecting(mut self) -> Vec<Value> {
        self.signal("TERM");
        let exit = tokio::task::block_in_place(|| self.child.wait().unwrap());
        assert!(exit.success(), "exits 0");
        let mut lines = std::mem::take(&mut self.seen);
        // The reader thread ends at the end of stdout, which the exit closed.
        while let Some(line) = tokio::task::block_in_place(|| self.lines.blocking_recv()) {
            lines.push(line);
        }
        lines
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The names in `dir`, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}
