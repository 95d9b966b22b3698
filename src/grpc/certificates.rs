//! The validity dates of the certificates the gRPC listener serves (`--grpc-tls-cert`, the
//! whole chain) and trusts (`--grpc-client-ca`), for start-up warnings and the expiry gauge.
//!
//! Why: rustls serves an expired certificate without a word (clients refuse it), and never
//! checks a trust anchor's dates, so an expired client CA keeps letting its clients in. This
//! module only reads dates; `super::transport` builds the TLS configuration, `crate::server`
//! logs the warnings and sets the gauge.

use std::time::Duration;

use anyhow::Context as _;
use tokio_rustls::rustls::pki_types::CertificateDer;

/// How long before an expiry the served chain is warned of at start-up.
pub const RENEWAL_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// One certificate's validity, in Unix seconds, and how a warning names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validity {
    /// "the --grpc-tls-cert certificate", "certificate 2 of the --grpc-tls-cert chain (CN=…)".
    pub name: String,
    /// Not valid before.
    pub not_before: i64,
    /// Not valid after.
    pub not_after: i64,
}

/// The dates of every certificate served and trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCertificates {
    /// The served chain, leaf first.
    pub served: Vec<Validity>,
    /// The client CAs (mTLS); empty without `--grpc-client-ca`.
    pub client_cas: Vec<Validity>,
}

