//! What the failure-injection suites share: how to launch the service
//! processes, a cluster per test, and a seed to replay random schedules.

use std::time::Duration;

use saga_tests::{
    cluster::{Cluster, ClusterOptions, Node},
    orders::{Fate, LoadSettings, OrderLoad, order},
    processes::{Launcher, Launchers},
};
use tokio::sync::SemaphorePermit;

/// How long a test waits for its system to settle at the end.
pub const SETTLE: Duration = Duration::from_secs(120);

/// The thin service binaries of this crate (built by `cargo test`).
pub fn launchers() -> Launchers {
    Launchers {
        orchestrator: Launcher::program(env!("CARGO_BIN_EXE_saga-orchestrator-proc")),
        participants: Launcher::program(env!("CARGO_BIN_EXE_saga-participant-proc")),
    }
}

/// A cluster for one test, started once no other process-heavy test runs
/// (hold the permit until the end of the test).
pub async fn cluster(options: ClusterOptions) -> (SemaphorePermit<'static>, Cluster) {
    let permit = saga_tests::cluster::heavy_permit().await;
    let cluster = Cluster::start(&launchers(), options)
        .await
        .expect("the cluster starts");
    (permit, cluster)
}

/// The seed of a test's random schedule: `SAGA_TEST_SEED` to replay one,
/// else a fresh one (printed, so a failure can be replayed).
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("SAGA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{test}: seed {seed} (replay with SAGA_TEST_SEED={seed})");
    seed
}

/// A steady load of `count` orders at `rate` per second over every
/// orchestrator of `cluster`.
pub fn load(cluster: &Cluster, count: usize, rate: f64, seed: u64) -> OrderLoad {
    OrderLoad::spawn(
        cluster.load_clients(),
        LoadSettings {
            rate_per_sec: rate,
            max_orders: count,
            ..LoadSettings::default()
        },
        seed,
    )
}

/// Starts `count` orders on orchestrator 0, alternating versions 1 and 2,
/// with the fates cycling through `fates`; returns the saga ids.
pub async fn start_orders(cluster: &Cluster, count: usize, fates: &[Fate]) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let (_, input) = order(fates[i % fates.len()]);
        let version = 1 + (i % 2) as u32;
        ids.push(
            cluster
                .start_order(0, version, input, "")
                .await
                .expect("StartSaga succeeds"),
        );
    }
    ids
}

/// Waits (bounded) until counter `name` of `node` reaches `at_least`: the
/// evidence that a fault really hit the recovery path under test.
pub async fn expect_metric(node: &Node, name: &str, at_least: f64, within: Duration) -> f64 {
    let deadline = std::time::Instant::now() + within;
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = Cluster::metric(node, name).await;
        if last.is_some_and(|v| v >= at_least) {
            return last.unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "{name} of {} stayed at {last:?}, expected at least {at_least}",
        node.process.name()
    );
}

/// History entries of `kind` over every saga.
pub async fn history_entries(cluster: &Cluster, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM saga_history WHERE kind = $1")
        .bind(kind)
        .fetch_one(&cluster.pool)
        .await
        .expect("read history")
}

/// How long a process may take to reach its crash point under load.
pub const CRASH_WITHIN: Duration = Duration::from_secs(60);

/// Waits until `node`'s process aborted (not killed, not exited otherwise),
/// with its log's tail if it never did.
pub async fn expect_aborted(node: &mut Node, point: &str) {
    let status = node
        .process
        .wait_exit(CRASH_WITHIN)
        .await
        .unwrap_or_else(|| {
            panic!(
                "{} never reached {point}; log:\n{}",
                node.process.name(),
                node.process.log_tail(20)
            )
        });
    assert!(
        saga_tests::processes::aborted(&status),
        "{point}: ended with {status}"
    );
}

/// Waits until orchestrator `i` aborted at `point` (and says so in its log).
pub async fn expect_orchestrator_crash(cluster: &mut Cluster, i: usize, point: &str) {
    let node = &mut cluster.orchestrators[i];
    expect_aborted(node, point).await;
    assert!(
        node.process.log_tail(50).contains("crash point reached"),
        "{point}: the log does not show the crash point"
    );
}

/// The end of an outage test, once every saga is terminal: reads how the
/// sagas of `stats` ended, prints the `outage summary:` line, stops the
/// cluster and runs the invariant checker (which must find nothing).
pub async fn summarise(
    name: &str,
    cluster: &mut Cluster,
    stats: &saga_tests::orders::LoadStats,
    operator_retries: usize,
) -> saga_tests::outage::OutageSummary {
    let summary =
        saga_tests::outage::OutageSummary::measure(&cluster.pool, stats, operator_retries)
            .await
            .expect("read the sagas' ends");
    println!("{name}: {summary}");
    let report = cluster
        .finish(&saga_tests::invariants::Expectations::default(), SETTLE)
        .await;
    println!("{name}: {report}");
    report.assert_ok();
    summary
}
