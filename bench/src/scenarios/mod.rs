//! The scenarios, and what they share: the options, starting the service and the baselines,
//! loading profiles, and gRPC connections.

pub mod cluster;
pub mod fanout;
pub mod footprint;
pub mod ingest;
pub mod reads;
pub mod scale;
pub mod stream_alone;
mod watch_impact;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use profile_state::pb;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::load::{HttpConnection, Plan};
use crate::process::{self, Server, ServiceSpec};
use crate::report::Report;
use crate::workload::Workload;

/// The options every scenario reads (the command line's global flags).
#[derive(Clone, Debug)]
pub struct Options {
    pub webhook: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub server_bin: Option<PathBuf>,
    pub server_args: Vec<String>,
    pub server_env: Vec<(String, String)>,
    pub data_dir: Option<PathBuf>,
    pub secret: String,
    pub client_id: String,
    pub duration: Duration,
    pub warmup: Duration,
    pub concurrency: usize,
    pub connections: usize,
    pub rate: Option<f64>,
    pub customers: Option<u64>,
    pub rounds: usize,
    pub no_baseline: bool,
}

impl Options {
    /// Whether the service is given by address instead of started by the tool.
    pub fn external(&self) -> bool {
        self.webhook.is_some() || self.grpc.is_some()
    }

    pub fn customers(&self, default: u64) -> u64 {
        self.customers.unwrap_or(default).max(1)
    }

    pub fn spec(&self, data_dir: Option<PathBuf>) -> ServiceSpec {
        ServiceSpec {
            bin: self
                .server_bin
                .clone()
                .unwrap_or_else(process::default_service_bin),
            secret: self.secret.clone(),
            data_dir,
            extra_args: self.server_args.clone(),
            env: self.server_env.clone(),
        }
    }

    /// The service under test: the addresses given, or a fresh `--ephemeral` process.
    pub fn ours(&self) -> anyhow::Result<Server> {
        if self.external() {
            return Ok(Server::external(self.webhook, self.grpc));
        }
        Server::spawn_service("ours", &self.spec(None))
    }

    /// The no-op servers, unless `--no-baseline`.
    pub fn baseline(&self) -> anyhow::Result<Option<Server>> {
        if self.no_baseline {
            return Ok(None);
        }
        Server::spawn_baseline(&self.client_id).map(Some)
    }

    pub fn plan(&self, server: &Server) -> Plan {
        Plan {
            rate: self.rate,
            warmup: self.warmup,
            duration: self.duration,
            server_pid: server.pid(),
        }
    }

    pub fn workload(&self, customers: u64) -> Arc<Workload> {
        Arc::new(Workload::new(&self.client_id, customers, &self.secret))
    }
}

/// `connections` gRPC channels to `addr`, each its own HTTP/2 connection.
pub async fn channels(addr: SocketAddr, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        channels.push(channel(addr).await?);
    }
    Ok(channels)
}

pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to gRPC at {addr}"))
}

pub fn client(channel: &Channel) -> ProfileServiceClient<Channel> {
    ProfileServiceClient::new(channel.clone()).max_decoding_message_size(64 * 1024 * 1024)
}

/// How many profiles the service holds.
pub async fn profile_count(grpc: SocketAddr) -> anyhow::Result<u64> {
    let channel = channel(grpc).await?;
    let info = client(&channel)
        .get_server_info(pb::GetServerInfoRequest {})
        .await?
        .into_inner();
    Ok(info.profile_count)
}

/// Makes sure customers `0..count` exist: skips when the store already holds the last one
/// (a store this tool loaded before), else sends one signed update per customer from
/// `concurrency` keep-alive connections.
pub async fn preload(
    server: &Server,
    workload: &Arc<Workload>,
    count: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let grpc = server.grpc()?;
    let last = Workload::customer_id(count - 1);
    let found = client(&channel(grpc).await?)
        .get_profile(pb::GetProfileRequest {
            client_id: workload.client_id.clone(),
            customer_id: last,
            ..Default::default()
        })
        .await
        .is_ok();
    if found {
        return Ok(());
    }
    load_customers(server.webhook()?, workload, 0..count, concurrency).await?;
    let held = profile_count(grpc).await?;
    if held < count {
        bail!("after loading {count} customers the service holds {held} profiles");
    }
    Ok(())
}

