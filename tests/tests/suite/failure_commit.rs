//! Commits whose outcome the client never learns: the fault proxy forwards
//! a `COMMIT`, swallows PostgreSQL's answer and cuts the connection. The
//! transaction is committed, the service sees a connection error. No step
//! may be done twice and no saga lost.

use std::time::{Duration, Instant};

use participants::demo::Service;
use saga_proto::v1::StartSagaRequest;
use saga_tests::{
    cluster::{Cluster, ClusterOptions, Node},
    invariants::Expectations,
    orders::{Fate, order},
};

use crate::failure_support::{SETTLE, cluster, history_entries, load, seed};

/// Most orders a load under lost commits starts (at 8/s, longer than any
/// wait below); it is stopped long before.
const LOAD_BOUND: usize = 1_500;

/// Waits (bounded) until `count` commits were cut on `node`'s database road.
async fn wait_commits_cut(node: &Node, count: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while node.database.stats().commits_cut < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} commits of {} were cut within {within:?}",
            node.database.stats().commits_cut,
            node.process.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn start_saga_whose_commit_is_lost_is_retried_into_the_same_saga() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let (order_id, input) = order(Fate::Completes);
    let request = StartSagaRequest {
        saga_type: "order_placement".into(),
        input_json: input,
        idempotency_key: order_id.clone(),
        definition_version: 2,
    };
    // The saga row is inserted by one autocommit statement (or in a
    // transaction: the cut then falls on its COMMIT); either way the client
    // never hears that it committed. Nothing else inserts sagas.
    cluster.orchestrators[0]
        .database
        .cut_after_statement("INSERT INTO sagas", 1);
    let lost = cluster
        .client(0)
        .start_saga(request.clone())
        .await
        .expect_err("the client never hears that the commit succeeded");
    assert_eq!(lost.code(), tonic::Code::Unavailable, "{lost:?}");
    assert_eq!(cluster.orchestrators[0].database.stats().commits_cut, 1);

    let again = retry_start(&cluster, &request).await;
    assert!(!again.created, "the first attempt did commit");
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM sagas WHERE idempotency_key = $1")
            .bind(&order_id)
            .fetch_all(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(stored, vec![again.saga_id.clone()], "exactly one saga");
    cluster.wait_all_terminal(SETTLE).await;
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("lost StartSaga commit: {report}");
    report.assert_ok();
}

/// The orchestrator answers again once its pool reconnected.
async fn retry_start(
    cluster: &Cluster,
    request: &StartSagaRequest,
) -> saga_proto::v1::StartSagaResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cluster.client(0).start_saga(request.clone()).await {
            Ok(response) => return response.into_inner(),
            Err(status) if Instant::now() < deadline => {
                tracing::info!(%status, "retrying StartSaga");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("StartSaga keeps failing: {status:?}"),
        }
    }
}

#[tokio::test]
async fn orchestrator_commits_lost_under_load_change_nothing() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    // The load must outlast the faults: each cut waits for statements the
    // load causes (a bounded load of 40 could be done, or nearly, before
    // the third start is cut, and the wait below then never ends). It is
    // stopped once 40 orders started and every cut happened; the bound
    // only keeps it finite.
    let load = load(&cluster, LOAD_BOUND, 8.0, seed("orchestrator commits lost"));
    assert!(load.wait_started(5, Duration::from_secs(30)).await);
    // Reply batches and timer sweeps (explicit transactions), whichever
    // commits next, then saga starts (one autocommit statement each).
    cluster.orchestrators[0].database.cut_after_commits(6);
    wait_commits_cut(&cluster.orchestrators[0], 6, Duration::from_secs(60)).await;
    cluster.orchestrators[0]
        .database
        .cut_after_statement("INSERT INTO sagas", 3);
    wait_commits_cut(&cluster.orchestrators[0], 9, Duration::from_secs(60)).await;
    assert!(load.wait_started(40, Duration::from_secs(120)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("orchestrator commits lost: {report}");
    report.assert_ok();
}

#[tokio::test]
async fn participant_commits_lost_under_load_change_nothing() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    // As above: the load outlasts the faults and is stopped after them.
    let load = load(&cluster, LOAD_BOUND, 8.0, seed("participant commits lost"));
    assert!(load.wait_started(5, Duration::from_secs(30)).await);
    let targets: Vec<usize> = [Service::Inventory, Service::Payment, Service::Orders]
        .iter()
        .map(|s| cluster.participant_index(*s))
        .collect();
    // Each participant commits its effect, inbox row and reply, then loses
    // the connection. It must not answer `transient_error` (which promises
    // nothing was applied): it asks its inbox again on a fresh connection
    // and answers the committed outcome (finding 5).
    for &i in &targets {
        cluster.participants[i].database.cut_after_commits(3);
    }
    for &i in &targets {
        wait_commits_cut(&cluster.participants[i], 3, Duration::from_secs(60)).await;
    }
    assert!(load.wait_started(40, Duration::from_secs(120)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    cluster.wait_all_terminal(SETTLE).await;
    let mut replayed = Vec::new();
    for &i in &targets {
        let node = &cluster.participants[i];
        replayed.push(
            Cluster::metric(node, "participant_commands_replayed_total")
                .await
                .unwrap_or_default(),
        );
        assert_eq!(
            Cluster::metric(node, "participant_commands_transient_total").await,
            Some(0.0),
            "{} answered transient_error for a commit it lost",
            node.process.name()
        );
    }
    let transient = history_entries(&cluster, "transient_error").await;
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("participant commits lost: {report}; replayed from the inbox: {replayed:?}");
    report.assert_ok();
    assert_eq!(transient, 0, "no saga saw a transient_error");
    for (&i, replayed) in targets.iter().zip(&replayed) {
        // At least one answer came from the inbox after a lost commit (a
        // replay's own commit can be the next one cut, so there may be
        // fewer replays than cuts).
        assert!(
            *replayed >= 1.0,
            "participant {i}: a lost commit is answered from the inbox ({replayed} replays)"
        );
    }
}
