//! Start-up of a replica: connect, open (or create) the stream, and rebuild the store from a
//! snapshot before following the stream.
//!
//! The starting point is, in order of preference:
//! 1. the oldest local snapshot the stream still continues from (the longest watch history
//!    after the restart, as a single node chooses; local snapshots lag the history window);
//! 2. the newest published snapshot (`<stream>_SNAPSHOTS`), downloaded into the data
//!    directory first (an empty disk, or the stream was purged past every local snapshot);
//!    one that fails to download or to load is passed over for the next older;
//! 3. an empty store, when the stream still holds its first message;
//! 4. else (a stream restored from a backup: another incarnation, whose own replicas have
//!    published nothing yet) a published snapshot of an earlier incarnation that the stream
//!    continues: the stream holds the message it was taken after (`restored`), downloaded as
//!    in 2. The newest first; one that fails to download or to load is passed over for the
//!    next (the restored bucket's objects are never replaced until a replica has started).
//!
//! The data directory records the store id of the stream it belongs to, and which incarnation
//! of it (`STREAM_CREATED`, `STREAM_RAFT_GROUP`: on a stream of an earlier release, which
//! kept its store id when deleted and created again with its configuration, these tell): a
//! directory of another stream has its snapshots moved aside to `stale-<old id>/` before
//! anything else. A single node's journal is refused: replicated mode keeps none, and a
//! directory is one or the other.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Prepared;
use super::restored::{self, Earlier};
use crate::config::Config;
use crate::data_dir::{DataDir, sync_dir};
use crate::dead_letters;
use crate::io_error::IoError;
use crate::jetstream::{
    Bounds, DeadLetterBucket, EarlierSnapshot, Follower, Incarnation, JetStreamError, Nats,
    ScheduleBucket, SnapshotBucket, SnapshotInfo, StreamSettings, UpdateStream,
};
use crate::journal::{self, snapshot};
use crate::server::BadConfiguration;
use crate::store::Store;

/// What start-up rebuilt: the store, the locked data directory, and the replica ready to start.
pub struct Opened {
    /// The store as of the starting point.
    pub store: Store,
    /// The data directory (`None` under `--ephemeral`).
    pub data_dir: Option<DataDir>,
    /// The replica, not yet applying.
    pub replica: Prepared,
    /// The cluster-wide dead letters.
    pub dead_letters: DeadLetterBucket,
    /// The schedule slots' claims.
    pub schedule: ScheduleBucket,
}

/// A snapshot to start from: its file, and what it is as of.
struct Start {
    path: PathBuf,
    revision: u64,
    stream_sequence: u64,
}

/// Longest pause between two start-up attempts.
const MAX_START_PAUSE: Duration = Duration::from_secs(2);
/// How many `--nats-request-timeout`s a download may go without a byte before it is given up.
/// The object store's reader ends only at the object's last chunk: once the object is retired
/// while it downloads (deleted, its chunks purged), it waits for ever, hearing only heartbeats,
/// and start-up hung without a word (found by an adversarial run).
const DOWNLOAD_STALL_REQUESTS: u32 = 3;

/// Connects, checks or creates the stream, opens the data directory, and loads the starting
/// point. Settings that cannot work are [`BadConfiguration`]; an unreachable NATS is not, and
/// fails at once. JetStream not answering in time is tried again from the start, with
/// backoff, for up to [`NatsConfig::start_patience`](crate::config::NatsConfig) (30 s); so is a
/// published snapshot replaced while it downloaded. Each attempt tried again is logged with why.
pub async fn open(config: &Config) -> anyhow::Result<Opened> {
    let deadline = Instant::now() + config.nats.start_patience;
    let mut pause = Duration::from_millis(100);
    let mut attempt = 0_u32;
    loop {
        attempt += 1;
        match open_once(config).await {
            Err(error) if Instant::now() + pause < deadline => {
                let Some(reason) = retry_reason(&error) else {
                    return Err(error);
                };
                tracing::warn!(error = %format!("{error:#}"), attempt, "{reason}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_START_PAUSE);
            }
            opened => return opened,
        }
    }
}

/// What to log when start-up failed for a reason worth another attempt (`None`: not worth
/// one, the configuration, the data directory or the stream's content are at fault).
/// JetStream not answering counts, and so does a bucket's failure: without quorum, opening or
/// listing the snapshot bucket times out too (a damaged snapshot is tried again as well, and
/// fails the same way at the end). So does a stream purged past every snapshot (a replica
/// may publish a newer one meanwhile), a snapshot replaced while it downloaded, and a stream
/// missing that existed ([`LOST_STREAM_RETRY`]).
fn retry_reason(error: &anyhow::Error) -> Option<&'static str> {
    if error.downcast_ref::<Replaced>().is_some() {
        return Some(
            "start-up: the published snapshot was replaced while it downloaded; trying the newest",
        );
    }
    if error.downcast_ref::<FollowedStreamMissing>().is_some() {
        return Some(LOST_STREAM_RETRY);
    }
    match error.downcast_ref::<JetStreamError>()? {
        JetStreamError::Lost { .. } => Some(LOST_STREAM_RETRY),
        JetStreamError::Unavailable { .. }
        | JetStreamError::NoQuorum { .. }
        | JetStreamError::Bucket { .. } => {
            Some("start-up: jetstream cannot do it yet; trying again")
        }
        JetStreamError::StartBelowFirst { .. } => Some(
            "start-up: the stream was purged past the snapshot; trying again with the newest \
             published one",
        ),
        _ => None,
    }
}

