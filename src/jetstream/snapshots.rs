//! Snapshots in a JetStream Object Store bucket (`<stream>_SNAPSHOTS`), so a replica with an
//! empty disk loads the newest one and follows the stream from there instead of replaying it
//! all.
//!
//! An object is the snapshot file's bytes, as the journal writes it, named by the stream
//! sequence it is as of and the store id, with its revision, stream sequence, store id, the
//! stream's creation and the digest of the stream's message at that sequence in the object's
//! metadata. The object store checks a SHA-256 digest when a read reaches the end. Uploads are
//! written here in the object store's format rather than by `ObjectStore::put`, so that one
//! knows its chunks before it stores them: an upload whose claim was lost is not published,
//! and removes its chunks. The upload claim, one replica's at a time, is in `claim`. What a
//! snapshot contains, when one is taken, who uploads it, and whether a stream may start from
//! the snapshot of an earlier incarnation of it, are not decided here.

mod claim;

use std::collections::{HashMap, HashSet};

use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::object_store::{self, ObjectInfo, ObjectOptions, ObjectStore};
use async_nats::jetstream::stream::StorageType;
use async_nats::jetstream::{self, kv};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio_stream::StreamExt;

pub use claim::{HeldClaim, UploadClaim};

use super::key_value::open_bucket;
use super::listing::last_per_subject;
use super::republish::Republish;
use super::stream::{jetstream_code, unavailable};
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
/// How long an upload claim holds when nobody renews it and no replica takes it over: the
/// `max_age` of `<stream>_META`, a last resort (`claim`).
pub const CLAIM_TTL: Duration = Duration::from_secs(600);
/// The most an upload's chunk holds, as `ObjectStore::put` stores them.
const CHUNK_SIZE: usize = 128 * 1024;
/// Times a chunk is published before its upload fails. A chunk is published under a message id
/// of its own, so one whose acknowledgement timed out (the replica or the server frozen a few
/// seconds, a leader election) is published again and the stream keeps it once: a holder frozen
/// 5 s, well within its lease, had its whole upload fail on that one timeout, and started over
/// (found by an adversarial run).
const CHUNK_ATTEMPTS: u32 = 3;
/// How long a chunk is published again while the stream answers that its message id is still
/// being stored (error 10158: the publish that timed out is proposed and not yet committed, a
/// server of the stream's group frozen or an election under way): a duplicate acknowledgement
/// comes once it is stored. Taken for a final error, it failed the upload in exactly the
/// freezes the retry is for (found by an adversarial run).
const CHUNK_IN_PROCESS_PATIENCE: Duration = Duration::from_secs(10);
/// The pauses between those publishes: doubling from the first to the last.
const CHUNK_IN_PROCESS_PAUSES: (Duration, Duration) =
    (Duration::from_millis(20), Duration::from_millis(500));

/// When a chunk's failed publish is tried again: [`CHUNK_ATTEMPTS`] and
/// [`CHUNK_IN_PROCESS_PATIENCE`].
#[derive(Debug, Default)]
struct ChunkRetries {
    timeouts: u32,
    /// Once the stream answered that the message id is being stored: the pauses left.
    in_process: Option<Republish>,
}

impl ChunkRetries {
    /// How long to wait before publishing again after `err`, or `None`: it is final.
    fn pause_after(&mut self, err: &PublishError) -> Option<Duration> {
        if err.kind() == PublishErrorKind::TimedOut {
            self.timeouts += 1;
            return (self.timeouts < CHUNK_ATTEMPTS).then_some(Duration::ZERO);
        }
        if jetstream_code(err) != Some(ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT) {
            return None;
        }
        let deadline = tokio::time::Instant::now() + CHUNK_IN_PROCESS_PATIENCE;
        let pauses = || Republish::until(deadline, CHUNK_IN_PROCESS_PAUSES);
        self.in_process.get_or_insert_with(pauses).next_pause()
    }
}

/// What became of an upload given up ([`SnapshotBucket::discard_upload`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discarded {
    /// Its chunks were removed.
    Removed,
    /// It was published before it was given up: its object stands, chunks and all.
    Published,
}

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

/// One upload's chunks, named before the first is stored, so that an upload given up midway
/// removes exactly its own ([`SnapshotBucket::discard_upload`]).
#[derive(Debug)]
pub struct Upload {
    nuid: String,
}

impl Upload {
    /// A new upload, under a name of its own.
    pub fn new() -> Upload {
        Upload {
            nuid: uuid::Uuid::new_v4().simple().to_string(),
        }
    }
}

impl Default for Upload {
    fn default() -> Upload {
        Upload::new()
    }
}

