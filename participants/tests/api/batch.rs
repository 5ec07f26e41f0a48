//! Batches: commands that reach a participant together are answered in one
//! transaction, with exactly the outcomes each would get alone.

use participants::demo::Service;
use participants::demo::inventory::SEEDED_STOCK;
use participants::kit::FaultConfig;
use saga_proto::amqp::{CommandMessage, Phase, ReplyMessage, ReplyStatus};
use serde_json::json;

use crate::helpers::{TestApp, command, compensation_of, eventually, rejected, stock, success};

fn reserve(order: &str, items: serde_json::Value) -> CommandMessage {
    command(
        "inventory",
        "reserve",
        Phase::Action,
        json!({"order_id": order, "items": items}),
    )
}

/// Inventory with one batch at a time (so the commands that pile up behind
/// a blocked one form a single batch).
async fn one_batch_at_a_time() -> TestApp {
    let mut app = TestApp::empty(FaultConfig::default()).await;
    app.config.concurrency = 1;
    app.start_demo(&[Service::Inventory]).await;
    app
}

/// Sends `blocker` (which reserves `blocked_sku`) while the test holds that
/// SKU's row lock, then `burst` behind it; lets go once every command of the
/// burst was pushed to the participant, so they wait in its buffer and the
/// next batch takes them together.
async fn burst_behind(
    app: &TestApp,
    blocked_sku: &str,
    blocker: &CommandMessage,
    burst: &[Burst<'_>],
) {
    let pool = app.pool(Service::Inventory);
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM inventory_stock WHERE sku = $1 FOR UPDATE")
        .bind(blocked_sku)
        .execute(&mut *lock)
        .await
        .unwrap();
    app.send(blocker).await;
    for item in burst {
        match item {
            Burst::Command(command) => app.send(command).await,
            Burst::Poison(bytes) => app.send_raw("inventory", bytes).await,
        }
    }
    let queue = app.topology.participant_queue("inventory");
    eventually("every command pushed to the participant", || async {
        (app.ready_in(&queue).await == 0).then_some(())
    })
    .await;
    eventually("the blocker waiting on the test's lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    lock.commit().await.unwrap();
}

/// Waits for a reply to each of `commands` and returns the first of each.
async fn first_replies<const N: usize>(
    app: &TestApp,
    commands: [&CommandMessage; N],
) -> [ReplyMessage; N] {
    let mut replies = Vec::with_capacity(N);
    for command in commands {
        let received = app
            .replies
            .wait_for(1, |r| r.idempotency_key == command.idempotency_key)
            .await;
        replies.push(received[0].reply.clone());
    }
    replies.try_into().expect("one reply per command")
}

enum Burst<'a> {
    Command(&'a CommandMessage),
    Poison(&'a [u8]),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_answered_together_with_the_outcomes_each_command_gets_alone() {
    let app = one_batch_at_a_time().await;
    let blocker = reserve("o-60", json!([{"sku": "sku-60", "quantity": 1}]));
    let a = reserve("o-61", json!([{"sku": "sku-61", "quantity": 2}]));
    let b = reserve("o-62", json!([{"sku": "sku-62", "quantity": 3}]));
    // Its action is in the same burst: the pair is decided alone after the
    // batch, in arrival order, so the release finds the reservation.
    let release_b = compensation_of(
        &b,
        "release",
        json!({"order_id": "o-62", "reservation_id": null}),
    );
    let c = reserve("o-63", json!([{"sku": "sku-63", "quantity": 4}]));
    let a_again = CommandMessage {
        attempt: 2,
        ..a.clone()
    };
    burst_behind(
        &app,
        "sku-60",
        &blocker,
        &[
            Burst::Command(&a),
            Burst::Command(&b),
            Burst::Command(&a_again),
            Burst::Poison(b"{not json"),
            Burst::Command(&release_b),
            Burst::Command(&c),
        ],
    )
    .await;

    for command in [&blocker, &b, &c] {
        let replies = app
            .replies
            .wait_for(1, |r| r.idempotency_key == command.idempotency_key)
            .await;
        success(&replies[0].reply);
    }
    let a_replies = app
        .replies
        .wait_for(2, |r| r.idempotency_key == a.idempotency_key)
        .await;
    assert_eq!(a_replies.len(), 2, "{a_replies:?}");
    let attempts: Vec<u32> = a_replies.iter().map(|r| r.reply.attempt).collect();
    assert!(
        attempts.contains(&1) && attempts.contains(&2),
        "{attempts:?}"
    );
    assert_eq!(
        success(&a_replies[0].reply),
        success(&a_replies[1].reply),
        "the duplicate gets the original outcome"
    );
    let undone = app
        .replies
        .wait_for(1, |r| r.idempotency_key == release_b.idempotency_key)
        .await;
    assert_eq!(success(&undone[0].reply)["released"], true);

    assert_eq!(stock(&app, "sku-60").await, SEEDED_STOCK - 1);
    assert_eq!(stock(&app, "sku-61").await, SEEDED_STOCK - 2);
    assert_eq!(stock(&app, "sku-62").await, SEEDED_STOCK);
    assert_eq!(stock(&app, "sku-63").await, SEEDED_STOCK - 4);
    let stats = eventually("the poison message counted", || async {
        let stats = app.handle(Service::Inventory).stats();
        (stats.poison == 1).then_some(stats)
    })
    .await;
    assert_eq!(stats.applied, 5, "{stats:?}");
    assert_eq!(stats.replayed, 1, "{stats:?}");
    assert_eq!(stats.rejected, 0, "{stats:?}");
    assert_eq!(stats.batches_split, 0, "{stats:?}");
    // a and c go together; b, its release and a's duplicate come after.
    assert!(stats.batched >= 2, "{stats:?}");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_rejection_after_writing_is_decided_command_by_command() {
    let app = one_batch_at_a_time().await;
    let blocker = reserve("o-70", json!([{"sku": "sku-70", "quantity": 1}]));
    let d = reserve("o-71", json!([{"sku": "sku-71", "quantity": 1}]));
    // sku-72 is taken before the unknown SKU turns the order down.
    let e = reserve(
        "o-72",
        json!([{"sku": "sku-72", "quantity": 5}, {"sku": "sku-999", "quantity": 1}]),
    );
    let f = reserve("o-73", json!([{"sku": "sku-73", "quantity": 2}]));
    burst_behind(
        &app,
        "sku-70",
        &blocker,
        &[Burst::Command(&d), Burst::Command(&e), Burst::Command(&f)],
    )
    .await;

    let [_, d_reply, e_reply, f_reply] = first_replies(&app, [&blocker, &d, &e, &f]).await;
    assert_eq!(d_reply.status, ReplyStatus::Success);
    assert_eq!(f_reply.status, ReplyStatus::Success);
    let reason = rejected(&e_reply);
    assert!(reason.contains("sku-999"), "{reason}");

    assert_eq!(stock(&app, "sku-71").await, SEEDED_STOCK - 1);
    assert_eq!(
        stock(&app, "sku-72").await,
        SEEDED_STOCK,
        "nothing of e stays"
    );
    assert_eq!(stock(&app, "sku-73").await, SEEDED_STOCK - 2);
    let stored: String =
        sqlx::query_scalar("SELECT status FROM kit_inbox WHERE idempotency_key = $1")
            .bind(&e.idempotency_key)
            .fetch_one(app.pool(Service::Inventory))
            .await
            .unwrap();
    assert_eq!(stored, "rejected");
    let stats = app.handle(Service::Inventory).stats();
    assert_eq!(stats.batches_split, 1, "{stats:?}");
    assert_eq!((stats.applied, stats.rejected), (3, 1), "{stats:?}");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_ahead_of_its_action_in_a_burst_fences_it_as_it_would_alone() {
    let app = one_batch_at_a_time().await;
    let blocker = reserve("o-80", json!([{"sku": "sku-80", "quantity": 1}]));
    let x = reserve("o-81", json!([{"sku": "sku-81", "quantity": 6}]));
    let release_x = compensation_of(
        &x,
        "release",
        json!({"order_id": "o-81", "reservation_id": null}),
    );
    let y = reserve("o-82", json!([{"sku": "sku-82", "quantity": 1}]));
    let z = reserve("o-83", json!([{"sku": "sku-83", "quantity": 1}]));
    burst_behind(
        &app,
        "sku-80",
        &blocker,
        &[
            Burst::Command(&release_x),
            Burst::Command(&y),
            Burst::Command(&x),
            Burst::Command(&z),
        ],
    )
    .await;

    let [_, release_reply, x_reply, y_reply, z_reply] =
        first_replies(&app, [&blocker, &release_x, &x, &y, &z]).await;
    // The same as one at a time in arrival order: the release fences the
    // action that has not arrived yet, and the action is refused.
    assert_eq!(
        success(&release_reply),
        json!({"noop": "action_never_arrived"})
    );
    let reason = rejected(&x_reply);
    assert!(reason.contains("compensated before it arrived"), "{reason}");
    assert_eq!(stock(&app, "sku-81").await, SEEDED_STOCK);
    assert!(success(&y_reply)["reservation_id"].is_string());
    assert!(success(&z_reply)["reservation_id"].is_string());
    let stats = app.handle(Service::Inventory).stats();
    assert!(stats.batched >= 2, "y and z go together: {stats:?}");
    assert_eq!(stats.batches_split, 0, "{stats:?}");
    app.finish().await;
}
