//! The crash test: the real binary, SIGKILLed in the middle of a webhook load, restarted on the
//! same data directory, several times. Every webhook answered 2xx must come back with its
//! values and its revision; revisions must continue without reuse; the store id must stay.

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{SECRET, at, profile_updated, server_info};
use profile_state::pb::BatchGetProfilesRequest;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use profile_state::webhook::signature::SignatureCheck;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// Webhooks per round, each for a distinct customer.
const WEBHOOKS_PER_ROUND: usize = 2_000;
/// Concurrent senders, each with its own keep-alive HTTP/1.1 client.
const SENDERS: usize = 32;
/// One round per kill point: SIGKILL once this many webhooks of the round were acknowledged,
/// from right after the first group commit to near the end of the load.
const KILL_POINTS: [usize; 8] = [150, 700, 1_400, 1, 50, 333, 999, 1_750];
/// How long a start may take before the test fails instead of hanging.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one round of sending may take.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// The most ids one BatchGetProfiles call accepts.
const BATCH_IDS: usize = 1_000;
/// The `client_id` of `common::profile_updated`.
const CLIENT_ID: &str = "2155";

/// A webhook answered 2xx: its customer, the values it carried, and the revision it got.
#[derive(Debug, Clone)]
struct Acked {
    customer_id: String,
    total_points: i64,
    tier: String,
    revision: u64,
}

/// The `profile-state` binary running on a data directory, killed when dropped.
struct Process {
    child: Mutex<Child>,
    webhook: SocketAddr,
    grpc: SocketAddr,
}

impl Process {
    /// Starts the binary on `data_dir` and waits (bounded) for its "listening" log line.
    async fn spawn(data_dir: &Path) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_profile-state"));
        // Settings from the environment must not change what this test runs.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PROFILE_STATE_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--webhook-listen", "127.0.0.1:0"])
            .args(["--grpc-listen", "127.0.0.1:0"])
            // The admin listener defaults to 127.0.0.1:9090, which may be taken.
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--webhook-secret", SECRET])
            .args(["--log-format", "json"])
            // Small thresholds, so the kills also land around segment rotations, snapshots
            // and compaction, not only plain appends (the defaults never reach them here).
            .args([
                "--snapshot-every-records",
                "300",
                "--segment-bytes",
                "20000",
                "--history-events",
                "500",
            ])
            // The listening line is at INFO: a RUST_LOG of the caller must not hide it.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("the binary starts");

        // A thread reads stdout to its end, so the child never blocks on a full pipe; lines go
        // to this task until the listening line is found.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines_tx.send(line);
            }
        });
        let mut process = Process {
            child: Mutex::new(child),
            webhook: ([0, 0, 0, 0], 0).into(),
            grpc: ([0, 0, 0, 0], 0).into(),
        };
        let mut seen = Vec::new();
        let listening = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.recv().await {
                // `--log-format json`: the fields are at the top level.
                let fields = serde_json::from_str::<Value>(&line).ok();
                seen.push(line);
                if let Some(fields) = fields
                    && fields["message"] == "profile-state listening"
                {
                    return Some(fields);
                }
            }
            None
        })
        .await;
        let fields = match listening {
            Ok(Some(fields)) => fields,
            Ok(None) => panic!(
                "profile-state exited ({:?}) before listening; its output:\n{}",
                process.child.lock().unwrap().wait(),
                seen.join("\n")
            ),
            Err(_) => panic!(
                "profile-state did not listen within {START_TIMEOUT:?}; its output:\n{}",
                seen.join("\n")
            ),
        };
        let address = |name: &str| -> SocketAddr {
            fields[name]
                .as_str()
                .and_then(|text| text.parse().ok())
                .unwrap_or_else(|| panic!("no {name} address in the listening line: {fields}"))
        };
        process.webhook = address("webhook");
        process.grpc = address("grpc");
        process
    }

    fn webhook_url(&self) -> String {
        format!("http://{}/webhooks/gameball", self.webhook)
    }

    async fn client(&self) -> ProfileServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .expect("gRPC connects");
        ProfileServiceClient::new(channel)
    }

    /// SIGKILL, then reap the process.
    fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        child.kill().expect("SIGKILL is delivered");
        child.wait().expect("the killed process is reaped");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // No orphan survives, whether the test passed or failed; a killed process is no error.
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The customer id of webhook `i` of `round`.
fn customer(round: usize, i: usize) -> String {
    format!("r{round}-c{i}")
}

/// Posts one signed `customer.profile.updated` with distinctive values for webhook `i`. `Ok` when
/// it was answered 2xx and the whole answer was read, `Err` on a connection error. A non-2xx
/// status panics: nothing in this test is ever refused.
async fn post(
    http: &reqwest::Client,
    url: &str,
    customer_id: String,
    i: usize,
) -> reqwest::Result<Acked> {
    let total_points = i as i64;
    let tier = format!("t{}", i % 5);
    let body = profile_updated(
        &customer_id,
        &at(i as u32),
        json!({"total_points": total_points, "tier_name": tier}),
    );
    let raw = serde_json::to_vec(&body).unwrap();
    let signature = SignatureCheck::new(SECRET).sign(&raw);
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .header("x-gb-signature", signature)
        .body(raw)
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    assert!(
        status.is_success(),
        "webhook for {customer_id} refused with {status}: {answer}"
    );
    assert_eq!(answer["outcome"], "applied", "for {customer_id}: {answer}");
    let revision = answer["revision"]
        .as_u64()
        .unwrap_or_else(|| panic!("no revision in the answer for {customer_id}: {answer}"));
    Ok(Acked {
        customer_id,
        total_points,
        tier,
        revision,
    })
}

