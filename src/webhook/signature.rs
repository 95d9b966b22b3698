//! `X-GB-Signature`: lowercase hex SHA-1 of `body + ":" + secret` (Gameball webhooks v4).
//!
//! The digest is checked over the raw body first and, failing that, over the compact
//! re-serialization of the parsed JSON with its key order kept, because Gameball's own example
//! verifier hashes `JSON.stringify(parsedBody)`. Comparison is case-insensitive and constant
//! time. This module does not read headers or decide statuses; the handler does.

use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use crate::error::Error;

/// The name of the header that carries the signature.
pub const HEADER: &str = "x-gb-signature";

/// Verifies signatures against one secret.
pub struct SignatureCheck {
    secret: Box<[u8]>,
}

impl SignatureCheck {
    /// A check against `secret`.
    pub fn new(secret: &str) -> Self {
        SignatureCheck {
            secret: secret.as_bytes().into(),
        }
    }

    /// The signature Gameball would send for these body bytes.
    pub fn sign(&self, body: &[u8]) -> String {
        hex::encode(self.digest(body))
    }

    fn digest(&self, body: &[u8]) -> [u8; 20] {
        let mut hasher = Sha1::new();
        hasher.update(body);
        hasher.update(b":");
        hasher.update(&self.secret);
        hasher.finalize().into()
    }

    /// Accepts when `signature` (hex, any case) matches the raw body or, if the body parsed
    /// as JSON, its compact form.
    pub fn verify(
        &self,
        signature: Option<&str>,
        raw: &[u8],
        parsed: Option<&serde_json::Value>,
    ) -> Result<(), Error> {
        let signature = signature.ok_or(Error::Unauthenticated {
            reason: "missing X-GB-Signature header",
        })?;
        let mismatch = Error::Unauthenticated {
            reason: "X-GB-Signature does not match the body",
        };
        let mut claimed = [0u8; 20];
        // Decoding is case-insensitive; a malformed header simply never matches.
        hex::decode_to_slice(signature.trim(), &mut claimed).map_err(|_| mismatch.clone())?;
        if bool::from(self.digest(raw).ct_eq(&claimed)) {
            return Ok(());
        }
        let compact = parsed.map(|json| serde_json::to_vec(json).expect("a JSON value encodes"));
        match compact {
            Some(compact) if bool::from(self.digest(&compact).ct_eq(&claimed)) => Ok(()),
            _ => Err(mismatch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Copies of ../shared/fixtures/webhooks, so the crate tests without ../shared.
    const RAW: &[u8] = include_bytes!("../../tests/fixtures/profile-updated.json");
    const RAW_SIG: &str = include_str!("../../tests/fixtures/profile-updated.json.sig");
    const PRETTY: &[u8] = include_bytes!("../../tests/fixtures/pretty-profile-updated.json");
    const PRETTY_SIG: &str = include_str!("../../tests/fixtures/pretty-profile-updated.json.sig");

    fn check() -> SignatureCheck {
        SignatureCheck::new("test-secret")
    }

    #[test]
    fn fixture_vector_over_the_raw_body() {
        assert_eq!(check().sign(RAW), RAW_SIG.trim());
        assert_eq!(check().verify(Some(RAW_SIG.trim()), RAW, None), Ok(()));
    }

    #[test]
    fn pretty_body_verifies_through_its_compact_form() {
        let parsed: serde_json::Value = serde_json::from_slice(PRETTY).unwrap();
        assert!(
            check()
                .verify(Some(PRETTY_SIG.trim()), PRETTY, None)
                .is_err()
        );
        assert_eq!(
            check().verify(Some(PRETTY_SIG.trim()), PRETTY, Some(&parsed)),
            Ok(())
        );
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let upper = RAW_SIG.trim().to_uppercase();
        assert_eq!(check().verify(Some(&upper), RAW, None), Ok(()));
    }

    #[test]
    fn wrong_secret_missing_and_malformed_headers_are_refused() {
        let other = SignatureCheck::new("other-secret");
        assert!(other.verify(Some(RAW_SIG.trim()), RAW, None).is_err());
        assert_eq!(
            check().verify(None, RAW, None),
            Err(Error::Unauthenticated {
                reason: "missing X-GB-Signature header"
            })
        );
        assert!(check().verify(Some("zz"), RAW, None).is_err());
        assert!(check().verify(Some(""), RAW, None).is_err());
    }
}
