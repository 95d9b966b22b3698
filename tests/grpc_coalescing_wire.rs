//! The gRPC write coalescing (`src/server/coalesce.rs`) on the wire, from an adversarial review:
//! bytes held for the worker's turn reach the client without anything else happening on the
//! connection: PING acks, keepalive, unary answers (plain and TLS), changes to many watchers of
//! one connection, answers through a tiny flow-control window, bulk initial state over TLS,
//! heartbeats, and answers during shutdown.

use crate::common;

use std::time::{Duration, Instant};

use common::tls::{Pki, tls_channel, tls_config, tls_connect};
use common::{TestService, server_info};
use profile_state::pb::profile_service_client::ProfileServiceClient;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const ACK: u8 = 1;

/// How long anything may take before it counts as stuck.
const STUCK: Duration = Duration::from_secs(2);

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

async fn read_frame<S: AsyncRead + Unpin>(io: &mut S) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.expect("a frame header");
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    io.read_exact(&mut payload).await.expect("a frame payload");
    (head[3], head[4], stream, payload)
}

/// Sends the client preface and empty SETTINGS, acks the server's SETTINGS.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    io.write_all(&hello).await.unwrap();
    io.flush().await.unwrap();
    loop {
        let (kind, flags, _, _) = tokio::time::timeout(STUCK, read_frame(io))
            .await
            .expect("the server's SETTINGS arrive");
        if kind == SETTINGS && flags & ACK == 0 {
            io.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
            io.flush().await.unwrap();
            return;
        }
    }
}

/// Sends a PING and waits for its ACK, answering the server's own pings; the round trip.
async fn ping_rtt<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, n: u64) -> Duration {
    let started = Instant::now();
    io.write_all(&frame(PING, 0, 0, &n.to_be_bytes()))
        .await
        .unwrap();
    io.flush().await.unwrap();
    loop {
        let (kind, flags, _, payload) = read_frame(io).await;
        match (kind, flags & ACK) {
            (PING, ACK) if payload == n.to_be_bytes() => return started.elapsed(),
            (PING, 0) => {
                io.write_all(&frame(PING, ACK, 0, &payload)).await.unwrap();
                io.flush().await.unwrap();
            }
            (GOAWAY, _) => panic!("GOAWAY while waiting for a ping ack: {payload:?}"),
            _ => {}
        }
    }
}

async fn pings_on_an_idle_connection<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    handshake(io).await;
    let mut rtts = Vec::new();
    for n in 0..30 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let rtt = tokio::time::timeout(STUCK, ping_rtt(io, n))
            .await
            .unwrap_or_else(|_| panic!("ping {n} never acked; earlier: {rtts:?}"));
        rtts.push(rtt);
    }
    eprintln!("ping rtts: max {:?}", rtts.iter().max());
}

/// A service on plain TCP, a raw connection to it, and the pings; the runtime is the caller's.
async fn ping_acks_over_plain_tcp() {
    let service = TestService::start().await;
    let mut tcp = TcpStream::connect(service.grpc).await.unwrap();
    pings_on_an_idle_connection(&mut tcp).await;
    drop(tcp);
    service.stop().await;
}

#[tokio::test]
async fn ping_acks_reach_an_idle_client() {
    ping_acks_over_plain_tcp().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_acks_reach_an_idle_client_multi_thread() {
    ping_acks_over_plain_tcp().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_acks_reach_an_idle_client_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let service = TestService::start_with(tls_config(dir.path(), &pki, false)).await;
    let mut tls = tls_connect(service.grpc, &pki).await;
    pings_on_an_idle_connection(&mut tls).await;
    drop(tls);
    service.stop().await;
}

/// The server's keepalive pings go out on an idle connection, and one answered keeps it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keepalive_pings_an_idle_client_and_keeps_it() {
    let mut config = profile_state::Config::for_tests(common::SECRET);
    config.grpc_keepalive_interval = Duration::from_millis(100);
    config.grpc_keepalive_timeout = Duration::from_millis(300);
    let service = TestService::start_with(config).await;
    let mut tcp = TcpStream::connect(service.grpc).await.unwrap();
    handshake(&mut tcp).await;
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let (kind, flags, _, payload) = tokio::time::timeout(STUCK, read_frame(&mut tcp))
            .await
            .unwrap_or_else(|_| panic!("no keepalive ping for {STUCK:?} after {pings}"));
        match (kind, flags & ACK) {
            (PING, 0) => {
                pings += 1;
                tcp.write_all(&frame(PING, ACK, 0, &payload)).await.unwrap();
            }
            (GOAWAY, _) => panic!("GOAWAY after {pings} answered pings: {payload:?}"),
            _ => {}
        }
    }
    assert!(pings >= 5, "{pings} keepalive pings in 3 s");
    drop(tcp);
    service.stop().await;
}

