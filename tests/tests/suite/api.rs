//! The gRPC contract: error codes, idempotent start, listing, watching,
//! flow types and health.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use saga_proto::v1::{
    CancelSagaRequest, GetSagaRequest, ListSagaTypesRequest, ListSagasRequest, RetrySagaRequest,
    SagaState, StartSagaRequest, WatchSagaRequest,
};
use saga_tests::{
    app::TestApp,
    env::TestEnv,
    scripted::{Script, ScriptedParticipant, success},
};
use serde_json::json;
use tonic::Code;

use crate::support::{FOUR_STEPS, catalog, order, order_input};

fn start_request(saga_type: &str, input: &str) -> StartSagaRequest {
    StartSagaRequest {
        saga_type: saga_type.to_owned(),
        input_json: input.to_owned(),
        idempotency_key: String::new(),
        definition_version: 0,
    }
}

#[tokio::test]
async fn bad_requests_get_the_documented_codes_and_persist_nothing() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let mut client = app.client.clone();
    let valid = order_input("o-1").to_string();

    let cases: Vec<(StartSagaRequest, Code, &str)> = vec![
        (
            start_request("order_placement", "{not json"),
            Code::InvalidArgument,
            "input_json",
        ),
        (
            start_request(
                "order_placement",
                r#"{"order_id":"o","customer_id":"c","items":[{"sku":"a","quantity":"two","unit_price_cents":1}]}"#,
            ),
            Code::InvalidArgument,
            "input_json.items[0].quantity",
        ),
        (
            start_request(
                "order_placement",
                r#"{"order_id":"o","customer_id":"c","items":[{"sku":"a","quantity":1,"unit_price_cents":1}],"coupon":"x"}"#,
            ),
            Code::InvalidArgument,
            "input_json.coupon",
        ),
        (
            start_request(
                "order_placement",
                r#"{"order_id":"o","customer_id":"c","items":[]}"#,
            ),
            Code::InvalidArgument,
            "input_json.items",
        ),
        (
            start_request("", &valid),
            Code::InvalidArgument,
            "saga_type",
        ),
        (
            start_request(&"x".repeat(100), &valid),
            Code::InvalidArgument,
            "saga_type",
        ),
        (
            start_request(
                "order_placement",
                &format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000)),
            ),
            Code::InvalidArgument,
            "input_json",
        ),
        (
            StartSagaRequest {
                idempotency_key: "k".repeat(300),
                ..start_request("order_placement", &valid)
            },
            Code::InvalidArgument,
            "idempotency_key",
        ),
        (
            start_request("no_such_flow", &valid),
            Code::NotFound,
            "saga_type",
        ),
        (
            StartSagaRequest {
                definition_version: 9,
                ..start_request("order_placement", &valid)
            },
            Code::NotFound,
            "definition_version",
        ),
    ];
    for (request, code, field) in cases {
        let status = client.start_saga(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    let huge = StartSagaRequest {
        input_json: "x".repeat(2 * 1024 * 1024),
        ..start_request("order_placement", "")
    };
    assert_eq!(
        client.start_saga(huge).await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    for bad_id in ["", "not-a-uuid", &"9".repeat(5000)] {
        let status = client
            .get_saga(GetSagaRequest {
                saga_id: bad_id.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("saga_id"));
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        client
            .get_saga(GetSagaRequest {
                saga_id: unknown.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        client
            .cancel_saga(CancelSagaRequest {
                saga_id: unknown.clone(),
                reason: String::new()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        client
            .retry_saga(RetrySagaRequest {
                saga_id: unknown.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        client
            .watch_saga(WatchSagaRequest { saga_id: unknown })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        client
            .list_sagas(ListSagasRequest {
                page_token: "garbage!".into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        client
            .list_sagas(ListSagasRequest {
                state: 42,
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        client
            .list_sagas(ListSagasRequest {
                saga_type: "nope".into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing persisted for bad requests");
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(outbox, 0);
    app.stop().await;
}

#[tokio::test]
async fn cancel_and_retry_in_the_wrong_state_are_failed_precondition() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &["alpha", "beta", "gamma", "delta"],
        Arc::new(|_| success(json!({}))),
    )
    .await;
    let id = app.start(FOUR_STEPS, 0, order("o-1")).await;
    app.wait_for_state(&id, SagaState::Completed).await;
    let mut client = app.client.clone();
    let cancel = client
        .cancel_saga(CancelSagaRequest {
            saga_id: id.clone(),
            reason: "late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(cancel.code(), Code::FailedPrecondition);
    let retry = client
        .retry_saga(RetrySagaRequest {
            saga_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(retry.code(), Code::FailedPrecondition);
    assert!(
        retry.message().contains("only failed sagas"),
        "{}",
        retry.message()
    );
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn start_is_idempotent_even_when_concurrent() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let request = StartSagaRequest {
        idempotency_key: "checkout-42".into(),
        ..start_request(FOUR_STEPS, &order("o-1").to_string())
    };
    let calls = (0..16).map(|_| {
        let mut client = app.client.clone();
        let request = request.clone();
        async move { client.start_saga(request).await.unwrap().into_inner() }
    });
    let responses = futures::future::join_all(calls).await;
    let first = &responses[0].saga_id;
    assert!(responses.iter().all(|r| &r.saga_id == first));
    assert_eq!(responses.iter().filter(|r| r.created).count(), 1);
    let again = app
        .client
        .clone()
        .start_saga(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.saga_id.as_str(), again.created),
        (first.as_str(), false)
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    // The same key on another flow is another saga.
    let other = app
        .client
        .clone()
        .start_saga(StartSagaRequest {
            idempotency_key: "checkout-42".into(),
            ..start_request("order_placement", &order_input("o-1").to_string())
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.created);
    assert_ne!(&other.saga_id, first);
    app.stop().await;
}

/// Concurrent starts are written in groups (one statement and one commit
/// for whatever waits while a write runs). Each call still gets its own
/// answer: duplicates of a key within one group resolve to one saga, a bad
/// input in the burst is refused alone, every saga has its own history.
#[tokio::test]
async fn a_burst_of_starts_is_written_together_and_each_call_gets_its_own_answer() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    // Hold every insert until the burst is queued, so it forms groups.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE sagas IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let keyed = (0..24).flat_map(|i| [format!("burst-{i}"), format!("burst-{i}")]);
    let unkeyed = (0..8).map(|_| String::new());
    let calls = keyed.chain(unkeyed).enumerate().map(|(i, key)| {
        let mut client = app.client.clone();
        let request = StartSagaRequest {
            idempotency_key: key.clone(),
            ..start_request(FOUR_STEPS, &order(&format!("o-{i}")).to_string())
        };
        async move { (key, client.start_saga(request).await) }
    });
    let bad = (0..2).map(|_| {
        let mut client = app.client.clone();
        async move {
            client
                .start_saga(start_request(FOUR_STEPS, r#"{"order_id": 7}"#))
                .await
        }
    });
    let burst = tokio::spawn(futures::future::join_all(calls));
    // Bad input is refused before anything waits for the database.
    for refused in futures::future::join_all(bad).await {
        assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
    }
    // Both writers are blocked on the lock: the rest of the burst queues.
    let mut waiting = 0;
    for _ in 0..600 {
        waiting = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if waiting >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(waiting, 2, "both start writers wait for the lock");
    lock.commit().await.unwrap();

    let answers = burst.await.unwrap();
    let mut by_key: std::collections::HashMap<String, Vec<(String, bool)>> = Default::default();
    let mut unkeyed_ids = std::collections::HashSet::new();
    for (key, answer) in answers {
        let answer = answer.expect("every start succeeds").into_inner();
        if key.is_empty() {
            assert!(answer.created);
            assert!(
                unkeyed_ids.insert(answer.saga_id),
                "a saga id answered twice"
            );
        } else {
            by_key
                .entry(key)
                .or_default()
                .push((answer.saga_id, answer.created));
        }
    }
    assert_eq!(by_key.len(), 24);
    let mut ids: std::collections::HashSet<String> = unkeyed_ids;
    for (key, answers) in &by_key {
        assert_eq!(answers.len(), 2);
        assert_eq!(
            answers[0].0, answers[1].0,
            "both calls with {key} name one saga"
        );
        let created = answers.iter().filter(|(_, created)| *created).count();
        assert_eq!(created, 1, "exactly one call with {key} created it");
        assert!(ids.insert(answers[0].0.clone()), "{key}'s saga is its own");
    }
    assert_eq!(ids.len(), 32);
    let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT s.id, (SELECT count(*) FROM saga_history h
                       WHERE h.saga_id = s.id AND h.kind = 'saga_started') FROM sagas s",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        rows.len(),
        32,
        "one saga per key, one per keyless call, none for bad input"
    );
    for (id, started) in &rows {
        assert!(ids.contains(&id.to_string()), "saga {id} was answered");
        assert_eq!(*started, 1, "saga {id} has its own start in its history");
    }
    // History rows are never updated, so their xmin is the transaction of
    // the start: fewer transactions than sagas means starts were grouped.
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM saga_history WHERE kind = 'saga_started'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    println!("32 starts written in {transactions} transactions");
    assert!(transactions < 32, "starts were written in groups");
    for id in &ids {
        let saga = app
            .client
            .clone()
            .get_saga(GetSagaRequest {
                saga_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(saga.saga_type, FOUR_STEPS);
    }
    app.stop().await;
}

#[tokio::test]
async fn list_pages_newest_first_and_filters_by_type_and_state() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(30))).await;
    // No participants: every saga stays RUNNING.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.start(FOUR_STEPS, 0, order(&format!("o-{i}"))).await);
    }
    let placed = app.start("order_placement", 1, order_input("p-1")).await;
    let mut client = app.client.clone();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_sagas(ListSagasRequest {
                saga_type: FOUR_STEPS.into(),
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.sagas.len() <= 2);
        seen.extend(page.sagas.into_iter().map(|s| s.saga_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");

    let all = client
        .list_sagas(ListSagasRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.sagas.len(), 6);
    assert_eq!(all.sagas[0].saga_id, placed);
    let running = client
        .list_sagas(ListSagasRequest {
            state: SagaState::Running as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.sagas.len(), 6);
    let completed = client
        .list_sagas(ListSagasRequest {
            state: SagaState::Completed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(completed.sagas.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn watch_replays_history_then_streams_live_and_ends_at_the_terminal_event() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(10))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &["alpha", "beta", "gamma", "delta"],
        Arc::new(|c| {
            if c.step == "step_c" {
                Script::Hold
            } else {
                success(json!({}))
            }
        }),
    )
    .await;
    let id = app.start(FOUR_STEPS, 0, order("o-w")).await;
    saga_tests::eventually("step_c held", Duration::from_secs(10), || async {
        (participants.held_count() == 1).then_some(())
    })
    .await;
    let mut stream = app
        .client
        .clone()
        .watch_saga(WatchSagaRequest {
            saga_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    // Replayed history up to step_c's command.
    while events
        .iter()
        .all(|e: &saga_proto::v1::SagaEvent| !(e.kind == "command_sent" && e.step == "step_c"))
    {
        events.push(stream.next().await.unwrap().unwrap());
    }
    participants
        .release_held(saga_proto::amqp::ReplyStatus::Success, json!({}))
        .await;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap()
    {
        events.push(event.unwrap());
    }
    let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"saga_started"));
    assert_eq!(kinds.last(), Some(&"saga_completed"));
    assert_eq!(events.last().unwrap().state, SagaState::Completed as i32);
    assert!(
        events.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "no gaps, no repeats"
    );
    participants.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn types_health_and_reflection_are_served() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let types = app
        .client
        .clone()
        .list_saga_types(ListSagaTypesRequest {})
        .await
        .unwrap()
        .into_inner();
    let order_types: Vec<_> = types
        .saga_types
        .iter()
        .filter(|t| t.name == "order_placement")
        .collect();
    assert_eq!(order_types.len(), 2);
    let v2 = order_types.iter().find(|t| t.version == 2).unwrap();
    assert!(v2.latest);
    let steps: Vec<_> = v2
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.kind.as_str(), s.group))
        .collect();
    assert_eq!(
        steps,
        [
            ("reserve_inventory", "compensatable", 0),
            ("authorize_payment", "compensatable", 0),
            ("capture_payment", "pivot", 1),
            ("confirm_order", "retriable", 2)
        ]
    );

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "saga.v1.SagaService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    app.stop().await;
}
