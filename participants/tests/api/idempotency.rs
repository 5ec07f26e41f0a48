//! Inbox de-duplication: one effect per idempotency key, the original reply
//! for duplicates, rejections remembered, transient errors not.

use std::sync::atomic::{AtomicU32, Ordering};

use participants::demo::Service;
use participants::kit::{Command, FaultConfig, HandlerError, Participant, Tx};
use saga_proto::amqp::{Phase, REPLY_TYPE, ReplyStatus, TRACEPARENT_HEADER};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::helpers::{TestApp, command, eventually, rejected, stock, success};

async fn reservations(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM inventory_reservations")
        .fetch_one(app.pool(Service::Inventory))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_applies_once_and_a_duplicate_gets_the_original_reply() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let before = stock(&app, "sku-1").await;
    let mut reserve = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-1", "items": [{"sku": "sku-1", "quantity": 3}]}),
    );

    let first = app.call(&reserve).await;
    let data = success(&first);
    assert!(data["reservation_id"].is_string(), "{data}");

    // A redelivery of the same attempt and a retry (attempt 2) alike.
    let again = app.call(&reserve).await;
    assert_eq!(again, first);
    reserve.attempt = 2;
    let retry = app.call(&reserve).await;
    assert_eq!(retry.attempt, 2, "a replay echoes the retry's attempt");
    assert_eq!(retry.data, first.data);
    assert_eq!(retry.status, ReplyStatus::Success);

    assert_eq!(stock(&app, "sku-1").await, before - 3);
    assert_eq!(reservations(&app).await, 1);
    let stats = app.handle(Service::Inventory).stats();
    assert_eq!((stats.applied, stats.replayed), (1, 2));

    // The AMQP properties the contract promises.
    let received = &app.replies_to(&reserve)[0];
    let props = &received.properties;
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    assert_eq!(props.kind().as_ref().unwrap().as_str(), REPLY_TYPE);
    assert_eq!(
        props.correlation_id().as_ref().unwrap().as_str(),
        reserve.saga_id.to_string()
    );
    let message_id = props.message_id().as_ref().expect("message_id").as_str();
    uuid::Uuid::parse_str(message_id).expect("message_id is a uuid");
    let headers = props.headers().as_ref().expect("headers");
    let traceparent = headers
        .inner()
        .get(TRACEPARENT_HEADER)
        .expect("traceparent");
    let traceparent = match traceparent {
        lapin::types::AMQPValue::LongString(s) => s.to_string(),
        other => panic!("traceparent is {other:?}"),
    };
    assert!(
        traceparent.starts_with(&format!("00-{}-", reserve.saga_id.simple())),
        "{traceparent}"
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_is_remembered() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let reserve = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-2", "items": [{"sku": "sku-new", "quantity": 1}]}),
    );
    let reason = rejected(&app.call(&reserve).await);
    assert!(reason.contains("unknown SKU sku-new"), "{reason}");

    // Even once the SKU exists, the same key stays refused: a rejection is final.
    sqlx::query("INSERT INTO inventory_stock (sku, available) VALUES ('sku-new', 10)")
        .execute(app.pool(Service::Inventory))
        .await
        .unwrap();
    let again = app.call(&reserve).await;
    assert_eq!(rejected(&again), reason);
    assert_eq!(reservations(&app).await, 0);
    assert_eq!(stock(&app, "sku-new").await, 10);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_leaves_no_partial_effect() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let before = stock(&app, "sku-2").await;
    // sku-2 is taken first (sorted), then sku-zzz is unknown.
    let reserve = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-3", "items": [{"sku": "sku-2", "quantity": 5}, {"sku": "sku-zzz", "quantity": 1}]}),
    );
    let reason = rejected(&app.call(&reserve).await);
    assert!(reason.contains("sku-zzz"), "{reason}");
    assert_eq!(stock(&app, "sku-2").await, before);
    assert_eq!(reservations(&app).await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_apply_once() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let before = stock(&app, "sku-4").await;
    let reserve = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-4", "items": [{"sku": "sku-4", "quantity": 1}]}),
    );
    for _ in 0..12 {
        app.send(&reserve).await;
    }
    let replies = app
        .replies
        .wait_for(12, |r| r.idempotency_key == reserve.idempotency_key)
        .await;
    // Duplicates racing on the inbox key either replay the stored reply or,
    // if they time out waiting on the lock, answer transient_error; never
    // a second effect.
    let successes: Vec<_> = replies
        .iter()
        .filter(|r| r.reply.status == ReplyStatus::Success)
        .collect();
    assert!(!successes.is_empty());
    assert!(
        successes
            .iter()
            .all(|r| r.reply.data == successes[0].reply.data)
    );
    assert!(
        replies
            .iter()
            .all(|r| r.reply.status != ReplyStatus::Rejected)
    );
    assert_eq!(stock(&app, "sku-4").await, before - 1);
    assert_eq!(reservations(&app).await, 1);
    app.finish().await;
}

/// `notes.note` payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Note {
    text: String,
}

sagas::contract!(
    /// `notes.note`: writes a note.
    WriteNote: "notes"."note", Note => serde_json::Value, action
);

/// Calls of [`flaky_note`] (only `transient_errors_are_not_remembered`
/// registers it).
static NOTE_CALLS: AtomicU32 = AtomicU32::new(0);

/// Writes a row, then fails transiently on its first call: the write must
/// be rolled back and the key must not be remembered.
async fn flaky_note(tx: &Tx, command: Command<Note>) -> Result<serde_json::Value, HandlerError> {
    sqlx::query("CREATE TABLE IF NOT EXISTS notes (key text, body text)")
        .execute(tx)
        .await?;
    sqlx::query("INSERT INTO notes VALUES ($1, $2)")
        .bind(command.idempotency_key())
        .bind(&command.payload.text)
        .execute(tx)
        .await?;
    if NOTE_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err(HandlerError::Transient("first call fails".into()));
    }
    Ok(json!({"noted": command.payload.text}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_not_remembered() {
    let mut app = TestApp::empty(FaultConfig::default()).await;
    let participant = Participant::builder("notes")
        .action::<WriteNote>(flaky_note)
        .build()
        .unwrap();
    let config = app.participant_config("notes", FaultConfig::default());
    let shutdown = app.shutdown.clone();
    let index = app.start_custom(participant, config, shutdown).await;

    let mut note = command("notes", "note", Phase::Action, json!({"text": "hello"}));
    let first = app.call(&note).await;
    assert_eq!(first.status, ReplyStatus::TransientError, "{first:?}");
    assert!(
        first
            .reason
            .as_deref()
            .unwrap()
            .contains("first call fails")
    );

    note.attempt = 2;
    let second = app.call(&note).await;
    assert_eq!(success(&second), json!({"noted": "hello"}));
    assert_eq!(
        NOTE_CALLS.load(Ordering::SeqCst),
        2,
        "the retry ran the handler again"
    );

    let pool = app.custom[index].pool().clone();
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(notes, 1, "the failed attempt's write was rolled back");
    let status: String =
        sqlx::query_scalar("SELECT status FROM kit_inbox WHERE idempotency_key = $1")
            .bind(&note.idempotency_key)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "success");
    // The published reply's outbox row is gone once confirmed.
    eventually("the outbox to empty", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM kit_outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;
    app.finish().await;
}
