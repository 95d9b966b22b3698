//! `profile-state-bench`: a load tool for profile-state that measures every figure against a
//! no-op baseline in the same invocation, rounds interleaved (baseline, ours, baseline, ours),
//! and reports medians and ratios.
//!
//! Scenarios: `ingest` (signed webhooks, HTTP/1.1 keep-alive), `get`, `batch-get`, `list`
//! (unary gRPC over HTTP/2), `fanout` (WatchProfiles latency and its cost to ingest), `scale`
//! (idle watch streams: RSS per stream, and the latency of busy ones beside them), `memory`
//! (RSS per profile), `recovery` (start-up time on a full data dir) and `cluster` (replicas
//! over a 3-node NATS cluster vs the single node). By default the tool
//! starts the service itself (`--server-bin`, the `profile-state` next to this binary) on
//! 127.0.0.1 port 0; `--webhook`/`--grpc` point it at a running deployment instead. The
//! baselines run in a child process of this binary (the hidden `baseline` command).
//!
//! Modules: [`workload`] (ids, signed bodies, the profile they become), [`load`] (the load loop
//! and the HTTP client), [`process`] (child processes and /proc), [`baseline`] (the no-op
//! servers and the broadcast baseline), [`noop_durable`] and [`noop_replica`] (the durable
//! and the cluster baselines), [`scenarios`], [`report`] (table and JSON), [`temp`] (temporary
//! directories, and those killed runs left).

mod baseline;
mod load;
mod noop_durable;
mod noop_replica;
mod noop_watch;
mod one_task;
mod peers;
mod process;
mod report;
mod scenarios;
mod temp;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use peers::PeerKind;
use report::{Machine, Report};
use scenarios::Options;
use scenarios::fanout::Filter;
use scenarios::reads::Read;

