//! The JetStream adapter against a real nats-server (started by `nats-harness`, installed if
//! missing): the stream and its store id, publish and dedupe, the ordered follower across a
//! server restart and past a purge, snapshots in the object store, dead letters in KV, TLS.

use std::time::{Duration, Instant};

use nats_harness::{NatsCluster, Node};
use profile_state::Config;
use profile_state::jetstream::{
    DeadLetterBucket, Follower, JetStreamError, Nats, SnapshotBucket, StreamSettings, UpdateBatch,
    UpdateStream,
};
use profile_state::profile::{EventTime, Field, ProfileKey, ProfileUpdate, Scalar};
use tokio::io::AsyncReadExt;

fn settings(name: &str) -> StreamSettings {
    StreamSettings {
        name: name.into(),
        replicas: 1,
        duplicate_window: Duration::from_secs(2 * 3600),
        max_bytes: None,
    }
}

async fn connect(nats: &NatsCluster) -> Nats {
    let mut config = Config::for_tests("s").nats;
    config.urls = nats.client_urls();
    Nats::connect(&config, "test").await.expect("connects")
}

/// A single server, a connection, and the stream `name` on it.
async fn started(name: &str) -> (NatsCluster, Nats, UpdateStream) {
    let nats = NatsCluster::single().await.unwrap();
    let client = connect(&nats).await;
    let stream = UpdateStream::ensure(&client, &settings(name))
        .await
        .unwrap();
    (nats, client, stream)
}

fn update(customer: &str, points: i64) -> ProfileUpdate {
    ProfileUpdate {
        key: ProfileKey::new("2155", customer),
        at: EventTime::from_timestamp(1_732_037_682 + points, 0).unwrap(),
        fields: vec![(Field::TotalPoints, Some(Scalar::Int(points)))],
        extras: vec![],
        origin: profile_state::profile::Origin::Webhook,
    }
}

fn batch(customer: &str, points: i64) -> UpdateBatch {
    UpdateBatch::new([&update(customer, points)])
}

/// Publishes, retrying while the connection comes back after a server restart.
async fn publish_eventually(stream: &UpdateStream, batch: &UpdateBatch) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match stream.publish(batch).await {
            Ok(published) => return published.sequence,
            Err(JetStreamError::Unavailable { .. } | JetStreamError::Unconfirmed { .. })
                if Instant::now() < deadline => {}
            Err(err) => panic!("publish failed: {err}"),
        }
    }
}

/// The next entry, or a failure after 10 s (a follower that hangs is a failed test).
async fn next(follower: &mut Follower) -> Result<profile_state::jetstream::Entry, JetStreamError> {
    tokio::time::timeout(Duration::from_secs(10), follower.next())
        .await
        .expect("an entry within 10 s")
}

fn points(entry: &profile_state::jetstream::Entry) -> i64 {
    let updates = entry.batch.clone().into_updates().unwrap();
    match updates[0].fields[0].1 {
        Some(Scalar::Int(points)) => points,
        ref other => panic!("unexpected value {other:?}"),
    }
}

#[tokio::test]
async fn replicas_racing_to_create_the_stream_share_one_store_id() {
    let nats = NatsCluster::single().await.unwrap();
    let (a, b) = (connect(&nats).await, connect(&nats).await);
    let wanted = settings("RACE");
    let (first, second) = tokio::join!(
        UpdateStream::ensure(&a, &wanted),
        UpdateStream::ensure(&b, &wanted)
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first.store_id(), second.store_id());
    assert_eq!(first.store_id().len(), 32, "a fresh uuid");
    let again = UpdateStream::ensure(&a, &wanted).await.unwrap();
    assert_eq!(again.store_id(), first.store_id(), "kept across starts");
}

