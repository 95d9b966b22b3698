//! A full disk, for real: the data directory on a small tmpfs, the real binary, its HTTP and
//! gRPC health surfaces. Needs root (CI runs as root) to mount the tmpfs; if mounting fails the
//! tests fail, they never skip.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{SECRET, at, profile_updated};
use profile_state::pb;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use profile_state::webhook::signature::SignatureCheck;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long the tests wait for anything the service does by itself.
const PATIENCE: Duration = Duration::from_secs(20);

/// A tmpfs of `size` mounted on a fresh temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(status) if status.success() => Tmpfs { dir },
            other => panic!(
                "cannot mount a {size} tmpfs on {} ({other:?}): this test needs root (as CI \
                 runs) to fill a real disk",
                dir.path().display()
            ),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem of `dir` with one file until it refuses another byte; returns the file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [64 * 1024, 4096, 1] {
        let bytes = vec![0xAB; chunk];
        loop {
            match file.write(&bytes) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
                Err(error) => panic!("filling the disk: {error}"),
            }
        }
    }
    let _ = file.sync_all();
    path
}

/// The real binary on a data directory, its JSON log lines on a channel; killed when dropped.
struct Binary {
    child: Child,
    lines: mpsc::UnboundedReceiver<Value>,
    webhook: SocketAddr,
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl Binary {
    async fn start(data_dir: &Path, args: &[&str]) -> Binary {
        let mut command = Command::new(env!("CARGO_BIN_EXE_profile-state"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PROFILE_STATE_") {
                command.env_remove(name);
            }
        }
        let mut child = command
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
            .args(args)
            // The sequencer logs each failed probe at DEBUG: the tests wait for those lines.
            .env("RUST_LOG", "info,profile_state::sequencer=debug")
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
        let mut binary = Binary {
            child,
            lines,
            webhook: unbound,
            grpc: unbound,
            admin: unbound,
        };
        let listening = binary.wait_for("profile-state listening").await;
        let address = |name: &str| listening["fields"][name].as_str().unwrap().parse().unwrap();
        (binary.webhook, binary.grpc, binary.admin) =
            (address("webhook"), address("grpc"), address("admin"));
        binary
    }

    /// The next log line whose message is `message`.
    async fn wait_for(&mut self, message: &str) -> Value {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let line = self.lines.recv().await.unwrap_or_else(|| {
                    panic!(
                        "the binary exited before logging {message:?}: {:?}",
                        self.child.wait()
                    )
                });
                if line["fields"]["message"] == message {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line {message:?} within {PATIENCE:?}"))
    }

    async fn post(&self, body: &Value) -> (u16, Value) {
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

    async fn ready(&self) -> u16 {
        reqwest::get(format!("http://{}/readyz", self.admin))
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn health(&self) -> HealthClient<tonic::transport::Channel> {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
    }

    async fn server_info(&self) -> pb::GetServerInfoResponse {
        ProfileServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
            .get_server_info(pb::GetServerInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// SIGTERM, then waits for a clean exit. The wait blocks only this worker thread: the
    /// runtime must go on closing the test's connections, or the server waits for them.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::task::block_in_place(|| self.child.wait().unwrap());
        assert!(exit.success(), "exits 0");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

const SERVICE: &str = "gameball.profiles.v1.ProfileService";

/// Issue 10, bug 1: the disk fills up just as the journal needs a new segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_at_segment_rotation_heals_once_space_is_back_and_readiness_never_lies() {
    let disk = Tmpfs::mount("8m");
    let data = disk.path().join("data");
    let mut binary = Binary::start(&data, &["--segment-bytes", "65536"]).await;
    // Two webhooks of ~40 KB fill the first segment past 64 KiB: the next change rotates.
    let blob = "x".repeat(40_000);
    for (n, customer) in ["a", "b"].into_iter().enumerate() {
        let body = profile_updated(customer, &at(n as u32), json!({"blob": blob}));
        assert_eq!(binary.post(&body).await.0, 200);
    }
    let mut health = binary.health().await;
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || statuses.message().await.unwrap().unwrap().status();
    assert_eq!(next_status().await, ServingStatus::Serving);

    let filler = fill(disk.path());
    let third = profile_updated("c", &at(3), json!({"total_points": 3}));
    let (status, answer) = binary.post(&third).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(next_status().await, ServingStatus::NotServing);
    assert_eq!(binary.ready().await, 503);

    // While the disk stays full, every probe of the sequencer fails and readiness stays false.
    tokio::time::timeout(PATIENCE, async {
        tokio::select! {
            status = next_status() => panic!(
                "health turned {status:?} while the disk is full and webhooks get 503"
            ),
            () = async {
                binary.wait_for("journal probe failed").await;
                binary.wait_for("journal probe failed").await;
            } => {}
        }
    })
    .await
    .expect("two probes within the patience");
    assert_eq!(binary.ready().await, 503);
    assert_eq!(binary.post(&third).await.0, 503, "still full");

    std::fs::remove_file(filler).unwrap();
    // Every refused webhook repeated NOT_SERVING; what follows must be SERVING.
    let status = tokio::time::timeout(PATIENCE, async {
        loop {
            match next_status().await {
                ServingStatus::NotServing => continue,
                other => return other,
            }
        }
    })
    .await;
    assert_eq!(
        status.expect("a new status once the disk has room"),
        ServingStatus::Serving
    );
    assert_eq!(binary.ready().await, 200);
    let (status, answer) = binary.post(&third).await;
    assert_eq!(
        (status, answer),
        (200, json!({"outcome": "applied", "revision": 3})),
        "ready means webhooks are taken"
    );
    assert_eq!(
        file_names(&data),
        [
            "LOCK",
            "STORE_ID",
            "dead-letters",
            "journal-00000000000000000001.log",
            "journal-00000000000000000003.log"
        ],
        "no half-created segment or temporary file is left"
    );

    binary.stop();
    let binary = Binary::start(&data, &["--segment-bytes", "65536"]).await;
    let info = binary.server_info().await;
    assert_eq!((info.revision, info.profile_count), (3, 3));
}

/// Issue 10, bug 5: a snapshot that fails (here for lack of space) must not leave its
/// temporary file, and one left by a crash is removed at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_fails_for_lack_of_space_leaves_no_temporary_file() {
    let disk = Tmpfs::mount("4m");
    let data = disk.path().join("data");
    let args = ["--snapshot-every-records", "5"];
    let mut binary = Binary::start(&data, &args).await;
    // Four profiles of ~40 KB: the snapshot after the fifth record needs ~160 KB.
    let blob = "x".repeat(40_000);
    for n in 1..=4 {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"blob": blob}));
        assert_eq!(binary.post(&body).await.0, 200);
    }
    // A full disk with two pages free: room for a small journal frame, not for the snapshot.
    let filler = fill(disk.path());
    let filled = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .and_then(|file| file.set_len(filled - 8192))
        .unwrap();
    let small = profile_updated("c5", &at(5), json!({"total_points": 5}));
    assert_eq!(binary.post(&small).await.0, 200);
    let failed = binary
        .wait_for("snapshot failed; the next one will retry")
        .await;
    assert!(
        failed["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{failed}"
    );
    let names = file_names(&data);
    assert!(
        !names.iter().any(|name| name.ends_with(".tmp")),
        "the failed snapshot's temporary file is gone: {names:?}"
    );
    binary.stop();

    // One left behind by a crash mid-snapshot is removed at start-up.
    std::fs::remove_file(&filler).unwrap();
    let stale = data.join("snapshot-00000000000000000005.snap.tmp");
    std::fs::write(&stale, vec![0; 100_000]).unwrap();
    let binary = Binary::start(&data, &args).await;
    assert!(
        !stale.exists(),
        "a stale temporary snapshot is removed at start-up"
    );
    assert_eq!(binary.server_info().await.revision, 5);
}
