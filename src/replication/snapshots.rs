//! A replica's snapshots: local ones for a fast restart, published ones for a replica that
//! starts with an empty disk, and the stream purge they allow.
//!
//! After `--snapshot-every-records` changes (or `--snapshot-every-bytes` of stream messages)
//! the applier starts a snapshot in the background: the state as of the position it just
//! reached (revision and stream sequence, a pair only the applier knows exactly), written like
//! a single node's with the stream sequence in its header, then compacted as a single node's
//! (the newest snapshot below the history window stays, so a restart rebuilds the window),
//! less those the stream was purged past: no restart can use them.
//!
//! Then, if the bucket's newest snapshot is that many revisions older (checked at most every
//! 10 s: each check lists the bucket, which at a low `--snapshot-every-records` would otherwise
//! run many times a second), the replica
//! that wins the upload claim (`SnapshotBucket::claim_upload`; a claim in its own name, left
//! by a crash, is its own) publishes it, keeps the two newest, and
//! purges the stream below the older of the two (less `--nats-retain-after-snapshot`
//! messages): nothing the newest published snapshot does not cover is ever removed, and the
//! older one stays usable for a replica that is downloading it right now.
//!
//! The claim is a lease (`LEASE`): its holder renews it every 2 s while it uploads. A replica
//! that finds it held waits while it is renewed, and takes it over (compare-and-set on the
//! revision it saw, so one replica does) once it has seen it unchanged for 10 s by its own
//! clock: its holder was frozen or killed, or is of an earlier build, which never renews. A
//! holder that finds its claim taken over abandons its upload and removes its chunks; it
//! renews the claim once more before the snapshot is published, so a holder frozen past the
//! takeover publishes nothing over the new holder's snapshot. Renewed, a claim never lapses:
//! an upload still running after `CLAIM_TTL` (10 minutes) is abandoned as a failure.
//!
//! A full stream (`--nats-max-bytes`) refuses every publish, so nothing is applied and no
//! snapshot comes due: the applier asks for one at its position then ([`Snapshots::make_room`]),
//! published whatever the counts, and the stream is purged below it.
//!
//! A stop does not strand the claim: an upload still running when the replica starts stopping
//! gets half of `--shutdown-grace` to finish, then it is abandoned and the claim given back,
//! so that another replica publishes the next snapshot at once rather than after the lease's
//! 10 s. The chunks an upload stopped so (or crashed) stored stay in the bucket's stream under
//! no object; the next replica to publish removes them once they are as old as `CLAIM_TTL`
//! (10 minutes), so interrupted uploads do not fill the NATS servers' disks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::status::Position;
use crate::data_dir::LockRef;
use crate::jetstream::{
    CLAIM_TTL, Discarded, HeldClaim, JetStreamError, SnapshotBucket, SnapshotInfo, UpdateStream,
    Upload, UploadClaim,
};
use crate::journal::{JournalError, snapshot};
use crate::metrics::Metrics;
use crate::store::Store;

/// When and where a replica snapshots, and what it publishes.
pub(super) struct Snapshots {
    pub dir: PathBuf,
    /// Where each snapshot takes its share of the directory's lock while it writes and
    /// removes files in `dir`.
    pub lock: LockRef,
    pub store: Store,
    pub stream: UpdateStream,
    pub bucket: SnapshotBucket,
    pub every_records: u64,
    pub every_bytes: u64,
    /// The least time between two attempts to publish (`NatsConfig::snapshot_publish_interval`).
    pub publish_interval: Duration,
    /// When this replica last tried to publish.
    pub last_publish: Option<Instant>,
    pub history_events: u64,
    pub retain_after: u64,
    /// Who holds the upload claim (the replica's name).
    pub name: String,
    pub metrics: Metrics,
    pub tracker: TaskTracker,
    /// Cancelled when the replica starts stopping.
    pub stopping: CancellationToken,
    /// How long an upload may go on once `stopping` is cancelled.
    pub stop_allowance: Duration,
    pub records_since: u64,
    pub bytes_since: u64,
    pub running: Arc<AtomicBool>,
    /// The stream sequence of the last snapshot taken to make room, and when
    /// (`Snapshots::make_room`).
    pub room_made_at: Option<(u64, Instant)>,
    /// Set when the last snapshot job's publication failed ([`Snapshots::retry_publication`]).
    pub publication_failed: Arc<AtomicBool>,
    /// Set when a snapshot was taken without publishing it (within the publish interval of the
    /// last attempt): [`Snapshots::retry_publication`] publishes one once the interval passes.
    pub publication_skipped: bool,
}

impl Snapshots {
    /// The stream is full (it refuses every publish), so nothing is applied, so no snapshot
    /// came due, so none was published and nothing purged: it stayed full for good (found by
    /// an adversarial run). Takes one as of `at` and publishes it whatever the counts, then
    /// purges the stream below it, without `--nats-retain-after-snapshot` (with the default,
    /// a stream limited below 100,000 messages could never be freed). Once per position, and
    /// again after [`ROOM_RETRY`] (another replica held the upload claim and failed, say).
    pub(super) fn make_room(&mut self, at: Position) {
        let tried = |(sequence, when): (u64, Instant)| {
            sequence == at.sequence && when.elapsed() < ROOM_RETRY
        };
        if self.room_made_at.is_some_and(tried) || self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        self.room_made_at = Some((at.sequence, Instant::now()));
        // The operator's part: the purge ignores the retention, so a replica further behind
        // than this position starts again from the snapshot; the flags below prevent that.
        tracing::warn!(
            stream_sequence = at.sequence,
            hint = "raise --nats-max-bytes, or lower --nats-retain-after-snapshot so that \
                    ordinary purges keep the stream under it",
            "the stream is full: publishing a snapshot of this position to purge the stream below it"
        );
        self.start(at, Publish::ToMakeRoom);
    }

    /// While no message comes: when the last publication failed (JetStream did not answer, the
    /// upload claim could not be read), or a snapshot since was taken without one (within the
    /// publish interval), a snapshot as of `at` is taken and published once the publish
    /// interval has passed. Publications were tried only when a snapshot came due, so an idle
    /// cluster whose last one failed, or came too soon after the one before, kept the bucket a
    /// snapshot behind and the stream unpurged until more records came (a test that waited for
    /// the publication hung on it; an adversarial run left a bucket at 3,002 against 6,199).
    pub(super) fn retry_publication(&mut self, at: Position) {
        let due = self
            .last_publish
            .is_none_or(|tried| tried.elapsed() >= self.publish_interval);
        let failed = self.publication_failed.load(Ordering::SeqCst);
        if !due || !(failed || self.publication_skipped) {
            return;
        }
        if self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let why = match failed {
            true => "the last snapshot publication failed: publishing one as of this position",
            false => {
                "a snapshot taken since the last publication was not published (too soon after \
                 it): publishing one as of this position"
            }
        };
        tracing::info!(stream_sequence = at.sequence, "{why}");
        self.start(at, Publish::WhenOldEnough);
    }