/// A stream made by a release that did not record which incarnation its store id is of keeps
/// its id (its replicas' watchers are not reset by an upgrade), and the incarnation is recorded
/// then, so that a restore or a re-creation of it later is a new store to clients.
#[tokio::test]
async fn a_stream_of_an_earlier_release_keeps_its_store_id_and_gets_its_incarnation_recorded() {
    let (_nats, client, made) = started("EARLIER").await;
    let context = client.context();
    let config = || async {
        let stream = context.get_stream("EARLIER").await.unwrap();
        stream.cached_info().config.clone()
    };
    let recorded = |config: &async_nats::jetstream::stream::Config| {
        config.metadata.get("profile_state_store_created").cloned()
    };
    let mut earlier = config().await;
    assert_eq!(recorded(&earlier), Some(made.created().to_string()));
    earlier.metadata.remove("profile_state_store_created");
    context.update_stream(earlier).await.unwrap();

    let opened = UpdateStream::ensure(&client, &settings("EARLIER"))
        .await
        .unwrap();
    assert_eq!(
        opened.store_id(),
        made.store_id(),
        "the same store to clients"
    );
    assert_eq!(
        recorded(&config().await),
        Some(opened.created().to_string())
    );
}

#[tokio::test]
async fn an_existing_stream_that_cannot_work_is_refused_naming_the_setting() {
    let nats = NatsCluster::single().await.unwrap();
    let client = connect(&nats).await;
    UpdateStream::ensure(&client, &settings("CHECKED"))
        .await
        .unwrap();

    let three = StreamSettings {
        replicas: 3,
        ..settings("CHECKED")
    };
    let error = UpdateStream::ensure(&client, &three).await.err().unwrap();
    assert_eq!(
        error.to_string(),
        "CHECKED: replicas is 1, expected 3 (--nats-replicas; or change the stream's replicas on \
         the server)"
    );

    let longer = StreamSettings {
        duplicate_window: Duration::from_secs(3 * 3600),
        ..settings("CHECKED")
    };
    let error = UpdateStream::ensure(&client, &longer).await.err().unwrap();
    assert_eq!(
        error.to_string(),
        "CHECKED: duplicate_window is 2h, expected at least 3h (--nats-duplicate-window; or \
         raise the stream's duplicate window on the server)"
    );

    // A stream of other merge rules (a newer or older release's): replicas of both would
    // assign different revisions, so it is refused, saying how to upgrade.
    let context = client.context();
    crate::common::set_stream_metadata(context, "CHECKED", "profile_state_rules", "0").await;
    let error = UpdateStream::ensure(&client, &settings("CHECKED"))
        .await
        .err()
        .unwrap();
    let message = error.to_string();
    assert!(
        message.contains("metadata merge rules version"),
        "{message}"
    );
    assert!(
        message.contains("a build that implements them"),
        "{message}"
    );

    // A stream an operator made by hand: no store id, messages removed by age.
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: "HANDMADE".into(),
            subjects: vec!["HANDMADE.updates".into()],
            max_age: Duration::from_secs(3 * 3600),
            duplicate_window: Duration::from_secs(2 * 3600),
            ..Default::default()
        })
        .await
        .unwrap();
    let error = UpdateStream::ensure(&client, &settings("HANDMADE"))
        .await
        .err()
        .unwrap();
    assert!(
        error.to_string().starts_with("HANDMADE: max_age is 3h"),
        "{error}"
    );

    // Creating R3 on a single server fails with the reason and the flag to change.
    let error = UpdateStream::ensure(
        &client,
        &StreamSettings {
            replicas: 3,
            ..settings("R3")
        },
    )
    .await
    .err()
    .unwrap();
    assert!(
        error.to_string().contains("--nats-replicas 3 needs"),
        "{error}"
    );
}