/// Sends the round's webhooks from `SENDERS` concurrent senders and SIGKILLs `process` as the
/// `kill_at`-th answer arrives. Returns every webhook answered 2xx, before or after the kill.
async fn send_round(process: &Arc<Process>, round: usize, kill_at: usize) -> Vec<Acked> {
    let next = Arc::new(AtomicUsize::new(0));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let url = process.webhook_url();
    let mut senders = JoinSet::new();
    for _ in 0..SENDERS {
        let (next, acked_count, killed) = (next.clone(), acked_count.clone(), killed.clone());
        let (process, url) = (Arc::clone(process), url.clone());
        senders.spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let mut acked = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= WEBHOOKS_PER_ROUND {
                    return acked;
                }
                match post(&http, &url, customer(round, i), i).await {
                    Ok(answer) => {
                        acked.push(answer);
                        if acked_count.fetch_add(1, Ordering::SeqCst) + 1 == kill_at {
                            // Set first: errors the kill causes are then known to be expected.
                            killed.store(true, Ordering::SeqCst);
                            process.kill();
                        }
                    }
                    Err(error) => {
                        assert!(
                            killed.load(Ordering::SeqCst),
                            "round {round}: webhook {i} failed before the kill: {error}"
                        );
                        return acked;
                    }
                }
            }
        });
    }
    let mut acked = Vec::new();
    tokio::time::timeout(ROUND_TIMEOUT, async {
        while let Some(sender) = senders.join_next().await {
            acked.extend(sender.expect("a sender does not panic"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("round {round} did not finish within {ROUND_TIMEOUT:?}"));
    assert!(
        killed.load(Ordering::SeqCst),
        "round {round}: only {} answers, the kill point {kill_at} was never reached",
        acked.len()
    );
    acked
}

/// Checks a freshly (re)started process against everything acknowledged so far, then posts
/// one webhook and checks that it gets the next revision (and adds it to `acked`).
async fn check_after_restart(
    process: &Process,
    acked: &mut Vec<Acked>,
    store_id: &str,
    label: &str,
) {
    let mut client = process.client().await;
    let info = server_info(&mut client).await.expect("GetServerInfo");
    assert_eq!(info.store_id, store_id, "{label}: the store id survives");
    assert!(info.durable, "{label}: the store is durable");
    let highest = acked.iter().map(|a| a.revision).max().unwrap_or(0);
    assert!(
        info.revision >= highest,
        "{label}: the store is at revision {} but revision {highest} was acknowledged",
        info.revision
    );

    let mut lost = Vec::new();
    let mut wrong = Vec::new();
    for chunk in acked.chunks(BATCH_IDS) {
        let found = client
            .batch_get_profiles(BatchGetProfilesRequest {
                client_id: CLIENT_ID.into(),
                customer_ids: chunk.iter().map(|a| a.customer_id.clone()).collect(),
            })
            .await
            .expect("BatchGetProfiles")
            .into_inner();
        lost.extend(found.missing_customer_ids);
        for profile in found.profiles {
            let expected = chunk
                .iter()
                .find(|a| a.customer_id == profile.customer_id)
                .unwrap_or_else(|| panic!("{label}: unasked profile {}", profile.customer_id));
            let got = (
                profile.total_points,
                profile.tier_name.as_deref(),
                profile.revision,
            );
            let want = (
                Some(expected.total_points),
                Some(expected.tier.as_str()),
                expected.revision,
            );
            if got != want {
                wrong.push(format!(
                    "{}: (total_points, tier_name, revision) {got:?}, acknowledged {want:?}",
                    profile.customer_id
                ));
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{label}: {} of {} acknowledged webhooks lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        wrong.is_empty(),
        "{label}: {} acknowledged webhooks came back different, e.g. {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );

    // Revisions continue after everything the store holds: none is used twice.
    let http = reqwest::Client::new();
    let probe = post(
        &http,
        &process.webhook_url(),
        format!("{}-probe", label.replace(' ', "-")),
        7,
    )
    .await
    .expect("the restarted process takes webhooks");
    assert_eq!(
        probe.revision,
        info.revision + 1,
        "{label}: the first webhook after the restart"
    );
    acked.push(probe);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_webhook_survives_sigkill_at_several_points() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut process = Arc::new(Process::spawn(dir.path()).await);
    let store_id = server_info(&mut process.client().await)
        .await
        .expect("GetServerInfo")
        .store_id;
    let mut acked = Vec::new();
    check_after_restart(&process, &mut acked, &store_id, "start").await;

    for (round, kill_at) in KILL_POINTS.into_iter().enumerate() {
        let answered = send_round(&process, round, kill_at).await;
        eprintln!(
            "round {round}: killed at {kill_at}, {} acknowledged, {:?}",
            answered.len(),
            started.elapsed()
        );
        assert!(answered.len() >= kill_at);
        acked.extend(answered);
        // The killed process is reaped; its handle goes with the old Arc.
        process = Arc::new(Process::spawn(dir.path()).await);
        check_after_restart(&process, &mut acked, &store_id, &format!("round {round}")).await;
    }

    // Each customer was changed exactly once: no two acknowledgements share a revision.
    let mut revisions: Vec<u64> = acked.iter().map(|a| a.revision).collect();
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(
        revisions.len(),
        acked.len(),
        "a revision was acknowledged twice"
    );

    process.kill();
    eprintln!(
        "crash test: {} acknowledged webhooks over {} kills in {:?}",
        acked.len(),
        KILL_POINTS.len(),
        started.elapsed()
    );
}
