//! The schedule bucket (`<stream>_SCHEDULE`, KV): one key per schedule slot, created by the
//! replica that runs the slot. `create` succeeds once per key cluster-wide, so one replica runs
//! each period of a `--reconcile-every` schedule. Keys expire after a day: a slot is only
//! claimed at its start, so an old key is never needed again. This adapter implements
//! `reconcile::schedule::SlotClaims`; what a slot is, is the schedule's business.

use std::time::Duration;

use async_nats::jetstream::kv::{self, Store};

use super::key_value::{already_exists, open_bucket};
use super::{JetStreamError, UpdateStream};
use crate::reconcile::schedule::{ClaimFuture, SlotClaims};

/// How long a slot's key is kept.
const KEEP_SLOTS: Duration = Duration::from_secs(24 * 60 * 60);

/// The schedule bucket of one update stream, and the name this replica claims slots as.
pub struct ScheduleBucket {
    store: Store,
    replica: String,
}

impl ScheduleBucket {
    /// Opens the bucket, creating it (file storage, the stream's replicas) if missing.
    pub async fn open(
        stream: &UpdateStream,
        replica: &str,
    ) -> Result<ScheduleBucket, JetStreamError> {
        let bucket = format!("{}_SCHEDULE", stream.name());
        let config = kv::Config {
            bucket,
            description: "profile-state schedule slots".into(),
            history: 1,
            max_age: KEEP_SLOTS,
            ..Default::default()
        };
        let store = open_bucket(stream, config, "schedule bucket create").await?;
        Ok(ScheduleBucket {
            store,
            replica: replica.to_owned(),
        })
    }
}

impl SlotClaims for ScheduleBucket {
    fn claim<'a>(&'a self, slot: &'a str) -> ClaimFuture<'a> {
        Box::pin(async move {
            match self.store.create(slot, self.replica.clone().into()).await {
                Ok(_) => Ok(true),
                Err(err) if already_exists(&err) => Ok(false),
                Err(err) => Err(format!("schedule slot {slot}: {err}")),
            }
        })
    }
}
