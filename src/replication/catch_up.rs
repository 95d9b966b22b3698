//! Catching up before a watch is refused: the barrier a replica waits for.
//!
//! A watcher that resumes on this replica at a revision beyond what it has applied may hold a
//! revision another replica assigned and this one has not yet. The stream's last sequence, read
//! from the stream leader, bounds everything acknowledged anywhere so far (as Kubernetes'
//! consistent reads from cache do with etcd's revision); once this replica has applied up to
//! it, a revision it still does not have was never assigned, and the watch layer's usual
//! answer (OUT_OF_RANGE) is true. Only a leader that heard from a quorum of its group after the
//! caller came shows that no other leader acknowledged anything before (etcd's ReadIndex
//! confirms its leadership with a heartbeat round the same way): a leader cut off from its
//! peers by a silent partition still answers with its own end, and a replica on its side said
//! "never assigned" for revisions the other side had acknowledged (found by an adversarial
//! run). When the leader asked says it has not heard from a quorum lately, the caller is
//! answered UNAVAILABLE at once: this replica may stay cut off, and another can answer.

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
                let last = self.status.last_read_after(arrived).await.map_err(Some)?;
                barrier = Some(last);
                match position
                    .wait_for(|position| position.sequence >= last)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(_) => Err(None::<String>),
                }
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
            let now = self.status.position();
            let name = self.status.name();
            let reason = match (waited, barrier) {
                (Ok(Ok(())), _) => return Ok(()),
                (Ok(Err(Some(silent))), _) => format!(
                    "replica {name} cannot tell whether it has caught up: {silent}; applied \
                     revision {}; retry, here or on another replica",
                    now.revision
                ),
                (_, Some(barrier)) => format!(
                    "replica {name} is catching up: applied revision {} (stream sequence {} of \
                     {barrier}); retry, here or on another replica",
                    now.revision, now.sequence
                ),
                (_, None) => format!(
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
