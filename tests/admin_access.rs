//! Who may call AdminService, over real sockets from a loopback and a non-loopback address:
//! without credentials only clients on the server's machine; with tokens, the token; with
//! `--insecure-open-admin-service`, anyone. And the start-up line of the real binary states
//! TLS and authentication for each listener.

use crate::common;
use crate::common::binary;

use std::net::{IpAddr, SocketAddr};

use binary::{Binary, bare_command};
use common::TestService;
use profile_state::Config;
use profile_state::grpc::auth::ADMIN_LOOPBACK_ONLY;
use profile_state::pb;
use profile_state::pb::admin_service_client::AdminServiceClient;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use tonic::Code;
use tonic::transport::Channel;

/// An address of this machine that is not loopback: the source address the kernel would use
/// towards a TEST-NET address (a UDP "connect" sends nothing).
fn non_loopback_ip() -> IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .connect("192.0.2.200:9")
        .and_then(|()| socket.local_addr())
        .map(|address| address.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .expect("this test needs a non-loopback IPv4 address on this machine")
}

/// A service on all interfaces, with `adjust` applied to the test configuration.
async fn on_all_interfaces(adjust: impl FnOnce(&mut Config)) -> TestService {
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_listen = ([0, 0, 0, 0], 0).into();
    adjust(&mut config);
    TestService::start_with(config).await
}

async fn channel(ip: IpAddr, port: u16) -> Channel {
    Channel::from_shared(format!("http://{}", SocketAddr::new(ip, port)))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn list(token: Option<&str>) -> tonic::Request<pb::ListDeadLettersRequest> {
    let mut request = tonic::Request::new(pb::ListDeadLettersRequest::default());
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test]
async fn without_credentials_admin_service_answers_loopback_clients_only() {
    let service = on_all_interfaces(|_| {}).await;
    let port = service.grpc.port();
    let local = AdminServiceClient::new(channel([127, 0, 0, 1].into(), port).await)
        .list_dead_letters(list(None))
        .await;
    assert!(local.is_ok(), "{local:?}");
    let remote_channel = channel(non_loopback_ip(), port).await;
    let remote = AdminServiceClient::new(remote_channel.clone())
        .list_dead_letters(list(None))
        .await
        .unwrap_err();
    assert_eq!(remote.code(), Code::PermissionDenied);
    assert_eq!(remote.message(), ADMIN_LOOPBACK_ONLY);
    let purge = AdminServiceClient::new(remote_channel.clone())
        .purge_dead_letters(pb::PurgeDeadLettersRequest {
            all: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        purge.code(),
        Code::PermissionDenied,
        "destructive calls too"
    );
    // ProfileService stays as configured (open), as the start-up warning says.
    let info = ProfileServiceClient::new(remote_channel)
        .get_server_info(pb::GetServerInfoRequest {})
        .await;
    assert!(info.is_ok(), "{info:?}");
    service.stop().await;
}

#[tokio::test]
async fn the_explicit_flag_opens_admin_service_and_tokens_close_it_everywhere() {
    let open = on_all_interfaces(|config| config.insecure_open_admin_service = true).await;
    let remote = AdminServiceClient::new(channel(non_loopback_ip(), open.grpc.port()).await)
        .list_dead_letters(list(None))
        .await;
    assert!(remote.is_ok(), "{remote:?}");
    open.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "admin-token\n").unwrap();
    let closed = on_all_interfaces(|config| config.grpc_auth_tokens_file = Some(tokens)).await;
    for ip in [IpAddr::from([127, 0, 0, 1]), non_loopback_ip()] {
        let mut client = AdminServiceClient::new(channel(ip, closed.grpc.port()).await);
        let refused = client.list_dead_letters(list(None)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{ip}");
        let allowed = client.list_dead_letters(list(Some("admin-token"))).await;
        assert!(allowed.is_ok(), "{ip}: {allowed:?}");
    }
    closed.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_start_up_line_states_tls_and_authentication_per_listener() {
    let start = |args: &[&str]| {
        let mut command = bare_command(&["--log-format", "json"]);
        if !args.contains(&"--insecure-skip-signature") {
            command.args(["--webhook-secret", "s"]);
        }
        command.args(["--ephemeral", "--webhook-listen", "127.0.0.1:0"]);
        command.args(["--admin-listen", "127.0.0.1:0"]).args(args);
        Binary::spawn(command)
    };
    let mut open = start(&["--grpc-listen", "0.0.0.0:0"]).await;
    let line = open.seen.last().unwrap().clone();
    assert_eq!(line["message"], "profile-state listening");
    assert_eq!(line["webhook_auth"], "X-GB-Signature");
    assert_eq!(line["grpc_tls"], "off");
    assert_eq!(line["grpc_auth"], "off");
    assert_eq!(line["admin_service_auth"], "loopback clients only");
    assert_eq!(line["admin_tls"], "off");
    let warning = open.wait_for("gRPC is reachable from other machines without credentials: anyone who can connect reads every profile; set --grpc-auth-tokens-file (SECURITY.md)").await;
    assert_eq!(warning["level"], "WARN");
    open.stop();

    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "t\n").unwrap();
    let args = [
        "--grpc-listen",
        "127.0.0.1:0",
        "--grpc-auth-tokens-file",
        tokens.to_str().unwrap(),
        "--insecure-skip-signature",
    ];
    let closed = start(&args).await;
    let line = closed.seen.last().unwrap();
    assert_eq!(line["webhook_auth"], "off (--insecure-skip-signature)");
    assert_eq!(line["grpc_auth"], "bearer token");
    assert_eq!(line["admin_service_auth"], "bearer token");
    let lines = closed.stop_collecting();
    assert!(
        !lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("gRPC is reachable"))),
        "no warning on loopback with tokens"
    );
}
