//! The `outbox` table: messages committed in the same transaction as the
//! state change that produced them, deleted only after the broker confirmed
//! them.
//!
//! A row's `available_at` is a lease. The transaction that writes a row
//! leases it to the in-process publisher for [`PUBLISH_LEASE`]; if the
//! process dies, or the broker is unreachable, the lease runs out and any
//! instance's relay claims the row again. An unroutable command is pushed
//! back with a growing delay and stays until a queue is bound for it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::StoreError;

/// How long the writer of a row owns it before a relay may take it.
pub const PUBLISH_LEASE: Duration = Duration::from_secs(5);

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
}

/// Inserts messages leased to the caller until `lease_until`; returns them
/// with their ids.
pub async fn insert(
    conn: &mut PgConnection,
    mut messages: Vec<OutboxMessage>,
    lease_until: DateTime<Utc>,
) -> Result<Vec<OutboxMessage>, StoreError> {
    if messages.is_empty() {
        return Ok(messages);
    }
    let saga_ids: Vec<Uuid> = messages.iter().map(|m| m.saga_id).collect();
    let message_ids: Vec<Uuid> = messages.iter().map(|m| m.message_id).collect();
    let types: Vec<&str> = messages.iter().map(|m| m.message_type.as_str()).collect();
    let exchanges: Vec<&str> = messages.iter().map(|m| m.exchange.as_str()).collect();
    let keys: Vec<&str> = messages.iter().map(|m| m.routing_key.as_str()).collect();
    let reply_tos: Vec<Option<&str>> = messages.iter().map(|m| m.reply_to.as_deref()).collect();
    let mandatory: Vec<bool> = messages.iter().map(|m| m.mandatory).collect();
    let bodies: Vec<&[u8]> = messages.iter().map(|m| m.body.as_slice()).collect();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox (saga_id, message_id, message_type, exchange, routing_key, reply_to, mandatory, body, available_at)
         SELECT u.saga_id, u.message_id, u.message_type, u.exchange, u.routing_key, u.reply_to, u.mandatory, u.body, $9
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[], $8::bytea[])
              WITH ORDINALITY AS u(saga_id, message_id, message_type, exchange, routing_key, reply_to, mandatory, body, n)
         ORDER BY u.n
         RETURNING id",
    )
    .bind(&saga_ids)
    .bind(&message_ids)
    .bind(&types)
    .bind(&exchanges)
    .bind(&keys)
    .bind(&reply_tos)
    .bind(&mandatory)
    .bind(&bodies)
    .bind(lease_until)
    .fetch_all(conn)
    .await?;
    // RETURNING follows insertion order, which follows ORDER BY u.n.
    for (message, id) in messages.iter_mut().zip(ids) {
        message.id = id;
    }
    Ok(messages)
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
         RETURNING id, saga_id, message_id, message_type, exchange, routing_key, reply_to, mandatory, body, attempts",
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
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    messages.sort_by_key(|m| m.id);
    Ok(messages)
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
