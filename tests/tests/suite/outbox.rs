//! The orchestrator's outbox: confirmed rows are deleted by the next
//! transition statement, or by the publisher's deleter when none comes.

use chrono::Utc;
use orchestrator::store::{Store, outbox, transition};
use saga_tests::env::TestEnv;
use uuid::Uuid;

async fn outbox_row(store: &Store) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (saga_id, message_id, message_type, exchange, routing_key, mandatory, body, available_at)
         VALUES ($1, $2, 'saga.command', 'x', 'k', true, '\\x7b7d', now()) RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4())
    .fetch_one(store.pool())
    .await
    .unwrap()
}

async fn left(store: &Store) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_transition_statement_deletes_the_confirmed_rows_it_carries_and_no_others() {
    let env = TestEnv::new();
    let store = Store::connect(&env.database_url("orchestrator"), 2)
        .await
        .unwrap();
    let confirmed = [outbox_row(&store).await, outbox_row(&store).await];
    let unconfirmed = outbox_row(&store).await;
    let now = Utc::now();
    let mut conn = store.pool().acquire().await.unwrap();
    // No saga changes (as when every compare-and-set lost): the deletes
    // still commit with the statement.
    let written = transition::write(
        &mut conn,
        &[],
        &[],
        None,
        &[],
        &confirmed,
        now,
        now + outbox::PUBLISH_LEASE,
    )
    .await
    .unwrap();
    assert!(written.updated.is_empty());
    assert_eq!(left(&store).await, vec![unconfirmed]);
}

#[tokio::test]
async fn confirmed_rows_are_taken_newest_first_up_to_the_limit_and_handed_back_whole() {
    let confirmed = outbox::Confirmed::default();
    for id in 1..=5 {
        confirmed.push(id);
    }
    // A push while nobody waited is not missed.
    tokio::time::timeout(std::time::Duration::from_secs(5), confirmed.added())
        .await
        .expect("a recorded row wakes the deleter");
    let taken = confirmed.take(3);
    assert_eq!(taken, vec![3, 4, 5]);
    confirmed.put_back(taken);
    let mut all = confirmed.take(100);
    all.sort_unstable();
    assert_eq!(all, vec![1, 2, 3, 4, 5]);
    assert!(confirmed.take(100).is_empty());
}
