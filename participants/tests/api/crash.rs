//! The `participant` binary crashing between commit and publish
//! (FAULT_CRASH_AFTER): after a restart the reply still arrives, and the
//! effect happened once.

use std::process::Stdio;
use std::time::Duration;

use participants::kit::FaultConfig;
use saga_proto::amqp::{Phase, ReplyStatus};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::helpers::{DEADLINE, TestApp, amqp_url, command, database_url, eventually};

fn participant_process(app: &TestApp, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_participant"))
        .arg("inventory")
        .args(["--namespace", app.topology.namespace()])
        .args(["--database-url", &database_url()])
        .args(["--amqp-url", &amqp_url()])
        .args(["--db-pool-size", "3", "--relay-interval-ms", "100"])
        .args(extra)
        .env("RUST_LOG", "error")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the participant binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_publish_loses_no_reply() {
    let mut app = TestApp::empty(FaultConfig::default()).await;
    let database = app.database_of("inventory");
    let queue = app.topology.participant_queue("inventory");

    let mut crashing = participant_process(&app, &["--fault-crash-after", "1"]);
    app.wait_for_consumer(&queue).await;
    let reserve = command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": "o-90", "items": [{"sku": "sku-90", "quantity": 9}]}),
    );
    app.send(&reserve).await;
    let status = tokio::time::timeout(DEADLINE, crashing.wait())
        .await
        .expect("the process aborts")
        .unwrap();
    assert!(!status.success(), "{status:?}");

    let pool = sqlx::PgPool::connect_with(database).await.unwrap();
    let committed: (String, i64) = sqlx::query_as(
        "SELECT i.status, (SELECT count(*) FROM kit_outbox)
         FROM kit_inbox i WHERE i.idempotency_key = $1",
    )
    .bind(&reserve.idempotency_key)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        committed,
        ("success".into(), 1),
        "committed, reply only in the outbox"
    );
    assert!(app.replies_to(&reserve).is_empty());

    let mut restarted = participant_process(&app, &[]);
    // The relay sends the outbox row; the redelivered command is replayed.
    let replies = app
        .replies
        .wait_for(1, |r| r.idempotency_key == reserve.idempotency_key)
        .await;
    assert_eq!(replies[0].reply.status, ReplyStatus::Success);
    eventually("the outbox to empty", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM kit_outbox")
            .fetch_one(&pool)
            .await
            .ok()?;
        (left == 0).then_some(())
    })
    .await;
    let (reservations, available): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM inventory_reservations),
                (SELECT available FROM inventory_stock WHERE sku = 'sku-90')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((reservations, available), (1, 1_000_000_000 - 9));
    // Every reply for the key carries the same outcome.
    let all = app
        .replies
        .matching(|r| r.idempotency_key == reserve.idempotency_key);
    assert!(all.iter().all(|r| r.reply == all[0].reply));

    // Graceful stop on SIGTERM.
    let pid = restarted.id().expect("running").to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), restarted.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    pool.close().await;
    app.finish().await;
}
