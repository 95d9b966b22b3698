//! How large a profile may grow.
//!
//! Modeled fields are overwritten, so each holds at most one webhook's value. Extras (unmodeled
//! `data` keys) accumulate instead: every new key stays, and a cleared one keeps its key and
//! clock. Without a bound, a sender that writes new keys grows a profile webhook after webhook
//! until no gRPC client can decode it (4 MiB by default): GetProfile, the account's pages and
//! every watch of them would fail from then on. So an update may not take a profile's extras,
//! written as one JSON object, past [`MAX_EXTRAS_JSON_BYTES`]; the update is refused whole
//! ([`TooLarge`]: the webhook is answered 422 and kept as a dead letter).
//!
//! The rule is part of the merge: a pure function of the profile and the update, so every
//! replica applying the same stream refuses the same updates. Profiles that older builds let
//! grow past the bound stay readable and keep taking updates that do not grow their extras;
//! recovery replays the local journal without the check (what it holds was accepted).
//! Measured as JSON because that is what senders write and what users can reason about: as a
//! protobuf `Struct` the same extras take at most about 5.5 times as much (a list of one-digit
//! numbers, the worst case). With the default limits (64 KiB bodies, so text fields of at most
//! that, and 4 MiB messages) the largest watch change, previous state included, stays inside a
//! message; other limits may not (`crate::grpc::largest_change_bytes`, warned at start-up).
//!
//! This module does not decide how a refusal is answered (`crate::ingest` does).

use std::fmt;
use std::io;

use serde::Serializer;

use super::{Profile, ProfileUpdate};

/// The most a profile's extras may take, written as one compact JSON object (cleared keys as
/// `null`), for an update to grow them.
pub const MAX_EXTRAS_JSON_BYTES: usize = 256 * 1024;

/// An update refused because it would grow a profile's extras past [`MAX_EXTRAS_JSON_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    /// The extras' size the update would have made, in bytes of JSON.
    pub extras_json_bytes: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the update would grow this profile's extra keys to {} bytes (as one JSON object), \
             more than the {MAX_EXTRAS_JSON_BYTES} a profile may hold; keys once written stay \
             (null clears a value, not its key)",
            self.extras_json_bytes
        )
    }
}

impl Profile {
    /// The size of this profile's extras written as one compact JSON object, cleared keys as
    /// `null`: 0 without extras.
    pub fn extras_json_bytes(&self) -> usize {
        let Some(extra) = self.extra.as_deref() else {
            return 0;
        };
        let entries = extra
            .iter()
            .map(|(key, register)| (key, register.value.as_ref().map(|value| &value.0)));
        let mut counted = ByteCount(0);
        // Writing into a counter fails only if serde_json cannot serialize a `Value`, which
        // it always can.
        serde_json::Serializer::new(&mut counted)
            .collect_map(entries)
            .expect("a JSON value always serializes");
        counted.0
    }
}

/// Checks the profile `merged` that `update` made of `before` (`None`: a new profile) against
/// the bound: refused only when the update carries extras, the result is past the bound and
/// larger than before.
pub fn check_growth(
    before: Option<&Profile>,
    merged: &Profile,
    update: &ProfileUpdate,
) -> Result<(), TooLarge> {
    if update.extras.is_empty() {
        return Ok(());
    }
    let after = merged.extras_json_bytes();
    if after <= MAX_EXTRAS_JSON_BYTES || after <= before.map_or(0, Profile::extras_json_bytes) {
        return Ok(());
    }
    Err(TooLarge {
        extras_json_bytes: after,
    })
}

/// An `io::Write` that only counts.
struct ByteCount(usize);

impl io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{key, update};
    use super::*;

    fn with_extras(second: i64, extras: &[(&str, Option<serde_json::Value>)]) -> ProfileUpdate {
        let mut update = update(second, &[]);
        update.extras = extras
            .iter()
            .map(|(key, value)| (Box::from(*key), value.clone()))
            .collect();
        update
    }

    fn merged(before: &Profile, update: &ProfileUpdate) -> Profile {
        let mut after = before.clone();
        after.merge(update);
        after
    }

    #[test]
    fn the_size_is_the_extras_as_one_json_object() {
        let mut profile = Profile::empty(key());
        assert_eq!(profile.extras_json_bytes(), 0);
        profile.merge(&with_extras(
            1,
            &[
                ("b", Some(serde_json::json!([1, "x\n"]))),
                ("a", None),
                ("c\"", Some(serde_json::json!({"k": true}))),
            ],
        ));
        let written = r#"{"a":null,"b":[1,"x\n"],"c\"":{"k":true}}"#;
        assert_eq!(profile.extras_json_bytes(), written.len());
    }

    #[test]
    fn growth_past_the_bound_is_refused_and_anything_else_passes() {
        let big = "x".repeat(MAX_EXTRAS_JSON_BYTES / 2);
        let empty = Profile::empty(key());
        let first = with_extras(1, &[("one", Some(big.clone().into()))]);
        let half = merged(&empty, &first);
        assert_eq!(check_growth(None, &half, &first), Ok(()));

        let second = with_extras(2, &[("two", Some(big.clone().into()))]);
        let over = merged(&half, &second);
        assert_eq!(
            check_growth(Some(&half), &over, &second),
            Err(TooLarge {
                extras_json_bytes: over.extras_json_bytes()
            })
        );
        assert!(over.extras_json_bytes() > MAX_EXTRAS_JSON_BYTES);

        // A profile already past the bound (an older build let it grow) takes updates that
        // shrink its extras, and any update without extras.
        let shrink = with_extras(3, &[("two", None)]);
        assert_eq!(
            check_growth(Some(&over), &merged(&over, &shrink), &shrink),
            Ok(())
        );
        let points = update(4, &[]);
        assert_eq!(
            check_growth(Some(&over), &merged(&over, &points), &points),
            Ok(())
        );
        // ...but not one that grows them further, even by a byte.
        let grow = with_extras(5, &[("z", None)]);
        assert!(check_growth(Some(&over), &merged(&over, &grow), &grow).is_err());
    }
}
