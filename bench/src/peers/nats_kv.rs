//! NATS KV as a peer: a JetStream key-value bucket (one value per key, file storage)
//! on one `nats-server` started as the tests start theirs (`nats-harness`: the `nats-server`
//! found, or the pinned PyPI build; `sync_interval: always`, so each acknowledged put is on
//! disk, a wait `fanout`'s `--ephemeral` service skips). A write is `put` on a connection of
//! its own; a watcher is `watch_all` (an ordered consumer delivering new changes),
//! `per_connection` of them on each client connection. A change's id is its revision (the
//! stream sequence `put` returns). Each window has a bucket of its own, the last one's deleted
//! first: a watcher's consumer outlives it on the server until it has been inactive a while,
//! and 1,000 of them per window reached the server's limit of consumers within a few windows.

use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use nats_harness::NatsCluster;

use super::{Peer, Writer, received};
use crate::scenarios::fanout::Subscribers;

/// The started server and the window's bucket.
pub struct NatsKv {
    server: NatsCluster,
    url: String,
    /// The current window's bucket, and how many there were.
    bucket: Mutex<(String, u64)>,
}

impl NatsKv {
    pub async fn start() -> anyhow::Result<NatsKv> {
        let server = NatsCluster::single()
            .await
            .map_err(|error| anyhow::anyhow!("starting nats-server: {error}"))?;
        let url = server.client_urls().join(",");
        let peer = NatsKv {
            server,
            url,
            bucket: Mutex::new((String::new(), 0)),
        };
        peer.renew_bucket().await?;
        Ok(peer)
    }

    /// Deletes the last window's bucket (and with it its consumers), and creates the next.
    pub async fn renew_bucket(&self) -> anyhow::Result<()> {
        let (old, next) = {
            let mut bucket = self.bucket.lock().expect("not poisoned");
            bucket.1 += 1;
            let next = format!("bench_{}", bucket.1);
            (std::mem::replace(&mut bucket.0, next.clone()), next)
        };
        let context = jetstream::new(async_nats::connect(&self.url).await?);
        if !old.is_empty() {
            context
                .delete_key_value(&old)
                .await
                .with_context(|| format!("deleting the NATS KV bucket {old}"))?;
        }
        context
            .create_key_value(kv::Config {
                bucket: next.clone(),
                history: 1,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the NATS KV bucket {next}"))?;
        Ok(())
    }

    /// The window's bucket, on a connection of its own.
    async fn bucket(&self) -> anyhow::Result<kv::Store> {
        let name = self.bucket.lock().expect("not poisoned").0.clone();
        let client = async_nats::connect(&self.url).await?;
        Ok(jetstream::new(client).get_key_value(name).await?)
    }
}

impl Peer for NatsKv {
    type Writer = KvWriter;

    fn pid(&self) -> Option<u32> {
        self.server.nodes().first().and_then(|node| node.pid())
    }

    async fn writer(&self) -> anyhow::Result<KvWriter> {
        Ok(KvWriter(self.bucket().await?))
    }

    async fn open_watchers(
        &self,
        count: usize,
        per_connection: usize,
        subscribers: &mut Subscribers,
    ) -> anyhow::Result<()> {
        let mut store = None;
        for index in 0..count {
            if index % per_connection.max(1) == 0 {
                store = Some(self.bucket().await?);
            }
            let store = store.as_ref().context("a connection")?;
            let mut watch = store
                .watch_all()
                .await
                .with_context(|| format!("opening NATS KV watcher {index}"))?;
            let (mut stopped, delivered) = (subscribers.stopped(), subscribers.counter());
            subscribers.add(tokio::spawn(async move {
                let mut log: Vec<(u64, Instant)> = Vec::new();
                // An error is not the end: the watch's ordered consumer makes itself again
                // from where it was (after heartbeats missed on a loaded box, say). Stopping
                // there lost that watcher's last deliveries and failed CI once. Many in a row
                // are a watch that is gone.
                let mut errors_in_a_row = 0;
                loop {
                    tokio::select! {
                        entry = watch.next() => match entry {
                            Some(Ok(entry)) => {
                                errors_in_a_row = 0;
                                received(&mut log, &delivered, entry.revision);
                            }
                            Some(Err(_)) if errors_in_a_row < 100 => errors_in_a_row += 1,
                            Some(Err(_)) | None => break,
                        },
                        _ = stopped.changed() => break,
                    }
                }
                log
            }));
        }
        Ok(())
    }
}

/// A writer on a connection of its own.
pub struct KvWriter(kv::Store);

impl Writer for KvWriter {
    async fn put(&mut self, key: String, value: Bytes) -> anyhow::Result<u64> {
        Ok(self.0.put(key, value).await?)
    }
}
