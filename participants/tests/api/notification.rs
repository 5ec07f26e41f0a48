//! The notification service records each lifecycle event once.

use participants::demo::Service;
use saga_proto::amqp::{LifecycleEvent, SagaLifecycleState, event_routing_key};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{TestApp, eventually};

fn event(saga: Uuid, state: SagaLifecycleState, error: Option<&str>) -> (String, Vec<u8>) {
    let event = LifecycleEvent {
        saga_id: saga,
        saga_type: "order_placement".into(),
        saga_version: 1,
        state,
        data: json!({"order_id": "o-70", "customer_id": "erin", "items": [], "total_cents": 0}),
        error: error.map(str::to_owned),
        at: "2026-01-01T00:00:00Z".into(),
    };
    (
        event_routing_key("order_placement", state),
        serde_json::to_vec(&event).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_are_recorded_once() {
    let app = TestApp::spawn(&[Service::Notification]).await;
    let saga = Uuid::now_v7();
    let (running_key, running) = event(saga, SagaLifecycleState::Running, None);
    let (done_key, done) = event(saga, SagaLifecycleState::Compensated, Some("out of stock"));
    app.publish_event(&running_key, &running).await;
    app.publish_event(&done_key, &done).await;
    // Redelivered / republished events.
    app.publish_event(&running_key, &running).await;
    app.publish_event(&done_key, &done).await;
    app.publish_event(&done_key, b"{broken").await;

    eventually("the poison event to be dead-lettered", || async {
        (app.handle(Service::Notification).stats().poison == 1).then_some(())
    })
    .await;
    eventually("all events handled", || async {
        let stats = app.handle(Service::Notification).stats();
        (stats.events_recorded + stats.replayed == 4).then_some(())
    })
    .await;
    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT state, order_id, message FROM notifications WHERE saga_id = $1 ORDER BY state",
    )
    .bind(saga)
    .fetch_all(app.pool(Service::Notification))
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    // Events are handled concurrently, so insertion order is not asserted.
    assert_eq!(rows[0].0, "compensated");
    assert!(
        rows[0].2.contains("o-70") && rows[0].2.contains("out of stock"),
        "{rows:?}"
    );
    assert_eq!(rows[1].0, "running");
    assert_eq!(rows[1].1.as_deref(), Some("o-70"));
    assert_eq!(app.handle(Service::Notification).stats().events_recorded, 2);
    app.finish().await;
}
