//! `ingest`: signed webhooks over HTTP/1.1 keep-alive, one connection per sender, each a real
//! change (newer `created_at`, new points) of a random customer. Compared with the no-op HTTP
//! server, and, when the tool starts the service, durable (journal + fdatasync) with
//! `--ephemeral`, beside the no-op durable server (`crate::noop_durable`) against the no-op
//! HTTP server: what the disk takes from a plain durable server with the same senders.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};

use super::{Options, note_setup, preload, rounds};
use crate::load::{self, HttpConnection, Measured, Op};
use crate::process::Server;
use crate::report::{Report, Row, Target};
use crate::workload::{Rng, Workload};

/// One sender: a keep-alive connection posting signed updates of random customers.
pub struct Sender {
    connection: HttpConnection,
    workload: Arc<Workload>,
    rng: Rng,
}

impl Sender {
    pub async fn open(
        addr: SocketAddr,
        workload: &Arc<Workload>,
        seed: u64,
    ) -> anyhow::Result<Sender> {
        Ok(Sender {
            connection: HttpConnection::open(addr).await?,
            workload: Arc::clone(workload),
            rng: Rng::new(seed),
        })
    }
}

impl Op for Sender {
    async fn call(&mut self) -> anyhow::Result<u64> {
        let n = self.rng.below(self.workload.customers);
        let (status, body) = self.connection.post(self.workload.update(n)).await?;
        if status != 200 {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(1)
    }
}

/// One measured ingest window against `server`.
pub async fn measure(
    options: &Options,
    server: &Server,
    workload: &Arc<Workload>,
) -> anyhow::Result<Measured> {
    let addr = server.webhook()?;
    let mut senders = Vec::with_capacity(options.concurrency);
    for seed in 0..options.concurrency {
        senders.push(Sender::open(addr, workload, seed as u64 + 1).await?);
    }
    let measured = load::run(&options.plan(server), senders).await;
    measured.check(&format!("ingest into {}", server.name))?;
    Ok(measured)
}

/// Journal figures over one window, from the service's `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Journal {
    pub appends: f64,
    pub append_seconds: f64,
    pub webhooks: f64,
}

