//! The orders service: confirmation is idempotent and happens once.

use participants::demo::Service;
use saga_proto::amqp::Phase;
use serde_json::json;

use crate::helpers::{TestApp, command, success};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_confirmed_once() {
    let app = TestApp::spawn(&[Service::Orders]).await;
    let payload = json!({
        "order_id": "o-50", "customer_id": "dave", "total_cents": 300,
        "items": [{"sku": "sku-1", "quantity": 2, "unit_price_cents": 150}]
    });
    let confirm = command("orders", "confirm", Phase::Action, payload.clone());
    let data = success(&app.call(&confirm).await);
    assert_eq!(data, json!({"order_id": "o-50", "status": "confirmed"}));
    // Same key (retry) and another key for the same order: same answer.
    assert_eq!(success(&app.call(&confirm).await), data);
    let other = command("orders", "confirm", Phase::Action, payload);
    assert_eq!(success(&app.call(&other).await), data);

    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT customer_id, total_cents, status FROM orders WHERE order_id = 'o-50'",
    )
    .fetch_all(app.pool(Service::Orders))
    .await
    .unwrap();
    assert_eq!(rows, vec![("dave".into(), 300, "confirmed".into())]);
    let saga: uuid::Uuid = sqlx::query_scalar("SELECT saga_id FROM orders WHERE order_id = 'o-50'")
        .fetch_one(app.pool(Service::Orders))
        .await
        .unwrap();
    assert_eq!(saga, confirm.saga_id);
    app.finish().await;
}
