//! A listener's address as an operator writes it: `HOST:PORT`, where `HOST` is an IP address
//! (IPv6 in brackets), or a host name resolved when the listener binds.
//!
//! Host names let an orchestrator hand the service an address it knows by name: a pod's own
//! name resolves to the pod IP (Kubernetes writes it into `/etc/hosts`), `localhost` to
//! loopback. An IPv4 address may also be bracketed (`[10.0.0.7]:9090`), so one template such
//! as `[$(POD_IP)]:9090` works whichever address family the pod IP has. This module resolves and
//! binds; it does not decide what is served.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use tokio::net::TcpListener;

/// `HOST:PORT` of a listener; port 0 picks a free port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenAddr {
    host: Host,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

/// Why a listen address is not one: the reason alone, since clap's error names the flag and
/// the value before it (`invalid value 'localhost' for '--grpc-listen <GRPC_LISTEN>': no
/// port: ...`), as it does for every other flag; the value repeated in quotes read as a
/// second value.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListenAddrError {
    /// No `:PORT` at the end.
    #[error("no port: write HOST:PORT (IPv6 as [ADDRESS]:PORT)")]
    NoPort,
    /// The port is not a number from 0 to 65535.
    #[error("the port must be a number from 0 to 65535")]
    BadPort,
    /// The host is neither an IP address nor a host name.
    #[error("the host must be an IP address or a host name")]
    BadHost,
}

/// Why a listener could not be bound: `ADDRESS: reason`, which the server puts after its flag
/// (`--grpc-listen: 0.0.0.0:50051: Address already in use`), the `--flag: VALUE: reason` of
/// every other flag's error.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The host name does not resolve: a configuration error.
    #[error("{address}: cannot resolve the host name: {error}")]
    Resolve {
        /// The address as configured.
        address: ListenAddr,
        /// The resolver's error (its message; the OS error is shown once).
        error: String,
    },
    /// Binding failed on every address the host resolved to.
    #[error("{address}: {error}")]
    Bind {
        /// The address as configured.
        address: ListenAddr,
        /// The last OS error.
        error: std::io::Error,
    },
}

impl BindError {
    /// Whether the address is taken by someone else (as opposed to unusable as configured):
    /// waiting, for the other process to go, may fix it; changing nothing else will not fix
    /// the others.
    pub fn is_in_use(&self) -> bool {
        matches!(self, BindError::Bind { error, .. } if error.kind() == std::io::ErrorKind::AddrInUse)
    }
}

impl ListenAddr {
    /// Binds a listener: the IP address, or each address the host name resolves to in turn
    /// until one binds.
    pub async fn bind(&self) -> Result<TcpListener, BindError> {
        let candidates: Vec<SocketAddr> = match &self.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, self.port)],
            Host::Name(name) => tokio::net::lookup_host((name.as_str(), self.port))
                .await
                .map_err(|error| BindError::Resolve {
                    address: self.clone(),
                    error: error.to_string(),
                })?
                .collect(),
        };
        let mut last = std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "the host name resolves to no address",
        );
        for candidate in candidates {
            match TcpListener::bind(candidate).await {
                Ok(listener) => return Ok(listener),
                Err(error) => last = error,
            }
        }
        Err(BindError::Bind {
            address: self.clone(),
            error: last,
        })
    }

    /// Whether this address only ever accepts connections from this machine: a loopback IP,
    /// or `localhost`.
    pub fn is_loopback(&self) -> bool {
        match &self.host {
            Host::Ip(ip) => ip.to_canonical().is_loopback(),
            Host::Name(name) => name.eq_ignore_ascii_case("localhost"),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(text: &str) -> Result<ListenAddr, ListenAddrError> {
        if let Ok(address) = text.parse::<SocketAddr>() {
            return Ok(address.into());
        }
        let (host, port) = text
            .rsplit_once(':')
            .filter(|_| !text.ends_with(']'))
            .ok_or(ListenAddrError::NoPort)?;
        // An unbracketed IPv6 address has colons in its host part: say how to write it.
        if host.contains(':') && !host.starts_with('[') {
            return Err(ListenAddrError::NoPort);
        }
        let port = port.parse().map_err(|_| ListenAddrError::BadPort)?;
        // `[10.0.0.7]`: a bracketed IPv4 address, as `[$(POD_IP)]` gives on an IPv4 cluster.
        if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let ip = inner.parse().map_err(|_| ListenAddrError::BadHost)?;
            return Ok(ListenAddr {
                host: Host::Ip(ip),
                port,
            });
        }
        if !is_host_name(host) {
            return Err(ListenAddrError::BadHost);
        }
        Ok(ListenAddr {
            host: Host::Name(host.to_owned()),
            port,
        })
    }
}