#[tokio::test]
async fn a_repeated_publish_is_dropped_and_answered_with_the_original_sequence() {
    let (nats, _client, stream) = started("DEDUPE").await;

    let first = stream.publish(&batch("c1", 10)).await.unwrap();
    let second = stream.publish(&batch("c2", 20)).await.unwrap();
    let repeat = stream.publish(&batch("c1", 10)).await.unwrap();
    assert_eq!((first.sequence, first.duplicate), (1, false));
    assert_eq!((second.sequence, second.duplicate), (2, false));
    assert_eq!((repeat.sequence, repeat.duplicate), (1, true));
    // The same batch through another connection (another replica) is a repeat too.
    let other = UpdateStream::ensure(&connect(&nats).await, &settings("DEDUPE"))
        .await
        .unwrap();
    assert_eq!(other.publish(&batch("c2", 20)).await.unwrap().sequence, 2);

    let bounds = stream.bounds().await.unwrap();
    assert_eq!(
        (bounds.first, bounds.last),
        (1, 2),
        "the repeats stored nothing"
    );

    let mut follower = Follower::start(&stream, 0).await.unwrap();
    assert_eq!(points(&next(&mut follower).await.unwrap()), 10);
    let entry = next(&mut follower).await.unwrap();
    assert_eq!((entry.sequence, entry.pending, points(&entry)), (2, 0, 20));
}

#[tokio::test]
async fn a_batch_over_the_servers_max_payload_is_refused_before_sending() {
    let (_nats, client, stream) = started("BIG").await;
    let mut big = update("c1", 1);
    big.extras = vec![(
        "blob".into(),
        Some(serde_json::json!("x".repeat(client.max_payload()))),
    )];
    let error = stream.publish(&UpdateBatch::new([&big])).await.unwrap_err();
    assert!(
        matches!(error, JetStreamError::TooLarge { max, .. } if max == 1024 * 1024),
        "{error}"
    );
    assert_eq!(stream.bounds().await.unwrap().last, 0);
}

#[tokio::test]
async fn followers_resume_after_a_server_restart_without_gaps_or_repeats() {
    let (mut nats, _client, stream) = started("RESTART").await;
    for points in 1..=5 {
        stream.publish(&batch("c1", points)).await.unwrap();
    }
    // One follower mid-stream, one caught up before it has seen a message: recreated after
    // the restart, the second one's consumer starts from the beginning of the stream again
    // (pitfall 1), and must still hand out only what comes after 5.
    let mut reading = Follower::start(&stream, 0).await.unwrap();
    for expected in 1..=3 {
        assert_eq!(next(&mut reading).await.unwrap().sequence, expected);
    }
    let mut caught_up = Follower::start(&stream, 5).await.unwrap();

    let node: &mut Node = &mut nats.nodes_mut()[0];
    node.kill();
    node.restart().await.unwrap();
    for points in 6..=8 {
        publish_eventually(&stream, &batch("c1", points)).await;
    }

    let seen: Vec<u64> = {
        let mut seen = Vec::new();
        for _ in 4..=8 {
            let entry = next(&mut reading).await.unwrap();
            assert_eq!(points(&entry), entry.sequence as i64);
            seen.push(entry.sequence);
        }
        seen
    };
    assert_eq!(
        seen,
        [4, 5, 6, 7, 8],
        "synced before the crash, so nothing lost"
    );
    for expected in 6..=8 {
        assert_eq!(next(&mut caught_up).await.unwrap().sequence, expected);
    }
    assert_eq!(stream.bounds().await.unwrap().last, 8);
}

#[tokio::test]
async fn a_start_below_the_streams_first_sequence_is_detected() {
    let (_nats, _client, stream) = started("PURGED").await;
    for points in 1..=5 {
        stream.publish(&batch("c1", points)).await.unwrap();
    }
    assert_eq!(stream.purge_below(4).await.unwrap(), 3);

    let error = Follower::start(&stream, 1).await.err().unwrap();
    assert_eq!(
        error,
        JetStreamError::StartBelowFirst {
            stream: "PURGED".into(),
            requested: 2,
            first: 4
        }
    );
    assert!(
        error
            .to_string()
            .ends_with("load a snapshot at or after sequence 3"),
        "{error}"
    );

    // Exactly at the purge point is fine: 3 was applied, 4 is the first held.
    let mut follower = Follower::start(&stream, 3).await.unwrap();
    assert_eq!(next(&mut follower).await.unwrap().sequence, 4);
    assert_eq!(next(&mut follower).await.unwrap().sequence, 5);

    // A replica that applied more than the stream holds follows a replaced stream.
    let error = Follower::start(&stream, 9).await.err().unwrap();
    assert!(
        matches!(
            error,
            JetStreamError::AheadOfStream {
                applied: 9,
                last: 5,
                ..
            }
        ),
        "{error}"
    );
}

