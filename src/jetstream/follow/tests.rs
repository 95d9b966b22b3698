//! What the follower does with each delivered sequence, with messages crafted as a
//! consumer would deliver them (a real server cannot be made to produce a hole or a
//! consumer restarted from the first sequence on demand), against a real stream.

use prost::Message as _;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::replacement::{
    QUICK_CREATES, Replacing, SLOW_REPLACEMENT, create_timeout, read_from_leader,
};
use super::*;
use crate::jetstream::{Nats, StreamSettings};

fn delivered(
    stream: &UpdateStream,
    sequence: u64,
    payload: Vec<u8>,
) -> async_nats::jetstream::Message {
    delivered_by(stream, "test", sequence, payload)
}

fn delivered_by(
    stream: &UpdateStream,
    consumer: &str,
    sequence: u64,
    payload: Vec<u8>,
) -> async_nats::jetstream::Message {
    // `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<nanos>.<pending>`
    let reply = format!(
        "$JS.ACK.{}.{consumer}.1.{sequence}.{sequence}.1764500000000000000.0",
        stream.name()
    );
    async_nats::jetstream::Message {
        message: async_nats::Message {
            subject: stream.subject().into(),
            reply: Some(reply.into()),
            payload: payload.into(),
            headers: None,
            status: None,
            description: None,
            length: 0,
        },
        context: stream.nats().context().clone(),
    }
}

#[test]
fn creates_are_asked_for_again_quickly_then_given_more_time_up_to_the_request_timeout() {
    let ceiling = Duration::from_secs(5);
    let timeouts: Vec<_> = (0..10).map(|n| create_timeout(n, ceiling)).collect();
    let ms = |ms| Duration::from_millis(ms);
    let quick = vec![ms(500); QUICK_CREATES as usize];
    assert_eq!(timeouts[..QUICK_CREATES as usize], quick);
    assert_eq!(
        timeouts[QUICK_CREATES as usize..],
        [ms(1000), ms(2000), ms(4000), ms(5000)]
    );
    assert_eq!(create_timeout(u32::MAX, ceiling), ceiling);
    assert_eq!(create_timeout(0, ms(200)), ms(200));
}

/// A nats-server of its own, a client of it, and an R1 update stream `name` on it.
async fn single_server_stream(name: &str) -> (nats_harness::NatsCluster, Nats, UpdateStream) {
    let nats = nats_harness::NatsCluster::single().await.unwrap();
    let mut config = crate::Config::for_tests("s").nats;
    config.urls = nats.client_urls();
    let client = Nats::connect(&config, "test").await.unwrap();
    let stream = UpdateStream::ensure(&client, &stream_settings(name, 1)).await;
    (nats, client, stream.unwrap())
}

