//! `get`, `batch-get` and `list`: unary reads over HTTP/2 from `--connections` connections
//! with `--concurrency` calls in flight in all, against a preloaded store, uniformly random
//! customers. Compared with the no-op gRPC server answering pre-built profiles of the same
//! size; `list` also compares ListProfiles with BatchGetProfiles on our service (the issue's
//! target).

use std::sync::Arc;

use anyhow::bail;
use profile_state::pb;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use prost::Message;
use tonic::transport::Channel;

use super::{Options, channels, client, note_setup, preload, rounds};
use crate::load::{self, Measured, Op};
use crate::process::Server;
use crate::report::{Report, Row, Target};
use crate::workload::{Rng, Workload};

/// Which read a worker makes.
#[derive(Clone, Copy, Debug)]
pub enum Read {
    Get,
    BatchGet { ids: usize },
    List { page_size: i32 },
}

impl Read {
    fn name(self) -> String {
        match self {
            Read::Get => "GetProfile".into(),
            Read::BatchGet { ids } => format!("BatchGetProfiles ({ids} ids)"),
            Read::List { page_size } => format!("ListProfiles (page_size {page_size})"),
        }
    }
}

struct Reader {
    client: ProfileServiceClient<Channel>,
    workload: Arc<Workload>,
    rng: Rng,
    read: Read,
    page_token: String,
}