/// Why a stream that existed and is missing is asked for again: a restore may be under way,
/// and a stream's info can be missed while a cluster elects its leaders.
const LOST_STREAM_RETRY: &str =
    "start-up: the update stream is missing but existed; trying again (it may be being restored)";

/// One attempt of [`open`]; everything it opened is dropped again if it fails.
async fn open_once(config: &Config) -> anyhow::Result<Opened> {
    let started = std::time::Instant::now();
    let name = config.nats.replica_name();
    let nats = Nats::connect(&config.nats, &name).await?;
    let max_payload = nats.max_payload();
    // A body that cannot be applied is kept as a dead letter, one bucket value of at most
    // max_payload: past what that holds, such a delivery was answered 503 until Gameball
    // dropped it (it was checked against max_payload alone).
    let largest_kept = dead_letters::largest_body_kept(max_payload);
    if config.max_body_bytes > largest_kept {
        return Err(bad_configuration(format!(
            "--max-body-bytes {} is larger than the {largest_kept} bytes a dead letter can keep \
             under the NATS server's max_payload ({max_payload} bytes; a letter holds the body \
             base64-encoded, 4/3 of its size, with its reason): a delivery that size could not \
             be kept if it cannot be applied; lower --max-body-bytes or raise max_payload in \
             the NATS configuration",
            config.max_body_bytes
        )));
    }
    let settings = StreamSettings::from_config(&config.nats);
    if config.nats.upgrade_rules
        && let Some(from) = UpdateStream::upgrade_rules(&nats, &settings)
            .await
            .map_err(|error| match error {
                JetStreamError::Mismatch { .. } => bad_configuration(error.to_string()),
                error => error.into(),
            })?
    {
        tracing::warn!(
            stream = %settings.name,
            from,
            "took the stream over from merge rules 1: messages from this sequence on are applied \
             with the bound on how large an update may grow a profile"
        );
    }
    if !config.ephemeral {
        refuse_if_followed_before(&nats, &settings, &config.data_dir).await?;
    }
    let stream = match UpdateStream::ensure(&nats, &settings).await {
        Ok(stream) => stream,
        Err(
            error @ (JetStreamError::Mismatch { .. } | JetStreamError::ReplicasNotSupported { .. }),
        ) => {
            return Err(bad_configuration(error.to_string()));
        }
        Err(error) => return Err(error.into()),
    };
    let cap = stream.message_cap();
    if config.max_body_bytes > cap {
        return Err(bad_configuration(format!(
            "--max-body-bytes {} is larger than stream {}'s max_msg_size ({cap} bytes): a \
             webhook that size could not be published; lower --max-body-bytes or raise the \
             stream's (`nats stream edit --max-msg-size`)",
            config.max_body_bytes,
            stream.name()
        )));
    }
    let bucket = SnapshotBucket::open(&stream).await?;
    let dead_letters = DeadLetterBucket::open(&stream, max_payload).await?;
    let schedule = ScheduleBucket::open(&stream, &name).await?;
    let data_dir = match config.ephemeral {
        true => None,
        false => {
            let (path, id) = (config.data_dir.clone(), stream.store_id().to_owned());
            let incarnation = stream.incarnation().clone();
            let by_store_id = stream.recorded_before();
            let prepared = move || prepare_dir(&path, &id, &incarnation, by_store_id);
            Some(blocking(prepared).await?)
        }
    };
    let dir = data_dir.as_ref().map(|dir| dir.path().to_owned());
    let bounds = stream.bounds().await?;
    let (store, applied, source, follower) =
        recover(config, &stream, &bucket, dir.as_deref(), bounds).await?;
    tracing::info!(
        replica = %name,
        stream = stream.name(),
        store_id = store.store_id(),
        revision = store.revision(),
        stream_sequence = applied,
        stream_last = bounds.last,
        profiles = store.len(),
        source,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "replica recovered"
    );
    let replica = Prepared::new(
        config,
        name,
        nats,
        stream,
        bucket,
        follower,
        applied,
        &store,
        data_dir.as_ref(),
    );
    Ok(Opened {
        store,
        data_dir,
        replica,
        dead_letters,
        schedule,
    })
}

