//! gRPC over TLS and mTLS through the real listener: who may connect, WatchProfiles over it,
//! and the handshake deadline, which runs from the accept through the TLS handshake to the
//! end of the HTTP/2 preface (issue 10 item 7).

use crate::common;
use crate::watch::next;

use std::time::Duration;

use common::binary::Binary;
use common::tls::{Pki, tls_channel, tls_config, tls_connect};
use common::{TestService, at, profile_updated, server_info};
use profile_state::pb;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use profile_state::pb::watch_profiles_response::Event;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tonic::Streaming;
use tonic::transport::{Channel, Identity};

/// How long the tests wait for something the server should do.
const PATIENCE: Duration = Duration::from_secs(10);

/// Whether a connection attempt got no answer: refused at connect, or its first call failed.
async fn refused(channel: Result<Channel, tonic::transport::Error>) -> bool {
    match channel {
        Err(_) => true,
        Ok(channel) => server_info(&mut ProfileServiceClient::new(channel))
            .await
            .is_err(),
    }
}

/// Opens an unfiltered watch with the initial state and reads up to its `Synced`.
async fn watch_synced(channel: Channel) -> Streaming<pb::WatchProfilesResponse> {
    let request = pb::WatchProfilesRequest {
        client_id: "2155".into(),
        send_initial_state: true,
        ..Default::default()
    };
    let mut stream = ProfileServiceClient::new(channel)
        .watch_profiles(request)
        .await
        .expect("the watch starts")
        .into_inner();
    assert!(matches!(next(&mut stream).await, Event::Synced(_)));
    stream
}

/// Posts a webhook for `customer` and checks that `stream` delivers its change.
async fn delivers_a_change(
    service: &TestService,
    stream: &mut Streaming<pb::WatchProfilesResponse>,
    customer: &str,
) {
    let (status, answer) = service
        .post(&profile_updated(customer, &at(1), json!({})))
        .await;
    assert_eq!(status, 200, "{answer}");
    match next(stream).await {
        Event::Change(change) => assert_eq!(change.profile.unwrap().customer_id, customer),
        other => panic!("expected the change of {customer}, got {other:?}"),
    }
}

/// Reads what the server sends until it closes the connection (cleanly or not); fails after
/// [`PATIENCE`].
async fn until_closed(what: &str, stream: &mut (impl AsyncRead + Unpin)) {
    let mut received = Vec::new();
    match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut received)).await {
        // A TLS peer that closes without close_notify is an unexpected EOF; a reset is as good.
        Ok(_) => {}
        Err(_) => panic!(
            "{what}: still open after {PATIENCE:?} ({} bytes)",
            received.len()
        ),
    }
}

/// The value of the sample `series` (name and labels, as written) in `metrics`.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series}"))
}

#[tokio::test]
async fn tls_serves_trusting_clients_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let service = TestService::start_with(tls_config(dir.path(), &pki, false)).await;
    let channel = tls_channel(service.grpc, &pki, None)
        .await
        .expect("TLS handshake");
    assert!(
        server_info(&mut ProfileServiceClient::new(channel.clone()))
            .await
            .is_ok()
    );
    let mut stream = watch_synced(channel).await;
    delivers_a_change(&service, &mut stream, "over-tls").await;

    let plaintext = Channel::from_shared(format!("http://{}", service.grpc))
        .unwrap()
        .connect()
        .await;
    assert!(
        refused(plaintext).await,
        "a plaintext client gets no answer"
    );

    let stranger = Pki::new();
    assert!(
        refused(tls_channel(service.grpc, &stranger, None).await).await,
        "a client that does not trust the server's CA does not connect"
    );
    service.stop().await;
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let service = TestService::start_with(tls_config(dir.path(), &pki, true)).await;

    assert!(
        refused(tls_channel(service.grpc, &pki, None).await).await,
        "no client certificate, no answer"
    );
    let (cert, key) = Pki::new().issue("checkout-service");
    assert!(
        refused(tls_channel(service.grpc, &pki, Some(Identity::from_pem(cert, key))).await).await,
        "a certificate from another CA, no answer"
    );

    let (cert, key) = pki.issue("checkout-service");
    let channel = tls_channel(service.grpc, &pki, Some(Identity::from_pem(cert, key)))
        .await
        .expect("mTLS handshake");
    assert!(
        server_info(&mut ProfileServiceClient::new(channel.clone()))
            .await
            .is_ok()
    );
    let mut stream = watch_synced(channel).await;
    delivers_a_change(&service, &mut stream, "over-mtls").await;
    service.stop().await;
}

