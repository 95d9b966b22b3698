//! `cluster`: replicated mode. The tool starts a 3-node NATS cluster (`nats-harness`, every
//! node with `sync_interval: always`) and N replicas (`--nats-url` all three nodes, the default
//! `--nats-replicas 3`, each its own data directory), plus the single-node durable service as
//! the baseline, all on this machine.
//!
//! - Ingest: the same senders and bodies as `ingest`, spread round-robin over the replicas'
//!   webhook ports, against the single node (journal + fdatasync) in the same rounds. Target:
//!   ratio >= 0.50. CPU per webhook of everything the cluster runs (replicas and nats-server
//!   nodes) next to the single node's; per round, the split by process, the webhooks per
//!   stream message and the mean publish-to-ack time (stderr and the report's notes), all over
//!   the measured window alone.
//! - The no-op replicas (`crate::noop_replica`) in the same rounds, as many as the replicas, on a
//!   stream of their own in the same NATS cluster: HTTP, validation, the publisher's batching,
//!   every message read back before answering, nothing else. What they reach is the
//!   transport's share of the ingest ratio; the replicas' rate against theirs is what the
//!   service's own work costs.
//! - Replication lag at a paced rate (`--rate`, default 1,000 webhooks/s): a WatchProfiles
//!   stream on every replica; for each webhook answered `applied` at one replica, the time from
//!   that answer to the moment the slowest replica's watcher received its revision (external,
//!   so it includes the delivery to watchers). Target: p99 <= 50 ms.
//! - The stream alone (`super::stream_alone`): the same NATS cluster with nothing of the service
//!   in the loop, as many updates in flight as the senders can have, in messages of 21, 10 and
//!   5 (for 64 senders), against the same single-node req/s: the ceiling of the ingest ratio on
//!   this box, and the nats-servers' CPU per webhook at each message size.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hdrhistogram::Histogram;
use nats_harness::NatsCluster;
use profile_state::pb;
use profile_state::pb::watch_profiles_response::Event;
use tokio_stream::StreamExt;

use super::ingest::Sender;
use super::{Options, channel, client, preload, profile_count, rounds};
use crate::load::{self, HttpConnection, Measured, Plan};
use crate::process::{Server, cpu_time};
use crate::report::{Report, Row, Target};
use crate::workload::{Rng, Workload};

/// The stream the replicas share.
const STREAM: &str = "BENCH";

/// The stream of the no-op replicas (`crate::noop_replica`).
const NOOP_STREAM: &str = "BENCH_NOOP";

/// What the cluster is made of.
pub struct Members {
    /// Replicas started.
    pub replicas: usize,
    /// `GOMAXPROCS` of each nats-server (0: not set).
    pub nats_gomaxprocs: u32,
    /// `TOKIO_WORKER_THREADS` of each replica (0: not set).
    pub replica_threads: u32,
}

impl Members {
    /// How the members' threads were set, for the report.
    fn threads(&self) -> String {
        let set = |value: u32, default: &str| match value {
            0 => default.to_owned(),
            n => n.to_string(),
        };
        format!(
            "nats-server GOMAXPROCS {}, replica worker threads {}",
            set(self.nats_gomaxprocs, "default (one per core)"),
            set(self.replica_threads, "default (one per core)")
        )
    }
}