#[tokio::test]
async fn seen_sequences_are_skipped_and_holes_purges_and_garbage_are_errors() {
    let (nats, client, stream) = single_server_stream("ACCEPT").await;
    let batch = UpdateBatch::default();
    // Published without a message id, so the equal payloads are not deduplicated.
    let publish = || async {
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(batch.encode_to_vec().into());
        let ack = client
            .context()
            .send_publish(stream.subject().to_string(), message);
        ack.await.unwrap().await.unwrap();
    };
    for _ in 1..=5 {
        publish().await;
    }
    // A stream that really ends before what was applied is reported once asked again.
    let asked = std::time::Instant::now();
    let behind = check_bounds_settled(&stream, 9, Duration::from_millis(1200)).await;
    assert!(
        matches!(
            behind,
            Err(JetStreamError::AheadOfStream {
                applied: 8,
                last: 5,
                ..
            })
        ),
        "{behind:?}"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(1200),
        "asked again meanwhile"
    );

    let mut follower = Follower::start(&stream, 3).await.unwrap();
    let payload = || batch.encode_to_vec();

    // A consumer restarted from the beginning delivers what was applied: skipped.
    for old in [1, 2, 3] {
        let accepted = follower.accept(delivered(&stream, old, payload())).await;
        assert!(matches!(accepted, Ok(None)), "{old}: {accepted:?}");
    }
    let entry = follower
        .accept(delivered(&stream, 4, payload()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((entry.sequence, follower.next_sequence()), (4, 5));

    let garbage = follower
        .accept(delivered(&stream, 5, vec![0xff, 0xff]))
        .await
        .unwrap_err();
    assert!(
        matches!(garbage, JetStreamError::Malformed { sequence: 5, .. }),
        "{garbage}"
    );
    assert_eq!(
        follower.next_sequence(),
        5,
        "nothing past a malformed message"
    );

    let hole = follower
        .accept(delivered(&stream, 7, payload()))
        .await
        .unwrap_err();
    let expected = JetStreamError::Gap {
        stream: "ACCEPT".into(),
        expected: 5,
        got: 7,
    };
    assert_eq!(hole, expected);

    // A recreated consumer's first message while the stream cannot be asked whether it is
    // still the one followed: not an error; the consumer is rebuilt from the same place.
    nats.nodes()[0].pause().unwrap();
    let unanswered = follower
        .accept(delivered_by(&stream, "recreated", 5, payload()))
        .await;
    nats.nodes()[0].resume().unwrap();
    assert!(matches!(unanswered, Ok(None)), "{unanswered:?}");
    assert!(follower.messages.is_none(), "rebuilt before reading on");
    assert_eq!(follower.next_sequence(), 5);
    let entry = follower
        .accept(delivered_by(&stream, "recreated", 5, payload()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.sequence, 5);

    publish().await;
    stream.purge_below(7).await.unwrap();
    let purged = follower
        .accept(delivered(&stream, 8, payload()))
        .await
        .unwrap_err();
    let expected = JetStreamError::StartBelowFirst {
        stream: "ACCEPT".into(),
        requested: 6,
        first: 7,
    };
    assert_eq!(purged, expected);
}

/// What is read from the stream leader while a consumer is replaced: exactly the sequence
/// asked for, when the stream holds it as an update batch, and nothing else.
#[tokio::test]
async fn a_read_from_the_leader_gives_the_sequence_asked_for_or_nothing() {
    let (_nats, client, stream) = single_server_stream("LEADER").await;
    let publish = |payload| publish_raw(&client, &stream, payload);
    assert_eq!(publish(batch("c1").encode_to_vec()).await, 1);
    assert_eq!(publish(batch("c2").encode_to_vec()).await, 2);
    assert_eq!(publish(vec![0xff, 0xff]).await, 3);

    let entry = read_from_leader(&stream, 2, 3).await.expect("sequence 2");
    assert_eq!((entry.sequence, entry.pending), (2, 1));
    assert_eq!(entry.batch, batch("c2"));
    assert!(read_from_leader(&stream, 3, 3).await.is_none(), "garbage");
    assert!(read_from_leader(&stream, 4, 4).await.is_none(), "not held");
    stream.purge_below(2).await.unwrap();
    assert!(read_from_leader(&stream, 1, 3).await.is_none(), "purged");
    assert!(read_from_leader(&stream, 2, 3).await.is_some());
}

/// While the replacement consumer is not created (here: never), the follower hands out the
/// next sequences, read from the stream leader, in order and up to what the stream is known
/// to hold, however often that is told again meanwhile (as the polls do while it grows).
#[tokio::test]
async fn while_a_consumer_is_replaced_the_next_sequences_come_from_the_stream_leader() {
    let (_nats, client, stream) = single_server_stream("REPLACE").await;
    for customer in ["c1", "c2", "c3"] {
        publish_raw(&client, &stream, batch(customer).encode_to_vec()).await;
    }
    let (mut follower, end) = never_replaced(&stream, 2).await;
    let now = follower.replacing.as_ref().unwrap().since;
    let logs = Logs::default();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    );
    let told = Arc::new(AtomicU64::new(2));
    let telling = {
        let told = Arc::clone(&told);
        tokio::spawn(async move {
            // Told at every turn of the runtime: a read started over at each news of the
            // end would never finish.
            loop {
                end.send_replace(told.load(Ordering::SeqCst));
                tokio::task::yield_now().await;
            }
        })
    };
    let in_time = Duration::from_secs(5);
    for (sequence, customer) in [(1, "c1"), (2, "c2")] {
        let entry = tokio::time::timeout(in_time, follower.next()).await;
        let entry = entry.expect("read in time").unwrap();
        assert_eq!((entry.sequence, entry.batch), (sequence, batch(customer)));
    }
    let waited = tokio::time::timeout(Duration::from_millis(300), follower.next()).await;
    assert!(waited.is_err(), "read past the known end: {waited:?}");
    told.store(3, Ordering::SeqCst);
    let entry = tokio::time::timeout(in_time, follower.next()).await;
    let entry = entry.expect("read in time").unwrap();
    assert_eq!((entry.sequence, entry.batch), (3, batch("c3")));
    assert_eq!(follower.replacing.as_ref().map(|r| r.read), Some(3));
    assert_eq!(
        logs.text(),
        "",
        "warned of a replacement under way for less than 10 s"
    );

    // Under way for longer than SLOW_REPLACEMENT: warned of once, with the latest failure.
    let replacing = follower.replacing.as_mut().unwrap();
    replacing.since = now.checked_sub(SLOW_REPLACEMENT).unwrap();
    *replacing.failure.lock().unwrap() = Some("a create unanswered within 500ms".into());
    for (sequence, customer) in [(4, "c4"), (5, "c5")] {
        publish_raw(&client, &stream, batch(customer).encode_to_vec()).await;
        told.store(sequence, Ordering::SeqCst);
        let entry = tokio::time::timeout(in_time, follower.next()).await;
        assert_eq!(entry.expect("read in time").unwrap().sequence, sequence);
    }
    let text = logs.text();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("WARN")
            && text.contains("could not be replaced")
            && text.contains("a create unanswered within 500ms"),
        "{text}"
    );
    telling.abort();
}

/// A purge that leaves all the replica still needs, made while its replacement consumer was
/// being created and after messages were read from the stream leader past where the
/// replacement began: the consumer is created from where the replica is, not taken for
/// purged past (which stopped the replica).
#[tokio::test]
async fn a_purge_below_what_was_read_meanwhile_does_not_stop_the_replacement() {
    let (_nats, client, stream) = single_server_stream("PURGED").await;
    for customer in ["c1", "c2", "c3", "c4", "c5"] {
        publish_raw(&client, &stream, batch(customer).encode_to_vec()).await;
    }
    let mut follower = Follower::start(&stream, 0).await.unwrap();
    let (_end, known_end) = watch::channel(3);
    follower.follow_end(known_end);
    follower.messages = None;
    // The creation held until told, as while no meta leader answers.
    let (answer, answered) = tokio::sync::oneshot::channel::<()>();
    let mut replacing = Replacing::new(stream.clone(), 1, tokio::time::Instant::now());
    let created = std::mem::replace(&mut replacing.consumer, Box::pin(std::future::pending()));
    replacing.consumer = Box::pin(async move {
        let _ = answered.await;
        created.await
    });
    follower.replacing = Some(replacing);
    let in_time = Duration::from_secs(5);
    for sequence in 1..=3 {
        let entry = tokio::time::timeout(in_time, follower.next()).await;
        assert_eq!(entry.expect("read in time").unwrap().sequence, sequence);
    }
    stream.purge_below(3).await.unwrap();
    answer.send(()).unwrap();
    for (sequence, customer) in [(4, "c4"), (5, "c5")] {
        let entry = tokio::time::timeout(in_time, follower.next()).await;
        let entry = entry.expect("delivered in time").unwrap();
        assert_eq!((entry.sequence, entry.batch), (sequence, batch(customer)));
    }
    assert!(follower.replacing.is_none() && follower.messages.is_some());
}

/// A read from the stream leader whose request the server took and never answered (paused,
/// then killed and started again): once the follower has reconnected, the entry comes
/// within a few seconds, not after the request timeout (30 s here).
#[tokio::test]
async fn a_read_lost_with_its_server_is_sent_again_once_reconnected() {
    let mut nats = nats_harness::NatsCluster::single().await.unwrap();
    let client = patient_client(nats.client_urls()).await;
    let stream = two_batches(&client, "LOST", 1).await;
    let (mut follower, _end) = never_replaced(&stream, 2).await;
    let first = tokio::time::timeout(Duration::from_secs(5), follower.next()).await;
    assert_eq!(first.expect("read in time").unwrap().sequence, 1);

    nats.nodes()[0].pause().unwrap();
    let reading = tokio::spawn(async move { follower.next().await.map(|entry| entry.sequence) });
    // The read of 2 is sent, and taken by the server with the rest of its connection's bytes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.nodes_mut()[0].restart().await.unwrap();
    let restarted = std::time::Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(10), reading).await;
    let second = second.expect("read again within 10 s of the restart");
    assert_eq!(second.unwrap().unwrap(), 2);
    eprintln!("read again {:?} after the restart", restarted.elapsed());
}

