//! Replicated mode's stream restored from a backup, against real nats-server processes: backups
//! and restores made through the JetStream API as the NATS CLI makes them
//! (`common::stream_backup`). A restored stream is another incarnation of the stream; replicas
//! start on it from an earlier incarnation's published snapshot only when the stream holds the
//! message that snapshot was taken after (the newest first, a damaged one passed over), and the
//! README's procedure (the snapshot bucket, then the stream, then the dead letters) brings them
//! back after every stream is lost. The other
//! replicated-mode tests are in `replicas`, whose helpers these share.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::binary::{self, Binary};
use common::{TestService, at, profile_updated, stream_backup};
use nats_harness::NatsCluster;
use profile_state::{Config, Server, pb};
use serde_json::json;
use tokio_stream::StreamExt;

use crate::replicas::{
    PATIENCE, Replica, assert_converged, assert_damaged, bootstrap_args, damage_last_chunk,
    post_until_ok, publish_more, replica_config, snapshotting, stream_of, two_published,
    wait_applied,
};

/// A stream deleted or lost (its snapshot bucket left) was created again, empty, by the next
/// replica to start: every replica then served an empty store and acknowledged webhooks into
/// it, which restoring the stream from its backup dropped. No replica creates it while the
/// bucket holds snapshots; once the bucket is deleted on purpose, one starts a new, empty
/// store.
/// `config` trying again for 2 s instead of 30 before it gives up a start-up that may yet
/// work (a missing stream that existed may be being restored): a few attempts still, and the
/// refusal these tests wait for comes in 2 s.
fn impatient(mut config: Config) -> Config {
    config.nats.start_patience = Duration::from_secs(2);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_stream_is_not_created_again_beside_its_snapshots() {
    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _, _) = two_published(&nats, "LOSTONE", a_dir.path()).await;
    let old_store_id = Replica::from(&a).info().await.store_id;
    a.stop().await;
    let stream = stream_of(&nats, "LOSTONE").await;
    let context = stream.nats().context().clone();
    context.delete_stream("LOSTONE").await.unwrap();

    let b_dir = tempfile::tempdir().unwrap();
    let refused = Server::bind(impatient(snapshotting(&nats, "LOSTONE", "b", b_dir.path()))).await;
    let error = format!("{:#}", refused.err().expect("b does not start"));
    assert!(
        error.contains(
            "stream LOSTONE does not exist, but bucket LOSTONE_SNAPSHOTS holds snapshots that \
             replicas of a stream of that name published: it was deleted or lost"
        ) && error.contains("`nats stream rm -f OBJ_LOSTONE_SNAPSHOTS`"),
        "{error}"
    );
    let missing = context.get_stream("LOSTONE").await;
    assert!(missing.is_err(), "no stream was created");

    // The bucket deleted on purpose: a new, empty store.
    context
        .delete_stream("OBJ_LOSTONE_SNAPSHOTS")
        .await
        .unwrap();
    let b = TestService::start_with(snapshotting(&nats, "LOSTONE", "b", b_dir.path())).await;
    let (profiles, revision) = Replica::from(&b).dump().await;
    assert!(
        profiles.is_empty() && revision == 0,
        "{revision}: {profiles:?}"
    );
    assert_ne!(Replica::from(&b).info().await.store_id, old_store_id);
    b.stop().await;
}

/// The NATS cluster lost with its disks, snapshot bucket and all: the first replica to start
/// created an empty stream, and every replica then served an empty store and acknowledged
/// webhooks that restoring the backups dropped. A replica whose data directory followed a
/// stream does not create it; on an empty data directory (nothing says a stream existed) one
/// starts a new store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_followed_a_lost_stream_does_not_create_it_again() {
    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _, _) = two_published(&nats, "WIPED", a_dir.path()).await;
    a.stop().await;
    let stream = stream_of(&nats, "WIPED").await;
    let context = stream.nats().context().clone();
    for name in ["WIPED", "OBJ_WIPED_SNAPSHOTS"] {
        context.delete_stream(name).await.unwrap();
    }

    let refused = Server::bind(impatient(snapshotting(&nats, "WIPED", "a", a_dir.path()))).await;
    let error = format!("{:#}", refused.err().expect("a does not start"));
    assert!(
        error.contains(
            "stream WIPED does not exist, but this replica's data directory followed a stream"
        ) && error.contains("start this replica on an empty --data-dir"),
        "{error}"
    );
    assert!(context.get_stream("WIPED").await.is_err(), "none created");

    let b_dir = tempfile::tempdir().unwrap();
    let b = TestService::start_with(snapshotting(&nats, "WIPED", "b", b_dir.path())).await;
    let (profiles, revision) = Replica::from(&b).dump().await;
    assert!(
        profiles.is_empty() && revision == 0,
        "{revision}: {profiles:?}"
    );
    b.stop().await;
}

