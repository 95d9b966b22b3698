//! The ingest-impact part of `fanout`: closed-loop ingest with S subscribers connected against
//! none, rounds interleaved, for the service and for the no-op servers (the no-op webhook
//! endpoint handing each webhook to the no-op WatchProfiles streams that want it,
//! `noop_watch.rs`). The no-op pair is the transport's own cost of the same deliveries: the
//! same subscribers, connections per stream, filter and webhooks, none of the service's work.
//!
//! Rows: webhooks/s with subscribers against without (ours carries the target; the no-op's is
//! beside it), the CPU per webhook the subscribers add (server and load tool together: the
//! subscribers read in the tool's process), and the deliveries, so a side that delivered
//! nothing cannot pass for a cheap one.

use std::sync::Arc;

use anyhow::bail;

use super::fanout::{Audience, Filter, Subscribers};
use super::{Options, ingest, rounds};
use crate::load::Measured;
use crate::process::Server;
use crate::report::{Report, Row, Target};
use crate::workload::Workload;

/// One subscriber count's ingest-impact measurement.
pub(super) struct Impact<'a> {
    pub(super) audience: Audience,
    pub(super) workload: &'a Arc<Workload>,
    /// Closed loop.
    pub(super) options: &'a Options,
    pub(super) scenario: &'a str,
}

/// One ingest window: what the senders measured, and what the subscribers received (warm-up
/// included).
struct Window {
    measured: Measured,
    delivered: u64,
}

impl Window {
    fn per_second(&self) -> f64 {
        self.measured.per_second()
    }

    /// Server and tool CPU per webhook, µs.
    fn cpu_per_webhook(&self) -> f64 {
        match (self.measured.server_cpu, self.measured.client_cpu) {
            (Some(server), Some(client)) if self.measured.ops > 0 => {
                (server + client).as_secs_f64() * 1e6 / self.measured.ops as f64
            }
            _ => f64::NAN,
        }
    }
}

impl Impact<'_> {
    /// Ours without and with subscribers, then the no-op's (when given), each round.
    pub(super) async fn measure(
        &self,
        report: &mut Report,
        ours: &Server,
        noop: Option<&Server>,
    ) -> anyhow::Result<()> {
        let servers = [Some(ours), noop];
        let results = rounds(self.options.rounds, 4, |_, contender| {
            let (server, with) = (servers[contender / 2], contender % 2 == 1);
            async move {
                match server {
                    Some(server) => self.window(server, with).await.map(Some),
                    None => Ok(None),
                }
            }
        })
        .await;
        let mut windows = Vec::with_capacity(4);
        for contender in results {
            let rounds: Vec<Option<Window>> =
                contender.into_iter().collect::<anyhow::Result<_>>()?;
            windows.push(rounds.into_iter().flatten().collect::<Vec<_>>());
        }
        let [ours_without, ours_with, noop_without, noop_with] =
            <[Vec<Window>; 4]>::try_from(windows).map_err(|_| anyhow::anyhow!("four sides"))?;
        self.rows(
            report,
            [&ours_without, &ours_with],
            [&noop_without, &noop_with],
        );
        Ok(())
    }

    /// Opens the subscribers (if `with`), measures ingest, closes them.
    async fn window(&self, server: &Server, with: bool) -> anyhow::Result<Window> {
        let subscribers = if with {
            let grpc = server.grpc()?;
            Some(Subscribers::open(grpc, self.audience, &self.workload.client_id).await?)
        } else {
            None
        };
        let measured = ingest::measure(self.options, server, self.workload).await?;
        let delivered = match subscribers {
            Some(subscribers) => {
                let delivered = subscribers.delivered();
                subscribers.close().await;
                delivered
            }
            None => 0,
        };
        let wants_some = self.audience.filter != Filter::OtherAccount;
        if with && wants_some && delivered == 0 {
            bail!(
                "{}: {} subscribers of {} received nothing during ingest",
                self.scenario,
                self.audience.count,
                server.name
            );
        }
        eprintln!(
            "{}: ingest into {} with {} subscribers: {:.0} req/s, {delivered} deliveries",
            self.scenario,
            server.name,
            if with { self.audience.count } else { 0 },
            measured.per_second(),
        );
        Ok(Window {
            measured,
            delivered,
        })
    }

    fn rows(&self, report: &mut Report, ours: [&[Window]; 2], noop: [&[Window]; 2]) {
        let filter = self.audience.filter;
        let each = |windows: &[Window], value: &dyn Fn(&Window) -> f64| -> Vec<f64> {
            windows.iter().map(value).collect()
        };
        // Per round: with minus without (the rounds interleave, so each pair shares its minutes).
        let added = |[without, with]: [&[Window]; 2]| -> Vec<f64> {
            without
                .iter()
                .zip(with)
                .map(|(without, with)| with.cpu_per_webhook() - without.cpu_per_webhook())
                .collect()
        };
        let window = self.options.warmup + self.options.duration;
        let deliveries = |w: &Window| w.delivered as f64 / window.as_secs_f64();
        let has_noop = !noop[1].is_empty();
        let with_noop = |row: Row, values: Vec<f64>| match has_noop {
            true => row.baseline("no-op servers", values),
            false => row,
        };
        report.push(
            Row::new(
                self.scenario,
                &format!("ingest req/s with subscribers ({filter:?} filter)"),
                "req/s",
            )
            .ours(each(ours[1], &Window::per_second))
            .baseline("no subscribers", each(ours[0], &Window::per_second))
            .target(Target::RatioAtLeast { value: 0.90 }),
        );
        if has_noop {
            report.push(
                Row::new(
                    self.scenario,
                    &format!("no-op servers: ingest req/s with subscribers ({filter:?} filter)"),
                    "req/s",
                )
                .ours(each(noop[1], &Window::per_second))
                .baseline("no-op, no subscribers", each(noop[0], &Window::per_second)),
            );
        }
        // A service the tool did not start (`--webhook`, `--grpc`) has no CPU reading: the row
        // would be NaN, so a note says why it is missing.
        let mut windows = ours.iter().flat_map(|windows| windows.iter());
        if windows.all(|window| window.measured.server_cpu.is_some()) {
            let row = Row::new(
                self.scenario,
                "CPU per webhook the subscribers add (server + tool)",
                "µs",
            )
            .ours(added(ours));
            report.push(with_noop(row, added(noop)));
        } else {
            report.note(format!(
                "{}: no CPU per webhook row: the tool reads the CPU of a service it started, \
                 not of one given by --webhook/--grpc",
                self.scenario
            ));
        }
        let row = Row::new(
            self.scenario,
            "deliveries/s during ingest (warm-up included)",
            "/s",
        )
        .ours(each(ours[1], &deliveries));
        report.push(with_noop(row, each(noop[1], &deliveries)));
    }
}