/// A read whose request the stream leader took and never answered (paused, then killed),
/// while the follower's own connection, to another server, stays up: the next read goes
/// out after the read's deadline (1 s) and is answered by the leader elected meanwhile,
/// not after the request timeout (30 s here).
#[tokio::test]
async fn a_read_the_stream_leader_took_with_it_is_sent_again_after_its_deadline() {
    let mut nats = nats_harness::NatsCluster::three().await.unwrap();
    let observer = patient_client(nats.client_urls()).await;
    two_batches(&observer, "DEADLINE", 3).await;
    let info = observer.context().get_stream("DEADLINE").await.unwrap();
    let leader = info.cached_info().cluster.clone().and_then(|c| c.leader);
    let leader = leader.expect("a stream leader");
    let elsewhere = nats.nodes().iter().find(|node| node.name() != leader);
    let client = patient_client(vec![elsewhere.unwrap().client_url()]).await;
    let followed = UpdateStream::ensure(&client, &stream_settings("DEADLINE", 3)).await;
    let followed = followed.unwrap();
    let (mut follower, _end) = never_replaced(&followed, 2).await;
    let first = tokio::time::timeout(Duration::from_secs(5), follower.next()).await;
    assert_eq!(first.expect("read in time").unwrap().sequence, 1);

    let at = nats.nodes().iter().position(|node| node.name() == leader);
    let at = at.unwrap();
    nats.nodes()[at].pause().unwrap();
    let reading = tokio::spawn(async move { follower.next().await.map(|entry| entry.sequence) });
    // The read of 2 is sent to the paused leader, then lost with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.nodes_mut()[at].kill();
    let killed = std::time::Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(20), reading).await;
    let second = second.expect("read again within 20 s of the kill");
    assert_eq!(second.unwrap().unwrap(), 2);
    eprintln!(
        "read again {:?} after the leader was killed",
        killed.elapsed()
    );
}

