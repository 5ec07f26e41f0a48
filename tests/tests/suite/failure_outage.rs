//! Broker and database outages, simulated by the fault proxies between the
//! services and the shared servers (which are never touched): connections
//! cut and refused, traffic black-holed, latency added, for seconds to a
//! minute. Services reconnect, health goes NOT_SERVING and back, nothing is
//! lost and nothing is applied twice.

use std::time::{Duration, Instant};

use saga_tests::{
    cluster::{Cluster, ClusterOptions},
    invariants::Expectations,
    proxy::Mode,
};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::failure_support::{SETTLE, cluster, load, seed, summarise};

/// Which proxies an outage affects.
#[derive(Debug, Clone, Copy)]
enum Road {
    /// Every service's connection to RabbitMQ.
    Broker,
    /// The orchestrator's connection to PostgreSQL.
    OrchestratorDatabase,
    /// Every participant's connection to PostgreSQL.
    ParticipantDatabases,
    /// Every connection of every service.
    Everything,
}

fn set_mode(cluster: &Cluster, road: Road, mode: Mode) {
    for node in &cluster.orchestrators {
        if matches!(road, Road::Broker | Road::Everything) {
            node.broker.set_mode(mode);
        }
        if matches!(road, Road::OrchestratorDatabase | Road::Everything) {
            node.database.set_mode(mode);
        }
    }
    for node in &cluster.participants {
        if matches!(road, Road::Broker | Road::Everything) {
            node.broker.set_mode(mode);
        }
        if matches!(road, Road::ParticipantDatabases | Road::Everything) {
            node.database.set_mode(mode);
        }
    }
}

/// What an outage may cost.
#[derive(Debug, Clone, Copy)]
struct Cost {
    /// Health goes NOT_SERVING during the outage and SERVING after it.
    not_serving: bool,
    /// FAILED sagas may need an operator retry (an outage longer than a
    /// compensation's retry budget); otherwise none may.
    operator_retries: bool,
    /// At least this share of the run's sagas (in percent) ends as its
    /// order was meant to end: the outage cancels no order.
    as_meant_percent: f64,
}

impl Cost {
    /// An outage the sagas wait out: every order ends as meant, no operator.
    const WAITED_OUT: Self = Self {
        not_serving: true,
        operator_retries: false,
        as_meant_percent: 95.0,
    };
}