/// Sends one signed update for each customer in `range`, from `concurrency` connections,
/// printing progress; returns how long it took.
pub async fn load_customers(
    webhook: SocketAddr,
    workload: &Arc<Workload>,
    range: std::ops::Range<u64>,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let total = range.end - range.start;
    let next = Arc::new(AtomicU64::new(range.start));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, workload, end) = (Arc::clone(&next), Arc::clone(workload), range.end);
        let mut connection = HttpConnection::open(webhook).await?;
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= end {
                    return anyhow::Ok(());
                }
                let (status, body) = connection.post(workload.update(n)).await?;
                if status != 200 {
                    bail!(
                        "loading customer {n}: HTTP {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
        }));
    }
    let progress = {
        let next = Arc::clone(&next);
        let start = range.start;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let done = next
                    .load(Ordering::Relaxed)
                    .saturating_sub(start)
                    .min(total);
                eprintln!(
                    "loading: {done}/{total} profiles ({:.0}/s)",
                    done as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut result = Ok(());
    for worker in workers {
        if let Err(error) = worker.await.context("a loading worker")? {
            result = Err(error);
        }
    }
    progress.abort();
    result?;
    Ok(started.elapsed())
}

/// Runs the A/B rounds: each round measures every contender once, so a noisy moment hits
/// neighbours alike; in the order given in even rounds and in reverse in odd ones, so that no
/// contender always goes first (right after the previous one's load) or always last (on a box
/// that has warmed up or got busier). Returns, per contender, one result per round.
pub async fn rounds<T, F, Fut>(rounds: usize, contenders: usize, mut measure: F) -> Vec<Vec<T>>
where
    F: FnMut(usize, usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut results: Vec<Vec<T>> = (0..contenders).map(|_| Vec::new()).collect();
    for round in 0..rounds.max(1) {
        for contender in round_order(round, contenders) {
            results[contender].push(measure(round, contender).await);
        }
    }
    results
}

/// The contenders in the order round `round` measures them.
fn round_order(round: usize, contenders: usize) -> Vec<usize> {
    match round % 2 {
        0 => (0..contenders).collect(),
        _ => (0..contenders).rev().collect(),
    }
}

/// Notes the scenario's setup in the report.
pub fn note_setup(report: &mut Report, options: &Options, what: &str) {
    report.note(format!(
        "{what}: {} rounds of {:?} warm-up + {:?} measured, concurrency {}, {}",
        options.rounds,
        options.warmup,
        options.duration,
        options.concurrency,
        match options.rate {
            Some(rate) => format!("open loop at {rate}/s"),
            None => "closed loop".into(),
        }
    ));
}

/// The data directory for a durable service: `--data-dir`, or a fresh temporary one (on the
/// temp dir's disk; a tmpfs would make fsync free) removed when the guard drops.
pub fn data_dir(options: &Options) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    if let Some(dir) = &options.data_dir {
        std::fs::create_dir_all(dir)?;
        return Ok((dir.clone(), None));
    }
    let temp = crate::temp::dir("data")?;
    Ok((temp.path().to_owned(), Some(temp)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rounds_alternate_the_order_and_keep_each_contenders_results_together() {
        let mut order = Vec::new();
        let results = rounds(3, 3, |round, contender| {
            order.push((round, contender));
            async move { round * 10 + contender }
        })
        .await;
        assert_eq!(
            order,
            [
                (0, 0),
                (0, 1),
                (0, 2),
                (1, 2),
                (1, 1),
                (1, 0),
                (2, 0),
                (2, 1),
                (2, 2)
            ]
        );
        assert_eq!(results, [[0, 10, 20], [1, 11, 21], [2, 12, 22]]);
    }
}
