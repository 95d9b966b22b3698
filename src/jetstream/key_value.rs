//! What the KV buckets beside the update stream (dead letters, schedule slots, snapshot
//! claims) share: how one is opened, and how a lost create or compare-and-set is told apart
//! from a failure. Each bucket's keys and values are its own module's business.

use async_nats::jetstream::kv::{self, CreateErrorKind, Store, UpdateErrorKind};
use async_nats::jetstream::stream::StorageType;

use super::stream::unavailable;
use super::{JetStreamError, UpdateStream};

/// The header that marks a KV entry as a delete (`DEL`) or a purge (`PURGE`).
pub(super) const KV_OPERATION: &str = "KV-Operation";

/// How nats-server words a create or compare-and-set that lost to another writer.
const WRONG_LAST_SEQUENCE: &str = "wrong last sequence";

/// Opens `config.bucket`, creating it as configured (file storage, the stream's replicas) if
/// it cannot be opened. `what` names the bucket in the error.
pub(super) async fn open_bucket(
    stream: &UpdateStream,
    config: kv::Config,
    what: &'static str,
) -> Result<Store, JetStreamError> {
    let context = stream.nats().context();
    if let Ok(store) = context.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    context
        .create_key_value(kv::Config {
            storage: StorageType::File,
            num_replicas: stream.settings().replicas,
            ..config
        })
        .await
        .map_err(unavailable(what))
}

/// Whether a `create` failed because the key exists. nats-server 2.12 answers that with error
/// code 10164, which async-nats 0.51 does not map to `AlreadyExists` (it reports `Other`):
/// same meaning, told by its text.
pub(super) fn already_exists(err: &kv::CreateError) -> bool {
    err.kind() == CreateErrorKind::AlreadyExists || err.to_string().contains(WRONG_LAST_SEQUENCE)
}

/// Whether an update or purge failed because the entry is no longer at the revision it named
/// (10164 again, for the 10071 that async-nats maps to `WrongLastRevision`).
pub(super) fn wrong_revision(err: &kv::UpdateError) -> bool {
    err.kind() == UpdateErrorKind::WrongLastRevision
        || err.to_string().contains(WRONG_LAST_SEQUENCE)
}