/// Letters, digits, `-` and `.`, in labels of at most 63 (RFC 1123), at most 253 in all.
fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl From<SocketAddr> for ListenAddr {
    fn from(address: SocketAddr) -> ListenAddr {
        ListenAddr {
            host: Host::Ip(address.ip()),
            port: address.port(),
        }
    }
}

impl From<([u8; 4], u16)> for ListenAddr {
    fn from(address: ([u8; 4], u16)) -> ListenAddr {
        SocketAddr::from(address).into()
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(ip) => SocketAddr::new(*ip, self.port).fmt(f),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ListenAddr, ListenAddrError> {
        text.parse()
    }

    #[test]
    fn ips_host_names_and_bracketed_ipv4_parse() {
        assert_eq!(parse("0.0.0.0:8080").unwrap().to_string(), "0.0.0.0:8080");
        assert_eq!(parse("[::1]:9090").unwrap().to_string(), "[::1]:9090");
        assert_eq!(
            parse("[10.1.2.3]:9090").unwrap().to_string(),
            "10.1.2.3:9090"
        );
        assert_eq!(parse("localhost:0").unwrap().to_string(), "localhost:0");
        let pod = parse("profile-state-0.profile-state-headless.ns.svc:9090").unwrap();
        assert_eq!(pod.port, 9090);
        assert!(matches!(pod.host, Host::Name(_)));
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        assert_eq!(parse("localhost"), Err(ListenAddrError::NoPort));
        for ipv6 in ["fd00::1", "fd00::1:80"] {
            assert_eq!(parse(ipv6), Err(ListenAddrError::NoPort), "{ipv6}");
        }
        assert_eq!(parse("[::1]:99999"), Err(ListenAddrError::BadPort));
        assert_eq!(parse("host:http"), Err(ListenAddrError::BadPort));
        for host in ["bad_host:80", ":80", "-a:80", "a..b:80", "[nope]:80"] {
            assert_eq!(parse(host), Err(ListenAddrError::BadHost), "{host}");
        }
        let message = parse("[::1]").unwrap_err().to_string();
        assert!(message.contains("[ADDRESS]:PORT"), "{message}");
    }

    #[test]
    fn loopback_is_known_for_ips_and_localhost() {
        for loopback in [
            "127.0.0.1:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
            "LOCALHOST:1",
        ] {
            assert!(parse(loopback).unwrap().is_loopback(), "{loopback}");
        }
        for open in ["0.0.0.0:1", "[::]:1", "10.0.0.1:1", "pod-0:1"] {
            assert!(!parse(open).unwrap().is_loopback(), "{open}");
        }
    }

    #[tokio::test]
    async fn a_host_name_binds_and_an_unknown_one_is_a_resolve_error() {
        let listener = parse("localhost:0").unwrap().bind().await.unwrap();
        assert!(listener.local_addr().unwrap().ip().is_loopback());
        let unknown = parse("no-such-host.invalid:0").unwrap().bind().await;
        assert!(
            matches!(unknown, Err(BindError::Resolve { .. })),
            "{unknown:?}"
        );
        let taken = listener.local_addr().unwrap();
        let again = ListenAddr::from(taken).bind().await.unwrap_err();
        assert!(again.is_in_use(), "{again}");
    }
}