/// After a stream was restored from a backup (a new stream under the name, the same store id),
/// start-up said the snapshot bucket "is empty" although it held snapshots: those of the
/// earlier stream, which the new one cannot use (found by an adversarial run). It names each,
/// and why: here the new stream holds none of their sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_up_names_the_snapshots_of_an_earlier_stream_it_cannot_use() {
    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _, published) = two_published(&nats, "REBORN", a_dir.path()).await;
    a.stop().await;
    // Deleted and created again with its configuration, then purged, as a restored backup
    // of a purged stream starts after its first message.
    let stream = stream_of(&nats, "REBORN").await;
    let old_created = stream.created();
    let context = stream.nats().context();
    let old = context.get_stream("REBORN").await.unwrap();
    let old_config = old.cached_info().config.clone();
    context.delete_stream("REBORN").await.unwrap();
    context.create_stream(old_config).await.unwrap();
    let stream = stream_of(&nats, "REBORN").await;
    let payload = prost::Message::encode_to_vec(&profile_state::jetstream::UpdateBatch::default());
    let message = async_nats::jetstream::message::PublishMessage::build().payload(payload.into());
    context
        .send_publish("REBORN.updates", message)
        .await
        .unwrap()
        .await
        .unwrap();
    stream.purge_below(2).await.unwrap();

    let refused = Server::bind(replica_config(&nats, "REBORN", "b")).await;
    let error = format!("{:#}", refused.err().expect("b cannot start"));
    let expected = format!(
        "bucket REBORN_SNAPSHOTS holds 2 snapshot(s) of an earlier incarnation of the stream, \
         none of which this one (created {}) continues: ",
        stream.created()
    );
    assert!(error.contains(&expected), "{error}");
    for published in &published {
        let expected = format!(
            "{} (stream created {old_created}, as of sequence {}): the stream holds no message \
             (it starts at sequence 2)",
            published.name, published.stream_sequence
        );
        assert!(error.contains(&expected), "{expected}: {error}");
    }
}

/// Waits until `stream` was purged (no longer starts at its first message); returns where
/// it starts.
async fn purged(stream: &profile_state::jetstream::UpdateStream) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let first = stream.bounds().await.unwrap().first;
        if first > 1 {
            return first;
        }
        assert!(Instant::now() < deadline, "the stream was purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stream backed up (`nats stream backup`) once snapshots were published and the stream
/// purged below them, then restored (`nats stream restore`: the same configuration and
/// messages, a new creation time) could not be started on: the published snapshots are of the
/// earlier incarnation, and the stream no longer starts at its first message (adversarial
/// finding; README called it a limit). Each snapshot records the digest of the message it was
/// taken after, and the restored stream holds that message: a replica on an empty data
/// directory and one on its old one both start from the snapshot, hold what the backup held
/// under a new store id, and apply what comes after. A real backup and restore, through the
/// JetStream API as the NATS CLI makes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_start_on_a_restored_backup_of_a_purged_stream() {
    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _, published) = two_published(&nats, "RESTORED", a_dir.path()).await;
    // Messages after the newest snapshot, which a replica started from it applies.
    for n in 60..65 {
        let body = profile_updated(&format!("p{n}"), &at(1), json!({"total_points": n}));
        post_until_ok(&a, &body).await;
    }
    let stream = stream_of(&nats, "RESTORED").await;
    let first = purged(&stream).await;
    assert!(
        first > published[0].stream_sequence,
        "purged below the older"
    );
    let last = stream.bounds().await.unwrap().last;
    wait_applied(&[(&a).into()], last).await;
    let (held, revision) = Replica::from(&a).dump().await;
    let old_store_id = Replica::from(&a).info().await.store_id;
    let client = stream_backup::client(&nats.client_urls()[0]).await;
    let backup = stream_backup::backup(&client, "RESTORED").await;
    a.stop().await;

    let context = stream.nats().context();
    context.delete_stream("RESTORED").await.unwrap();
    stream_backup::restore(&client, "RESTORED", &backup).await;
    let restored = stream_of(&nats, "RESTORED").await;
    assert_ne!(restored.created(), stream.created(), "another incarnation");
    let bounds = restored.bounds().await.unwrap();
    assert_eq!((bounds.first, bounds.last), (first, last));

    let b_dir = tempfile::tempdir().unwrap();
    let a = TestService::start_with(snapshotting(&nats, "RESTORED", "a", a_dir.path())).await;
    let b = TestService::start_with(snapshotting(&nats, "RESTORED", "b", b_dir.path())).await;
    let replicas = [Replica::from(&a), Replica::from(&b)];
    wait_applied(&replicas, last).await;
    for replica in &replicas {
        let (profiles, now) = replica.dump().await;
        assert_eq!(now, revision, "the revision the backup held");
        assert!(profiles == held, "the profiles the backup held");
        let info = replica.info().await;
        assert_ne!(info.store_id, old_store_id, "a new store to clients");
    }
    let body = profile_updated("after-the-restore", &at(1), json!({"total_points": 7}));
    post_until_ok(&b, &body).await;
    let dump = assert_converged(&replicas).await;
    assert_eq!(dump.len(), held.len() + 1);
    assert!(dump.iter().any(|p| p.customer_id == "after-the-restore"));
    a.stop().await;
    b.stop().await;
}

