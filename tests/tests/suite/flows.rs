//! Saga outcomes through the real orchestrator with scripted participants.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use saga_proto::{
    amqp::{Phase, ReplyStatus},
    v1::{CancelSagaRequest, RetrySagaRequest, SagaState, StepState},
};
use saga_tests::{
    app::TestApp,
    env::TestEnv,
    eventually,
    scripted::{Script, ScriptedParticipant, rejected, success, transient},
};
use serde_json::json;

use crate::support::{FOUR_STEPS, catalog, compensations, is_action, order};

const PARTICIPANTS: [&str; 4] = ["alpha", "beta", "gamma", "delta"];

fn all_succeed() -> saga_tests::scripted::Behaviour {
    Arc::new(|c| success(json!({"id": format!("{}-done", c.step)})))
}

#[tokio::test]
async fn happy_path_completes_every_step_once() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let participants = ScriptedParticipant::start(&env, &PARTICIPANTS, all_succeed()).await;

    let id = app.start(FOUR_STEPS, 0, order("o-1")).await;
    let saga = app.wait_for_state(&id, SagaState::Completed).await;

    assert!(
        saga.steps
            .iter()
            .all(|s| s.state == StepState::Succeeded as i32 && s.attempts == 1)
    );
    let data: serde_json::Value = serde_json::from_str(&saga.data_json).unwrap();
    assert_eq!(
        data["results"],
        json!(["step_a-done", "step_b-done", "step_c-done", "step_d-done"])
    );
    let received = participants.received();
    let steps: Vec<_> = received.iter().map(|c| c.step.as_str()).collect();
    assert_eq!(steps, ["step_a", "step_b", "step_c", "step_d"]);
    assert!(
        received
            .iter()
            .all(|c| c.phase == Phase::Action && c.attempt == 1)
    );
    let history = app.history(&id).await;
    assert_eq!(history.last().unwrap().kind, "saga_completed");
    assert!(history.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    app.wait_for_empty_outbox().await;
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn business_rejection_compensates_in_reverse_order() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(|c| {
            if is_action(c, "step_d") {
                rejected("out of stock")
            } else {
                success(json!({}))
            }
        }),
    )
    .await;

    let id = app.start(FOUR_STEPS, 0, order("o-2")).await;
    let saga = app.wait_for_state(&id, SagaState::Compensated).await;

    assert_eq!(
        compensations(&participants.received()),
        ["step_c", "step_b", "step_a"]
    );
    let states: Vec<i32> = saga.steps.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [
            StepState::Compensated as i32,
            StepState::Compensated as i32,
            StepState::Compensated as i32,
            StepState::Failed as i32
        ]
    );
    assert!(
        saga.error.contains("step_d rejected: out of stock"),
        "{}",
        saga.error
    );
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn timeout_retries_with_the_same_key_then_compensates_the_timed_out_step() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_millis(300))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(|c| {
            if is_action(c, "step_b") {
                Script::Drop
            } else {
                success(json!({}))
            }
        }),
    )
    .await;

    let id = app.start(FOUR_STEPS, 0, order("o-3")).await;
    let saga = app.wait_for_state(&id, SagaState::Compensated).await;

    let received = participants.received();
    let b_attempts: Vec<_> = received.iter().filter(|c| is_action(c, "step_b")).collect();
    assert_eq!(b_attempts.len(), 3, "three deliveries of step_b");
    assert!(
        b_attempts
            .iter()
            .all(|c| c.idempotency_key == b_attempts[0].idempotency_key)
    );
    assert_eq!(
        b_attempts.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // The timed-out step is compensated too (outcome unknown), before step_a.
    assert_eq!(compensations(&received), ["step_b", "step_a"]);
    let b_comp = received
        .iter()
        .find(|c| c.step == "step_b" && c.phase == Phase::Compensation)
        .unwrap();
    assert_eq!(
        b_comp.compensates.as_deref(),
        Some(b_attempts[0].idempotency_key.as_str())
    );
    assert_eq!(saga.steps[1].state, StepState::Compensated as i32);
    assert_eq!(saga.steps[1].attempts, 3);
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn transient_errors_are_retried_with_backoff_until_success() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let counter = failures.clone();
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(move |c| {
            if is_action(c, "step_c") && counter.fetch_add(1, Ordering::SeqCst) < 2 {
                transient("database busy")
            } else {
                success(json!({}))
            }
        }),
    )
    .await;

    let id = app.start(FOUR_STEPS, 0, order("o-4")).await;
    let saga = app.wait_for_state(&id, SagaState::Completed).await;

    assert_eq!(saga.steps[2].attempts, 3);
    let history = app.history(&id).await;
    let retries: Vec<_> = history
        .iter()
        .filter(|e| e.kind == "retry_scheduled")
        .collect();
    assert_eq!(retries.len(), 2);
    assert!(compensations(&participants.received()).is_empty());
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn failing_compensation_fails_the_saga_and_operator_retry_finishes_it() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let broken = Arc::new(AtomicBool::new(true));
    let fault = broken.clone();
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(move |c| {
            if is_action(c, "step_c") {
                rejected("card declined")
            } else if c.step == "step_a"
                && c.phase == Phase::Compensation
                && fault.load(Ordering::SeqCst)
            {
                transient("inventory database down")
            } else {
                success(json!({}))
            }
        }),
    )
    .await;

    let id = app.start(FOUR_STEPS, 0, order("o-5")).await;
    let failed = app.wait_for_state(&id, SagaState::Failed).await;
    assert!(failed.error.contains("step_a"), "{}", failed.error);
    assert!(
        failed.error.contains("inventory database down"),
        "{}",
        failed.error
    );
    assert_eq!(failed.steps[0].state, StepState::Failed as i32);
    assert_eq!(failed.steps[0].compensation_attempts, 3);
    assert_eq!(failed.steps[1].state, StepState::Compensated as i32);

    // Visible to operators.
    let listed = app
        .client
        .clone()
        .list_sagas(saga_proto::v1::ListSagasRequest {
            state: SagaState::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sagas.len(), 1);
    assert_eq!(listed.sagas[0].saga_id, id);

    broken.store(false, Ordering::SeqCst);
    let resumed = app
        .client
        .clone()
        .retry_saga(RetrySagaRequest {
            saga_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.state, SagaState::Compensating as i32);
    let saga = app.wait_for_state(&id, SagaState::Compensated).await;
    assert_eq!(saga.steps[0].state, StepState::Compensated as i32);
    // step_b was compensated once, before the failure, and not again.
    let comps = compensations(&participants.received());
    assert_eq!(comps.iter().filter(|s| *s == "step_b").count(), 1);
    assert_eq!(comps.iter().filter(|s| *s == "step_a").count(), 4);
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn cancel_mid_flight_waits_for_the_step_in_flight_then_compensates() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(10))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(|c| {
            if is_action(c, "step_b") {
                Script::Hold
            } else {
                success(json!({}))
            }
        }),
    )
    .await;

    let id = app.start(FOUR_STEPS, 0, order("o-6")).await;
    eventually(
        "step_b to be in flight",
        Duration::from_secs(10),
        || async { (participants.held_count() == 1).then_some(()) },
    )
    .await;
    let cancelled = app
        .client
        .clone()
        .cancel_saga(CancelSagaRequest {
            saga_id: id.clone(),
            reason: "customer changed their mind".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, SagaState::Compensating as i32);
    // step_b is still in flight: nothing is compensated before it settles.
    assert!(compensations(&participants.received()).is_empty());
    participants
        .release_held(ReplyStatus::Success, json!({}))
        .await;

    let saga = app.wait_for_state(&id, SagaState::Compensated).await;
    assert_eq!(
        compensations(&participants.received()),
        ["step_b", "step_a"]
    );
    assert!(saga.error.contains("customer changed their mind"));
    assert!(!participants.received().iter().any(|c| c.step == "step_c"));

    // A second cancel is refused: the saga is already compensated.
    let again = app
        .client
        .clone()
        .cancel_saga(CancelSagaRequest {
            saga_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn duplicate_and_stale_replies_change_nothing() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(|_| Script::ReplyTwice(ReplyStatus::Success, json!({"id": "x"}), None)),
    )
    .await;

    let id = app.start(FOUR_STEPS, 0, order("o-7")).await;
    let saga = app.wait_for_state(&id, SagaState::Completed).await;
    assert!(saga.steps.iter().all(|s| s.attempts == 1));

    // A stale reply (an attempt that never existed) and a late one after the end.
    let command = participants.received()[0].clone();
    let reply_queue = env.topology().reply_queue();
    let mut stale = saga_tests::scripted::reply_to_command(
        &command,
        ReplyStatus::Rejected,
        json!(null),
        Some("late".into()),
    );
    stale.attempt = 7;
    saga_tests::scripted::publish_reply(participants.channel(), &reply_queue, &stale).await;
    let late = saga_tests::scripted::reply_to_command(
        &command,
        ReplyStatus::Rejected,
        json!(null),
        Some("late".into()),
    );
    saga_tests::scripted::publish_reply(participants.channel(), &reply_queue, &late).await;

    let pool = app.pool.clone();
    let saga_id: uuid::Uuid = id.parse().unwrap();
    eventually(
        "the late replies to be recorded",
        Duration::from_secs(10),
        || {
            let pool = pool.clone();
            async move {
                let ignored: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM saga_history WHERE saga_id = $1 AND kind = 'reply_ignored'",
            )
            .bind(saga_id)
            .fetch_one(&pool)
            .await
            .unwrap();
                // 4 duplicates + the stale and the late reply.
                (ignored == 6).then_some(())
            }
        },
    )
    .await;
    let after = app.get(&id).await;
    assert_eq!(after.state, SagaState::Completed as i32);
    assert_eq!(after.data_json, saga.data_json);
    assert_eq!(participants.received().len(), 4);
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn undecodable_reply_is_dead_lettered_and_the_queue_keeps_flowing() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let participants = ScriptedParticipant::start(&env, &PARTICIPANTS, all_succeed()).await;
    let topology = env.topology();
    saga_tests::scripted::publish_raw(
        participants.channel(),
        &topology.reply_queue(),
        b"{not json",
    )
    .await;
    saga_tests::scripted::publish_raw(
        participants.channel(),
        &topology.reply_queue(),
        br#"{"saga_id": 5}"#,
    )
    .await;

    let id = app.start(FOUR_STEPS, 0, order("o-8")).await;
    app.wait_for_state(&id, SagaState::Completed).await;

    let channel = participants.channel().clone();
    let dead = eventually("two dead letters", Duration::from_secs(10), || {
        let channel = channel.clone();
        let queue = topology.dead_letter_queue();
        async move {
            let queue = channel
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .ok()?;
            (queue.message_count() == 2).then_some(queue.message_count())
        }
    })
    .await;
    assert_eq!(dead, 2);
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn unroutable_command_waits_in_the_outbox_until_its_queue_exists() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(30))).await;
    let id = app.start(FOUR_STEPS, 0, order("o-9")).await;

    // No participant queue is bound yet: the command is returned and kept.
    let pool = app.pool.clone();
    eventually(
        "the unroutable command to be pushed back",
        Duration::from_secs(10),
        || {
            let pool = pool.clone();
            async move {
                let attempts: Option<i32> = sqlx::query_scalar(
                    "SELECT max(attempts) FROM outbox WHERE message_type = 'saga.command'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                attempts.filter(|a| *a >= 1)
            }
        },
    )
    .await;

    let participants = ScriptedParticipant::start(&env, &PARTICIPANTS, all_succeed()).await;
    app.wait_for_state(&id, SagaState::Completed).await;
    app.wait_for_empty_outbox().await;
    let step_a: Vec<_> = participants
        .received()
        .into_iter()
        .filter(|c| c.step == "step_a")
        .collect();
    assert_eq!(step_a.len(), 1, "delivered once, once a queue was there");
    participants.stop().await;
    app.stop().await;
}