/// The store as of the starting point, the stream sequence it is as of, where it came from,
/// and the stream followed from there. A downloaded snapshot that turns out unusable is
/// removed.
async fn recover(
    config: &Config,
    stream: &UpdateStream,
    bucket: &SnapshotBucket,
    dir: Option<&Path>,
    bounds: Bounds,
) -> anyhow::Result<(Store, u64, &'static str, Follower)> {
    let stall = config.nats.request_timeout * DOWNLOAD_STALL_REQUESTS;
    let mut passed_over = PassedOver::default();
    let (store, applied, source, downloaded) = loop {
        let chosen = choose_start(stream, bucket, dir, bounds, &passed_over).await?;
        let (start, source, published) = match chosen {
            Chosen::Start(start, source) => (start, source, None),
            Chosen::Published(published) => {
                match download(bucket, &published, dir, stall, &passed_over).await {
                    Ok(start) => (Some(start), PUBLISHED, Some(published)),
                    Err(error) if retry_reason(&error).is_some() => return Err(error),
                    Err(error) => {
                        passed_over.add(published, &error);
                        continue;
                    }
                }
            }
            Chosen::Earlier(earlier) => {
                let (store, applied, downloaded) =
                    start_from_earlier(config, stream, bucket, bounds, &earlier, dir, stall)
                        .await?;
                break (store, applied, EARLIER, downloaded);
            }
        };
        let store = Store::with_history(config.history(), stream.store_id());
        let Some(start) = start else {
            break (store, 0, source, None);
        };
        // In the data directory, a download is a file like the replica's own snapshots.
        let downloaded = (source == PUBLISHED && dir.is_some()).then(|| start.path.clone());
        match load(&store, &start, dir.is_none()).await {
            Ok(applied) => break (store, applied, source, downloaded),
            Err(error) => match published {
                // A replica's own snapshots are copies of what the stream and the published
                // ones hold: a damaged one is set aside, and start-up goes on without it (it
                // used to refuse to start, for good, with a single node's advice).
                None => set_aside(&start.path, &error)?,
                Some(published) => {
                    remove_download(downloaded.as_deref(), &error);
                    passed_over.add(published, &error);
                }
            },
        }
    };
    match Follower::start(stream, applied).await {
        Ok(follower) => Ok((store, applied, source, follower)),
        // The stream was purged past the download while it downloaded, most likely.
        Err(error) => {
            let error = anyhow::Error::new(error);
            remove_download(downloaded.as_deref(), &error);
            Err(error)
        }
    }
}

fn bad_configuration(reason: String) -> anyhow::Error {
    anyhow::Error::new(BadConfiguration(anyhow::anyhow!(reason)))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("start-up task")?
}

/// Opens and locks the data directory, refuses a single node's journal, removes what a crash
/// left half-written, and makes it the directory of store `store_id`, of the stream's
/// incarnation `this`. When the store id is of one incarnation (`by_store_id`:
/// `UpdateStream::recorded_before`), it alone tells whether the directory's snapshots are of
/// this stream: the marks an incarnation is told by drift over its life, and a directory
/// compared by them set its snapshots aside after a restored stream was scaled down and up
/// again while its replica was stopped (found by an adversarial run).
fn prepare_dir(
    path: &Path,
    store_id: &str,
    this: &Incarnation,
    by_store_id: bool,
) -> anyhow::Result<DataDir> {
    let mut dir = DataDir::open(path)?;
    if !journal::segments(dir.path())?.is_empty() {
        bail!(
            "{} holds a single node's journal (journal-*.log): replicated mode keeps no journal \
             (the stream is the log); start each replica on its own empty --data-dir, or run \
             without --nats-url",
            dir.path().display()
        );
    }
    for entry in std::fs::read_dir(dir.path()).context("listing the data directory")? {
        let file = entry.context("listing the data directory")?.path();
        if file.to_string_lossy().ends_with(".snap.tmp") {
            std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        }
    }
    let recorded = recorded_incarnation(dir.path())?;
    // A directory of an earlier build records no creation: its store id alone decides.
    let other_stream = !by_store_id && recorded.as_ref().is_some_and(|recorded| !recorded.is(this));
    if dir.store_id() != store_id || other_stream {
        let snapshots = snapshot::list(dir.path())?;
        if !snapshots.is_empty() {
            let aside = match &recorded {
                Some(Incarnation {
                    created: Some(created),
                    ..
                }) if other_stream => format!("stale-{}-{created}", dir.store_id()),
                _ => format!("stale-{}", dir.store_id()),
            };
            let aside = dir.path().join(aside);
            std::fs::create_dir_all(&aside)
                .with_context(|| format!("creating {}", aside.display()))?;
            for (_, file) in &snapshots {
                let to = aside.join(file.file_name().unwrap_or_default());
                std::fs::rename(file, &to)
                    .with_context(|| format!("moving {} aside", file.display()))?;
            }
            tracing::warn!(
                moved_to = %aside.display(),
                old_store_id = dir.store_id(),
                store_id,
                "the data directory held snapshots of another stream (it was replaced): moved \
                 aside, starting from this stream's"
            );
        }
        dir.adopt_store_id(store_id)?;
        sync_dir(dir.path()).context("syncing the data directory")?;
    }
    if recorded.as_ref() != Some(this) {
        record_incarnation(dir.path(), this)?;
    }
    Ok(dir)
}

/// The incarnation of the stream the data directory in `dir` followed (`STREAM_CREATED`, and
/// `STREAM_RAFT_GROUP` on a cluster); `None` in a directory of an earlier build, or one that
/// followed none, and when the record does not parse (said in a warning: it is rewritten).
fn recorded_incarnation(dir: &Path) -> anyhow::Result<Option<Incarnation>> {
    let created = read_record(&dir.join(STREAM_CREATED_FILE))?;
    let raft_group = read_record(&dir.join(STREAM_RAFT_GROUP_FILE))?;
    let recorded = Incarnation::recorded(created.as_deref(), raft_group.as_deref());
    if recorded.is_none() && (created.is_some() || raft_group.is_some()) {
        tracing::warn!(
            dir = %dir.display(),
            "the data directory's record of its stream ({STREAM_CREATED_FILE}, \
             {STREAM_RAFT_GROUP_FILE}) does not parse: taken for none, and written again"
        );
    }
    Ok(recorded)
}

