//! Child processes: the service under test (`profile-state`, spawned on 127.0.0.1 port 0) and
//! the no-op baselines (this binary's hidden `baseline` command), plus what `/proc` says about
//! them (CPU time, RSS).
//!
//! Both kinds run as their own process with their own default tokio runtime, so the service
//! and its baseline compete for the same 2 cores with the load generator in the same way.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How the service under test is started.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub bin: PathBuf,
    pub secret: String,
    /// `None` = `--ephemeral`.
    pub data_dir: Option<PathBuf>,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// A running child that serves HTTP and/or gRPC. Stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    pub name: String,
    pub webhook: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    /// The service's admin listener (`/metrics`), when the tool started it.
    pub admin: Option<SocketAddr>,
    /// The baseline's fan-out trigger: a POST publishes a change to its WatchProfiles streams.
    pub fanout_trigger: Option<SocketAddr>,
    /// The baseline's no-op gRPC server with each connection and its streams on one task
    /// (`one_task.rs`).
    pub grpc_one_task: Option<SocketAddr>,
    /// `None` for a target the tool did not start (given by address).
    child: Option<Child>,
    /// When the process was started and when it said it was listening.
    pub spawned_at: Instant,
    pub listening_at: Instant,
    /// Log lines (JSON) after the listening line, for whoever wants them (recovery).
    pub recovered: Option<serde_json::Value>,
}

impl Server {
    /// A target given by address: nothing to start or stop, no /proc figures.
    pub fn external(webhook: Option<SocketAddr>, grpc: Option<SocketAddr>) -> Server {
        let now = Instant::now();
        Server {
            name: "ours".into(),
            webhook,
            grpc,
            admin: None,
            fanout_trigger: None,
            grpc_one_task: None,
            child: None,
            spawned_at: now,
            listening_at: now,
            recovered: None,
        }
    }

    /// Starts the service and waits for its "profile-state listening" log line.
    pub fn spawn_service(name: &str, spec: &ServiceSpec) -> anyhow::Result<Server> {
        let mut command = Command::new(&spec.bin);
        command.args([
            "--webhook-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--shutdown-grace",
            "3s",
            "--webhook-secret",
            &spec.secret,
        ]);
        match &spec.data_dir {
            None => command.arg("--ephemeral"),
            Some(dir) => command.arg("--data-dir").arg(dir),
        };
        command.args(&spec.extra_args);
        command.env("RUST_LOG", "info");
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        let spawned_at = Instant::now();
        let mut child = die_with_parent(&mut command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", spec.bin.display()))?;
        let lines = drain(&mut child);
        let mut recovered = None;
        let deadline = Duration::from_secs(600);
        loop {
            let (at, line) = match lines.recv_timeout(deadline) {
                Ok(received) => received,
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait()?;
                    bail!("{} exited ({status}) before listening", spec.bin.display());
                }
            };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            // Fields are at the top level of each JSON line (`--log-format json`); builds before
            // the flat log format nest them under `fields`, and `--server-bin` compares builds.
            let fields = json.get("fields").unwrap_or(&json);
            match fields["message"].as_str() {
                Some("recovered") => recovered = Some(fields.clone()),
                Some("profile-state listening") => {
                    let addr = |name: &str| -> anyhow::Result<SocketAddr> {
                        fields[name]
                            .as_str()
                            .context("listening line without addresses")?
                            .parse()
                            .context("listening line address")
                    };
                    return Ok(Server {
                        name: name.into(),
                        webhook: Some(addr("webhook")?),
                        grpc: Some(addr("grpc")?),
                        admin: addr("admin").ok(),
                        fanout_trigger: None,
                        grpc_one_task: None,
                        child: Some(child),
                        spawned_at,
                        listening_at: at,
                        recovered,
                    });
                }
                _ => {}
            }
        }
    }

