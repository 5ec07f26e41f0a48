//! The `outbox` table: messages committed in the same transaction as the
//! state change that produced them, deleted only after the broker confirmed
//! them.
//!
//! A row's `available_at` is a lease. The transaction that writes a row
//! leases it to the in-process publisher for [`PUBLISH_LEASE`]; if the
//! process dies, or the broker is unreachable, the lease runs out and any
//! instance's relay claims the row again. An unroutable command is pushed
//! back with a growing delay and stays until a queue is bound for it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Notify;
use uuid::Uuid;

use super::StoreError;
use crate::telemetry::spans::MessageTrace;

/// How long the writer of a row owns it before a relay may take it.
pub const PUBLISH_LEASE: Duration = Duration::from_secs(5);

/// Most confirmed rows one transition statement deletes on its way.
pub const MAX_DELETES_PER_WRITE: usize = 1024;

/// Rows the broker confirmed, waiting to be deleted. The next transition
/// statement deletes them on its way ([`Confirmed::take`]), so under load
/// a confirmed row costs no statement and no commit of its own; the
/// publisher's deleter deletes whatever no transition took within a short
/// delay. Until deleted a row is only a duplicate-in-waiting: its lease
/// ([`PUBLISH_LEASE`]) is far longer than that delay.
#[derive(Debug, Clone, Default)]
pub struct Confirmed {
    ids: Arc<Mutex<Vec<i64>>>,
    added: Arc<Notify>,
}

impl Confirmed {
    /// Records a confirmed row.
    pub fn push(&self, id: i64) {
        self.ids.lock().expect("confirmed ids lock").push(id);
        self.added.notify_one();
    }

    /// Takes up to `limit` confirmed rows for the caller to delete. A
    /// caller whose delete did not commit hands them back.
    pub fn take(&self, limit: usize) -> Vec<i64> {
        let mut ids = self.ids.lock().expect("confirmed ids lock");
        let keep = ids.len().saturating_sub(limit);
        ids.split_off(keep)
    }

    /// The rows recorded and not taken yet (confirmed, still in the table).
    pub fn not_deleted(&self) -> Vec<i64> {
        self.ids.lock().expect("confirmed ids lock").clone()
    }

    /// Hands back rows taken by a delete that did not commit.
    pub fn put_back(&self, taken: Vec<i64>) {
        if !taken.is_empty() {
            self.ids.lock().expect("confirmed ids lock").extend(taken);
            self.added.notify_one();
        }
    }

    /// Resolves once a row was recorded since the last call (at once if
    /// one was recorded while nobody waited).
    pub async fn added(&self) {
        self.added.notified().await;
    }
}

/// A message waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Row id (0 until inserted).
    pub id: i64,
    /// Correlation id of the message.
    pub saga_id: Uuid,
    /// Per-delivery id (AMQP `message_id`).
    pub message_id: Uuid,
    /// AMQP `type`, e.g. `saga.command`.
    pub message_type: String,
    /// Where to publish.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// AMQP `reply_to` (commands only).
    pub reply_to: Option<String>,
    /// Whether the broker must return the message if no queue takes it.
    pub mandatory: bool,
    /// JSON body.
    pub body: Vec<u8>,
    /// Publish attempts that came back unroutable.
    pub attempts: i32,
    /// Its place in its saga's trace (stored with the row).
    pub trace: MessageTrace,
}

/// Claims up to `limit` rows whose lease ran out, leasing them to the caller
/// for [`PUBLISH_LEASE`].
pub async fn claim_expired(
    pool: &PgPool,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<OutboxMessage>, StoreError> {
    let lease_until = now + PUBLISH_LEASE;
    let rows = sqlx::query(
        "UPDATE outbox SET available_at = $2
         WHERE id IN (SELECT id FROM outbox WHERE available_at <= $1
                      ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
         RETURNING id, saga_id, message_id, message_type, exchange, routing_key, reply_to, mandatory, body, attempts, traceparent, tracestate",
    )
    .bind(now)
    .bind(lease_until)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut messages = rows
        .iter()
        .map(|row| {
            Ok(OutboxMessage {
                id: row.try_get("id")?,
                saga_id: row.try_get("saga_id")?,
                message_id: row.try_get("message_id")?,
                message_type: row.try_get("message_type")?,
                exchange: row.try_get("exchange")?,
                routing_key: row.try_get("routing_key")?,
                reply_to: row.try_get("reply_to")?,
                mandatory: row.try_get("mandatory")?,
                body: row.try_get("body")?,
                attempts: row.try_get("attempts")?,
                trace: MessageTrace::stored(
                    row.try_get("traceparent")?,
                    row.try_get("tracestate")?,
                ),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    messages.sort_by_key(|m| m.id);
    Ok(messages)
}

/// The bodies of the commands of `sagas` that wait in the outbox: the
/// broker has not confirmed them (rows in `confirmed` were, and are only
/// not deleted yet). Read when reply timeouts come due, so that a timeout
/// does not count while its command has not gone out. No index: the
/// outbox holds only messages in flight, so the scan is short, and an index
/// would cost every insert on the hot path.
pub async fn unsent_commands(
    conn: &mut PgConnection,
    sagas: &[Uuid],
    confirmed: &[i64],
) -> Result<Vec<(Uuid, Vec<u8>)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT saga_id, body FROM outbox
         WHERE saga_id = ANY($1) AND message_type = $2 AND NOT (id = ANY($3))",
    )
    .bind(sagas)
    .bind(saga_proto::amqp::COMMAND_TYPE)
    .bind(confirmed)
    .fetch_all(conn)
    .await?)
}

/// Deletes confirmed rows.
pub async fn delete(pool: &PgPool, ids: &[i64]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Pushes an unroutable row back by `delay`, recording why.
pub async fn defer(pool: &PgPool, id: i64, delay: Duration, error: &str) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE outbox SET available_at = now() + $2, attempts = attempts + 1, last_error = $3 WHERE id = $1",
    )
    .bind(id)
    .bind(delay)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Rows still waiting (for health checks and tests).
pub async fn pending(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}