/// The other side of the restore: a stream deleted and created again with its configuration
/// and fed other messages, purged as the earlier one was, is not taken for a restore of it.
/// The messages at the snapshots' sequences differ, and a snapshot of an earlier release
/// records no digest to compare: start-up refuses, naming each snapshot and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_without_the_messages_the_snapshots_were_taken_after_is_not_started_from_them() {
    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let (a, bucket, published) = two_published(&nats, "UNLIKE", a_dir.path()).await;
    a.stop().await;
    let stream = stream_of(&nats, "UNLIKE").await;
    let old_created = stream.created().to_string();
    let context = stream.nats().context().clone();
    // A snapshot as a release before this one published it: no digest, its sequence held.
    let sequence = published[0].stream_sequence + 1;
    let metadata = [
        ("revision", "1".to_string()),
        ("stream_sequence", sequence.to_string()),
        ("store_id", stream.store_id().to_string()),
        ("stream_created", old_created.clone()),
    ];
    let old_release = async_nats::jetstream::object_store::ObjectMetadata {
        name: format!("snapshot-{sequence:020}"),
        metadata: metadata.map(|(key, value)| (key.to_string(), value)).into(),
        ..Default::default()
    };
    let store = context.get_object_store(bucket.name()).await.unwrap();
    store
        .put(old_release, &mut &b"a snapshot"[..])
        .await
        .unwrap();

    let config = context
        .get_stream("UNLIKE")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    context.delete_stream("UNLIKE").await.unwrap();
    context.create_stream(config).await.unwrap();
    let payload = prost::Message::encode_to_vec(&profile_state::jetstream::UpdateBatch::default());
    for _ in 0..published[1].stream_sequence + 5 {
        let message =
            async_nats::jetstream::message::PublishMessage::build().payload(payload.clone().into());
        let ack = context
            .send_publish("UNLIKE.updates", message)
            .await
            .unwrap();
        ack.await.unwrap();
    }
    let stream = stream_of(&nats, "UNLIKE").await;
    stream
        .purge_below(published[0].stream_sequence)
        .await
        .unwrap();

    let refused = Server::bind(replica_config(&nats, "UNLIKE", "b")).await;
    let error = format!("{:#}", refused.err().expect("b cannot start"));
    assert!(
        error.contains("holds 3 snapshot(s) of an earlier incarnation"),
        "{error}"
    );
    for published in &published {
        let expected = format!(
            "{} (stream created {old_created}, as of sequence {}): the stream's message at its \
             sequence differs from the one it was taken after",
            published.name, published.stream_sequence
        );
        assert!(error.contains(&expected), "{expected}: {error}");
    }
    let expected = format!(
        "snapshot-{sequence:020} (stream created {old_created}, as of sequence {sequence}): no \
         digest of the stream's message at its sequence (published by an earlier release, or \
         once the stream no longer held that message)"
    );
    assert!(error.contains(&expected), "{expected}: {error}");
}

/// `--nats-retain-after-snapshot` of the backup procedure's tests: the stream is purged below
/// the older published snapshot less 5 messages, so it still holds the older's message, as it
/// does with the default (100,000), and purges come quickly.
const RETAIN: u64 = 5;

/// [`snapshotting`], retaining [`RETAIN`] messages before the older published snapshot.
fn retaining(nats: &NatsCluster, stream: &str, name: &str, dir: &Path) -> Config {
    let mut config = snapshotting(nats, stream, name, dir);
    config.nats.retain_after_snapshot = RETAIN;
    config
}

