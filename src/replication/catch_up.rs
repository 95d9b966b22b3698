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
use tokio_util::sync::CancellationToken;

use super::status::ReplicaStatus;
use crate::error::Error;
use crate::watch::CatchUp;

/// Longest a watch waits for its replica to catch up before it is answered UNAVAILABLE.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The stream barrier of one replica: the stream's end as the status poll reads it.
pub(super) struct StreamCatchUp {
    pub status: ReplicaStatus,
    /// The replica's stop: the poll stops reading then, so a wait for its next read ends
    /// with it (it held a stopping server's watches for the whole --shutdown-grace, then
    /// they were cut with a transport error; found by an adversarial run).
    pub stopping: CancellationToken,
    pub timeout: Duration,
}

impl CatchUp for StreamCatchUp {
    fn caught_up(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let arrived = tokio::time::Instant::now();
            let mut position = self.status.subscribe();
            let mut barrier = None;
            let caught_up = async {
                let last = self.status.last_read_after(arrived).await;
                barrier = Some(last);
                position
                    .wait_for(|position| position.sequence >= last)
                    .await
            };
            let waited = tokio::select! {
                waited = tokio::time::timeout(self.timeout, caught_up) => waited,
                () = self.stopping.cancelled() => {
                    let reason = format!(
                        "replica {} is stopping before it caught up: resume on another \
                         replica",
                        self.status.name()
                    );
                    return Err(Error::Unavailable { reason });
                }
            };
            if let Ok(Ok(_)) = waited {
                return Ok(());
            }
            let now = self.status.position();
            let name = self.status.name();
            let reason = match barrier {
                Some(barrier) => format!(
                    "replica {name} is catching up: applied revision {} (stream sequence {} of \
                     {barrier}); retry, here or on another replica",
                    now.revision, now.sequence
                ),
                None => format!(
                    "replica {name} could not read the stream's end within {:?} ({}), so it \
                     cannot tell whether it has caught up: applied revision {}; retry, here or \
                     on another replica",
                    self.timeout,
                    self.status
                        .unanswered()
                        .unwrap_or_else(|| "no answer yet".to_owned()),
                    now.revision
                ),
            };
            Err(Error::Unavailable { reason })
        })
    }
}
