//! TLS for tests: a throwaway certificate authority, a server configuration serving TLS (or
//! mTLS) with a certificate from it, and clients that trust it: tonic's, and a bare rustls
//! connection for clients that misbehave after the handshake.

use std::path::Path;
use std::sync::Arc;

use profile_state::Config;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A throwaway certificate authority.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki { ca }
    }

    /// A certificate for `name` signed by the CA: (certificate PEM, key PEM).
    pub fn issue(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A certificate for `name` signed by the CA that expired at the start of 2021.
    pub fn issue_expired(&self, name: &str) -> (String, String) {
        self.issue_dated(name, 2020, 2021)
    }

    /// A certificate for `name` signed by the CA, valid from the start of 2099 (deployed too
    /// early, or on a machine whose clock is behind).
    pub fn issue_not_yet_valid(&self, name: &str) -> (String, String) {
        self.issue_dated(name, 2099, 2100)
    }

    /// A certificate for `name` signed by the CA, valid from the start of year `from` to the
    /// start of year `until`.
    fn issue_dated(&self, name: &str, from: i32, until: i32) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A CA named `name` whose dates ended at the start of 2021.
    pub fn expired_ca(name: &str) -> Pki {
        let params = expired_ca_params(name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki { ca }
    }

    /// A valid certificate for `name` signed by an intermediate CA named `intermediate` that
    /// expired at the start of 2021 (signed by this CA): (the chain's PEM, leaf first; key PEM).
    pub fn issue_under_expired_intermediate(
        &self,
        name: &str,
        intermediate: &str,
    ) -> (String, String) {
        let params = expired_ca_params(intermediate);
        let middle =
            CertifiedIssuer::signed_by(params, KeyPair::generate().unwrap(), &self.ca).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &middle)
            .unwrap();
        (
            format!("{}{}", leaf.pem(), middle.pem()),
            key.serialize_pem(),
        )
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }
}

/// The parameters of a CA named `name` whose dates ended at the start of 2021.
fn expired_ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    params
}

/// A configuration serving TLS with a `localhost` certificate from `pki`, requiring client
/// certificates from the same CA when `mutual`.
pub fn tls_config(dir: &Path, pki: &Pki, mutual: bool) -> Config {
    let (cert, key) = pki.issue("localhost");
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    std::fs::write(dir.join("ca.pem"), pki.ca_pem()).unwrap();
    let mut config = Config::for_tests(super::SECRET);
    config.grpc_tls_cert = Some(dir.join("server.pem"));
    config.grpc_tls_key = Some(dir.join("server.key"));
    if mutual {
        config.grpc_client_ca = Some(dir.join("ca.pem"));
    }
    config
}

/// A tonic channel to `grpc` over TLS, trusting `pki`, with a client certificate if given.
pub async fn tls_channel(
    grpc: std::net::SocketAddr,
    pki: &Pki,
    identity: Option<Identity>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Channel::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// A bare TLS connection to `grpc` (ALPN `h2`, trusting `pki`) whose handshake is complete and
/// which has sent nothing else: what it sends next is up to the test.
pub async fn tls_connect(grpc: std::net::SocketAddr, pki: &Pki) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(grpc).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.expect("TLS handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    stream
}