/// Bytes that do not repeat in any short period, so chunking mistakes show.
fn blob(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// An object description another client wrote, which async-nats cannot read (nats-py's delete
/// writes an empty `mtime`), made every listing of the bucket fail: start-up retried for 30 s
/// saying JetStream did not answer, then exited (found by an adversarial run). The listing
/// skips it; the removal of unfinished uploads, which could take a live object's chunks for an
/// abandoned upload's if its description were skipped, refuses to run instead.
#[tokio::test]
async fn an_unreadable_object_description_is_skipped_but_stops_the_removal_of_uploads() {
    let (_nats, client, stream) = started("UNREADABLE").await;
    let bucket = SnapshotBucket::open(&stream).await.unwrap();
    let snapshot = bucket.put(1, 1, &mut &b"a snapshot"[..]).await.unwrap();
    let description = r#"{"name":"elsewhere","bucket":"UNREADABLE_SNAPSHOTS","nuid":"x","size":0,"chunks":0,"mtime":"","deleted":true}"#;
    client
        .context()
        .publish("$O.UNREADABLE_SNAPSHOTS.M.ZWxzZXdoZXJl", description.into())
        .await
        .unwrap()
        .await
        .unwrap();

    assert_eq!(bucket.list().await.unwrap(), vec![snapshot]);
    let refused = bucket.unfinished_uploads().await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("$O.UNREADABLE_SNAPSHOTS.M.ZWxzZXdoZXJl"),
        "{refused}"
    );
}

/// Unfinished uploads are aged by the NATS server's clock (the bucket's newest message), not
/// this host's: with this host's clock ahead of the server's by the quiet time, an upload
/// under way looked abandoned and its chunks were removed (found in a final read). Here this
/// host's clock runs ahead by waiting while the server writes nothing.
#[tokio::test]
async fn unfinished_uploads_are_aged_by_the_servers_clock() {
    let (_nats, client, stream) = started("AGE").await;
    let bucket = SnapshotBucket::open(&stream).await.unwrap();
    let chunk = "$O.AGE_SNAPSHOTS.C.unfinished";
    let ack = client.context().publish(chunk, "part".into()).await;
    ack.unwrap().await.unwrap();
    bucket.put(1, 1, &mut &b"finished"[..]).await.unwrap();
    assert_eq!(bucket.unfinished_uploads().await.unwrap().len(), 1);
    let quiet = Duration::from_secs(1);
    tokio::time::sleep(quiet + Duration::from_millis(500)).await;
    assert_eq!(
        bucket.remove_unfinished_uploads(quiet).await.unwrap(),
        0,
        "written just before the newest message: not quiet yet, however late it is here"
    );
    // The server's newest message now comes a quiet time after the chunk: it goes.
    bucket.put(2, 2, &mut &b"finished again"[..]).await.unwrap();
    assert_eq!(bucket.remove_unfinished_uploads(quiet).await.unwrap(), 1);
    assert!(bucket.unfinished_uploads().await.unwrap().is_empty());
}