async fn unary_latencies(
    client: &mut ProfileServiceClient<tonic::transport::Channel>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for n in 0..200 {
        let started = Instant::now();
        tokio::time::timeout(STUCK, server_info(client))
            .await
            .unwrap_or_else(|_| panic!("call {n} stuck"))
            .expect("GetServerInfo answers");
        latencies.push(started.elapsed());
        if n % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    latencies.sort();
    eprintln!(
        "unary: p50 {:?} p99 {:?} max {:?}",
        latencies[100], latencies[198], latencies[199]
    );
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_on_an_idle_server_answer_at_once() {
    let service = TestService::start().await;
    let mut client = service.client().await;
    unary_latencies(&mut client).await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_over_tls_answer_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let service = TestService::start_with(tls_config(dir.path(), &pki, false)).await;
    let mut client =
        ProfileServiceClient::new(tls_channel(service.grpc, &pki, None).await.unwrap());
    unary_latencies(&mut client).await;
    service.stop().await;
}

/// Posts change `n` of `customer` and waits for it on every stream; stuck past [`STUCK`] fails.
async fn change_reaches_every_watcher(
    service: &TestService,
    streams: &mut [tonic::Streaming<profile_state::pb::WatchProfilesResponse>],
    customer: &str,
    n: u32,
) {
    use profile_state::pb::watch_profiles_response::Event;
    service
        .update(&common::profile_updated(
            customer,
            &common::at(n),
            serde_json::json!({"total_points": n}),
        ))
        .await;
    for (i, stream) in streams.iter_mut().enumerate() {
        let message = tokio::time::timeout(STUCK, stream.message())
            .await
            .unwrap_or_else(|_| panic!("change {n} stuck for watcher {i}"))
            .unwrap()
            .unwrap();
        assert!(
            matches!(message.event, Some(Event::Change(_))),
            "{message:?}"
        );
    }
}

/// The case the change was made for: one change wakes every watch stream of a connection.
/// Every watcher must get every change, each without waiting for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_reaches_every_watcher_of_one_connection_on_its_own() {
    use pb::watch_profiles_response::Event;
    use profile_state::pb;
    let service = TestService::start().await;
    let channel = service.channel().await;
    let mut streams = Vec::new();
    for _ in 0..100 {
        let mut stream = ProfileServiceClient::new(channel.clone())
            .watch_profiles(pb::WatchProfilesRequest::default())
            .await
            .expect("watch starts")
            .into_inner();
        let first = tokio::time::timeout(STUCK, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(first.event, Some(Event::Synced(_))));
        streams.push(stream);
    }
    let mut worst = Duration::ZERO;
    for n in 1..=20u32 {
        let started = Instant::now();
        change_reaches_every_watcher(&service, &mut streams, "a", n).await;
        worst = worst.max(started.elapsed());
    }
    eprintln!("worst delivery to 100 watchers: {worst:?}");
    drop(streams);
    service.stop().await;
}

/// Shutdown while connections are busy with unary calls: each call either answers or fails
/// as a call refused by a closing server; none hangs, and shutdown keeps its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_unary_traffic_loses_no_answer() {
    let service = TestService::start().await;
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let channel = service.channel().await;
        for _ in 0..8 {
            let mut client = ProfileServiceClient::new(channel.clone());
            callers.spawn(async move {
                let mut outcomes = (0usize, Vec::new());
                loop {
                    match tokio::time::timeout(Duration::from_secs(15), server_info(&mut client))
                        .await
                    {
                        Err(_) => {
                            outcomes.1.push("stuck".to_owned());
                            return outcomes;
                        }
                        Ok(Ok(_)) => outcomes.0 += 1,
                        Ok(Err(status)) => {
                            outcomes
                                .1
                                .push(format!("{:?}: {}", status.code(), status.message()));
                            return outcomes;
                        }
                    }
                }
            });
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    service.stop().await;
    eprintln!("stopped in {:?}", started.elapsed());
    let mut answered = 0;
    let mut errors = Vec::new();
    while let Some(outcome) = callers.join_next().await {
        let (ok, errs) = outcome.unwrap();
        answered += ok;
        errors.extend(errs);
    }
    eprintln!("answered {answered}; errors: {errors:#?}");
    assert!(!errors.iter().any(|e| e == "stuck"), "{errors:#?}");
}

/// A client with a tiny flow-control window: every few hundred bytes of the answer wait for
/// its WINDOW_UPDATE, and each DATA frame that follows is held for the turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_through_a_tiny_window_flow() {
    let service = std::sync::Arc::new(TestService::start().await);
    let mut posters = tokio::task::JoinSet::new();
    for share in 0..8usize {
        let service = service.clone();
        posters.spawn(async move {
            for n in (share..400).step_by(8) {
                let body = common::profile_updated(
                    &format!("c{n:04}"),
                    &common::at(1),
                    serde_json::json!({"tier_name": "gold", "total_points": n}),
                );
                service.update(&body).await;
            }
        });
    }
    posters.join_all().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.grpc))
        .unwrap()
        .initial_stream_window_size(Some(256))
        .initial_connection_window_size(Some(256))
        .connect()
        .await
        .unwrap();
    let mut client = ProfileServiceClient::new(channel);
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(first_page_of_2155(&mut client).await.len(), 400);
    }
    eprintln!(
        "5 pages of 400 through a 256-byte window: {:?}",
        started.elapsed()
    );
    drop(client);
    std::sync::Arc::into_inner(service).unwrap().stop().await;
}

