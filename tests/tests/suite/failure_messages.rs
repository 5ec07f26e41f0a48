//! Duplicate, reordered, stale and late messages with the real demo
//! participants: replies published twice, commands redelivered after the
//! saga ended, replies arriving after their timeout, after a cancel and
//! after the end, and a compensation that reaches its participant before
//! the action it undoes. None of them changes an outcome or applies an
//! effect twice.

use std::time::{Duration, Instant};

use participants::demo::Service;
use saga_proto::{
    amqp::{CommandMessage, Phase, ReplyMessage, ReplyStatus},
    v1::{CancelSagaRequest, SagaState},
};
use saga_tests::{
    cluster::{Cluster, ClusterOptions},
    inject::{Injector, order_command},
    invariants::Expectations,
    orders::{Fate, order},
};
use serde_json::json;
use uuid::Uuid;

use crate::failure_support::{SETTLE, cluster, expect_metric, history_entries, start_orders};

/// (id, version, status) of every saga.
async fn sagas(cluster: &Cluster) -> Vec<(Uuid, i32, String)> {
    sqlx::query_as("SELECT id, version, status FROM sagas ORDER BY id")
        .fetch_all(&cluster.pool)
        .await
        .expect("read sagas")
}

/// Waits (bounded) until there are at least `count` history entries of `kind`.
async fn wait_history(cluster: &Cluster, kind: &str, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = history_entries(cluster, kind).await;
        if seen >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{seen} {kind} entries, expected {count}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_state(cluster: &Cluster, saga_id: &str, state: SagaState) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let saga = cluster
            .client(0)
            .get_saga(saga_proto::v1::GetSagaRequest {
                saga_id: saga_id.to_owned(),
            })
            .await
            .expect("GetSaga")
            .into_inner();
        if saga.state == state as i32 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "saga {saga_id} is {:?}, expected {state:?}",
            saga.state
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn duplicated_replies_and_redelivered_commands_change_nothing() {
    let (_permit, mut cluster) = cluster(ClusterOptions {
        // Every participant publishes every reply twice.
        participant_env: vec![("FAULT_DUPLICATE_REPLY_RATE".into(), "1".into())],
        ..ClusterOptions::default()
    })
    .await;
    let fates = [
        Fate::Completes,
        Fate::Completes,
        Fate::InsufficientFunds,
        Fate::UnknownSku,
    ];
    start_orders(&cluster, 16, &fates).await;
    cluster.wait_all_terminal(SETTLE).await;
    // Each duplicated reply was recorded as ignored.
    let ignored = history_entries(&cluster, "reply_ignored").await;
    assert!(ignored >= 16, "only {ignored} duplicates ignored");

    // The broker redelivers each saga's first command after the end (same
    // key): the participant answers from its inbox, the orchestrator
    // ignores the answers.
    let before = sagas(&cluster).await;
    let injector = Injector::connect(cluster.env()).await.expect("broker");
    let replies = injector.topology().reply_queue();
    for (id, version, _) in &before {
        let command = order_command(
            *id,
            *version as u32,
            "reserve_inventory",
            Phase::Action,
            json!({}),
        );
        injector
            .command(&command, Some(&replies))
            .await
            .expect("published");
    }
    let inventory = cluster.participant_index(Service::Inventory);
    expect_metric(
        &cluster.participants[inventory],
        "participant_commands_replayed_total",
        before.len() as f64,
        Duration::from_secs(30),
    )
    .await;
    // Two (duplicated) answers per redelivered command.
    wait_history(&cluster, "reply_ignored", ignored + 2 * before.len() as i64).await;
    assert_eq!(sagas(&cluster).await, before, "no saga changed");
    injector.close().await;
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("duplicates: {report}");
    report.assert_ok();
}

#[tokio::test]
async fn replies_after_their_timeout_are_ignored() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let payment = cluster.participant_index(Service::Payment);
    // Payment's road is slow both ways: a round trip takes longer than the
    // 5 s reply timeout, so answers to attempt 1 arrive after attempt 2 was
    // sent. (3 s stays under the heartbeat's 8 s silence limit.)
    cluster.participants[payment]
        .broker
        .latency(Duration::from_secs(3));
    start_orders(&cluster, 6, &[Fate::Completes]).await;
    wait_history(&cluster, "step_timed_out", 1).await;
    cluster.participants[payment].broker.pass();
    cluster.wait_all_terminal(SETTLE).await;
    wait_history(&cluster, "reply_ignored", 1).await;
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("late replies: {report}");
    report.assert_ok();
}

