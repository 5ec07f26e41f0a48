//! Restarts and several orchestrator instances on one database and broker.

use std::{collections::HashMap, sync::Arc, time::Duration};

use saga_proto::{amqp::Phase, v1::SagaState};
use saga_tests::{
    app::{TestApp, config},
    env::TestEnv,
    scripted::{Script, ScriptedParticipant, success},
};
use serde_json::json;

use crate::support::{FOUR_STEPS, catalog, order};

const PARTICIPANTS: [&str; 4] = ["alpha", "beta", "gamma", "delta"];

#[tokio::test]
async fn a_new_instance_finishes_what_a_stopped_one_started() {
    let env = TestEnv::new();
    let first = TestApp::spawn(&env, catalog(Duration::from_secs(2))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(|c| {
            if c.step == "step_b" && c.attempt == 1 {
                Script::Hold
            } else {
                success(json!({}))
            }
        }),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(first.start(FOUR_STEPS, 0, order(&format!("o-{i}"))).await);
    }
    saga_tests::eventually("every saga at step_b", Duration::from_secs(20), || async {
        (participants.held_count() == 5).then_some(())
    })
    .await;
    first.stop().await;

    // The held step_b commands are never answered: their timers fire in the
    // new instance, which retries them (same key) and goes on.
    let second = TestApp::spawn(&env, catalog(Duration::from_secs(2))).await;
    for id in &ids {
        let saga = second.wait_for_state(id, SagaState::Completed).await;
        assert_eq!(saga.steps[1].attempts, 2);
    }
    participants.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn two_instances_finish_every_saga_exactly_once() {
    let env = TestEnv::new();
    let a = TestApp::spawn(&env, catalog(Duration::from_secs(10))).await;
    let b = TestApp::spawn_with(config(&env), catalog(Duration::from_secs(10))).await;
    let participants =
        ScriptedParticipant::start(&env, &PARTICIPANTS, Arc::new(|_| success(json!({})))).await;

    let mut ids = Vec::new();
    for i in 0..40 {
        let app = if i % 2 == 0 { &a } else { &b };
        ids.push(app.start(FOUR_STEPS, 0, order(&format!("o-{i}"))).await);
    }
    for id in &ids {
        let saga = a.wait_for_state(id, SagaState::Completed).await;
        assert!(saga.steps.iter().all(|s| s.attempts == 1), "{saga:?}");
    }
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for command in participants.received() {
        assert_eq!(command.phase, Phase::Action);
        *per_key.entry(command.idempotency_key).or_default() += 1;
    }
    assert_eq!(per_key.len(), 40 * 4);
    assert!(
        per_key.values().all(|n| *n == 1),
        "every command delivered exactly once"
    );
    participants.stop().await;
    a.stop().await;
    b.stop().await;
}
