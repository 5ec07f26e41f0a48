//! The inventory service: ledger and stock after reserve / release, and
//! its business rejections.

use participants::demo::Service;
use participants::demo::inventory::SEEDED_STOCK;
use saga_proto::amqp::Phase;
use serde_json::json;

use crate::helpers::{TestApp, command, compensation_of, rejected, stock, success};

async fn set_stock(app: &TestApp, sku: &str, available: i64) {
    sqlx::query("UPDATE inventory_stock SET available = $2 WHERE sku = $1")
        .bind(sku)
        .bind(available)
        .execute(app.pool(Service::Inventory))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_and_release_keep_the_ledger() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let seeded: i64 = sqlx::query_scalar("SELECT count(*) FROM inventory_stock")
        .fetch_one(app.pool(Service::Inventory))
        .await
        .unwrap();
    assert_eq!(seeded, 100);
    assert_eq!(stock(&app, "sku-100").await, SEEDED_STOCK);

    let reserve = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-20", "items": [
            {"sku": "sku-20", "quantity": 2},
            {"sku": "sku-21", "quantity": 5},
            {"sku": "sku-20", "quantity": 1}
        ]}),
    );
    let reservation = success(&app.call(&reserve).await)["reservation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(stock(&app, "sku-20").await, SEEDED_STOCK - 3);
    assert_eq!(stock(&app, "sku-21").await, SEEDED_STOCK - 5);
    let lines: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sku, quantity FROM inventory_reservation_items
         WHERE reservation_id::text = $1 ORDER BY sku",
    )
    .bind(&reservation)
    .fetch_all(app.pool(Service::Inventory))
    .await
    .unwrap();
    assert_eq!(lines, vec![("sku-20".into(), 3), ("sku-21".into(), 5)]);

    let release = compensation_of(
        &reserve,
        "release",
        json!({"order_id": "o-20", "reservation_id": reservation}),
    );
    assert_eq!(success(&app.call(&release).await)["released"], true);
    assert_eq!(stock(&app, "sku-20").await, SEEDED_STOCK);
    assert_eq!(stock(&app, "sku-21").await, SEEDED_STOCK);
    let (status, order): (String, String) = sqlx::query_as(
        "SELECT status, order_id FROM inventory_reservations WHERE reservation_id::text = $1",
    )
    .bind(&reservation)
    .fetch_one(app.pool(Service::Inventory))
    .await
    .unwrap();
    assert_eq!((status.as_str(), order.as_str()), ("released", "o-20"));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_stock_unknown_skus_and_bad_payloads_are_rejected() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    set_stock(&app, "sku-30", 5).await;
    let too_many = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-30", "items": [{"sku": "sku-30", "quantity": 6}]}),
    );
    let reason = rejected(&app.call(&too_many).await);
    assert!(
        reason.contains("insufficient stock for SKU sku-30"),
        "{reason}"
    );
    assert!(reason.contains("6 requested, 5 available"), "{reason}");
    assert_eq!(stock(&app, "sku-30").await, 5);

    let unknown = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-31", "items": [{"sku": "sku-999", "quantity": 1}]}),
    );
    assert_eq!(rejected(&app.call(&unknown).await), "unknown SKU sku-999");

    let bad = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-32", "items": [{"sku": "sku-1", "quantity": "two"}]}),
    );
    let reason = rejected(&app.call(&bad).await);
    assert!(reason.contains("items[0].quantity"), "{reason}");

    let zero = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-33", "items": [{"sku": "sku-1", "quantity": 0}]}),
    );
    assert!(rejected(&app.call(&zero).await).contains("greater than 0"));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_reservation_leaves_no_trace_and_its_rejection_is_remembered() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let pool = app.pool(Service::Inventory);
    set_stock(&app, "sku-41", 5).await;
    // Lines are taken in SKU order: sku-40 is decremented and its line
    // written before sku-41 turns out short.
    let reserve = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-40", "items": [
            {"sku": "sku-40", "quantity": 3},
            {"sku": "sku-41", "quantity": 6},
        ]}),
    );
    let reason = rejected(&app.call(&reserve).await);
    assert!(
        reason.contains("insufficient stock for SKU sku-41"),
        "{reason}"
    );
    assert_eq!(stock(&app, "sku-40").await, SEEDED_STOCK);
    assert_eq!(stock(&app, "sku-41").await, 5);
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM inventory_reservations WHERE order_id = 'o-40')
              + (SELECT count(*) FROM inventory_reservation_items)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(rows, 0, "the rejected reservation wrote nothing");
    let (status, stored): (String, String) =
        sqlx::query_as("SELECT status, reason FROM kit_inbox WHERE idempotency_key = $1")
            .bind(&reserve.idempotency_key)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), stored.as_str()),
        ("rejected", reason.as_str())
    );

    // Enough stock now, but the key's answer is final: the retry replays it
    // and takes nothing.
    set_stock(&app, "sku-41", 100).await;
    let mut retry = reserve.clone();
    retry.attempt += 1;
    assert_eq!(rejected(&app.call(&retry).await), reason);
    assert_eq!(stock(&app, "sku-40").await, SEEDED_STOCK);
    assert_eq!(stock(&app, "sku-41").await, 100);
    app.finish().await;
}