    /// After each applied message: starts a snapshot as of (`revision`, `stream_sequence`)
    /// when enough was applied since the last one and none is running.
    pub(super) fn after_apply(
        &mut self,
        changes: u64,
        bytes: u64,
        stream_sequence: u64,
        revision: u64,
    ) {
        self.records_since += changes;
        self.bytes_since += bytes;
        let at = Position {
            sequence: stream_sequence,
            revision,
        };
        self.start_if_due(at);
    }

    /// Starts a snapshot as of `at` when enough was applied since the last one and none is
    /// running: after each message, and while none comes (one that came due while the last
    /// one ran waited for the next message, so what was applied since stayed out of every
    /// snapshot, and the stream unpurged below it, for as long as the cluster was idle; tests
    /// waiting for it hung when the box was slow).
    pub(super) fn start_if_due(&mut self, at: Position) {
        let due = self.records_since >= self.every_records || self.bytes_since >= self.every_bytes;
        if !due || self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        self.records_since = 0;
        self.bytes_since = 0;
        let publish = match self
            .last_publish
            .is_none_or(|at| at.elapsed() >= self.publish_interval)
        {
            true => Publish::WhenOldEnough,
            false => Publish::No,
        };
        self.publication_skipped |= publish == Publish::No;
        self.start(at, publish);
    }

    /// Runs a snapshot job as of `at` in the background (`running` is set).
    fn start(&mut self, at: Position, publish: Publish) {
        if publish != Publish::No {
            self.last_publish = Some(Instant::now());
            self.publication_failed.store(false, Ordering::SeqCst);
            self.publication_skipped = false;
        }
        let job = Job {
            publish,
            dir: self.dir.clone(),
            lock: self.lock.clone(),
            store: self.store.clone(),
            stream: self.stream.clone(),
            bucket: self.bucket.clone(),
            every_records: self.every_records,
            history_events: self.history_events,
            retain_after: self.retain_after,
            name: self.name.clone(),
            metrics: self.metrics.clone(),
            stopping: self.stopping.clone(),
            stop_allowance: self.stop_allowance,
            publication_failed: Arc::clone(&self.publication_failed),
            lease: LEASE,
        };
        let running = Arc::clone(&self.running);
        self.tracker.spawn(async move {
            job.run(at.revision, at.sequence).await;
            running.store(false, Ordering::SeqCst);
        });
    }
}

/// Whether a snapshot job publishes what it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Publish {
    /// Not this time (one was tried less than `Snapshots::publish_interval` ago).
    No,
    /// If the bucket's newest is `--snapshot-every-records` revisions older.
    WhenOldEnough,
    /// Whatever the counts, if the bucket's newest is behind it, and the stream is purged below
    /// it, keeping nothing before it.
    ToMakeRoom,
}

/// One snapshot and its upload, off the applier's task.
struct Job {
    publish: Publish,
    dir: PathBuf,
    lock: LockRef,
    store: Store,
    stream: UpdateStream,
    bucket: SnapshotBucket,
    every_records: u64,
    history_events: u64,
    retain_after: u64,
    name: String,
    metrics: Metrics,
    stopping: CancellationToken,
    stop_allowance: Duration,
    publication_failed: Arc<AtomicBool>,
    lease: Lease,
}

/// How long a replica waits before it tries again to make room in a stream still full at the
/// same position.
const ROOM_RETRY: Duration = Duration::from_secs(30);

/// How long giving the upload claim back may take on the way out (the stop waits for it).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a holder that lost its upload claim logs, once its chunks are removed.
const TAKEN_OVER: &str = "the snapshot upload claim was taken over by another replica: upload abandoned, its chunks \
     removed";
/// What it logs instead when its object was published before it found the claim lost (frozen
/// between its last renewal and the object's description): both replicas' objects stand, each
/// a whole snapshot. It used to say its chunks were removed (found by an adversarial run).
const TAKEN_OVER_PUBLISHED: &str = "the snapshot upload claim was taken over by another \
     replica as this upload's object was published: it stands all the same (a whole snapshot; \
     the other replica may publish one too)";

/// The upload claim as a lease: how often its holder renews it while it uploads, and how long
/// another replica waits, by its own clock, once it has seen the claim unchanged, before it
/// takes it over.
#[derive(Clone, Copy, Debug)]
struct Lease {
    renew_every: Duration,
    take_over_after: Duration,
    /// How long an upload may run before its holder abandons it: renewed, the claim no longer
    /// lapses, so a holder whose upload hangs (a disk that stopped answering) while its
    /// renewals go on would hold it for good.
    longest_upload: Duration,
}

/// Renewed every 2 s; taken over after 10 s unchanged, 4 renewals missed, so that a renewal
/// held up by a slow answer (a JetStream leader election takes seconds) does not lose it. A
/// claim held until it lapsed let a frozen or killed holder stop every publication and purge
/// for 10 minutes, and on a full stream every webhook got 503 meanwhile (found by an
/// adversarial run).
const LEASE: Lease = Lease {
    renew_every: Duration::from_secs(2),
    take_over_after: Duration::from_secs(10),
    longest_upload: CLAIM_TTL,
};

impl Job {
    async fn run(self, revision: u64, stream_sequence: u64) {
        let (dir, store, history) = (self.dir.clone(), self.store.clone(), self.history_events);
        let Some(lock) = self.lock.share() else {
            // The server stopped and released the directory: no more files.
            return;
        };
        self.metrics.snapshot_started();
        let taken = tokio::task::spawn_blocking(move || {
            // Not into a directory that is no longer this replica's (moved or replaced).
            let in_place = || crate::journal::in_place(&lock, &dir, "snapshot into");
            snapshot::take_as_of(
                &dir,
                &store,
                (revision, stream_sequence),
                history,
                &in_place,
            )
        })
        .await
        .expect("a snapshot does not panic");
        self.metrics.snapshot(taken.is_ok());
        let taken = match taken {
            Ok(taken) => taken,
            Err(error) => {
                tracing::warn!(%error, "snapshot failed; the next one will retry");
                return;
            }
        };
        tracing::info!(
            revision,
            stream_sequence,
            profiles = taken.profiles,
            removed_files = taken.removed.len(),
            "snapshot written"
        );
        let published = match self.publish {
            Publish::No => Ok(None),
            _ => self.publish(&taken.path, revision, stream_sequence).await,
        };
        match published {
            Ok(Some(purged)) => {
                self.metrics.replication_snapshot_upload("uploaded");
                tracing::info!(revision, stream_sequence, purged, "snapshot published");
            }
            Ok(None) => {}
            Err(error) => {
                self.metrics.replication_snapshot_upload("failed");
                self.publication_failed.store(true, Ordering::SeqCst);
                tracing::warn!(%error, "snapshot not published; tried again");
            }
        }
        self.remove_unusable().await;
    }

