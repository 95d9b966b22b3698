//! The connection flags every operator subcommand shares (`--grpc`, `--token`, `--ca`,
//! `--cert`, `--key`, `--server-name`, `--timeout`), and the AdminService client they open.
//!
//! TLS is on when `--ca` is given (or the address is an `https://` URL, which then needs
//! `--ca`: this build carries no system CA store). The token goes in an
//! `authorization: Bearer` header on every call; sent without TLS to another machine it earns
//! a warning on stderr. A flag that cannot be used (a file that cannot be read, an address that
//! is not one) is a usage error; a server that cannot be reached or refuses is a failure. This
//! module connects; what is asked of the server is each subcommand's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::Failure;
use crate::error::with_sources;
use crate::pb::admin_service_client::AdminServiceClient;

/// How to reach the server's gRPC listener, and as whom.
#[derive(Clone, Debug, clap::Args)]
pub struct Connection {
    /// The server's gRPC address: HOST:PORT, or an http:// or https:// URL.
    #[arg(
        long,
        env = "PROFILE_STATE_GRPC",
        default_value = "127.0.0.1:50051",
        value_name = "ADDR"
    )]
    pub grpc: String,

    /// Bearer token, one of the server's --grpc-auth-tokens-file. Prefer the variable: the
    /// command line is visible to every user of the machine.
    #[arg(long, env = "PROFILE_STATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// A file of the server's tokens, in its --grpc-auth-tokens-file format: the first one is
    /// sent when --token is not given. It reads the server's own variable, so inside the
    /// service's container or unit, where that is set, commands need no token given.
    #[arg(long, env = "PROFILE_STATE_GRPC_AUTH_TOKENS_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM certificate of the CA that signed the server's certificate; turns TLS on. Without
    /// it, an https:// --grpc is checked against the system's CAs.
    #[arg(long, env = "PROFILE_STATE_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,

    /// PEM client certificate, for a server that requires one (--grpc-client-ca); with --key.
    #[arg(long, env = "PROFILE_STATE_CERT", value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, env = "PROFILE_STATE_KEY", value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,

    /// The name the server's certificate is checked against (default: the address's host).
    #[arg(long, env = "PROFILE_STATE_SERVER_NAME")]
    pub server_name: Option<String>,

    // Each subcommand replaces this help with one that names its answers (`timeout_help`).
    /// How long to wait for the connection and for each of the server's answers.
    #[arg(long, env = "PROFILE_STATE_TIMEOUT", default_value = "30s", value_parser = crate::config::positive_duration)]
    pub timeout: Duration,
}

/// `--timeout`'s help in a subcommand whose answers are `answers` ("each page of the list"):
/// one text for all of them named a backup's pieces in every dead-letters subcommand (a
/// first-user review).
pub fn timeout_help(answers: &str) -> impl FnOnce(clap::Arg) -> clap::Arg {
    let help = format!("How long to wait for the connection, and for {answers}");
    move |arg| arg.help(help)
}

