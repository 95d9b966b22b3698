//! The load loop shared by every throughput scenario: N workers, each calling its operation
//! back to back (closed loop) or on a fixed schedule (open loop, `--rate`), a warm-up that is
//! not counted, then a measured window. Latencies go into HdrHistograms (µs); in open loop they
//! are measured from the scheduled start, so a stall is not hidden (no coordinated omission).
//! CPU time of the server process and of this process is sampled at the window's edges.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::baseline::histogram;
use crate::process::cpu_time;
use crate::workload::Delivery;

/// One unit of load; returns how many items (profiles, say) it moved.
pub trait Op: Send + 'static {
    fn call(&mut self) -> impl Future<Output = anyhow::Result<u64>> + Send;
}

/// How to drive the workers.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Total requests per second across workers; `None` = closed loop.
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Processes whose CPU time to report (the server under test).
    pub server_pid: Option<u32>,
}

/// What one measured window found.
#[derive(Debug)]
pub struct Measured {
    pub ops: u64,
    pub items: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// µs per operation.
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
    pub server_cpu: Option<Duration>,
    pub client_cpu: Option<Duration>,
}

impl Measured {
    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    pub fn items_per_second(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64()
    }

    /// Server CPU µs per operation, when the server's pid is known.
    pub fn server_cpu_us_per_op(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.ops > 0).then(|| cpu.as_secs_f64() * 1e6 / self.ops as f64)
    }

    /// Fails when nothing succeeded: a wrong secret or address should not look like a number.
    pub fn check(&self, what: &str) -> anyhow::Result<()> {
        if self.ops == 0 {
            bail!(
                "{what}: no operation succeeded in the window ({} errors; first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("none")
            );
        }
        if let Some(error) = &self.first_error {
            eprintln!(
                "warning: {what}: {} operations failed; first: {error}",
                self.errors
            );
        }
        Ok(())
    }
}

struct WorkerResult {
    ops: u64,
    items: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

/// Runs `ops` (one per worker) by `plan`.
pub async fn run<O: Op>(plan: &Plan, ops: Vec<O>) -> Measured {
    let workers = ops.len().max(1);
    let started = Instant::now();
    let measure_from = started + plan.warmup;
    let end = measure_from + plan.duration;
    let interval = plan
        .rate
        .filter(|rate| *rate > 0.0)
        .map(|rate| Duration::from_secs_f64(workers as f64 / rate));
    let mut handles = Vec::with_capacity(workers);
    for (index, mut op) in ops.into_iter().enumerate() {
        // Spread open-loop workers over one interval so their requests do not come in bursts.
        let mut next =
            started + interval.map_or(Duration::ZERO, |i| i * index as u32 / workers as u32);
        handles.push(tokio::spawn(async move {
            let mut result = WorkerResult {
                ops: 0,
                items: 0,
                errors: 0,
                first_error: None,
                latency: histogram(),
            };
            loop {
                let begun = match interval {
                    Some(interval) => {
                        let due = next;
                        next += interval;
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                if begun >= end {
                    break;
                }
                let outcome = op.call().await;
                let done = Instant::now();
                if begun < measure_from || done > end {
                    continue;
                }
                match outcome {
                    Ok(items) => {
                        result.ops += 1;
                        result.items += items;
                        result
                            .latency
                            .saturating_record(done.duration_since(begun).as_micros() as u64);
                    }
                    Err(error) => {
                        result.errors += 1;
                        if result.first_error.is_none() {
                            result.first_error = Some(format!("{error:#}"));
                        }
                        // A broken connection fails fast; do not spin on it.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            result
        }));
    }
    let server_pid = plan.server_pid;
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let self_pid = std::process::id();
        let before = (server_pid.and_then(cpu_time), cpu_time(self_pid));
        tokio::time::sleep_until(end.into()).await;
        let after = (server_pid.and_then(cpu_time), cpu_time(self_pid));
        let delta = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
        (delta(before.0, after.0), delta(before.1, after.1))
    });
    let mut measured = Measured {
        ops: 0,
        items: 0,
        errors: 0,
        first_error: None,
        latency: histogram(),
        elapsed: plan.duration,
        server_cpu: None,
        client_cpu: None,
    };
    for handle in handles {
        let result = handle.await.expect("a load worker does not panic");
        measured.ops += result.ops;
        measured.items += result.items;
        measured.errors += result.errors;
        measured.first_error = measured.first_error.or(result.first_error);
        measured
            .latency
            .add(&result.latency)
            .expect("histograms with the same bounds add");
    }
    (measured.server_cpu, measured.client_cpu) = cpu.await.unwrap_or((None, None));
    measured
}

/// One HTTP/1.1 keep-alive connection with TCP_NODELAY, as a webhook sender holds it.
pub struct HttpConnection {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl HttpConnection {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<HttpConnection> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes; nothing to report.
            let _ = connection.await;
        });
        Ok(HttpConnection {
            sender,
            host: addr.to_string(),
        })
    }

    /// GETs `path`; returns the status and the body.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, Bytes)> {
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, &self.host)
            .body(Full::new(Bytes::new()))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// Posts one signed delivery to the webhook path; returns the status and the body.
    pub async fn post(&mut self, delivery: Delivery) -> anyhow::Result<(u16, Bytes)> {
        let request = hyper::Request::post(profile_state::webhook::PATH)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                profile_state::webhook::signature::HEADER,
                delivery.signature,
            )
            .body(Full::new(delivery.body))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}