impl Op for Reader {
    async fn call(&mut self) -> anyhow::Result<u64> {
        let client_id = self.workload.client_id.clone();
        let customers = self.workload.customers;
        match self.read {
            Read::Get => {
                let customer_id = Workload::customer_id(self.rng.below(customers));
                let response = self
                    .client
                    .get_profile(pb::GetProfileRequest {
                        client_id,
                        customer_id,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok(u64::from(response.profile.is_some()))
            }
            Read::BatchGet { ids } => {
                let customer_ids = (0..ids)
                    .map(|_| Workload::customer_id(self.rng.below(customers)))
                    .collect();
                let response = self
                    .client
                    .batch_get_profiles(pb::BatchGetProfilesRequest {
                        client_id,
                        customer_ids,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if !response.missing_customer_ids.is_empty() {
                    bail!("{} ids missing", response.missing_customer_ids.len());
                }
                Ok(response.profiles.len() as u64)
            }
            Read::List { page_size } => {
                let response = self
                    .client
                    .list_profiles(pb::ListProfilesRequest {
                        client_id,
                        page_size,
                        page_token: std::mem::take(&mut self.page_token),
                        tier_name: String::new(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                // At the end of the list, start over.
                self.page_token = response.next_page_token;
                Ok(response.profiles.len() as u64)
            }
        }
    }
}

/// One measured window of `read` against `server`.
async fn measure(
    options: &Options,
    server: &Server,
    workload: &Arc<Workload>,
    read: Read,
) -> anyhow::Result<Measured> {
    let channels = channels(server.grpc()?, options.connections).await?;
    let readers = (0..options.concurrency)
        .map(|index| Reader {
            client: client(&channels[index % channels.len()]),
            workload: Arc::clone(workload),
            rng: Rng::new(index as u64 + 1),
            read,
            page_token: String::new(),
        })
        .collect();
    let measured = load::run(&options.plan(server), readers).await;
    measured.check(&format!("{} on {}", read.name(), server.name))?;
    eprintln!(
        "{:>36} {:>13}: {:>8.0} calls/s, {:>9.0} profiles/s, p99 {} µs",
        read.name(),
        server.name,
        measured.per_second(),
        measured.items_per_second(),
        measured.latency.value_at_quantile(0.99)
    );
    Ok(measured)
}

/// `get` (`Read::Get`) and `batch-get`: ours against the no-op gRPC server.
pub async fn run(options: &Options, report: &mut Report, read: Read) -> anyhow::Result<()> {
    let scenario = match read {
        Read::Get => "get",
        Read::BatchGet { .. } => "batch-get",
        Read::List { .. } => "list",
    };
    let customers = options.customers(100_000);
    let workload = options.workload(customers);
    let baseline = options.baseline()?;
    let ours = options.ours()?;
    preload(&ours, &workload, customers, options.concurrency).await?;
    note_setup(report, options, scenario);
    note_sizes(report, &ours, baseline.as_ref(), &workload).await?;

    let contenders: Vec<&Server> = baseline.iter().chain([&ours]).collect();
    let mut results = collect(
        rounds(options.rounds, contenders.len(), |_, index| {
            measure(options, contenders[index], &workload, read)
        })
        .await,
    )?;
    let ours = results.pop().unwrap_or_default();
    let noop = results.pop();
    let against = |row: Row, f: &dyn Fn(&Measured) -> f64| match &noop {
        Some(noop) => row.baseline("no-op gRPC", noop.iter().map(f).collect()),
        None => row,
    };
    let calls = against(
        Row::new(scenario, &format!("{} calls/s", read.name()), "calls/s")
            .ours(ours.iter().map(Measured::per_second).collect()),
        &Measured::per_second,
    );
    report.push(match read {
        // Issue 12's target.
        Read::Get if noop.is_some() => calls.target(Target::RatioAtLeast { value: 0.95 }),
        _ => calls,
    });
    if !matches!(read, Read::Get) {
        report.push(against(
            Row::new(scenario, "profiles/s", "profiles/s")
                .ours(ours.iter().map(Measured::items_per_second).collect()),
            &Measured::items_per_second,
        ));
    }
    push_latencies(report, scenario, &ours, noop.as_deref());
    Ok(())
}

/// `list`: ListProfiles pages against BatchGetProfiles of as many random ids, both on our
/// service (the target), and ListProfiles on the no-op server for reference.
pub async fn run_list(
    options: &Options,
    report: &mut Report,
    page_size: i32,
    ids: usize,
) -> anyhow::Result<()> {
    let customers = options.customers(1_000_000);
    let workload = options.workload(customers);
    let baseline = options.baseline()?;
    let ours = options.ours()?;
    preload(&ours, &workload, customers, options.concurrency).await?;
    note_setup(report, options, "list");
    note_sizes(report, &ours, baseline.as_ref(), &workload).await?;

    let list = Read::List { page_size };
    let batch = Read::BatchGet { ids };
    // Per round: BatchGet on ours, List on ours, then List on the no-op server.
    let mut contenders: Vec<(&Server, Read)> = vec![(&ours, batch), (&ours, list)];
    if let Some(baseline) = &baseline {
        contenders.push((baseline, list));
    }
    let mut results = collect(
        rounds(options.rounds, contenders.len(), |_, index| {
            let (server, read) = contenders[index];
            measure(options, server, &workload, read)
        })
        .await,
    )?;
    let noop_list = (results.len() == 3).then(|| results.pop().unwrap_or_default());
    let ours_list = results.pop().unwrap_or_default();
    let ours_batch = results.pop().unwrap_or_default();
    let profiles = |rounds: &[Measured]| rounds.iter().map(Measured::items_per_second).collect();
    report.push(
        Row::new("list", &format!("{} profiles/s", list.name()), "profiles/s")
            .ours(profiles(&ours_list))
            .baseline(&format!("ours, {}", batch.name()), profiles(&ours_batch))
            .target(Target::RatioAtLeast { value: 0.50 }),
    );
    if let Some(noop_list) = &noop_list {
        report.push(
            Row::new("list", &format!("{} profiles/s", list.name()), "profiles/s")
                .ours(profiles(&ours_list))
                .baseline("no-op gRPC", profiles(noop_list)),
        );
    }
    push_latencies(report, "list", &ours_list, noop_list.as_deref());
    Ok(())
}

fn collect(results: Vec<Vec<anyhow::Result<Measured>>>) -> anyhow::Result<Vec<Vec<Measured>>> {
    results
        .into_iter()
        .map(|rounds| rounds.into_iter().collect())
        .collect()
}

fn push_latencies(
    report: &mut Report,
    scenario: &str,
    ours: &[Measured],
    noop: Option<&[Measured]>,
) {
    for (label, quantile) in [("p50", 0.5), ("p99", 0.99)] {
        let latency = |m: &Measured| m.latency.value_at_quantile(quantile) as f64 / 1000.0;
        let mut row = Row::new(scenario, &format!("latency {label}"), "ms")
            .ours(ours.iter().map(latency).collect());
        if let Some(noop) = noop {
            row = row.baseline("no-op gRPC", noop.iter().map(latency).collect());
        }
        report.push(row);
    }
    let cpu = |m: &Measured| m.server_cpu_us_per_op().unwrap_or(f64::NAN);
    if ours.iter().any(|m| m.server_cpu.is_some()) {
        let mut row =
            Row::new(scenario, "server CPU per call", "µs").ours(ours.iter().map(cpu).collect());
        if let Some(noop) = noop {
            row = row.baseline("no-op gRPC", noop.iter().map(cpu).collect());
        }
        report.push(row);
    }
}

/// Records the encoded size of one profile from each side, to show the baseline moves as many
/// bytes as we do.
async fn note_sizes(
    report: &mut Report,
    ours: &Server,
    baseline: Option<&Server>,
    workload: &Arc<Workload>,
) -> anyhow::Result<()> {
    let mut sizes = Vec::new();
    for server in [Some(ours), baseline].into_iter().flatten() {
        let channel = super::channel(server.grpc()?).await?;
        let response = client(&channel)
            .get_profile(pb::GetProfileRequest {
                client_id: workload.client_id.clone(),
                customer_id: Workload::customer_id(0),
                ..Default::default()
            })
            .await?
            .into_inner();
        sizes.push(format!("{} {} B", server.name, response.encoded_len()));
    }
    report.note(format!("GetProfileResponse size: {}", sizes.join(", ")));
    Ok(())
}