#[tokio::test]
async fn replies_after_a_cancel_and_after_the_end_change_nothing() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let inventory = cluster.participant_index(Service::Inventory);
    cluster.participants[inventory]
        .broker
        .latency(Duration::from_secs(1));
    // Cancelled while their reservation is in flight: the reservation's
    // answer arrives after the cancel, and is then compensated.
    let mut cancelled = Vec::new();
    for _ in 0..5 {
        let (_, input) = order(Fate::Completes);
        let id = cluster.start_order(0, 1, input, "").await.expect("started");
        let saga = cluster
            .client(0)
            .cancel_saga(CancelSagaRequest {
                saga_id: id.clone(),
                reason: "customer changed their mind".into(),
            })
            .await
            .expect("cancel accepted")
            .into_inner();
        assert_eq!(saga.state, SagaState::Compensating as i32);
        cancelled.push(id);
    }
    for id in &cancelled {
        wait_state(&cluster, id, SagaState::Compensated).await;
    }
    cluster.participants[inventory].broker.pass();
    assert_eq!(history_entries(&cluster, "cancel_requested").await, 5);
    // Answers that arrived after the cancel (in time or not).
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga_history
         WHERE (kind = 'step_succeeded' AND detail = 'while compensating')
            OR kind IN ('reply_ignored', 'step_timed_out')",
    )
    .fetch_one(&cluster.pool)
    .await
    .expect("read history");
    assert!(late >= 5, "{late} answers after a cancel");

    start_orders(&cluster, 4, &[Fate::Completes]).await;
    cluster.wait_all_terminal(SETTLE).await;

    // Replies after the end, even ones that contradict what happened, only
    // add a reply_ignored entry.
    let before = sagas(&cluster).await;
    let ignored = history_entries(&cluster, "reply_ignored").await;
    let injector = Injector::connect(cluster.env()).await.expect("broker");
    for (id, _, _) in &before {
        for (step, status) in [
            ("reserve_inventory", ReplyStatus::Rejected),
            ("charge_payment", ReplyStatus::TransientError),
            ("confirm_order", ReplyStatus::Success),
        ] {
            injector
                .reply(&ReplyMessage {
                    saga_id: *id,
                    step: step.into(),
                    phase: Phase::Action,
                    attempt: 1,
                    idempotency_key: format!("{id}:{step}:action:1"),
                    status,
                    data: json!(null),
                    reason: Some("late".into()),
                })
                .await
                .expect("published");
        }
    }
    wait_history(&cluster, "reply_ignored", ignored + 3 * before.len() as i64).await;
    assert_eq!(sagas(&cluster).await, before, "no saga changed");
    injector.close().await;
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("after cancel and end: {report}");
    assert_eq!((report.completed, report.compensated), (4, 5));
    report.assert_ok();
}

/// Takes messages from `queue` until one satisfies `wanted`, keeping the
/// others; bounded by `within`.
async fn take_until(
    injector: &Injector,
    queue: &str,
    within: Duration,
    kept: &mut Vec<lapin::message::BasicGetMessage>,
    wanted: impl Fn(&CommandMessage) -> bool,
) -> lapin::message::BasicGetMessage {
    let deadline = Instant::now() + within;
    loop {
        if let Some(message) = injector.take(queue).await.expect("basic.get") {
            let command: CommandMessage =
                serde_json::from_slice(&message.delivery.data).expect("a command");
            if wanted(&command) {
                return message;
            }
            kept.push(message);
        }
        assert!(
            Instant::now() < deadline,
            "no wanted message in {queue} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_compensation_ahead_of_its_action_fences_the_late_action() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let injector = Injector::connect(cluster.env()).await.expect("broker");
    let inventory = cluster.participant_index(Service::Inventory);
    let queue = injector.topology().participant_queue("inventory");
    cluster.participants[inventory].process.kill().await;

    let (order_id, input) = order(Fate::Completes);
    let id = cluster.start_order(0, 1, input, "").await.expect("started");
    // The network holds the reservation back...
    let mut late = Vec::new();
    let first = take_until(&injector, &queue, Duration::from_secs(20), &mut late, |c| {
        c.phase == Phase::Action
    })
    .await;
    late.push(first);
    // ... the customer cancels; the reservation times out (outcome
    // unknown), so it is compensated; the compensation overtakes it.
    cluster
        .client(0)
        .cancel_saga(CancelSagaRequest {
            saga_id: id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .expect("cancel accepted");
    let compensation = take_until(&injector, &queue, Duration::from_secs(30), &mut late, |c| {
        c.phase == Phase::Compensation
    })
    .await;
    injector
        .to_queue(
            &queue,
            &compensation.delivery.data,
            compensation.delivery.properties.clone(),
        )
        .await
        .expect("republished");
    cluster
        .restart_participants(inventory, &[])
        .await
        .expect("restarts");
    wait_state(&cluster, &id, SagaState::Compensated).await;

    // Now the held reservation(s) arrive, late: refused, no effect.
    for message in &late {
        injector
            .to_queue(
                &queue,
                &message.delivery.data,
                message.delivery.properties.clone(),
            )
            .await
            .expect("republished");
    }
    expect_metric(
        &cluster.participants[inventory],
        "participant_commands_replayed_total",
        late.len() as f64,
        Duration::from_secs(30),
    )
    .await;
    let saga: Uuid = id.parse().expect("uuid");
    let fence: (String, Option<String>) =
        sqlx::query_as("SELECT kind, status FROM kit_inbox WHERE idempotency_key = $1")
            .bind(format!("{saga}:reserve_inventory:action:1"))
            .fetch_one(
                saga_tests::ledgers::DemoDatabases::connect(cluster.env())
                    .await
                    .inventory(),
            )
            .await
            .expect("the action key is fenced");
    assert_eq!(fence, ("barrier".into(), Some("rejected".into())));
    wait_history_for(&cluster, saga, "reply_ignored", late.len() as i64).await;

    // A canary proves the system still completes orders.
    let (_, input) = order(Fate::Completes);
    cluster.start_order(0, 2, input, "").await.expect("started");
    injector.close().await;
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("compensation before action (order {order_id}): {report}");
    report.assert_ok();
}

async fn wait_history_for(cluster: &Cluster, saga: Uuid, kind: &str, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM saga_history WHERE saga_id = $1 AND kind = $2",
        )
        .bind(saga)
        .bind(kind)
        .fetch_one(&cluster.pool)
        .await
        .expect("read history");
        if seen >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{seen} {kind} entries for {saga}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