/// The text of one of the data directory's stream records; `None` when the file is missing.
/// Bytes that are not UTF-8 are read as a record that does not parse, with U+FFFD where they
/// were, not as an error: read strictly, such a file stopped every start (exit 1) where a
/// garbled record in UTF-8 is warned of and written again (found by two adversarial runs).
/// It is a small file the service itself wrote, so reading it whole on the runtime is fine.
fn read_record(file: &Path) -> Result<Option<String>, IoError> {
    match std::fs::read(file) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(IoError::new(file, "read", error)),
    }
}

/// Records `this` as the incarnation the data directory in `dir` follows. The group first: a
/// crash between the two writes leaves a record that still matches the stream by its group,
/// or by its time.
fn record_incarnation(dir: &Path, this: &Incarnation) -> anyhow::Result<()> {
    let group_file = dir.join(STREAM_RAFT_GROUP_FILE);
    match &this.raft_group {
        Some(group) => {
            crate::data_dir::write_atomically(&group_file, format!("{group}\n").as_bytes())
                .map_err(|error| IoError::new(&group_file, "write", error))?
        }
        None => match std::fs::remove_file(&group_file) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(IoError::new(&group_file, "remove", error).into()),
        },
    }
    if let Some(created) = &this.created {
        let created_file = dir.join(STREAM_CREATED_FILE);
        crate::data_dir::write_atomically(&created_file, format!("{created}\n").as_bytes())
            .map_err(|error| IoError::new(&created_file, "write", error))?;
    }
    sync_dir(dir).context("syncing the data directory")
}

/// Refuses to go on when the stream does not exist but the data directory records one it
/// followed (`STREAM_CREATED`): the stream was deleted or lost (a NATS cluster rebuilt empty),
/// and the stream `UpdateStream::ensure` would create would be a new, empty store, taking
/// webhooks that restoring the stream from its backup then drops. The snapshot bucket is the
/// other witness (`JetStreamError::Lost`), but it is lost with the cluster's disks.
async fn refuse_if_followed_before(
    nats: &Nats,
    settings: &StreamSettings,
    dir: &Path,
) -> anyhow::Result<()> {
    let created_file = dir.join(STREAM_CREATED_FILE);
    let Some(recorded) = read_record(&created_file)? else {
        return Ok(());
    };
    let recorded = recorded.trim().to_owned();
    if UpdateStream::exists(nats, &settings.name).await? {
        return Ok(());
    }
    Err(FollowedStreamMissing {
        stream: settings.name.clone(),
        created: recorded,
        record: created_file,
    }
    .into())
}

/// The stream is missing, and the data directory followed one of that name
/// ([`refuse_if_followed_before`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "stream {stream} does not exist, but this replica's data directory followed a stream \
     (created {created}, recorded in {}): it was deleted or lost. No new, empty one is created: webhooks \
     acknowledged into it would be dropped by restoring the stream from its backup. Restore it \
     (README, \"Backing up the stream\"); to start a new, empty store on purpose, start this \
     replica on an empty --data-dir",
    record.display()
)]
struct FollowedStreamMissing {
    stream: String,
    created: String,
    record: PathBuf,
}

/// The data directory's record of when its stream was created.
const STREAM_CREATED_FILE: &str = "STREAM_CREATED";
/// The data directory's record of its stream's Raft group (on a cluster).
const STREAM_RAFT_GROUP_FILE: &str = "STREAM_RAFT_GROUP";

/// Where start-up's store comes from: [`LOCAL`], [`PUBLISHED`], or the whole stream.
const LOCAL: &str = "local snapshot";
/// A published snapshot, downloaded.
const PUBLISHED: &str = "published snapshot";
/// A published snapshot of an earlier incarnation of the stream, downloaded.
const EARLIER: &str = "published snapshot of an earlier incarnation of the stream";
/// The whole stream, every published snapshot having been passed over.
const WHOLE_STREAM: &str = "the whole stream";

/// What start-up starts from ([`choose_start`]).
enum Chosen {
    /// A local snapshot, or none: the whole stream; and where it came from.
    Start(Option<Start>, &'static str),
    /// The newest published snapshot not passed over, to download and load.
    Published(SnapshotInfo),
    /// The snapshots of an earlier incarnation the stream continues, to download and load in
    /// turn ([`start_from_earlier`]), and the bucket's others.
    Earlier(Earlier),
}

/// This incarnation's published snapshots that failed to download or load in this start-up,
/// each with why. A damaged newest one failed every start, on every replica with an empty data
/// directory, for good while the cluster published no newer one, though the older one, which
/// the stream continues too, would have started it: each one that fails is named in a warning
/// and passed over for the next older, then for the whole stream if it still starts at its
/// first message.
#[derive(Default)]
struct PassedOver(Vec<(SnapshotInfo, String)>);

impl PassedOver {
    fn add(&mut self, snapshot: SnapshotInfo, error: &anyhow::Error) {
        let error = format!("{error:#}");
        tracing::warn!(
            snapshot = %snapshot.name,
            stream_sequence = snapshot.stream_sequence,
            %error,
            "a published snapshot cannot be used: trying the next older one, else the stream"
        );
        self.0.push((snapshot, error));
    }