/// What [`SnapshotBucket::put_chunks`] stored.
struct Chunks {
    nuid: String,
    count: usize,
    size: usize,
    sha256: Sha256,
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
        let object = self.describe(revision, stream_sequence).await?;
        let chunks = self.put_chunks(&Upload::new(), data).await?;
        self.put_object(object, chunks).await
    }

    /// [`SnapshotBucket::put`] by the holder of `claim`, its chunks stored as `upload`: the
    /// claim is renewed once more after the last chunk, and when that finds it lost (another
    /// replica took it over while this one was frozen, say) the chunks are removed and
    /// nothing is published (`None`): the snapshot of a replica that lost the claim is not
    /// published over the new holder's.
    pub async fn put_claimed(
        &self,
        claim: &UploadClaim,
        upload: &Upload,
        (revision, stream_sequence): (u64, u64),
        data: &mut (impl AsyncRead + Unpin),
    ) -> Result<Option<SnapshotInfo>, JetStreamError> {
        let object = self.describe(revision, stream_sequence).await?;
        let chunks = self.put_chunks(upload, data).await?;
        if !self.renew_upload(claim).await? {
            self.remove_chunks(upload).await?;
            return Ok(None);
        }
        self.put_object(object, chunks).await.map(Some)
    }

    /// The object a snapshot as of `revision` and `stream_sequence` is stored as, but for its
    /// chunks: its name and metadata (see [`SnapshotBucket::put`]).
    async fn describe(
        &self,
        revision: u64,
        stream_sequence: u64,
    ) -> Result<ObjectInfo, JetStreamError> {
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
        Ok(ObjectInfo {
            name: format!("snapshot-{stream_sequence:020}-{}", self.store_id),
            description: None,
            metadata,
            headers: None,
            options: Some(ObjectOptions {
                link: None,
                max_chunk_size: Some(CHUNK_SIZE),
            }),
            bucket: self.bucket.clone(),
            nuid: String::new(),
            size: 0,
            chunks: 0,
            modified: None,
            digest: None,
            deleted: false,
        })
    }

    /// Stores what `data` holds as `upload`'s chunks, as `ObjectStore::put` does (chunks of up
    /// to 128 KiB on `$O.<bucket>.C.<nuid>`, a SHA-256 digest), under a nuid of our own, known
    /// before the first chunk: async-nats picks its own inside `put` and never tells it, so an
    /// upload abandoned midway could not remove its chunks.
    async fn put_chunks(
        &self,
        upload: &Upload,
        data: &mut (impl AsyncRead + Unpin),
    ) -> Result<Chunks, JetStreamError> {
        let subject = self.chunk_subject(upload);
        let mut chunks = Chunks {
            nuid: upload.nuid.clone(),
            count: 0,
            size: 0,
            sha256: Sha256::new(),
        };
        let mut buffer = BytesMut::with_capacity(CHUNK_SIZE);
        loop {
            buffer.reserve(CHUNK_SIZE);
            let read = data.read_buf(&mut buffer).await;
            if read.map_err(|err| self.error(&subject, err))? == 0 {
                return Ok(chunks);
            }
            let payload = buffer.split().freeze();
            chunks.sha256.update(&payload);
            (chunks.count, chunks.size) = (chunks.count + 1, chunks.size + payload.len());
            let id = format!("{}.{}", upload.nuid, chunks.count);
            self.put_chunk(&subject, &id, payload).await?;
        }
    }

    /// Publishes one chunk under the message id `id`, again when its acknowledgement times out
    /// (see [`CHUNK_ATTEMPTS`]) or while its earlier publish is still being stored (see
    /// [`CHUNK_IN_PROCESS_PATIENCE`]).
    async fn put_chunk(
        &self,
        subject: &str,
        id: &str,
        payload: Bytes,
    ) -> Result<(), JetStreamError> {
        let mut retries = ChunkRetries::default();
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            let published = (self.context)
                .publish_with_headers(subject.to_owned(), headers, payload.clone())
                .await;
            let acked = match published {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
            let err = match acked {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            match retries.pause_after(&err) {
                Some(pause) => {
                    tracing::debug!(subject, %err, "a snapshot chunk published again");
                    tokio::time::sleep(pause).await;
                }
                None => return Err(self.error(subject, err)),
            }
        }
    }

    /// Publishes `object`'s description with its `chunks` (the rollup leaves only it on its
    /// subject), then removes the chunks of the object it replaces, as `ObjectStore::put` does.
    async fn put_object(
        &self,
        mut object: ObjectInfo,
        chunks: Chunks,
    ) -> Result<SnapshotInfo, JetStreamError> {
        let name = object.name.clone();
        let replaced = self.store.info(&name).await.ok();
        object.nuid = chunks.nuid;
        (object.chunks, object.size) = (chunks.count, chunks.size);
        object.digest = Some(format!(
            "SHA-256={}",
            URL_SAFE.encode(chunks.sha256.finalize())
        ));
        object.modified = Some(chrono::Utc::now());
        let subject = format!("$O.{}.M.{}", self.bucket, URL_SAFE.encode(&name));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        let payload = serde_json::to_vec(&object).map_err(|err| self.error(&name, err))?;
        let ack = (self.context)
            .publish_with_headers(subject, headers, payload.into())
            .await;
        ack.map_err(|err| self.error(&name, err))?
            .await
            .map_err(|err| self.error(&name, err))?;
        if let Some(replaced) = replaced.filter(|replaced| replaced.nuid != object.nuid) {
            let chunks = format!("$O.{}.C.{}", self.bucket, replaced.nuid);
            let purged = self.chunk_stream().await?.purge().filter(&chunks).await;
            purged.map_err(|err| self.error(&chunks, err))?;
        }
        let snapshot = snapshot_info(&object);
        snapshot.ok_or_else(|| self.error(&name, "stored without its revision or sequence"))
    }

    /// Removes what `upload` stored, unless it was published (an object names its chunks):
    /// for an upload given up midway, which may have been published all the same (given up
    /// as its object's description was being written).
    pub async fn discard_upload(&self, upload: &Upload) -> Result<Discarded, JetStreamError> {
        let (objects, _) = self.descriptions().await?;
        let published = |object: &ObjectInfo| !object.deleted && object.nuid == upload.nuid;
        if objects.iter().any(published) {
            return Ok(Discarded::Published);
        }
        self.remove_chunks(upload).await?;
        Ok(Discarded::Removed)
    }

    async fn remove_chunks(&self, upload: &Upload) -> Result<(), JetStreamError> {
        let subject = self.chunk_subject(upload);
        let purged = self.chunk_stream().await?.purge().filter(&subject).await;
        purged.map(drop).map_err(|err| self.error(&subject, err))
    }

    fn chunk_subject(&self, upload: &Upload) -> String {
        format!("$O.{}.C.{}", self.bucket, upload.nuid)
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

    /// What the server says of the stream the object store keeps its chunks in (tests: which
    /// server leads it).
    #[cfg(test)]
    pub async fn chunk_stream_info(&self) -> Result<jetstream::stream::Info, JetStreamError> {
        let mut stream = self.chunk_stream().await?;
        stream
            .info()
            .await
            .cloned()
            .map_err(|err| self.error("chunks", err))
    }

    /// `<stream>_META`, where replicas coordinate (`super::replica_name` too).
    pub(super) fn meta(&self) -> &kv::Store {
        &self.meta
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

#[cfg(test)]
mod tests {
    use super::*;

    fn in_process() -> PublishError {
        let error: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 409,
            "err_code": 10158,
            "description": "duplicate message id is in process",
        }))
        .expect("a JetStream error");
        PublishError::with_source(PublishErrorKind::Other, error)
    }

    /// A timed-out acknowledgement is published again at once, twice at most; any other
    /// error is final.
    #[test]
    fn a_chunk_is_published_again_after_timeouts_up_to_its_attempts() {
        let mut retries = ChunkRetries::default();
        let timed_out = || PublishError::new(PublishErrorKind::TimedOut);
        assert_eq!(retries.pause_after(&timed_out()), Some(Duration::ZERO));
        assert_eq!(retries.pause_after(&timed_out()), Some(Duration::ZERO));
        assert_eq!(retries.pause_after(&timed_out()), None);
        let refused = PublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert_eq!(ChunkRetries::default().pause_after(&refused), None);
    }

    /// "Duplicate message id is in process" is published again after doubling pauses for as
    /// long as the patience lasts, then taken as final; timeouts still count on their own.
    #[tokio::test(start_paused = true)]
    async fn a_chunk_still_being_stored_is_published_again_with_pauses_for_a_while() {
        let mut retries = ChunkRetries::default();
        let (first, last) = CHUNK_IN_PROCESS_PAUSES;
        let mut pauses = Vec::new();
        while let Some(pause) = retries.pause_after(&in_process()) {
            pauses.push(pause);
            tokio::time::advance(pause).await;
        }
        assert_eq!(pauses[..2], [first, first * 2]);
        assert_eq!(pauses.iter().max(), Some(&last));
        let waited: Duration = pauses.iter().sum();
        assert!(
            waited > CHUNK_IN_PROCESS_PATIENCE - last && waited < CHUNK_IN_PROCESS_PATIENCE,
            "{waited:?}"
        );
        let timed_out = PublishError::new(PublishErrorKind::TimedOut);
        assert_eq!(retries.pause_after(&timed_out), Some(Duration::ZERO));
    }
}