#[tokio::test]
async fn snapshots_round_trip_through_the_object_store() {
    let (_nats, client, stream) = started("SNAP").await;
    let bucket = SnapshotBucket::open(&stream).await.unwrap();
    assert_eq!(bucket.newest().await.unwrap(), None);
    // One replica at a time holds the upload claim; a second claimant is told so, not failed.
    let r1 = bucket.claim_upload("r1").await.unwrap().expect("r1 claims");
    let r1_again = r1.clone();
    assert_eq!(
        bucket.upload_claim_holder().await.unwrap().as_deref(),
        Some("r1")
    );
    assert!(
        bucket
            .claim_upload("r2")
            .await
            .expect("a held claim is not an error")
            .is_none()
    );
    bucket.release_upload(r1).await.unwrap();
    assert_eq!(bucket.upload_claim_holder().await.unwrap(), None);
    let r2_before = bucket.claim_upload("r2").await.unwrap().expect("r2 claims");
    // r2 started again after a kill mid-upload: a claim in its own name is its own, taken over
    // at once, not waited out for 10 minutes (found by an adversarial run); what the killed
    // r2 held is then no longer a claim to give back.
    let r2 = bucket
        .claim_upload("r2")
        .await
        .unwrap()
        .expect("r2 takes its own claim over");
    bucket.release_upload(r2_before).await.unwrap();
    assert_eq!(
        bucket.upload_claim_holder().await.unwrap().as_deref(),
        Some("r2")
    );
    // Again once the key has been purged before (nats-server words that answer differently).
    assert!(
        bucket
            .claim_upload("r1")
            .await
            .expect("a held claim is not an error")
            .is_none()
    );
    // A claim that lapsed and was taken by another replica is not its old holder's to give
    // back: r1 releasing its old claim again leaves r2's in place.
    bucket.release_upload(r1_again).await.unwrap();
    assert_eq!(
        bucket.upload_claim_holder().await.unwrap().as_deref(),
        Some("r2")
    );
    bucket.release_upload(r2).await.unwrap();

    let older = blob(300_000);
    let large = blob(8 * 1024 * 1024 + 3);
    bucket.put(100, 7, &mut older.as_slice()).await.unwrap();
    let put = bucket.put(250, 9, &mut large.as_slice()).await.unwrap();
    assert_eq!(
        (put.revision, put.stream_sequence, put.size),
        (250, 9, large.len())
    );

    let newest = bucket.newest().await.unwrap().unwrap();
    assert_eq!(newest, put);
    let mut read = Vec::new();
    bucket
        .read(&newest)
        .await
        .unwrap()
        .read_to_end(&mut read)
        .await
        .unwrap();
    assert!(read == large, "the 8 MiB blob comes back byte for byte");

    assert_eq!(bucket.retire(1).await.unwrap(), 1);
    let left: Vec<u64> = bucket
        .list()
        .await
        .unwrap()
        .iter()
        .map(|s| s.stream_sequence)
        .collect();
    assert_eq!(left, [9]);

    // The stream replaced (new store id): the old store's snapshots are not offered. A replica
    // does not make it again beside them (the stream was lost: its restore would drop what the
    // new one took); an operator does, here as a new store.
    let context = client.context();
    let config_now = || async {
        let stream = context.get_stream("SNAP").await.unwrap();
        stream.cached_info().config.clone()
    };
    let mut config = config_now().await;
    context.delete_stream("SNAP").await.unwrap();
    let lost = UpdateStream::ensure(&client, &settings("SNAP")).await;
    assert!(
        matches!(lost, Err(JetStreamError::Lost { .. })),
        "{:?}",
        lost.err()
    );
    config
        .metadata
        .insert("profile_state_store_id".into(), "a-new-store".into());
    config.metadata.remove("profile_state_store_created");
    context.create_stream(config).await.unwrap();
    let replaced = UpdateStream::ensure(&client, &settings("SNAP"))
        .await
        .unwrap();
    assert_ne!(replaced.store_id(), stream.store_id());
    let bucket = SnapshotBucket::open(&replaced).await.unwrap();
    assert_eq!(bucket.newest().await.unwrap(), None);

    // Replaced again with its very configuration (its metadata's store id, as an operator
    // restoring its definition makes it): a new store to clients all the same, the snapshots of
    // the stream before are not offered either (found by adversarial runs), and the handle on
    // that one says the stream is not its own.
    bucket
        .put(1, 2, &mut &b"a snapshot of the stream before"[..])
        .await
        .unwrap();
    let config = config_now().await;
    context.delete_stream("SNAP").await.unwrap();
    context.create_stream(config).await.unwrap();
    let again = UpdateStream::ensure(&client, &settings("SNAP"))
        .await
        .unwrap();
    assert_ne!(again.store_id(), replaced.store_id());
    let bucket = SnapshotBucket::open(&again).await.unwrap();
    assert_eq!(bucket.newest().await.unwrap(), None);
    // A snapshot of the same sequence does not overwrite the earlier stream's, which a
    // restored backup of that stream may need (the names carry the store id).
    bucket
        .put(1, 2, &mut &b"a snapshot of this stream"[..])
        .await
        .unwrap();
    let earlier = bucket.of_earlier_streams().await.unwrap();
    assert_eq!(earlier.len(), 2, "{earlier:?}");
    let before = earlier
        .iter()
        .find(|earlier| earlier.snapshot.stream_sequence == 2)
        .expect("the earlier stream's snapshot of sequence 2");
    let mut read = Vec::new();
    bucket
        .read(&before.snapshot)
        .await
        .unwrap()
        .read_to_end(&mut read)
        .await
        .unwrap();
    assert_eq!(read, b"a snapshot of the stream before");
    assert_eq!(before.message_digest, None, "the stream held no message 2");
    let error = replaced.bounds().await.unwrap_err();
    assert!(matches!(error, JetStreamError::Replaced { .. }), "{error}");
}

