//! The `sagas` table.

use chrono::{DateTime, Utc};
use sagas::{SagaInstance, SagaStatus};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use super::StoreError;

/// A saga as stored.
#[derive(Debug, Clone)]
pub struct SagaRecord {
    /// The machine state (authoritative).
    pub state: SagaInstance,
    /// `StartSaga`'s key, if one was given.
    pub idempotency_key: Option<String>,
    /// The input exactly as the client sent it.
    pub input: String,
    /// When the saga was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// The principal that started it (none for sagas started before
    /// principals were recorded).
    pub started_by: Option<String>,
}

/// A new saga to insert.
#[derive(Debug)]
pub struct NewSaga<'a> {
    /// Its state after `Started`.
    pub state: &'a SagaInstance,
    /// `StartSaga`'s key, if one was given.
    pub idempotency_key: Option<&'a str>,
    /// The input as sent.
    pub input: &'a str,
    /// Creation time.
    pub now: DateTime<Utc>,
    /// The principal starting it.
    pub started_by: &'a str,
}

const COLUMNS: &str = "state, idempotency_key, input, created_at, updated_at, started_by";

fn decode(row: &PgRow) -> Result<SagaRecord, StoreError> {
    let state: serde_json::Value = row.try_get("state")?;
    let state: SagaInstance =
        serde_json::from_value(state).map_err(|source| StoreError::CorruptState {
            id: row.try_get("id").unwrap_or_default(),
            source,
        })?;
    Ok(SagaRecord {
        state,
        idempotency_key: row.try_get("idempotency_key")?,
        input: row.try_get("input")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        started_by: row.try_get("started_by")?,
    })
}

/// The saga's earliest timer, or NULL once it is terminal.
pub(super) fn due_at(state: &SagaInstance) -> Option<DateTime<Utc>> {
    if state.status.is_terminal() {
        return None;
    }
    state
        .next_due_at_ms()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
}

/// The saga's state as stored.
pub(super) fn state_json(state: &SagaInstance) -> serde_json::Value {
    serde_json::to_value(state).expect("saga state always serialises")
}

/// The saga started with (type, idempotency key), if any.
pub async fn find_by_idempotency_key(
    conn: &mut PgConnection,
    saga_type: &str,
    key: &str,
) -> Result<Option<Uuid>, StoreError> {
    let id =
        sqlx::query_scalar("SELECT id FROM sagas WHERE saga_type = $1 AND idempotency_key = $2")
            .bind(saga_type)
            .bind(key)
            .fetch_optional(conn)
            .await?;
    Ok(id)
}

/// Locks the given sagas for the rest of the transaction (in id order, so
/// concurrent batches never deadlock) and returns their states.
pub async fn lock(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<SagaInstance>, StoreError> {
    let rows = sqlx::query("SELECT id, state FROM sagas WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(ids)
        .fetch_all(conn)
        .await?;
    rows.iter().map(decode_state).collect()
}

fn decode_state(row: &PgRow) -> Result<SagaInstance, StoreError> {
    let id: Uuid = row.try_get("id")?;
    let state: serde_json::Value = row.try_get("state")?;
    serde_json::from_value(state).map_err(|source| StoreError::CorruptState { id, source })
}

/// Claims up to `limit` active sagas whose earliest timer is due at `now`,
/// skipping sagas another transaction holds, and locks them.
pub async fn claim_due(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<SagaInstance>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, state FROM sagas WHERE next_due_at <= $1
         ORDER BY next_due_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(decode_state).collect()
}

/// The flow (type and version) of a saga, if it exists.
pub async fn flow_of(pool: &PgPool, id: Uuid) -> Result<Option<(String, u32)>, StoreError> {
    let row: Option<(String, i32)> =
        sqlx::query_as("SELECT saga_type, version FROM sagas WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(t, v)| (t, v as u32)))
}

/// One saga by id.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<SagaRecord>, StoreError> {
    let row = sqlx::query(&format!("SELECT id, {COLUMNS} FROM sagas WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// Where a listing page starts: strictly older than this (created_at, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Creation time of the last saga on the previous page.
    pub created_at: DateTime<Utc>,
    /// Its id (tie-breaker).
    pub id: Uuid,
}

/// Sagas newest first, filtered by type (`None`: any type; `Some`: one of
/// these) and status, after `cursor`.
pub async fn list(
    pool: &PgPool,
    saga_types: Option<&[String]>,
    status: Option<SagaStatus>,
    cursor: Option<Cursor>,
    limit: i64,
) -> Result<Vec<SagaRecord>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT id, {COLUMNS} FROM sagas
         WHERE ($1::text[] IS NULL OR saga_type = ANY($1))
           AND ($2::text IS NULL OR status = $2)
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
         ORDER BY created_at DESC, id DESC
         LIMIT $5"
    ))
    .bind(saga_types)
    .bind(status.map(|s| s.as_str()))
    .bind(cursor.map(|c| c.created_at))
    .bind(cursor.map(|c| c.id))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(decode).collect()
}
