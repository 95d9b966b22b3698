//! Which profile: the Gameball account and the integrator's own customer id.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

use arcstr::ArcStr;

/// The longest `client_id` a profile may have, in bytes: what a watch of its account may name
/// (a watch keeps its filter while it is open).
pub const MAX_CLIENT_ID_BYTES: usize = 16 * 1024;
/// The longest `customer_id` a profile may have, in bytes: what a watch of it may name.
pub const MAX_CUSTOMER_ID_BYTES: usize = 256 * 1024;

/// Identifies a profile: the Gameball account and the integrator's own customer id.
///
/// The strings are reference counted, so cloning a key (the store keeps it in two places) costs
/// two counter increments, not two allocations. Each is an [`ArcStr`], a thin pointer whose
/// length sits beside the text, so a key is 16 bytes: the store holds a million of them in its
/// profiles and its key order. Ordered by `client_id`, then `customer_id`.
#[derive(Clone, Eq)]
pub struct ProfileKey {
    /// Gameball account (`client_id`).
    pub client_id: ArcStr,
    /// The integrator's id of the customer (`customer_id`).
    pub customer_id: ArcStr,
}

impl ProfileKey {
    /// Builds a key from its two parts.
    pub fn new(client_id: impl Into<ArcStr>, customer_id: impl Into<ArcStr>) -> Self {
        Self {
            client_id: client_id.into(),
            customer_id: customer_id.into(),
        }
    }
}

// Comparisons as derived, field by field, but without reading the account's text when both
// keys hold the same `client_id` string: the store gives every profile of an account one
// shared copy, so most comparisons (the key order's, the map's) meet the same pointer, and the
// account's text was half of the bytes compared at recovery.
impl PartialEq for ProfileKey {
    fn eq(&self, other: &Self) -> bool {
        same_account(self, other) == Ordering::Equal && self.customer_id == other.customer_id
    }
}

// By content, as equality is: a key with its own copy of the account's text hashes like one
// holding the shared copy.
impl Hash for ProfileKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.client_id.hash(state);
        self.customer_id.hash(state);
    }
}

impl PartialOrd for ProfileKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ProfileKey {
    fn cmp(&self, other: &Self) -> Ordering {
        same_account(self, other).then_with(|| self.customer_id.cmp(&other.customer_id))
    }
}

fn same_account(a: &ProfileKey, b: &ProfileKey) -> Ordering {
    if ArcStr::ptr_eq(&a.client_id, &b.client_id) {
        Ordering::Equal
    } else {
        a.client_id.cmp(&b.client_id)
    }
}

impl fmt::Debug for ProfileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.client_id, self.customer_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_by_account_then_customer_whether_or_not_they_share_strings() {
        let shared: ArcStr = "2155".into();
        let a = ProfileKey::new(shared.clone(), "a");
        let b = ProfileKey::new(shared.clone(), "b");
        let a_copy = ProfileKey::new("2155", "a");
        let other = ProfileKey::new("2156", "a");
        let earlier = ProfileKey::new("2154", "z");
        assert_eq!(a, a_copy);
        assert_eq!(a.cmp(&a_copy), Ordering::Equal);
        assert_ne!(a, b);
        assert!(a < b && a_copy < b);
        assert!(b < other && earlier < a);
        assert_ne!(a, other);
        let mut keys = vec![other.clone(), b.clone(), earlier.clone(), a.clone()];
        keys.sort();
        assert_eq!(keys, vec![earlier, a, b, other]);
    }
}
