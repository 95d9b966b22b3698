//! Catching up before a watch is refused: the barrier a replica waits for.
//!
//! A watcher that resumes on this replica at a revision beyond what it has applied may hold a
//! revision another replica assigned and this one has not yet. The stream's last sequence, read
//! from the stream leader, bounds everything acknowledged anywhere so far (as Kubernetes'
//! consistent reads from cache do with etcd's revision); once this replica has applied up to
//! it, a revision it still does not have was never assigned, and the watch layer's usual
//! answer (OUT_OF_RANGE) is true.

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::status::ReplicaStatus;
use crate::error::Error;
use crate::jetstream::UpdateStream;
use crate::watch::CatchUp;

/// Longest a watch waits for its replica to catch up before it is answered UNAVAILABLE.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The stream barrier of one replica.
pub(super) struct StreamCatchUp {
    pub stream: UpdateStream,
    pub status: ReplicaStatus,
    pub timeout: Duration,
}

impl CatchUp for StreamCatchUp {
    fn caught_up(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let barrier = match self.stream.bounds().await {
                Ok(bounds) => bounds.last,
                Err(error) => {
                    tracing::debug!(%error, "no barrier for a watch catch-up");
                    return Err(Error::Unavailable {
                        reason: "the replica cannot read the stream to catch up; retry".into(),
                    });
                }
            };
            let mut position = self.status.subscribe();
            let waited = tokio::time::timeout(
                self.timeout,
                position.wait_for(|position| position.sequence >= barrier),
            )
            .await;
            if let Ok(Ok(_)) = waited {
                return Ok(());
            }
            let now = self.status.position();
            Err(Error::Unavailable {
                reason: format!(
                    "replica {} is catching up: applied revision {} (stream sequence {} of \
                     {barrier}); retry, here or on another replica",
                    self.status.name(),
                    now.revision,
                    now.sequence
                ),
            })
        })
    }
}
