//! The stream alone: what the 3-node NATS cluster gives with nothing of the service in the
//! loop, the ceiling of `cluster`'s ingest on the same box.
//!
//! The replicas' own code talks to NATS here (`profile_state::jetstream`: the same connection,
//! stream settings, publish with its `Nats-Msg-Id` and ordered-consumer follower), but there is
//! no HTTP, no signature, no merge, no store: `publishers` tasks, each with its own connection
//! and one publish in flight, publish messages of `per_message` real normalized updates (taken
//! from the workload's signed bodies) to a stream of their own, while one follower per
//! publisher reads every message, as each replica does. Each configuration keeps
//! `publishers * per_message` updates in flight, as many as the closed-loop senders of
//! `cluster` can have at once, split differently into messages; whatever the service does,
//! its webhooks/s cannot pass the best of these, because every webhook waits for its message's
//! acknowledgement.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Parser;
use nats_harness::NatsCluster;
use profile_state::jetstream::{
    Follower, JetStreamError, Nats, StreamSettings, UpdateBatch, UpdateStream,
};
use profile_state::profile::ProfileUpdate;
use tokio_util::sync::CancellationToken;

use crate::process::cpu_time;
use crate::workload::Workload;

/// One configuration's result.
pub struct StreamAlone {
    pub webhooks_per_second: f64,
    pub mean_ack: Duration,
    /// CPU of the three nats-servers together per webhook.
    pub nats_cpu_per_webhook: Duration,
}

/// Measures one configuration on its own stream (`name`), `warmup` then `duration`.
pub async fn measure(
    nats: &NatsCluster,
    workload: &Arc<Workload>,
    name: &str,
    publishers: usize,
    per_message: usize,
    (warmup, duration): (Duration, Duration),
) -> anyhow::Result<StreamAlone> {
    let urls = nats.client_urls().join(",");
    let stop = CancellationToken::new();
    let published = Arc::new(AtomicU64::new(0));
    let ack_micros = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for index in 0..publishers {
        let stream = open_stream(&urls, name, &format!("alone-{index}")).await?;
        let mut follower = Follower::start(&stream, 0)
            .await
            .map_err(|error| anyhow!("{error}"))?;
        let stop_following = stop.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    next = follower.next() => { next.map_err(|error| anyhow!("{error}"))?; }
                    () = stop_following.cancelled() => return anyhow::Ok(()),
                }
            }
        }));
        let (stop, published, ack_micros) = (stop.clone(), published.clone(), ack_micros.clone());
        let workload = Arc::clone(workload);
        let first = (index * 1_000_000) as u64;
        tasks.push(tokio::spawn(async move {
            for round in 0u64.. {
                if stop.is_cancelled() {
                    break;
                }
                let updates = updates(&workload, first + round * per_message as u64, per_message)?;
                let started = Instant::now();
                stream
                    .publish(&UpdateBatch::new(&updates))
                    .await
                    .map_err(|error| anyhow!("{error}"))?;
                ack_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                published.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(warmup).await;
    let pids: Vec<u32> = nats.nodes().iter().filter_map(|node| node.pid()).collect();
    let cpu = || {
        pids.iter()
            .map(|pid| cpu_time(*pid).unwrap_or_default())
            .sum::<Duration>()
    };
    let (cpu_before, messages_before) = (cpu(), published.load(Ordering::Relaxed));
    let acks_before = ack_micros.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let elapsed = started.elapsed();
    let messages = published.load(Ordering::Relaxed) - messages_before;
    let acks = ack_micros.load(Ordering::Relaxed) - acks_before;
    let used = cpu().saturating_sub(cpu_before);
    stop.cancel();
    for task in tasks {
        task.await.context("a stream-alone task panicked")??;
    }
    let webhooks = (messages * per_message as u64).max(1);
    Ok(StreamAlone {
        webhooks_per_second: webhooks as f64 / elapsed.as_secs_f64(),
        mean_ack: Duration::from_micros(acks / messages.max(1)),
        nats_cpu_per_webhook: used / u32::try_from(webhooks).unwrap_or(u32::MAX),
    })
}

/// The stream `name` (created if missing, R3 and the service's default settings) over a new
/// connection to the NATS servers at `urls` (comma-separated), as a replica opens it.
pub async fn open_stream(urls: &str, name: &str, client: &str) -> anyhow::Result<UpdateStream> {
    let args = ["profile-state", "--webhook-secret", "s", "--nats-url", urls];
    let config = profile_state::Config::try_parse_from(args).map_err(|error| anyhow!("{error}"))?;
    let settings = StreamSettings {
        name: name.to_owned(),
        replicas: 3,
        duplicate_window: config.nats.duplicate_window,
        max_bytes: None,
    };
    let nats = Nats::connect(&config.nats, client)
        .await
        .map_err(|error| anyhow!("{error}"))?;
    // Right after a cluster forms, placing an R3 stream can find a server the meta leader has
    // not heard from yet, and creating it can time out on a loaded box: both are Unavailable,
    // asked again as a replica's start-up does (a refusal stopped the smoke test once).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match UpdateStream::ensure(&nats, &settings).await {
            Err(JetStreamError::Unavailable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            opened => return opened.map_err(|error| anyhow!("{error}")),
        }
    }
}

/// `count` normalized updates of the workload's signed bodies, from update `first` on.
fn updates(workload: &Workload, first: u64, count: usize) -> anyhow::Result<Vec<ProfileUpdate>> {
    use profile_state::ingest::payload::{Delivery, Envelope};
    (first..first + count as u64)
        .map(|n| {
            let delivery = workload.update(n % workload.customers);
            let envelope = Envelope::read(&delivery.body).context("a workload body")?;
            match envelope.validate() {
                Ok(Delivery::ProfileUpdated(update)) => Ok(update),
                _ => Err(anyhow!("a workload body is not a profile update")),
            }
        })
        .collect()
}
