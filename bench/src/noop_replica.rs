//! The no-op replica: only what issue 13's design asks of every replica for a webhook, without
//! the service's merge, store or watch, as the baseline of `cluster`'s ingest. A baseline, not a
//! bound: how it batches decides much of its rate (BENCHMARKS.md, Session 17).
//!
//! Run as a child process of this binary (the hidden `noop-replica` command), one per replica.
//! It takes webhooks over HTTP (axum, as the no-op HTTP baseline), reads and validates each body
//! into a normalized update (`profile_state::ingest::payload`, as the service does before it
//! publishes), publishes the updates that arrive together as one stream message through the
//! service's own `profile_state::jetstream` code, with the publisher's batching (one publish in
//! flight, and the service's default linger: after a batch of several, the next waits up to
//! 5 ms, and at most half the last round trip, for what was queued when the last publish was
//! acknowledged plus as many as it carried), reads every message of the
//! stream back (the ordered consumer each replica follows), and answers 200 once its update's
//! message is acknowledged and read back here (a replica answers once it applied it). It does
//! not check signatures, merge, store, journal, snapshot or tell watchers, and its answer
//! carries no outcome: what a replica adds to this is the service's own cost. `GET /stats`
//! answers how many messages it published and their acknowledgements' total wait, for the
//! tool's breakdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::baseline::answer_when_done;
use anyhow::anyhow;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use profile_state::ingest::payload::{Delivery, Envelope};
use profile_state::jetstream::{Follower, UpdateBatch, UpdateStream};
use profile_state::profile::ProfileUpdate;
use profile_state::replication::{Linger, MAX_BATCH, next_batch};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

/// The longest a batch waits for more (the service's `--nats-publish-linger` default).
const LINGER: Duration = Duration::from_millis(5);

/// An update waiting for its message's acknowledgement.
type Waiting = (ProfileUpdate, oneshot::Sender<bool>);

/// What `GET /stats` answers.
#[derive(Default)]
struct Stats {
    publishes: AtomicU64,
    ack_micros: AtomicU64,
}

/// Serves one no-op replica on 127.0.0.1 port 0 and prints its address as one JSON line
/// (`{"http": ...}`); runs until killed.
pub async fn serve(nats_urls: &str, stream_name: &str, name: &str) -> anyhow::Result<()> {
    let stream = crate::scenarios::stream_alone::open_stream(nats_urls, stream_name, name).await?;
    let follower = Follower::start(&stream, 0)
        .await
        .map_err(|error| anyhow!("{error}"))?;
    // The last sequence read back: a message's callers are answered once it is here.
    let (read, read_back) = watch::channel(0u64);
    let following = tokio::spawn(follow(follower, read));
    let (waiting, inbox) = mpsc::channel::<Waiting>(4 * MAX_BATCH);
    let stats = Arc::new(Stats::default());
    let publishing = tokio::spawn(publish(stream, inbox, read_back, Arc::clone(&stats)));

    let http = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = http.local_addr()?;
    println!("{}", serde_json::json!({ "http": addr }));
    let router = Router::new()
        .route(profile_state::webhook::PATH, post(take))
        .with_state(waiting)
        .route("/stats", get(move || async move { answer_stats(&stats) }));
    let listener = {
        use axum::serve::ListenerExt;
        http.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    };
    tokio::select! {
        served = axum::serve(listener, router).into_future() => served?,
        followed = following => followed??,
        published = publishing => published??,
    }
    Ok(())
}

/// Reads every message of the stream, telling `read` the last sequence read.
async fn follow(mut follower: Follower, read: watch::Sender<u64>) -> anyhow::Result<()> {
    loop {
        let entry = follower.next().await.map_err(|error| anyhow!("{error}"))?;
        read.send_replace(entry.sequence);
    }
}

/// One webhook: validated, published with the others waiting, answered once its message is
/// acknowledged and read back.
async fn take(State(waiting): State<mpsc::Sender<Waiting>>, body: Bytes) -> StatusCode {
    let update = match Envelope::read(&body).map(|envelope| envelope.validate()) {
        Some(Ok(Delivery::ProfileUpdated(update))) => update,
        _ => return StatusCode::BAD_REQUEST,
    };
    answer_when_done(&waiting, update).await
}

fn answer_stats(stats: &Stats) -> String {
    serde_json::json!({
        "publishes": stats.publishes.load(Ordering::Relaxed),
        "ack_micros": stats.ack_micros.load(Ordering::Relaxed),
    })
    .to_string()
}

/// Publishes what is waiting as one message (after the linger), one message in flight, and
/// answers each caller once the message is acknowledged and read back.
async fn publish(
    stream: UpdateStream,
    mut inbox: mpsc::Receiver<Waiting>,
    read_back: watch::Receiver<u64>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // The service's own batching (`profile_state::replication::next_batch` with its linger),
    // so the two cannot drift.
    let mut linger = Linger::new(LINGER);
    loop {
        if next_batch(&mut inbox, &mut batch, &linger).await == 0 {
            break;
        }
        let (updates, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        let started = Instant::now();
        let published = stream.publish(&UpdateBatch::new(&updates)).await;
        let round_trip = started.elapsed();
        linger.published(updates.len(), round_trip);
        stats
            .ack_micros
            .fetch_add(round_trip.as_micros() as u64, Ordering::Relaxed);
        stats.publishes.fetch_add(1, Ordering::Relaxed);
        // The next message may go as soon as this one is acknowledged (the service's publish
        // slot is free then too); its callers wait for the read-back on their own.
        match published {
            Ok(published) => {
                let mut read_back = read_back.clone();
                tokio::spawn(async move {
                    let read = read_back.wait_for(|read| *read >= published.sequence).await;
                    for reply in replies {
                        let _ = reply.send(read.is_ok());
                    }
                });
            }
            Err(error) => {
                eprintln!("noop-replica: publish failed: {error}");
                for reply in replies {
                    let _ = reply.send(false);
                }
            }
        }
    }
    Ok(())
}