/// A snapshot records the digest of the stream's message at its sequence, or goes
/// unpublished: the handle's stream taken for another incarnation since (as a replica started
/// meanwhile takes it), the digest cannot be read, and an upload without it, which no restored
/// stream can start from, was followed by a purge that left the older one none either (a
/// restored stream's replicas then had nothing to start from: found by CI, where the read
/// failed while the stream was scaled). Nor does a handle on such a stream retire the
/// snapshots of the store served now, which to it are an earlier incarnation's.
#[tokio::test]
async fn a_snapshot_is_published_with_its_messages_digest_or_not_at_all() {
    let (_nats, client, stream) = started("DIGEST").await;
    let sequence = publish_eventually(&stream, &batch("c1", 1)).await;
    let bucket = SnapshotBucket::open(&stream).await.unwrap();
    bucket
        .put(1, sequence, &mut &b"with a digest"[..])
        .await
        .unwrap();
    bucket
        .put(1, sequence + 5, &mut &b"past the last message"[..])
        .await
        .unwrap();
    let context = client.context();
    crate::common::set_stream_metadata(context, "DIGEST", "profile_state_store_id", "other").await;
    let error = stream.bounds().await.unwrap_err();
    assert!(matches!(error, JetStreamError::Replaced { .. }), "{error}");
    for at in [sequence, sequence + 9] {
        let put = bucket
            .put(2, at, &mut &b"of a store no longer served"[..])
            .await;
        assert!(
            matches!(put, Err(JetStreamError::Replaced { .. })),
            "sequence {at}: {put:?}"
        );
    }
    // The store served now: the replaced handle's snapshots are an earlier incarnation's to it,
    // and the digest recorded is the stream's message's.
    let served = UpdateStream::ensure(&client, &settings("DIGEST"))
        .await
        .unwrap();
    let served_bucket = SnapshotBucket::open(&served).await.unwrap();
    served_bucket
        .put(3, sequence, &mut &b"of the store served"[..])
        .await
        .unwrap();
    let earlier = served_bucket.of_earlier_streams().await.unwrap();
    let sequences: Vec<_> = (earlier.iter())
        .map(|earlier| earlier.snapshot.stream_sequence)
        .collect();
    assert_eq!(
        sequences,
        [sequence + 5, sequence],
        "nothing else published"
    );
    assert_eq!(earlier[0].message_digest, None, "no message there");
    let digest = served.message_digest(sequence).await.unwrap();
    assert!(digest.is_some());
    assert_eq!(earlier[1].message_digest, digest);
    let error = bucket.retire(2).await.unwrap_err();
    assert!(matches!(error, JetStreamError::Replaced { .. }), "{error}");
    assert_eq!(served_bucket.list().await.unwrap().len(), 1, "still there");
}