/// The AdminService client the subcommands use: every call carries the token.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Token>>;

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone, Debug)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Connection {
    /// The URL `--grpc` names, and whether TLS is on.
    fn target(&self) -> Result<(String, bool), Failure> {
        let tls = self.ca.is_some() || self.grpc.starts_with("https://");
        let url = match self.grpc.split_once("://") {
            Some(("http", _)) if self.ca.is_some() => {
                let message = "--grpc is an http:// URL but --ca asks for TLS: use https://";
                return Err(Failure::Usage(message.to_owned()));
            }
            Some(("http" | "https", _)) => self.grpc.clone(),
            Some(_) => {
                let message = format!("--grpc {}: the URL must be http:// or https://", self.grpc);
                return Err(Failure::Usage(message));
            }
            // HOST:PORT as the server's listen flags take it: without a port, the URL made of it
            // went to port 80 (found by a first-user review).
            None if !has_port(&self.grpc) => {
                let message = format!(
                    "--grpc {} has no port: write HOST:PORT (the server's default is 50051)",
                    self.grpc
                );
                return Err(Failure::Usage(message));
            }
            None if tls => format!("https://{}", self.grpc),
            None => format!("http://{}", self.grpc),
        };
        Ok((url, tls))
    }

    /// Connects to AdminService.
    pub async fn admin(&self) -> Result<AdminClient, Failure> {
        let (url, tls) = self.target()?;
        let token = self.token()?;
        if token.0.is_some() && !tls && !is_local(&url) {
            eprintln!("profile-state: warning: sending the token to {url} without TLS (give --ca)");
        }
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|_| Failure::Usage(format!("--grpc {} is not an address", self.grpc)))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if tls {
            // The client certificate is checked here too (its version, its key): only --ca was
            // named, for a key that did not match --cert (found by a first-user review).
            let flags = match self.cert {
                Some(_) => "--ca, --cert or --key",
                None => "--ca",
            };
            endpoint = endpoint
                .tls_config(self.tls()?)
                .map_err(|error| Failure::Usage(format!("{flags}: {}", with_sources(&error))))?;
        }
        // The endpoint's connect timeout covers the TCP connection only: a server that accepts
        // and never answers the TLS handshake kept `backup` waiting for ever (found by an
        // adversarial run).
        let connecting = tokio::time::timeout(self.timeout, endpoint.connect()).await;
        let connected = connecting.map_err(|_| {
            let hint = match tls {
                true => " (a TLS handshake that never completed: is this the server's gRPC port?)",
                false => "",
            };
            let waited = self.timeout;
            Failure::Failed(format!(
                "cannot connect to {url}: no answer within {waited:?} (--timeout){hint}"
            ))
        })?;
        let channel = connected.map_err(|error| {
            let error = with_sources(&error);
            let hint = match &self.ca {
                // rustls's words for a record that is not TLS: the server spoke plaintext.
                _ if tls && error.contains("InvalidContentType") => {
                    " (the server answered without TLS: if its gRPC listener has no \
                     --grpc-tls-cert, give --grpc as http://)"
                }
                None if tls && error.contains("certificate") => {
                    " (it was checked against the system's CAs: give the server's CA with --ca)"
                }
                Some(_) if error.contains("certificate") => {
                    " (is --ca the CA that signed the server's certificate, and does --grpc, or \
                     --server-name, name a host the certificate is for?)"
                }
                _ => "",
            };
            Failure::Failed(format!("cannot connect to {url}: {error}{hint}"))
        })?;
        Ok(AdminServiceClient::with_interceptor(channel, token))
    }

    fn token(&self) -> Result<Token, Failure> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => token.trim().to_owned(),
            (None, Some(file)) => crate::grpc::auth::read_tokens_file(file)
                .map_err(|error| Failure::Usage(format!("--token-file {error:#}")))?
                .swap_remove(0),
            (None, None) => return Ok(Token(None)),
        };
        let value = format!("Bearer {token}");
        let value = value.parse().map_err(|_| {
            Failure::Usage("--token holds characters a header cannot carry".to_owned())
        })?;
        Ok(Token(Some(value)))
    }

    fn tls(&self) -> Result<ClientTlsConfig, Failure> {
        let mut tls = ClientTlsConfig::new();
        match &self.ca {
            Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read(ca, "--ca")?)),
            // An https:// URL without --ca: a certificate from a CA the system trusts.
            None => tls = tls.with_native_roots(),
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(
                read(cert, "--cert")?,
                read(key, "--key")?,
            ));
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|error| {
        let error = crate::io_error::IoError::new(path, "read", error);
        Failure::Usage(format!("{flag} {error}"))
    })
}