pub async fn run(options: &Options, report: &mut Report, members: &Members) -> anyhow::Result<()> {
    if options.external() {
        bail!("cluster starts its own NATS cluster and replicas: --webhook/--grpc do not apply");
    }
    let nats_env: Vec<(String, String)> = match members.nats_gomaxprocs {
        0 => Vec::new(),
        n => vec![("GOMAXPROCS".to_owned(), n.to_string())],
    };
    let nats = NatsCluster::three_with_env(&nats_env)
        .await
        .map_err(|error| anyhow!("starting the NATS cluster: {error}"))?;
    let urls = nats.client_urls().join(",");
    let mut temps = Vec::new();
    let mut servers = Vec::new();
    let mut noops = Vec::new();
    for index in 0..members.replicas.max(1) {
        let temp = crate::temp::dir("replica")?;
        let mut spec = options.spec(Some(temp.path().to_owned()));
        if members.replica_threads > 0 {
            let threads = members.replica_threads.to_string();
            spec.env.push(("TOKIO_WORKER_THREADS".to_owned(), threads));
        }
        let name = format!("r{index}");
        spec.extra_args.extend(
            [
                "--nats-url",
                &urls,
                "--nats-stream",
                STREAM,
                "--replica-name",
                &name,
            ]
            .map(String::from),
        );
        servers.push(Server::spawn_service(&format!("replica-{name}"), &spec)?);
        temps.push(temp);
        let noop = format!("noop-replica-{name}");
        noops.push(Server::spawn_noop_replica(&noop, &urls, NOOP_STREAM)?);
    }
    let (single_dir, _single_temp) = super::data_dir(options)?;
    let single = Server::spawn_service("single-durable", &options.spec(Some(single_dir)))?;

    let customers = options.customers(10_000);
    let workload = options.workload(customers);
    preload(&servers[0], &workload, customers, options.concurrency).await?;
    for server in &servers {
        wait_for_profiles(server, customers).await?;
    }
    preload(&single, &workload, customers, options.concurrency).await?;
    super::note_setup(report, options, "cluster");
    report.note(format!(
        "cluster: {} replicas over a 3-node NATS cluster (nats-harness: nats-server {}, \
         sync_interval always, stream R3), {customers} customers, bodies of {} bytes; {}",
        servers.len(),
        nats_harness::binary::PINNED_VERSION,
        workload.update(0).body.len(),
        members.threads()
    ));
    let nats_pids: Vec<(String, u32)> = nats
        .nodes()
        .iter()
        .enumerate()
        .filter_map(|(index, node)| Some((format!("nats-{index}"), node.pid()?)))
        .collect();
    let with_nats = |members: &[Server]| -> Vec<(String, u32)> {
        members
            .iter()
            .filter_map(|server| Some((server.name.clone(), server.pid()?)))
            .chain(nats_pids.iter().cloned())
            .collect()
    };
    let (cluster_pids, noop_pids) = (with_nats(&servers), with_nats(&noops));
    let breakdowns = Mutex::new(Vec::new());

    let results = rounds(options.rounds, 3, |_, index| {
        let (servers, single, workload, noops) = (&servers, &single, &workload, &noops);
        let (cluster_pids, breakdowns, noop_pids) = (&cluster_pids, &breakdowns, &noop_pids);
        async move {
            let measured = if index == 0 {
                super::ingest::measure(options, single, workload).await
            } else {
                let (members, pids, messages, name) = match index {
                    1 => (servers, cluster_pids, Messages::Metrics(servers), "cluster"),
                    _ => (
                        noops,
                        noop_pids,
                        Messages::NoopStats(noops),
                        "no-op replicas",
                    ),
                };
                let (mut measured, used) = ingest(options, members, workload, pids, messages)
                    .await
                    .with_context(|| format!("ingest into the {name}"))?;
                measured.server_cpu = Some(used.cpu.iter().map(|(_, cpu)| *cpu).sum());
                let line = used.describe(measured.ops);
                eprintln!("{name} breakdown: {line}");
                breakdowns
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(format!("{name}: {line}"));
                Ok(measured)
            };
            if let Ok(measured) = &measured {
                eprintln!(
                    "cluster ingest {}: {:>8.0} req/s, p99 {} µs",
                    ["single ", "cluster", "no-op replicas"][index],
                    measured.per_second(),
                    measured.latency.value_at_quantile(0.99)
                );
            }
            measured
        }
    })
    .await;
    let mut results = results
        .into_iter()
        .map(|rounds| rounds.into_iter().collect::<anyhow::Result<Vec<_>>>())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let noop = results.pop().unwrap_or_default();
    let cluster = results.pop().unwrap_or_default();
    let baseline = results.pop().unwrap_or_default();
    let values = |rounds: &[Measured], f: &dyn Fn(&Measured) -> f64| -> Vec<f64> {
        rounds.iter().map(f).collect()
    };
    let rate = |m: &Measured| m.per_second();
    report.push(
        Row::new(
            "cluster",
            &format!(
                "ingest req/s through {} replicas (R3, sync always)",
                servers.len()
            ),
            "req/s",
        )
        .ours(values(&cluster, &rate))
        .baseline("single node durable", values(&baseline, &rate))
        .target(Target::RatioAtLeast { value: 0.50 }),
    );
    report.push(
        Row::new(
            "cluster",
            &format!(
                "ingest req/s through {} no-op replicas (HTTP, validate, publish, follow)",
                noops.len()
            ),
            "req/s",
        )
        .ours(values(&noop, &rate))
        .baseline("single node durable", values(&baseline, &rate)),
    );
    report.push(
        Row::new(
            "cluster",
            "ingest req/s, replicas vs no-op replicas",
            "req/s",
        )
        .ours(values(&cluster, &rate))
        .baseline("no-op replicas", values(&noop, &rate)),
    );
    for (label, quantile) in [("p50", 0.5), ("p99", 0.99)] {
        let latency = move |m: &Measured| m.latency.value_at_quantile(quantile) as f64 / 1000.0;
        report.push(
            Row::new("cluster", &format!("ingest latency {label}"), "ms")
                .ours(values(&cluster, &latency))
                .baseline("single node durable", values(&baseline, &latency)),
        );
    }
    for (round, line) in breakdowns
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .into_iter()
        .enumerate()
    {
        // Two lines a round, each naming its side (the order alternates between rounds).
        report.note(format!("cluster round {}, {line}", round / 2));
    }
    let cpu = |m: &Measured| m.server_cpu_us_per_op().unwrap_or(f64::NAN);
    report.push(
        Row::new(
            "cluster",
            "CPU per webhook: replicas + nats-servers vs single node",
            "µs",
        )
        .ours(values(&cluster, &cpu))
        .baseline("single node durable", values(&baseline, &cpu)),
    );
    report.push(
        Row::new(
            "cluster",
            "CPU per webhook: no-op replicas + nats-servers vs replicas + nats-servers",
            "µs",
        )
        .ours(values(&noop, &cpu))
        .baseline("replicas", values(&cluster, &cpu)),
    );

    let paced = options.rate.unwrap_or(1000.0);
    let mut lags = Vec::new();
    for round in 0..options.rounds.max(1) {
        let lag = replication_lag(options, &servers, &workload, paced).await?;
        eprintln!(
            "cluster lag round {round}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} webhooks",
            lag.value_at_quantile(0.5) as f64 / 1000.0,
            lag.value_at_quantile(0.99) as f64 / 1000.0,
            lag.max() as f64 / 1000.0,
            lag.len()
        );
        lags.push(lag);
    }
    for (label, quantile, target) in [("p50", 0.5, None), ("p99", 0.99, Some(50.0))] {
        let mut row = Row::new(
            "cluster",
            &format!("replication lag {label} at {paced}/s (answer → slowest replica's watcher)"),
            "ms",
        )
        .ours(
            lags.iter()
                .map(|lag| lag.value_at_quantile(quantile) as f64 / 1000.0)
                .collect(),
        );
        if let Some(value) = target {
            row = row.target(Target::AtMost { value });
        }
        report.push(row);
    }
    let single = values(&baseline, &rate);
    stream_alone(options, report, &nats, &workload, &single).await
}

