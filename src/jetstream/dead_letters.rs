//! Cluster-wide dead letters in a JetStream KV bucket (`<stream>_DEAD_LETTERS`): one entry per
//! letter id, with compare-and-set so two replicas never both replay (or both update) one
//! letter. Values are opaque bytes here; what a letter holds is `dead_letters`' business: this
//! is the adapter that implements its [`LetterBucket`].

use super::key_value::{KV_OPERATION, already_exists, open_bucket, wrong_revision};
use super::listing::last_per_subject;
use super::{JetStreamError, UpdateStream};
use crate::dead_letters::shared::BucketFuture;
use crate::dead_letters::{BucketError, LetterBucket};
use async_nats::jetstream::kv::{self, Store};

/// A letter as stored, with the revision a compare-and-set must name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterEntry {
    /// The letter's id (its key).
    pub id: String,
    /// The stored bytes.
    pub value: Vec<u8>,
    /// The entry's revision in the bucket.
    pub revision: u64,
}

/// The dead-letter bucket of one update stream. Cloning is cheap.
#[derive(Clone)]
pub struct DeadLetterBucket {
    bucket: String,
    store: Store,
    max_value_bytes: usize,
}

impl DeadLetterBucket {
    /// Opens the bucket, creating it (file storage, the stream's replicas, one value per key)
    /// if missing. `max_value_bytes` bounds a letter (its raw body and reason).
    pub async fn open(
        stream: &UpdateStream,
        max_value_bytes: usize,
    ) -> Result<DeadLetterBucket, JetStreamError> {
        let max_value_bytes = max_value_bytes.min(i32::MAX as usize);
        let bucket = format!("{}_DEAD_LETTERS", stream.name());
        let config = kv::Config {
            bucket: bucket.clone(),
            description: "profile-state dead letters".into(),
            history: 1,
            max_value_size: max_value_bytes as i32,
            ..Default::default()
        };
        let store = open_bucket(stream, config, "dead letter bucket create").await?;
        Ok(DeadLetterBucket {
            bucket,
            store,
            max_value_bytes,
        })
    }

    /// Stores a new letter; `Ok(None)` if one with this id exists (then read and update it).
    pub async fn create(&self, id: &str, value: Vec<u8>) -> Result<Option<u64>, JetStreamError> {
        match self.store.create(id, value.into()).await {
            Ok(revision) => Ok(Some(revision)),
            Err(err) if already_exists(&err) => Ok(None),
            Err(err) => Err(self.error(id, err)),
        }
    }

    /// The letter with this id, if there is one.
    pub async fn get(&self, id: &str) -> Result<Option<DeadLetterEntry>, JetStreamError> {
        let entry = self
            .store
            .entry(id)
            .await
            .map_err(|err| self.error(id, err))?;
        Ok(entry
            .filter(|entry| entry.operation == kv::Operation::Put)
            .map(|entry| DeadLetterEntry {
                id: id.to_string(),
                value: entry.value.to_vec(),
                revision: entry.revision,
            }))
    }

    /// Replaces a letter if it is still at `revision`; returns the new revision.
    pub async fn update(
        &self,
        id: &str,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<u64, JetStreamError> {
        match self.store.update(id, value.into(), revision).await {
            Ok(revision) => Ok(revision),
            Err(err) if wrong_revision(&err) => Err(self.conflict(id)),
            Err(err) => Err(self.error(id, err)),
        }
    }

    /// Removes a letter if it is still at `revision` (the one replica whose removal succeeds
    /// is the one that replays it).
    pub async fn remove(&self, id: &str, revision: u64) -> Result<(), JetStreamError> {
        match self.store.purge_expect_revision(id, Some(revision)).await {
            Ok(()) => Ok(()),
            Err(err) if wrong_revision(&err) => Err(self.conflict(id)),
            Err(err) => Err(self.error(id, err)),
        }
    }

    /// The ids of every letter: the bucket's keys whose last entry is not a removal.
    pub async fn ids(&self) -> Result<Vec<String>, JetStreamError> {
        let filter = format!("{}>", self.store.prefix);
        let entries = last_per_subject(&self.store.stream, filter, true)
            .await
            .map_err(|err| self.error("*", err))?;
        let mut ids: Vec<String> = entries
            .iter()
            .filter(|entry| !is_removal(entry))
            .filter_map(|entry| {
                entry
                    .subject
                    .as_str()
                    .strip_prefix(self.store.prefix.as_str())
            })
            .map(str::to_string)
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn conflict(&self, id: &str) -> JetStreamError {
        JetStreamError::Conflict {
            bucket: self.bucket.clone(),
            key: id.to_string(),
        }
    }

    fn error(&self, key: &str, err: impl std::fmt::Display) -> JetStreamError {
        JetStreamError::Bucket {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            reason: err.to_string(),
        }
    }
}

impl LetterBucket for DeadLetterBucket {
    fn create<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BucketFuture<'a, Option<u64>> {
        Box::pin(async move {
            DeadLetterBucket::create(self, key, value)
                .await
                .map_err(failed)
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BucketFuture<'a, Option<(Vec<u8>, u64)>> {
        Box::pin(async move {
            let entry = DeadLetterBucket::get(self, key).await.map_err(failed)?;
            Ok(entry.map(|entry| (entry.value, entry.revision)))
        })
    }

    fn update<'a>(&'a self, key: &'a str, value: Vec<u8>, revision: u64) -> BucketFuture<'a, u64> {
        Box::pin(async move {
            DeadLetterBucket::update(self, key, value, revision)
                .await
                .map_err(failed)
        })
    }

    fn remove<'a>(&'a self, key: &'a str, revision: u64) -> BucketFuture<'a, ()> {
        Box::pin(async move {
            DeadLetterBucket::remove(self, key, revision)
                .await
                .map_err(failed)
        })
    }

    fn keys(&self) -> BucketFuture<'_, Vec<String>> {
        Box::pin(async move { self.ids().await.map_err(failed) })
    }

    fn max_value_bytes(&self) -> usize {
        self.max_value_bytes
    }
}

/// Whether a bucket entry removes its key (a delete or purge marker), as the KV protocol
/// marks it.
fn is_removal(entry: &async_nats::jetstream::Message) -> bool {
    let operation = entry.headers.as_ref().and_then(|h| h.get(KV_OPERATION));
    operation.is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE")
}

fn failed(error: JetStreamError) -> BucketError {
    match error {
        JetStreamError::Conflict { .. } => BucketError::Conflict,
        error => BucketError::Failed(error.to_string()),
    }
}