#[tokio::test]
async fn dead_letters_are_created_once_and_changed_only_at_the_revision_read() {
    let nats = NatsCluster::single().await.unwrap();
    let stream = UpdateStream::ensure(&connect(&nats).await, &settings("DLQ"))
        .await
        .unwrap();
    let a = DeadLetterBucket::open(&stream, 256 * 1024).await.unwrap();
    let b = DeadLetterBucket::open(&stream, 256 * 1024).await.unwrap();
    let id = "3f786850e387550fdab836ed7e6dc881de23001b";

    let created = a.create(id, b"first".to_vec()).await.unwrap().expect("new");
    assert_eq!(
        b.create(id, b"again".to_vec()).await.unwrap(),
        None,
        "exists"
    );
    let entry = b.get(id).await.unwrap().unwrap();
    assert_eq!(
        (entry.value.as_slice(), entry.revision),
        (&b"first"[..], created)
    );

    let updated = a.update(id, b"second".to_vec(), created).await.unwrap();
    let error = b.update(id, b"stale".to_vec(), created).await.unwrap_err();
    assert!(matches!(error, JetStreamError::Conflict { .. }), "{error}");
    assert_eq!(a.ids().await.unwrap(), [id]);

    // Two replicas replaying: only the removal at the current revision wins.
    let error = b.remove(id, created).await.unwrap_err();
    assert!(matches!(error, JetStreamError::Conflict { .. }), "{error}");
    a.remove(id, updated).await.unwrap();
    assert_eq!(b.get(id).await.unwrap(), None);
    assert!(a.ids().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_publish_while_nats_is_down_fails_within_the_request_timeout() {
    let (mut nats, client, stream) = started("DOWN").await;
    nats.kill_all();
    let started = Instant::now();
    let error = stream.publish(&batch("c1", 1)).await.unwrap_err();
    // Unavailable once the client knows the connection is gone; before that, the publish was
    // written to a socket whose server died, and its fate is unconfirmed.
    assert!(
        matches!(
            error,
            JetStreamError::Unavailable {
                operation: "publish",
                ..
            } | JetStreamError::Unconfirmed {
                operation: "publish",
                ..
            }
        ),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "bounded by the request timeout"
    );
    assert!(!client.is_connected());
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files
/// in `dir`: (ca, server cert, server key, client cert, client key).
fn pki(dir: &std::path::Path) -> [std::path::PathBuf; 5] {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let issue = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        (
            params.signed_by(&key, &ca).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = issue("127.0.0.1");
    let (client_cert, client_key) = issue("replica");
    let files = [
        ("ca.pem", ca.pem()),
        ("server.pem", server_cert),
        ("server.key", server_key),
        ("client.pem", client_cert),
        ("client.key", client_key),
    ];
    files.map(|(name, pem)| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    })
}

#[tokio::test]
async fn the_tls_flags_connect_with_a_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, server_cert, server_key, client_cert, client_key] = pki(dir.path());
    let [port, http] = nats_harness::free_ports::<2>().unwrap();
    let config = format!(
        "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\njetstream {{\n  store_dir: \"store\"\n}}\n\
         tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
        server_cert, server_key, ca
    );
    let _node = Node::start("tls", &config).await.unwrap();

    let mut flags = Config::for_tests("s").nats;
    flags.urls = vec![format!("tls://127.0.0.1:{port}")];
    flags.tls_ca = Some(ca.clone());
    flags.tls_cert = Some(client_cert);
    flags.tls_key = Some(client_key);
    let client = Nats::connect(&flags, "tls")
        .await
        .expect("mutual TLS connects");
    let stream = UpdateStream::ensure(&client, &settings("TLS"))
        .await
        .unwrap();
    assert_eq!(stream.publish(&batch("c1", 1)).await.unwrap().sequence, 1);

    // The server requires a client certificate.
    flags.tls_cert = None;
    flags.tls_key = None;
    let error = Nats::connect(&flags, "tls").await.err().expect("refused");
    assert!(matches!(error, JetStreamError::Connect { .. }), "{error}");

    // A CA file that is not there is named with its flag.
    flags.tls_ca = Some(dir.path().join("missing.pem"));
    let error = Nats::connect(&flags, "tls")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("--nats-tls-ca") && error.contains("missing.pem"),
        "{error}"
    );
}

