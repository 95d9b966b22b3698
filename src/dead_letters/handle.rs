//! [`DeadLetters`]: the one handle the ingest path and the AdminService use, over either
//! backend: the local letters of a single node (`<data-dir>/dead-letters/`, or memory), or the
//! cluster-wide bucket of a replica ([`super::shared`]). Callers do not know which.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::shared::SharedLetters;
use super::{
    Cursor, DeadLetter, DeadLetterError, DeadLetterId, LetterBucket, LocalLetters, MAX_LETTERS,
    Page, Purge, Purged,
};
use crate::error::Error;

/// The dead letters of one server (or, replicated, of its cluster). Cloning is cheap; every
/// clone shares the same letters.
#[derive(Clone)]
pub struct DeadLetters {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Local(LocalLetters),
    Shared(SharedLetters),
}

/// A letter claimed for a replay: no other replay applies it until the claim is finished,
/// released, or expires.
pub struct ReplayClaim {
    /// The letter as claimed.
    pub letter: Arc<DeadLetter>,
    /// The bucket revision of the claim (0 for local letters, claimed in this process's
    /// memory).
    revision: u64,
}

impl DeadLetters {
    /// Letters kept in memory only (`--ephemeral`, and ingresses built without a data
    /// directory).
    pub fn in_memory() -> DeadLetters {
        DeadLetters::local(LocalLetters::in_memory())
    }

    /// Local letters (a single node's).
    pub fn local(letters: LocalLetters) -> DeadLetters {
        DeadLetters {
            backend: Backend::Local(letters),
        }
    }

    /// Cluster-wide letters in `bucket`, shared by every replica.
    pub fn shared(bucket: Arc<dyn LetterBucket>) -> DeadLetters {
        DeadLetters {
            backend: Backend::Shared(SharedLetters::new(bucket, MAX_LETTERS)),
        }
    }

    /// Keeps `body`, which cannot be applied because of `error`, as received at `now`, and
    /// returns its id once it is kept (on disk, or in the bucket). The same body again is the
    /// same letter: its first arrival stays, its delivery count grows, its reason is refreshed.
    pub async fn store(
        &self,
        body: &[u8],
        error: &Error,
        now: DateTime<Utc>,
    ) -> Result<DeadLetterId, DeadLetterError> {
        match &self.backend {
            Backend::Local(local) => local.store(body, error, now).await,
            Backend::Shared(shared) => {
                let letter = DeadLetter {
                    id: DeadLetterId::of(body),
                    received_at: now,
                    last_received_at: now,
                    deliveries: 1,
                    reason: error.to_string(),
                    field: error.field().map(str::to_owned),
                    body: body.to_vec(),
                };
                shared.store(letter, now).await
            }
        }
    }

    /// The letter with this id, if kept.
    pub async fn get(&self, id: &DeadLetterId) -> Result<Option<Arc<DeadLetter>>, DeadLetterError> {
        match &self.backend {
            Backend::Local(local) => Ok(local.get(id)),
            Backend::Shared(shared) => Ok(shared.get(id).await?.map(Arc::new)),
        }
    }

    /// How many letters are kept: for the cluster-wide letters, as last seen by this replica
    /// (a gauge cannot wait on NATS; listing refreshes it).
    pub fn len(&self) -> usize {
        match &self.backend {
            Backend::Local(local) => local.len(),
            Backend::Shared(shared) => shared.len(),
        }
    }

    /// Whether no letter is kept (see [`DeadLetters::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `limit` letters (at least one) after `after`, oldest first arrival first; past the
    /// first letter, a page stops before its bodies would exceed `max_body_bytes`.
    pub async fn list(
        &self,
        after: Option<&Cursor>,
        limit: usize,
        max_body_bytes: usize,
    ) -> Result<Page, DeadLetterError> {
        match &self.backend {
            Backend::Local(local) => Ok(local.list(after, limit, max_body_bytes)),
            Backend::Shared(shared) => shared.list(after, limit, max_body_bytes).await,
        }
    }

    /// Removes these letters, or all of them, except those a replay holds; says which it
    /// removed and which it left to a replay (ids not kept are skipped).
    pub async fn purge(&self, which: Purge) -> Result<Purged, DeadLetterError> {
        match &self.backend {
            Backend::Local(local) => local.purge(which).await,
            Backend::Shared(shared) => shared.purge(which).await,
        }
    }

    /// Claims the letter `id` for a replay: [`Error::DeadLetterNotFound`] if it is not kept,
    /// [`Error::DeadLetterBeingReplayed`] if another replica claimed it first.
    pub async fn claim(&self, id: &DeadLetterId) -> Result<ReplayClaim, Error> {
        match &self.backend {
            Backend::Local(local) => Ok(ReplayClaim {
                letter: local.claim_replay(id)?,
                revision: 0,
            }),
            Backend::Shared(shared) => {
                let (letter, revision) = shared.claim(id, Utc::now()).await?;
                Ok(ReplayClaim {
                    letter: Arc::new(letter),
                    revision,
                })
            }
        }
    }

    /// The claimed letter was applied: removes it.
    pub async fn finish(&self, claim: ReplayClaim) -> Result<(), Error> {
        let id = &claim.letter.id;
        match &self.backend {
            Backend::Shared(shared) => shared.finish(id, claim.revision).await,
            Backend::Local(local) => {
                let removed = local.remove(id).await;
                local.end_replay(id);
                removed.map(|_| ()).map_err(DeadLetterError::unavailable)
            }
        }
    }

    /// The claimed letter was not applied: gives the claim back, recording `cause` as the
    /// letter's reason if it is still invalid.
    pub async fn release(&self, claim: ReplayClaim, cause: Option<&Error>) -> Result<(), Error> {
        let result = match &self.backend {
            Backend::Shared(shared) => shared.release(&claim.letter, claim.revision, cause).await,
            Backend::Local(local) => {
                let set = match cause {
                    Some(cause) => local.set_reason(&claim.letter.id, cause).await.map(|_| ()),
                    None => Ok(()),
                };
                local.end_replay(&claim.letter.id);
                set
            }
        };
        result.map_err(DeadLetterError::unavailable)
    }
}
