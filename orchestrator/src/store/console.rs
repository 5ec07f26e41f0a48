//! What the console reads and keeps besides sagas: its sessions, and the
//! overview's counts (read through the status index, so they cost the same
//! whatever the size of the table).

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::StoreError;

/// A console session, found by the hash of its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// The principal's name.
    pub principal: String,
    /// The session's CSRF token.
    pub csrf: String,
}

/// Stores a new session (and deletes the expired ones on the way: logins
/// are rare, so this bounds the table without a sweeper).
pub async fn create_session(
    pool: &PgPool,
    id_hash: &[u8],
    row: &SessionRow,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH expired AS (DELETE FROM console_sessions WHERE expires_at < $4)
         INSERT INTO console_sessions (id_hash, principal, csrf, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id_hash)
    .bind(&row.principal)
    .bind(&row.csrf)
    .bind(now)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// The unexpired session with this id hash.
pub async fn session(
    pool: &PgPool,
    id_hash: &[u8],
    now: DateTime<Utc>,
) -> Result<Option<SessionRow>, StoreError> {
    let row = sqlx::query(
        "SELECT principal, csrf FROM console_sessions WHERE id_hash = $1 AND expires_at > $2",
    )
    .bind(id_hash)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(SessionRow {
            principal: r.try_get("principal")?,
            csrf: r.try_get("csrf")?,
        })
    })
    .transpose()
}

/// Ends a session (logout).
pub async fn delete_session(pool: &PgPool, id_hash: &[u8]) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
        .bind(id_hash)
        .execute(pool)
        .await?;
    Ok(())
}

/// (saga type, status, count) of the sagas created since `since` that
/// completed or compensated.
pub async fn finished_since(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> Result<Vec<(String, String, i64)>, StoreError> {
    let rows = sqlx::query(
        "SELECT saga_type, status, count(*) AS n FROM sagas
          WHERE status IN ('completed', 'compensated') AND created_at >= $1
          GROUP BY saga_type, status",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("saga_type")?,
                r.try_get("status")?,
                r.try_get("n")?,
            ))
        })
        .collect()
}

/// (saga type, id, created at) of the oldest running or compensating saga
/// of each flow.
pub async fn oldest_active(
    pool: &PgPool,
) -> Result<Vec<(String, Uuid, DateTime<Utc>)>, StoreError> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (saga_type) saga_type, id, created_at FROM sagas
          WHERE status IN ('running', 'compensating')
          ORDER BY saga_type, created_at, id",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("saga_type")?,
                r.try_get("id")?,
                r.try_get("created_at")?,
            ))
        })
        .collect()
}
