//! Snapshots in a JetStream Object Store bucket (`<stream>_SNAPSHOTS`), so a replica with an
//! empty disk loads the newest one and follows the stream from there instead of replaying it
//! all.
//!
//! An object is the snapshot file's bytes, as the journal writes it, named by the stream
//! sequence it is as of and the store id, with its revision, stream sequence, store id, the
//! stream's creation and the digest of the stream's message at that sequence in the object's
//! metadata. The object store checks a SHA-256 digest when a read reaches the end. What a
//! snapshot contains, when one is taken, and whether a stream may start from the snapshot of
//! an earlier incarnation of it, are not decided here.

use std::collections::{HashMap, HashSet};

use std::time::Duration;

use async_nats::jetstream::object_store::{self, ObjectInfo, ObjectMetadata, ObjectStore};
use async_nats::jetstream::stream::StorageType;
use async_nats::jetstream::{self, kv};
use tokio::io::AsyncRead;
use tokio_stream::StreamExt;

use super::key_value::{already_exists, open_bucket, wrong_revision};
use super::listing::last_per_subject;
use super::stream::unavailable;
use super::{Incarnation, JetStreamError, UpdateStream};

const REVISION_KEY: &str = "revision";
const SEQUENCE_KEY: &str = "stream_sequence";
const STORE_ID_KEY: &str = "store_id";
/// When the update stream the snapshot was taken from was created, and (on a cluster) its Raft
/// group: which incarnation of the stream it is of (`super::incarnation`). A stream deleted and
/// created again with its configuration keeps its store id, not these (objects without them,
/// from earlier builds, are taken on their store id alone; without the group, on the time).
const STREAM_CREATED_KEY: &str = "stream_created";
const STREAM_RAFT_GROUP_KEY: &str = "stream_raft_group";
/// The digest of the stream's message at the snapshot's sequence
/// (`UpdateStream::message_digest`): a stream restored from a backup is another incarnation,
/// and holding the same message there is what lets it start from this snapshot. Absent on
/// objects of earlier builds (some of which published without it when the read failed), and
/// when the stream held no such message at upload.
const MESSAGE_DIGEST_KEY: &str = "stream_message_sha256";
/// The key of the upload claim in `<stream>_META`.
const UPLOAD_CLAIM: &str = "snapshot-upload";
/// How long an upload claim holds when its holder never releases it (it crashed).
pub const CLAIM_TTL: Duration = Duration::from_secs(600);

/// What a published snapshot is as of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The object's name (`snapshot-<stream sequence, 20 digits>-<store id>`; without the
    /// store id from earlier builds).
    pub name: String,
    /// The store revision it holds every change up to.
    pub revision: u64,
    /// The last stream sequence applied in it: follow the stream after this.
    pub stream_sequence: u64,
    /// Its size in bytes.
    pub size: usize,
}

/// A live snapshot of an earlier incarnation of the stream (one deleted and created again, or
/// restored from a backup): not [`SnapshotBucket::list`]ed, and what start-up may fall back on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EarlierSnapshot {
    /// What it is as of.
    pub snapshot: SnapshotInfo,
    /// When the stream it was taken from was created.
    pub stream_created: String,
    /// The digest of that stream's message at its sequence (see [`MESSAGE_DIGEST_KEY`]);
    /// `None` on a snapshot published by an earlier release, or without that message.
    pub message_digest: Option<String>,
}

/// The upload claim as one replica took it: releasing it removes that claim and no later one.
#[derive(Clone, Debug)]
pub struct UploadClaim {
    /// The claim's revision in `<stream>_META`.
    revision: u64,
}

/// The snapshot bucket of one update stream. Cloning is cheap.
#[derive(Clone)]
pub struct SnapshotBucket {
    bucket: String,
    store: ObjectStore,
    /// For what the object store does not offer: its stream's chunk subjects.
    context: jetstream::Context,
    /// The update stream, whose message at a snapshot's sequence each upload records.
    stream: UpdateStream,
    store_id: String,
    /// The update stream's incarnation (see [`STREAM_CREATED_KEY`]).
    incarnation: Incarnation,
    /// `<stream>_META`: the upload claim, so that replicas which reach a snapshot at the same
    /// time (they apply the same stream) do not all upload one.
    meta: kv::Store,
}

