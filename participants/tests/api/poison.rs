//! Poison messages are dead-lettered and counted; the queue keeps flowing.
//! Well-formed envelopes naming an unknown command are answered `rejected`.

use participants::demo::Service;
use saga_proto::amqp::Phase;
use serde_json::json;

use crate::helpers::{TestApp, command, eventually, rejected, success};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_queue_keeps_flowing() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    app.send_raw("inventory", b"this is not json").await;
    // Missing required fields is as undecodable as garbage.
    app.send_raw("inventory", br#"{"saga_id": "nope"}"#).await;

    let first = app.get_one(&app.topology.dead_letter_queue()).await;
    let second = app.get_one(&app.topology.dead_letter_queue()).await;
    let mut dead = vec![first, second];
    dead.sort();
    assert_eq!(
        dead,
        vec![
            b"this is not json".to_vec(),
            br#"{"saga_id": "nope"}"#.to_vec()
        ]
    );
    eventually("two poison messages counted", || async {
        (app.handle(Service::Inventory).stats().poison == 2).then_some(())
    })
    .await;

    let reserve = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-60", "items": [{"sku": "sku-60", "quantity": 1}]}),
    );
    success(&app.call(&reserve).await);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_and_wrong_phases_are_rejected() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let unknown = command("inventory", "teleport", Phase::Action, json!({}));
    let reason = rejected(&app.call(&unknown).await);
    assert!(reason.contains("unknown command \"teleport\""), "{reason}");
    assert!(reason.contains("reserve"), "{reason}");

    let wrong_phase = command(
        "inventory",
        "release",
        Phase::Action,
        json!({"order_id": "o", "reservation_id": null}),
    );
    assert!(rejected(&app.call(&wrong_phase).await).contains("registered as compensation"));

    let mut orphan = command(
        "inventory",
        "release",
        Phase::Compensation,
        json!({"order_id": "o", "reservation_id": null}),
    );
    orphan.compensates = None;
    assert!(rejected(&app.call(&orphan).await).contains("compensates"));
    assert_eq!(app.handle(Service::Inventory).stats().poison, 0);
    app.finish().await;
}

/// A newer orchestrator may add envelope fields: a command carrying one is
/// applied and answered like any other, not dead-lettered as poison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_with_an_unknown_envelope_field_is_applied_not_dead_lettered() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let reserve = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-61", "items": [{"sku": "sku-61", "quantity": 3}]}),
    );
    let mut body = serde_json::to_value(&reserve).unwrap();
    body["deadline"] = json!("2030-01-01T00:00:00Z");
    body["priority"] = json!({"class": "gold"});
    app.send_raw("inventory", &serde_json::to_vec(&body).unwrap())
        .await;
    let reply = eventually("the reply to the extended command", || async {
        app.replies_to(&reserve).first().map(|r| r.reply.clone())
    })
    .await;
    assert!(success(&reply)["reservation_id"].is_string(), "{reply:?}");
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inventory_reservations WHERE order_id = 'o-61' AND status = 'reserved'",
    )
    .fetch_one(app.pool(Service::Inventory))
    .await
    .unwrap();
    assert_eq!(held, 1, "the reservation was applied once");
    assert_eq!(app.handle(Service::Inventory).stats().poison, 0);
    app.finish().await;
}
