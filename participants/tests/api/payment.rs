//! The payment service: balances and the movement ledger after charge /
//! refund and authorize / void / capture, and insufficient funds.

use participants::demo::Service;
use participants::demo::payment::OPENING_BALANCE_CENTS;
use saga_proto::amqp::Phase;
use serde_json::json;

use crate::helpers::{TestApp, command, compensation_of, rejected, success};

async fn account(app: &TestApp, customer: &str) -> (i64, i64) {
    sqlx::query_as("SELECT balance_cents, held_cents FROM payment_accounts WHERE customer_id = $1")
        .bind(customer)
        .fetch_one(app.pool(Service::Payment))
        .await
        .unwrap()
}

async fn movements(app: &TestApp, customer: &str) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT kind, amount_cents FROM payment_movements WHERE customer_id = $1 ORDER BY id",
    )
    .bind(customer)
    .fetch_all(app.pool(Service::Payment))
    .await
    .unwrap()
}

fn pay(name: &str, order: &str, customer: &str, amount: u64) -> saga_proto::amqp::CommandMessage {
    command(
        "payment",
        name,
        Phase::Action,
        json!({"order_id": order, "customer_id": customer, "amount_cents": amount}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charge_and_refund() {
    let app = TestApp::spawn(&[Service::Payment]).await;
    let charge = pay("charge", "o-40", "alice", 2_500);
    let payment_id = success(&app.call(&charge).await)["payment_id"].clone();
    assert!(payment_id.is_string());
    assert_eq!(
        account(&app, "alice").await,
        (OPENING_BALANCE_CENTS - 2_500, 0)
    );

    // A retry of the charge changes nothing.
    let mut retry = charge.clone();
    retry.attempt = 2;
    assert_eq!(success(&app.call(&retry).await)["payment_id"], payment_id);
    assert_eq!(
        account(&app, "alice").await,
        (OPENING_BALANCE_CENTS - 2_500, 0)
    );

    let refund = compensation_of(
        &charge,
        "refund",
        json!({"order_id": "o-40", "customer_id": "alice", "amount_cents": 2_500}),
    );
    assert_eq!(success(&app.call(&refund).await)["refunded"], true);
    assert_eq!(account(&app, "alice").await, (OPENING_BALANCE_CENTS, 0));
    assert_eq!(
        movements(&app, "alice").await,
        vec![("charge".into(), 2_500), ("refund".into(), 2_500)]
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_void_and_capture() {
    let app = TestApp::spawn(&[Service::Payment]).await;
    // Authorize then void: the hold comes and goes, the balance never moves.
    let authorize = pay("authorize", "o-41", "bob", 10_000);
    let authorization = success(&app.call(&authorize).await)["authorization_id"].clone();
    assert_eq!(account(&app, "bob").await, (OPENING_BALANCE_CENTS, 10_000));
    let void = compensation_of(
        &authorize,
        "void",
        json!({"order_id": "o-41", "customer_id": "bob", "authorization_id": authorization}),
    );
    assert_eq!(success(&app.call(&void).await)["voided"], true);
    assert_eq!(account(&app, "bob").await, (OPENING_BALANCE_CENTS, 0));

    // A voided authorization cannot be captured.
    let capture_voided = command(
        "payment",
        "capture",
        Phase::Action,
        json!({"order_id": "o-41", "customer_id": "bob", "amount_cents": 10_000, "authorization_id": authorization}),
    );
    assert!(rejected(&app.call(&capture_voided).await).contains("voided"));

    // Authorize then capture: the hold turns into a payment.
    let authorize = pay("authorize", "o-42", "bob", 7_000);
    let authorization = success(&app.call(&authorize).await)["authorization_id"].clone();
    let capture = command(
        "payment",
        "capture",
        Phase::Action,
        json!({"order_id": "o-42", "customer_id": "bob", "amount_cents": 7_000, "authorization_id": authorization}),
    );
    let payment_id = success(&app.call(&capture).await)["payment_id"].clone();
    assert!(payment_id.is_string());
    assert_eq!(
        account(&app, "bob").await,
        (OPENING_BALANCE_CENTS - 7_000, 0)
    );
    // Captured money cannot be voided any more.
    let late_void = compensation_of(
        &authorize,
        "void",
        json!({"order_id": "o-42", "customer_id": "bob", "authorization_id": authorization}),
    );
    assert!(rejected(&app.call(&late_void).await).contains("captured"));

    assert_eq!(
        movements(&app, "bob").await,
        vec![
            ("authorize".into(), 10_000),
            ("void".into(), 10_000),
            ("authorize".into(), 7_000),
            ("capture".into(), 7_000),
        ]
    );
    let missing = command(
        "payment",
        "capture",
        Phase::Action,
        json!({"order_id": "o-43", "customer_id": "bob", "amount_cents": 1, "authorization_id": null}),
    );
    assert!(rejected(&app.call(&missing).await).contains("authorization_id"));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_and_authorizations_above_the_available_funds_are_rejected() {
    let app = TestApp::spawn(&[Service::Payment]).await;
    let too_much = pay("charge", "o-44", "carol", OPENING_BALANCE_CENTS as u64 + 1);
    let reason = rejected(&app.call(&too_much).await);
    assert!(reason.contains("insufficient funds"), "{reason}");
    // A rejection leaves no trace, not even the account opened on first sight.
    let opened: i64 = sqlx::query_scalar("SELECT count(*) FROM payment_accounts")
        .fetch_one(app.pool(Service::Payment))
        .await
        .unwrap();
    assert_eq!(opened, 0);

    // A hold reduces what is available to the next authorization.
    let hold = pay("authorize", "o-45", "carol", 60_000_000);
    success(&app.call(&hold).await);
    let second = pay("authorize", "o-46", "carol", 50_000_000);
    let reason = rejected(&app.call(&second).await);
    assert!(reason.contains("insufficient funds"), "{reason}");
    assert!(reason.contains("40000000 cents available"), "{reason}");
    assert_eq!(
        account(&app, "carol").await,
        (OPENING_BALANCE_CENTS, 60_000_000)
    );
    assert_eq!(
        movements(&app, "carol").await,
        vec![("authorize".into(), 60_000_000)]
    );
    app.finish().await;
}
