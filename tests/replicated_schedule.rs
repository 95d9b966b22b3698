//! `--reconcile-every` in replicated mode, against real nats-server processes: each period of
//! a schedule runs on one replica (the first to create the period's key in the
//! `<stream>_SCHEDULE` bucket), not on every replica, and survivors keep it running when
//! replicas are stopped.

use crate::common;
use crate::reconcile::start;
use crate::replicas::replica_config;

use std::time::Duration;

use common::TestService;
use common::gameball_api::{API_KEY, GameballStandIn};
use nats_harness::NatsCluster;
use profile_state::config::ReconcileEvery;

/// The schedule's period: short, so that the test sees several periods.
const PERIOD: Duration = Duration::from_secs(1);

/// Reconcile jobs this replica finished, whatever their result.
async fn jobs_run(replica: &TestService) -> u64 {
    let (_, metrics) = replica.admin_get("/metrics").await;
    metrics
        .lines()
        .filter(|line| line.starts_with("profile_state_reconcile_jobs_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn total(replicas: &[&TestService]) -> u64 {
    let mut sum = 0;
    for replica in replicas {
        sum += jobs_run(replica).await;
    }
    sum
}

/// Jobs run by `replicas` during `periods` periods (time passing is what is measured here).
async fn runs_during(replicas: &[&TestService], periods: u32) -> u64 {
    let before = total(replicas).await;
    tokio::time::sleep(PERIOD * periods).await;
    total(replicas).await - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_period_runs_on_one_replica_and_survivors_take_over() {
    let nats = NatsCluster::three().await.unwrap();
    let stand_in = GameballStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        let mut config = replica_config(&nats, "SCHEDULED", name);
        config.reconcile.every = vec![ReconcileEvery {
            client_id: "2155".into(),
            period: PERIOD,
        }];
        replicas.push(start(config, dir.path(), &stand_in, API_KEY).await);
    }
    let all: Vec<&TestService> = replicas.iter().collect();
    // Warm-up: the first slot after start-up.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while total(&all).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled run at all"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Six periods: six runs in all (one more or less at the window's edges), not eighteen.
    let runs = runs_during(&all, 6).await;
    assert!(
        (5..=7).contains(&runs),
        "{runs} runs in 6 periods on 3 replicas"
    );

    // Two replicas stopped: the survivor runs every period itself.
    let c = replicas.pop().unwrap();
    let b = replicas.pop().unwrap();
    b.stop().await;
    c.stop().await;
    let a = replicas.pop().unwrap();
    let runs = runs_during(&[&a], 4).await;
    assert!(
        (3..=5).contains(&runs),
        "{runs} runs in 4 periods on the survivor"
    );
    a.stop().await;
}
