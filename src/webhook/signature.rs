//! `X-GB-Signature`: lowercase hex SHA-1 of `body + ":" + secret` (Gameball webhooks v4).
//!
//! The digest is checked over the raw body first and, failing that, over the compact
//! re-serialization of the parsed JSON exactly as JavaScript's `JSON.stringify` writes it
//! (`super::stringify`), because Gameball's own example verifier hashes
//! `JSON.stringify(parsedBody)`. The compact form is built only when the raw
//! body matched no secret, so a delivery signed over its bytes never pays for it; the check
//! says which form matched, since a dead letter keeps the bytes the signature covers. Comparison
//! is case-insensitive and constant time. This module does not read headers or decide
//! statuses; the handler does.

use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use crate::status::Rejection;

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
        #[cfg(test)]
        tests::DIGESTS.with(|digests| digests.set(digests.get() + 1));
        let mut hasher = Sha1::new();
        hasher.update(body);
        hasher.update(b":");
        hasher.update(&self.secret);
        hasher.finalize().into()
    }

    fn matches(&self, claimed: &[u8; 20], body: &[u8]) -> bool {
        bool::from(self.digest(body).ct_eq(claimed))
    }
}

/// Why a delivery whose `client_id` has no secret was refused, when there is no default: what
/// the log says. The sender is answered as for a wrong signature: answered this, anyone who
/// can reach the webhook port could tell which accounts a server is configured for by trying
/// `client_id`s with any signature. Such a delivery is checked against [`unknown`], as an
/// account's would be against its secrets, and refused whatever that says.
pub const NO_SECRET_FOR_CLIENT: &str =
    "no webhook secret is configured for the body's client_id, and there is no default";

/// The answer to a delivery whose signature matches no secret that applies to its `client_id`,
/// or whose `client_id` has none: the two are told apart only in the log.
pub const MISMATCH: &str = "X-GB-Signature does not match the body under any webhook secret \
     for its client_id (the server's log says whether one is configured)";

/// The refusal of a delivery whose `client_id` could not be read, when there is no default:
/// there was no account to choose a secret by. Saying "this client_id" there sent a first-user
/// review looking for one.
pub const UNREADABLE_CLIENT_ID: &str = "the body's client_id could not be read (not JSON, no \
     client_id, or not a string), so no webhook secret could be chosen, and there is no default";

/// A secret nobody knows, made at start: what a delivery no secret applies to is checked
/// against, and what a refused delivery's check is padded with.
static UNKNOWN: std::sync::LazyLock<SignatureCheck> =
    std::sync::LazyLock::new(|| SignatureCheck::new(&uuid::Uuid::new_v4().to_string()));

/// One check against a secret nobody knows: what a delivery whose readable `client_id` has no
/// secret is checked with, padded as [`verify`] pads, so that neither its answer (a missing or
/// malformed header is named as for any account) nor its time tells which accounts a server
/// has secrets for.
pub fn unknown() -> &'static [SignatureCheck] {
    std::slice::from_ref(&*UNKNOWN)
}

/// What a signature was found to cover.
#[derive(Debug, PartialEq, Eq)]
pub enum Signed {
    /// The body's bytes.
    Raw,
    /// The compact re-serialization of the parsed body, these bytes, not the body's own: the
    /// body is then known only up to what that form leaves out (whitespace, escapes, a key
    /// repeated), so what is kept of it is this form. Kept as received, one signed body
    /// that cannot be applied, sent again with whitespace added, became as many dead letters
    /// as variants, up to the limit, after which real ones got 503 (found by an adversarial
    /// run).
    Compact(Vec<u8>),
}

/// Accepts when `signature` (hex, any case) is the signature, under any of `checks`, of the raw
/// body or, failing that, of the compact re-serialization `compact` makes (`None` when the
/// body is not JSON), and says which. `compact` is called at most once, and only when the raw
/// body matched none of them. A refusal costs the work of `pad_to` checks whatever `checks`
/// holds (the most any account has: `Secrets::most_checks`): its time grew with an account's
/// secrets, so it told an account in the middle of a rotation from one without secrets (found
/// by an adversarial run). [`check_raw`] then [`check_compact`], for a caller that makes the
/// compact form elsewhere.
pub fn verify(
    checks: &[SignatureCheck],
    (pad_to, signature): (usize, Option<&str>),
    raw: &[u8],
    compact: impl FnOnce() -> Option<Vec<u8>>,
) -> Result<Signed, Rejection> {
    match check_raw(checks, signature, raw) {
        RawCheck::Decided(verdict) => verdict,
        RawCheck::Unmatched(claimed) => check_compact(checks, pad_to, &claimed, raw, compact()),
    }
}

