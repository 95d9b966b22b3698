//! Start-up of a replica: connect, open (or create) the stream, and rebuild the store from a
//! snapshot before following the stream.
//!
//! The starting point is, in order of preference:
//! 1. the oldest local snapshot the stream still continues from (the longest watch history
//!    after the restart, as a single node chooses; local snapshots lag the history window);
//! 2. the newest published snapshot (`<stream>_SNAPSHOTS`), downloaded into the data
//!    directory first (an empty disk, or the stream was purged past every local snapshot);
//! 3. an empty store, when the stream still holds its first message.
//!
//! The data directory records the store id of the stream it belongs to, and when that stream
//! was created (`STREAM_CREATED`: a stream deleted and created again with its configuration
//! keeps its store id): a directory of another stream has its snapshots moved aside to
//! `stale-<old id>/` before anything else. A single node's journal is refused: replicated mode
//! keeps none, and a directory is one or the other.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;

use super::Prepared;
use crate::config::Config;
use crate::data_dir::{DataDir, sync_dir};
use crate::io_error::IoError;
use crate::jetstream::{
    Bounds, DeadLetterBucket, Follower, JetStreamError, Nats, ScheduleBucket, SnapshotBucket,
    SnapshotInfo, StreamCreated, StreamSettings, UpdateStream,
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

/// How long start-up keeps trying while JetStream does not answer a request in time (the
/// connection itself is up): a stream or cluster formed a moment ago is still electing its
/// leaders, and a replica that exited on that would only be restarted into the same wait.
const START_PATIENCE: Duration = Duration::from_secs(30);
/// Longest pause between two start-up attempts.
const MAX_START_PAUSE: Duration = Duration::from_secs(2);

/// Connects, checks or creates the stream, opens the data directory, and loads the starting
/// point. Settings that cannot work are [`BadConfiguration`]; an unreachable NATS is not, and
/// fails at once. JetStream not answering in time is tried again from the start, with
/// backoff, for up to [`START_PATIENCE`].
pub async fn open(config: &Config) -> anyhow::Result<Opened> {
    let deadline = Instant::now() + START_PATIENCE;
    let mut pause = Duration::from_millis(100);
    loop {
        match open_once(config).await {
            Err(error) if jetstream_unavailable(&error) && Instant::now() + pause < deadline => {
                tracing::warn!(error = %format!("{error:#}"), "start-up: jetstream did not answer in time; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_START_PAUSE);
            }
            opened => return opened,
        }
    }
}

/// Whether start-up failed because JetStream did not answer (worth another attempt), rather
/// than because of the configuration, the data directory or the stream's content. A bucket's
/// failure counts: without quorum, opening or listing the snapshot bucket times out too (a
/// damaged snapshot is tried again as well, and fails the same way at the end). So does a
/// stream purged past every snapshot: a replica may publish a newer one meanwhile.
fn jetstream_unavailable(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<JetStreamError>(),
        Some(
            JetStreamError::Unavailable { .. }
                | JetStreamError::Bucket { .. }
                | JetStreamError::StartBelowFirst { .. }
        )
    )
}

/// One attempt of [`open`]; everything it opened is dropped again if it fails.
async fn open_once(config: &Config) -> anyhow::Result<Opened> {
    let started = std::time::Instant::now();
    let name = config.nats.replica_name();
    let nats = Nats::connect(&config.nats, &name).await?;
    let max_payload = nats.max_payload();
    if config.max_body_bytes > max_payload {
        return Err(bad_configuration(format!(
            "--max-body-bytes {} is larger than the NATS server's max_payload ({max_payload} \
             bytes): a webhook that size could not be published; lower --max-body-bytes or \
             raise max_payload in the NATS configuration",
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
    let stream = match UpdateStream::ensure(&nats, &settings).await {
        Ok(stream) => stream,
        Err(
            error @ (JetStreamError::Mismatch { .. } | JetStreamError::ReplicasNotSupported { .. }),
        ) => {
            return Err(bad_configuration(error.to_string()));
        }
        Err(error) => return Err(error.into()),
    };
    let bucket = SnapshotBucket::open(&stream).await?;
    let dead_letters = DeadLetterBucket::open(&stream, max_payload).await?;
    let schedule = ScheduleBucket::open(&stream, &name).await?;
    let data_dir = match config.ephemeral {
        true => None,
        false => {
            let (path, id) = (config.data_dir.clone(), stream.store_id().to_owned());
            let created = stream.created();
            Some(blocking(move || prepare_dir(&path, &id, created)).await?)
        }
    };
    let dir = data_dir.as_ref().map(|dir| dir.path().to_owned());
    let bounds = stream.bounds().await?;
    let (store, applied, source) = loop {
        let (start, source) = choose_start(&stream, &bucket, dir.as_deref(), bounds).await?;
        let store = Store::with_history(config.history(), stream.store_id());
        let Some(start) = start else {
            break (store, 0, source);
        };
        match load(&store, &start, dir.is_none()).await {
            Ok(applied) => break (store, applied, source),
            // A replica's own snapshots are copies of what the stream and the published ones
            // hold: a damaged one is set aside, and start-up goes on without it (it used to
            // refuse to start, for good, with a single node's advice).
            Err(error) if source == LOCAL => set_aside(&start.path, &error)?,
            Err(error) => return Err(error),
        }
    };
    let follower = Follower::start(&stream, applied).await?;
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
/// left half-written, and makes it the directory of store `store_id`, of the stream `created`
/// then.
fn prepare_dir(path: &Path, store_id: &str, created: StreamCreated) -> anyhow::Result<DataDir> {
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
    let created_file = dir.path().join(STREAM_CREATED_FILE);
    let recorded = match std::fs::read_to_string(&created_file) {
        Ok(text) => StreamCreated::parse(&text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(IoError::new(&created_file, "read", error).into()),
    };
    // A directory of an earlier build records no creation: its store id alone decides.
    let other_stream = recorded.is_some_and(|recorded| recorded != created);
    if dir.store_id() != store_id || other_stream {
        let snapshots = snapshot::list(dir.path())?;
        if !snapshots.is_empty() {
            let aside = match other_stream {
                false => format!("stale-{}", dir.store_id()),
                true => format!("stale-{}-{}", dir.store_id(), recorded.unwrap_or(created)),
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
    if recorded != Some(created) {
        crate::data_dir::write_atomically(&created_file, format!("{created}\n").as_bytes())
            .map_err(|error| IoError::new(&created_file, "write", error))?;
        sync_dir(dir.path()).context("syncing the data directory")?;
    }
    Ok(dir)
}

/// The data directory's record of when its stream was created.
const STREAM_CREATED_FILE: &str = "STREAM_CREATED";

/// Where start-up's store comes from: [`LOCAL`], a published snapshot, or the whole stream.
const LOCAL: &str = "local snapshot";

/// The snapshot to start from, and where it came from: the oldest local one the stream
/// continues from, else the newest published one (downloaded into `dir`), else none (the
/// whole stream, if it still starts at its first message).
async fn choose_start(
    stream: &UpdateStream,
    bucket: &SnapshotBucket,
    dir: Option<&Path>,
    bounds: Bounds,
) -> anyhow::Result<(Option<Start>, &'static str)> {
    if let Some(dir) = dir
        && let Some(start) = choose_local(dir.to_owned(), bounds.first, bounds.last).await?
    {
        return Ok((Some(start), LOCAL));
    }
    match bucket.newest().await? {
        // The stream was purged past it too (by hand, or a limit): downloading it only to
        // fail would repeat at every restart. Start-up waits for a newer one instead.
        Some(published) if published.stream_sequence + 1 < bounds.first => {
            Err(JetStreamError::StartBelowFirst {
                stream: stream.name().to_string(),
                requested: published.stream_sequence + 1,
                first: bounds.first,
            })
            .context(format!(
                "the newest published snapshot ({}, as of stream sequence {}) is older than \
                 the stream's first message: waiting for a replica to publish a newer one",
                published.name, published.stream_sequence
            ))
        }
        Some(published) => {
            let start = download(bucket, &published, dir).await?;
            Ok((Some(start), "published snapshot"))
        }
        None if bounds.first > 1 => bail!(
            "stream {} starts at sequence {}: the messages before it were purged, and no \
             published snapshot of store {} covers them (bucket {}_SNAPSHOTS is empty)",
            stream.name(),
            bounds.first,
            stream.store_id(),
            stream.name()
        ),
        None => Ok((None, "empty store")),
    }
}

/// Renames a local snapshot that could not be loaded to `<name>.damaged`, out of every later
/// start's way, and says so.
fn set_aside(path: &Path, error: &anyhow::Error) -> anyhow::Result<()> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".damaged");
    std::fs::rename(path, &aside).with_context(|| format!("setting {} aside", path.display()))?;
    tracing::warn!(
        error = %format!("{error:#}"),
        set_aside_as = %Path::new(&aside).display(),
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
/// (temporary file, synced, renamed), or into a temporary file when ephemeral.
async fn download(
    bucket: &SnapshotBucket,
    published: &SnapshotInfo,
    dir: Option<&Path>,
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
    let copied = async {
        let mut reader = bucket.read(published).await?;
        let mut file = tokio::fs::File::create(&temp).await?;
        tokio::io::copy(&mut reader, &mut file).await?;
        file.flush().await?;
        file.sync_all().await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = copied {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(error.context(format!("downloading published snapshot {}", published.name)));
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

    /// Without quorum, a new replica's snapshot bucket timed out and start-up gave up after
    /// one attempt, where the README promises 30 s of attempts (found by an adversarial run).
    #[test]
    fn bucket_failures_are_tried_again_and_the_configuration_is_not() {
        let bucket = JetStreamError::Bucket {
            bucket: "PROFILE_STATE_SNAPSHOTS".into(),
            key: "*".into(),
            reason: "timed out".into(),
        };
        assert!(jetstream_unavailable(&anyhow::Error::new(bucket)));
        let unavailable = JetStreamError::Unavailable {
            operation: "stream info",
            reason: "timed out".into(),
        };
        assert!(jetstream_unavailable(&anyhow::Error::new(unavailable)));
        // The stream purged past the newest published snapshot: not downloaded only to fail,
        // and tried again while another replica may publish a newer one (a replica restarted
        // into it crash-looped, downloading it each time: found by an adversarial run).
        let purged = JetStreamError::StartBelowFirst {
            stream: "PROFILE_STATE".into(),
            requested: 101,
            first: 500,
        };
        assert!(jetstream_unavailable(
            &anyhow::Error::new(purged).context("waiting for a replica to publish a newer one")
        ));
        let mismatch = JetStreamError::Mismatch {
            name: "PROFILE_STATE".into(),
            setting: "replicas",
            expected: "3".into(),
            found: "1".into(),
        };
        assert!(!jetstream_unavailable(&anyhow::Error::new(mismatch)));
    }
}