    /// Starts this binary's no-op baseline servers (HTTP, gRPC and the fan-out trigger) in a child
    /// process.
    pub fn spawn_baseline(client_id: &str) -> anyhow::Result<Server> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let spawned_at = Instant::now();
        let mut child = die_with_parent(&mut Command::new(exe))
            .args(["--client-id", client_id, "baseline"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the baseline servers")?;
        let lines = drain(&mut child);
        let (at, line) = lines
            .recv_timeout(Duration::from_secs(30))
            .context("the baseline servers did not start")?;
        let json: serde_json::Value = serde_json::from_str(&line).context("baseline addresses")?;
        let addr = |name: &str| -> anyhow::Result<SocketAddr> {
            Ok(json[name].as_str().context("baseline address")?.parse()?)
        };
        Ok(Server {
            name: "baseline".into(),
            webhook: Some(addr("http")?),
            grpc: Some(addr("grpc")?),
            admin: None,
            fanout_trigger: Some(addr("fanout_trigger")?),
            grpc_one_task: Some(addr("grpc_one_task")?),
            child: Some(child),
            spawned_at,
            listening_at: at,
            recovered: None,
        })
    }

    /// Starts this binary's no-op replica (`crate::noop_replica`) on `stream` of the NATS
    /// cluster at `nats_urls`, in a child process.
    pub fn spawn_noop_replica(name: &str, nats_urls: &str, stream: &str) -> anyhow::Result<Server> {
        let args = [
            "noop-replica",
            "--nats-url",
            nats_urls,
            "--stream",
            stream,
            "--name",
            name,
        ];
        Server::spawn_noop(name, &args)
    }

    /// Starts this binary's no-op durable server (`crate::noop_durable`), its file in `dir`, in
    /// a child process.
    pub fn spawn_noop_durable(dir: &Path) -> anyhow::Result<Server> {
        let dir = dir.to_str().context("a data directory that is not UTF-8")?;
        Server::spawn_noop("no-op durable", &["noop-durable", "--dir", dir])
    }

    /// Starts this binary with `args`: a server that prints `{"http": ADDR}` once listening.
    fn spawn_noop(name: &str, args: &[&str]) -> anyhow::Result<Server> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let spawned_at = Instant::now();
        let mut child = die_with_parent(&mut Command::new(exe))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let lines = drain(&mut child);
        let (at, line) = lines
            .recv_timeout(Duration::from_secs(60))
            .with_context(|| format!("the {name} did not start"))?;
        let json: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("the {name}'s address"))?;
        let http = json["http"]
            .as_str()
            .with_context(|| format!("the {name}'s address"))?;
        Ok(Server {
            name: name.to_owned(),
            webhook: Some(http.parse()?),
            grpc: None,
            admin: None,
            fanout_trigger: None,
            grpc_one_task: None,
            child: Some(child),
            spawned_at,
            listening_at: at,
            recovered: None,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn webhook(&self) -> anyhow::Result<SocketAddr> {
        self.webhook.context("no webhook address (pass --webhook)")
    }

    pub fn grpc(&self) -> anyhow::Result<SocketAddr> {
        self.grpc.context("no gRPC address (pass --grpc)")
    }

    /// Stops the child: SIGTERM, and SIGKILL if it is still there after 10 s.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill()?;
        child.wait()?;
        bail!("{} did not stop within 10 s of SIGTERM", self.name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("warning: {error:#}");
        }
    }
}

/// Makes the child get SIGTERM when this process dies, however it dies (Ctrl-C, a kill), so
/// no service or baseline outlives the tool.
pub(crate) fn die_with_parent(command: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        })
    }
}

/// Reads the child's stdout (JSON log lines) on a thread, forever, so the pipe never fills;
/// each line is handed over with the moment it arrived. stderr is drained too (and dropped).
fn drain(child: &mut Child) -> mpsc::Receiver<(Instant, String)> {
    let (sender, receiver) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                // Nobody listening any more is fine: keep draining.
                let _ = sender.send((Instant::now(), line));
            }
        });
    }
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                eprintln!("[service stderr] {line}");
            }
        });
    }
    receiver
}

/// User + system CPU time a process has used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
}

/// A process's resident set size in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The service binary next to this one (both live in `target/<profile>/`).
pub fn default_service_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join("profile-state")
}
