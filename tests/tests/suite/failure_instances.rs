//! Two orchestrator processes share the work under load; one is killed
//! (kill -9) and never comes back. The other finishes every saga, and no
//! saga is ever driven by both at once (the invariant checker finds no
//! command sent twice for one step, phase and attempt, and no effect
//! applied twice).

use std::time::Duration;

use saga_tests::{cluster::ClusterOptions, invariants::Expectations};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::failure_support::{
    SETTLE, cluster, expect_metric, history_entries, load, seed, summarise,
};

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

/// An instance that lost its database gives back the replies it was
/// delivered (it closes its consumer's channel) and consumes again once
/// the database is back; meanwhile the healthy instance applies them, so
/// no step times out (finding 4).
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
            max_orders: usize::MAX,
            compensating_share: 0.0,
            ..Default::default()
        },
        seed("orchestrator without its database"),
    );
    assert!(load.wait_started(10, Duration::from_secs(30)).await);
    expect_metric(
        &cluster.orchestrators[1],
        "saga_replies_applied_total",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    // The second instance loses its database for 30 s; the first and every
    // participant stay healthy, so nothing has a reason to time out.
    cluster.orchestrators[1].database.refuse();
    cluster
        .wait_health(1, ServingStatus::NotServing, Duration::from_secs(15))
        .await
        .expect("the second instance notices");
    expect_metric(
        &cluster.orchestrators[1],
        "saga_reply_consumer_pauses_total",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    // The outage's length is the fault, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(30)).await;
    cluster.orchestrators[1].database.pass();
    cluster
        .wait_health(1, ServingStatus::Serving, Duration::from_secs(30))
        .await
        .expect("the second instance serves again");
    let applied_before = saga_tests::cluster::Cluster::metric(
        &cluster.orchestrators[1],
        "saga_replies_applied_total",
    )
    .await
    .unwrap_or_default();
    // ... and consumes again.
    expect_metric(
        &cluster.orchestrators[1],
        "saga_replies_applied_total",
        applied_before + 1.0,
        Duration::from_secs(60),
    )
    .await;
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    cluster.wait_all_terminal(SETTLE).await;
    let timed_out = history_entries(&cluster, "step_timed_out").await;
    println!("orchestrator database refused 30s: steps timed out: {timed_out}");
    let summary = summarise("orchestrator database refused 30s", &mut cluster, &stats, 0).await;
    assert_eq!(
        timed_out, 0,
        "no step timed out: the held replies were given back"
    );
    assert_eq!(
        (summary.as_meant, summary.sagas),
        (stats.started.len(), stats.started.len()),
        "every order completes although one instance lost its database: {summary}"
    );
}

/// Two orchestrators under load are restarted one after the other
/// (SIGTERM, wait for the exit, start, wait until it serves): nothing is
/// lost, no StartSaga fails for good (a retry with the same key fixes any
/// that failed), and no saga waits long (the longest pause and the longest
/// saga are printed).
#[tokio::test]
async fn rolling_restart_of_two_orchestrators_under_load_loses_nothing() {
    let (_permit, mut cluster) = cluster(ClusterOptions {
        orchestrators: 2,
        ..ClusterOptions::default()
    })
    .await;
    let load = load(&cluster, usize::MAX, 6.0, seed("rolling restart"));
    assert!(load.wait_started(20, Duration::from_secs(60)).await);
    for i in 0..cluster.orchestrators.len() {
        let stopping = std::time::Instant::now();
        let process = &mut cluster.orchestrators[i].process;
        let pid = process.pid().expect("the orchestrator runs");
        let signalled = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(signalled.success());
        let status = process
            .wait_exit(Duration::from_secs(30))
            .await
            .expect("the orchestrator stops on SIGTERM");
        assert!(status.success(), "a clean exit: {status}");
        let stopped_in = stopping.elapsed();
        let ready_in = cluster
            .restart_orchestrator(i, &[])
            .await
            .expect("the orchestrator starts again");
        println!(
            "rolling restart: orchestrator-{} stopped in {stopped_in:.1?}, serving again {ready_in:.1?} after its start",
            i + 1
        );
        let started = load.started();
        assert!(
            load.wait_started(started + 20, Duration::from_secs(60))
                .await
        );
    }
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "no start failed for good: {stats:?}");
    cluster.wait_all_terminal(SETTLE).await;
    println!(
        "rolling restart: StartSaga calls retried with the same key: {}",
        stats.failed_calls
    );
    let summary = summarise("rolling restart", &mut cluster, &stats, 0).await;
    assert_eq!(
        (summary.sagas, summary.as_meant, summary.failed),
        (stats.started.len(), stats.started.len(), 0),
        "every order ends as meant through the restarts: {summary}"
    );
}