/// Whether `address` (HOST:PORT, a bracketed IPv6 address included) ends in a port.
fn has_port(address: &str) -> bool {
    let port = match address.rsplit_once(']') {
        Some((_, rest)) => rest.strip_prefix(':'),
        None => address.rsplit_once(':').map(|(_, port)| port),
    };
    port.is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `url` names this machine, where a plaintext token stays on the machine.
fn is_local(url: &str) -> bool {
    let host = url.split_once("://").map_or(url, |(_, rest)| rest);
    ["127.", "localhost:", "localhost/", "[::1]"]
        .iter()
        .any(|local| host.starts_with(local))
}

/// What a refused call says: the server's message and its gRPC code, and what to do when the
/// refusal is about credentials.
pub fn refused(what: &str, status: &Status) -> Failure {
    let message = message_of(status);
    let hint = match status.code() {
        tonic::Code::Unauthenticated => {
            " (give the token with --token or PROFILE_STATE_TOKEN, or a file of tokens with \
             --token-file)"
        }
        // Only when the call reached no server (the client's transport failed, so the status
        // has a cause): a running server's own UNAVAILABLE (NATS not answering, a stop) was
        // told to check that the server runs (found by an adversarial run).
        tonic::Code::Unavailable if std::error::Error::source(status).is_some() => {
            " (is the server running, and is --grpc its gRPC address?)"
        }
        // What a plaintext call to a TLS listener, a client certificate the server refused,
        // or a server that stopped in the middle of the call gets back (which code, and
        // whether the status or its cause says "transport error", varies with the timing):
        // the words cannot tell them apart, so the hint names each. Naming only TLS sent an
        // operator whose server had died checking certificates on a plaintext connection
        // (found by an adversarial run).
        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Cancelled
            if ["h2 protocol error", "transport error"]
                .iter()
                .any(|transport| message.contains(transport)) =>
        {
            " (the connection broke: the server may have stopped or restarted, see its log; \
             or, if its gRPC listener uses TLS, give its CA with --ca, and if it also asks for \
             client certificates, it may have refused this one: check --cert and --key against \
             its --grpc-client-ca)"
        }
        _ => "",
    };
    Failure::Failed(format!("{what}: {}{hint}", said(&message, status)))
}

/// A server stream that broke off after some of it arrived: no hint about TLS or client
/// certificates, which the connection got past (they sent an operator whose server had died
/// mid-backup checking certificates on a plaintext connection; found by an adversarial run).
pub fn broke_off(what: &str, received: &str, status: &Status) -> Failure {
    let said = said(&message_of(status), status);
    Failure::Failed(format!(
        "{what}: the stream broke off after {received}: {said}"
    ))
}

/// A status's message with the transport's cause, when there is one: tonic's message alone
/// says little. (Its cause often starts with the message itself: "transport error".)
fn message_of(status: &Status) -> String {
    match std::error::Error::source(status).map(with_sources) {
        Some(cause) if cause.starts_with(status.message()) => cause,
        Some(cause) => format!("{}: {cause}", status.message()),
        None => status.message().to_owned(),
    }
}

/// `message [CODE]`, as every subcommand prints what a server said.
fn said(message: &str, status: &Status) -> String {
    // The server's words on one line: a newline in them forged a line of our own (an
    // adversarial run).
    let message = super::printable(message);
    // The code as the README, grpcurl and the metrics name it (`FAILED_PRECONDITION`), not
    // tonic's `Debug` (`FailedPrecondition`: a first-user review).
    let code = crate::metrics::grpc_code_name(status.code());
    format!("{message} [{code}]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        connection: Connection,
    }

    fn target(args: &[&str]) -> Result<(String, bool), String> {
        let flags = Flags::try_parse_from([&["x"], args].concat()).unwrap();
        flags
            .connection
            .target()
            .map_err(|failure| failure.to_string())
    }

    /// A running server's UNAVAILABLE (its NATS not answering, a stop) is printed as it said
    /// it; only a call that reached no server (the transport's failure is its cause) asks
    /// whether the server runs (it was asked of every UNAVAILABLE: an adversarial run).
    #[test]
    fn only_a_call_that_reached_no_server_asks_whether_it_runs() {
        let hint = "is the server running";
        let answered = Status::unavailable("the dead letters could not be read; retry later");
        assert!(!refused("listing", &answered).to_string().contains(hint));
        let mut unreached = Status::unavailable("tcp connect error");
        let cause = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        unreached.set_source(std::sync::Arc::new(cause));
        assert!(refused("listing", &unreached).to_string().contains(hint));
    }

    #[test]
    fn addresses_become_urls_and_tls_follows_the_ca() {
        assert_eq!(
            target(&["--grpc", "10.0.0.7:50051"]).unwrap(),
            ("http://10.0.0.7:50051".to_owned(), false)
        );
        assert_eq!(
            target(&["--grpc", "ps:50051", "--ca", "ca.pem"]).unwrap(),
            ("https://ps:50051".to_owned(), true)
        );
        assert_eq!(
            target(&["--grpc", "https://ps:1"]).unwrap(),
            ("https://ps:1".to_owned(), true),
            "the system's CAs"
        );
        assert!(
            target(&["--grpc", "http://ps:1", "--ca", "c"])
                .unwrap_err()
                .contains("https://")
        );
        assert!(
            target(&["--grpc", "ftp://ps:1"])
                .unwrap_err()
                .contains("http://")
        );
    }

    /// tonic's transport errors carry "transport error" in the status and again at the head
    /// of its cause: it was printed twice (found by a fresh-eyes reading).
    #[test]
    fn a_refusal_names_its_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error: connection error: broken pipe")]
        struct Transport;
        let mut status = Status::unknown("transport error");
        status.set_source(std::sync::Arc::new(Transport));
        let text = refused("list", &status).to_string();
        assert!(
            text.starts_with("list: transport error: connection error: broken pipe [UNKNOWN]"),
            "{text}"
        );
        assert!(text.contains("give its CA with --ca"), "{text}");
        let mut status = Status::unavailable("connect failed");
        status.set_source(std::sync::Arc::new(Transport));
        let text = refused("list", &status).to_string();
        assert!(
            text.starts_with("list: connect failed: transport error: connection error"),
            "{text}"
        );
    }

    #[test]
    fn only_this_machine_is_local() {
        assert!(is_local("http://127.0.0.1:50051"));
        assert!(is_local("http://localhost:50051"));
        assert!(is_local("http://[::1]:50051"));
        assert!(!is_local("http://localhost.example:50051"));
        assert!(!is_local("http://10.0.0.7:50051"));
    }
}