    fn holds(&self, snapshot: &SnapshotInfo) -> bool {
        self.0
            .iter()
            .any(|(passed, _)| passed.name == snapshot.name)
    }

    /// `error`, with each one passed over and why, if any was.
    fn onto(&self, error: anyhow::Error) -> anyhow::Error {
        match self.0.is_empty() {
            true => error,
            false => error.context(format!(
                "no published snapshot could be used{}",
                self.named()
            )),
        }
    }

    /// Each one and why, for an error that ends start-up; empty when none was.
    fn named(&self) -> String {
        let each: Vec<String> = (self.0.iter())
            .map(|(snapshot, error)| {
                let sequence = snapshot.stream_sequence;
                format!("{} (as of sequence {sequence}): {error}", snapshot.name)
            })
            .collect();
        match each.is_empty() {
            true => String::new(),
            false => format!(
                "; passed over, as they could not be used: {}",
                each.join("; ")
            ),
        }
    }
}

/// The snapshot to start from, and where it came from: the oldest local one the stream
/// continues from, else the newest published one not `passed_over`, else none (the whole
/// stream, if it still starts at its first message), else those of an earlier incarnation
/// the stream continues. Those are also tried when the stream was purged past this
/// incarnation's newest.
async fn choose_start(
    stream: &UpdateStream,
    bucket: &SnapshotBucket,
    dir: Option<&Path>,
    bounds: Bounds,
    passed_over: &PassedOver,
) -> anyhow::Result<Chosen> {
    if let Some(dir) = dir
        && let Some(start) = choose_local(dir.to_owned(), bounds.first, bounds.last).await?
    {
        return Ok(Chosen::Start(Some(start), LOCAL));
    }
    let mut published = bucket.list().await?;
    published.retain(|snapshot| !passed_over.holds(snapshot));
    match published.pop() {
        // The stream was purged past it too (by hand, or a limit): downloading it only to
        // fail would repeat at every restart. Start-up waits for a newer one instead, unless
        // an earlier incarnation's starts the stream (one restored, then purged by hand).
        Some(published) if published.stream_sequence + 1 < bounds.first => {
            let earlier = restored::earlier_start(stream, bucket, bounds).await?;
            if !earlier.continued.is_empty() {
                return Ok(Chosen::Earlier(earlier));
            }
            Err(JetStreamError::StartBelowFirst {
                stream: stream.name().to_string(),
                requested: published.stream_sequence + 1,
                first: bounds.first,
            })
            .context(format!(
                "the newest published snapshot ({}, as of stream sequence {}) is older than \
                 the stream's first message: waiting for a replica to publish a newer one{}",
                published.name,
                published.stream_sequence,
                passed_over.named()
            ))
        }
        Some(published) => Ok(Chosen::Published(published)),
        None if bounds.first > 1 => {
            let earlier = restored::earlier_start(stream, bucket, bounds).await?;
            match earlier.continued.is_empty() {
                true => Err(passed_over.onto(uncovered(stream, bucket, bounds, &earlier.refused))),
                false => Ok(Chosen::Earlier(earlier)),
            }
        }
        None if !passed_over.0.is_empty() => {
            tracing::warn!(
                passed_over = passed_over.0.len(),
                stream_last = bounds.last,
                "no published snapshot could be used: applying the whole stream, which still \
                 starts at its first message"
            );
            Ok(Chosen::Start(None, WHOLE_STREAM))
        }
        None => Ok(Chosen::Start(None, "empty store")),
    }
}

/// The error for a stream purged below its first message that no published snapshot starts.
/// Each snapshot is named with its reason: "is empty", said of a bucket holding an earlier
/// stream's snapshots, sent the operator after the wrong cause.
fn uncovered(
    stream: &UpdateStream,
    bucket: &SnapshotBucket,
    bounds: Bounds,
    refused: &[(EarlierSnapshot, restored::Refusal)],
) -> anyhow::Error {
    let incarnation = stream.incarnation().to_string();
    let why = restored::refusals(bucket.name(), &incarnation, refused);
    purged_below(stream, bounds, &why)
}

/// The error for a stream purged below its first message, where no published snapshot
/// started it, and `why`.
fn purged_below(stream: &UpdateStream, bounds: Bounds, why: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "stream {} starts at sequence {}: the messages before it were purged, and no published \
         snapshot of store {} covers them ({why})",
        stream.name(),
        bounds.first,
        stream.store_id(),
    )
}

