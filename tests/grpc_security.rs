//! gRPC guard rails: bearer tokens, TLS and mTLS, stream and filter limits, message sizes, and
//! per-call metrics.

mod common;

use std::path::Path;

use common::TestService;
use profile_state::pb;
use profile_state::pb::admin_service_client::AdminServiceClient;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use profile_state::{Config, Server};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;

fn get(customer_id: &str) -> pb::GetProfileRequest {
    pb::GetProfileRequest {
        client_id: "2155".into(),
        customer_id: customer_id.into(),
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn data_services_need_a_token_while_health_and_reflection_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# services\nsecret-token\n").unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_auth_tokens_file = Some(tokens);
    let service = TestService::start_with(config).await;
    let mut client = service.client().await;

    let missing = client.get_profile(get("a")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(missing.message(), "missing bearer token");
    let wrong = client
        .get_profile(with_token(get("a"), "guess"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(!wrong.message().contains("guess"));
    let right = client
        .get_profile(with_token(get("a"), "secret-token"))
        .await
        .unwrap_err();
    assert_eq!(
        right.code(),
        Code::NotFound,
        "authenticated, then not found"
    );
    let watch = client
        .watch_profiles(pb::WatchProfilesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::Unauthenticated);
    let mut admin = AdminServiceClient::new(service.channel().await);
    let admin_call = admin
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        admin_call.code(),
        Code::Unauthenticated,
        "admin is protected too"
    );

    let mut health = HealthClient::new(service.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: "gameball.profiles.v1.ProfileService".into(),
        })
        .await
        .expect("health needs no token");
    assert_eq!(status.into_inner().status, 1);
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
    assert!(answers.message().await.unwrap().is_some());
    service.stop().await;
}

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki { ca }
    }

    /// A certificate for `name` signed by the CA: (certificate PEM, key PEM).
    fn issue(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }
}

fn tls_config(dir: &Path, pki: &Pki, mutual: bool) -> Config {
    let (cert, key) = pki.issue("localhost");
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    std::fs::write(dir.join("ca.pem"), pki.ca_pem()).unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_tls_cert = Some(dir.join("server.pem"));
    config.grpc_tls_key = Some(dir.join("server.key"));
    if mutual {
        config.grpc_client_ca = Some(dir.join("ca.pem"));
    }
    config
}

async fn tls_channel(
    service: &TestService,
    pki: &Pki,
    identity: Option<Identity>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Channel::from_shared(format!("https://{}", service.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

async fn server_info(channel: Channel) -> Result<pb::GetServerInfoResponse, tonic::Status> {
    ProfileServiceClient::new(channel)
        .get_server_info(pb::GetServerInfoRequest {})
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn tls_serves_trusting_clients_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let service = TestService::start_with(tls_config(dir.path(), &pki, false)).await;
    let channel = tls_channel(&service, &pki, None)
        .await
        .expect("TLS handshake");
    assert!(server_info(channel).await.is_ok());

    let plaintext = Channel::from_shared(format!("http://{}", service.grpc))
        .unwrap()
        .connect()
        .await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(channel) => server_info(channel).await.is_err(),
    };
    assert!(refused, "a plaintext client must not get an answer");
    service.stop().await;
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let service = TestService::start_with(tls_config(dir.path(), &pki, true)).await;

    let anonymous = match tls_channel(&service, &pki, None).await {
        Err(_) => true,
        Ok(channel) => server_info(channel).await.is_err(),
    };
    assert!(anonymous, "no client certificate, no answer");

    let (cert, key) = pki.issue("checkout-service");
    let channel = tls_channel(&service, &pki, Some(Identity::from_pem(cert, key)))
        .await
        .expect("mTLS handshake");
    assert!(server_info(channel).await.is_ok());
    service.stop().await;
}

#[tokio::test]
async fn watch_streams_past_the_limit_are_refused_until_one_closes() {
    let mut config = Config::for_tests(common::SECRET);
    config.max_watch_streams = 2;
    let service = TestService::start_with(config).await;
    let mut client = service.client().await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = client
            .watch_profiles(pb::WatchProfilesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(stream.message().await.unwrap().is_some());
        open.push(stream);
    }
    let refused = client
        .watch_profiles(pb::WatchProfilesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("limit 2"),
        "{}",
        refused.message()
    );

    // Closing a stream frees its slot once the server sees the reset; wait for that.
    drop(open.pop());
    let reopened = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match client
                .watch_profiles(pb::WatchProfilesRequest::default())
                .await
            {
                Ok(stream) => return stream,
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the slot is freed");
    drop(reopened);
    service.stop().await;
}

#[tokio::test]
async fn watch_filters_and_messages_have_size_limits() {
    use tonic_types::StatusExt;
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_max_message_bytes = 4096;
    let service = TestService::start_with(config).await;
    let mut client = service.client().await;
    let too_many = |ids: usize, fields: usize| pb::WatchProfilesRequest {
        customer_ids: (0..ids).map(|i| format!("c{i}")).collect(),
        fields: (0..fields).map(|_| "tier_name".to_owned()).collect(),
        ..Default::default()
    };
    let status = client.watch_profiles(too_many(0, 101)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "fields"
    );
    let big = pb::BatchGetProfilesRequest {
        client_id: "2155".into(),
        customer_ids: (0..300).map(|i| format!("customer-{i:020}")).collect(),
    };
    let status = client.batch_get_profiles(big).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    service.stop().await;

    // 1001 ids make a message larger than 4 KiB: ask a service with the default size limit.
    let service = TestService::start().await;
    let mut client = service.client().await;
    let status = client.watch_profiles(too_many(1001, 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "customer_ids"
    );
    service.stop().await;
}

#[tokio::test]
async fn bad_security_files_stop_startup_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(common::SECRET);
    config.grpc_auth_tokens_file = Some(dir.path().join("no-tokens-here"));
    let error = Server::bind(config).await.err().expect("refused");
    assert!(format!("{error:#}").contains("no-tokens-here"), "{error:#}");

    let mut config = Config::for_tests(common::SECRET);
    config.grpc_tls_cert = Some(dir.path().join("missing-cert.pem"));
    config.grpc_tls_key = Some(dir.path().join("missing-key.pem"));
    let error = Server::bind(config).await.err().expect("refused");
    assert!(
        format!("{error:#}").contains("missing-cert.pem"),
        "{error:#}"
    );
}

#[tokio::test]
async fn grpc_calls_are_counted_by_method_and_code() {
    let service = TestService::start().await;
    let mut client = service.client().await;
    assert!(client.get_profile(get("nobody")).await.is_err());
    assert!(
        client
            .get_server_info(pb::GetServerInfoRequest {})
            .await
            .is_ok()
    );
    let (_, text) = service.admin_get("/metrics").await;
    let value = |method: &str, code: &str| -> Option<f64> {
        text.lines()
            .filter(|line| line.starts_with("profile_state_grpc_requests_total{"))
            .find(|line| {
                line.contains(&format!("method=\"{method}\""))
                    && line.contains(&format!("code=\"{code}\""))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    };
    assert_eq!(value("GetProfile", "NotFound"), Some(1.0), "{text}");
    assert_eq!(value("GetServerInfo", "Ok"), Some(1.0), "{text}");
    service.stop().await;
}
