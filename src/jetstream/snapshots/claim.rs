//! The snapshot upload claim: the key `snapshot-upload` in `<stream>_META`, whose value is its
//! holder's name. One replica at a time holds it, so that replicas which reach a snapshot at
//! the same time (they apply the same stream) do not all upload one.
//!
//! Every write of the key changes its revision, and every change here is a compare-and-set on
//! the revision read: a claim is taken when the key is free, renewed by its holder, taken over
//! by another replica, or given back, by exactly one writer. When a holder renews, when
//! another takes over (`replication::snapshots` does both: a lease), and what a holder does
//! once its claim is lost, are not decided here. The bucket's `max_age` ([`CLAIM_TTL`]) is
//! the last resort for a claim nobody takes over.

use std::sync::Arc;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};

use super::SnapshotBucket;
use crate::jetstream::JetStreamError;
use crate::jetstream::key_value::{already_exists, wrong_revision};

/// The key of the upload claim in `<stream>_META`.
const UPLOAD_CLAIM: &str = "snapshot-upload";

/// The upload claim as one replica holds it. Renewing it moves the revision it names;
/// releasing it removes that claim and no later one. Clones share the revision.
#[derive(Clone, Debug)]
pub struct UploadClaim {
    holder: String,
    /// The claim's revision in `<stream>_META`. A tokio mutex, held across the compare-and-set:
    /// two renewals of one claim at once (the holder's periodic one and the one before its
    /// upload is published) would name the same revision, and the one that lost would take
    /// the claim for lost.
    revision: Arc<tokio::sync::Mutex<Revision>>,
}

#[derive(Debug)]
struct Revision {
    /// The last revision a write of this claim was answered with.
    known: u64,
    /// A renewal failed without an answer (a timeout): it may have been written all the same,
    /// and moved the claim past `known`.
    unsure: bool,
}

impl UploadClaim {
    fn new(holder: &str, revision: u64) -> UploadClaim {
        UploadClaim {
            holder: holder.to_string(),
            revision: Arc::new(tokio::sync::Mutex::new(Revision {
                known: revision,
                unsure: false,
            })),
        }
    }
}

/// The upload claim as read, held by some replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldClaim {
    /// The holder's replica name.
    pub holder: String,
    /// The claim's revision: changed by each renewal, named by a takeover.
    pub revision: u64,
    /// When it was last written (taken or renewed), by the NATS server's clock: for logs only,
    /// as no replica's clock is compared with it.
    pub written: DateTime<Utc>,
}

impl SnapshotBucket {
    /// Claims the right to upload the next snapshot for `holder`; `None` when another replica
    /// holds the claim. `holder` takes over a claim in its own name at once: that is its own,
    /// left by this replica before a restart (replica names are unique) or by an upload whose
    /// release failed, and waiting it out stopped every publication and purge while local
    /// snapshots piled up (found by an adversarial run).
    pub async fn claim_upload(&self, holder: &str) -> Result<Option<UploadClaim>, JetStreamError> {
        match self
            .meta
            .create(UPLOAD_CLAIM, holder.to_string().into())
            .await
        {
            Ok(revision) => Ok(Some(UploadClaim::new(holder, revision))),
            Err(err) if already_exists(&err) => match self.upload_claim().await? {
                Some(held) if held.holder == holder => self.take_over_upload(holder, &held).await,
                _ => Ok(None),
            },
            Err(err) => Err(self.error(UPLOAD_CLAIM, err)),
        }
    }

    /// Takes `held` over for `holder`, if the claim is still at the revision read (a
    /// compare-and-set: of two replicas taking over the same claim, one gets it); `None`
    /// otherwise (renewed, given back or taken by another replica meanwhile).
    pub async fn take_over_upload(
        &self,
        holder: &str,
        held: &HeldClaim,
    ) -> Result<Option<UploadClaim>, JetStreamError> {
        let taken = self.write_claim(holder, held.revision).await?;
        Ok(taken.map(|revision| UploadClaim::new(holder, revision)))
    }

    /// Renews `claim` (a compare-and-set on its revision, which moves it); `false` when it is
    /// no longer at that revision: another replica took it over, or it was given back. After a
    /// renewal that got no answer, a claim found at a newer revision still in the holder's name
    /// is that renewal's, written after all (replica names are unique, and a takeover writes
    /// the taker's): renewed from there. Taken for lost, a NATS server frozen a moment longer
    /// than the request timeout made the holder abandon its upload and leave the claim held
    /// until a takeover (found by freezing the server mid-upload).
    pub async fn renew_upload(&self, claim: &UploadClaim) -> Result<bool, JetStreamError> {
        let mut revision = claim.revision.lock().await;
        let renewed = self.write_claim(&claim.holder, revision.known).await;
        let renewed = match renewed {
            Ok(None) if revision.unsure => match self.upload_claim().await {
                Ok(Some(held)) if held.holder == claim.holder => {
                    self.write_claim(&claim.holder, held.revision).await
                }
                Ok(_) => Ok(None),
                Err(err) => Err(err),
            },
            other => other,
        };
        match renewed {
            Ok(Some(moved)) => {
                *revision = Revision {
                    known: moved,
                    unsure: false,
                };
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(err) => {
                revision.unsure = true;
                Err(err)
            }
        }
    }

    /// Writes `holder`'s claim over the one at `revision`: its new revision, or `None` when
    /// the claim is no longer at `revision`.
    async fn write_claim(
        &self,
        holder: &str,
        revision: u64,
    ) -> Result<Option<u64>, JetStreamError> {
        match self
            .meta
            .update(UPLOAD_CLAIM, holder.to_string().into(), revision)
            .await
        {
            Ok(moved) => Ok(Some(moved)),
            Err(err) if wrong_revision(&err) => Ok(None),
            Err(err) => Err(self.error(UPLOAD_CLAIM, err)),
        }
    }

    /// Gives `claim` back, unless it was taken over and another replica holds the claim now:
    /// that one is not ours to remove.
    pub async fn release_upload(&self, claim: UploadClaim) -> Result<(), JetStreamError> {
        let revision = claim.revision.lock().await.known;
        match self
            .meta
            .purge_expect_revision(UPLOAD_CLAIM, Some(revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(err) if wrong_revision(&err) => Ok(()),
            Err(err) => Err(self.error(UPLOAD_CLAIM, err)),
        }
    }

    /// The upload claim, if some replica holds it.
    pub async fn upload_claim(&self) -> Result<Option<HeldClaim>, JetStreamError> {
        let entry = self
            .meta
            .entry(UPLOAD_CLAIM)
            .await
            .map_err(|err| self.error(UPLOAD_CLAIM, err))?;
        Ok(entry
            .filter(|entry| entry.operation == kv::Operation::Put)
            .map(|entry| HeldClaim {
                holder: String::from_utf8_lossy(&entry.value).into_owned(),
                revision: entry.revision,
                written: entry.created,
            }))
    }

    /// Who holds the upload claim now, if anyone.
    pub async fn upload_claim_holder(&self) -> Result<Option<String>, JetStreamError> {
        Ok(self.upload_claim().await?.map(|held| held.holder))
    }
}