impl SnapshotBucket {
    /// Opens the bucket, creating it (file storage, the stream's replicas) if missing.
    pub async fn open(stream: &UpdateStream) -> Result<SnapshotBucket, JetStreamError> {
        let bucket = format!("{}_SNAPSHOTS", stream.name());
        let context = stream.nats().context();
        let store = match context.get_object_store(&bucket).await {
            Ok(store) => store,
            Err(_) => context
                .create_object_store(object_store::Config {
                    bucket: bucket.clone(),
                    description: Some("profile-state snapshots".into()),
                    storage: StorageType::File,
                    num_replicas: stream.settings().replicas,
                    ..Default::default()
                })
                .await
                .map_err(unavailable("snapshot bucket create"))?,
        };
        let meta_bucket = format!("{}_META", stream.name());
        let config = kv::Config {
            bucket: meta_bucket,
            description: "profile-state coordination (snapshot upload claims)".into(),
            history: 1,
            max_age: CLAIM_TTL,
            ..Default::default()
        };
        let meta = open_bucket(stream, config, "meta bucket create").await?;
        Ok(SnapshotBucket {
            bucket,
            store,
            context: context.clone(),
            stream: stream.clone(),
            store_id: stream.store_id().to_string(),
            incarnation: stream.incarnation().clone(),
            meta,
        })
    }

    /// Claims the right to upload the next snapshot for `holder`; `None` when another replica
    /// holds the claim. A claim its holder never releases (it crashed) lapses after 10 minutes,
    /// except that `holder` takes over a claim in its own name: that is its own, left by this
    /// replica before a restart (replica names are unique) or by an upload whose release
    /// failed, and waiting it out stopped every publication and purge for 10 minutes while
    /// local snapshots piled up (found by an adversarial run).
    pub async fn claim_upload(&self, holder: &str) -> Result<Option<UploadClaim>, JetStreamError> {
        match self
            .meta
            .create(UPLOAD_CLAIM, holder.to_string().into())
            .await
        {
            Ok(revision) => Ok(Some(UploadClaim { revision })),
            Err(err) if already_exists(&err) => self.take_over_own_claim(holder).await,
            Err(err) => Err(self.error(UPLOAD_CLAIM, err)),
        }
    }

    /// The claim, if `holder` holds it already (compare-and-set on its revision, so a claim
    /// taken by another replica in between stays theirs).
    async fn take_over_own_claim(
        &self,
        holder: &str,
    ) -> Result<Option<UploadClaim>, JetStreamError> {
        let entry = self
            .meta
            .entry(UPLOAD_CLAIM)
            .await
            .map_err(|err| self.error(UPLOAD_CLAIM, err))?;
        let Some(entry) = entry.filter(|entry| {
            entry.operation == kv::Operation::Put && entry.value.as_ref() == holder.as_bytes()
        }) else {
            return Ok(None);
        };
        match self
            .meta
            .update(UPLOAD_CLAIM, holder.to_string().into(), entry.revision)
            .await
        {
            Ok(revision) => Ok(Some(UploadClaim { revision })),
            Err(err) if wrong_revision(&err) => Ok(None),
            Err(err) => Err(self.error(UPLOAD_CLAIM, err)),
        }
    }

