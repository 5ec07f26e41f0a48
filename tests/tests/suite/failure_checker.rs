//! The invariant checker is not vacuous: after a clean run, each kind of
//! damage done by hand to the databases and the broker is reported.

use lapin::BasicProperties;
use saga_proto::amqp::Phase;
use saga_tests::{
    cluster::ClusterOptions,
    inject::{Injector, order_command},
    invariants::{Expectations, check},
    ledgers::DemoDatabases,
    orders::Fate,
};
use serde_json::json;

use crate::failure_support::{SETTLE, cluster, start_orders};

#[tokio::test]
async fn the_checker_reports_every_kind_of_damage() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    start_orders(
        &cluster,
        8,
        &[
            Fate::Completes,
            Fate::InsufficientFunds,
            Fate::Completes,
            Fate::UnknownSku,
        ],
    )
    .await;
    let clean = cluster.finish(&Expectations::default(), SETTLE).await;
    clean.assert_ok();
    assert_eq!((clean.completed, clean.compensated), (4, 4));

    let env = cluster.env();
    let demo = DemoDatabases::connect(env).await;
    let pool = &cluster.pool;
    let completed: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT id, input::json->>'order_id' FROM sagas WHERE status = 'completed' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let (victim, victim_order) = completed[0].clone();
    // A confirmation lost, a payment applied twice, a saga left running, a
    // message left in the outbox, a command sent twice by two instances.
    sqlx::query("DELETE FROM orders WHERE order_id = $1")
        .bind(&completed[1].1)
        .execute(demo.orders())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO payment_movements (customer_id, saga_id, order_id, kind, amount_cents, reference_id)
         SELECT customer_id, saga_id, order_id, kind, amount_cents, reference_id
         FROM payment_movements WHERE order_id = $1 LIMIT 1",
    )
    .bind(&victim_order)
    .execute(demo.payment())
    .await
    .unwrap();
    sqlx::query("UPDATE sagas SET status = 'running' WHERE id = $1")
        .bind(completed[2].0)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox (saga_id, message_id, message_type, exchange, routing_key, mandatory, body, available_at)
         VALUES ($1, gen_random_uuid(), 'saga.command', 'x', 'y', true, '\\x00', now())",
    )
    .bind(victim)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO saga_history (saga_id, seq, kind, step, status, detail, at)
         SELECT saga_id, (SELECT max(seq) + 1 FROM saga_history WHERE saga_id = $1), kind, step, status, detail, at
         FROM saga_history WHERE saga_id = $1 AND kind = 'command_sent' ORDER BY seq LIMIT 1",
    )
    .bind(completed[3].0)
    .execute(pool)
    .await
    .unwrap();
    // A message nobody consumed, and a valid command dead-lettered.
    let injector = Injector::connect(env).await.unwrap();
    let command = order_command(victim, 1, "reserve_inventory", Phase::Action, json!({}));
    injector.command(&command, None).await.unwrap();
    injector
        .to_queue(
            &injector.topology().dead_letter_queue(),
            &serde_json::to_vec(&command).unwrap(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    injector.close().await;

    let report = check(env, &Expectations::default()).await;
    let found = report.violations.join("\n");
    for expected in [
        "order not confirmed",
        "double effect: payment",
        "ledger imbalance: payment",
        "not terminal",
        "left in the orchestrator's outbox",
        "driven twice at once",
        "message(s) left in",
        "a valid message was dead-lettered",
    ] {
        assert!(
            found.contains(expected),
            "{expected:?} missing from:\n{found}"
        );
    }

    // A run in which nothing completed proves nothing.
    sqlx::query("UPDATE sagas SET status = 'failed' WHERE status = 'completed'")
        .execute(pool)
        .await
        .unwrap();
    let report = check(env, &Expectations::default()).await;
    let found = report.violations.join("\n");
    assert!(found.contains("only 0 saga(s) completed"), "{found}");
    assert!(
        found.contains("FAILED, which this run did not mean"),
        "{found}"
    );
    demo.close().await;
}
