//! Other watch systems, measured in the same rounds as `fanout` measures us, by the same code
//! (issue 12 section 2 sets our fan-out targets against etcd's and NATS KV's figures, and
//! asks for the peers beside ours): `count` watchers of every change, `per_connection` on each
//! connection, a few writers at a fixed rate, latency from each write's acknowledgement to
//! each watcher's receipt, on this process's one clock. The peers' servers are started by the
//! tool on free loopback ports, each with its own temporary directory:
//!
//! - `etcd` ([`etcd`]): the `etcd` on `PATH` (Debian's `etcd-server` is 3.4.23), one member; a
//!   write is `KV.Put`, a watcher a `Watch` stream of its own with a prefix watch. The gRPC
//!   messages are declared by hand with prost (no protoc, no etcd crate).
//! - `nats-kv` ([`nats_kv`]): a JetStream key-value bucket on the `nats-server` the tests use
//!   (found, or the pinned PyPI build); a write is `put`, a watcher `watch_all` (async-nats).
//!
//! What this does not do: judge the peers' durability or configuration beyond their defaults
//! (each module says what they are), or start anything the command line did not ask for.

pub mod etcd;
pub mod nats_kv;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;

use crate::baseline::FanoutStats;
use crate::scenarios::Options;
use crate::scenarios::fanout::{Subscribers, Window};
use crate::workload::Rng;

/// Writers sharing the fixed rate, each on its own connection (as `fanout`'s webhook senders).
const WRITERS: usize = 4;

/// The peers the tool can measure (`fanout --peers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerKind {
    /// etcd: prefix watches over gRPC.
    Etcd,
    /// NATS KV: `watch_all` on a JetStream key-value bucket.
    NatsKv,
}

impl PeerKind {
    /// The name in the report's rows.
    pub fn label(self) -> &'static str {
        match self {
            PeerKind::Etcd => "etcd",
            PeerKind::NatsKv => "NATS KV",
        }
    }
}

/// A started peer, alive until dropped.
pub enum Started {
    Etcd(etcd::Etcd),
    NatsKv(nats_kv::NatsKv),
}

impl Started {
    /// Starts `kind`'s server and waits until it answers.
    pub async fn start(kind: PeerKind) -> anyhow::Result<Started> {
        Ok(match kind {
            PeerKind::Etcd => Started::Etcd(etcd::Etcd::start().await?),
            PeerKind::NatsKv => Started::NatsKv(nats_kv::NatsKv::start().await?),
        })
    }

    /// One latency window on this peer; `value` is what each write puts (sized as one of our
    /// change messages).
    pub async fn measure(
        &self,
        options: &Options,
        watchers: Watchers,
        rate: f64,
        value: &Bytes,
    ) -> anyhow::Result<FanoutStats> {
        match self {
            Started::Etcd(peer) => measure(options, peer, watchers, rate, value).await,
            Started::NatsKv(peer) => {
                peer.renew_bucket().await?;
                measure(options, peer, watchers, rate, value).await
            }
        }
    }
}

/// How many watchers, and how many share a connection.
#[derive(Clone, Copy, Debug)]
pub struct Watchers {
    pub count: usize,
    pub per_connection: usize,
    /// Distinct keys written (at random).
    pub keys: u64,
}

/// A watched store, as the latency window uses it.
pub trait Peer: Sync {
    type Writer: Writer;

    /// The server process whose CPU is counted.
    fn pid(&self) -> Option<u32>;

    /// A writer on a connection of its own.
    fn writer(&self) -> impl Future<Output = anyhow::Result<Self::Writer>> + Send;