impl Journal {
    /// Reads the counters now (the durable service's admin listener).
    pub async fn read(server: &Server) -> anyhow::Result<Journal> {
        let admin = server
            .admin
            .context("the service's admin address is unknown")?;
        let (status, body) = HttpConnection::open(admin).await?.get("/metrics").await?;
        if status != 200 {
            bail!("GET /metrics: HTTP {status}");
        }
        let text = String::from_utf8_lossy(&body);
        let sum = |prefix: &str| -> f64 {
            text.lines()
                .filter(|line| line.starts_with(prefix))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        Ok(Journal {
            appends: sum("profile_state_journal_fsync_duration_seconds_count"),
            append_seconds: sum("profile_state_journal_fsync_duration_seconds_sum"),
            webhooks: sum("profile_state_webhooks_total"),
        })
    }

    fn since(self, before: Journal) -> Journal {
        Journal {
            appends: self.appends - before.appends,
            append_seconds: self.append_seconds - before.append_seconds,
            webhooks: self.webhooks - before.webhooks,
        }
    }
}

pub async fn run(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let customers = options.customers(100_000);
    let workload = options.workload(customers);
    let baseline = options.baseline()?;
    let ephemeral = options.ours()?;
    // Durable only when the tool starts the service: an external target is what it is. The
    // bindings drop in reverse order, so the service stops before its temporary dir goes.
    let (_durable_dir, durable, noop_durable) = if options.external() {
        (None, None, None)
    } else {
        let (dir, temp) = super::data_dir(options)?;
        report.note(format!("ingest: durable data dir {}", dir.display()));
        let server = Server::spawn_service("ours-durable", &options.spec(Some(dir.clone())))?;
        // The disk's own cost, on the same file system (`crate::noop_durable`).
        let noop = match &baseline {
            Some(_) => Some(Server::spawn_noop_durable(&dir)?),
            None => None,
        };
        (temp, Some(server), noop)
    };
    // Every round measures updates of existing profiles, not the first round creations.
    preload(&ephemeral, &workload, customers, options.concurrency).await?;
    if let Some(durable) = &durable {
        preload(durable, &workload, customers, options.concurrency).await?;
    }
    note_setup(report, options, "ingest");
    report.note(format!(
        "ingest: {customers} customers, bodies of {} bytes, signed (X-GB-Signature)",
        workload.update(0).body.len()
    ));

    let contenders: Vec<&Server> = baseline
        .iter()
        .chain(noop_durable.iter())
        .chain([&ephemeral])
        .chain(durable.iter())
        .collect();
    let results = rounds(options.rounds, contenders.len(), |_, index| {
        let server = contenders[index];
        let workload = &workload;
        async move {
            let durable = server.name == "ours-durable";
            let before = if durable {
                Some(Journal::read(server).await?)
            } else {
                None
            };
            let measured = measure(options, server, workload).await;
            let journal = match before {
                Some(before) => Some(Journal::read(server).await?.since(before)),
                None => None,
            };
            if let Ok(measured) = &measured {
                eprintln!(
                    "ingest {:>13}: {:>8.0} req/s, p99 {} µs",
                    server.name,
                    measured.per_second(),
                    measured.latency.value_at_quantile(0.99)
                );
            }
            anyhow::Ok((measured?, journal))
        }
    })
    .await;
    let results = results
        .into_iter()
        .map(|rounds| rounds.into_iter().collect::<anyhow::Result<Vec<_>>>())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let journals: Vec<Journal> = results
        .last()
        .map(|rounds| rounds.iter().filter_map(|(_, journal)| *journal).collect())
        .unwrap_or_default();
    let mut results: Vec<Vec<Measured>> = results
        .into_iter()
        .map(|rounds| rounds.into_iter().map(|(measured, _)| measured).collect())
        .collect();
    let durable_results = durable.is_some().then(|| results.pop().unwrap_or_default());
    let ours = results.pop().unwrap_or_default();
    let noop_durable_results = noop_durable
        .is_some()
        .then(|| results.pop().unwrap_or_default());
    let noop = results.pop();

    let values = |rounds: &[Measured], f: &dyn Fn(&Measured) -> f64| -> Vec<f64> {
        rounds.iter().map(f).collect()
    };
    let rate = |m: &Measured| m.per_second();
    let mut row = Row::new("ingest", "req/s (--ephemeral)", "req/s").ours(values(&ours, &rate));
    if let Some(noop) = &noop {
        row = row
            .baseline("no-op HTTP", values(noop, &rate))
            .target(Target::RatioAtLeast { value: 0.80 }); // issue 12 (issue 5 had 0.70)
    }
    report.push(row);
    if let Some(durable) = &durable_results {
        report.push(
            Row::new("ingest", "req/s durable vs --ephemeral", "req/s")
                .ours(values(durable, &rate))
                .baseline("--ephemeral", values(&ours, &rate))
                .target(Target::RatioAtLeast { value: 0.80 }),
        );
    }
    // What the disk takes from a plain durable server, beside what it takes from ours.
    if let (Some(noop), Some(noop_durable)) = (&noop, &noop_durable_results) {
        report.push(
            Row::new("ingest", "req/s no-op durable vs no-op HTTP", "req/s")
                .ours(values(noop_durable, &rate))
                .baseline("no-op HTTP", values(noop, &rate)),
        );
    }
    for (label, quantile) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        let latency = move |m: &Measured| m.latency.value_at_quantile(quantile) as f64 / 1000.0;
        let mut row = Row::new("ingest", &format!("latency {label} (--ephemeral)"), "ms")
            .ours(values(&ours, &latency));
        if let Some(noop) = &noop {
            row = row.baseline("no-op HTTP", values(noop, &latency));
        }
        report.push(row);
        if let Some(durable) = &durable_results {
            report.push(
                Row::new("ingest", &format!("latency {label} durable"), "ms")
                    .ours(values(durable, &latency))
                    .baseline("--ephemeral", values(&ours, &latency)),
            );
        }
    }
    if !journals.is_empty() {
        report.push(
            Row::new(
                "ingest",
                "durable: webhooks per journal append (group commit)",
                "count",
            )
            .ours(
                journals
                    .iter()
                    .map(|j| j.webhooks / j.appends.max(1.0))
                    .collect(),
            ),
        );
        report.push(
            Row::new(
                "ingest",
                "durable: mean journal append incl. fdatasync",
                "ms",
            )
            .ours(
                journals
                    .iter()
                    .map(|j| j.append_seconds * 1000.0 / j.appends.max(1.0))
                    .collect(),
            ),
        );
    }
    let cpu = |m: &Measured| m.server_cpu_us_per_op().unwrap_or(f64::NAN);
    if ephemeral.pid().is_some() {
        let mut row =
            Row::new("ingest", "server CPU per req (--ephemeral)", "µs").ours(values(&ours, &cpu));
        if let Some(noop) = &noop {
            row = row.baseline("no-op HTTP", values(noop, &cpu));
        }
        report.push(row);
    }
    if let Some(durable) = &durable_results {
        report.push(
            Row::new("ingest", "server CPU per req durable", "µs")
                .ours(values(durable, &cpu))
                .baseline("--ephemeral", values(&ours, &cpu)),
        );
    }
    if let (Some(noop), Some(noop_durable)) = (&noop, &noop_durable_results) {
        report.push(
            Row::new("ingest", "server CPU per req no-op durable", "µs")
                .ours(values(noop_durable, &cpu))
                .baseline("no-op HTTP", values(noop, &cpu)),
        );
    }
    Ok(())
}
