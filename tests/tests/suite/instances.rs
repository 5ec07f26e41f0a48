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

#[tokio::test]
async fn watch_follows_a_saga_driven_by_another_instance() {
    use futures::StreamExt;
    let env = TestEnv::new();
    let driver = TestApp::spawn(&env, catalog(Duration::from_secs(30))).await;
    // Same database, another namespace: this instance never drives the saga,
    // so its stream can only learn of transitions through NOTIFY.
    let elsewhere = TestEnv::new();
    let mut watcher_config = config(&env);
    watcher_config.namespace = elsewhere.namespace.clone();
    let watcher = TestApp::spawn_with(watcher_config, catalog(Duration::from_secs(30))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(|c| {
            if c.step == "step_b" {
                Script::Hold
            } else {
                success(json!({}))
            }
        }),
    )
    .await;
    let id = driver.start(FOUR_STEPS, 0, order("o-watch")).await;
    saga_tests::eventually("step_b held", Duration::from_secs(10), || async {
        (participants.held_count() == 1).then_some(())
    })
    .await;
    let mut stream = watcher
        .client
        .clone()
        .watch_saga(saga_proto::v1::WatchSagaRequest {
            saga_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while !events
        .iter()
        .any(|e: &saga_proto::v1::SagaEvent| e.kind == "command_sent" && e.step == "step_b")
    {
        events.push(stream.next().await.unwrap().unwrap());
    }
    participants
        .release_held(saga_proto::amqp::ReplyStatus::Success, json!({}))
        .await;
    // Re-reads happen every 2 s without news; NOTIFY makes this much faster,
    // but the assertion is on content, not speed.
    while let Some(event) = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap()
    {
        events.push(event.unwrap());
    }
    assert_eq!(events.last().unwrap().kind, "saga_completed");
    assert!(events.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    let pool = driver.pool.clone();
    saga_tests::eventually(
        "the stream to remove its registration",
        Duration::from_secs(10),
        || {
            let pool = pool.clone();
            async move {
                let watchers: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_watchers")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                (watchers == 0).then_some(())
            }
        },
    )
    .await;
    participants.stop().await;
    watcher.stop().await;
    driver.stop().await;
}
