//! The service's integration tests, one module per concern, in one test binary.
//!
//! Why one binary and not one per file (cargo's default): every file compiled on its own links
//! the whole service and `common` again, about 190 MB per binary, and the link steps were a large
//! part of CI's time. A new file in `tests/` must be declared below;
//! `every_test_file_is_declared` fails when one is not (cargo would silently skip it, as
//! `autotests = false` in Cargo.toml says). Run one concern with
//! `cargo test --test integration MODULE::` (e.g. `crash::`).

mod common;
// `fuzz/webhook_model.rs` (shared with the cargo-fuzz target) reaches the fixtures as
// `crate::fixtures`.
use common::fixtures;

mod admin_access;
mod backup;
mod cli;
mod cli_dead_letters;
mod corruption_sweep;
mod crash;
mod crash_pipeline;
mod dead_letters;
mod disk_full;
mod durability;
mod error_details;
mod grpc_coalescing;
mod grpc_coalescing_wire;
mod grpc_security;
mod grpc_tls;
mod jetstream;
mod journal_damage;
mod limits;
mod logs;
mod metrics;
mod nats_cluster;
mod operations;
mod profile_size;
mod queries;
mod reconcile;
mod reconcile_client;
mod replicas;
mod replicated_backup;
mod replicated_dead_letters;
mod replicated_schedule;
mod timestamps;
mod watch;
mod watch_fanout;
mod watch_history;
mod webhook;
mod webhook_fuzz;

/// Every `tests/*.rs` file is a module of this binary: cargo no longer finds them itself.
#[test]
fn every_test_file_is_declared() {
    let declared = include_str!("main.rs");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/ is readable") {
        let path = entry.expect("tests/ entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let is_rust = path.extension().is_some_and(|e| e == "rs");
        if is_rust && stem != "main" && !declared.contains(&format!("\nmod {stem};\n")) {
            missing.push(stem.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "tests/{{{}}}.rs not declared as `mod` in tests/main.rs: cargo would never run them",
        missing.join(",")
    );
}

/// A log line whose call site another thread reached first, with no subscriber of its own, is
/// still captured on this thread: tracing-core kept "not wanted" for the call site when this
/// capture was the one dispatcher registered, and a reconcile test lost its "waits" lines
/// whenever a sibling test ran the same schedule code first (`CapturedLogs::on_this_thread`).
#[test]
fn a_capture_sees_lines_whose_call_site_another_thread_reached_first() {
    fn line(n: u32) {
        tracing::info!(
            n,
            "a call site reached first on a thread with no subscriber"
        );
    }
    let (captured, _capturing) = common::CapturedLogs::on_this_thread(tracing::Level::INFO);
    std::thread::spawn(|| line(1)).join().unwrap();
    line(2);
    let text = captured.text();
    assert_eq!(
        text.matches("reached first").count(),
        1,
        "this thread's: {text}"
    );
}