/// Runs a load, breaks `road` with `mode` for `length` in the middle of
/// it, heals, checks, and prints the `outage summary:` line. Returns the
/// recovery time (heal → SERVING).
async fn outage(name: &str, road: Road, mode: Mode, length: Duration, cost: Cost) -> Duration {
    let expect_not_serving = cost.not_serving;
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let seed = seed(name);
    let orders = 30 + (length.as_secs() as usize) * 2;
    let load = load(&cluster, orders, 4.0, seed);
    assert!(load.wait_started(10, Duration::from_secs(30)).await);

    let broken_at = Instant::now();
    set_mode(&cluster, road, mode);
    if expect_not_serving {
        let noticed = cluster
            .wait_health(0, ServingStatus::NotServing, length)
            .await
            .expect("health goes NOT_SERVING during the outage");
        println!("{name}: NOT_SERVING after {noticed:?}");
    }
    // The outage itself: its length is the fault, not a synchronisation.
    tokio::time::sleep(length.saturating_sub(broken_at.elapsed())).await;
    set_mode(&cluster, road, Mode::Pass);
    let recovery = cluster
        .wait_health(0, ServingStatus::Serving, Duration::from_secs(60))
        .await
        .expect("health goes SERVING again after the outage");
    println!("{name}: SERVING again {recovery:?} after healing");

    assert!(load.wait_started(orders, Duration::from_secs(120)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    cluster.wait_all_terminal(SETTLE).await;
    let retried = if cost.operator_retries {
        // An outage longer than a compensation's retry budget leaves sagas
        // FAILED; the operator retries them.
        cluster.operator_retry_failed(3, SETTLE).await.len()
    } else {
        0
    };
    let summary = summarise(name, &mut cluster, &stats, retried).await;
    assert_eq!(summary.sagas, stats.started.len(), "{summary}");
    assert!(
        summary.as_meant_percent() >= cost.as_meant_percent,
        "{name}: fewer than {}% of the orders ended as meant: {summary}",
        cost.as_meant_percent
    );
    recovery
}

#[tokio::test]
async fn broker_refused_then_restored() {
    outage(
        "broker refused 10s",
        Road::Broker,
        Mode::Refuse,
        Duration::from_secs(10),
        Cost::WAITED_OUT,
    )
    .await;
}

#[tokio::test]
async fn broker_black_holed_then_healed() {
    // Longer than two heartbeats (2 × 4 s): the silence is noticed.
    outage(
        "broker black-holed 15s",
        Road::Broker,
        Mode::BlackHole,
        Duration::from_secs(15),
        Cost::WAITED_OUT,
    )
    .await;
}

/// A minute without the broker cancels no order: step timers are held
/// while commands wait in the outbox and while the broker is out of reach,
/// so no retry budget is spent (finding 2).
#[tokio::test]
async fn broker_down_for_a_minute() {
    outage(
        "broker refused 60s",
        Road::Broker,
        Mode::Refuse,
        Duration::from_secs(60),
        Cost::WAITED_OUT,
    )
    .await;
}

/// Five minutes: longer than every retry budget put together.
#[tokio::test]
async fn broker_down_for_five_minutes() {
    outage(
        "broker refused 5min",
        Road::Broker,
        Mode::Refuse,
        Duration::from_secs(300),
        Cost::WAITED_OUT,
    )
    .await;
}

#[tokio::test]
async fn orchestrator_database_refused_then_restored() {
    outage(
        "orchestrator database refused 10s",
        Road::OrchestratorDatabase,
        Mode::Refuse,
        Duration::from_secs(10),
        Cost::WAITED_OUT,
    )
    .await;
}

#[tokio::test]
async fn orchestrator_database_black_holed_then_healed() {
    outage(
        "orchestrator database black-holed 15s",
        Road::OrchestratorDatabase,
        Mode::BlackHole,
        Duration::from_secs(15),
        Cost::WAITED_OUT,
    )
    .await;
}

/// A partition of the orchestrator's database: the connections that were
/// talking stay dead after the heal (no reset, no answer, for ever). The
/// deadlines notice it within seconds, the pool replaces every connection
/// opened before, and the orchestrator serves again at once after the heal
/// (finding 8; the recovery is printed).
#[tokio::test]
async fn orchestrator_database_partitioned_then_healed() {
    outage(
        "orchestrator database partitioned 15s",
        Road::OrchestratorDatabase,
        Mode::Partition,
        Duration::from_secs(15),
        Cost::WAITED_OUT,
    )
    .await;
}

/// The same for every service's broker connection: heartbeats notice the
/// silence, and each service opens a new connection after the heal.
#[tokio::test]
async fn broker_partitioned_then_healed() {
    outage(
        "broker partitioned 15s",
        Road::Broker,
        Mode::Partition,
        Duration::from_secs(15),
        Cost::WAITED_OUT,
    )
    .await;
}

/// Every participant's database partitioned: commands in flight are left
/// unanswered (their outcome is unknown), never answered `transient_error`
/// for an effect that may be applied; the orchestrator's timeouts retry
/// them and the sagas end as meant.
#[tokio::test]
async fn participant_databases_partitioned_then_healed() {
    outage(
        "participant databases partitioned 15s",
        Road::ParticipantDatabases,
        Mode::Partition,
        Duration::from_secs(15),
        Cost {
            not_serving: false,
            ..Cost::WAITED_OUT
        },
    )
    .await;
}

#[tokio::test]
async fn participant_databases_refused_then_restored() {
    outage(
        "participant databases refused 10s",
        Road::ParticipantDatabases,
        Mode::Refuse,
        Duration::from_secs(10),
        // Commands answer `transient_error` while the databases are away:
        // compensatable steps spend their budget and compensate (a pivot
        // keeps retrying); compensations may run out and need an operator.
        Cost {
            not_serving: false,
            operator_retries: true,
            as_meant_percent: 0.0,
        },
    )
    .await;
}

#[tokio::test]
async fn latency_on_every_connection() {
    outage(
        "300ms latency everywhere for 10s",
        Road::Everything,
        Mode::Latency(Duration::from_millis(300)),
        Duration::from_secs(10),
        Cost {
            not_serving: false,
            ..Cost::WAITED_OUT
        },
    )
    .await;
}

#[tokio::test]
async fn connections_cut_again_and_again() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let load = load(&cluster, 60, 6.0, seed("connections cut again and again"));
    assert!(load.wait_started(5, Duration::from_secs(30)).await);
    for round in 0..8 {
        for node in cluster.nodes() {
            match round % 3 {
                0 => node.broker.cut(),
                1 => node.broker.close_all(),
                _ => node.database.cut(),
            }
        }
        // Blips a second apart: the schedule of the fault.
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let cut: u64 = cluster
        .nodes()
        .map(|n| n.broker.stats().cut + n.database.stats().cut)
        .sum();
    assert!(cut >= 8, "connections were really cut ({cut})");
    cluster
        .wait_health(0, ServingStatus::Serving, Duration::from_secs(60))
        .await
        .expect("serves again");
    assert!(load.wait_started(60, Duration::from_secs(120)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("repeated cuts: {report}");
    report.assert_ok();
}
