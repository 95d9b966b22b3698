//! `/metrics` as a platform team's Prometheus sees it: the README's metric table is exactly what
//! is exported, every labelled series exists at zero from the first scrape, the gRPC metrics
//! follow go-grpc-prometheus's names and semantics (a stream counts as handled when it ends,
//! with its code), and the gauges mirror readiness and the dead letters.

use crate::common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::{TestService, at, metric, profile_updated};
use profile_state::metrics::{VERSION, WATCH_RESET_REASONS, WEBHOOK_ANSWERS};
use profile_state::pb;
use profile_state::pb::admin_service_client::AdminServiceClient;
use profile_state::{Config, Server};
use prost::Message as _;
use serde_json::json;
use tonic::Code;

/// The metric families a scrape declares (`# TYPE name kind`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// Every metric name in the README's table (the backticked names of its first column).
fn readme_metrics() -> BTreeSet<String> {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("README has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .flat_map(|line| {
            let first_column = line.split('|').nth(1).unwrap_or_default();
            first_column
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `(grpc_type, service, method)` of every RPC of the proto package, from the descriptors.
fn rpcs() -> Vec<(&'static str, String, String)> {
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let mut rpcs = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                let kind = if method.server_streaming() {
                    "server_stream"
                } else {
                    "unary"
                };
                let service = format!("{}.{}", file.package(), service.name());
                rpcs.push((kind, service, method.name().to_owned()));
            }
        }
    }
    rpcs
}

const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

#[tokio::test]
async fn the_first_scrape_has_every_series_of_the_readme_at_zero() {
    let service = TestService::start().await;
    let (status, text) = service.admin_get("/metrics").await;
    assert_eq!(status, 200);

    // The README's table and the export are the same set of metrics: nothing undocumented,
    // nothing documented that is missing (the renamed gRPC series included). The gauges of
    // `--reconcile-every` have a series per schedule, so none without one
    // (`tests/reconcile.rs` reads them with a schedule).
    let per_schedule = [
        "profile_state_reconcile_schedule_started_timestamp_seconds",
        "profile_state_reconcile_schedule_last_success_timestamp_seconds",
        "profile_state_reconcile_schedule_period_seconds",
    ];
    let mut exported = families(&text);
    assert!(per_schedule.iter().all(|name| !exported.contains(*name)));
    exported.extend(per_schedule.map(str::to_owned));
    assert_eq!(exported, readme_metrics(), "{text}");
    assert!(
        !text.contains("profile_state_grpc_"),
        "old gRPC names are gone"
    );

    let build = [("version", VERSION), ("revision", "unknown")];
    assert_eq!(metric(&text, "profile_state_build_info", &build), Some(1.0));
    assert_eq!(metric(&text, "profile_state_ready", &[]), Some(1.0));
    assert_eq!(metric(&text, "profile_state_dead_letters", &[]), Some(0.0));
    for (outcome, status) in WEBHOOK_ANSWERS {
        let labels = [("outcome", *outcome), ("status", &status.to_string())];
        let series = metric(&text, "profile_state_webhooks_total", &labels);
        assert_eq!(series, Some(0.0), "{outcome} {status}");
        let duration = [("status", &*status.to_string()), ("le", "+Inf")];
        let series = metric(
            &text,
            "profile_state_webhook_duration_seconds_bucket",
            &duration,
        );
        assert_eq!(series, Some(0.0), "{status}");
    }
    for reason in WATCH_RESET_REASONS {
        let series = metric(
            &text,
            "profile_state_watch_resets_total",
            &[("reason", reason)],
        );
        assert_eq!(series, Some(0.0), "{reason}");
    }
    let rpcs = rpcs();
    assert!(rpcs.len() >= 9, "both services' RPCs: {rpcs:?}");
    for (kind, service, method) in &rpcs {
        let labels = [
            ("grpc_type", *kind),
            ("grpc_service", service),
            ("grpc_method", method),
        ];
        let started = metric(&text, "grpc_server_started_total", &labels);
        assert_eq!(started, Some(0.0), "{method}");
        let handling = metric(&text, "grpc_server_handling_seconds_count", &labels);
        assert_eq!(handling, Some(0.0), "{method}");
        for code in CODES {
            let labels = [labels[0], labels[1], labels[2], ("grpc_code", code)];
            let handled = metric(&text, "grpc_server_handled_total", &labels);
            assert_eq!(handled, Some(0.0), "{method} {code}");
        }
    }

    // The process, read from /proc.
    for gauge in ["process_resident_memory_bytes", "process_open_fds"] {
        let value = metric(&text, gauge, &[]).unwrap_or_else(|| panic!("{gauge}"));
        assert!(value > 0.0, "{gauge} = {value}");
    }
    let started = metric(&text, "process_start_time_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now - 3600.0 && started <= now + 1.0,
        "started {started}, now {now}"
    );
    service.stop().await;
}