/// What the raw bytes decide of a delivery's signature.
#[derive(Debug)]
pub enum RawCheck {
    /// Signed over the raw bytes, or refused for what its header says (missing, not a
    /// SHA-1) or because there is nothing to check it with.
    Decided(Result<Signed, Rejection>),
    /// A signature no check matches over the raw bytes: the compact form decides
    /// ([`check_compact`]).
    Unmatched(Claimed),
}

/// The signature a delivery claims, decoded.
#[derive(Debug)]
pub struct Claimed([u8; 20]);

/// The first half of [`verify`]: the header, and the raw bytes under each of `checks`.
pub fn check_raw(checks: &[SignatureCheck], signature: Option<&str>, raw: &[u8]) -> RawCheck {
    let refused = |reason| RawCheck::Decided(Err(Rejection::Unauthenticated { reason }));
    if checks.is_empty() {
        // The handler logs why first (a missing account); this is for any other caller.
        return refused(MISMATCH);
    }
    let Some(signature) = signature else {
        return refused("missing X-GB-Signature header");
    };
    let mut claimed = [0u8; 20];
    // Decoding is case-insensitive. A header that cannot be a signature says so: "does not
    // match" sent users looking for a wrong secret (found by a first-user review).
    if hex::decode_to_slice(signature.trim(), &mut claimed).is_err() {
        return refused("X-GB-Signature is not a SHA-1 in hex (40 hex digits)");
    }
    if checks.iter().any(|check| check.matches(&claimed, raw)) {
        return RawCheck::Decided(Ok(Signed::Raw));
    }
    RawCheck::Unmatched(Claimed(claimed))
}

/// The second half of [`verify`], for a signature [`check_raw`] found unmatched: `compact` (the
/// body's compact form, `None` when it is not JSON) under each of `checks`, and a refusal
/// padded to `pad_to` checks over both forms.
pub fn check_compact(
    checks: &[SignatureCheck],
    pad_to: usize,
    Claimed(claimed): &Claimed,
    raw: &[u8],
    compact: Option<Vec<u8>>,
) -> Result<Signed, Rejection> {
    let compact = match compact {
        Some(compact) if checks.iter().any(|check| check.matches(claimed, &compact)) => {
            return Ok(Signed::Compact(compact));
        }
        compact => compact,
    };
    for _ in checks.len()..pad_to {
        std::hint::black_box(UNKNOWN.matches(claimed, raw));
        if let Some(compact) = &compact {
            std::hint::black_box(UNKNOWN.matches(claimed, compact));
        }
    }
    Err(Rejection::Unauthenticated { reason: MISMATCH })
}

/// The compact re-serialization of a parsed body: what `JSON.stringify` of the parsed body
/// gives, byte for byte (ECMAScript's numbers and key order, not serde_json's:
/// `super::stringify`).
pub fn compact(json: &serde_json::Value) -> Vec<u8> {
    super::stringify::stringify(json)
}

