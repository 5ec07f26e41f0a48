//! A compensation that fails for good: the inventory database goes away
//! between an order's reservation and its rollback, so `release` fails
//! until its retries run out. The saga becomes FAILED and shows in
//! ListSagas; once the database is back, RetrySaga brings it to
//! COMPENSATED, with every ledger back to zero.

use std::time::{Duration, Instant};

use participants::demo::Service;
use saga_proto::v1::{
    GetSagaRequest, ListSagasRequest, RetrySagaRequest, Saga, SagaState, StepState,
};
use saga_tests::{
    cluster::{Cluster, ClusterOptions},
    invariants::Expectations,
    orders::{Fate, order},
};

use crate::failure_support::{SETTLE, cluster, history_entries};

async fn get(cluster: &Cluster, id: &str) -> Saga {
    cluster
        .client(0)
        .get_saga(GetSagaRequest {
            saga_id: id.to_owned(),
        })
        .await
        .expect("GetSaga")
        .into_inner()
}

/// Waits (bounded) until `check` holds for saga `id`.
async fn wait_until(
    cluster: &Cluster,
    id: &str,
    what: &str,
    check: impl Fn(&Saga) -> bool,
) -> Saga {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let saga = get(cluster, id).await;
        if check(&saga) {
            return saga;
        }
        assert!(
            Instant::now() < deadline,
            "saga {id} never {what}: {saga:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn compensation_failing_for_good_fails_the_saga_until_an_operator_retries_it() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let payment = cluster.participant_index(Service::Payment);
    let inventory = cluster.participant_index(Service::Inventory);
    // Payment is down: the orders stop after their reservation.
    cluster.participants[payment].process.kill().await;
    let mut ids = Vec::new();
    for version in [1, 2] {
        let (_, input) = order(Fate::InsufficientFunds);
        ids.push(
            cluster
                .start_order(0, version, input, "")
                .await
                .expect("started"),
        );
    }
    for id in &ids {
        wait_until(&cluster, id, "reserved", |s| {
            s.steps.iter().any(|step| {
                step.name == "reserve_inventory" && step.state == StepState::Succeeded as i32
            })
        })
        .await;
    }
    // Now the inventory database goes away, and payment comes back and
    // refuses the payments: the reservations must be released, and cannot.
    cluster.participants[inventory].database.refuse();
    cluster
        .restart_participants(payment, &[])
        .await
        .expect("restarts");
    for id in &ids {
        let failed = wait_until(&cluster, id, "FAILED", |s| {
            s.state == SagaState::Failed as i32
        })
        .await;
        assert!(
            failed.error.contains("reserve_inventory"),
            "{}",
            failed.error
        );
        let step = failed
            .steps
            .iter()
            .find(|s| s.name == "reserve_inventory")
            .expect("the step");
        assert_eq!(step.state, StepState::Failed as i32, "{step:?}");
        assert_eq!(step.compensation_attempts, 8, "{step:?}");
    }
    // Visible to operators.
    let listed = cluster
        .client(0)
        .list_sagas(ListSagasRequest {
            state: SagaState::Failed as i32,
            ..Default::default()
        })
        .await
        .expect("ListSagas")
        .into_inner();
    let mut listed: Vec<String> = listed.sagas.into_iter().map(|s| s.saga_id).collect();
    listed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(listed, expected);

    // The fault is removed; the operator retries; the rollback finishes.
    cluster.participants[inventory].database.pass();
    for id in &ids {
        let resumed = cluster
            .client(0)
            .retry_saga(RetrySagaRequest {
                saga_id: id.clone(),
            })
            .await
            .expect("RetrySaga accepted")
            .into_inner();
        assert_eq!(resumed.state, SagaState::Compensating as i32);
    }
    for id in &ids {
        wait_until(&cluster, id, "COMPENSATED", |s| {
            s.state == SagaState::Compensated as i32
        })
        .await;
    }
    assert_eq!(history_entries(&cluster, "operator_retry").await, 2);
    assert_eq!(history_entries(&cluster, "saga_failed").await, 2);

    // A canary proves the system completes orders again.
    let (_, input) = order(Fate::Completes);
    cluster.start_order(0, 0, input, "").await.expect("started");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("failed compensation: {report}");
    assert_eq!((report.completed, report.compensated), (1, 2));
    report.assert_ok();
}
