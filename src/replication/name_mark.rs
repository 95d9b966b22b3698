//! The replica's name kept unique: its mark (`jetstream::ReplicaNameMark`) rewritten every
//! [`MARK_EVERY`], and a warning whenever another process wrote it (two processes run under
//! one `--replica-name`), counted (`profile_state_replication_name_taken_total`, alert
//! `ProfileStateReplicaNameShared`). It warns and changes nothing else: which of the two
//! should stop is for the operator to say.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::jetstream::ReplicaNameMark;
use crate::metrics::Metrics;

/// How often the mark is rewritten: each of two processes of one name hears of the other
/// within two of these.
pub(super) const MARK_EVERY: Duration = Duration::from_secs(5);

/// Rewrites `mark` every [`MARK_EVERY`] until `stopping`, warning whenever another process
/// wrote it, and counting it in `metrics`.
pub(super) async fn keep(
    (mut mark, name): (ReplicaNameMark, String),
    metrics: Metrics,
    stopping: CancellationToken,
) {
    let mut every = tokio::time::interval(MARK_EVERY);
    loop {
        let checked = tokio::select! {
            () = stopping.cancelled() => return,
            checked = async {
                every.tick().await;
                mark.check().await
            } => checked,
        };
        match checked {
            Ok(None) => {}
            Ok(Some(other)) => {
                metrics.replication_name_taken();
                tracing::warn!(
                    replica = %name,
                    other = %other,
                    "another process runs as this replica (the same --replica-name, whose \
                     default is the host name): replica names must be unique, or their \
                     snapshot uploads take each other's claim for their own"
                );
            }
            Err(error) => tracing::debug!(%error, "the replica name's mark was not written"),
        }
    }
}
