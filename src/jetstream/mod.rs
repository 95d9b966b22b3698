//! The NATS JetStream adapter (issue 13): what a replica needs from JetStream, in our terms.
//!
//! - [`Nats`]: a connection built from [`NatsConfig`](crate::config::NatsConfig) (URLs,
//!   credentials, TLS), and its JetStream context.
//! - [`UpdateStream`]: the one ordered log of normalized updates. Creates the stream or checks
//!   an existing one (subjects, storage, replicas, duplicate window, limits), owns the
//!   cluster-wide store id (kept in the stream's metadata, so it lives and dies with the log),
//!   publishes an [`UpdateBatch`] with a `Nats-Msg-Id`, reads the last sequence (a
//!   leader-served barrier) and the digest of a message, and purges below a sequence.
//! - [`Follower`]: reads the stream in order from a sequence with an ordered consumer and hands
//!   out every later sequence exactly once, or fails naming what is missing; `stall` decides
//!   when its consumer, delivering nothing while the stream holds more, is to be replaced.
//! - [`SnapshotBucket`]: snapshots in an Object Store bucket, tagged with the revision and
//!   stream sequence they are as of (and the digest of the stream's message there), for
//!   replicas that start with an empty disk, and the upload claim that one replica at a time
//!   holds to publish them (taken, renewed, taken over and given back by compare-and-set).
//! - [`DeadLetterBucket`]: a KV bucket for cluster-wide dead letters, with compare-and-set.
//! - [`ReplicaNameMark`]: finds another process running under this replica's name.
//!
//! It is an adapter: it turns profile updates into stream messages and JetStream failures into
//! [`JetStreamError`], and decides nothing. It does not merge, number revisions, store
//! profiles or answer requests; the domain (`profile`, `store`, `sequencer`, `journal`,
//! `watch`) never imports it. Wiring it into the server is phase 2 of issue 13
//! (`/work/notes/replication-design.md` until it lands in `ARCHITECTURE.md`).

mod batch;
mod connection;
mod dead_letters;
mod follow;
mod incarnation;
mod key_value;
mod listing;
mod quorum;
mod replica_name;
mod republish;
mod schedule;
mod snapshots;
mod stall;
mod store_id;
mod stream;

pub use batch::{UpdateBatch, delivery_id};
pub use connection::Nats;
pub use dead_letters::{DeadLetterBucket, DeadLetterEntry};
pub use follow::{Entry, Follower};
pub use incarnation::{Incarnation, StreamCreated};
pub use replica_name::ReplicaNameMark;
pub use schedule::ScheduleBucket;
pub use snapshots::{
    CLAIM_TTL, Discarded, EarlierSnapshot, HeldClaim, SnapshotBucket, SnapshotInfo, Upload,
    UploadClaim,
};
pub use stream::{Bounds, Published, StreamSettings, UpdateStream};

