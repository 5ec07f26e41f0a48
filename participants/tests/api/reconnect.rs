//! Participants ride out lost database connections, a deleted queue and a
//! closed AMQP connection: they reconnect, re-declare and resume.

use lapin::options::QueueDeleteOptions;
use participants::demo::Service;
use saga_proto::amqp::{CommandMessage, Phase, ReplyStatus};
use serde_json::json;
use sqlx::Connection;

use crate::helpers::{TestApp, command, success};

fn reserve(order: &str) -> CommandMessage {
    command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": order, "items": [{"sku": "sku-95", "quantity": 1}]}),
    )
}

/// Calls `command`, retrying (as the orchestrator would) while the answer
/// is a transient error.
async fn call_until_final(app: &TestApp, mut command: CommandMessage) -> serde_json::Value {
    loop {
        let reply = app.call(&command).await;
        if reply.status != ReplyStatus::TransientError || command.attempt >= 5 {
            return success(&reply);
        }
        command.attempt += 1;
    }
}

/// Closes the broker connections whose name mentions `needle`, if
/// `rabbitmqctl` is usable here; returns how many were closed.
async fn close_broker_connections(needle: &str) -> usize {
    let Ok(listed) = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .await
    else {
        return 0;
    };
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let mut closed = 0;
    for line in listed.lines().filter(|l| l.contains(needle)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: simulated network failure"])
            .output()
            .await;
        if status.is_ok_and(|s| s.status.success()) {
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_reconnect_and_resume() {
    let app = TestApp::spawn(&[Service::Inventory]).await;
    let queue = app.topology.participant_queue("inventory");
    success(&app.call(&reserve("o-95-1")).await);

    // PostgreSQL drops every connection of the participant's database.
    let pool = app.pool(Service::Inventory);
    let database = app.config.database_name(Service::Inventory);
    let mut admin = sqlx::PgConnection::connect_with(&app.config.database)
        .await
        .unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&database)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!killed.is_empty(), "the pool held connections");
    call_until_final(&app, reserve("o-95-2")).await;
    assert!(pool.size() >= 1);

    // The queue disappears: the broker cancels the consumer; the
    // participant reconnects, declares it again and consumes.
    app.channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    app.wait_for_consumer(&queue).await;
    success(&app.call(&reserve("o-95-3")).await);

    // The connection drops (where rabbitmqctl is usable from the tests).
    if close_broker_connections(&queue).await > 0 {
        app.wait_for_consumer(&queue).await;
        success(&app.call(&reserve("o-95-4")).await);
    } else {
        eprintln!("rabbitmqctl not usable here: skipped the closed-connection part");
    }

    let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM inventory_reservations")
        .fetch_one(app.pool(Service::Inventory))
        .await
        .unwrap();
    assert!(reservations >= 3);
    app.finish().await;
}
