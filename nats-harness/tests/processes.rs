//! The harness against real nats-server processes: readiness, durability settings, and what
//! the failure tests do to nodes (kill, restart, pause, resume, drop).

use std::time::Duration;

use nats_harness::{NatsCluster, Node};

/// One test at a time: the harness picks free ports by binding port 0 and letting go, so two
/// tests starting nodes at once can pick the same port (one node then answers for the other),
/// and a cluster restarted on its old ports can find one taken. Seen once under load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn process_exists(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still have one.
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn a_single_node_is_ready_with_every_write_synced() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let nats = NatsCluster::single().await.unwrap();
    let node = &nats.nodes()[0];
    let jsz = node.monitor("/jsz").await.expect("/jsz answers");
    assert_eq!(jsz["config"]["sync_always"], true, "{jsz}");
    assert_eq!(nats.client_urls().len(), 1);
    // On a loopback address of its own, not 127.0.0.1, where other tests' servers bind.
    let ip = |nats: &NatsCluster| -> std::net::IpAddr {
        let url = &nats.client_urls()[0];
        let address = url.strip_prefix("nats://").and_then(|a| a.parse().ok());
        address.map(|a: std::net::SocketAddr| a.ip()).expect(url)
    };
    assert!(ip(&nats).is_loopback(), "{}", ip(&nats));
    assert_ne!(ip(&nats), std::net::Ipv4Addr::LOCALHOST);
    let other = NatsCluster::single().await.unwrap();
    assert_ne!(ip(&other), ip(&nats));
}

#[tokio::test]
async fn a_cluster_agrees_on_a_meta_leader_and_takes_a_killed_node_back() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut nats = NatsCluster::three().await.unwrap();
    let mut leaders = Vec::new();
    for node in nats.nodes() {
        leaders.push(
            node.meta_leader()
                .await
                .expect("each node knows the leader"),
        );
    }
    leaders.dedup();
    assert_eq!(leaders.len(), 1, "one meta leader: {leaders:?}");

    // A follower: killing the meta leader costs an election (seconds) that tests nothing here.
    let leader = leaders.pop().unwrap();
    let follower = ["n1", "n2", "n3"]
        .into_iter()
        .find(|name| *name != leader)
        .unwrap();
    let node = nats.node_named(follower).unwrap();
    let pid = node.pid().unwrap();
    node.kill();
    assert!(!process_exists(pid), "SIGKILL reaps the process");
    assert!(
        node.monitor("/jsz").await.is_none(),
        "a killed node answers nothing"
    );

    node.restart().await.unwrap();
    assert_ne!(node.pid(), Some(pid));
    node.wait_current().await.unwrap();
    assert_eq!(
        node.meta_leader().await,
        Some(leader),
        "back in the same cluster"
    );
}

#[tokio::test]
async fn a_cluster_started_with_an_environment_keeps_it_across_a_restart() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = [("GOMAXPROCS".to_owned(), "1".to_owned())];
    let mut nats = NatsCluster::three_with_env(&env).await.unwrap();
    // What the server's own runtime reports, not what was asked for.
    for node in nats.nodes() {
        let varz = node.monitor("/varz").await.expect("/varz answers");
        assert_eq!(varz["gomaxprocs"], 1, "{}: {varz}", node.name());
    }
    let node = &mut nats.nodes_mut()[2];
    node.restart().await.unwrap();
    let varz = node.monitor("/varz").await.expect("/varz answers");
    assert_eq!(varz["gomaxprocs"], 1, "after a restart: {varz}");
}

#[tokio::test]
async fn a_paused_node_answers_nothing_until_resumed() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut nats = NatsCluster::single().await.unwrap();
    let node = &mut nats.nodes_mut()[0];
    node.pause().unwrap();
    assert!(node.is_running(), "stopped, not gone");
    let probe = tokio::time::timeout(Duration::from_secs(10), node.monitor("/healthz")).await;
    assert_eq!(probe.unwrap(), None, "the monitor times out while stopped");
    node.resume().unwrap();
    node.wait_ready().await.unwrap();
}

#[tokio::test]
async fn dropping_the_handle_kills_every_process() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let nats = NatsCluster::three().await.unwrap();
    let pids: Vec<u32> = nats.nodes().iter().filter_map(Node::pid).collect();
    assert_eq!(pids.len(), 3);
    drop(nats);
    for pid in pids {
        assert!(!process_exists(pid), "pid {pid} outlived its handle");
    }
}

#[tokio::test]
async fn a_node_that_cannot_start_fails_with_its_log() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // Two nodes on one client port: the second cannot bind it.
    let single = NatsCluster::single().await.unwrap();
    let client = single.client_urls()[0].replace("nats://", "");
    let [http] = nats_harness::free_ports::<1>().unwrap();
    let config = format!("listen: {client}\nhttp: 127.0.0.1:{http}\n");
    let error = Node::start("clash", &config)
        .await
        .err()
        .expect("start fails");
    assert!(error.0.contains("nats-server clash exited"), "{error}");
    assert!(error.0.contains("address already in use"), "{error}");
}

#[tokio::test]
async fn a_cluster_killed_entirely_comes_back_on_the_same_ports() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut nats = NatsCluster::three().await.unwrap();
    let urls = nats.client_urls();
    nats.kill_all();
    for node in nats.nodes_mut() {
        assert!(!node.is_running());
    }
    nats.restart_all().await.unwrap();
    assert_eq!(nats.client_urls(), urls);
    for node in nats.nodes() {
        assert!(
            node.meta_leader().await.is_some(),
            "{} rejoined",
            node.name()
        );
    }
}
