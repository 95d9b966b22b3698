//! gRPC guard rails over real sockets: bearer tokens, the watch stream cap, filter and
//! message size limits, per-call metrics, and start-up errors for bad files (TLS itself:
//! `grpc_tls`).

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::tls::{Pki, tls_config};
use common::{TestService, at, profile_updated};
use profile_state::pb;
use profile_state::pb::admin_service_client::AdminServiceClient;
use profile_state::{Config, Server};
use serde_json::json;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_types::StatusExt;

const TOKEN: &str = "s3cret-token-for-tests";

fn get(customer_id: &str) -> pb::GetProfileRequest {
    pb::GetProfileRequest {
        client_id: "2155".into(),
        customer_id: customer_id.into(),
        ..Default::default()
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A service requiring [`TOKEN`] (and another, to show several work).
async fn with_tokens(dir: &Path) -> TestService {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("# callers\n\n{TOKEN}\n  other-token  \n")).unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_auth_tokens_file = Some(tokens);
    TestService::start_with(config).await
}

/// The value of a Prometheus sample line starting `name{` with every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn data_services_need_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let service = with_tokens(dir.path()).await;
    service
        .update(&profile_updated("a", &at(1), json!({"total_points": 5})))
        .await;
    let mut client = service.client().await;

    let missing = client.get_profile(get("a")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(missing.message(), "missing bearer token");
    let wrong = client
        .get_profile(with_token(get("a"), "guess"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(wrong.message(), "invalid bearer token", "never the token");
    let profile = client
        .get_profile(with_token(get("a"), TOKEN))
        .await
        .expect("the right token")
        .into_inner();
    assert_eq!(profile.profile.unwrap().customer_id, "a");
    assert!(
        client
            .get_profile(with_token(get("a"), "other-token"))
            .await
            .is_ok(),
        "every token in the file works"
    );

    let watch = || pb::WatchProfilesRequest {
        send_initial_state: true,
        ..Default::default()
    };
    let missing = client.watch_profiles(watch()).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(missing.message(), "missing bearer token");
    let wrong = client
        .watch_profiles(with_token(watch(), "guess"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(wrong.message(), "invalid bearer token");
    let mut stream = client
        .watch_profiles(with_token(watch(), TOKEN))
        .await
        .expect("the right token")
        .into_inner();
    let first = stream.message().await.unwrap().expect("the initial state");
    assert!(first.event.is_some());
    drop(stream);

    let mut admin = AdminServiceClient::new(service.channel().await);
    let denied = admin
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        denied.code(),
        Code::Unauthenticated,
        "admin is protected too"
    );
    assert!(
        admin
            .list_dead_letters(with_token(pb::ListDeadLettersRequest::default(), TOKEN))
            .await
            .is_ok()
    );
    service.stop().await;
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let service = with_tokens(dir.path()).await;

    let mut health = HealthClient::new(service.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: "gameball.profiles.v1.ProfileService".into(),
        })
        .await
        .expect("health needs no token");
    assert_eq!(
        status.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let mut reflection = ServerReflectionClient::new(service.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection needs no token")
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"gameball.profiles.v1.ProfileService"),
        "{names:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn watch_streams_past_the_limit_are_refused_until_one_closes() {
    let mut config = Config::for_tests(common::SECRET);
    config.max_watch_streams = 2;
    let service = TestService::start_with(config).await;
    let mut client = service.client().await;
    let watch = pb::WatchProfilesRequest {
        send_initial_state: true,
        ..Default::default()
    };
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = client
            .watch_profiles(watch.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(stream.message().await.unwrap().is_some(), "synced");
        open.push(stream);
    }
    let refused = client.watch_profiles(watch.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // The flag to raise is named (found by a first-user review).
    assert!(
        refused.message().contains("(limit 2, --max-watch-streams)"),
        "{}",
        refused.message()
    );
    let open_streams = || async {
        let (_, text) = service.admin_get("/metrics").await;
        sample(&text, "profile_state_watch_streams", &[]).expect("the gauge is exported")
    };
    assert_eq!(open_streams().await, 2.0, "refused streams are not counted");

    // Dropping a stream resets it; the server drops its side when it reads the reset, and
    // the gauge goes down only after the slot is free. Wait for that signal, then open.
    drop(open.pop());
    tokio::time::timeout(Duration::from_secs(10), async {
        while open_streams().await != 1.0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the server notices the closed stream");
    let mut reopened = client
        .watch_profiles(watch.clone())
        .await
        .expect("the freed slot is available")
        .into_inner();
    assert!(reopened.message().await.unwrap().is_some());
    let refused = client.watch_profiles(watch).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "full again");
    drop(reopened);
    drop(open);
    service.stop().await;
}

#[tokio::test]
async fn watch_filters_are_capped() {
    let service = TestService::start().await;
    let mut client = service.client().await;
    let filter = |ids: usize, fields: usize| pb::WatchProfilesRequest {
        customer_ids: (0..ids).map(|i| format!("c{i}")).collect(),
        fields: (0..fields).map(|_| "tier_name".to_owned()).collect(),
        ..Default::default()
    };
    for (request, field) in [
        (filter(1001, 0), "customer_ids"),
        (filter(0, 101), "fields"),
    ] {
        let status = client.watch_profiles(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        let violations = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, field);
        assert!(status.message().contains(field), "{}", status.message());
    }
    // At the caps, the filter is accepted.
    let mut stream = client
        .watch_profiles(filter(1000, 100))
        .await
        .expect("1000 ids and 100 fields are allowed")
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    service.stop().await;
}

#[tokio::test]
async fn messages_larger_than_the_limit_are_refused_both_ways() {
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_max_message_bytes = 4096;
    let service = TestService::start_with(config).await;
    let mut client = service.client().await;

    // A request over the limit is refused before the handler sees it.
    let big = pb::BatchGetProfilesRequest {
        client_id: "2155".into(),
        customer_ids: (0..300).map(|i| format!("customer-{i:020}")).collect(),
        ..Default::default()
    };
    let status = client.batch_get_profiles(big).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // An answer over the limit is not sent either (ten profiles of ~600 bytes each): refused
    // by name before it is encoded.
    let ids: Vec<String> = (0..10).map(|i| format!("big-{i}")).collect();
    for id in &ids {
        let data = json!({"tier_name": "t".repeat(600)});
        service.update(&profile_updated(id, &at(1), data)).await;
    }
    let small = |ids: &[String]| pb::BatchGetProfilesRequest {
        client_id: "2155".into(),
        customer_ids: ids.to_vec(),
        ..Default::default()
    };
    assert!(client.batch_get_profiles(small(&ids[..2])).await.is_ok());
    let status = client.batch_get_profiles(small(&ids)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("customer_ids"), "{status:?}");

    // The metrics see the codes the caller saw.
    let (_, text) = service.admin_get("/metrics").await;
    let count = |code: &str| {
        sample(
            &text,
            "grpc_server_handled_total",
            &[("grpc_method", "BatchGetProfiles"), ("grpc_code", code)],
        )
    };
    assert_eq!(count("OUT_OF_RANGE"), Some(1.0), "{text}");
    assert_eq!(count("RESOURCE_EXHAUSTED"), Some(1.0), "{text}");
    assert_eq!(count("OK"), Some(1.0), "{text}");
    service.stop().await;
}

#[tokio::test]
async fn grpc_calls_are_counted_by_method_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let service = with_tokens(dir.path()).await;
    let mut client = service.client().await;
    assert!(client.get_profile(get("nobody")).await.is_err());
    let not_found = client
        .get_profile(with_token(get("nobody"), TOKEN))
        .await
        .unwrap_err();
    assert_eq!(not_found.code(), Code::NotFound);
    for _ in 0..2 {
        client
            .get_server_info(with_token(pb::GetServerInfoRequest {}, TOKEN))
            .await
            .unwrap();
    }
    let mut stream = client
        .watch_profiles(with_token(pb::WatchProfilesRequest::default(), TOKEN))
        .await
        .unwrap()
        .into_inner();
    let mut health = HealthClient::new(service.channel().await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    let (_, text) = service.admin_get("/metrics").await;
    let count = |method: &str, code: &str| {
        sample(
            &text,
            "grpc_server_handled_total",
            &[("grpc_method", method), ("grpc_code", code)],
        )
    };
    assert_eq!(count("GetProfile", "UNAUTHENTICATED"), Some(1.0), "{text}");
    assert_eq!(count("GetProfile", "NOT_FOUND"), Some(1.0), "{text}");
    assert_eq!(count("GetServerInfo", "OK"), Some(2.0), "{text}");
    let watch = [
        ("grpc_type", "server_stream"),
        ("grpc_service", "gameball.profiles.v1.ProfileService"),
        ("grpc_method", "WatchProfiles"),
    ];
    assert_eq!(
        sample(&text, "grpc_server_started_total", &watch),
        Some(1.0),
        "a stream counts as started when it starts: {text}"
    );
    assert_eq!(
        sample(&text, "grpc_server_handling_seconds_count", &watch),
        Some(0.0),
        "and as handled only when it ends: {text}"
    );
    assert!(
        !text.contains("grpc_method=\"Check\""),
        "health is not counted"
    );
    assert_eq!(
        sample(
            &text,
            "grpc_server_handling_seconds_count",
            &[("grpc_type", "unary"), ("grpc_method", "GetServerInfo")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "profile_state_watch_streams", &[]),
        Some(1.0),
        "{text}"
    );
    // Every message sent on the stream is counted.
    assert!(stream.message().await.unwrap().is_some());
    let (_, text) = service.admin_get("/metrics").await;
    assert!(
        sample(&text, "profile_state_watch_events_sent_total", &[]).unwrap() >= 1.0,
        "{text}"
    );
    drop(stream);
    service.stop().await;
}

/// Start-up fails with an error that names `file`.
async fn refuses_naming(config: Config, file: &str) {
    let error = Server::bind(config).await.err().expect("start-up refused");
    let error = format!("{error:#}");
    assert!(error.contains(file), "{file} not named in: {error}");
}

#[tokio::test]
async fn bad_security_files_stop_startup_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_auth_tokens_file = Some(dir.path().join("no-tokens-here"));
    refuses_naming(config, "no-tokens-here").await;

    std::fs::write(dir.path().join("empty-tokens"), "# nobody yet\n\n").unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_auth_tokens_file = Some(dir.path().join("empty-tokens"));
    refuses_naming(config, "empty-tokens").await;

    let pki = Pki::new();
    let good = tls_config(dir.path(), &pki, true);

    let mut config = good.clone();
    config.grpc_tls_cert = Some(dir.path().join("missing-cert.pem"));
    refuses_naming(config, "missing-cert.pem").await;

    std::fs::write(dir.path().join("garbage.key"), "not a key\n").unwrap();
    let mut config = good.clone();
    config.grpc_tls_key = Some(dir.path().join("garbage.key"));
    refuses_naming(config, "garbage.key").await;

    // A key that is not the certificate's: both files are valid PEM, rustls refuses the pair.
    let (_, other_key) = pki.issue("localhost");
    std::fs::write(dir.path().join("other.key"), other_key).unwrap();
    let mut config = good.clone();
    config.grpc_tls_key = Some(dir.path().join("other.key"));
    refuses_naming(config.clone(), "other.key").await;
    refuses_naming(
        config,
        "the private key (--grpc-tls-key) is not the key of the certificate",
    )
    .await;

    let mut config = good.clone();
    config.grpc_client_ca = Some(dir.path().join("missing-ca.pem"));
    refuses_naming(config, "missing-ca.pem").await;

    // And the good configuration starts.
    TestService::start_with(good).await.stop().await;
}
