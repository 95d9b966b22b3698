//! One `nats-server` process: its configuration, store and log in a temporary directory that
//! is also its working directory, and what a failure test does to it (SIGKILL, restart with
//! the same ports and store, SIGSTOP, SIGCONT).

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{HarnessError, binary};

/// How long a node may take to become ready (or current) before the harness gives up. Generous:
/// CI machines have two busy cores; a ready node answers in well under a second.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// The start of a node's temporary directory's name, before the process id of whoever started
/// it: a directory left by a process that is gone (killed: nothing removed it) is known as
/// such (the load tool removes them).
pub const NODE_DIR_PREFIX: &str = "nats-harness-";

/// A `nats-server` process the harness started. Killed (SIGKILL) and reaped on drop; its
/// directory is removed after that.
pub struct Node {
    name: String,
    client: SocketAddr,
    http_address: SocketAddr,
    clustered: bool,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Environment variables the process is started (and restarted) with.
    env: Vec<(String, String)>,
    http: reqwest::Client,
    // Last, so the directory is removed only after the process is gone.
    dir: TempDir,
}

impl Node {
    /// Starts a node from configuration text and waits until it is ready. The text must have
    /// top-level `listen: <IP>:<port>` and `http: <IP>:<port>` lines; relative paths
    /// in it (such as `store_dir`) are inside the node's own temporary directory.
    pub async fn start(name: &str, config_text: &str) -> Result<Node, HarnessError> {
        let mut node = Node::spawn(name, config_text, &[])?;
        node.wait_ready().await?;
        Ok(node)
    }

    /// Starts a node without waiting for it (a cluster starts all nodes, then waits).
    pub(crate) fn spawn(
        name: &str,
        config_text: &str,
        env: &[(String, String)],
    ) -> Result<Node, HarnessError> {
        let address = |key: &str| {
            top_level_address(config_text, key).ok_or_else(|| {
                HarnessError(format!(
                    "node {name}: no top-level `{key}: <IP>:<port>` in its configuration"
                ))
            })
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("{NODE_DIR_PREFIX}{}-{name}-", std::process::id()))
            .tempdir()
            .map_err(|err| HarnessError(format!("node {name}: no temporary directory: {err}")))?;
        let config = dir.path().join("nats-server.conf");
        std::fs::write(&config, config_text)
            .map_err(|err| HarnessError(format!("node {name}: cannot write config: {err}")))?;
        let mut node = Node {
            name: name.to_string(),
            client: address("listen")?,
            http_address: address("http")?,
            clustered: config_text.contains("\ncluster"),
            log: dir.path().join("nats-server.log"),
            config,
            child: None,
            env: env.to_vec(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .map_err(|err| HarnessError(format!("no HTTP client: {err}")))?,
            dir,
        };
        node.launch()?;
        Ok(node)
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let binary = binary::nats_server()?;
        let log = self.open_log()?;
        let mut command = Command::new(&binary.path);
        command
            .arg("-c")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|err| self.error(err))?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = command.spawn().map_err(|err| {
            HarnessError(format!(
                "node {}: cannot start {}: {err}",
                self.name,
                binary.path.display()
            ))
        })?;
        self.child = Some(child);
        Ok(())
    }