/// Waits until `stream` was purged below the older of `published` (oldest first) less
/// [`RETAIN`]: the purge that follows the newer's upload, whose retirement `publish_more` saw.
async fn purged_below_the_older(
    stream: &profile_state::jetstream::UpdateStream,
    published: &[profile_state::jetstream::SnapshotInfo],
) {
    let first = published[0].stream_sequence + 1 - RETAIN;
    let deadline = Instant::now() + PATIENCE;
    while stream.bounds().await.unwrap().first != first {
        assert!(
            Instant::now() < deadline,
            "the stream was purged to {first}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes every stream of the account (what a cluster whose disks are lost has left), and
/// asserts that `expected` were among them.
async fn lose_every_stream(context: &async_nats::jetstream::Context, expected: &[&str]) {
    let mut names = Vec::new();
    let mut listed = context.stream_names();
    while let Some(name) = listed.next().await {
        names.push(name.unwrap());
    }
    for name in expected {
        assert!(names.iter().any(|held| held == name), "{name} in {names:?}");
    }
    for name in &names {
        context.delete_stream(name).await.unwrap();
    }
}

/// The backup procedure the README gives, through a real disaster: a stream backup alone
/// became useless once the replicas published two more snapshots after it (the bucket keeps
/// only two), and losing the NATS servers' disks loses the bucket and the dead letters too.
/// Backed up in the procedure's order (the snapshot bucket's stream, the update stream, the
/// dead letters' stream) while the stream is purged below its snapshots; the cluster then goes
/// on past the backup (a letter kept, two more snapshots: the live bucket holds none the
/// stream's backup covers); every stream is lost, the three restored. A replica on an empty
/// data directory and one on its old one start from the bucket backup's snapshot, hold what was
/// read at backup time under a new store id, list the backup's letters (not the later one),
/// replay one exactly once, and apply a new webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_backup_procedure_brings_the_replicas_back_after_every_stream_is_lost() {
    use crate::replicated_dead_letters::{
        bad_tier_order, ids, post_until_answered, replay, valid, wait_points,
    };
    use profile_state::dead_letters::DeadLetterId;
    use profile_state::jetstream::SnapshotBucket;

    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let server = Server::bind(retaining(&nats, "LOST", "a", a_dir.path()))
        .await
        .unwrap();
    let letters = server.dead_letters();
    let a = TestService::serve(server);
    let stream = stream_of(&nats, "LOST").await;
    let bucket = SnapshotBucket::open(&stream).await.unwrap();
    let published = publish_more(&a, &bucket, 0, 60).await;
    purged_below_the_older(&stream, &published).await;
    // Two letters: a delivery the validation refuses, and one kept under an older release's
    // rule that is valid now (replayed after the restore).
    let refused = bad_tier_order("refused");
    assert_eq!(post_until_answered(&a, &refused).await.0, 422);
    let old_rule = profile_state::error::Error::invalid("data.total_points", "an older rule");
    let fixed = letters
        .store(&valid("fixed", 7), &old_rule, chrono::Utc::now())
        .await
        .unwrap();
    let (held, revision) = Replica::from(&a).dump().await;
    let old = Replica::from(&a).info().await;

    let client = stream_backup::client(&nats.client_urls()[0]).await;
    let snapshots = stream_backup::backup(&client, "OBJ_LOST_SNAPSHOTS").await;
    let updates = stream_backup::backup(&client, "LOST").await;
    let dead_letters = stream_backup::backup(&client, "KV_LOST_DEAD_LETTERS").await;
    let (first, last) = updates.sequences();
    assert!(first > 1, "purged below a snapshot before the backup");
    assert_eq!(last, old.applied_sequence, "the backup holds what was read");

    // The cluster goes on: a letter kept, two more snapshots published.
    let late = bad_tier_order("late");
    assert_eq!(post_until_answered(&a, &late).await.0, 422);
    let newer = publish_more(&a, &bucket, 60, 100).await;
    assert!(
        newer.iter().all(|snapshot| snapshot.stream_sequence > last),
        "the live bucket holds no snapshot the stream's backup covers: {newer:?}, backup up to \
         {last}"
    );
    a.stop().await;

    // The disaster: every stream lost. The procedure's restores.
    let context = stream.nats().context().clone();
    let lost = [
        "LOST",
        "OBJ_LOST_SNAPSHOTS",
        "KV_LOST_DEAD_LETTERS",
        "KV_LOST_META",
        "KV_LOST_SCHEDULE",
    ];
    lose_every_stream(&context, &lost).await;
    stream_backup::restore(&client, "OBJ_LOST_SNAPSHOTS", &snapshots).await;
    stream_backup::restore(&client, "LOST", &updates).await;
    stream_backup::restore(&client, "KV_LOST_DEAD_LETTERS", &dead_letters).await;
    let restored = stream_of(&nats, "LOST").await;
    assert_ne!(restored.created(), stream.created(), "another incarnation");
    let bounds = restored.bounds().await.unwrap();
    assert_eq!((bounds.first, bounds.last), (first, last));
    // The bucket's backup holds the snapshots of the stream's, the older's message included.
    let restored_bucket = SnapshotBucket::open(&restored).await.unwrap();
    let mut kept: Vec<_> = (restored_bucket.of_earlier_streams().await.unwrap())
        .into_iter()
        .map(|earlier| earlier.snapshot)
        .collect();
    kept.reverse();
    assert_eq!(kept, published);
    assert!(first <= published[0].stream_sequence && published[1].stream_sequence <= last);

    let b_dir = tempfile::tempdir().unwrap();
    let a = TestService::start_with(retaining(&nats, "LOST", "a", a_dir.path())).await;
    let b = TestService::start_with(retaining(&nats, "LOST", "b", b_dir.path())).await;
    let replicas = [Replica::from(&a), Replica::from(&b)];
    wait_applied(&replicas, last).await;
    for replica in &replicas {
        let (profiles, now) = replica.dump().await;
        assert_eq!(now, revision, "the revision read at backup time");
        assert!(profiles == held, "the profiles read at backup time");
        let info = replica.info().await;
        assert_ne!(info.store_id, old.store_id, "a new store to clients");
    }
    // The backup's letters, not the later one; the valid one replayed exactly once.
    let mut expected = vec![DeadLetterId::of(&refused).to_string(), fixed.to_string()];
    expected.sort();
    for replica in [&a, &b] {
        let mut listed = ids(replica).await;
        listed.sort();
        assert_eq!(listed, expected);
    }
    let replayed = replay(&b, &fixed).await.unwrap();
    assert_eq!(replayed.outcome(), pb::ReplayOutcome::Applied);
    assert_eq!(replayed.revision, revision + 1);
    for replica in [&a, &b] {
        assert_eq!(wait_points(replica, "fixed", 7).await, revision + 1);
    }
    let again = replay(&a, &fixed).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");
    assert_eq!(ids(&a).await, vec![DeadLetterId::of(&refused).to_string()]);

    let body = profile_updated("after-the-restore", &at(1), json!({"total_points": 9}));
    post_until_ok(&a, &body).await;
    let dump = assert_converged(&replicas).await;
    assert_eq!(
        dump.len(),
        held.len() + 2,
        "the replayed letter and the new webhook"
    );
    assert!(dump.iter().any(|p| p.customer_id == "after-the-restore"));
    a.stop().await;
    b.stop().await;
}

/// Only the update stream lost, and restored from its backup beside the live bucket, whose
/// snapshots the replicas published after the backup: start-up named each "outside the
/// stream's sequences" and left the operator there. It says what to do (restore the bucket's
/// backup taken with the stream's), and once that is done a replica starts on the two, holds
/// what the backup held, and publishes the restored stream's own snapshots with the
/// coordination bucket that survived. A snapshot is published between the two backups, as it
/// may be on a busy cluster: the stream's backup no longer holds the older snapshot's message,
/// and the retained messages keep the newer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_restored_beside_newer_snapshots_is_started_once_the_buckets_backup_is_restored() {
    use profile_state::jetstream::SnapshotBucket;

    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let a = TestService::start_with(retaining(&nats, "NEWER", "a", a_dir.path())).await;
    let stream = stream_of(&nats, "NEWER").await;
    let bucket = SnapshotBucket::open(&stream).await.unwrap();
    let published = publish_more(&a, &bucket, 0, 60).await;
    purged_below_the_older(&stream, &published).await;
    let client = stream_backup::client(&nats.client_urls()[0]).await;
    let snapshots = stream_backup::backup(&client, "OBJ_NEWER_SNAPSHOTS").await;
    // One more snapshot before the stream's backup: the older one's message is purged.
    let between = publish_more(&a, &bucket, 60, 80).await;
    purged_below_the_older(&stream, &between).await;
    let (held, revision) = Replica::from(&a).dump().await;
    let updates = stream_backup::backup(&client, "NEWER").await;
    let (first, last) = updates.sequences();
    assert!(
        published[0].stream_sequence < first && first <= published[1].stream_sequence,
        "the stream's backup ({first}..={last}) holds the newer snapshot's message only: \
         {published:?}"
    );
    let newer = publish_more(&a, &bucket, 80, 120).await;
    a.stop().await;

    let context = stream.nats().context().clone();
    context.delete_stream("NEWER").await.unwrap();
    stream_backup::restore(&client, "NEWER", &updates).await;
    let b_dir = tempfile::tempdir().unwrap();
    let refused = Server::bind(retaining(&nats, "NEWER", "b", b_dir.path())).await;
    let error = format!("{:#}", refused.err().expect("b cannot start"));
    for snapshot in &newer {
        let expected = format!(
            "{} (stream created {}, as of sequence {}): outside the stream's sequences \
             {first}..={last}",
            snapshot.name,
            stream.created(),
            snapshot.stream_sequence
        );
        assert!(error.contains(&expected), "{expected}: {error}");
    }
    let advice = format!(
        "every one is as of a sequence past the stream's last ({last}): if the stream was \
         restored from a backup, they were published after that backup was taken, and the \
         bucket's own backup taken with it holds the snapshots it continues: delete stream \
         OBJ_NEWER_SNAPSHOTS (`nats stream rm -f OBJ_NEWER_SNAPSHOTS`), restore that backup \
         (`nats stream restore`) and start again"
    );
    assert!(error.contains(&advice), "{error}");

    // The advice followed.
    context.delete_stream("OBJ_NEWER_SNAPSHOTS").await.unwrap();
    stream_backup::restore(&client, "OBJ_NEWER_SNAPSHOTS", &snapshots).await;
    let b = TestService::start_with(retaining(&nats, "NEWER", "b", b_dir.path())).await;
    wait_applied(&[(&b).into()], last).await;
    let (profiles, now) = Replica::from(&b).dump().await;
    assert_eq!(now, revision, "the revision the backup held");
    assert!(profiles == held, "the profiles the backup held");
    // The restored stream's own snapshots, published and retired as usual; once it has two,
    // the earlier incarnation's go (each restore left two for good).
    let restored = stream_of(&nats, "NEWER").await;
    let own = SnapshotBucket::open(&restored).await.unwrap();
    assert!(!own.of_earlier_streams().await.unwrap().is_empty());
    let published = publish_more(&b, &own, 120, 160).await;
    assert!(published[0].stream_sequence > last, "{published:?}");
    let deadline = Instant::now() + PATIENCE;
    while !own.of_earlier_streams().await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the earlier incarnation's snapshots are retired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(own.list().await.unwrap(), published, "its own two are kept");
    b.stop().await;
}

/// The procedure's limit: with `--nats-retain-after-snapshot 0` the stream is purged right
/// past the older snapshot kept, so a snapshot published between the bucket's backup and the
/// stream's purges the message of the newest in the bucket's backup too. The pair restored
/// cannot be started on; start-up names both snapshots as outside the stream (below it: the
/// advice to restore the bucket's backup would be wrong here, and is not given).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_retained_messages_a_snapshot_between_the_two_backups_leaves_them_unusable() {
    use profile_state::jetstream::SnapshotBucket;

    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let a = TestService::start_with(snapshotting(&nats, "UNRETAINED", "a", a_dir.path())).await;
    let stream = stream_of(&nats, "UNRETAINED").await;
    let bucket = SnapshotBucket::open(&stream).await.unwrap();
    let published = publish_more(&a, &bucket, 0, 60).await;
    let client = stream_backup::client(&nats.client_urls()[0]).await;
    let snapshots = stream_backup::backup(&client, "OBJ_UNRETAINED_SNAPSHOTS").await;
    publish_more(&a, &bucket, 60, 80).await;
    let deadline = Instant::now() + PATIENCE;
    while stream.bounds().await.unwrap().first <= published[1].stream_sequence {
        assert!(Instant::now() < deadline, "purged past {published:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let updates = stream_backup::backup(&client, "UNRETAINED").await;
    let (first, last) = updates.sequences();
    a.stop().await;

    let context = stream.nats().context().clone();
    for (name, backup) in [
        ("OBJ_UNRETAINED_SNAPSHOTS", &snapshots),
        ("UNRETAINED", &updates),
    ] {
        context.delete_stream(name).await.unwrap();
        stream_backup::restore(&client, name, backup).await;
    }
    let b_dir = tempfile::tempdir().unwrap();
    let refused = Server::bind(snapshotting(&nats, "UNRETAINED", "b", b_dir.path())).await;
    let error = format!("{:#}", refused.err().expect("b cannot start"));
    for snapshot in &published {
        let expected = format!(
            "as of sequence {}): outside the stream's sequences {first}..={last}",
            snapshot.stream_sequence
        );
        assert!(error.contains(&expected), "{expected}: {error}");
    }
    assert!(!error.contains("delete stream"), "{error}");
}

/// A stream restored from its backup beside its bucket, which holds two snapshots of the
/// earlier incarnation that the restored stream both continues ([`restored_beside_two`]).
struct RestoredBesideTwo {
    /// The bucket's two snapshots, oldest first.
    published: Vec<profile_state::jetstream::SnapshotInfo>,
    /// When the earlier incarnation was created.
    old_created: String,
    /// The profiles and revision the backup held.
    held: Vec<pb::Profile>,
    revision: u64,
    context: async_nats::jetstream::Context,
}

/// A replica `a` of `name` on `dir` publishes two snapshots, retaining [`RETAIN`] messages
/// before the older, and stops once the stream is backed up; the stream is then deleted and
/// restored from the backup, beside the bucket. The restored stream holds both snapshots'
/// messages, so it continues both.
async fn restored_beside_two(nats: &NatsCluster, name: &str, dir: &Path) -> RestoredBesideTwo {
    use profile_state::jetstream::SnapshotBucket;

    let a = TestService::start_with(retaining(nats, name, "a", dir)).await;
    let stream = stream_of(nats, name).await;
    let bucket = SnapshotBucket::open(&stream).await.unwrap();
    let published = publish_more(&a, &bucket, 0, 60).await;
    purged_below_the_older(&stream, &published).await;
    let (held, revision) = Replica::from(&a).dump().await;
    let applied = Replica::from(&a).info().await.applied_sequence;
    let client = stream_backup::client(&nats.client_urls()[0]).await;
    let backup = stream_backup::backup(&client, name).await;
    let (first, last) = backup.sequences();
    assert_eq!(last, applied, "the backup holds what was read");
    assert!(
        first <= published[0].stream_sequence && published[1].stream_sequence <= last,
        "the backup ({first}..={last}) holds both snapshots' messages: {published:?}"
    );
    a.stop().await;

    let context = stream.nats().context().clone();
    context.delete_stream(name).await.unwrap();
    stream_backup::restore(&client, name, &backup).await;
    let restored = stream_of(nats, name).await;
    assert_ne!(restored.created(), stream.created(), "another incarnation");
    let earlier = SnapshotBucket::open(&restored).await.unwrap();
    assert_eq!(earlier.of_earlier_streams().await.unwrap().len(), 2);
    RestoredBesideTwo {
        published,
        old_created: stream.created().to_string(),
        held,
        revision,
        context,
    }
}

/// The newest snapshot in a restored bucket that the stream continues was damaged (its read
/// failed the object store's digest check): start-up failed on it, every time, on every
/// replica, though the older one, which the stream continues too, would start it (found by an
/// adversarial run, who deleted the damaged object by hand). The damaged one is named in a
/// warning and passed over; a replica on an empty data directory starts from the older and
/// holds what the backup held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_snapshot_in_a_restored_bucket_is_passed_over_for_an_older_one() {
    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let restored = restored_beside_two(&nats, "DAMAGED", a_dir.path()).await;
    let (older, newest) = (&restored.published[0], &restored.published[1]);
    damage_last_chunk(&restored.context, "DAMAGED_SNAPSHOTS", &newest.name).await;

    let b_dir = tempfile::tempdir().unwrap();
    let args = bootstrap_args(&nats, "DAMAGED", "b", "2s");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut b = Binary::start_up(b_dir.path(), &args);
    let recovered = b.wait_for("replica recovered").await;
    b.wait_listening().await;
    assert_eq!(
        recovered["source"], "published snapshot of an earlier incarnation of the stream",
        "{recovered}"
    );
    assert_eq!(
        recovered["stream_sequence"], older.stream_sequence,
        "{recovered}"
    );
    let passed_over = b.seen.iter().find(|line| {
        line["message"]
            == "a snapshot of an earlier incarnation of the stream cannot be used: trying the \
                next older one the stream continues, if any"
    });
    let passed_over = passed_over.unwrap_or_else(|| panic!("a warning: {:?}", b.seen));
    assert_damaged(passed_over, &newest.name);
    let replica = Replica::from(&b);
    wait_applied(&[replica], newest.stream_sequence).await;
    let (profiles, revision) = replica.dump().await;
    assert_eq!(revision, restored.revision, "the revision the backup held");
    assert!(profiles == restored.held, "the profiles the backup held");
    let names = binary::file_names(b_dir.path());
    assert!(
        !names.iter().any(|name| name.ends_with(".tmp")),
        "{names:?}"
    );
    b.stop();
}

/// When every snapshot the restored stream continues fails, start-up fails as before, but
/// names each one tried with its failure (it named the newest alone, and an operator who
/// deleted that one met the next), and leaves no download behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_stream_whose_every_continued_snapshot_is_damaged_names_each() {
    let nats = NatsCluster::single().await.unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let restored = restored_beside_two(&nats, "RUINED", a_dir.path()).await;
    for snapshot in &restored.published {
        damage_last_chunk(&restored.context, "RUINED_SNAPSHOTS", &snapshot.name).await;
    }

    let b_dir = tempfile::tempdir().unwrap();
    let refused = Server::bind(retaining(&nats, "RUINED", "b", b_dir.path())).await;
    let error = format!("{:#}", refused.err().expect("b cannot start"));
    let created = stream_of(&nats, "RUINED").await.created().to_string();
    let expected = format!(
        "bucket RUINED_SNAPSHOTS holds 2 snapshot(s) of an earlier incarnation of the stream \
         that this one (created {created}) continues, and none of them could be used: "
    );
    assert!(error.contains(&expected), "{error}");
    for snapshot in restored.published.iter().rev() {
        let expected = format!(
            "{} (stream created {}, as of sequence {}): downloading published snapshot {} \
             failed after ",
            snapshot.name, restored.old_created, snapshot.stream_sequence, snapshot.name
        );
        assert!(error.contains(&expected), "{expected}: {error}");
    }
    assert_eq!(error.matches("wrong digest").count(), 2, "{error}");
    let names = binary::file_names(b_dir.path());
    let left = names.iter().any(|name| name.contains(".snap"));
    assert!(!left, "no download left: {names:?}");
}