/// A publish that finds no server for the stream's subject (a stream just created, or its
/// leader being elected again) is tried again until the request timeout, then is Unavailable.
#[tokio::test]
async fn a_publish_without_responders_is_tried_again_until_the_request_timeout() {
    let (nats, client, stream) = started("NORESP").await;
    client.context().delete_stream("NORESP").await.unwrap();

    // The stream comes back while the publish is being retried: the publish lands in it.
    let recreate = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            UpdateStream::ensure(&client, &settings("NORESP"))
                .await
                .unwrap()
        })
    };
    let published = stream.publish(&batch("c1", 1)).await.expect("retried");
    assert_eq!(published.sequence, 1);
    recreate.await.unwrap();

    // No stream at all: Unavailable once the request timeout has passed, not at once.
    let mut config = Config::for_tests("s").nats;
    config.urls = nats.client_urls();
    config.request_timeout = Duration::from_millis(500);
    let short = Nats::connect(&config, "short").await.unwrap();
    let stream = UpdateStream::ensure(&short, &settings("GONE"))
        .await
        .unwrap();
    short.context().delete_stream("GONE").await.unwrap();
    let started = Instant::now();
    let error = stream.publish(&batch("c1", 2)).await.unwrap_err();
    assert!(
        matches!(error, JetStreamError::Unavailable { .. }),
        "{error}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}

/// The consumers left on `stream` (the bucket's own stream).
async fn consumers_on(client: &Nats, stream: &str) -> usize {
    let mut stream = client.context().get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.consumer_count
}

/// Listing a bucket's keys or objects made a consumer that the server kept 30 s after, and a
/// stream holds a bounded number: a burst of listings (a dead letter counted per arrival, an
/// operator paging, snapshot jobs at a low `--snapshot-every-records`) ended in NATS refusing
/// every further consumer (error 10026; found by an adversarial run and by measuring). Every
/// listing now leaves none, and lists past one fetch's worth of keys.
#[tokio::test]
async fn listings_leave_no_consumer_behind() {
    let (_nats, client, stream) = started("LIST").await;
    let letters = DeadLetterBucket::open(&stream, 1024).await.unwrap();
    let mut ids: Vec<String> = (0..2_500).map(|n| format!("{n:040x}")).collect();
    for id in &ids {
        letters
            .create(id, b"letter".to_vec())
            .await
            .unwrap()
            .unwrap();
    }
    let gone = ids.remove(7);
    let at = letters.get(&gone).await.unwrap().unwrap().revision;
    letters.remove(&gone, at).await.unwrap();
    for _ in 0..20 {
        assert_eq!(
            letters.ids().await.unwrap(),
            ids,
            "every key but the removed one"
        );
    }
    assert_eq!(consumers_on(&client, "KV_LIST_DEAD_LETTERS").await, 0);

    let snapshots = SnapshotBucket::open(&stream).await.unwrap();
    let chunk = "$O.LIST_SNAPSHOTS.C.unfinished";
    client
        .context()
        .publish(chunk, "part".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for n in 1..=3 {
        snapshots
            .put(n * 10, n, &mut &b"snapshot"[..])
            .await
            .unwrap();
    }
    assert_eq!(snapshots.retire(2).await.unwrap(), 1);
    for _ in 0..20 {
        let listed = snapshots.list().await.unwrap();
        let sequences: Vec<u64> = listed.iter().map(|s| s.stream_sequence).collect();
        assert_eq!(sequences, [2, 3], "the retired one is not listed");
        assert_eq!(snapshots.unfinished_uploads().await.unwrap(), [chunk]);
    }
    assert_eq!(consumers_on(&client, "OBJ_LIST_SNAPSHOTS").await, 0);
}
