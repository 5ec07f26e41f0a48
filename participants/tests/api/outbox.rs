//! Replies survive a missing reply queue (outbox + relay) and the fault
//! knobs do what they promise.

use lapin::options::QueueDeclareOptions;
use participants::demo::{Service, inventory};
use participants::kit::{FaultConfig, topology};
use saga_proto::amqp::{Phase, ReplyStatus};
use serde_json::json;

use crate::helpers::{TestApp, collect_replies, command, eventually, success};

fn reserve(order: &str) -> saga_proto::amqp::CommandMessage {
    command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": order, "items": [{"sku": "sku-80", "quantity": 1}]}),
    )
}

async fn outbox_rows(pool: &sqlx::PgPool) -> (i64, i32) {
    sqlx::query_as("SELECT count(*), coalesce(max(attempts), 0) FROM kit_outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_a_queue_that_does_not_exist_yet_is_kept_and_relayed() {
    let mut app = TestApp::spawn(&[Service::Inventory]).await;
    let late_queue = format!("{}.late-replies", app.topology.namespace());
    app.forget_queue_later(&late_queue);
    let command = reserve("o-80");
    app.send_to(&command, &late_queue).await;

    // Unroutable (mandatory) → kept in the outbox, retried by the relay.
    let pool = app.pool(Service::Inventory).clone();
    eventually(
        "the reply to wait in the outbox after failed attempts",
        || async {
            let (rows, attempts) = outbox_rows(&pool).await;
            (rows == 1 && attempts >= 2).then_some(())
        },
    )
    .await;

    // The orchestrator declares its queue late: the reply arrives.
    app.channel
        .queue_declare(
            late_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            topology::work_queue_arguments(&app.topology, topology::QueueType::Quorum),
        )
        .await
        .unwrap();
    let consumer_channel = app.connection.create_channel().await.unwrap();
    let late = collect_replies(&consumer_channel, &late_queue).await;
    let replies = late
        .wait_for(1, |r| r.idempotency_key == command.idempotency_key)
        .await;
    assert_eq!(replies[0].reply.status, ReplyStatus::Success);
    eventually("the outbox to empty", || async {
        (outbox_rows(&pool).await.0 == 0).then_some(())
    })
    .await;
    assert!(app.handle(Service::Inventory).stats().relayed >= 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_reply_is_recovered_from_the_inbox_by_a_retry() {
    let mut app = TestApp::empty(FaultConfig::default()).await;
    let dropping = FaultConfig {
        drop_reply_rate: 1.0,
        ..FaultConfig::default()
    };
    let config = app.participant_config(inventory::NAME, dropping);
    let first_run = app.shutdown.child_token();
    let index = app
        .start_custom(inventory::participant().unwrap(), config, first_run.clone())
        .await;
    let mut command = reserve("o-81");
    app.send(&command).await;

    let pool = app.custom[index].pool().clone();
    let stats = eventually("the command to be applied", || async {
        let stats = app.custom[index].stats();
        (stats.applied == 1).then_some(stats)
    })
    .await;
    assert_eq!(stats.replies_published, 0, "the reply was dropped");
    assert_eq!(outbox_rows(&pool).await.0, 0, "and not left for the relay");

    // Restart without the fault; the orchestrator's retry gets the original.
    first_run.cancel();
    app.custom.remove(index).stopped().await;
    let config = app.participant_config(inventory::NAME, FaultConfig::default());
    let index = app
        .start_custom(
            inventory::participant().unwrap(),
            config,
            app.shutdown.child_token(),
        )
        .await;
    command.attempt = 2;
    let reply = app.call(&command).await;
    let reservation = success(&reply)["reservation_id"].clone();
    let pool = app.custom[index].pool().clone();
    let stored: String =
        sqlx::query_scalar("SELECT reservation_id::text FROM inventory_reservations")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(reservation, json!(stored));
    assert_eq!(app.custom[index].stats().replayed, 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_knobs_duplicate_replies_and_fail_commands() {
    let app = TestApp::spawn_with(
        &[Service::Inventory],
        FaultConfig {
            duplicate_reply_rate: 1.0,
            ..FaultConfig::default()
        },
    )
    .await;
    let command = reserve("o-82");
    app.send(&command).await;
    let replies = app
        .replies
        .wait_for(2, |r| r.idempotency_key == command.idempotency_key)
        .await;
    assert_eq!(replies[0].reply, replies[1].reply);
    let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM inventory_reservations")
        .fetch_one(app.pool(Service::Inventory))
        .await
        .unwrap();
    assert_eq!(reservations, 1);
    app.finish().await;

    let app = TestApp::spawn_with(
        &[Service::Inventory],
        FaultConfig {
            failure_rate: 1.0,
            ..FaultConfig::default()
        },
    )
    .await;
    let command = reserve("o-83");
    let reply = app.call(&command).await;
    assert_eq!(reply.status, ReplyStatus::TransientError);
    assert!(reply.reason.unwrap().contains("fault injection"));
    let remembered: i64 = sqlx::query_scalar("SELECT count(*) FROM kit_inbox")
        .fetch_one(app.pool(Service::Inventory))
        .await
        .unwrap();
    assert_eq!(remembered, 0);
    app.finish().await;
}
