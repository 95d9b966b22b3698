//! A short run of every scenario at tiny sizes, so the load tool cannot rot. No assertion on
//! speed: only that each scenario runs end to end against a real service and its baselines,
//! and reports its rows (as JSON).
//!
//! The service under test is the debug `profile-state` binary next to this crate's binary;
//! `cargo test` at the workspace root builds both.

use std::path::{Path, PathBuf};
use std::process::Command;

const TOOL: &str = env!("CARGO_BIN_EXE_profile-state-bench");

fn service_bin() -> PathBuf {
    let bin = Path::new(TOOL).with_file_name("profile-state");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test` at the workspace root, or `cargo build -p profile-state` first",
        bin.display()
    );
    bin
}

/// Runs one scenario with tiny sizes and returns its JSON report.
fn run(scenario: &[&str], extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = Command::new(TOOL)
        .args(scenario)
        .args([
            "--server-bin",
            service_bin().to_str().unwrap(),
            "--duration",
            "400ms",
            "--warmup",
            "100ms",
            "--rounds",
            "1",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--json",
        ])
        .arg(&json)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{scenario:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.starts_with("scenario"), "no table printed: {table}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().expect("rows");
    assert!(!rows.is_empty(), "{scenario:?} reported no rows");
    for row in rows {
        let ours = row["ours"].as_array().expect("ours values");
        assert!(!ours.is_empty(), "a row without our figure: {row}");
    }
    report
}

fn metrics(report: &serde_json::Value) -> Vec<String> {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["metric"].as_str().unwrap().to_owned())
        .collect()
}

fn row_of<'a>(report: &'a serde_json::Value, metric: &str) -> Option<&'a serde_json::Value> {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["metric"] == metric)
}

fn ratio_of(report: &serde_json::Value, metric: &str) -> Option<f64> {
    row_of(report, metric)?["ratio"].as_f64()
}

#[test]
fn ingest_compares_ephemeral_with_noop_and_durable_with_ephemeral_and_the_noop_durable() {
    let report = run(&["ingest"], &["--customers", "200"]);
    assert!(ratio_of(&report, "req/s (--ephemeral)").is_some());
    assert!(ratio_of(&report, "req/s durable vs --ephemeral").is_some());
    assert!(
        ratio_of(&report, "req/s no-op durable vs no-op HTTP").is_some_and(|ratio| ratio > 0.0)
    );
}

#[test]
fn get_and_batch_get_compare_with_the_noop_grpc_server() {
    let report = run(&["get"], &["--customers", "200"]);
    assert!(ratio_of(&report, "GetProfile calls/s").is_some());
    let report = run(&["batch-get", "--ids", "10"], &["--customers", "200"]);
    assert!(ratio_of(&report, "profiles/s").is_some());
}

#[test]
fn list_compares_pages_with_batch_get() {
    let report = run(
        &["list", "--page-size", "10", "--ids", "10"],
        &["--customers", "200"],
    );
    assert!(ratio_of(&report, "ListProfiles (page_size 10) profiles/s").is_some());
}

#[test]
fn fanout_measures_every_delivery() {
    let report = run(
        &[
            "fanout",
            "--subscribers",
            "3",
            "--streams-per-connection",
            "2",
        ],
        &["--customers", "50", "--rate", "50"],
    );
    let missing = row_of(&report, "deliveries missing").unwrap();
    assert_eq!(missing["baseline_name"], "no-op gRPC");
    for side in ["ours", "baseline"] {
        assert_eq!(
            missing[side][0].as_f64(),
            Some(0.0),
            "every change reaches every subscriber ({side})"
        );
    }
    // So did the transport floor (the no-op server with each connection on one task).
    let missing = row_of(&report, "deliveries missing, transport floor").unwrap();
    assert_eq!(missing["baseline_name"], "no-op gRPC, one task");
    assert_eq!(missing["baseline"][0].as_f64(), Some(0.0), "{missing}");
    let floor = row_of(&report, "delivery latency p99, transport floor").unwrap();
    assert!(floor["baseline"][0].as_f64().unwrap() > 0.0, "{floor}");
    // The transport baseline delivered changes over gRPC.
    let delivered = row_of(&report, "deliveries/s").unwrap();
    assert!(
        delivered["baseline"][0].as_f64().unwrap() > 0.0,
        "{delivered}"
    );
    assert!(
        metrics(&report)
            .iter()
            .any(|m| m.starts_with("ingest req/s with subscribers"))
    );
    // The ingest impact has the no-op servers' own beside it, and both sides delivered the
    // webhooks of the watched customers during it (a side that delivered nothing fails the run).
    assert!(
        ratio_of(
            &report,
            "no-op servers: ingest req/s with subscribers (Customer filter)"
        )
        .is_some()
    );
    let delivered = row_of(&report, "deliveries/s during ingest (warm-up included)").unwrap();
    assert_eq!(delivered["baseline_name"], "no-op servers");
    for side in ["ours", "baseline"] {
        assert!(delivered[side][0].as_f64().unwrap() > 0.0, "{delivered}");
    }
}

/// `--durable` runs the started service on a data directory (it writes its journal there),
/// and every change still reaches every subscriber.
#[test]
fn fanout_durable_runs_the_service_on_a_data_dir() {
    let data = tempfile::tempdir().unwrap();
    let report = run(
        &["fanout", "--subscribers", "3", "--durable", "--no-baseline"],
        &[
            "--customers",
            "50",
            "--rate",
            "50",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let missing = row_of(&report, "deliveries missing").unwrap();
    assert_eq!(missing["ours"][0].as_f64(), Some(0.0), "{missing}");
    let written: Vec<_> = std::fs::read_dir(data.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(
        written.iter().any(|name| name == "STORE_ID"),
        "no store in the data dir: {written:?}"
    );
}

#[test]
fn scale_measures_idle_streams_and_the_busy_ones_beside_them() {
    let report = run(
        &[
            "scale",
            "--idle",
            "20",
            "--active",
            "2",
            "--streams-per-connection",
            "5",
        ],
        &["--customers", "50", "--rate", "50"],
    );
    let value = |metric: &str| {
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["metric"] == metric)
            .unwrap_or_else(|| panic!("no row {metric}: {report}"))["ours"][0]
            .as_f64()
            .unwrap()
    };
    assert!(value("service RSS growth per idle watch stream") >= 0.0);
    assert!(value("unfiltered streams' delivery p99 (answer -> receipt)") >= 0.0);
    assert_eq!(
        value("deliveries missing"),
        0.0,
        "every change reaches every unfiltered stream"
    );
}

#[test]
fn memory_and_recovery_measure_a_spawned_service() {
    let report = run(&["memory"], &["--customers", "300"]);
    assert!(metrics(&report)[0].starts_with("RSS growth per profile"));
    let report = run(&["recovery"], &["--customers", "300"]);
    assert!(
        metrics(&report)
            .iter()
            .any(|m| m.starts_with("spawn -> listening"))
    );
}

#[test]
fn cluster_compares_replicas_with_the_single_node_and_the_noop_replicas_and_measures_the_lag() {
    let report = run(&["cluster"], &["--customers", "50", "--rate", "50"]);
    assert!(
        metrics(&report)
            .iter()
            .any(|m| m.starts_with("ingest req/s through 3 replicas"))
    );
    // The no-op replicas took the same webhooks (every one answered 2xx, or the run fails).
    let noop = "ingest req/s through 3 no-op replicas (HTTP, validate, publish, follow)";
    assert!(ratio_of(&report, noop).is_some_and(|ratio| ratio > 0.0));
    assert!(ratio_of(&report, "ingest req/s, replicas vs no-op replicas").is_some());
    assert!(
        metrics(&report)
            .iter()
            .any(|m| m.starts_with("replication lag p99"))
    );
    assert!(
        metrics(&report)
            .iter()
            .any(|m| m.starts_with("stream alone, 3 publishers x 1 updates per message"))
    );
}