/// Starts from the newest of `earlier`'s continued snapshots that downloads and loads: the
/// store, the stream sequence it is as of, and the download (in `dir`). One that fails is
/// logged, its download removed, and the next one tried: a damaged object in a restored bucket
/// stays there until the stream's own replicas publish, which takes a replica that started,
/// and failing on it failed every start, for good, where an older one would do (found by an
/// adversarial run). A failure worth another attempt of the whole start-up (`retry_reason`:
/// replaced while it downloaded, JetStream not answering) is not the snapshot's: returned at
/// once, as before. When every one failed, the error names each, and each refused one.
async fn start_from_earlier(
    config: &Config,
    stream: &UpdateStream,
    bucket: &SnapshotBucket,
    bounds: Bounds,
    earlier: &Earlier,
    dir: Option<&Path>,
    stall: Duration,
) -> anyhow::Result<(Store, u64, Option<PathBuf>)> {
    let mut failed = Vec::new();
    for (tried, snapshot) in earlier.continued.iter().enumerate() {
        let error = match load_earlier(config, stream, bucket, snapshot, dir, stall).await {
            Ok(started) => return Ok(started),
            Err(error) if retry_reason(&error).is_some() => return Err(error),
            Err(error) => error,
        };
        tracing::warn!(
            snapshot = %snapshot.snapshot.name,
            stream_sequence = snapshot.snapshot.stream_sequence,
            error = %format!("{error:#}"),
            left = earlier.continued.len() - tried - 1,
            "a snapshot of an earlier incarnation of the stream cannot be used: trying the next \
             older one the stream continues, if any"
        );
        failed.push((snapshot.clone(), format!("{error:#}")));
    }
    let incarnation = stream.incarnation().to_string();
    let why = restored::failures(bucket.name(), &incarnation, &failed, &earlier.refused);
    Err(purged_below(stream, bounds, &why))
}

/// Downloads `earlier`, a snapshot of an earlier incarnation of the stream that the stream
/// continues, saying so (the stream was restored from a backup, most likely), and loads it
/// into a new store. A download that does not load is removed.
async fn load_earlier(
    config: &Config,
    stream: &UpdateStream,
    bucket: &SnapshotBucket,
    earlier: &EarlierSnapshot,
    dir: Option<&Path>,
    stall: Duration,
) -> anyhow::Result<(Store, u64, Option<PathBuf>)> {
    tracing::warn!(
        stream = stream.name(),
        incarnation = %stream.incarnation(),
        snapshot = %earlier.snapshot.name,
        snapshot_stream_created = %earlier.stream_created,
        stream_sequence = earlier.snapshot.stream_sequence,
        "starting from a snapshot of an earlier incarnation of the stream (restored from a \
         backup): the stream's message at its sequence is the one the snapshot was taken after"
    );
    let start = download(
        bucket,
        &earlier.snapshot,
        dir,
        stall,
        &PassedOver::default(),
    )
    .await?;
    let store = Store::with_history(config.history(), stream.store_id());
    let downloaded = dir.is_some().then(|| start.path.clone());
    match load(&store, &start, dir.is_none()).await {
        Ok(applied) => Ok((store, applied, downloaded)),
        Err(error) => {
            remove_download(downloaded.as_deref(), &error);
            Err(error)
        }
    }
}

/// Removes a downloaded snapshot start-up cannot use (the stream was purged past it while it
/// downloaded, or it does not load): each attempt left one behind, tens of megabytes, and a
/// supervised replica outrun again and again filled the disk (found by an adversarial run).
/// The bucket still has it, or a newer one. The replica's own snapshots never come here.
fn remove_download(downloaded: Option<&Path>, why: &anyhow::Error) {
    let Some(path) = downloaded else { return };
    let removed = std::fs::remove_file(path).map_err(|error| IoError::new(path, "remove", error));
    match removed {
        Ok(()) => tracing::warn!(
            snapshot = %path.display(),
            error = %format!("{why:#}"),
            "the downloaded snapshot cannot be used: removed"
        ),
        Err(error) => tracing::warn!(
            snapshot = %path.display(),
            %error,
            "the downloaded snapshot cannot be used, and could not be removed"
        ),
    }
}

/// Renames a local snapshot that could not be loaded to `<name>.damaged`, out of every later
/// start's way, and says so.
fn set_aside(path: &Path, error: &anyhow::Error) -> anyhow::Result<()> {
    let aside = snapshot::set_aside(path, ".damaged")?;
    tracing::warn!(
        error = %format!("{error:#}"),
        set_aside_as = %aside.display(),
        "a local snapshot could not be loaded: set aside, starting without it (from an older \
         local snapshot, the newest published one, or the stream)"
    );
    Ok(())
}

/// The oldest local snapshot the stream (now holding `first..=last`) continues from.
async fn choose_local(dir: PathBuf, first: u64, last: u64) -> anyhow::Result<Option<Start>> {
    blocking(move || {
        for (_, path) in snapshot::list(&dir)? {
            let header = match snapshot::read_header(&path) {
                Ok(header) => header,
                Err(error) => {
                    tracing::warn!(%error, "a local snapshot cannot be read; not starting from it");
                    continue;
                }
            };
            let sequence = header.stream_sequence;
            if sequence > 0 && sequence + 1 >= first && sequence <= last {
                return Ok(Some(Start {
                    path,
                    revision: header.revision,
                    stream_sequence: sequence,
                }));
            }
        }
        Ok(None)
    })
    .await
}