    /// Gives `claim` back, unless it lapsed and another replica holds the claim now: that one
    /// is not ours to remove.
    pub async fn release_upload(&self, claim: UploadClaim) -> Result<(), JetStreamError> {
        match self
            .meta
            .purge_expect_revision(UPLOAD_CLAIM, Some(claim.revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(err) if wrong_revision(&err) => Ok(()),
            Err(err) => Err(self.error(UPLOAD_CLAIM, err)),
        }
    }

    /// Who holds the upload claim now, if anyone.
    pub async fn upload_claim_holder(&self) -> Result<Option<String>, JetStreamError> {
        let value = self
            .meta
            .get(UPLOAD_CLAIM)
            .await
            .map_err(|err| self.error(UPLOAD_CLAIM, err))?;
        Ok(value.map(|holder| String::from_utf8_lossy(&holder).into_owned()))
    }

    /// Stores a snapshot read from `data`, as of `revision` and `stream_sequence`, with the
    /// digest of the stream's message at `stream_sequence` (without it only when the stream
    /// holds no such message). The name carries the store id: an earlier incarnation's
    /// snapshot of the same sequence, which a restored stream may need, is not overwritten.
    ///
    /// A digest that cannot be read fails the upload, which is tried again with the next
    /// snapshot: published without it, after a stream info came from a follower while the
    /// stream was scaled, the newest snapshot was one no restored stream can start from, the
    /// purge that followed left the older one none either, and a restored stream's replicas
    /// had nothing to start from (found by CI). So does a stream this handle no longer follows
    /// (`UpdateStream::bounds`): a replica started since took it for another incarnation, and
    /// this one's snapshots are of a store no longer served.
    pub async fn put(
        &self,
        revision: u64,
        stream_sequence: u64,
        data: &mut (impl AsyncRead + Unpin),
    ) -> Result<SnapshotInfo, JetStreamError> {
        let name = format!("snapshot-{stream_sequence:020}-{}", self.store_id);
        let mut metadata = HashMap::from([
            (REVISION_KEY.to_string(), revision.to_string()),
            (SEQUENCE_KEY.to_string(), stream_sequence.to_string()),
            (STORE_ID_KEY.to_string(), self.store_id.clone()),
        ]);
        if let Some(created) = &self.incarnation.created {
            metadata.insert(STREAM_CREATED_KEY.to_string(), created.to_string());
        }
        if let Some(group) = &self.incarnation.raft_group {
            metadata.insert(STREAM_RAFT_GROUP_KEY.to_string(), group.clone());
        }
        if let Some(digest) = self.digest_at(stream_sequence).await? {
            metadata.insert(MESSAGE_DIGEST_KEY.to_string(), digest);
        }
        let meta = ObjectMetadata {
            name: name.clone(),
            metadata,
            ..Default::default()
        };
        let info = self
            .store
            .put(meta, data)
            .await
            .map_err(|err| self.error(&name, err))?;
        Ok(SnapshotInfo {
            name,
            revision,
            stream_sequence,
            size: info.size,
        })
    }

    /// The digest of the stream's message at `sequence`, or `None` (saying so) when the
    /// stream holds no such message: a snapshot without it is only of no use to a restored
    /// stream.
    async fn digest_at(&self, sequence: u64) -> Result<Option<String>, JetStreamError> {
        let digest = self.stream.message_digest(sequence).await?;
        if digest.is_none() {
            tracing::info!(
                stream_sequence = sequence,
                "the stream no longer holds the message this snapshot was taken after: \
                 published without its digest (a restored backup of the stream cannot start \
                 from it)"
            );
        }
        Ok(digest)
    }

    /// Every snapshot of this store, oldest first ([`SnapshotBucket::is_ours`]).
    pub async fn list(&self) -> Result<Vec<SnapshotInfo>, JetStreamError> {
        let mut snapshots = Vec::new();
        for object in self.objects().await? {
            if !object.deleted && self.is_ours(&object) {
                snapshots.extend(snapshot_info(&object));
            }
        }
        snapshots.sort_by_key(|snapshot| snapshot.stream_sequence);
        Ok(snapshots)
    }

    /// Every live snapshot not of this store that records the stream it was taken from: of an
    /// earlier stream of this name (one deleted and created again, or restored from a backup),
    /// newest first. Such snapshots are not [`SnapshotBucket::list`]ed; a start-up that finds
    /// none of its own may start from one the stream continues, or names them, so that an
    /// operator sees why they are not used. Objects without a `stream_created` (earlier
    /// builds) are taken on their store id alone, by `list`.
    pub async fn of_earlier_streams(&self) -> Result<Vec<EarlierSnapshot>, JetStreamError> {
        let mut earlier = Vec::new();
        for object in self.objects().await? {
            let field = |key: &str| object.metadata.get(key);
            let Some(stream_created) = field(STREAM_CREATED_KEY) else {
                continue;
            };
            if object.deleted || self.is_ours(&object) {
                continue;
            }
            let Some(snapshot) = snapshot_info(&object) else {
                continue;
            };
            earlier.push(EarlierSnapshot {
                snapshot,
                stream_created: stream_created.clone(),
                message_digest: field(MESSAGE_DIGEST_KEY).cloned(),
            });
        }
        earlier.sort_by_key(|earlier| std::cmp::Reverse(earlier.snapshot.stream_sequence));
        Ok(earlier)
    }

    /// Whether `object` is a snapshot of this store: of its store id, and, for an object named
    /// without it (earlier builds, which served one id for every incarnation of a stream) or
    /// on a stream whose metadata recorded no incarnation when it was opened (where the id is
    /// the same for every incarnation), of this incarnation of the stream too, when it records
    /// one. A store id is of one incarnation otherwise (`super::store_id`), and the marks an
    /// incarnation is told by drift over its life: an object of this store taken for another
    /// incarnation's, and of no other store either, left a replica nothing to start from,
    /// again and again (found by an adversarial run).
    fn is_ours(&self, object: &ObjectInfo) -> bool {
        let field = |key: &str| object.metadata.get(key);
        if field(STORE_ID_KEY) != Some(&self.store_id) {
            return false;
        }
        if self.stream.recorded_before() && object.name.ends_with(&format!("-{}", self.store_id)) {
            return true;
        }
        let recorded = Incarnation::recorded(
            field(STREAM_CREATED_KEY).map(String::as_str),
            field(STREAM_RAFT_GROUP_KEY).map(String::as_str),
        );
        recorded.is_none_or(|recorded| recorded.is(&self.incarnation))
    }

    /// The bucket's name (`<stream>_SNAPSHOTS`).
    pub fn name(&self) -> &str {
        &self.bucket
    }

    /// The snapshot at the highest stream sequence, if any.
    pub async fn newest(&self) -> Result<Option<SnapshotInfo>, JetStreamError> {
        Ok(self.list().await?.pop())
    }

    /// A snapshot's bytes as a reader; a read that reaches the end with a digest mismatch
    /// fails.
    pub async fn read(
        &self,
        snapshot: &SnapshotInfo,
    ) -> Result<impl AsyncRead + Unpin + use<>, JetStreamError> {
        self.store
            .get(&snapshot.name)
            .await
            .map_err(|err| self.error(&snapshot.name, err))
    }

    /// Deletes all but the newest `keep` snapshots of this store, and, once this stream has
    /// `keep` of its own, every snapshot of an earlier incarnation of it; returns how many went.
    /// A replica starts from this stream's own snapshots whenever it has one, so the earlier
    /// ones serve only a restore of the stream from a backup, which brings the bucket's backup
    /// taken with it (README, "Backing up the stream"). Kept, each restore left two more
    /// objects in the bucket for good.
    ///
    /// Only while this handle still follows the stream (`UpdateStream::bounds`, read after the
    /// listing): to a replica still on a stream that one started since took for another
    /// incarnation, that one's snapshots are an earlier incarnation's, and the only ones its
    /// store has.
    pub async fn retire(&self, keep: usize) -> Result<usize, JetStreamError> {
        let snapshots = self.list().await?;
        let old = snapshots.len().saturating_sub(keep);
        let mut retired: Vec<String> = (snapshots[..old].iter())
            .map(|snapshot| snapshot.name.clone())
            .collect();
        if snapshots.len() >= keep {
            self.stream.bounds().await?;
            let earlier = self.of_earlier_streams().await?;
            retired.extend(earlier.into_iter().map(|earlier| earlier.snapshot.name));
        }
        for name in &retired {
            self.store
                .delete(name)
                .await
                .map_err(|err| self.error(name, err))?;
        }
        Ok(retired.len())
    }

    /// The chunk subjects of uploads that never finished: a replica stopped or crashed in the
    /// middle of one, and the object store keeps what it had stored under no object (or an
    /// upload is under way right now). Every object's chunks count, whatever its store id.
    pub async fn unfinished_uploads(&self) -> Result<Vec<String>, JetStreamError> {
        let (objects, unreadable) = self.descriptions().await?;
        // An object whose description cannot be read may be a live one: its chunks would be
        // taken for an unfinished upload's.
        if let Some((subject, error)) = unreadable.first() {
            return Err(self.error(
                subject,
                format!("cannot be read ({error}): no upload's chunks are taken for unfinished"),
            ));
        }
        let finished: HashSet<String> = (objects.into_iter())
            .filter(|object| !object.deleted)
            .map(|object| object.nuid)
            .collect();
        let prefix = format!("$O.{}.C.", self.bucket);
        let mut subjects = self
            .chunk_stream()
            .await?
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|err| self.error("chunks", err))?;
        let mut unfinished = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(|err| self.error("chunks", err))?;
            let nuid = subject.strip_prefix(&prefix).unwrap_or(&subject);
            if !finished.contains(nuid) {
                unfinished.push(subject);
            }
        }
        Ok(unfinished)
    }

    /// Removes the chunks of [`SnapshotBucket::unfinished_uploads`] whose last chunk is at least
    /// `quiet_for` older than the bucket's newest message, so that an upload still under way is
    /// left alone. Run by the holder of the upload claim right after its own upload (no one
    /// else uploads meanwhile, and the newest message is that upload's: the NATS server's
    /// "now"). Returns how many uploads' chunks went.
    pub async fn remove_unfinished_uploads(
        &self,
        quiet_for: Duration,
    ) -> Result<usize, JetStreamError> {
        let stream = self.chunk_stream().await?;
        // Ages are told by the server's clock alone: against this replica's clock, a skew of
        // `quiet_for` would make an upload under way look abandoned.
        let now = stream.cached_info().state.last_timestamp;
        let mut removed = 0;
        for subject in self.unfinished_uploads().await? {
            let last = stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .map_err(|err| self.error(&subject, err))?;
            let age = (now - last.time).to_std().unwrap_or_default();
            if age < quiet_for {
                continue;
            }
            stream
                .purge()
                .filter(subject.as_str())
                .await
                .map_err(|err| self.error(&subject, err))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Every object's description, deleted ones included (the object store keeps a deleted
    /// object's description, marked), but for those that cannot be read, which are named in a
    /// warning ([`SnapshotBucket::descriptions`]).
    async fn objects(&self) -> Result<Vec<ObjectInfo>, JetStreamError> {
        let (objects, unreadable) = self.descriptions().await?;
        for (subject, error) in unreadable {
            // Another client's description async-nats cannot read (nats-py's delete writes an
            // empty `mtime`) failed the whole listing, and start-up said JetStream did not
            // answer (found by an adversarial run).
            tracing::warn!(
                bucket = %self.bucket,
                %subject,
                %error,
                "an object description in the snapshot bucket cannot be read: skipped"
            );
        }
        Ok(objects)
    }

    /// Every object's description, and the subject and error of each that does not parse.
    /// Read as `ObjectStore::list` reads them, from the last message of each object's meta
    /// subject, through a consumer deleted right after.
    async fn descriptions(
        &self,
    ) -> Result<(Vec<ObjectInfo>, Vec<(String, String)>), JetStreamError> {
        let filter = format!("$O.{}.M.>", self.bucket);
        let stream = self.chunk_stream().await?;
        let messages = last_per_subject(&stream, filter, false)
            .await
            .map_err(|err| self.error("*", err))?;
        let (mut objects, mut unreadable) = (Vec::with_capacity(messages.len()), Vec::new());
        for message in messages {
            match serde_json::from_slice::<ObjectInfo>(&message.payload) {
                Ok(object) => objects.push(object),
                Err(error) => unreadable.push((message.subject.to_string(), error.to_string())),
            }
        }
        Ok((objects, unreadable))
    }

    /// The stream the object store keeps its chunks and objects in.
    async fn chunk_stream(&self) -> Result<jetstream::stream::Stream, JetStreamError> {
        self.context
            .get_stream(format!("OBJ_{}", self.bucket))
            .await
            .map_err(|err| self.error("chunks", err))
    }

    fn error(&self, key: &str, err: impl std::fmt::Display) -> JetStreamError {
        JetStreamError::Bucket {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            reason: err.to_string(),
        }
    }
}

/// What an object's metadata says its snapshot is as of; `None` for an object that is not one
/// of our snapshots.
fn snapshot_info(object: &ObjectInfo) -> Option<SnapshotInfo> {
    let number = |key: &str| object.metadata.get(key)?.parse::<u64>().ok();
    Some(SnapshotInfo {
        name: object.name.clone(),
        revision: number(REVISION_KEY)?,
        stream_sequence: number(SEQUENCE_KEY)?,
        size: object.size,
    })
}