/// The ceiling: the stream alone with as many updates in flight as the senders can have,
/// split into messages three ways, against the single node's req/s of the ingest rounds.
async fn stream_alone(
    options: &Options,
    report: &mut Report,
    nats: &NatsCluster,
    workload: &Arc<Workload>,
    single: &[f64],
) -> anyhow::Result<()> {
    let in_flight = options.concurrency.max(3);
    for publishers in [3, 6, 12].into_iter().filter(|&p| p <= in_flight) {
        let per_message = in_flight / publishers;
        let mut rounds = Vec::new();
        for round in 0..options.rounds.max(1) {
            let name = format!("ALONE_{round}_{publishers}X{per_message}");
            let window = (options.warmup, options.duration);
            let alone = super::stream_alone::measure(
                nats,
                workload,
                &name,
                publishers,
                per_message,
                window,
            )
            .await?;
            eprintln!(
                "cluster stream alone, {publishers} publishers x {per_message} per message: \
                 {:.0} webhooks/s, mean ack {:.2} ms, nats-servers {:.0} µs CPU per webhook",
                alone.webhooks_per_second,
                alone.mean_ack.as_secs_f64() * 1e3,
                alone.nats_cpu_per_webhook.as_secs_f64() * 1e6
            );
            rounds.push(alone);
        }
        let label = format!("{publishers} publishers x {per_message} updates per message");
        report.push(
            Row::new(
                "cluster",
                &format!("stream alone, {label}: webhooks/s"),
                "req/s",
            )
            .ours(
                rounds
                    .iter()
                    .map(|alone| alone.webhooks_per_second)
                    .collect(),
            )
            .baseline("single node durable", single.to_vec()),
        );
        report.push(
            Row::new(
                "cluster",
                &format!("stream alone, {label}: nats-servers CPU per webhook"),
                "µs",
            )
            .ours(
                rounds
                    .iter()
                    .map(|alone| alone.nats_cpu_per_webhook.as_secs_f64() * 1e6)
                    .collect(),
            ),
        );
        report.push(
            Row::new(
                "cluster",
                &format!("stream alone, {label}: mean publish ack"),
                "ms",
            )
            .ours(
                rounds
                    .iter()
                    .map(|alone| alone.mean_ack.as_secs_f64() * 1e3)
                    .collect(),
            ),
        );
    }
    Ok(())
}