/// [`compact`] of the `Value` serde_json reads from `raw` (`None` if it refuses it), read and
/// written in one pass without that `Value`: what the handler checks a body's signature over
/// when its raw bytes matched no secret, before anything says who sent it.
pub fn compact_body(raw: &[u8]) -> Option<Vec<u8>> {
    super::stringify::stringify_body(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        PRETTY_PROFILE_UPDATED as PRETTY, PRETTY_PROFILE_UPDATED_SIG as PRETTY_SIG,
        PROFILE_UPDATED as RAW, PROFILE_UPDATED_SIG as RAW_SIG,
    };

    fn check() -> SignatureCheck {
        SignatureCheck::new("test-secret")
    }

    thread_local! {
        /// Digests computed on this thread (each test runs on a thread of its own).
        pub(super) static DIGESTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// How many digests `run` computed.
    fn digests(run: impl FnOnce()) -> usize {
        DIGESTS.with(|digests| digests.set(0));
        run();
        DIGESTS.with(std::cell::Cell::get)
    }

    /// A refusal costs the work of the most checks any account has, whether the account has
    /// one secret, several (a rotation) or none: its time told them apart (found by an
    /// adversarial run). A signature that matches stops at once.
    #[test]
    fn a_refusal_costs_as_many_checks_whatever_the_account_has() {
        let one = [check()];
        let rotating = ["a", "b", "c", "d"].map(SignatureCheck::new);
        let wrong = "0".repeat(40);
        let pretty = || Some(RAW.to_vec());
        let refused = |checks: &[SignatureCheck]| {
            digests(|| assert!(verify(checks, (4, Some(&wrong)), PRETTY, pretty).is_err()))
        };
        assert_eq!(
            refused(&one),
            8,
            "4 over the raw body, 4 over its compact form"
        );
        assert_eq!(refused(&rotating), 8);
        let unknown = digests(|| {
            let answer = verify(unknown(), (4, Some(&wrong)), PRETTY, pretty);
            assert_eq!(answer, Err(Rejection::Unauthenticated { reason: MISMATCH }));
        });
        assert_eq!(unknown, 8);
        let raw_only = digests(|| assert!(verify(&one, (4, Some(&wrong)), RAW, || None).is_err()));
        assert_eq!(raw_only, 4, "no compact form: 4 digests");
        let accepted = digests(|| {
            assert_eq!(
                verify(&one, (4, Some(RAW_SIG.trim())), RAW, || None),
                Ok(Signed::Raw)
            );
        });
        assert_eq!(accepted, 1);
    }

    fn raw_only() -> Option<Vec<u8>> {
        None
    }

    #[test]
    fn fixture_vector_over_the_raw_body() {
        assert_eq!(check().sign(RAW), RAW_SIG.trim());
        assert_eq!(
            verify(&[check()], (1, Some(RAW_SIG.trim())), RAW, raw_only),
            Ok(Signed::Raw)
        );
    }

    #[test]
    fn pretty_body_verifies_through_its_compact_form() {
        let parsed: serde_json::Value = serde_json::from_slice(PRETTY).unwrap();
        assert!(verify(&[check()], (1, Some(PRETTY_SIG.trim())), PRETTY, raw_only).is_err());
        assert_eq!(
            verify(&[check()], (1, Some(PRETTY_SIG.trim())), PRETTY, || Some(
                compact(&parsed)
            )),
            Ok(Signed::Compact(compact(&parsed)))
        );
    }

    #[test]
    fn the_compact_form_is_made_only_when_the_raw_body_does_not_match() {
        let never =
            || -> Option<Vec<u8>> { panic!("the raw body matched: no compact form needed") };
        assert_eq!(
            verify(&[check()], (1, Some(RAW_SIG.trim())), RAW, never),
            Ok(Signed::Raw)
        );
        let rotated = [SignatureCheck::new("old-secret"), check()];
        assert_eq!(
            verify(&rotated, (1, Some(RAW_SIG.trim())), RAW, never),
            Ok(Signed::Raw)
        );
        let mut made = 0;
        let counted = || {
            made += 1;
            None
        };
        assert!(verify(&rotated, (1, Some(PRETTY_SIG.trim())), PRETTY, counted).is_err());
        assert_eq!(made, 1, "made once for all the secrets");
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let upper = RAW_SIG.trim().to_uppercase();
        assert_eq!(
            verify(&[check()], (1, Some(&upper)), RAW, raw_only),
            Ok(Signed::Raw)
        );
    }

    #[test]
    fn wrong_secret_missing_and_malformed_headers_are_refused() {
        let other = SignatureCheck::new("other-secret");
        assert!(verify(&[other], (1, Some(RAW_SIG.trim())), RAW, raw_only).is_err());
        assert_eq!(
            verify(&[check()], (1, None), RAW, raw_only),
            Err(Rejection::Unauthenticated {
                reason: "missing X-GB-Signature header"
            })
        );
        for malformed in ["zz", "", "sha1=00", &RAW_SIG.trim()[1..]] {
            assert_eq!(
                verify(&[check()], (1, Some(malformed)), RAW, raw_only),
                Err(Rejection::Unauthenticated {
                    reason: "X-GB-Signature is not a SHA-1 in hex (40 hex digits)"
                }),
                "{malformed}"
            );
        }
        assert_eq!(
            verify(&[], (1, Some(RAW_SIG.trim())), RAW, raw_only),
            Err(Rejection::Unauthenticated { reason: MISMATCH })
        );
    }
}