impl TlsCertificates {
    /// The dates of `served` (the chain, leaf first: only the certificates on the leaf's path
    /// of issuers, which clients check) and `client_cas`.
    pub fn read(
        served: &[CertificateDer<'_>],
        client_cas: &[CertificateDer<'_>],
    ) -> anyhow::Result<TlsCertificates> {
        let chain = served
            .iter()
            .map(parse)
            .collect::<anyhow::Result<Vec<_>>>()
            .context("--grpc-tls-cert")?;
        let served = issuer_path(&chain)
            .into_iter()
            .map(|index| match index {
                0 => chain[0].validity("the --grpc-tls-cert certificate".to_owned()),
                _ => {
                    let subject = &chain[index].subject_text;
                    let name = format!(
                        "certificate {} of the --grpc-tls-cert chain ({subject})",
                        index + 1
                    );
                    chain[index].validity(name)
                }
            })
            .collect();
        let client_cas = client_cas
            .iter()
            .map(|der| {
                let ca = parse(der)?;
                Ok(ca.validity(format!(
                    "the --grpc-client-ca certificate {}",
                    ca.subject_text
                )))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .context("--grpc-client-ca")?;
        Ok(TlsCertificates { served, client_cas })
    }

    /// When clients start refusing the served chain: its first expiry.
    pub fn expiry(&self) -> i64 {
        self.served
            .iter()
            .map(|cert| cert.not_after)
            .min()
            .unwrap_or(0)
    }

    /// When clients start accepting the served chain: its last `not_before` (0 without
    /// certificates). Later than now, clients refuse it (an early deployment, a clock behind).
    pub fn valid_from(&self) -> i64 {
        self.served
            .iter()
            .map(|cert| cert.not_before)
            .max()
            .unwrap_or(0)
    }

    /// What to warn an operator of at `now` (Unix seconds): a served certificate not valid
    /// yet, expired, or expiring within [`RENEWAL_WARNING`]; a client CA outside its dates.
    pub fn warnings(&self, now: i64) -> Vec<String> {
        let renew = RENEWAL_WARNING.as_secs() as i64;
        let restart = "renew it and restart (certificates are read at start-up)";
        let mut warnings = Vec::new();
        for cert in &self.served {
            let name = &cert.name;
            if now < cert.not_before {
                let at = at(cert.not_before);
                warnings.push(format!(
                    "{name} is not valid before {at}: clients refuse it until then"
                ));
            } else if now > cert.not_after {
                let at = at(cert.not_after);
                warnings.push(format!(
                    "{name} expired at {at}: clients refuse it; {restart}"
                ));
            } else if cert.not_after - now < renew {
                let (at, left) = (at(cert.not_after), left(cert.not_after - now));
                warnings.push(format!("{name} expires at {at} ({left}): {restart}"));
            }
        }
        let remove = "yet the TLS library trusts the client certificates it signed (it does not \
                      check a CA's dates): remove it from the file and restart to stop trusting \
                      them";
        for ca in &self.client_cas {
            let name = &ca.name;
            if now < ca.not_before {
                warnings.push(format!(
                    "{name} is not valid before {}, {remove}",
                    at(ca.not_before)
                ));
            } else if now > ca.not_after {
                warnings.push(format!("{name} expired at {}, {remove}", at(ca.not_after)));
            }
        }
        warnings
    }
}

/// The indexes of `chain`'s certificates on the leaf's path: the leaf, the one whose subject
/// is its issuer, and so on. A full-chain file may hold more (an old cross-signed root): those
/// are not what clients verify, and an expired one is no reason to warn (found by an
/// adversarial run).
fn issuer_path(chain: &[Parsed]) -> Vec<usize> {
    if chain.is_empty() {
        return Vec::new();
    }
    let mut path = vec![0];
    while let Some(&last) = path.last() {
        let issuer = &chain[last].issuer;
        let next = (0..chain.len()).find(|i| !path.contains(i) && &chain[*i].subject == issuer);
        match next {
            Some(next) if chain[last].subject != *issuer => path.push(next),
            _ => break,
        }
    }
    path
}

/// One certificate, parsed once: its names (raw, to follow issuers) and its dates.
struct Parsed {
    subject: Vec<u8>,
    issuer: Vec<u8>,
    subject_text: String,
    not_before: i64,
    not_after: i64,
}

impl Parsed {
    fn validity(&self, name: String) -> Validity {
        Validity {
            name,
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

fn parse(der: &CertificateDer<'_>) -> anyhow::Result<Parsed> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| anyhow::anyhow!("a certificate cannot be parsed: {error}"))?;
    let dates = parsed.validity();
    Ok(Parsed {
        subject: parsed.subject().as_raw().to_vec(),
        issuer: parsed.issuer().as_raw().to_vec(),
        subject_text: parsed.subject().to_string(),
        not_before: dates.not_before.timestamp(),
        not_after: dates.not_after.timestamp(),
    })
}

/// A Unix time as RFC 3339.
fn at(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .map_or_else(|| seconds.to_string(), |at| at.to_rfc3339())
}

/// Time left, in days, or hours under two days.
fn left(seconds: i64) -> String {
    match seconds / 3600 {
        0 => "in less than an hour".to_owned(),
        1 => "in 1 hour".to_owned(),
        hours if hours < 48 => format!("in {hours} hours"),
        hours => format!("in {} days", hours / 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 3600;

    fn cert(name: &str, not_before: i64, not_after: i64) -> Validity {
        Validity {
            name: name.into(),
            not_before,
            not_after,
        }
    }

    /// The served chain is warned of when clients would refuse it, or soon will.
    #[test]
    fn a_served_certificate_not_yet_valid_expired_or_expiring_soon_is_warned_of() {
        let (start, end) = (1_700_000_000, 1_700_000_000 + 90 * DAY);
        let chain = TlsCertificates {
            served: vec![cert("the leaf", start, end)],
            client_cas: vec![],
        };
        let warning = |now| chain.warnings(now).join("\n");
        assert!(
            warning(start - 1).contains("the leaf is not valid before 2023-11-14T22:13:20+00:00")
        );
        assert_eq!(chain.warnings(start), Vec::<String>::new());
        assert_eq!(chain.warnings(end - 14 * DAY), Vec::<String>::new());
        assert!(
            warning(end - 14 * DAY + 1)
                .contains("expires at 2024-02-12T22:13:20+00:00 (in 13 days)")
        );
        assert!(warning(end - 47 * 3600).contains("(in 47 hours)"));
        assert!(warning(end - 1).contains("(in less than an hour)"));
        assert!(
            warning(end + 1)
                .contains("the leaf expired at 2024-02-12T22:13:20+00:00: clients refuse it")
        );
        assert_eq!(chain.expiry(), end);
    }

    /// Clients accept a chain from its latest start to its first end (the gauges' values).
    #[test]
    fn the_chain_is_valid_from_its_latest_start_until_its_first_end() {
        let chain = TlsCertificates {
            served: vec![
                cert("the leaf", 100, 900),
                cert("an intermediate", 300, 500),
            ],
            client_cas: vec![cert("a client CA", 700, 800)],
        };
        assert_eq!((chain.valid_from(), chain.expiry()), (300, 500));
        let none = TlsCertificates {
            served: vec![],
            client_cas: vec![],
        };
        assert_eq!((none.valid_from(), none.expiry()), (0, 0));
    }

    /// A certificate in the file off the leaf's path of issuers (an old cross-signed root kept
    /// in a full-chain file) is not what clients check: no warning, not in the expiry (found by
    /// an adversarial run).
    #[test]
    fn only_the_leafs_path_of_issuers_counts() {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let ca = |name: &str, expired: bool| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let (root, stray) = (ca("root", false), ca("old cross-signed root", true));
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &root)
            .unwrap();
        let file = [leaf.der().clone(), stray.der().clone(), root.der().clone()];
        let certificates = TlsCertificates::read(&file, &[]).unwrap();
        let names: Vec<&str> = certificates
            .served
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "the --grpc-tls-cert certificate",
                "certificate 3 of the --grpc-tls-cert chain (CN=root)"
            ]
        );
        assert_eq!(
            certificates.warnings(chrono::Utc::now().timestamp()),
            Vec::<String>::new()
        );
        assert_eq!(
            TlsCertificates::read(&file[..1], &[]).unwrap().served.len(),
            1
        );
    }

    /// An intermediate that expires first is what clients refuse at (found by an adversarial
    /// run: only the leaf was read); an expired client CA is still trusted by rustls.
    #[test]
    fn the_whole_chain_and_the_client_cas_are_read() {
        let now = 1_700_000_000;
        let certificates = TlsCertificates {
            served: vec![
                cert("leaf", 0, now + 365 * DAY),
                cert("intermediate", 0, now - DAY),
            ],
            client_cas: vec![cert("old CA", 0, now - DAY), cert("good CA", 0, now + DAY)],
        };
        assert_eq!(certificates.expiry(), now - DAY);
        let warnings = certificates.warnings(now);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("intermediate expired at"),
            "{warnings:?}"
        );
        assert!(warnings[1].starts_with("old CA expired at"), "{warnings:?}");
        assert!(warnings[1].contains("trusts the client certificates it signed"));
    }
}