    /// Removes the local snapshots the stream was purged past (by this replica's purge just
    /// now or another's): no start can use them, and the compaction above keeps every one
    /// within the history window, which took gigabytes at a low `--snapshot-every-records`.
    async fn remove_unusable(&self) {
        let first = match self.stream.bounds().await {
            Ok(bounds) => bounds.first,
            Err(error) => {
                tracing::debug!(%error, "stream bounds unknown; old local snapshots stay for now");
                return;
            }
        };
        let Some(lock) = self.lock.share() else {
            return;
        };
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || {
            crate::journal::in_place(&lock, &dir, "remove snapshots from")?;
            remove_unusable(&dir, first, |path| std::fs::remove_file(path))
        })
        .await
        .expect("removing files does not panic");
        let failed = match removed {
            Ok((removed, failed)) => {
                if !removed.is_empty() {
                    tracing::info!(
                        removed = removed.len(),
                        stream_first_sequence = first,
                        "removed local snapshots the stream no longer continues from"
                    );
                }
                failed
            }
            Err(error) => vec![error],
        };
        if let Some(error) = failed.first() {
            tracing::warn!(
                %error,
                not_removed = failed.len(),
                "local snapshots the stream no longer continues from not removed; the next \
                 snapshot retries"
            );
        }
    }

    /// Publishes the snapshot at `path` if the bucket's newest is old enough and this replica
    /// wins the claim; then keeps the two newest and purges the stream below the older.
    /// Returns the messages purged, or `None` when another replica's snapshot will do or the
    /// upload was abandoned because the replica is stopping.
    async fn publish(
        &self,
        path: &Path,
        revision: u64,
        stream_sequence: u64,
    ) -> Result<Option<u64>, JetStreamError> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|err| JetStreamError::Bucket {
                bucket: "snapshots".into(),
                key: path.display().to_string(),
                reason: err.to_string(),
            })?;
        self.publish_from(&mut file, revision, stream_sequence)
            .await
    }

    /// [`Job::publish`] of the snapshot read from `data`.
    async fn publish_from(
        &self,
        data: &mut (impl AsyncRead + Unpin),
        revision: u64,
        stream_sequence: u64,
    ) -> Result<Option<u64>, JetStreamError> {
        let newest = self.bucket.newest().await?;
        let old_enough = |newest: &SnapshotInfo| match self.publish {
            Publish::ToMakeRoom => newest.stream_sequence < stream_sequence,
            _ => newest.revision + self.every_records <= revision,
        };
        if newest.is_some_and(|newest| !old_enough(&newest)) {
            return Ok(None);
        }
        // A claim that cannot be read is a failure of this publication (tried again), not
        // another replica's claim.
        let Some(claim) = self.claim().await? else {
            return Ok(None);
        };
        let published = self
            .upload_holding(&claim, data, (revision, stream_sequence))
            .await;
        match tokio::time::timeout(RELEASE_TIMEOUT, self.bucket.release_upload(claim)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "upload claim not released; it is taken over");
            }
            Err(_) => tracing::debug!("upload claim not released in time; it is taken over"),
        }
        published
    }

    /// Uploads the snapshot read from `data`, as of `at` (revision, stream sequence), and
    /// purges, while `claim` is renewed; abandoned when the claim is lost or the upload has
    /// run for `lease.longest_upload` (a failure; both remove its chunks), or when the replica
    /// has been stopping for its allowance.
    async fn upload_holding(
        &self,
        claim: &UploadClaim,
        data: &mut (impl AsyncRead + Unpin),
        at: (u64, u64),
    ) -> Result<Option<u64>, JetStreamError> {
        let upload = Upload::new();
        let stopped = async {
            self.stopping.cancelled().await;
            tokio::time::sleep(self.stop_allowance).await;
        };
        let revision = at.0;
        tokio::select! {
            published = self.upload_and_purge(claim, &upload, data, at) => {
                // A failed upload's chunks are of no use (an object's are left alone): a
                // holder let go after a freeze sees its requests time out as often as it
                // finds its claim lost.
                if published.is_err() {
                    let taken_over = self.discard(&upload).await;
                    if self.lost(claim).await {
                        tracing::warn!(revision, found_by = "a failed upload", "{taken_over}");
                        return Ok(None);
                    }
                }
                published
            }
            failed = self.keep(claim) => {
                let taken_over = self.discard(&upload).await;
                match failed {
                    None => tracing::warn!(revision, found_by = "renewal", "{taken_over}"),
                    Some(error) => tracing::warn!(
                        revision,
                        %error,
                        "the snapshot upload claim could not be renewed for half the takeover \
                         time: upload abandoned, its chunks removed"
                    ),
                }
                Ok(None)
            }
            () = stopped => {
                tracing::info!(revision, "snapshot upload abandoned: the replica is stopping");
                Ok(None)
            }
            () = tokio::time::sleep(self.lease.longest_upload) => {
                self.discard(&upload).await;
                Err(JetStreamError::Unavailable {
                    operation: "snapshot upload",
                    reason: format!(
                        "still running after {}: abandoned, its chunks removed",
                        humantime::format_duration(self.lease.longest_upload)
                    ),
                })
            }
        }
    }

    /// The upload claim for this replica: at once when it is free (or in this replica's own
    /// name), else once its holder has left it unchanged for `lease.take_over_after` by this
    /// replica's clock (a compare-and-set on the revision seen, so that of two replicas one
    /// takes it). `None` when the holder gives it back (it published, or failed: the next
    /// snapshot tries again), another replica takes it over first, or this one stops. Clocks
    /// are never compared across machines: only how long this replica has seen one revision.
    async fn claim(&self) -> Result<Option<UploadClaim>, JetStreamError> {
        if let Some(claim) = self.bucket.claim_upload(&self.name).await? {
            return Ok(Some(claim));
        }
        let mut seen: Option<(u64, Instant)> = None;
        let mut told = false;
        loop {
            let Some(held) = self.bucket.upload_claim().await? else {
                return Ok(None);
            };
            let since = match seen {
                Some((revision, since)) if revision == held.revision => since,
                _ => seen.insert((held.revision, Instant::now())).1,
            };
            let unchanged = since.elapsed();
            if unchanged >= self.lease.take_over_after {
                return self.take_over(&held, unchanged).await;
            }
            // Renewed claims are the rule while an upload runs: only a stale one is told of,
            // once per snapshot.
            if !told && unchanged >= 2 * self.lease.renew_every {
                told = true;
                tracing::info!(
                    holder = %held.holder,
                    last_renewed = %held.written,
                    unchanged_for_ms = unchanged.as_millis() as u64,
                    take_over_in_ms = (self.lease.take_over_after - unchanged).as_millis() as u64,
                    "the snapshot upload claim is held by another replica that has not renewed \
                     it: taken over unless it is renewed"
                );
            }
            tokio::select! {
                () = tokio::time::sleep(self.lease.renew_every / 2) => {}
                () = self.stopping.cancelled() => return Ok(None),
            }
        }
    }

    /// Takes over `held`, left unchanged for `unchanged` (frozen, killed, or an earlier build
    /// that never renews), saying so.
    async fn take_over(
        &self,
        held: &HeldClaim,
        unchanged: Duration,
    ) -> Result<Option<UploadClaim>, JetStreamError> {
        let taken = self.bucket.take_over_upload(&self.name, held).await?;
        if taken.is_some() {
            tracing::warn!(
                holder = %held.holder,
                last_renewed = %held.written,
                unchanged_for_ms = unchanged.as_millis() as u64,
                "took over the snapshot upload claim from a replica that stopped renewing it"
            );
        }
        Ok(taken)
    }

    /// Renews `claim` every `lease.renew_every` while the upload runs; returns once it is lost:
    /// `None` when another replica took it over (this one was frozen, say), the last error
    /// when no renewal has succeeded for half `lease.take_over_after` (by then another replica
    /// may take it over at any moment).
    async fn keep(&self, claim: &UploadClaim) -> Option<JetStreamError> {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.lease.renew_every).await;
            let sent = Instant::now();
            // A task of its own, not cancelled with this loop when the upload ends: a renewal
            // cancelled after it was sent moved the claim's revision without the claim learning
            // it, and giving the claim back then left it held until a takeover (a test failed
            // on it now and then). The release waits for the renewal's lock.
            let renewal = tokio::spawn({
                let (bucket, claim) = (self.bucket.clone(), claim.clone());
                async move { bucket.renew_upload(&claim).await }
            });
            let renewed_now = renewal.await.unwrap_or_else(|error| {
                Err(JetStreamError::Unavailable {
                    operation: "upload claim renewal",
                    reason: error.to_string(),
                })
            });
            match renewed_now {
                Ok(true) => renewed = sent,
                Ok(false) => return None,
                Err(error) if renewed.elapsed() >= self.lease.take_over_after / 2 => {
                    return Some(error);
                }
                Err(error) => {
                    tracing::debug!(%error, "snapshot upload claim not renewed; tried again")
                }
            }
        }
    }

    /// Whether `claim` was taken over. A holder let go after a freeze longer than the lease
    /// finds its upload failed (its requests timed out meanwhile) before its renewals find the
    /// claim lost: that is no failure of the publication (the new holder publishes), and it
    /// was logged as one, "tried again" (found by an adversarial run).
    async fn lost(&self, claim: &UploadClaim) -> bool {
        matches!(self.bucket.renew_upload(claim).await, Ok(false))
    }

    /// Removes what an upload abandoned for a lost claim stored (unless it was published).
    /// Removes `upload`'s chunks; what a holder that lost the claim logs, as the upload turned
    /// out ([`TAKEN_OVER`] when its chunks were removed or could not be).
    async fn discard(&self, upload: &Upload) -> &'static str {
        match self.bucket.discard_upload(upload).await {
            Ok(Discarded::Published) => TAKEN_OVER_PUBLISHED,
            Ok(Discarded::Removed) => TAKEN_OVER,
            Err(error) => {
                tracing::warn!(%error, "the chunks of an abandoned upload not removed; a later upload removes them");
                TAKEN_OVER
            }
        }
    }

    async fn upload_and_purge(
        &self,
        claim: &UploadClaim,
        upload: &Upload,
        data: &mut (impl AsyncRead + Unpin),
        at: (u64, u64),
    ) -> Result<Option<u64>, JetStreamError> {
        if self
            .bucket
            .put_claimed(claim, upload, at, data)
            .await?
            .is_none()
        {
            tracing::warn!(
                revision = at.0,
                found_by = "renewal before publishing",
                "{TAKEN_OVER}"
            );
            return Ok(None);
        }
        self.bucket.retire(2).await?;
        // What crashed uploads left: a crashed holder's claim is taken over within seconds,
        // but its chunks are removed only once they are as old as CLAIM_TTL, so that no
        // upload still under way (a holder of an earlier build, which does not renew) loses
        // its chunks.
        match self.bucket.remove_unfinished_uploads(CLAIM_TTL).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "removed the chunks of unfinished uploads"),
            Err(error) => {
                tracing::warn!(%error, "unfinished uploads not removed; the next upload retries")
            }
        }
        let published = self.bucket.list().await?;
        let below = match (self.publish, published.as_slice()) {
            // The stream refuses every write: below the snapshot just published, whatever an
            // older one is for (a replica downloading that one takes this one instead).
            (Publish::ToMakeRoom, [.., newest]) => purge_point(newest.stream_sequence, 0),
            (_, [older, _newest]) => purge_point(older.stream_sequence, self.retain_after),
            _ => return Ok(Some(0)),
        };
        if below <= self.stream.bounds().await?.first {
            return Ok(Some(0));
        }
        self.stream.purge_below(below).await.map(Some)
    }
}