/// A restored stream's creation time is not the same on every server of a NATS cluster: the
/// server that ran the restore reports its own clock, the others the stream assignment's,
/// some milliseconds earlier (nats-server 2.15). Replicas took it for the stream's identity:
/// the first change of stream leader after a restore made every one of them take the stream
/// for replaced and stop, and a replica started after it served another store id (found by
/// an adversarial run). Then, told by either its creation time or its Raft group, a restored
/// stream scaled down to one replica and up again, both marks changed, was taken for replaced
/// (found by the next). Running replicas follow each change, and one started after one change
/// serves the same store id and keeps its snapshots; one started after both takes the stream
/// for another incarnation, and every replica then serves one new id, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_stream_keeps_its_identity_when_its_leader_moves_and_it_is_scaled() {
    let nats = NatsCluster::three().await.unwrap();
    let config = |name: &str, dir: &Path| {
        let mut config = snapshotting(&nats, "MOVED", name, dir);
        config.snapshot_every_records = 5;
        config
    };
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestService::start_with(config("a", a_dir.path())).await;
    for n in 0..10 {
        let body = profile_updated(&format!("p{n}"), &at(1), json!({"total_points": n}));
        post_until_ok(&a, &body).await;
    }
    let client = stream_backup::client(&nats.client_urls()[0]).await;
    let backup = stream_backup::backup(&client, "MOVED").await;
    a.stop().await;
    let context = async_nats::jetstream::new(client.clone());
    context.delete_stream("MOVED").await.unwrap();
    stream_backup::restore(&client, "MOVED", &backup).await;

    let before = stream_of(&nats, "MOVED").await;
    let a = TestService::start_with(config("a", a_dir.path())).await;
    let b = TestService::start_with(config("b", b_dir.path())).await;
    let store_id = Replica::from(&a).info().await.store_id;
    assert_eq!(Replica::from(&b).info().await.store_id, store_id);
    let metadata = context.get_stream("MOVED").await.unwrap();
    let metadata = &metadata.cached_info().config.metadata;
    assert_eq!(
        metadata.get("profile_state_store_id"),
        Some(&store_id),
        "the restored stream's id recorded as its metadata's"
    );
    assert!(metadata.contains_key("profile_state_store_raft_group"));
    // Snapshots of the restored stream, in b's directory and published.
    for n in 10..20 {
        let body = profile_updated(&format!("p{n}"), &at(1), json!({"total_points": n}));
        post_until_ok(&b, &body).await;
    }
    b.stop().await;
    let local = || {
        let names = std::fs::read_dir(b_dir.path()).unwrap();
        let names = names.map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned());
        names.filter(|name| name.ends_with(".snap")).count()
    };
    assert!(local() > 0, "b took snapshots");
    let bucket = profile_state::jetstream::SnapshotBucket::open(&before)
        .await
        .unwrap();
    assert!(
        !bucket.list().await.unwrap().is_empty(),
        "published snapshots of the restored stream"
    );

    step_down_stream_leader(&client, "MOVED").await;
    let created = context
        .get_stream("MOVED")
        .await
        .unwrap()
        .cached_info()
        .created;
    assert_ne!(
        created,
        before.created().0,
        "the premise: the new leader reports another creation time (if a nats-server reports \
         one time everywhere, this test no longer shows the bug it guards against)"
    );
    before
        .bounds()
        .await
        .expect("the same stream to a handle opened before");
    // Started after one mark changed: the same store, and b's snapshots its own.
    let c = TestService::start_with(replica_config(&nats, "MOVED", "c")).await;
    let b = TestService::start_with(config("b", b_dir.path())).await;
    for replica in [&b, &c] {
        let info = Replica::from(replica).info().await;
        assert_eq!(info.store_id, store_id, "one store id");
    }
    let aside = stale(b_dir.path());
    assert!(aside.is_empty(), "b's snapshots were set aside: {aside:?}");
    assert!(local() > 0, "b's snapshots are where they were");

    // Then scaled down to one replica (which a cluster reports no Raft group for), and up
    // again (a new group), under the running replicas: each step changes one mark, and after
    // both, neither is what they started on. They took that for a replaced stream, stopped,
    // came back under other store ids, and set their snapshots aside (found by an adversarial
    // run): they follow each step.
    let group = |info: &async_nats::jetstream::stream::Info| {
        info.cluster
            .as_ref()
            .and_then(|cluster| cluster.raft_group.clone())
    };
    let first_group = group(
        &context
            .get_stream("MOVED")
            .await
            .unwrap()
            .cached_info()
            .clone(),
    );
    for (replicas, customer) in [(1, "one-replica"), (3, "three-again")] {
        // The premise: no group for one replica, then a new one.
        let moved_on = |info: &async_nats::jetstream::stream::Info| match replicas {
            1 => group(info).is_none(),
            _ => group(info).is_some_and(|group| Some(group) != first_group),
        };
        scale(&context, "MOVED", replicas, moved_on).await;
        before
            .bounds()
            .await
            .expect("the same stream, followed through each step");
        let body = profile_updated(customer, &at(1), json!({"total_points": 1}));
        post_until_ok(&a, &body).await;
    }
    let body = profile_updated("after-the-moves", &at(1), json!({"total_points": 1}));
    post_until_ok(&c, &body).await;
    // a's status poll read the stream from its new leader since: not taken for replaced.
    let last = context
        .get_stream("MOVED")
        .await
        .unwrap()
        .cached_info()
        .state
        .last_sequence;
    let deadline = Instant::now() + PATIENCE;
    while Replica::from(&a).info().await.stream_last_sequence < last {
        assert!(Instant::now() < deadline, "a polls the stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replicas = [Replica::from(&a), Replica::from(&b), Replica::from(&c)];
    for replica in &replicas {
        assert_eq!(replica.info().await.store_id, store_id, "one store id");
    }
    // Ready again once its polls are answered (a cluster reconfiguring the stream may leave
    // one unanswered for seconds).
    for (name, replica) in [("a", &a), ("b", &b), ("c", &c)] {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, reason) = replica.admin_get("/readyz").await;
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "{name} ready: {reason}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let held = assert_converged(&replicas).await;

    // The metadata's record is not rewritten at each change (an update carries the whole
    // configuration, and one from a read a moment old undid operators' changes): both its
    // marks changed, so a replica that starts now takes the stream for another incarnation.
    // Every replica then serves one new store id (none keeps the old one beside it), each
    // one's snapshots of the old id are set aside, and they start from the published ones the
    // stream continues: once, and nothing lost.
    let d = TestService::start_with(replica_config(&nats, "MOVED", "d")).await;
    let new_id = Replica::from(&d).info().await.store_id;
    assert_ne!(new_id, store_id, "taken for another incarnation");
    for replica in [a, b, c] {
        replica.stopped_by_itself(PATIENCE).await.unwrap_err();
    }
    let a = TestService::start_with(config("a", a_dir.path())).await;
    let b = TestService::start_with(config("b", b_dir.path())).await;
    let replicas = [Replica::from(&a), Replica::from(&b), Replica::from(&d)];
    for replica in &replicas {
        assert_eq!(replica.info().await.store_id, new_id, "one new store id");
    }
    let now_held = assert_converged(&replicas).await;
    assert!(now_held == held, "the same profiles");
    for replica in [a, b, d] {
        replica.stop().await;
    }
}

/// The `stale-*` directories in `dir`: snapshots set aside as another stream's.
fn stale(dir: &Path) -> Vec<String> {
    let names = std::fs::read_dir(dir).unwrap();
    let names = names.map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned());
    names.filter(|name| name.starts_with("stale-")).collect()
}

