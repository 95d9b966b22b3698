//! What a subscriber asks for: which accounts, customers and fields, and where to start.
//!
//! Pure data and matching; where the changes come from and how they are sent is the feed's
//! business (`super::feed`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::profile::{Change, Field, FieldPath, ProfileKey};

/// Which changes a subscriber wants, and from where.
#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    /// Only this account; `None` = all accounts.
    pub client_id: Option<Arc<str>>,
    /// Only these customers; empty = all.
    pub customer_ids: HashSet<Arc<str>>,
    /// Only changes touching one of these; empty = all changes.
    pub fields: Vec<FieldSelector>,
    /// First revision wanted from history; 0 = start now.
    pub start_revision: u64,
    /// With `start_revision` 0: send every matching profile first.
    pub send_initial_state: bool,
    /// Send `Progress` after this long without sending anything.
    pub progress_interval: Duration,
    /// Fail instead of resetting when the history no longer covers the cursor.
    pub fail_if_compacted: bool,
    /// The store `start_revision` belongs to, if the subscriber said: another store's
    /// revisions mean nothing here, so a different id resets (or fails).
    pub store_id: Option<Arc<str>>,
}

/// One entry of a `fields` filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldSelector {
    /// One modeled field or one extra key.
    Path(FieldPath),
    /// Any extra key (`extra`).
    AnyExtra,
}

impl FieldSelector {
    /// Parses a field name as the API spells it: `tier_name`, `extra.<key>` (any key, even
    /// empty), or `extra`.
    pub fn parse(name: &str) -> Result<FieldSelector, String> {
        if name == "extra" {
            return Ok(FieldSelector::AnyExtra);
        }
        // Every key a webhook may carry, the empty one too: `changed_fields` names its change
        // `extra.`, and each name there must select its change here (an adversarial run found
        // `extra.` refused).
        if let Some(key) = name.strip_prefix("extra.") {
            return Ok(FieldSelector::Path(FieldPath::Extra(key.into())));
        }
        Field::from_name(name)
            .map(|field| FieldSelector::Path(FieldPath::Field(field)))
            .ok_or_else(|| {
                let names: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
                format!(
                    "unknown field {:?}; expected one of {}, extra or extra.<key>",
                    crate::error::echoed(name),
                    names.join(", ")
                )
            })
    }

    pub(super) fn matches(&self, change: &Change) -> bool {
        match self {
            FieldSelector::Path(path) => change.touches(path),
            FieldSelector::AnyExtra => change.touches_any_extra(),
        }
    }
}

impl WatchSpec {
    pub(super) fn wants_profile(&self, key: &ProfileKey) -> bool {
        self.client_id
            .as_ref()
            .is_none_or(|client| *client == key.client_id)
            && (self.customer_ids.is_empty() || self.customer_ids.contains(&*key.customer_id))
    }

    pub(super) fn wants_change(&self, change: &Change) -> bool {
        self.wants_profile(&change.profile.key) && self.wants_fields(change)
    }

    fn wants_fields(&self, change: &Change) -> bool {
        self.fields.is_empty() || self.fields.iter().any(|field| field.matches(change))
    }
}