/// Downloads a published snapshot: into the data directory as an ordinary local snapshot
/// (temporary file, synced, renamed), or into a temporary file when ephemeral. A download that
/// gets no byte for `stall` is given up; one that ends early says whether the snapshot is
/// still the newest published, and is [`Replaced`] when it is not.
async fn download(
    bucket: &SnapshotBucket,
    published: &SnapshotInfo,
    dir: Option<&Path>,
    stall: Duration,
    passed_over: &PassedOver,
) -> anyhow::Result<Start> {
    let name = format!("snapshot-{:020}.snap", published.revision);
    let (temp, path) = match dir {
        Some(dir) => (dir.join(format!("{name}.tmp")), dir.join(&name)),
        None => {
            let unique = crate::data_dir::new_store_id();
            let temp = std::env::temp_dir().join(format!("profile-state-{unique}.snap.tmp"));
            (temp.clone(), temp)
        }
    };
    tracing::info!(
        snapshot = %published.name,
        revision = published.revision,
        stream_sequence = published.stream_sequence,
        bytes = published.size,
        "downloading published snapshot"
    );
    if let Err(interrupted) = copy_into(bucket, published, &temp, stall).await {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(download_failed(bucket, published, interrupted, passed_over).await);
    }
    if let Some(dir) = dir {
        tokio::fs::rename(&temp, &path).await?;
        sync_dir(dir)?;
    }
    tracing::info!(
        snapshot = %published.name,
        revision = published.revision,
        stream_sequence = published.stream_sequence,
        bytes = published.size,
        "published snapshot downloaded"
    );
    Ok(Start {
        path,
        revision: published.revision,
        stream_sequence: published.stream_sequence,
    })
}

/// A download that ended early: how far it got, and why.
struct Interrupted {
    copied: u64,
    cause: anyhow::Error,
}

/// Copies `published` into `temp` and syncs it, giving up after `stall` without a byte.
async fn copy_into(
    bucket: &SnapshotBucket,
    published: &SnapshotInfo,
    temp: &Path,
    stall: Duration,
) -> Result<(), Interrupted> {
    let mut copied = 0;
    let result = async {
        let mut reader = bucket.read(published).await?;
        let mut file = tokio::fs::File::create(temp).await?;
        let mut buffer = vec![0; 128 * 1024];
        loop {
            let Ok(read) = tokio::time::timeout(stall, reader.read(&mut buffer)).await else {
                bail!(
                    "no byte arrived for {} ({DOWNLOAD_STALL_REQUESTS} × --nats-request-timeout)",
                    humantime::format_duration(stall)
                );
            };
            let read = read?;
            if read == 0 {
                break;
            }
            file.write_all(&buffer[..read]).await?;
            copied += read as u64;
        }
        file.flush().await?;
        file.sync_all().await?;
        anyhow::Ok(())
    }
    .await;
    result.map_err(|cause| Interrupted { copied, cause })
}

/// The error for a download that ended early. The bucket is asked what became of the snapshot
/// (a download cut off by a long pause said only "missed idle heartbeat"): retired or
/// replaced by a newer one meanwhile, it is [`Replaced`], which start-up tries again with the
/// newest; still the newest not `passed_over` (or, for an earlier incarnation's, still there
/// and this one has published none), the failure is the download's own, its cause kept (a
/// bucket that does not answer is tried again, as before).
async fn download_failed(
    bucket: &SnapshotBucket,
    published: &SnapshotInfo,
    interrupted: Interrupted,
    passed_over: &PassedOver,
) -> anyhow::Error {
    let failure = format!(
        "downloading published snapshot {} failed after {} of {} bytes",
        published.name, interrupted.copied, published.size
    );
    let snapshots = match bucket.list().await {
        Ok(snapshots) => snapshots,
        Err(error) => {
            return interrupted.cause.context(format!(
                "{failure} (whether it is still in bucket {} could not be checked: {error})",
                bucket.name()
            ));
        }
    };
    let newest = (snapshots.iter())
        .rfind(|snapshot| !passed_over.holds(snapshot))
        .map(|newest| newest.name.clone());
    let kept = snapshots.iter().any(|kept| kept.name == published.name)
        || (bucket.of_earlier_streams().await).is_ok_and(|earlier| {
            earlier
                .iter()
                .any(|kept| kept.snapshot.name == published.name)
        });
    match newest.as_ref() {
        Some(newest) if kept && *newest == published.name => {
            let newer_failed = match passed_over.0.is_empty() {
                true => "",
                false => " but those passed over",
            };
            return interrupted.cause.context(format!(
                "{failure} (it is still the newest snapshot in bucket {}{newer_failed})",
                bucket.name()
            ));
        }
        None if kept => {
            return interrupted.cause.context(format!(
                "{failure} (it is still in bucket {}, and this stream has published none of its \
                 own)",
                bucket.name()
            ));
        }
        _ => {}
    }
    Replaced {
        failure: format!("{failure}: {:#}", interrupted.cause),
        snapshot: published.name.clone(),
        kept,
        newest,
    }
    .into()
}

/// A published snapshot that was retired (deleted), or replaced by a newer one, while it
/// downloaded; start-up tries again with the newest.
#[derive(Debug, thiserror::Error)]
#[error(
    "{failure}; the snapshot {snapshot} was replaced while it downloaded ({})",
    fate(*kept, newest.as_deref())
)]
struct Replaced {
    failure: String,
    snapshot: String,
    /// Whether the bucket still holds it (a newer one was published), or it was deleted.
    kept: bool,
    /// The newest published snapshot now.
    newest: Option<String>,
}