#[derive(Parser)]
#[command(name = "profile-state-bench", version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args)]
struct Global {
    /// Webhook address of a running service (host:port); with --grpc, the tool starts nothing.
    #[arg(long, global = true)]
    webhook: Option<SocketAddr>,
    /// gRPC address of a running service (host:port).
    #[arg(long, global = true)]
    grpc: Option<SocketAddr>,
    /// The service binary to start [default: `profile-state` next to this binary].
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// One more argument for the started service (repeat it), e.g. --server-arg=--history-events=1000.
    #[arg(long = "server-arg", global = true, allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// An environment variable for the started service, KEY=VALUE (repeat it), e.g. LD_PRELOAD.
    #[arg(long = "server-env", global = true)]
    server_env: Vec<String>,
    /// Data directory for the durable service (ingest, recovery) [default: a temporary one].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Webhook secret: given to the started service, used to sign every body.
    #[arg(long, global = true, default_value = "bench-secret")]
    secret: String,
    /// Gameball account (client_id) of every profile.
    #[arg(long, global = true, default_value = "bench")]
    client_id: String,
    /// Measured time per round and contender.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time before each measured window.
    #[arg(long, global = true, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Requests in flight: webhook senders (one connection each) or concurrent gRPC calls.
    #[arg(long, global = true, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the gRPC calls are spread over.
    #[arg(long, global = true, default_value_t = 4)]
    connections: usize,
    /// Requests per second in all (open loop); unset = closed loop. fanout: webhooks/s [100].
    #[arg(long, global = true)]
    rate: Option<f64>,
    /// Distinct customers (profiles) addressed and preloaded [scenario's default].
    #[arg(long, global = true)]
    customers: Option<u64>,
    /// A/B rounds; each measures every contender once, and the table shows medians.
    #[arg(long, global = true, default_value_t = 3)]
    rounds: usize,
    /// Skip the baselines (ours only).
    #[arg(long, global = true)]
    no_baseline: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Scenario {
    /// Signed webhooks: ephemeral vs no-op HTTP, durable vs ephemeral [100k customers].
    Ingest,
    /// GetProfile vs the no-op gRPC server [100k customers].
    Get,
    /// BatchGetProfiles vs the no-op gRPC server [100k customers].
    BatchGet {
        /// Ids per call.
        #[arg(long, default_value_t = 100)]
        ids: usize,
    },
    /// ListProfiles pages vs BatchGetProfiles of as many ids, both ours [1M customers].
    List {
        #[arg(long, default_value_t = 100)]
        page_size: i32,
        /// Ids per BatchGetProfiles call compared with.
        #[arg(long, default_value_t = 100)]
        ids: usize,
    },
    /// Watch latency from webhook answer to receipt, and ingest with subscribers vs without.
    Fanout {
        /// Subscriber counts, each its own connection (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        subscribers: Vec<usize>,
        /// Subscriber streams sharing one HTTP/2 connection (1 = a connection each).
        #[arg(long, default_value_t = 1)]
        streams_per_connection: usize,
        /// What each subscriber watches in the latency part.
        #[arg(long, value_enum, default_value = "all")]
        filter: Filter,
        /// What each subscriber watches in the ingest-impact part.
        #[arg(long, value_enum, default_value = "customer")]
        impact_filter: Filter,
        /// Other watch systems to measure in the same rounds, the same way (comma-separated):
        /// etcd (the `etcd` on PATH or ETCD_BIN), nats-kv (nats-server as the tests find it).
        #[arg(long, value_enum, value_delimiter = ',')]
        peers: Vec<PeerKind>,
        /// Run the started service durable (`--data-dir`, or a temporary one on the temp
        /// dir's disk): it syncs each batch before answering, as the peers sync each write,
        /// so the rows from the write's send compare like with like. Default: `--ephemeral`.
        #[arg(long)]
        durable: bool,
    },
    /// Many idle customer-filtered watch streams beside a few unfiltered ones: service RSS per
    /// idle stream, and the unfiltered ones' delivery latency at --rate [100/s].
    Scale {
        /// Idle customer-filtered streams (each on a customer no webhook names).
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
        /// Unfiltered streams, one connection each, whose latency is measured.
        #[arg(long, default_value_t = 100)]
        active: usize,
        /// Idle streams sharing one HTTP/2 connection.
        #[arg(long, default_value_t = 100)]
        streams_per_connection: usize,
    },
    /// Replicas over NATS: ingest through N replicas vs the single node durable, and the
    /// replication lag at a paced --rate [1000/s]; starts 3 nats-server nodes [10k customers].
    Cluster {
        /// Replicas started over the NATS cluster.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// GOMAXPROCS of each nats-server started (0: Go's default, one per core). Six
        /// processes share this box; a server on a machine of its own would have its cores.
        #[arg(long, default_value_t = 0)]
        nats_gomaxprocs: u32,
        /// Tokio worker threads of each replica started (0: tokio's default, one per core);
        /// the single node keeps the default.
        #[arg(long, default_value_t = 0)]
        replica_threads: u32,
    },
    /// RSS growth per profile of an --ephemeral service loaded with N profiles [1M].
    Memory,
    /// Start-up time on a data dir holding N profiles [1M].
    Recovery,
    /// Serve the no-op baselines (used by the tool itself).
    #[command(hide = true)]
    Baseline,
    /// Serve the no-op durable server (used by the tool itself, `ingest`).
    #[command(hide = true)]
    NoopDurable {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve one no-op replica (used by the tool itself, `cluster`).
    #[command(hide = true)]
    NoopReplica {
        #[arg(long)]
        nats_url: String,
        #[arg(long)]
        stream: String,
        #[arg(long)]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A no-op replica on one thread, as the service takes webhooks on one (measured: 5-15% more
    // webhooks/s than on the multi-thread runtime); everything else on tokio's default.
    let runtime = match cli.scenario {
        Scenario::NoopReplica { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    }
    .expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("profile-state-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = cli.global;
    // A measuring run, not one of its baselines' processes (this binary's children).
    let baseline = matches!(
        cli.scenario,
        Scenario::Baseline | Scenario::NoopReplica { .. } | Scenario::NoopDurable { .. }
    );
    if !baseline {
        temp::sweep();
    }
    match &cli.scenario {
        Scenario::Baseline => return baseline::serve(&global.client_id).await,
        Scenario::NoopReplica {
            nats_url,
            stream,
            name,
        } => return noop_replica::serve(nats_url, stream, name).await,
        Scenario::NoopDurable { dir } => return noop_durable::serve(dir).await,
        _ => {}
    }
    let server_env = global
        .server_env
        .iter()
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--server-env {pair:?} is not KEY=VALUE"))?;
            Ok((key.to_owned(), value.to_owned()))
        })
        .collect::<anyhow::Result<_>>()?;
    let options = Options {
        webhook: global.webhook,
        grpc: global.grpc,
        server_bin: global.server_bin,
        server_args: global.server_args,
        server_env,
        data_dir: global.data_dir,
        secret: global.secret,
        client_id: global.client_id,
        duration: global.duration,
        warmup: global.warmup,
        concurrency: global.concurrency.max(1),
        connections: global.connections.max(1),
        rate: global.rate,
        customers: global.customers,
        rounds: global.rounds.max(1),
        no_baseline: global.no_baseline,
    };
    let mut report = Report {
        command: std::env::args().collect(),
        machine: Machine::here(),
        ..Report::default()
    };
    // The box is shared: record how busy it was, so a reader can judge the spread.
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let load_before = load();
    match cli.scenario {
        Scenario::Ingest => scenarios::ingest::run(&options, &mut report).await?,
        Scenario::Get => scenarios::reads::run(&options, &mut report, Read::Get).await?,
        Scenario::BatchGet { ids } => {
            scenarios::reads::run(&options, &mut report, Read::BatchGet { ids }).await?
        }
        Scenario::List { page_size, ids } => {
            scenarios::reads::run_list(&options, &mut report, page_size, ids).await?
        }
        Scenario::Fanout {
            subscribers,
            streams_per_connection,
            filter,
            impact_filter,
            peers,
            durable,
        } => {
            let shape = scenarios::fanout::Shape {
                counts: subscribers,
                per_connection: streams_per_connection,
                filter,
                impact_filter,
                peers,
                durable,
            };
            scenarios::fanout::run(&options, &mut report, &shape).await?
        }
        Scenario::Scale {
            idle,
            active,
            streams_per_connection,
        } => {
            let watchers = scenarios::scale::Watchers {
                idle,
                active,
                per_connection: streams_per_connection,
            };
            scenarios::scale::run(&options, &mut report, watchers).await?
        }
        Scenario::Cluster {
            replicas,
            nats_gomaxprocs,
            replica_threads,
        } => {
            let members = scenarios::cluster::Members {
                replicas,
                nats_gomaxprocs,
                replica_threads,
            };
            scenarios::cluster::run(&options, &mut report, &members).await?
        }
        Scenario::Memory => scenarios::footprint::memory(&options, &mut report).await?,
        Scenario::Recovery => scenarios::footprint::recovery(&options, &mut report).await?,
        Scenario::Baseline | Scenario::NoopReplica { .. } | Scenario::NoopDurable { .. } => {
            unreachable!("handled above")
        }
    }
    report.note(format!(
        "load average (1, 5, 15 min) before: {load_before}; after: {}",
        load()
    ));
    print!("{}", report.table());
    if let Some(path) = &global.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