/// A client that stops after the TLS handshake, or inside it, or after part of the HTTP/2
/// preface, is closed by `--grpc-handshake-timeout` and counted, and at
/// `--max-grpc-connections` a new client closes the idlest of them to be served; a client that
/// sent its preface in time and has a call in progress is not cut. Before TLS was terminated in the listener, only tonic's TLS
/// handshake was timed: the first two clients here held their slots forever.
#[tokio::test]
async fn tls_clients_that_stall_before_the_http2_preface_are_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let mut config = tls_config(dir.path(), &pki, false);
    // Long enough that the checks of a full cap below finish before the first deadline, even
    // on a loaded machine.
    let timeout = Duration::from_secs(3);
    config.grpc_handshake_timeout = timeout;
    config.max_grpc_connections = 4;
    let service = TestService::start_with(config).await;

    // A real client first, watching: its connection must outlive the deadline.
    let channel = tls_channel(service.grpc, &pki, None)
        .await
        .expect("TLS handshake");
    let mut watching = watch_synced(channel).await;

    let mut silent = tls_connect(service.grpc, &pki).await;
    let mut partial = tls_connect(service.grpc, &pki).await;
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    partial.flush().await.unwrap();
    let mut no_handshake = tokio::net::TcpStream::connect(service.grpc).await.unwrap();
    // Every slot is taken: a new client closes the connection with no call in progress idle
    // the longest, the silent one, and is served (it was refused until a deadline passed);
    // the watcher's, with a call in progress, is never taken.
    let channel = tls_channel(service.grpc, &pki, None)
        .await
        .expect("room made for a new client");
    assert!(
        server_info(&mut ProfileServiceClient::new(channel))
            .await
            .is_ok()
    );
    until_closed("silent after the TLS handshake", &mut silent).await;
    until_closed("part of the preface", &mut partial).await;
    until_closed("no TLS handshake", &mut no_handshake).await;
    let (_, metrics) = service.admin_get("/metrics").await;
    let timed_out = |timeout: &str| {
        let series = format!(
            r#"profile_state_connections_timed_out_total{{listener="grpc",timeout="{timeout}"}}"#
        );
        sample(&metrics, &series)
    };
    assert_eq!(
        timed_out("handshake"),
        2.0,
        "the two stalled clients left, and not the watching one"
    );
    assert_eq!(
        timed_out("idle"),
        1.0,
        "the silent one, closed to make room"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"profile_state_connections_refused_total{listener="grpc"}"#
        ),
        0.0
    );

    // The slots are free again for real calls, and the watcher's connection was not cut.
    let channel = tls_channel(service.grpc, &pki, None)
        .await
        .expect("TLS handshake after the stalled clients were closed");
    assert!(
        server_info(&mut ProfileServiceClient::new(channel))
            .await
            .is_ok()
    );
    delivers_a_change(&service, &mut watching, "after-the-timeout").await;
    service.stop().await;
}

/// The arguments that serve `(certificate, key)` (PEM), written to files in `dir`.
fn serving(dir: &std::path::Path, (cert, key): (String, String)) -> Vec<String> {
    let (cert_file, key_file) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let path = |file: &std::path::Path| file.to_str().unwrap().to_owned();
    vec![
        "--grpc-tls-cert".into(),
        path(&cert_file),
        "--grpc-tls-key".into(),
        path(&key_file),
    ]
}