    fn open_log(&self) -> Result<File, HarnessError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|err| self.error(err))
    }

    fn error(&self, err: impl std::fmt::Display) -> HarnessError {
        HarnessError(format!("node {}: {err}", self.name))
    }

    /// The server's name (`server_name`, also what stream info reports as leader).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nats://<IP>:<port>`, the client URL.
    pub fn client_url(&self) -> String {
        format!("nats://{}", self.client)
    }

    /// `http://<IP>:<port>`, the monitoring endpoint.
    pub fn monitor_url(&self) -> String {
        format!("http://{}", self.http_address)
    }

    /// The process id while the node runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process runs (possibly stopped by [`Node::pause`]).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// The server's log so far (every start of this node, appended).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and wait until the process is gone: no shutdown, no final sync, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean the process already exited, which is what we want.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the node if it runs, starts it again with the same configuration, ports and store,
    /// and waits until it is ready.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.relaunch()?;
        self.wait_ready().await
    }

    /// Kills the node if it runs and starts it again, without waiting.
    pub(crate) fn relaunch(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.launch()
    }

    /// SIGSTOP: the process stays, holding its ports and connections, and answers nothing (a
    /// stand-in for a partitioned or frozen machine). Returns once every thread of it has
    /// stopped: kill(2) only queues the stop, each thread takes it on its next way through the
    /// kernel, and until the last one has, it may still answer (seen once in CI: a `/healthz`
    /// sent right after the signal was answered).
    pub fn pause(&self) -> Result<(), HarnessError> {
        self.signal(libc::SIGSTOP)?;
        let pid = self.pid().ok_or_else(|| self.error("not running"))?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        // Polled: nothing else says when a group stop is complete without reaping the child
        // (waitpid would race the `Child` that owns it).
        while !every_thread_stopped(pid) {
            if Instant::now() > deadline {
                return Err(self.error(format!("not stopped {STOP_TIMEOUT:?} after SIGSTOP")));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&self) -> Result<(), HarnessError> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or_else(|| self.error("not running"))?;
        let pid = libc::pid_t::try_from(pid).map_err(|err| self.error(err))?;
        // SAFETY: kill(2) on our own, not yet reaped child; no memory is involved.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(self.error(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits until JetStream is enabled (`/healthz?js-enabled-only=true`) and, in a cluster,
    /// this node knows the meta leader (`/jsz`).
    pub async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        self.wait_until(Probe::Ready).await
    }

    /// Waits until `/healthz` (without options) is ok: every stream and consumer on this node
    /// is current with its group. After a restart, this is the node having caught up.
    pub async fn wait_current(&mut self) -> Result<(), HarnessError> {
        self.wait_until(Probe::Current).await
    }

    /// The meta leader's name as this node sees it (`/jsz` `meta_cluster.leader`).
    pub async fn meta_leader(&self) -> Option<String> {
        let jsz = self.monitor("/jsz").await?;
        let leader = jsz.pointer("/meta_cluster/leader")?.as_str()?;
        (!leader.is_empty()).then(|| leader.to_string())
    }

    /// A monitoring endpoint's JSON, or `None` if the node does not answer (in time).
    pub async fn monitor(&self, path: &str) -> Option<serde_json::Value> {
        let response = self.http.get(self.monitor_url() + path).send().await.ok()?;
        response.json().await.ok()
    }

    async fn get_ok(&self, path: &str) -> bool {
        match self.http.get(self.monitor_url() + path).send().await {
            Ok(response) => response.status().is_success(),
            Err(_) => false,
        }
    }

    async fn wait_until(&mut self, probe: Probe) -> Result<(), HarnessError> {
        let what = match (probe, self.clustered) {
            (Probe::Ready, true) => "JetStream enabled and a meta leader",
            (Probe::Ready, false) => "JetStream enabled",
            (Probe::Current, _) => "all JetStream assets current",
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.child.as_mut().map(Child::try_wait) {
                None => return Err(self.failed("is not running")),
                Some(Ok(Some(status))) => {
                    return Err(self.failed(&format!("exited with {status} before {what}")));
                }
                Some(_) => {}
            }
            let passed = match probe {
                Probe::Ready => {
                    self.get_ok("/healthz?js-enabled-only=true").await
                        && (!self.clustered || self.meta_leader().await.is_some())
                }
                Probe::Current => self.get_ok("/healthz").await,
            };
            if passed {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failed(&format!("not {what} after {READY_TIMEOUT:?}")));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    fn failed(&self, what: &str) -> HarnessError {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        HarnessError(format!(
            "nats-server {} {what}; log {}:\n{}",
            self.name,
            self.log.display(),
            tail.join("\n")
        ))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What [`Node::wait_until`] waits for.
#[derive(Clone, Copy)]
enum Probe {
    Ready,
    Current,
}

/// The address of a top-level `key: <IP>:<port>` line.
fn top_level_address(config: &str, key: &str) -> Option<SocketAddr> {
    config.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.trim_start().strip_prefix(':')?;
        value.trim().trim_matches('"').parse().ok()
    })
}

/// The child gets SIGKILL when the thread that started it dies (the test's, or the runtime's
/// worker), so no server outlives a test process that was killed or aborted.
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// How long [`Node::pause`] waits for every thread to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether every thread of `pid` is in the stopped state (`T` in `/proc/<pid>/task/*/stat`).
fn every_thread_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses and may hold both
            // spaces and parentheses itself: read it after the last ") ".
            stat.rsplit_once(") ")
                .is_some_and(|(_, fields)| fields.starts_with('T'))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_from_top_level_lines_only() {
        let config = "server_name: a\nlisten: 127.3.0.7:4222\nhttp: \"127.0.0.1:8222\"\n\
                      cluster {\n  listen: 127.0.0.1:6222\n}\n";
        let address = |text| top_level_address(config, text).map(|a| a.to_string());
        assert_eq!(address("listen").as_deref(), Some("127.3.0.7:4222"));
        assert_eq!(address("http").as_deref(), Some("127.0.0.1:8222"));
        assert_eq!(top_level_address("  listen: 127.0.0.1:1", "listen"), None);
        assert_eq!(top_level_address("listen: 127.0.0.1:x", "listen"), None);
        assert_eq!(top_level_address("listen: localhost:1", "listen"), None);
    }
}