/// Waits until `server` holds `count` profiles (a replica applying the preload).
async fn wait_for_profiles(server: &Server, count: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while profile_count(server.grpc()?).await? < count {
        if Instant::now() > deadline {
            bail!("{} did not apply the preload", server.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Where the cluster's work goes over one window: CPU per process (replicas and nats-server
/// nodes) and the replicas' stream publishes, from their `/metrics`.
struct Breakdown {
    cpu: Vec<(String, Duration)>,
    publishes: f64,
    publish_seconds: f64,
}

/// Where a window's stream messages are counted: the replicas' publish metrics, or the no-op
/// replicas' `GET /stats`.
#[derive(Clone, Copy)]
enum Messages<'a> {
    Metrics(&'a [Server]),
    NoopStats(&'a [Server]),
}

impl Breakdown {
    async fn read(pids: &[(String, u32)], messages: Messages<'_>) -> anyhow::Result<Breakdown> {
        let cpu = pids
            .iter()
            .map(|(name, pid)| (name.clone(), cpu_time(*pid).unwrap_or_default()))
            .collect();
        let (mut publishes, mut publish_seconds) = (0.0, 0.0);
        match messages {
            Messages::Metrics(servers) => {
                for server in servers {
                    let text = metrics(server).await?;
                    let count = "profile_state_replication_publish_duration_seconds_count";
                    publishes += sum(&text, count);
                    let seconds = "profile_state_replication_publish_duration_seconds_sum";
                    publish_seconds += sum(&text, seconds);
                }
            }
            Messages::NoopStats(noops) => {
                for noop in noops {
                    let (status, body) = HttpConnection::open(noop.webhook()?)
                        .await?
                        .get("/stats")
                        .await?;
                    if status != 200 {
                        bail!("{}: GET /stats: HTTP {status}", noop.name);
                    }
                    let stats: serde_json::Value = serde_json::from_slice(&body)?;
                    let count = |key: &str| stats[key].as_u64().unwrap_or_default() as f64;
                    publishes += count("publishes");
                    publish_seconds += count("ack_micros") / 1e6;
                }
            }
        }
        Ok(Breakdown {
            cpu,
            publishes,
            publish_seconds,
        })
    }

    fn since(&self, before: &Breakdown) -> Breakdown {
        Breakdown {
            cpu: self
                .cpu
                .iter()
                .zip(&before.cpu)
                .map(|((name, now), (_, then))| (name.clone(), now.saturating_sub(*then)))
                .collect(),
            publishes: self.publishes - before.publishes,
            publish_seconds: self.publish_seconds - before.publish_seconds,
        }
    }

    /// One line: µs of CPU per webhook of each process, webhooks per stream message and the
    /// mean publish-to-acknowledgement time.
    fn describe(&self, webhooks: u64) -> String {
        let per_webhook = |cpu: &Duration| cpu.as_secs_f64() * 1e6 / webhooks.max(1) as f64;
        let processes: Vec<String> = self
            .cpu
            .iter()
            .map(|(name, cpu)| format!("{name} {:.0}", per_webhook(cpu)))
            .collect();
        format!(
            "CPU µs per webhook: {}; {webhooks} webhooks in {:.0} stream messages ({:.1} per \
             message), mean publish ack {:.2} ms",
            processes.join(", "),
            self.publishes,
            webhooks as f64 / self.publishes.max(1.0),
            self.publish_seconds * 1e3 / self.publishes.max(1.0)
        )
    }
}

/// A replica's `/metrics` text.
async fn metrics(server: &Server) -> anyhow::Result<String> {
    let admin = server
        .admin
        .with_context(|| format!("{}: admin address unknown", server.name))?;
    let (status, body) = HttpConnection::open(admin).await?.get("/metrics").await?;
    if status != 200 {
        bail!("{}: GET /metrics: HTTP {status}", server.name);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The sum of every series of one metric in a `/metrics` text.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One measured ingest window, senders spread round-robin over the replicas.
async fn ingest(
    options: &Options,
    members: &[Server],
    workload: &Arc<Workload>,
    pids: &[(String, u32)],
    messages: Messages<'_>,
) -> anyhow::Result<(Measured, Breakdown)> {
    let mut senders = Vec::with_capacity(options.concurrency);
    for seed in 0..options.concurrency {
        let addr = members[seed % members.len()].webhook()?;
        senders.push(Sender::open(addr, workload, seed as u64 + 1).await?);
    }
    let plan = Plan {
        rate: None,
        warmup: options.warmup,
        duration: options.duration,
        server_pid: None,
    };
    // The figures of the measured window alone, as `load::run` counts its webhooks (the
    // warm-up's work in them would be divided by the window's webhooks).
    let started = tokio::time::Instant::now();
    let window = async {
        tokio::time::sleep_until(started + options.warmup).await;
        let before = Breakdown::read(pids, messages).await?;
        tokio::time::sleep_until(started + options.warmup + options.duration).await;
        anyhow::Ok(Breakdown::read(pids, messages).await?.since(&before))
    };
    let (measured, used) = tokio::join!(load::run(&plan, senders), window);
    measured.check("ingest")?;
    Ok((measured, used?))
}

/// When each revision reached how many replicas' watchers, and the latest arrival.
type Arrivals = Arc<Mutex<HashMap<u64, (usize, Instant)>>>;

/// One paced window at `rate` webhooks/s: the lag from each `applied` answer to its revision's
/// arrival at the slowest replica's watcher, in µs.
async fn replication_lag(
    options: &Options,
    servers: &[Server],
    workload: &Arc<Workload>,
    rate: f64,
) -> anyhow::Result<Histogram<u64>> {
    let arrivals: Arrivals = Arc::default();
    let mut watchers = Vec::new();
    for server in servers {
        let mut stream = client(&channel(server.grpc()?).await?)
            .watch_profiles(pb::WatchProfilesRequest::default())
            .await?
            .into_inner();
        match stream.next().await {
            Some(Ok(pb::WatchProfilesResponse {
                event: Some(Event::Synced(_)),
            })) => {}
            other => bail!("{}: expected Synced, got {other:?}", server.name),
        }
        let arrivals = Arc::clone(&arrivals);
        watchers.push(tokio::spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                if let Some(Event::Change(change)) = event.event {
                    let now = Instant::now();
                    let mut arrivals = arrivals.lock().expect("not poisoned");
                    let entry = arrivals.entry(change.revision).or_insert((0, now));
                    *entry = (entry.0 + 1, now);
                }
            }
        }));
    }
    let senders = options.concurrency.clamp(1, 64);
    let interval = Duration::from_secs_f64(senders as f64 / rate);
    let window = options.warmup + options.duration;
    let answered: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let mut tasks = Vec::new();
    for index in 0..senders {
        let addr = servers[index % servers.len()].webhook()?;
        let (workload, answered) = (Arc::clone(workload), Arc::clone(&answered));
        tasks.push(tokio::spawn(paced_sender(
            addr, workload, answered, interval, window, index,
        )));
    }
    for task in tasks {
        task.await.context("a paced sender")??;
    }
    // Until the last changes reached every watcher (5 s at most; what is still missing then
    // is reported as missing).
    let answered_revisions: Vec<u64> = answered
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|(revision, _)| *revision)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let all_arrived = {
            let arrivals = arrivals.lock().expect("not poisoned");
            answered_revisions.iter().all(|revision| {
                arrivals
                    .get(revision)
                    .is_some_and(|(count, _)| *count == servers.len())
            })
        };
        if all_arrived {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for watcher in watchers {
        watcher.abort();
    }
    let arrivals = arrivals.lock().expect("not poisoned");
    let mut lag = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut missing = 0;
    for (revision, answered_at) in answered.lock().expect("not poisoned").iter() {
        match arrivals.get(revision) {
            Some((count, last)) if *count == servers.len() => {
                let micros = last.saturating_duration_since(*answered_at).as_micros() as u64;
                lag.record(micros.max(1))?;
            }
            _ => missing += 1,
        }
    }
    if missing > 0 {
        bail!("{missing} applied revisions never reached every replica's watcher");
    }
    Ok(lag)
}

/// Posts one update every `interval` for `window` on one connection; records the revision and
/// answer time of each `applied` answer.
async fn paced_sender(
    addr: SocketAddr,
    workload: Arc<Workload>,
    answered: Arc<Mutex<Vec<(u64, Instant)>>>,
    interval: Duration,
    window: Duration,
    seed: usize,
) -> anyhow::Result<()> {
    let mut connection = HttpConnection::open(addr).await?;
    let mut rng = Rng::new(seed as u64 + 1000);
    let mut ticks = tokio::time::interval(interval);
    let end = Instant::now() + window;
    while Instant::now() < end {
        ticks.tick().await;
        let (status, body) = connection
            .post(workload.update(rng.below(workload.customers)))
            .await?;
        let at = Instant::now();
        if status != 200 {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        let answer: serde_json::Value = serde_json::from_slice(&body)?;
        if answer["outcome"] == "applied" {
            let revision = answer["revision"]
                .as_u64()
                .context("an applied answer's revision")?;
            answered.lock().expect("not poisoned").push((revision, at));
        }
    }
    Ok(())
}