/// Scales `stream` to `replicas` and waits until a leader and every other replica are
/// current, and its info is `done`.
async fn scale(
    context: &async_nats::jetstream::Context,
    stream: &str,
    replicas: usize,
    done: impl Fn(&async_nats::jetstream::stream::Info) -> bool,
) {
    let handle = context.get_stream(stream).await.unwrap();
    let mut config = handle.cached_info().config.clone();
    config.num_replicas = replicas;
    context.update_stream(config).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut seen = None;
    loop {
        if let Ok(handle) = context.get_stream(stream).await {
            let info = handle.cached_info().clone();
            if let Some(cluster) = &info.cluster {
                let current = cluster.replicas.iter().filter(|peer| peer.current).count();
                if cluster.leader.is_some() && current + 1 == replicas && done(&info) {
                    return;
                }
            }
            seen = Some(info.cluster);
        }
        assert!(
            Instant::now() < deadline,
            "{stream} on {replicas} replicas: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks the leader of `stream` to step down, and waits until another server leads it.
async fn step_down_stream_leader(client: &async_nats::Client, stream: &str) {
    let context = async_nats::jetstream::new(client.clone());
    let leader = |info: &async_nats::jetstream::stream::Info| {
        info.cluster
            .as_ref()
            .and_then(|cluster| cluster.leader.clone())
    };
    let mut handle = context.get_stream(stream).await.unwrap();
    let was = leader(&handle.info().await.unwrap().clone());
    assert!(was.is_some(), "the stream has a leader");
    let answer = client
        .request(
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
            "".into(),
        )
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["success"], true, "step-down: {answer}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(info) = handle.info().await {
            let now = leader(info);
            if now.is_some() && now != was {
                return;
            }
        }
        assert!(Instant::now() < deadline, "another leader for {stream}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
