//! `memory` and `recovery`: what the service costs at rest. Both start the service themselves
//! (they measure a process), so they ignore `--webhook`/`--grpc`.
//!
//! - memory: a fresh `--ephemeral` service, RSS (`VmRSS` in /proc/<pid>/status) before and after
//!   loading N profiles (one signed webhook each, realistic field sizes); bytes per profile.
//! - recovery: a data dir holding N profiles (loaded once through webhooks, then the service is
//!   stopped with SIGTERM); then, per round, the time from spawning the binary on it to its
//!   "profile-state listening" line and to the first successful gRPC call. Baseline: the same on
//!   an empty data dir (process start and bind, nothing to recover).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use profile_state::pb;
use prost::Message;

use super::{Options, channel, client, data_dir, load_customers, profile_count};
use crate::process::{Server, rss_bytes};
use crate::report::{Report, Row, Target};
use crate::workload::Workload;

pub async fn memory(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    use profile_state::profile::{Change, FieldPath, Profile, ProfileKey};
    use std::mem::size_of;
    // The service's in-memory types as this compiler lays them out (the same crate, compiler
    // and target as the service binary), for reading the per-profile figure. The modeled
    // fields' registers are packed in a separate allocation, not counted here.
    report.note(format!(
        "memory: size_of Profile {} B, ProfileKey {} B, Change {} B, FieldPath {} B",
        size_of::<Profile>(),
        size_of::<ProfileKey>(),
        size_of::<Change>(),
        size_of::<FieldPath>()
    ));
    let profiles = options.customers(1_000_000);
    let workload = options.workload(profiles);
    let mut per_profile = Vec::new();
    let mut grown = Vec::new();
    for round in 0..options.rounds.max(1) {
        let server = Server::spawn_service("ours", &options.spec(None))?;
        let pid = server.pid().context("a spawned service has a pid")?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss_bytes(pid).context("reading the service's RSS")?;
        let took = load_customers(
            server.webhook()?,
            &workload,
            0..profiles,
            options.concurrency,
        )
        .await?;
        let held = profile_count(server.grpc()?).await?;
        if held != profiles {
            bail!("loaded {profiles} profiles, the service holds {held}");
        }
        // Let allocator bookkeeping settle; RSS does not shrink on its own afterwards anyway.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_bytes(pid).context("reading the service's RSS")?;
        let growth = after.saturating_sub(before);
        eprintln!(
            "memory round {round}: RSS {} MiB -> {} MiB for {profiles} profiles \
             ({:.0} B/profile), loaded in {took:?}",
            before >> 20,
            after >> 20,
            growth as f64 / profiles as f64
        );
        if round == 0 {
            let body = workload.update(0).body.len();
            let channel = channel(server.grpc()?).await?;
            let encoded = client(&channel)
                .get_profile(pb::GetProfileRequest {
                    client_id: workload.client_id.clone(),
                    customer_id: Workload::customer_id(0),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .profile
                .map_or(0, |profile| profile.encoded_len());
            report.note(format!(
                "memory: webhook body {body} B, encoded Profile {encoded} B; RSS before {} MiB, \
                 after {} MiB; loading {profiles} took {took:?} ({:.0}/s)",
                before >> 20,
                after >> 20,
                profiles as f64 / took.as_secs_f64()
            ));
        }
        per_profile.push(growth as f64 / profiles as f64);
        grown.push(growth as f64 / (1 << 20) as f64);
    }
    report.push(
        Row::new(
            "memory",
            &format!("RSS growth per profile at {profiles}"),
            "B",
        )
        .ours(per_profile)
        .target(Target::AtMost { value: 400.0 }),
    );
    report.push(Row::new("memory", "RSS growth", "MiB").ours(grown));
    Ok(())
}

/// Spawns the service on `dir`, waits for its listening line and its first successful gRPC
/// call; returns both times, counted from the spawn, and the running server.
async fn start(
    options: &Options,
    dir: &std::path::Path,
) -> anyhow::Result<(Duration, Duration, Server)> {
    let server = Server::spawn_service("ours", &options.spec(Some(dir.to_owned())))?;
    let listening = server.listening_at.duration_since(server.spawned_at);
    let grpc = server.grpc()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(channel) = channel(grpc).await
            && client(&channel)
                .get_server_info(pb::GetServerInfoRequest {})
                .await
                .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("no successful gRPC call within 60 s of listening");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let first_call = server.spawned_at.elapsed();
    Ok((listening, first_call, server))
}

pub async fn recovery(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let profiles = options.customers(1_000_000);
    let workload = options.workload(profiles);
    let (dir, _temp) = data_dir(options)?;
    // Fill the data dir once (or top it up: a kept --data-dir is reused).
    {
        let mut server = Server::spawn_service("ours", &options.spec(Some(dir.clone())))?;
        let held = profile_count(server.grpc()?).await?;
        if held < profiles {
            let took = load_customers(
                server.webhook()?,
                &workload,
                held..profiles,
                options.concurrency,
            )
            .await?;
            report.note(format!(
                "recovery: loaded {} profiles durably in {took:?}",
                profiles - held
            ));
        }
        server.stop()?;
    }
    let size: u64 = std::fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .map(|metadata| metadata.len())
        .sum();
    report.note(format!(
        "recovery: data dir {} holds {:.1} MiB",
        dir.display(),
        size as f64 / f64::from(1 << 20)
    ));
    let empty = crate::temp::dir("empty")?;

    let mut rows: [Vec<f64>; 4] = Default::default();
    for round in 0..options.rounds.max(1) {
        // Baseline first: the same binary on an empty (fresh) data dir.
        let fresh = empty.path().join(format!("round-{round}"));
        let (listening, first_call, empty_server) = start(options, &fresh).await?;
        rows[0].push(listening.as_secs_f64());
        rows[1].push(first_call.as_secs_f64());
        drop(empty_server);
        let (listening, first_call, mut server) = start(options, &dir).await?;
        let recovered = server.recovered.clone().unwrap_or_default();
        let held = profile_count(server.grpc()?).await?;
        if held < profiles {
            bail!("recovered {held} profiles, expected {profiles}");
        }
        eprintln!(
            "recovery round {round}: listening after {listening:?}, first call after \
             {first_call:?}; recovered: {recovered}"
        );
        if round == 0 {
            report.note(format!("recovery: the service logged {recovered}"));
        }
        rows[2].push(listening.as_secs_f64());
        rows[3].push(first_call.as_secs_f64());
        server.stop()?;
    }
    let [empty_listening, empty_call, listening, call] = rows;
    report.push(
        Row::new(
            "recovery",
            &format!("spawn -> listening, {profiles} profiles"),
            "s",
        )
        .ours(listening)
        .baseline("empty data dir", empty_listening)
        .target(Target::AtMost { value: 1.5 }),
    );
    report.push(
        Row::new("recovery", "spawn -> first gRPC call", "s")
            .ours(call)
            .baseline("empty data dir", empty_call)
            .target(Target::AtMost { value: 1.5 }),
    );
    Ok(())
}