/// Removes the snapshots in `dir` that the stream, now starting at `first`, does not continue
/// from (`startup::choose_local` needs `stream_sequence + 1 >= first`), except the newest.
/// Left alone: unreadable ones (start-up sets those aside, naming them) and a single node's
/// (stream sequence 0: not this replica's to remove). A file that cannot be removed is skipped
/// (one stuck file stopped every later removal, found by an adversarial run). Returns what was
/// removed, and the failures.
fn remove_unusable(
    dir: &Path,
    first: u64,
    remove: impl Fn(&Path) -> std::io::Result<()>,
) -> Result<(Vec<PathBuf>, Vec<JournalError>), JournalError> {
    let mut snapshots = snapshot::list(dir)?;
    snapshots.pop();
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    for (_, path) in snapshots {
        let unusable = snapshot::read_header(&path)
            .is_ok_and(|header| header.stream_sequence > 0 && header.stream_sequence + 1 < first);
        if !unusable {
            continue;
        }
        match remove(&path) {
            Ok(()) => removed.push(path),
            Err(error) => {
                let failure = crate::io_error::IoError::on(&path, "remove");
                failed.push(JournalError::Io(failure(error)));
            }
        }
    }
    Ok((removed, failed))
}

/// The first sequence kept when the older of the two published snapshots is as of
/// `stream_sequence`: everything after it, and `retain_after` messages before.
fn purge_point(stream_sequence: u64, retain_after: u64) -> u64 {
    (stream_sequence + 1).saturating_sub(retain_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_dir::DataDir;
    use crate::jetstream::{Nats, StreamSettings};

    /// A single nats-server with a stream and its snapshot bucket, and a data directory for
    /// the jobs of the replicas under test.
    struct Fixture {
        _nats: nats_harness::NatsCluster,
        stream: UpdateStream,
        bucket: SnapshotBucket,
        dir: tempfile::TempDir,
        data_dir: DataDir,
    }

    impl Fixture {
        async fn new(stream_name: &str) -> Fixture {
            Fixture::with_request_timeout(stream_name, None).await
        }

        /// [`Fixture::new`], its client's requests timing out after `request_timeout` if given.
        async fn with_request_timeout(
            stream_name: &str,
            request_timeout: Option<Duration>,
        ) -> Fixture {
            let nats = nats_harness::NatsCluster::single().await.unwrap();
            let urls = nats.client_urls();
            Fixture::over(nats, urls, stream_name, request_timeout).await
        }

        /// A fixture whose streams are replicated on `nats`'s nodes, its client connected to
        /// `urls` only, its requests timing out after `request_timeout` if given.
        async fn over(
            nats: nats_harness::NatsCluster,
            urls: Vec<String>,
            stream_name: &str,
            request_timeout: Option<Duration>,
        ) -> Fixture {
            let mut config = crate::Config::for_tests("s").nats;
            config.urls = urls;
            if let Some(timeout) = request_timeout {
                config.request_timeout = timeout;
            }
            let client = Nats::connect(&config, "test").await.unwrap();
            let settings = StreamSettings {
                name: stream_name.into(),
                replicas: nats.nodes().len(),
                duplicate_window: Duration::from_secs(60),
                max_bytes: None,
            };
            let stream = UpdateStream::ensure(&client, &settings).await.unwrap();
            let bucket = SnapshotBucket::open(&stream).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let data_dir = DataDir::open(dir.path()).unwrap();
            Fixture {
                _nats: nats,
                stream,
                bucket,
                dir,
                data_dir,
            }
        }

        /// The snapshot job of replica `name`, publishing with `lease`.
        fn job(&self, name: &str, lease: Lease, stopping: &CancellationToken) -> Job {
            Job {
                publish: Publish::WhenOldEnough,
                dir: self.dir.path().to_owned(),
                lock: self.data_dir.lock_ref(),
                store: Store::new(10, "test"),
                stream: self.stream.clone(),
                bucket: self.bucket.clone(),
                every_records: 10,
                history_events: 10,
                retain_after: 0,
                name: name.into(),
                metrics: Metrics::new(),
                stopping: stopping.clone(),
                stop_allowance: Duration::from_millis(200),
                publication_failed: Arc::default(),
                lease,
            }
        }

        /// `job` publishing a snapshot as of revision 100 whose bytes never end (a first
        /// chunk, then nothing), once it holds the claim and has stored that chunk; the
        /// writer ends the bytes when dropped.
        async fn stuck_upload(&self, job: Job) -> (Publication, tokio::io::DuplexStream) {
            self.stuck_upload_ending(job, tokio::io::empty()).await
        }

        /// [`Fixture::stuck_upload`] whose bytes, once the writer is dropped, go on as
        /// `ending`'s.
        async fn stuck_upload_ending(
            &self,
            job: Job,
            ending: impl AsyncRead + Unpin + Send + 'static,
        ) -> (Publication, tokio::io::DuplexStream) {
            let name = job.name.clone();
            let (mut writer, reader) = tokio::io::duplex(1024);
            tokio::io::AsyncWriteExt::write_all(&mut writer, b"snapshot bytes")
                .await
                .unwrap();
            let mut reader = tokio::io::AsyncReadExt::chain(reader, ending);
            let upload = tokio::spawn(async move { job.publish_from(&mut reader, 100, 50).await });
            // A read the bucket has no responder for yet (a cluster just started, its streams'
            // leaders still being placed: "503 no responders" under load) is read again.
            self.wait_for(
                "the upload holds the claim and stored a chunk",
                async || {
                    self.bucket.upload_claim_holder().await.ok().flatten() == Some(name.clone())
                        && self
                            .bucket
                            .unfinished_uploads()
                            .await
                            .is_ok_and(|unfinished| !unfinished.is_empty())
                },
            )
            .await;
            (upload, writer)
        }

        /// Nobody holds the upload claim, and no upload's chunks are left without an object.
        async fn assert_released_without_chunks(&self) {
            assert_eq!(self.bucket.upload_claim_holder().await.unwrap(), None);
            let unfinished = self.bucket.unfinished_uploads().await.unwrap();
            assert!(unfinished.is_empty(), "{unfinished:?}");
        }

        async fn wait_for(&self, what: &str, mut done: impl AsyncFnMut() -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !done().await {
                assert!(tokio::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    type Publication = tokio::task::JoinHandle<Result<Option<u64>, JetStreamError>>;

    /// A lease short enough for tests: renewed every 100 ms, taken over after 1 s unchanged.
    const SHORT_LEASE: Lease = Lease {
        renew_every: Duration::from_millis(100),
        take_over_after: Duration::from_secs(1),
        longest_upload: Duration::from_secs(60),
    };

    /// A lease never renewed nor taken over within a test.
    const NO_RENEWAL: Lease = Lease {
        renew_every: Duration::from_secs(3600),
        take_over_after: Duration::from_secs(7200),
        longest_upload: Duration::from_secs(60),
    };

    /// `upload` ended without publishing, its chunks removed, the claim left to `taker`.
    async fn assert_gave_up_to(bucket: &SnapshotBucket, upload: Publication, taker: &str) {
        let ended = ended(upload, Duration::from_secs(10)).await;
        assert!(matches!(ended, Ok(None)), "{ended:?}");
        assert!(bucket.unfinished_uploads().await.unwrap().is_empty());
        assert_eq!(
            bucket.upload_claim_holder().await.unwrap().as_deref(),
            Some(taker)
        );
    }

    /// How a publication ended, within `within`.
    async fn ended(upload: Publication, within: Duration) -> Result<Option<u64>, JetStreamError> {
        tokio::time::timeout(within, upload)
            .await
            .expect("the publication ends")
            .unwrap()
    }

    /// A replica stopped in the middle of an upload gives the claim back once its allowance
    /// is spent, so another replica can publish at once: the claim used to be held for its
    /// whole 10 minutes (found by an adversarial run); the chunks it stored are removed later.
    /// Against a real nats-server, with an upload whose bytes never end.
    #[tokio::test]
    async fn an_upload_cut_short_by_a_stop_gives_the_claim_back_and_its_chunks_are_removed() {
        let fixture = Fixture::new("UPLOAD").await;
        let bucket = fixture.bucket.clone();
        let stopping = CancellationToken::new();
        let (upload, writer) = fixture
            .stuck_upload(fixture.job("r1", LEASE, &stopping))
            .await;
        assert!(
            bucket.claim_upload("r2").await.unwrap().is_none(),
            "r1 holds it"
        );
        assert_eq!(
            bucket.remove_unfinished_uploads(CLAIM_TTL).await.unwrap(),
            0,
            "an upload under way is left alone"
        );
        stopping.cancel();
        let published = ended(upload, Duration::from_secs(10)).await;
        assert!(matches!(published, Ok(None)), "{published:?}");
        assert!(
            bucket.claim_upload("r2").await.unwrap().is_some(),
            "r1 gave the claim back"
        );
        assert_eq!(
            bucket.newest().await.unwrap(),
            None,
            "nothing was published"
        );
        drop(writer);

        // What the abandoned upload stored goes once it is old enough (here: at once); a
        // finished snapshot's chunks stay.
        bucket
            .put(200, 80, &mut &b"whole snapshot"[..])
            .await
            .unwrap();
        assert_eq!(bucket.unfinished_uploads().await.unwrap().len(), 1);
        assert_eq!(
            bucket
                .remove_unfinished_uploads(Duration::ZERO)
                .await
                .unwrap(),
            1
        );
        assert!(bucket.unfinished_uploads().await.unwrap().is_empty());
        let newest = bucket
            .newest()
            .await
            .unwrap()
            .expect("the finished snapshot");
        let mut read = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut bucket.read(&newest).await.unwrap(), &mut read)
            .await
            .unwrap();
        assert_eq!(read, b"whole snapshot");
    }

    /// The upload claim is a lease its holder renews while it uploads: another replica that
    /// wants to publish waits through it, however long the upload takes (here three times the
    /// takeover time), and publishes nothing of its own once the holder's snapshot is out.
    #[tokio::test]
    async fn a_claim_its_holder_renews_is_not_taken_over() {
        let fixture = Fixture::new("RENEWED").await;
        let stopping = CancellationToken::new();
        let (r1, writer) = fixture
            .stuck_upload(fixture.job("r1", SHORT_LEASE, &stopping))
            .await;
        let r2 = fixture.job("r2", SHORT_LEASE, &stopping);
        let r2 = tokio::spawn(async move { r2.publish_from(&mut &b"r2's"[..], 110, 55).await });
        let until = tokio::time::Instant::now() + 3 * SHORT_LEASE.take_over_after;
        let mut revisions = std::collections::HashSet::new();
        while tokio::time::Instant::now() < until {
            let held = fixture.bucket.upload_claim().await.unwrap();
            let held = held.expect("the claim stays held");
            assert_eq!(held.holder, "r1", "r2 took over a renewed claim");
            revisions.insert(held.revision);
            tokio::time::sleep(SHORT_LEASE.renew_every).await;
        }
        assert!(revisions.len() > 3, "r1 renews its claim: {revisions:?}");
        assert!(!r2.is_finished(), "r2 waits while r1 uploads");

        drop(writer);
        let r1 = ended(r1, Duration::from_secs(10)).await;
        assert!(matches!(r1, Ok(Some(_))), "r1 published: {r1:?}");
        let r2 = ended(r2, Duration::from_secs(10)).await;
        assert!(
            matches!(r2, Ok(None)),
            "r2 leaves it to r1's snapshot: {r2:?}"
        );
        let newest = fixture.bucket.newest().await.unwrap().unwrap();
        assert_eq!(newest.revision, 100, "r1's snapshot");
        assert_eq!(fixture.bucket.upload_claim_holder().await.unwrap(), None);
    }

    /// A claim nobody renews (its holder frozen or killed, or of an earlier build, which never
    /// renews) is taken over once it has been seen unchanged for the takeover time, by exactly
    /// one of two replicas that want it; that one publishes. It used to hold for 10 minutes,
    /// and on a full stream every webhook got 503 meanwhile (found by an adversarial run).
    #[tokio::test]
    async fn a_claim_left_unchanged_is_taken_over_by_exactly_one_of_two_replicas() {
        let fixture = Fixture::new("STALE").await;
        let stale = fixture.bucket.claim_upload("r1").await.unwrap().unwrap();
        let stopping = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let contenders = ["r2", "r3"].map(|name| {
            let job = fixture.job(name, SHORT_LEASE, &stopping);
            tokio::spawn(async move { job.publish_from(&mut &b"snapshot"[..], 100, 50).await })
        });
        let mut outcomes = Vec::new();
        for contender in contenders {
            outcomes.push(ended(contender, Duration::from_secs(10)).await.unwrap());
        }
        assert!(
            started.elapsed() >= SHORT_LEASE.take_over_after,
            "taken over only once seen unchanged for the takeover time"
        );
        let published = outcomes.iter().filter(|outcome| outcome.is_some()).count();
        assert_eq!(published, 1, "one of them published: {outcomes:?}");
        let snapshots = fixture.bucket.list().await.unwrap();
        assert_eq!(snapshots.len(), 1, "{snapshots:?}");
        fixture.assert_released_without_chunks().await;
        // r1's old claim is not its to give back any more, nor to renew.
        assert!(!fixture.bucket.renew_upload(&stale).await.unwrap());

        // The takeover itself is a compare-and-set on the revision seen: of two at once, one
        // gets the claim.
        fixture.bucket.claim_upload("r1").await.unwrap().unwrap();
        let held = fixture.bucket.upload_claim().await.unwrap().unwrap();
        let (r2, r3) = tokio::join!(
            fixture.bucket.take_over_upload("r2", &held),
            fixture.bucket.take_over_upload("r3", &held)
        );
        let taken = [r2.unwrap(), r3.unwrap()];
        assert_eq!(taken.iter().flatten().count(), 1, "{taken:?}");
    }

    /// An upload that does not end (a disk that stopped answering) while its holder's renewals
    /// go on would hold the renewed claim for good: it is abandoned after the longest upload
    /// time, as a failure, its chunks removed and the claim given back.
    #[tokio::test]
    async fn an_upload_that_runs_too_long_is_abandoned_and_its_claim_given_back() {
        let fixture = Fixture::new("LONG").await;
        let stopping = CancellationToken::new();
        let lease = Lease {
            longest_upload: Duration::from_secs(2),
            ..SHORT_LEASE
        };
        let (r1, _writer) = fixture
            .stuck_upload(fixture.job("r1", lease, &stopping))
            .await;
        let r1 = ended(r1, Duration::from_secs(10)).await;
        let error = r1
            .expect_err("a failed publication, tried again")
            .to_string();
        assert!(error.contains("still running after 2s"), "{error}");
        fixture.assert_released_without_chunks().await;
        assert_eq!(fixture.bucket.newest().await.unwrap(), None);
    }

    /// A holder whose claim was taken over (it was frozen past the takeover time) abandons its
    /// upload, removes its chunks and publishes nothing, whether its renewal finds out first
    /// or the renewal made just before the snapshot would be published; the new holder's
    /// claim stays.
    #[tokio::test]
    async fn a_holder_that_lost_its_claim_stops_and_does_not_publish() {
        let fixture = Fixture::new("LOST").await;
        let bucket = fixture.bucket.clone();
        let stopping = CancellationToken::new();
        let take_over = async || {
            let held = bucket.upload_claim().await.unwrap().unwrap();
            bucket.take_over_upload("r2", &held).await.unwrap().unwrap()
        };

        // Found out by its next renewal, its bytes still coming.
        let (r1, _writer) = fixture
            .stuck_upload(fixture.job("r1", SHORT_LEASE, &stopping))
            .await;
        let r2 = take_over().await;
        assert_gave_up_to(&bucket, r1, "r2").await;
        bucket.release_upload(r2).await.unwrap();

        // Found out after its last chunk, before the snapshot is published: no renewal came
        // between (as for a replica frozen mid-upload and let go again).
        let (r1, writer) = fixture
            .stuck_upload(fixture.job("r1", NO_RENEWAL, &stopping))
            .await;
        let _r2 = take_over().await;
        drop(writer);
        assert_gave_up_to(&bucket, r1, "r2").await;
        assert_eq!(
            bucket.newest().await.unwrap(),
            None,
            "nothing was published"
        );
    }

    /// A holder whose upload failed after its claim was taken over (its requests timed out
    /// while it was frozen past the lease, say) abandons it for the lost claim, and does not
    /// take it for a failed publication to try again: it was logged as one, and the holder
    /// set to publish again at its next idle tick (found by an adversarial run).
    #[tokio::test]
    async fn a_holder_whose_upload_failed_after_its_claim_was_taken_over_gives_up() {
        /// Bytes that fail to read, as a snapshot file on a failing disk.
        struct FailingRead;
        impl AsyncRead for FailingRead {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Err(std::io::Error::other("read failed")))
            }
        }
        let fixture = Fixture::new("FAILED").await;
        let bucket = fixture.bucket.clone();
        let stopping = CancellationToken::new();
        let (r1, writer) = fixture
            .stuck_upload_ending(fixture.job("r1", NO_RENEWAL, &stopping), FailingRead)
            .await;
        let held = bucket.upload_claim().await.unwrap().unwrap();
        bucket.take_over_upload("r2", &held).await.unwrap().unwrap();
        drop(writer);

        assert_gave_up_to(&bucket, r1, "r2").await;
    }

    /// A chunk whose acknowledgement timed out is published again under the same message id:
    /// one timeout made a holder frozen 5 s (well within its lease) fail its whole upload and
    /// start over (found by an adversarial run). Here the server is frozen instead, longer than
    /// the client's request timeout, while a chunk waits for its acknowledgement: the upload
    /// goes on, is published whole, and reads back byte for byte (a chunk stored twice would
    /// not).
    #[tokio::test]
    async fn a_chunk_not_acknowledged_in_time_is_published_again_and_the_upload_goes_on() {
        let timeout = Duration::from_secs(1);
        let fixture = Fixture::with_request_timeout("FROZEN", Some(timeout)).await;
        let stopping = CancellationToken::new();
        let lease = Lease {
            take_over_after: Duration::from_secs(60),
            ..SHORT_LEASE
        };
        let (upload, mut writer) = fixture
            .stuck_upload(fixture.job("r1", lease, &stopping))
            .await;
        let server = &fixture._nats.nodes()[0];
        server.pause().unwrap();
        let rest = vec![7u8; 300 * 1024];
        tokio::io::AsyncWriteExt::write_all(&mut writer, &rest[..1024])
            .await
            .unwrap();
        // Frozen past the acknowledgement's timeout (the freeze is this test's input).
        tokio::time::sleep(timeout * 3 / 2).await;
        server.resume().unwrap();
        let written = tokio::io::AsyncWriteExt::write_all(&mut writer, &rest[1024..]).await;
        drop(writer);

        let published = ended(upload, Duration::from_secs(20)).await;
        assert!(matches!(published, Ok(Some(_))), "{published:?}");
        written.expect("the upload read every byte");
        assert_published_whole(&fixture.bucket, &rest).await;
        fixture.assert_released_without_chunks().await;
    }

    /// A chunk whose first publish the stream is still storing is answered "duplicate message
    /// id is in process" (10158) when published again: taken for a final error, it failed the
    /// upload in the very freezes the retry is for (found by an adversarial run). Here the
    /// chunk stream's leader is cut from its two followers (both frozen) while a chunk is
    /// published: its proposal cannot commit, the acknowledgement times out, and the next
    /// publishes are answered 10158 until the followers come back. The upload goes on and
    /// reads back byte for byte.
    #[tokio::test]
    async fn a_chunk_still_being_stored_when_published_again_is_waited_for() {
        let timeout = Duration::from_millis(500);
        let nats = nats_harness::NatsCluster::three().await.unwrap();
        let everywhere = nats.client_urls();
        let leader = Fixture::over(nats, everywhere, "INPROC", None).await;
        let name = chunk_stream_leader(&leader.bucket).await;
        let url = leader._nats.nodes().iter().find(|n| n.name() == name);
        let url = url.expect("the leader is a node").client_url();
        // The same streams, through a client of the leader's server alone.
        let Fixture { _nats: nats, .. } = leader;
        let fixture = Fixture::over(nats, vec![url], "INPROC", Some(timeout)).await;
        let stopping = CancellationToken::new();
        let (upload, mut writer) = fixture
            .stuck_upload(fixture.job("r1", NO_RENEWAL, &stopping))
            .await;
        let followers: Vec<_> = fixture
            ._nats
            .nodes()
            .iter()
            .filter(|n| n.name() != name)
            .collect();
        for follower in &followers {
            follower.pause().unwrap();
        }
        let rest = vec![7u8; 300 * 1024];
        tokio::io::AsyncWriteExt::write_all(&mut writer, &rest[..1024])
            .await
            .unwrap();
        // Past the acknowledgement's timeout and a few answers of 10158 (the freeze is this
        // test's input).
        tokio::time::sleep(timeout * 4).await;
        for follower in &followers {
            follower.resume().unwrap();
        }
        let written = tokio::io::AsyncWriteExt::write_all(&mut writer, &rest[1024..]).await;
        drop(writer);

        let published = ended(upload, Duration::from_secs(30)).await;
        assert!(matches!(published, Ok(Some(_))), "{published:?}");
        written.expect("the upload read every byte");
        assert_published_whole(&fixture.bucket, &rest).await;
        fixture.assert_released_without_chunks().await;
    }

    /// The newest snapshot in `bucket` is a stuck upload's (revision 100) whose bytes went on
    /// as `rest`, read back byte for byte (a chunk stored twice or lost would not).
    async fn assert_published_whole(bucket: &SnapshotBucket, rest: &[u8]) {
        let newest = bucket.newest().await.unwrap().expect("published");
        assert_eq!(newest.revision, 100);
        let mut read = Vec::new();
        let mut reader = bucket.read(&newest).await.unwrap();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut read)
            .await
            .unwrap();
        let mut expected = b"snapshot bytes".to_vec();
        expected.extend_from_slice(rest);
        assert!(read == expected, "{} bytes read", read.len());
    }

    /// An upload given up after its object was published (a holder frozen between its last
    /// renewal and the object's description, taken over meanwhile) stands, chunks and all,
    /// and says so: its holder's log said "its chunks removed" of a published object (found by
    /// an adversarial run). (Uploads given up before: the tests above, chunks removed.)
    #[tokio::test]
    async fn an_upload_given_up_after_its_object_was_published_stands_and_says_so() {
        let fixture = Fixture::new("DISCARD").await;
        let bucket = &fixture.bucket;
        let claim = bucket.claim_upload("r1").await.unwrap().unwrap();
        let upload = Upload::new();
        let mut bytes: &[u8] = b"a whole snapshot";
        let put = bucket.put_claimed(&claim, &upload, (100, 50), &mut bytes);
        put.await.unwrap().expect("published");
        let discarded = bucket.discard_upload(&upload).await.unwrap();
        assert_eq!(discarded, Discarded::Published);
        let newest = bucket.newest().await.unwrap().expect("still there");
        let mut read = Vec::new();
        let mut reader = bucket.read(&newest).await.unwrap();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut read)
            .await
            .unwrap();
        assert_eq!(read, b"a whole snapshot", "its chunks kept");
    }

    /// The server name of the leader of `bucket`'s chunk stream.
    async fn chunk_stream_leader(bucket: &SnapshotBucket) -> String {
        let info = bucket.chunk_stream_info().await.unwrap();
        let cluster = info.cluster.expect("a clustered stream");
        cluster.leader.expect("a leader")
    }

    /// A replica kept every local snapshot within the history window, also those the stream
    /// was purged past, which no start can use (15 GB per replica at a low
    /// `--snapshot-every-records`, found by an adversarial run). They go; the newest, a single
    /// node's and an unreadable one stay.
    #[test]
    fn local_snapshots_the_stream_no_longer_continues_from_are_removed_but_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let write = |revision, sequence| snapshot::write_as_of(dir.path(), revision, sequence, &[]);
        let single_node = write(5, 0).unwrap();
        let paths: Vec<_> = [(10, 5), (20, 15), (30, 25), (40, 35)]
            .into_iter()
            .map(|(revision, sequence)| write(revision, sequence).unwrap())
            .collect();
        let unreadable = dir.path().join(format!("snapshot-{:020}.snap", 15));
        std::fs::write(&unreadable, b"not a snapshot").unwrap();

        let removed = |first| {
            let remove = |path: &Path| std::fs::remove_file(path);
            let (removed, failed) = remove_unusable(dir.path(), first, remove).unwrap();
            assert!(failed.is_empty(), "{failed:?}");
            removed
        };
        assert_eq!(
            removed(26),
            paths[..2].to_vec(),
            "the two the stream does not continue from"
        );
        let left: Vec<_> = snapshot::list(dir.path()).unwrap();
        let left: Vec<_> = left.into_iter().map(|(_, path)| path).collect();
        assert_eq!(
            left,
            [
                single_node.clone(),
                unreadable.clone(),
                paths[2].clone(),
                paths[3].clone()
            ]
        );

        // Purged past every one: the newest stays all the same (start-up then says what to do).
        assert_eq!(removed(100), [paths[2].clone()]);
        assert!(removed(100).is_empty());
        let left: Vec<_> = snapshot::list(dir.path()).unwrap();
        let left: Vec<_> = left.into_iter().map(|(_, path)| path).collect();
        assert_eq!(left, [single_node, unreadable, paths[3].clone()]);
    }

    /// One snapshot that could not be removed (immutable, on a read-only mount) stopped the
    /// removal of every later one (found by an adversarial run): it is skipped and named.
    #[test]
    fn a_snapshot_that_cannot_be_removed_does_not_hold_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = [(10, 5), (20, 15), (30, 25), (40, 35)]
            .into_iter()
            .map(|(revision, sequence)| {
                snapshot::write_as_of(dir.path(), revision, sequence, &[]).unwrap()
            })
            .collect();
        let stuck = paths[0].clone();
        let remove = |path: &Path| match path == stuck {
            true => Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
            false => std::fs::remove_file(path),
        };
        let (removed, failed) = remove_unusable(dir.path(), 100, remove).unwrap();
        assert_eq!(removed, paths[1..3].to_vec());
        assert_eq!(failed.len(), 1);
        let named = failed[0].to_string();
        assert!(
            named.contains("snapshot-00000000000000000010.snap"),
            "{named}"
        );
    }

    #[test]
    fn the_purge_keeps_what_the_older_snapshot_does_not_cover_and_the_retained_messages() {
        assert_eq!(purge_point(100, 0), 101);
        assert_eq!(purge_point(100, 10), 91);
        assert_eq!(purge_point(5, 100_000), 0);
    }
}