    /// Opens `count` watchers of every change, `per_connection` on each connection, each one
    /// a task added to `subscribers` that records (change id, receipt time) of every change
    /// and counts it; returns once every watcher is established (it would see the next write).
    fn open_watchers(
        &self,
        count: usize,
        per_connection: usize,
        subscribers: &mut Subscribers,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Writes, one at a time.
pub trait Writer: Send + 'static {
    /// Puts `value` under `key` and waits for the acknowledgement; returns the id of the change
    /// its watchers receive.
    fn put(
        &mut self,
        key: String,
        value: Bytes,
    ) -> impl Future<Output = anyhow::Result<u64>> + Send;
}

/// One latency window: `watchers` open, writes at `rate` from [`WRITERS`] writers for the
/// warm-up and the measured time; each delivery measured from its write's acknowledgement.
async fn measure<P: Peer>(
    options: &Options,
    peer: &P,
    watchers: Watchers,
    rate: f64,
    value: &Bytes,
) -> anyhow::Result<FanoutStats> {
    let mut subscribers = Subscribers::none();
    peer.open_watchers(watchers.count, watchers.per_connection, &mut subscribers)
        .await?;
    let window = Window::start(options, peer.pid(), &subscribers);
    let mut tasks = Vec::with_capacity(WRITERS);
    for index in 0..WRITERS {
        let mut writer = peer.writer().await?;
        let value = value.clone();
        let mut pace = window.pace(index, WRITERS, rate);
        let mut rng = Rng::new(7 + index as u64);
        tasks.push(tokio::spawn(async move {
            // (id, sent, acknowledged) of every write.
            let mut written = Vec::new();
            loop {
                let Some(sent) = pace.next().await else {
                    return anyhow::Ok(written);
                };
                let key = format!("bench.{}", rng.below(watchers.keys));
                let id = writer.put(key, value.clone()).await?;
                written.push((id, sent, Instant::now()));
            }
        }));
    }
    let mut writes = 0u64;
    let mut answered: HashMap<u64, (Instant, Instant)> = HashMap::new();
    for task in tasks {
        for (id, sent, at) in task.await.context("a writer")?? {
            writes += 1;
            if sent >= window.measure_from {
                answered.insert(id, (sent, at));
            }
        }
    }
    let fan = watchers.count as u64;
    Ok(window
        .finish(subscribers, writes * fan, answered, fan)
        .await)
}

/// What a watcher task does with a change it received.
pub(crate) fn received(
    log: &mut Vec<(u64, Instant)>,
    delivered: &Arc<std::sync::atomic::AtomicU64>,
    id: u64,
) {
    log.push((id, Instant::now()));
    delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn options(warmup: Duration, duration: Duration) -> Options {
        Options {
            webhook: None,
            grpc: None,
            server_bin: None,
            server_args: Vec::new(),
            server_env: Vec::new(),
            data_dir: None,
            secret: "s".into(),
            client_id: "bench".into(),
            duration,
            warmup,
            concurrency: 1,
            connections: 1,
            rate: None,
            customers: None,
            rounds: 1,
            no_baseline: false,
        }
    }

    /// A real nats-server (found or installed as the tests' are): every write of the window
    /// reaches every watcher, each measured from its own acknowledgement, and the server's CPU
    /// is counted.
    #[tokio::test]
    async fn every_write_reaches_every_watcher_of_a_real_peer_and_is_measured() {
        let peer = Started::start(PeerKind::NatsKv).await.unwrap();
        let watchers = Watchers {
            count: 5,
            per_connection: 2,
            keys: 3,
        };
        let options = options(Duration::from_millis(200), Duration::from_secs(1));
        let value = Bytes::from_static(&[7; 200]);
        let stats = tokio::time::timeout(
            Duration::from_secs(30),
            peer.measure(&options, watchers, 40.0, &value),
        )
        .await
        .expect("a 1.2 s window ends well within 30 s")
        .unwrap();
        // 40 writes a second for 1 s measured (the warm-up's are not counted).
        assert!((30..=41).contains(&stats.events), "{} writes", stats.events);
        assert_eq!(stats.deliveries, stats.events * 5);
        assert_eq!(stats.missing, 0);
        assert_eq!(stats.latency.len(), stats.deliveries);
        assert!(
            stats
                .cpu_per_delivery
                .is_some_and(|cpu| cpu > Duration::ZERO)
        );
    }

    /// Each watcher receives exactly the ids the writes returned, in order: what pairs a
    /// delivery with its write's acknowledgement.
    #[tokio::test]
    async fn a_real_peers_watchers_receive_the_ids_its_writes_returned() {
        let peer = nats_kv::NatsKv::start().await.unwrap();
        let mut subscribers = Subscribers::none();
        peer.open_watchers(3, 2, &mut subscribers).await.unwrap();
        let mut writer = peer.writer().await.unwrap();
        let mut written = Vec::new();
        for n in 0..6 {
            let value = Bytes::from(vec![n; 10]);
            written.push(writer.put(format!("bench.{}", n % 2), value).await.unwrap());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while subscribers.delivered() < 18 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for received in subscribers.close().await {
            let ids: Vec<u64> = received.iter().map(|(id, _)| *id).collect();
            assert_eq!(ids, written);
        }
    }
}
