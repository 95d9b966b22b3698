//! `scale`: many idle watch streams beside a few busy ones (issue 12).
//!
//! Opens `--idle` customer-filtered WatchProfiles streams (default 10,000), each on a customer
//! no webhook names, so they stay idle, `--streams-per-connection` to an HTTP/2 connection;
//! reads the service's RSS before and after: the growth per idle stream is what a stream
//! costs the service while nothing happens (its feed task, mailbox, channel, HTTP/2 stream).
//! Then, with them still open, `--active` unfiltered streams (no account, no customer: every
//! change) on their own connections and webhooks at `--rate` (default 100/s): the delivery
//! latency of those (as `fanout` measures it: from the webhook's answer to the receipt) shows
//! what the idle ones cost the busy ones. Targets: at most 16 KiB per idle stream, p99 at
//! most 50 ms.
//!
//! The service is started with `--max-watch-streams` raised to hold them all.

use anyhow::Context;

use super::fanout::{Audience, Endpoints, Filter, Subscribers, measure_latency};
use super::{Options, preload, rounds};
use crate::process::rss_bytes;
use crate::report::{Report, Row, Target};

/// Customers the webhooks update (the busy streams' changes); the idle ones watch others.
const UPDATED_CUSTOMERS: u64 = 10_000;

/// Who watches in this scenario.
#[derive(Clone, Copy, Debug)]
pub struct Watchers {
    pub idle: usize,
    pub active: usize,
    pub per_connection: usize,
}

pub async fn run(options: &Options, report: &mut Report, watchers: Watchers) -> anyhow::Result<()> {
    let Watchers {
        idle,
        active,
        per_connection,
    } = watchers;
    let rate = options.rate.unwrap_or(100.0);
    let customers = options.customers(UPDATED_CUSTOMERS);
    let workload = options.workload(customers);
    let mut options = options.clone();
    let streams = idle + active + 100;
    options
        .server_args
        .push(format!("--max-watch-streams={streams}"));
    let ours = options.ours()?;
    let grpc = ours.grpc()?;
    preload(&ours, &workload, customers, options.concurrency).await?;
    let scenario = format!("scale {idle} idle + {active}");
    report.note(format!(
        "scale: {idle} idle customer-filtered streams ({per_connection} per HTTP/2 connection), \
         {active} unfiltered streams (one connection each) at {rate} webhooks/s; {} rounds of \
         {:?} (+{:?} warm-up)",
        options.rounds, options.duration, options.warmup
    ));

    let before = ours.pid().and_then(rss_bytes);
    let idle_streams = Subscribers::open(
        grpc,
        Audience {
            count: idle,
            per_connection,
            filter: Filter::Customer,
            // Customers no webhook names: these streams stay idle.
            first_customer: customers,
        },
        &workload.client_id,
    )
    .await
    .context("opening the idle streams")?;
    let after = ours.pid().and_then(rss_bytes);
    match before.zip(after) {
        Some((before, after)) if idle > 0 => {
            let per_stream = after.saturating_sub(before) as f64 / idle as f64 / 1024.0;
            eprintln!(
                "{scenario}: RSS {before} -> {after} bytes, {per_stream:.1} KiB per idle stream"
            );
            report.push(
                Row::new(&scenario, "service RSS growth per idle watch stream", "KiB")
                    .ours(vec![per_stream])
                    .target(Target::AtMost { value: 16.0 }),
            );
        }
        _ => {
            report.note("scale: RSS not read (the service was given by address, or no idle stream)")
        }
    }

    let active_audience = Audience {
        count: active,
        per_connection: 1,
        filter: Filter::Unfiltered,
        first_customer: 0,
    };
    let results = rounds(options.rounds, 1, |_, _| {
        let (options, ours, workload) = (&options, &ours, &workload);
        async move {
            measure_latency(
                options,
                Endpoints::service(ours)?,
                workload,
                active_audience,
                rate,
            )
            .await
        }
    })
    .await;
    let stats = results
        .into_iter()
        .flatten()
        .collect::<anyhow::Result<Vec<_>>>()?;
    idle_streams.close().await;
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    report.push(
        Row::new(
            &scenario,
            "unfiltered streams' delivery p50 (answer -> receipt)",
            "ms",
        )
        .ours(stats.iter().map(|s| ms(&s.latency, 0.5)).collect()),
    );
    report.push(
        Row::new(
            &scenario,
            "unfiltered streams' delivery p99 (answer -> receipt)",
            "ms",
        )
        .ours(stats.iter().map(|s| ms(&s.latency, 0.99)).collect())
        .target(Target::AtMost { value: 50.0 }),
    );
    report.push(
        Row::new(&scenario, "deliveries missing", "count")
            .ours(stats.iter().map(|s| s.missing as f64).collect()),
    );
    let cpu = |s: &crate::baseline::FanoutStats| {
        s.cpu_per_delivery
            .map_or(f64::NAN, |cpu| cpu.as_secs_f64() * 1e6)
    };
    if stats.iter().any(|s| s.cpu_per_delivery.is_some()) {
        report.push(
            Row::new(&scenario, "server CPU per delivery", "µs")
                .ours(stats.iter().map(cpu).collect()),
        );
    }
    Ok(())
}
