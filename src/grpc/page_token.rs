//! ListProfiles page tokens: opaque to clients, bound to the filter they were issued for.
//!
//! A token is base64url JSON of the filter and the last key examined. Keys are never removed,
//! so "continue after this key" is all a page needs. Tokens are not signed: a forged token can
//! only name a different starting key, which any caller may ask for anyway.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::profile::ProfileKey;

const VERSION: u8 = 1;

#[derive(Serialize, Deserialize)]
struct Token {
    v: u8,
    client_id: String,
    tier_name: String,
    after: (String, String),
}

/// Encodes where the next page starts, for this filter.
pub fn encode(client_id: &str, tier_name: &str, after: &ProfileKey) -> String {
    let token = Token {
        v: VERSION,
        client_id: client_id.to_owned(),
        tier_name: tier_name.to_owned(),
        after: (after.client_id.to_string(), after.customer_id.to_string()),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).expect("a token encodes"))
}

/// Decodes a token and checks that it was issued for this filter.
pub fn decode(token: &str, client_id: &str, tier_name: &str) -> Result<ProfileKey, Error> {
    // Tokens are not signed: what is checked is that it reads as one, not who wrote it (the
    // refusal said "not a token this server issued", more than was checked; an adversarial
    // run).
    let invalid = || {
        Error::invalid(
            "page_token",
            "is not a page token: pass the previous page's next_page_token unchanged",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let token: Token = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if token.v != VERSION {
        return Err(invalid());
    }
    if token.client_id != client_id || token.tier_name != tier_name {
        return Err(Error::invalid(
            "page_token",
            "was issued for another client_id or tier_name; restart the listing without it",
        ));
    }
    Ok(ProfileKey::new(token.after.0, token.after.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_only_with_its_filter() {
        let key = ProfileKey::new("2155", "c-9");
        let token = encode("2155", "gold", &key);
        assert_eq!(decode(&token, "2155", "gold"), Ok(key));
        assert_eq!(
            decode(&token, "2155", "").unwrap_err().field(),
            Some("page_token")
        );
        assert!(decode(&token, "other", "gold").is_err());
        assert!(decode("not-a-token", "2155", "gold").is_err());
    }
}
