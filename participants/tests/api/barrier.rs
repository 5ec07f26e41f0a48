//! The compensation barrier, keyed by the action's idempotency key.

use participants::demo::Service;
use saga_proto::amqp::{Phase, ReplyStatus};
use serde_json::json;

use crate::helpers::{TestApp, command, compensation_of, rejected, stock, success};

fn reserve(order: &str, sku: &str, quantity: u32) -> saga_proto::amqp::CommandMessage {
    command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": order, "items": [{"sku": sku, "quantity": quantity}]}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_before_its_action_is_a_noop_and_refuses_the_late_action() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let before = stock(&app, "sku-10").await;
    let action = reserve("o-10", "sku-10", 7);
    let release = compensation_of(
        &action,
        "release",
        json!({"order_id": "o-10", "reservation_id": null}),
    );

    // The compensation overtakes the action (e.g. the action timed out).
    let undone = app.call(&release).await;
    assert_eq!(success(&undone), json!({"noop": "action_never_arrived"}));

    // The late action is refused, with no effect.
    let late = app.call(&action).await;
    let reason = rejected(&late);
    assert!(reason.contains("compensated before it arrived"), "{reason}");
    assert_eq!(stock(&app, "sku-10").await, before);
    let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM inventory_reservations")
        .fetch_one(app.pool(Service::Inventory))
        .await
        .unwrap();
    assert_eq!(reservations, 0);

    // A duplicate of the compensation gets its original reply.
    assert_eq!(app.call(&release).await, undone);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_compensation_has_effect_once() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let before = stock(&app, "sku-11").await;
    let action = reserve("o-11", "sku-11", 4);
    let reservation = success(&app.call(&action).await)["reservation_id"].clone();
    assert_eq!(stock(&app, "sku-11").await, before - 4);

    let payload = json!({"order_id": "o-11", "reservation_id": reservation});
    let first = compensation_of(&action, "release", payload.clone());
    let released = success(&app.call(&first).await);
    assert_eq!(released["released"], true);
    assert_eq!(stock(&app, "sku-11").await, before);

    // The same compensation again (duplicate) and another one under a
    // different key for the same action: neither gives stock back twice.
    assert_eq!(success(&app.call(&first).await), released);
    let second = compensation_of(&action, "release", payload);
    assert_eq!(
        success(&app.call(&second).await),
        json!({"noop": "already_compensated"})
    );
    assert_eq!(stock(&app, "sku-11").await, before);
    let status: String = sqlx::query_scalar(
        "SELECT status FROM inventory_reservations WHERE reservation_id::text = $1",
    )
    .bind(reservation.as_str().unwrap())
    .fetch_one(app.pool(Service::Inventory))
    .await
    .unwrap();
    assert_eq!(status, "released");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_actions_and_compensations_never_leak_stock() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let before = stock(&app, "sku-12").await;
    let pairs: Vec<_> = (0..15)
        .map(|i| {
            let action = reserve(&format!("o-12-{i}"), "sku-12", 2);
            let release = compensation_of(
                &action,
                "release",
                json!({"order_id": format!("o-12-{i}"), "reservation_id": null}),
            );
            (action, release)
        })
        .collect();
    // Compensations first or actions first, alternately, all in flight at once.
    for (i, (action, release)) in pairs.iter().enumerate() {
        if i % 2 == 0 {
            app.send(release).await;
            app.send(action).await;
        } else {
            app.send(action).await;
            app.send(release).await;
        }
    }
    for (action, release) in &pairs {
        let a = app
            .replies
            .wait_for(1, |r| r.idempotency_key == action.idempotency_key)
            .await;
        let c = app
            .replies
            .wait_for(1, |r| r.idempotency_key == release.idempotency_key)
            .await;
        assert_eq!(c[0].reply.status, ReplyStatus::Success, "{c:?}");
        assert_ne!(a[0].reply.status, ReplyStatus::TransientError, "{a:?}");
    }
    // Whatever the interleaving, every reservation was released or refused.
    assert_eq!(stock(&app, "sku-12").await, before);
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM inventory_reservations WHERE status = 'reserved'")
            .fetch_one(app.pool(Service::Inventory))
            .await
            .unwrap();
    assert_eq!(held, 0);
    app.finish().await;
}