/// The first page (up to 1000) of account 2155's profiles, which must come within 20 s however
/// small the client's flow-control window.
async fn first_page_of_2155(
    client: &mut ProfileServiceClient<tonic::transport::Channel>,
) -> Vec<profile_state::pb::Profile> {
    let request = profile_state::pb::ListProfilesRequest {
        client_id: "2155".into(),
        page_size: 1000,
        ..Default::default()
    };
    tokio::time::timeout(Duration::from_secs(20), client.list_profiles(request))
        .await
        .expect("not stuck")
        .expect("ListProfiles answers")
        .into_inner()
        .profiles
}

async fn seed(service: &std::sync::Arc<TestService>, count: usize) {
    let mut posters = tokio::task::JoinSet::new();
    for share in 0..8usize {
        let service = service.clone();
        posters.spawn(async move {
            for n in (share..count).step_by(8) {
                let body = common::profile_updated(
                    &format!("c{n:04}"),
                    &common::at(1),
                    serde_json::json!({"tier_name": "gold", "total_points": n, "first_name": "x".repeat(200)}),
                );
                service.update(&body).await;
            }
        });
    }
    posters.join_all().await;
}

/// Over TLS, 40 watchers of one connection each get the whole initial state (hundreds of
/// kilobytes in all, past HOLD_AT_MOST many times over) and every change after it; then a
/// tiny-window ListProfiles on the same kind of connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_bulk_initial_state_to_many_watchers_arrives_whole() {
    use pb::watch_profiles_response::Event;
    use profile_state::pb;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let service =
        std::sync::Arc::new(TestService::start_with(tls_config(dir.path(), &pki, false)).await);
    seed(&service, 300).await;
    let channel = tls_channel(service.grpc, &pki, None).await.unwrap();
    let mut watchers = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let mut client = ProfileServiceClient::new(channel.clone());
        watchers.spawn(async move {
            let mut stream = client
                .watch_profiles(pb::WatchProfilesRequest {
                    client_id: "2155".into(),
                    send_initial_state: true,
                    ..Default::default()
                })
                .await
                .expect("watch starts")
                .into_inner();
            let mut initial = 0;
            loop {
                let message = tokio::time::timeout(Duration::from_secs(20), stream.message())
                    .await
                    .expect("initial state not stuck")
                    .unwrap()
                    .unwrap();
                match message.event.unwrap() {
                    Event::Change(_) => initial += 1,
                    Event::Synced(_) => break,
                    other => panic!("{other:?}"),
                }
            }
            (initial, stream)
        });
    }
    let mut streams = Vec::new();
    for (initial, stream) in watchers.join_all().await {
        assert_eq!(initial, 300);
        streams.push(stream);
    }
    for n in 2..=6u32 {
        change_reaches_every_watcher(&service, &mut streams, "c0001", n).await;
    }
    drop(streams);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    let tiny = tonic::transport::Endpoint::from_shared(format!("https://{}", service.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .initial_stream_window_size(Some(300))
        .initial_connection_window_size(Some(300))
        .connect()
        .await
        .unwrap();
    let mut client = ProfileServiceClient::new(tiny);
    assert_eq!(first_page_of_2155(&mut client).await.len(), 300);
    drop(channel);
    std::sync::Arc::into_inner(service).unwrap().stop().await;
}

/// Heartbeats on an otherwise idle watch: each arrives on its own, about a second apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_an_idle_watch_arrive_on_their_own() {
    use pb::watch_profiles_response::Event;
    use profile_state::pb;
    let service = TestService::start().await;
    let mut stream = service
        .client()
        .await
        .watch_profiles(pb::WatchProfilesRequest {
            progress_interval_seconds: 1,
            ..Default::default()
        })
        .await
        .expect("watch starts")
        .into_inner();
    let mut last = Instant::now();
    let mut gaps = Vec::new();
    let mut progress = 0;
    while progress < 4 {
        let message = tokio::time::timeout(Duration::from_millis(2500), stream.message())
            .await
            .unwrap_or_else(|_| panic!("no heartbeat within 2.5 s; gaps so far {gaps:?}"))
            .unwrap()
            .unwrap();
        if let Some(Event::Progress(_)) = message.event {
            progress += 1;
            gaps.push(last.elapsed());
            last = Instant::now();
        }
    }
    eprintln!("heartbeat gaps: {gaps:?}");
    drop(stream);
    service.stop().await;
}
