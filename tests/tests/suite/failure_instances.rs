//! Two orchestrator processes share the work under load; one is killed
//! (kill -9) and never comes back. The other finishes every saga, and no
//! saga is ever driven by both at once (the invariant checker finds no
//! command sent twice for one step, phase and attempt, and no effect
//! applied twice).

use std::time::Duration;

use saga_tests::{cluster::ClusterOptions, invariants::Expectations};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::failure_support::{SETTLE, cluster, expect_metric, load, seed};

#[tokio::test]
async fn two_orchestrators_one_killed_under_load_the_other_finishes_everything() {
    let (_permit, mut cluster) = cluster(ClusterOptions {
        orchestrators: 2,
        ..ClusterOptions::default()
    })
    .await;
    let load = load(&cluster, 80, 10.0, seed("two orchestrators"));
    // Both instances take starts, replies and timers for a while ...
    assert!(load.wait_started(30, Duration::from_secs(60)).await);
    for node in &cluster.orchestrators {
        expect_metric(node, "saga_started_total", 1.0, Duration::from_secs(10)).await;
        expect_metric(
            node,
            "saga_replies_applied_total",
            1.0,
            Duration::from_secs(10),
        )
        .await;
    }
    // ... then one dies mid-flight, for good.
    cluster.orchestrators[1].process.kill().await;
    cluster.orchestrators[1].retired = true;
    assert!(cluster.health(1).await.is_none(), "the killed one is gone");
    assert!(load.wait_started(80, Duration::from_secs(120)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    assert_eq!(
        cluster.health(0).await,
        Some(ServingStatus::Serving),
        "the survivor serves"
    );
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("two orchestrators, one killed: {report}");
    assert_eq!(report.sagas, 80);
    report.assert_ok();
}

/// An instance that lost its database keeps the replies it was delivered
/// (unacknowledged, up to REPLY_PREFETCH) until it can apply them; the
/// healthy instance times those steps out and retries them, and the
/// participants answer the retries from their inbox.
#[tokio::test]
async fn an_orchestrator_without_its_database_stalls_no_saga() {
    let (_permit, mut cluster) = cluster(ClusterOptions {
        orchestrators: 2,
        ..ClusterOptions::default()
    })
    .await;
    // Only orders meant to complete, started on the healthy instance.
    let load = saga_tests::orders::OrderLoad::spawn(
        vec![cluster.load_clients().remove(0)],
        saga_tests::orders::LoadSettings {
            rate_per_sec: 4.0,
            max_orders: 120,
            compensating_share: 0.0,
            ..Default::default()
        },
        seed("orchestrator without its database"),
    );
    assert!(load.wait_started(10, Duration::from_secs(30)).await);
    // The second instance loses its database for 30 s; the first and every
    // participant stay healthy, so nothing has a reason to compensate.
    cluster.orchestrators[1].database.refuse();
    cluster
        .wait_health(1, ServingStatus::NotServing, Duration::from_secs(15))
        .await
        .expect("the second instance notices");
    assert!(load.wait_started(120, Duration::from_secs(60)).await);
    cluster.orchestrators[1].database.pass();
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("an orchestrator without its database: {report}");
    report.assert_ok();
    assert_eq!(
        (report.completed, report.compensated),
        (120, 0),
        "every order completes although one instance lost its database"
    );
}