#[tokio::test]
async fn a_watch_stream_counts_as_handled_when_it_ends_with_its_code_and_lifetime() {
    let service = TestService::start().await;
    let mut client = service.client().await;
    let watch = |method: &'static str| {
        [
            ("grpc_type", "server_stream"),
            ("grpc_service", "gameball.profiles.v1.ProfileService"),
            ("grpc_method", method),
        ]
    };
    let handled = |text: &str, code: &str| {
        let [kind, service, method] = watch("WatchProfiles");
        metric(
            text,
            "grpc_server_handled_total",
            &[kind, service, method, ("grpc_code", code)],
        )
        .unwrap()
    };

    // Refused before it starts: the status comes in the headers.
    let future = pb::WatchProfilesRequest {
        start_revision: 1_000,
        ..Default::default()
    };
    let refused = client.watch_profiles(future).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange);

    // Open: started, not handled. A progress message every second keeps it busy.
    let request = pb::WatchProfilesRequest {
        progress_interval_seconds: 1,
        ..Default::default()
    };
    let mut stream = client.watch_profiles(request).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("synced");
    let opened = Instant::now();
    stream.message().await.unwrap().expect("a progress message");
    let (_, text) = service.admin_get("/metrics").await;
    let started = metric(&text, "grpc_server_started_total", &watch("WatchProfiles"));
    assert_eq!(started, Some(2.0), "{text}");
    assert_eq!(handled(&text, "OUT_OF_RANGE"), 1.0, "{text}");
    assert_eq!(handled(&text, "CANCELLED"), 0.0, "{text}");

    // The client goes away: CANCELLED, with the stream's whole life as its duration.
    drop(stream);
    let held = opened.elapsed().as_secs_f64();
    let text = service
        .metrics_until(|text| handled(text, "CANCELLED") == 1.0)
        .await;
    assert_eq!(handled(&text, "OK"), 0.0, "{text}");
    let seconds = metric(
        &text,
        "grpc_server_handling_seconds_sum",
        &watch("WatchProfiles"),
    )
    .unwrap();
    assert!(
        seconds >= held,
        "stream measured {seconds} s, held {held} s"
    );
    service.stop().await;
}

#[tokio::test]
async fn readiness_and_dead_letter_gauges_follow_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.ephemeral = false;
    config.data_dir = dir.path().to_owned();
    let server = Server::bind(config).await.unwrap();
    let faults = server.journal_faults();
    let service = TestService::serve(server);

    // A signed body that cannot be applied is kept; purging it empties the gauge again.
    let bad = profile_updated("a", &at(1), json!({"tier_order": "two"}));
    assert_eq!(service.post(&bad).await.0, 422);
    let (_, text) = service.admin_get("/metrics").await;
    assert_eq!(metric(&text, "profile_state_dead_letters", &[]), Some(1.0));
    let mut admin = AdminServiceClient::new(service.channel().await);
    let purge = pb::PurgeDeadLettersRequest {
        all: true,
        ..Default::default()
    };
    admin.purge_dead_letters(purge).await.unwrap();
    let (_, text) = service.admin_get("/metrics").await;
    assert_eq!(metric(&text, "profile_state_dead_letters", &[]), Some(0.0));
    assert_eq!(
        metric(&text, "profile_state_webhook_dead_letters_total", &[]),
        Some(1.0),
        "the counter keeps what was kept"
    );

    // The journal cannot be written: 503, and not ready, as /readyz says.
    faults.fail_writes(true);
    let update = profile_updated("a", &at(2), json!({"total_points": 1}));
    assert_eq!(service.post(&update).await.0, 503);
    let (_, text) = service.admin_get("/metrics").await;
    assert_eq!(metric(&text, "profile_state_ready", &[]), Some(0.0));
    assert_eq!(service.admin_get("/readyz").await.0, 503);
    let failures = metric(&text, "profile_state_journal_write_failures_total", &[]);
    assert!(failures >= Some(1.0), "{text}");
    let unavailable = [("outcome", "unavailable"), ("status", "503")];
    let refused = metric(&text, "profile_state_webhooks_total", &unavailable);
    assert_eq!(refused, Some(1.0), "{text}");

    // The disk recovers: ready again once the sequencer's probe write succeeds.
    faults.fail_writes(false);
    let text = service
        .metrics_until(|text| metric(text, "profile_state_ready", &[]) == Some(1.0))
        .await;
    assert_eq!(metric(&text, "profile_state_ready", &[]), Some(1.0));
    assert_eq!(service.admin_get("/readyz").await.0, 200);
    service.stop().await;
}
