//! Which profile: the Gameball account and the integrator's own customer id.

use std::fmt;
use std::sync::Arc;

/// Identifies a profile: the Gameball account and the integrator's own customer id.
///
/// The strings are reference counted, so cloning a key (the store keeps it in two places) costs
/// two counter increments, not two allocations.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProfileKey {
    /// Gameball account (`client_id`).
    pub client_id: Arc<str>,
    /// The integrator's id of the customer (`customer_id`).
    pub customer_id: Arc<str>,
}

impl ProfileKey {
    /// Builds a key from its two parts.
    pub fn new(client_id: impl Into<Arc<str>>, customer_id: impl Into<Arc<str>>) -> Self {
        Self {
            client_id: client_id.into(),
            customer_id: customer_id.into(),
        }
    }
}

impl fmt::Debug for ProfileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.client_id, self.customer_id)
    }
}
