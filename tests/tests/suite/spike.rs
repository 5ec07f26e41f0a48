//! Traffic spikes: admission control refuses the starts beyond the limit
//! with RESOURCE_EXHAUSTED before anything is written, a client retrying
//! with its idempotency key ends with exactly one saga, and no admitted
//! saga is compensated or failed because the system was busy
//! (docs/RELIABILITY.md, "Traffic spikes").

use std::{collections::HashMap, sync::Arc, time::Duration};

use orchestrator::admission::Mode;
use saga_proto::v1::{SagaState, StartSagaRequest};
use saga_tests::{
    app::{self, TestApp},
    env::TestEnv,
    eventually,
    scripted::{ScriptedParticipant, success},
};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{FOUR_STEPS, catalog, compensations, order};

const PARTICIPANTS: [&str; 4] = ["alpha", "beta", "gamma", "delta"];

fn start(key: &str) -> StartSagaRequest {
    StartSagaRequest {
        saga_type: FOUR_STEPS.into(),
        input_json: order(key).to_string(),
        idempotency_key: key.into(),
        definition_version: 0,
    }
}

/// Sagas holding `key` (0 or 1: the key is unique per flow).
async fn sagas_with_key(app: &TestApp, key: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sagas WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Every saga ended COMPLETED, one per key, and no compensation was sent.
async fn assert_all_completed(app: &TestApp, participants: &ScriptedParticipant, keys: usize) {
    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM sagas GROUP BY status")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        by_status,
        vec![("completed".to_owned(), keys as i64)],
        "every admitted saga completed; none compensated or failed"
    );
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT idempotency_key) FROM sagas")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(distinct, keys as i64, "exactly one saga per key");
    assert!(
        compensations(&participants.received()).is_empty(),
        "no compensation was ever sent"
    );
}

#[tokio::test]
async fn a_start_beyond_the_limit_is_refused_with_a_hint_and_nothing_written_then_admitted_on_retry()
 {
    let env = TestEnv::new();
    let mut config = app::config(&env);
    config.admission = Mode::Fixed;
    config.max_in_flight = 10;
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(10))).await;

    // No participant answers yet: nothing admitted can end, so the limit
    // alone decides who gets in.
    let keys: Vec<String> = (0..40).map(|i| format!("spike-{i}")).collect();
    let answers = futures::future::join_all(keys.iter().map(|key| {
        let mut client = app.client.clone();
        let request = start(key);
        async move { client.start_saga(request).await }
    }))
    .await;
    let mut admitted = HashMap::new();
    let mut refused = Vec::new();
    for (key, answer) in keys.iter().zip(answers) {
        match answer {
            Ok(response) => {
                let response = response.into_inner();
                assert!(response.created);
                admitted.insert(key.clone(), response.saga_id);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{key}: {status:?}");
                assert!(
                    status.message().contains("at capacity")
                        && status.message().contains("nothing was written")
                        && status.message().contains("same idempotency key"),
                    "the message says what happened and what to do: {}",
                    status.message()
                );
                let hint = status
                    .get_details_retry_info()
                    .and_then(|info| info.retry_delay)
                    .expect("a RetryInfo in the status details");
                assert!(
                    (Duration::from_millis(100)..=Duration::from_secs(5)).contains(&hint),
                    "{hint:?}"
                );
                refused.push(key.clone());
            }
        }
    }
    assert!(
        !admitted.is_empty() && admitted.len() <= 10,
        "at most the limit is admitted: {}",
        admitted.len()
    );
    assert_eq!(admitted.len() + refused.len(), 40);
    for key in &refused {
        assert_eq!(
            sagas_with_key(&app, key).await,
            0,
            "{key} was refused: no row"
        );
    }
    let history_of_refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga_history h JOIN sagas s ON s.id = h.saga_id
          WHERE s.idempotency_key = ANY($1)",
    )
    .bind(&refused)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(history_of_refused, 0);

    // Capacity frees as the admitted sagas finish; each refused client
    // comes back with its key until it is let in.
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(|c| success(json!({"id": format!("{}-done", c.step)}))),
    )
    .await;
    for key in &refused {
        let id = eventually(&format!("{key} to be admitted"), app::WAIT, || {
            let mut client = app.client.clone();
            let request = start(key);
            async move {
                match client.start_saga(request).await {
                    Ok(response) => Some(response.into_inner().saga_id),
                    Err(status) => {
                        assert_eq!(status.code(), Code::ResourceExhausted);
                        None
                    }
                }
            }
        })
        .await;
        admitted.insert(key.clone(), id);
    }
    // Asking again with an admitted key names the same saga.
    let again = app
        .client
        .clone()
        .start_saga(start(&refused[0]))
        .await
        .map(|r| r.into_inner());
    if let Ok(again) = again {
        assert!(!again.created);
        assert_eq!(again.saga_id, admitted[&refused[0]]);
    }
    for id in admitted.values() {
        app.wait_for_state(id, SagaState::Completed).await;
    }
    assert_all_completed(&app, &participants, 40).await;
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_spike_far_above_the_limit_compensates_nothing_and_ends_with_one_saga_per_key() {
    let env = TestEnv::new();
    let mut config = app::config(&env);
    // The shipped default: the limit follows the measured latency.
    config.admission = Mode::Adaptive;
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(10))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(|c| success(json!({"id": format!("{}-done", c.step)}))),
    )
    .await;

    // 600 orders from 60 clients at once, each client retrying its order
    // with the same key after the hint: several times the starting limit.
    const CLIENTS: usize = 60;
    const PER_CLIENT: usize = 10;
    let clients = (0..CLIENTS).map(|c| {
        let app = &app;
        async move {
            let mut refusals = 0;
            let mut ids = Vec::new();
            for n in 0..PER_CLIENT {
                let key = format!("order-{c}-{n}");
                loop {
                    match app.client.clone().start_saga(start(&key)).await {
                        Ok(response) => {
                            ids.push(response.into_inner().saga_id);
                            break;
                        }
                        Err(status) => {
                            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                            // Refused: nothing was written for the key.
                            assert_eq!(sagas_with_key(app, &key).await, 0, "{key}");
                            refusals += 1;
                            let hint = status
                                .get_details_retry_info()
                                .and_then(|info| info.retry_delay)
                                .expect("a retry hint");
                            tokio::time::sleep(hint).await;
                        }
                    }
                }
            }
            (ids, refusals)
        }
    });
    let results = futures::future::join_all(clients).await;
    let refusals: usize = results.iter().map(|(_, r)| r).sum();
    let ids: Vec<String> = results.into_iter().flat_map(|(ids, _)| ids).collect();
    println!(
        "spike: {} orders, {refusals} starts refused for capacity and retried",
        ids.len()
    );
    assert_eq!(ids.len(), CLIENTS * PER_CLIENT);
    eventually("every saga to end", Duration::from_secs(300), || async {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sagas WHERE status IN ('running', 'compensating')",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (active == 0).then_some(())
    })
    .await;
    assert_all_completed(&app, &participants, CLIENTS * PER_CLIENT).await;
    participants.stop().await;
    app.stop().await;
}