/// What can go wrong talking to JetStream. Messages are lowercase and name the stream, bucket,
/// sequence or flag concerned; none carries profile data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JetStreamError {
    /// No connection could be made (or its options were unusable).
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect {
        /// The URLs tried, without credentials.
        urls: String,
        /// Why.
        reason: String,
    },
    /// NATS or JetStream did not answer in time, or not at all.
    #[error("jetstream unavailable during {operation}: {reason}")]
    Unavailable {
        /// What was being done (`publish`, `stream info`).
        operation: &'static str,
        /// The client's reason.
        reason: String,
    },
    /// A clustered stream's leader answered without having heard from a quorum of its group
    /// lately (`quorum`): it may be cut off from its peers, which may have elected another
    /// leader and acknowledged more, so its last sequence bounds nothing. No answer, as
    /// [`JetStreamError::Unavailable`] is; told apart so that a replica can say why it is not
    /// ready, and answer a caller waiting for its barrier at once (`crate::replication`).
    #[error("jetstream unavailable during stream info: stream {stream}: {reason}")]
    NoQuorum {
        /// The stream.
        stream: String,
        /// Which peers were silent, and for how long.
        reason: String,
    },
    /// A request was sent and its answer did not come in time: it may still have taken effect
    /// (a publish may be in the stream).
    #[error(
        "jetstream did not confirm {operation} in time (it may still have taken effect): {reason}"
    )]
    Unconfirmed {
        /// What was being done (`publish`).
        operation: &'static str,
        /// The client's reason.
        reason: String,
    },
    /// The stream asks for more replicas than a JetStream server outside a cluster keeps:
    /// a setting that cannot work, whereas too few servers up in a cluster may pass.
    #[error(
        "jetstream refused stream create: {reason} (--nats-replicas {replicas} needs a JetStream \
         cluster of at least that many servers; with one server, give --nats-replicas 1)"
    )]
    ReplicasNotSupported {
        /// The replicas asked for.
        replicas: usize,
        /// The server's reason.
        reason: String,
    },
    /// JetStream answered, and refused.
    #[error("jetstream refused {operation}: {reason}")]
    Refused {
        /// What was being done.
        operation: &'static str,
        /// The server's reason (for instance the stream is full).
        reason: String,
    },
    /// The existing stream or bucket is configured in a way this service cannot rely on.
    #[error("{name}: {setting} is {found}, expected {expected}{}", set_by(setting))]
    Mismatch {
        /// The stream or bucket.
        name: String,
        /// The setting.
        setting: &'static str,
        /// What this service needs.
        expected: String,
        /// What the server has.
        found: String,
    },
    /// A message is larger than the server or the stream accepts.
    #[error(
        "message of {bytes} bytes exceeds the {max} bytes a stream message may take (the \
         server's max_payload, or the stream's max_msg_size if smaller)"
    )]
    TooLarge {
        /// Size of the message.
        bytes: usize,
        /// The smaller of the server's `max_payload` and the stream's `max_msg_size`.
        max: usize,
    },
    /// The stream was deleted and created again under its name (by a replica, or by an operator
    /// restoring its definition, store id and all), restored from a backup, or its metadata's
    /// record now gives another store id (`store_id`): the state this replica applied belongs
    /// to the old one. Following the new one from the old position made running replicas
    /// diverge silently (found by an adversarial run).
    #[error(
        "stream {stream} is not the one this replica followed: it was deleted and created \
         again, restored from a backup, or its metadata's record now names another store \
         ({now}; this replica followed the one {was}): what this replica applied belongs to \
         the old stream"
    )]
    Replaced {
        /// The stream.
        stream: String,
        /// The incarnation this replica followed (`Incarnation`'s display).
        was: String,
        /// The incarnation now under that name.
        now: String,
    },
    /// The update stream does not exist, but its snapshot bucket holds what replicas of a
    /// stream of that name published: it was deleted or lost, not never made. A replica
    /// created an empty one and took webhooks into it, which a restore of the stream from its
    /// backup then dropped, acknowledged (and every replica served an empty store meanwhile).
    #[error(
        "stream {stream} does not exist, but bucket {bucket} holds snapshots that replicas of a \
         stream of that name published: it was deleted or lost. No new, empty one is created: \
         webhooks acknowledged into it would be dropped by restoring the stream from its \
         backup. Restore it (README, \"Backing up the stream\"); to start a new, empty store \
         on purpose, delete the bucket first (`nats stream rm -f OBJ_{bucket}`)"
    )]
    Lost {
        /// The stream.
        stream: String,
        /// Its snapshot bucket.
        bucket: String,
    },
    /// Reading was asked to start at a sequence the stream no longer holds (purged or removed
    /// by limits): the replica needs a snapshot at or after `first - 1`.
    #[error(
        "stream {stream} starts at sequence {first}, after the requested {requested}: \
         load a snapshot at or after sequence {}",
        first - 1
    )]
    StartBelowFirst {
        /// The stream.
        stream: String,
        /// The sequence reading should have started at.
        requested: u64,
        /// The stream's first sequence.
        first: u64,
    },
    /// A sequence is missing in the middle of the stream (a message was deleted).
    #[error("stream {stream} skipped from sequence {expected} to {got}")]
    Gap {
        /// The stream.
        stream: String,
        /// The sequence that should have come next.
        expected: u64,
        /// The sequence that came.
        got: u64,
    },
    /// The replica has applied more than the stream holds: the stream was replaced.
    #[error(
        "stream {stream} ends at sequence {last}, but sequence {applied} was applied: the \
         stream was deleted or replaced"
    )]
    AheadOfStream {
        /// The stream.
        stream: String,
        /// What the replica says it applied.
        applied: u64,
        /// The stream's last sequence.
        last: u64,
    },
    /// A stream message that is not an update batch this build reads.
    #[error("stream {stream} sequence {sequence}: malformed update batch: {reason}")]
    Malformed {
        /// The stream.
        stream: String,
        /// The message's sequence.
        sequence: u64,
        /// Why.
        reason: String,
    },
    /// A compare-and-set lost: the entry changed (or appeared) since it was read.
    #[error("{bucket}/{key}: changed concurrently")]
    Conflict {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
    /// An object or entry could not be read or written.
    #[error("{bucket}/{key}: {reason}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// The object or key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// Where a setting of the stream comes from, for a [`JetStreamError::Mismatch`]: the flag to
/// change, or the stream to edit (a setting no flag makes, set on the server by hand).
fn set_by(setting: &str) -> String {
    match setting {
        "replicas" => " (--nats-replicas; or change the stream's replicas on the server)".into(),
        "duplicate_window" => {
            " (--nats-duplicate-window; or raise the stream's duplicate window on the server)"
                .into()
        }
        _ => " (a setting of the stream on the server: change it back, e.g. with `nats stream \
               edit`)"
            .into(),
    }
}