/// An expired served certificate started without a word, and handshakes the listener refused
/// left no trace in logs or metrics (found by an adversarial run): start-up warns of the
/// certificate and exports its expiry; a refused handshake is warned of and counted, and a
/// client gone mid-handshake (a TCP probe) counted without a warning.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_certificate_and_failed_handshakes_are_warned_of_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let args = serving(dir.path(), pki.issue_expired("localhost"));
    let data = dir.path().join("data");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Binary::start(&data, &args).await;
    let warning = server
        .wait_for(
            "the --grpc-tls-cert certificate expired at 2021-01-01T00:00:00+00:00: clients \
             refuse it; renew it and restart (certificates are read at start-up)",
        )
        .await;
    assert_eq!(warning["level"], "WARN", "{warning}");
    let metrics = |admin| async move {
        let url = format!("http://{admin}/metrics");
        reqwest::get(url).await.unwrap().text().await.unwrap()
    };
    let expiry = "profile_state_tls_certificate_expiry_timestamp_seconds";
    assert_eq!(
        sample(&metrics(server.admin).await, expiry),
        1_609_459_200.0
    );
    let valid_from = "profile_state_tls_certificate_valid_from_timestamp_seconds";
    assert_eq!(
        sample(&metrics(server.admin).await, valid_from),
        1_577_836_800.0
    );

    // Connected and gone (a TCP probe does that): counted as closed, and not warned of (had
    // it been, its warning would be the one found below, and hold back the refusal's).
    let refused_series = "profile_state_tls_handshakes_failed_total{reason=\"refused\"}";
    let closed_series = "profile_state_tls_handshakes_failed_total{reason=\"closed\"}";
    drop(tokio::net::TcpStream::connect(server.grpc).await.unwrap());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = metrics(server.admin).await;
        if sample(&now, closed_series) == 1.0 {
            assert_eq!(sample(&now, refused_series), 0.0, "{now}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not counted: {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A plaintext client: refused and warned of.
    let warning = "a TLS handshake on the gRPC listener failed; if this client should get \
                   through, check its CA and certificate against --grpc-tls-cert and \
                   --grpc-client-ca (profile_state_tls_handshakes_failed_total counts them)";
    let mut plaintext = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    plaintext
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    until_closed("the plaintext client", &mut plaintext).await;
    let failed = server.wait_for(warning).await;
    assert_eq!(failed["level"], "WARN", "{failed}");
    assert!(
        failed["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{failed}"
    );

    // A client that trusts the CA refuses the expired certificate: the server hears its alert,
    // and warns of it although it warned of another TLS error just now (one warning every 10 s
    // for all of them hid it: found by an adversarial run).
    assert!(refused(tls_channel(server.grpc, &pki, None).await).await);
    let failed = server.wait_for(warning).await;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("CertificateExpired"), "{failed}");
    let after = metrics(server.admin).await;
    assert!(sample(&after, refused_series) >= 1.0, "{after}");
    server.stop();
}

/// A served certificate not valid yet (deployed too early, or the clock behind) is refused by
/// every client: start-up warns of it, and its start is exported, so that an alert can say so
/// before the refusals do (the expiry gauge alone showed nothing wrong).
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_not_valid_yet_is_warned_of_and_its_start_exported() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let args = serving(dir.path(), pki.issue_not_yet_valid("localhost"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Binary::start(&dir.path().join("data"), &args).await;
    let warning = server
        .wait_for(
            "the --grpc-tls-cert certificate is not valid before 2099-01-01T00:00:00+00:00: \
             clients refuse it until then",
        )
        .await;
    assert_eq!(warning["level"], "WARN", "{warning}");
    let url = format!("http://{}/metrics", server.admin);
    let metrics = reqwest::get(url).await.unwrap().text().await.unwrap();
    let valid_from = "profile_state_tls_certificate_valid_from_timestamp_seconds";
    assert_eq!(sample(&metrics, valid_from), 4_070_908_800.0);
    let expiry = "profile_state_tls_certificate_expiry_timestamp_seconds";
    assert_eq!(sample(&metrics, expiry), 4_102_444_800.0);
    assert!(
        refused(tls_channel(server.grpc, &pki, None).await).await,
        "a client that trusts the CA refuses a certificate not valid yet"
    );
    server.stop();
}

/// Only the leaf's dates were read (found by an adversarial run): an expired intermediate in
/// the served chain, which every client refuses, and an expired client CA, which rustls still
/// trusts, started without a word. Both are warned of, and the gauge is the chain's first
/// expiry.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_intermediate_and_an_expired_client_ca_are_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, key) = Pki::new().issue_under_expired_intermediate("localhost", "old intermediate");
    let client_ca = Pki::expired_ca("old client CA");
    let files = [
        ("server.pem", chain),
        ("server.key", key),
        ("ca.pem", client_ca.ca_pem()),
    ];
    for (name, pem) in &files {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let args = [
        "--grpc-tls-cert",
        &cert,
        "--grpc-tls-key",
        &key,
        "--grpc-client-ca",
        &ca,
    ];
    let mut server = Binary::start(&dir.path().join("data"), &args).await;
    let intermediate = server
        .wait_for(
            "certificate 2 of the --grpc-tls-cert chain (CN=old intermediate) expired at \
             2021-01-01T00:00:00+00:00: clients refuse it; renew it and restart (certificates \
             are read at start-up)",
        )
        .await;
    assert_eq!(intermediate["level"], "WARN");
    let ca = server
        .wait_for(
            "the --grpc-client-ca certificate CN=old client CA expired at \
             2021-01-01T00:00:00+00:00, yet the TLS library trusts the client certificates it \
             signed (it does not check a CA's dates): remove it from the file and restart to \
             stop trusting them",
        )
        .await;
    assert_eq!(ca["level"], "WARN");
    let url = format!("http://{}/metrics", server.admin);
    let metrics = reqwest::get(url).await.unwrap().text().await.unwrap();
    let expiry = "profile_state_tls_certificate_expiry_timestamp_seconds";
    assert_eq!(
        sample(&metrics, expiry),
        1_609_459_200.0,
        "the intermediate's"
    );
    server.stop();
}