fn fate(kept: bool, newest: Option<&str>) -> String {
    let newest = match newest {
        Some(newest) => format!("the newest is now {newest}"),
        None => "the bucket holds none now".to_string(),
    };
    match kept {
        true => format!("it is still in the bucket, but {newest}"),
        false => format!("it is no longer in the bucket; {newest}"),
    }
}

/// Loads `start` into the (fresh) store; returns its stream sequence. A temporary download
/// (`remove`) is deleted afterwards.
async fn load(store: &Store, start: &Start, remove: bool) -> anyhow::Result<u64> {
    let (store, path, revision) = (store.clone(), start.path.clone(), start.revision);
    let read = blocking(move || {
        let read = snapshot::read(&path, |expected, profiles| {
            store.restore(expected, profiles, revision)
        });
        if remove {
            let _ = std::fs::remove_file(&path);
        }
        Ok(read?)
    })
    .await?;
    if read != start.revision {
        bail!(
            "{}: the snapshot's header says revision {read}, expected {}",
            start.path.display(),
            start.revision
        );
    }
    Ok(start.stream_sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose bytes are not UTF-8 is a record that does not parse: taken for none and
    /// written again, where reading it strictly stopped every start with exit 1 (found by two
    /// adversarial runs). Each record is read on its own, so a valid group still counts.
    #[test]
    fn a_record_that_is_not_utf8_is_one_that_does_not_parse() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let created = dir.path().join(STREAM_CREATED_FILE);
        std::fs::write(&created, b"2026-12-05T00:00:00\xffZ\n").expect("written");
        assert_eq!(recorded_incarnation(dir.path()).expect("read"), None);
        let followed = read_record(&created).expect("read").expect("present");
        assert!(followed.contains('\u{FFFD}'), "{followed:?}");
        std::fs::write(dir.path().join(STREAM_RAFT_GROUP_FILE), b"S-R3F-abc\n").expect("written");
        let recorded = recorded_incarnation(dir.path())
            .expect("read")
            .expect("the group");
        assert_eq!(recorded.raft_group.as_deref(), Some("S-R3F-abc"));
        assert_eq!(recorded.created, None);
        assert_eq!(read_record(&dir.path().join("absent")).expect("read"), None);
    }

    /// Without quorum, a new replica's snapshot bucket timed out and start-up gave up after
    /// one attempt, where the README promises 30 s of attempts (found by an adversarial run).
    #[test]
    fn bucket_failures_are_tried_again_and_the_configuration_is_not() {
        let bucket = JetStreamError::Bucket {
            bucket: "PROFILE_STATE_SNAPSHOTS".into(),
            key: "*".into(),
            reason: "timed out".into(),
        };
        assert!(retry_reason(&anyhow::Error::new(bucket)).is_some());
        let unavailable = JetStreamError::Unavailable {
            operation: "stream info",
            reason: "timed out".into(),
        };
        assert!(retry_reason(&anyhow::Error::new(unavailable)).is_some());
        // The stream purged past the newest published snapshot: not downloaded only to fail,
        // and tried again while another replica may publish a newer one (a replica restarted
        // into it crash-looped, downloading it each time: found by an adversarial run).
        let purged = JetStreamError::StartBelowFirst {
            stream: "PROFILE_STATE".into(),
            requested: 101,
            first: 500,
        };
        assert!(
            retry_reason(
                &anyhow::Error::new(purged).context("waiting for a replica to publish a newer one")
            )
            .is_some()
        );
        // A snapshot retired while it downloaded: the newest is downloaded instead (start-up
        // hung on it for good: found by an adversarial run).
        let replaced = Replaced {
            failure: "downloading published snapshot snapshot-1 failed".into(),
            snapshot: "snapshot-1".into(),
            kept: false,
            newest: Some("snapshot-2".into()),
        };
        let reason = retry_reason(&anyhow::Error::new(replaced).context("choosing a start"));
        assert!(reason.is_some_and(|reason| reason.contains("replaced")));
        // A stream that existed, missing: a restore may be under way (a replica that created
        // it again made a new, empty store of it).
        let lost = JetStreamError::Lost {
            stream: "PROFILE_STATE".into(),
            bucket: "PROFILE_STATE_SNAPSHOTS".into(),
        };
        assert_eq!(
            retry_reason(&anyhow::Error::new(lost)),
            Some(LOST_STREAM_RETRY)
        );
        let followed = FollowedStreamMissing {
            stream: "PROFILE_STATE".into(),
            created: "2026-12-05T00:00:00Z".into(),
            record: PathBuf::from("data/STREAM_CREATED"),
        };
        assert_eq!(
            retry_reason(&anyhow::Error::new(followed)),
            Some(LOST_STREAM_RETRY)
        );
        let mismatch = JetStreamError::Mismatch {
            name: "PROFILE_STATE".into(),
            setting: "replicas",
            expected: "3".into(),
            found: "1".into(),
        };
        assert!(retry_reason(&anyhow::Error::new(mismatch)).is_none());
    }
}
