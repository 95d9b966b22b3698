//! The sequencer: the one writer. It turns validated updates into numbered changes.
//!
//! Callers hand it a [`ProfileUpdate`] and wait. A single task takes the updates in batches,
//! merges each into the latest state of its profile (earlier updates of the same batch
//! included), gives each update that changed something the next revision, commits the batch to
//! the store (profiles, history, revision), and only then answers every caller of the batch.
//!
//! Batching is where durability slots in: the journal appends a whole batch and syncs it once
//! between "merge" and "commit", so concurrent webhooks share one fsync and nothing reaches
//! memory that is not on disk. The sequencer does not parse, validate or know about HTTP.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::profile::{Change, Profile, ProfileKey, ProfileUpdate};
use crate::store::Store;

/// How many waiting updates one batch takes at most.
const MAX_BATCH: usize = 512;

/// What applying an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The update changed the profile; the change got this revision.
    Changed {
        /// The revision of the change.
        revision: u64,
    },
    /// The profile already held everything the update carries (a duplicate, or older than what
    /// is stored): nothing changed, no revision was used.
    Unchanged {
        /// The profile's revision, which already reflects the update.
        revision: u64,
    },
}

struct Request {
    update: ProfileUpdate,
    reply: oneshot::Sender<Applied>,
}

/// Handle to the sequencer task. Cloning it is cheap; the task ends when the last handle is
/// dropped, after answering everything already handed to it.
#[derive(Clone)]
pub struct Sequencer {
    requests: mpsc::Sender<Request>,
}

impl Sequencer {
    /// Starts the sequencer task on `tracker`, writing to `store`.
    pub fn start(store: Store, tracker: &TaskTracker) -> Sequencer {
        let (requests, inbox) = mpsc::channel(4 * MAX_BATCH);
        tracker.spawn(run(store, inbox));
        Sequencer { requests }
    }

    /// Applies one update and returns once its outcome is visible to readers and watchers.
    pub async fn apply(&self, update: ProfileUpdate) -> Result<Applied, Error> {
        let (reply, outcome) = oneshot::channel();
        let stopped = || Error::Unavailable {
            reason: "the sequencer has stopped; retry later".into(),
        };
        self.requests
            .send(Request { update, reply })
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())
    }
}

async fn run(store: Store, mut inbox: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while inbox.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let Sequenced { changes, replies } = sequence(&store, batch.drain(..));
        store.commit(changes);
        for (reply, applied) in replies {
            // A caller that gave up (its HTTP client went away) no longer listens; the update
            // is applied all the same, which is what a retry would do.
            let _ = reply.send(applied);
        }
    }
    tracing::debug!("sequencer stopped");
}

/// A merged and numbered batch, not yet committed.
struct Sequenced {
    /// The changes, revisions consecutive after the store's.
    changes: Vec<Arc<Change>>,
    /// Every caller of the batch with its outcome, to answer after the commit.
    replies: Vec<(oneshot::Sender<Applied>, Applied)>,
}

/// Merges a batch of updates in arrival order and numbers the changes after the store's
/// revision. Pure apart from reading the store.
fn sequence(store: &Store, requests: impl Iterator<Item = Request>) -> Sequenced {
    let mut next_revision = store.revision() + 1;
    // Profiles this batch already changed: later updates of the same profile merge into these,
    // not into the store's older copy.
    let mut latest: HashMap<ProfileKey, Arc<Profile>> = HashMap::new();
    let mut changes = Vec::new();
    let mut replies = Vec::new();
    for Request { update, reply } in requests {
        let current = latest
            .get(&update.key)
            .cloned()
            .or_else(|| store.get(&update.key));
        let mut profile = match &current {
            Some(current) => Profile::clone(current),
            None => Profile::empty(update.key.clone()),
        };
        let applied = match profile.merge(&update) {
            None => Applied::Unchanged {
                revision: profile.revision,
            },
            Some(changed_fields) => {
                let revision = next_revision;
                next_revision += 1;
                profile.revision = revision;
                profile.version += 1;
                if current.is_none() {
                    profile.create_revision = revision;
                }
                let profile = Arc::new(profile);
                latest.insert(update.key, Arc::clone(&profile));
                changes.push(Arc::new(Change {
                    revision,
                    profile,
                    previous: current,
                    changed_fields,
                }));
                Applied::Changed { revision }
            }
        };
        replies.push((reply, applied));
    }
    Sequenced { changes, replies }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Field, FieldPath, Scalar};

    fn update(customer: &str, second: i64, points: i64) -> ProfileUpdate {
        ProfileUpdate {
            key: ProfileKey::new("2155", customer),
            at: chrono::DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap(),
            fields: vec![
                (Field::GbCustomerId, Some(Scalar::Int(7))),
                (Field::TotalPoints, Some(Scalar::Int(points))),
            ],
            extras: vec![],
        }
    }

    #[tokio::test]
    async fn changes_get_consecutive_revisions_and_duplicates_none() {
        let store = Store::new(100);
        let tracker = TaskTracker::new();
        let sequencer = Sequencer::start(store.clone(), &tracker);

        let first = sequencer.apply(update("a", 1, 10)).await.unwrap();
        assert_eq!(first, Applied::Changed { revision: 1 });
        let again = sequencer.apply(update("a", 1, 10)).await.unwrap();
        assert_eq!(again, Applied::Unchanged { revision: 1 });
        let older = sequencer.apply(update("a", 0, 99)).await.unwrap();
        assert_eq!(older, Applied::Unchanged { revision: 1 });
        let other = sequencer.apply(update("b", 1, 5)).await.unwrap();
        assert_eq!(other, Applied::Changed { revision: 2 });
        let newer = sequencer.apply(update("a", 2, 20)).await.unwrap();
        assert_eq!(newer, Applied::Changed { revision: 3 });

        let a = store.get(&ProfileKey::new("2155", "a")).unwrap();
        assert_eq!((a.revision, a.create_revision, a.version), (3, 1, 2));
        assert_eq!(a.get_int(Field::TotalPoints), Some(20));
        let history = store.history_from(1, 10).unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(
            history[2].changed_fields,
            vec![FieldPath::Field(Field::TotalPoints)]
        );
        assert_eq!(history[2].previous.as_ref().unwrap().revision, 1);

        drop(sequencer);
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn updates_of_one_profile_within_a_batch_build_on_each_other() {
        let store = Store::new(100);
        let requests: Vec<_> = [update("a", 1, 10), update("a", 2, 20), update("a", 2, 20)]
            .into_iter()
            .map(|update| Request {
                update,
                reply: oneshot::channel().0,
            })
            .collect();
        let Sequenced { changes, replies } = sequence(&store, requests.into_iter());
        let outcomes: Vec<Applied> = replies.into_iter().map(|(_, applied)| applied).collect();
        assert_eq!(
            outcomes,
            vec![
                Applied::Changed { revision: 1 },
                Applied::Changed { revision: 2 },
                Applied::Unchanged { revision: 2 },
            ]
        );
        assert_eq!(changes[1].previous.as_ref().unwrap().revision, 1);
        assert_eq!(changes[1].profile.version, 2);
    }
}
