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