/// What a test's log subscriber wrote.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

/// A follower of `stream` from its start whose consumer is being replaced by one that is
/// never created, told that the stream ends at `known_end` (and later what the sender
/// tells).
async fn never_replaced(stream: &UpdateStream, known_end: u64) -> (Follower, watch::Sender<u64>) {
    let mut follower = Follower::start(stream, 0).await.unwrap();
    let (end, known) = watch::channel(known_end);
    follower.follow_end(known);
    follower.messages = None;
    let mut replacing = Replacing::new(stream.clone(), 1, tokio::time::Instant::now());
    replacing.consumer = Box::pin(std::future::pending());
    follower.replacing = Some(replacing);
    (follower, end)
}

/// A client of the servers at `urls` whose requests wait 30 s for their answers.
async fn patient_client(urls: Vec<String>) -> Nats {
    let mut config = crate::Config::for_tests("s").nats;
    config.urls = urls;
    config.request_timeout = Duration::from_secs(30);
    Nats::connect(&config, "test").await.unwrap()
}

/// An update stream `name` of `replicas`.
fn stream_settings(name: &str, replicas: usize) -> StreamSettings {
    StreamSettings {
        name: name.into(),
        replicas,
        duplicate_window: Duration::from_secs(60),
        max_bytes: None,
    }
}

/// The update stream `name` of `replicas`, created with batches `c1` and `c2` in it.
async fn two_batches(client: &Nats, name: &str, replicas: usize) -> UpdateStream {
    let stream = UpdateStream::ensure(client, &stream_settings(name, replicas)).await;
    let stream = stream.unwrap();
    for customer in ["c1", "c2"] {
        publish_raw(client, &stream, batch(customer).encode_to_vec()).await;
    }
    stream
}

/// Publishes `payload` to `stream`'s subject as it is; its sequence.
async fn publish_raw(client: &Nats, stream: &UpdateStream, payload: Vec<u8>) -> u64 {
    let message = async_nats::jetstream::message::PublishMessage::build().payload(payload.into());
    let ack = client
        .context()
        .send_publish(stream.subject().to_string(), message);
    ack.await.unwrap().await.unwrap().sequence
}

/// A batch of one update, of `customer`.
fn batch(customer: &str) -> UpdateBatch {
    UpdateBatch {
        updates: vec![crate::journal::codec::UpdateRecord {
            customer_id: customer.into(),
            ..Default::default()
        }],
    }
}
