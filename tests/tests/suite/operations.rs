//! Operator tools over the API: finding sagas by search attribute,
//! idempotency key and time; retrying every FAILED saga of a filter; and
//! the dead-letter queue (list, requeue, discard), with their bad input.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use saga_proto::{
    amqp::{Phase, declare},
    v1::{
        DeadLetterSelection, ListDeadLettersRequest, ListSagaTypesRequest, ListSagasRequest,
        RetryFailedSagasRequest, RetryProgress, SagaState, StartSagaRequest,
    },
};
use saga_tests::{
    app::TestApp,
    env::TestEnv,
    eventually,
    inject::{Injector, PoisonTarget, order_command},
    scripted::{ScriptedParticipant, rejected, success, transient},
};
use serde_json::json;
use tonic::Code;

use crate::support::{FOUR_STEPS, catalog, order};

const PARTICIPANTS: [&str; 4] = ["alpha", "beta", "gamma", "delta"];

fn attributes(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ids(page: &saga_proto::v1::ListSagasResponse) -> Vec<String> {
    page.sagas.iter().map(|s| s.saga_id.clone()).collect()
}

#[tokio::test]
async fn sagas_are_found_by_attribute_key_and_time_and_bad_filters_are_named() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let participants =
        ScriptedParticipant::start(&env, &PARTICIPANTS, Arc::new(|_| success(json!({})))).await;
    let mut client = app.client.clone();
    let first = app.start(FOUR_STEPS, 0, order("o-1")).await;
    let second = client
        .start_saga(StartSagaRequest {
            saga_type: FOUR_STEPS.into(),
            input_json: order("o-2").to_string(),
            idempotency_key: "checkout-2".into(),
            definition_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id;
    let third = app.start(FOUR_STEPS, 0, order("o-3")).await;

    // The attribute is stored at start and shown with the saga.
    let shown = app.get(&second).await;
    assert_eq!(shown.search_attributes, attributes(&[("order", "o-2")]));
    let types = client
        .list_saga_types(ListSagaTypesRequest {})
        .await
        .unwrap()
        .into_inner();
    let placement = types
        .saga_types
        .iter()
        .find(|t| t.name == "order_placement")
        .unwrap();
    assert_eq!(placement.search_attributes, ["order_id", "customer_id"]);

    let list = |request: ListSagasRequest| {
        let mut client = client.clone();
        async move { client.list_sagas(request).await.map(|r| r.into_inner()) }
    };
    // One call finds the saga of an order.
    let found = list(ListSagasRequest {
        attributes: attributes(&[("order", "o-2")]),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&found), [second.as_str()]);
    let none = list(ListSagasRequest {
        attributes: attributes(&[("order", "o-404")]),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(none.sagas.is_empty());
    let by_key = list(ListSagasRequest {
        saga_type: FOUR_STEPS.into(),
        idempotency_key: "checkout-2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&by_key), [second.as_str()]);

    // A time range: from the second saga's creation (inclusive), and
    // before it (exclusive).
    let at = shown.created_at.unwrap();
    let since = list(ListSagasRequest {
        saga_type: FOUR_STEPS.into(),
        created_after: Some(at),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&since), [third.clone(), second.clone()]);
    let before = list(ListSagasRequest {
        saga_type: FOUR_STEPS.into(),
        created_before: Some(at),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&before), [first.as_str()]);
    // Filters combine, and page with their token.
    let page = list(ListSagasRequest {
        saga_type: FOUR_STEPS.into(),
        definition_version: 1,
        page_size: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&page), [third.as_str()]);
    let next = list(ListSagasRequest {
        saga_type: FOUR_STEPS.into(),
        definition_version: 1,
        page_size: 5,
        page_token: page.next_page_token.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&next), [second.clone(), first.clone()]);

    // Bad filters: the field is named, nothing is listed.
    let bad: Vec<(ListSagasRequest, Code, &str)> = vec![
        (
            ListSagasRequest {
                attributes: attributes(&[("colour", "red")]),
                ..Default::default()
            },
            Code::InvalidArgument,
            "attributes.colour",
        ),
        (
            ListSagasRequest {
                saga_type: FOUR_STEPS.into(),
                attributes: attributes(&[("order_id", "o-1")]),
                ..Default::default()
            },
            Code::InvalidArgument,
            "attributes.order_id",
        ),
        (
            ListSagasRequest {
                created_after: Some(at),
                created_before: Some(at),
                ..Default::default()
            },
            Code::InvalidArgument,
            "created_before",
        ),
        (
            ListSagasRequest {
                created_after: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 2_000_000_000,
                }),
                ..Default::default()
            },
            Code::InvalidArgument,
            "created_after",
        ),
        (
            ListSagasRequest {
                definition_version: 1,
                ..Default::default()
            },
            Code::InvalidArgument,
            "definition_version",
        ),
        (
            ListSagasRequest {
                saga_type: FOUR_STEPS.into(),
                definition_version: 7,
                ..Default::default()
            },
            Code::NotFound,
            "definition_version",
        ),
    ];
    for (request, code, field) in bad {
        let status = list(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{request:?}: {}",
            status.message()
        );
    }

    // A start whose searchable field cannot be searched is refused with
    // nothing written.
    let status = app
        .client
        .clone()
        .start_saga(StartSagaRequest {
            saga_type: FOUR_STEPS.into(),
            input_json: json!({"order": "x".repeat(300)}).to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("input_json.order"),
        "{status:?}"
    );
    let all = list(ListSagasRequest::default()).await.unwrap();
    assert_eq!(all.sagas.len(), 3);
    participants.stop().await;
    app.stop().await;
}

async fn retry_all(
    app: &TestApp,
    request: RetryFailedSagasRequest,
) -> Result<Vec<RetryProgress>, tonic::Status> {
    let mut stream = app
        .client
        .clone()
        .retry_failed_sagas(request)
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while let Some(progress) = stream.next().await {
        seen.push(progress?);
    }
    Ok(seen)
}

#[tokio::test]
async fn bulk_retry_retries_exactly_the_failed_sagas_of_its_filter() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    // step_c is refused, and step_a's compensation fails while `broken`:
    // every saga ends FAILED until the fault is repaired.
    let broken = Arc::new(AtomicBool::new(true));
    let fault = broken.clone();
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(move |c| {
            if c.step == "step_c" && c.phase == Phase::Action {
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
    let mut failed = Vec::new();
    for n in 1..=4 {
        failed.push(app.start(FOUR_STEPS, 0, order(&format!("b-{n}"))).await);
    }
    for id in &failed {
        app.wait_for_state(id, SagaState::Failed).await;
    }
    broken.store(false, Ordering::SeqCst);

    // Bad requests change nothing.
    for (request, field) in [
        (RetryFailedSagasRequest::default(), "saga_type"),
        (
            RetryFailedSagasRequest {
                saga_type: FOUR_STEPS.into(),
                rate_per_second: 10_000,
                ..Default::default()
            },
            "rate_per_second",
        ),
        (
            RetryFailedSagasRequest {
                saga_type: FOUR_STEPS.into(),
                attributes: attributes(&[("colour", "red")]),
                ..Default::default()
            },
            "attributes.colour",
        ),
    ] {
        let status = retry_all(&app, request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
    for id in &failed {
        assert_eq!(app.get(id).await.state, SagaState::Failed as i32);
    }

    // First one order only, then the rest: the first is not FAILED any
    // more, so the second run neither counts nor retries it again.
    let one = retry_all(
        &app,
        RetryFailedSagasRequest {
            saga_type: FOUR_STEPS.into(),
            attributes: attributes(&[("order", "b-1")]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let last = one.last().unwrap();
    assert!(last.done);
    assert_eq!((last.matched, last.retried, last.failed), (1, 1, 0));
    app.wait_for_state(&failed[0], SagaState::Compensated).await;
    let rest = retry_all(
        &app,
        RetryFailedSagasRequest {
            saga_type: FOUR_STEPS.into(),
            rate_per_second: 50,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let last = rest.last().unwrap();
    assert!(last.done, "{rest:?}");
    assert_eq!(
        (last.matched, last.retried, last.skipped, last.failed),
        (3, 3, 0, 0),
        "{last:?}"
    );
    for id in &failed {
        app.wait_for_state(id, SagaState::Compensated).await;
        // One operator retry each, recorded with who asked.
        let retries: Vec<_> = app
            .history(id)
            .await
            .into_iter()
            .filter(|e| e.kind == "operator_retry")
            .collect();
        assert_eq!(retries.len(), 1, "{id}: {retries:?}");
        assert!(!retries[0].principal.is_empty());
    }
    participants.stop().await;
    app.stop().await;
}

async fn dead_letters(app: &TestApp) -> saga_proto::v1::ListDeadLettersResponse {
    app.client
        .clone()
        .list_dead_letters(ListDeadLettersRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn dead_letters_are_listed_requeued_once_confirmed_and_discarded() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let injector = Injector::connect(&env).await.unwrap();
    // alpha's queue, with nobody consuming yet.
    let connection = env.amqp_connection().await.unwrap();
    let setup = connection.create_channel().await.unwrap();
    declare::participant(&setup, injector.topology(), "alpha")
        .await
        .unwrap();
    let alpha = injector.topology().participant_queue("alpha");

    // A good command rejected once (as a participant rejects what it cannot
    // handle) lies in the dead-letter queue.
    let saga = uuid::Uuid::now_v7();
    let mut command = order_command(saga, 1, "step_a", Phase::Action, json!({"order": "d-1"}));
    command.participant = "alpha".into();
    command.saga_type = FOUR_STEPS.into();
    command.idempotency_key = format!("{saga}:step_a:action:1");
    injector.command(&command, None).await.unwrap();
    eventually(
        "the command to be rejected",
        Duration::from_secs(10),
        || async { injector.reject_one(&alpha).await.unwrap().then_some(()) },
    )
    .await;
    let listed = eventually("the dead letter", Duration::from_secs(10), || async {
        let listed = dead_letters(&app).await;
        (listed.depth == 1).then_some(listed)
    })
    .await;
    let letter = &listed.dead_letters[0];
    assert_eq!(letter.original_queue, alpha);
    assert_eq!(letter.reason, "rejected");
    assert_eq!(letter.death_count, 1);
    assert_eq!(letter.message_type, "saga.command");
    assert_eq!(letter.saga_id, saga.to_string());
    assert_eq!(letter.step, "step_a");
    assert!(letter.first_death_at.is_some());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&letter.body).unwrap(),
        serde_json::to_value(&command).unwrap()
    );
    // Listing removed nothing.
    assert_eq!(dead_letters(&app).await.depth, 1);

    // Ids that are not there: NOT_FOUND naming them, nothing changed.
    let mut client = app.client.clone();
    let status = client
        .requeue_dead_letters(DeadLetterSelection {
            ids: vec![letter.id.clone(), "gone".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("gone"), "{status:?}");
    for (ids, field) in [(vec![], "ids"), (vec!["a\nb".to_owned()], "ids")] {
        let status = client
            .discard_dead_letters(DeadLetterSelection { ids })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{status:?}");
    }
    assert_eq!(dead_letters(&app).await.depth, 1);
    assert_eq!(injector.queue_counts(&alpha).await.unwrap().0, 0);

    // Requeued: back in alpha's queue, gone from the dead letters, and
    // consumed by alpha once it runs.
    let outcome = client
        .requeue_dead_letters(DeadLetterSelection {
            ids: vec![letter.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome.messages, 1);
    assert_eq!(dead_letters(&app).await.depth, 0);
    let participants =
        ScriptedParticipant::start(&env, &["alpha"], Arc::new(|_| success(json!({})))).await;
    eventually(
        "alpha to get the requeued command",
        Duration::from_secs(10),
        || async {
            participants
                .received()
                .iter()
                .any(|c| c.idempotency_key == command.idempotency_key)
                .then_some(())
        },
    )
    .await;
    let again = client
        .requeue_dead_letters(DeadLetterSelection {
            ids: vec![letter.id.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    // Poison is discarded for good.
    injector
        .poison(PoisonTarget::Replies, b"{not json")
        .await
        .unwrap();
    let poison = eventually(
        "the poison's dead letter",
        Duration::from_secs(10),
        || async {
            let listed = dead_letters(&app).await;
            listed.dead_letters.first().cloned()
        },
    )
    .await;
    assert_eq!(poison.saga_id, "");
    let outcome = client
        .discard_dead_letters(DeadLetterSelection {
            ids: vec![poison.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome.messages, 1);
    assert_eq!(dead_letters(&app).await.depth, 0);
    participants.stop().await;
    app.stop().await;
}

/// Runs sagactl against `app`; returns (exit code, stdout, stderr).
async fn sagactl(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagactl-under-test"))
        .arg("--addr")
        .arg(format!("http://{}", app.addr))
        .args(args)
        .output()
        .await
        .expect("sagactl runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn sagactl_finds_an_order_retries_every_failed_saga_and_replays_a_dead_letter() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, catalog(Duration::from_secs(5))).await;
    let broken = Arc::new(AtomicBool::new(true));
    let fault = broken.clone();
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(move |c| {
            if c.step == "step_c" && c.phase == Phase::Action {
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
    let first = app.start(FOUR_STEPS, 0, order("c-1")).await;
    let second = app.start(FOUR_STEPS, 0, order("c-2")).await;
    for id in [&first, &second] {
        app.wait_for_state(id, SagaState::Failed).await;
    }

    // Found by its order.
    let (code, out, err) = sagactl(&app, &["--json", "list", "--attr", "order=c-2"]).await;
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sagas = listed["sagas"].as_array().unwrap();
    assert_eq!(sagas.len(), 1, "{out}");
    assert_eq!(sagas[0]["saga_id"], second.as_str());
    assert_eq!(sagas[0]["search_attributes"]["order"], "c-2");
    // Bad filters: named, exit 1 from the server, exit 2 from the command line.
    let (code, _, err) = sagactl(&app, &["list", "--attr", "colour=red"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("attributes.colour"), "{err}");
    let (code, _, err) = sagactl(&app, &["list", "--created-after", "yesterday"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, err) = sagactl(&app, &["retry", "--all-failed"]).await;
    assert_eq!(code, 2, "--all-failed needs --type: {err}");

    // Every FAILED saga of the flow, retried.
    broken.store(false, Ordering::SeqCst);
    let (code, out, err) = sagactl(
        &app,
        &["--json", "retry", "--all-failed", "--type", FOUR_STEPS],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(
        (last["matched"].as_u64(), last["retried"].as_u64()),
        (Some(2), Some(2))
    );
    for id in [&first, &second] {
        app.wait_for_state(id, SagaState::Compensated).await;
    }

    // A dead letter, listed, then requeued by id.
    let injector = Injector::connect(&env).await.unwrap();
    let beta = injector.topology().participant_queue("beta");
    participants.stop().await;
    injector
        .to_queue(
            &beta,
            br#"{"saga_id": "00000000-0000-7000-8000-000000000001", "step": "step_b"}"#,
            lapin::BasicProperties::default().with_message_id("cli-letter".into()),
        )
        .await
        .unwrap();
    eventually(
        "the message to be rejected",
        Duration::from_secs(10),
        || async { injector.reject_one(&beta).await.unwrap().then_some(()) },
    )
    .await;
    eventually("the dead letter", Duration::from_secs(10), || async {
        (dead_letters(&app).await.depth == 1).then_some(())
    })
    .await;
    let (code, out, err) = sagactl(&app, &["dead-letters", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cli-letter") && out.contains(&beta), "{out}");
    let (code, out, _) = sagactl(&app, &["dead-letters", "show", "cli-letter"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("step_b"), "{out}");
    let (code, _, err) = sagactl(&app, &["dead-letters", "requeue", "cli-letter", "gone"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("gone") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(dead_letters(&app).await.depth, 1);
    let (code, out, err) = sagactl(&app, &["dead-letters", "requeue", "cli-letter"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requeued 1 message"), "{out}");
    assert_eq!(dead_letters(&app).await.depth, 0);
    assert_eq!(injector.queue_counts(&beta).await.unwrap().0, 1);
    let (code, _, _) = sagactl(&app, &["dead-letters", "discard", "cli-letter"]).await;
    assert_eq!(code, 1, "it is not a dead letter any more");
    app.stop().await;
}

/// Rows of `table` for `saga`.
async fn rows_of(app: &TestApp, table: &str, saga: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE {} = $1::uuid",
        if table == "sagas" { "id" } else { "saga_id" }
    ))
    .bind(saga)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn retention_deletes_finished_sagas_with_their_rows_and_never_failed_or_running_ones() {
    let env = TestEnv::new();
    let mut config = saga_tests::app::config(&env);
    // Finished sagas go at the next sweep.
    config.retention = orchestrator::config::Retention(Some(Duration::ZERO));
    config.retention_interval = Duration::from_millis(100);
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;
    let participants = ScriptedParticipant::start(
        &env,
        &PARTICIPANTS,
        Arc::new(|c| {
            let order = c.payload["order"].as_str().unwrap_or_default().to_owned();
            if order == "r-fail" && c.step == "step_c" && c.phase == Phase::Action {
                rejected("card declined")
            } else if order == "r-fail" && c.step == "step_a" && c.phase == Phase::Compensation {
                transient("inventory database down")
            } else if order == "r-hold" && c.step == "step_b" && c.phase == Phase::Action {
                saga_tests::scripted::Script::Hold
            } else {
                success(json!({}))
            }
        }),
    )
    .await;
    let mut client = app.client.clone();
    let start = |order_id: &str, key: &str| StartSagaRequest {
        saga_type: FOUR_STEPS.into(),
        input_json: order(order_id).to_string(),
        idempotency_key: key.into(),
        definition_version: 0,
    };
    let done = client
        .start_saga(start("r-done", "k-done"))
        .await
        .unwrap()
        .into_inner();
    let failed = app.start(FOUR_STEPS, 0, order("r-fail")).await;
    let held = app.start(FOUR_STEPS, 0, order("r-hold")).await;
    app.wait_for_state(&failed, SagaState::Failed).await;
    eventually(
        "step_b of r-hold to be held",
        Duration::from_secs(30),
        || async { (participants.held_count() == 1).then_some(()) },
    )
    .await;

    // The completed saga goes, with its history and attributes.
    eventually(
        "the completed saga to be deleted",
        Duration::from_secs(30),
        || async { (rows_of(&app, "sagas", &done.saga_id).await == 0).then_some(()) },
    )
    .await;
    assert_eq!(rows_of(&app, "saga_history", &done.saga_id).await, 0);
    assert_eq!(rows_of(&app, "saga_attributes", &done.saga_id).await, 0);
    // FAILED and running sagas stay, whole.
    for kept in [&failed, &held] {
        assert_eq!(rows_of(&app, "sagas", kept).await, 1);
        assert!(rows_of(&app, "saga_history", kept).await > 0);
        assert_eq!(rows_of(&app, "saga_attributes", kept).await, 1);
    }
    // Its idempotency key was remembered only as long as the saga: a
    // repeat now starts a new saga.
    let again = client
        .start_saga(start("r-done", "k-done"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.created);
    assert_ne!(again.saga_id, done.saga_id);

    // The held saga goes once it has finished; the FAILED one never.
    participants
        .release_held(saga_proto::amqp::ReplyStatus::Success, json!({}))
        .await;
    eventually(
        "the held saga, finished, to be deleted",
        Duration::from_secs(30),
        || async { (rows_of(&app, "sagas", &held).await == 0).then_some(()) },
    )
    .await;
    assert_eq!(app.get(&failed).await.state, SagaState::Failed as i32);
    participants.stop().await;
    app.stop().await;
}
