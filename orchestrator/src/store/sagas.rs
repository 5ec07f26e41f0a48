//! The `sagas` table.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sagas::{SagaInstance, SagaStatus};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Row, postgres::PgRow};
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
    /// Its search attributes, by name.
    pub attributes: BTreeMap<String, String>,
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
    /// Its search attributes (name, value).
    pub attributes: &'a [(String, String)],
}

/// Every column a [`SagaRecord`] is read from, the attributes as one JSON
/// object (read where the saga is, so a page of sagas is one query).
const COLUMNS: &str = "state, idempotency_key, input, created_at, updated_at, started_by,
     (SELECT jsonb_object_agg(a.name, a.value) FROM saga_attributes a WHERE a.saga_id = sagas.id) AS attributes";

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
        attributes: row
            .try_get::<Option<sqlx::types::Json<BTreeMap<String, String>>>, _>("attributes")?
            .map(|json| json.0)
            .unwrap_or_default(),
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

/// Which sagas a listing (or a bulk retry) is about; `None` and empty
/// mean "any". Checked at the API edge: names are valid, the range is not
/// empty, every attribute is declared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaFilter {
    /// One of these types (`None`: any type).
    pub saga_types: Option<Vec<String>>,
    /// This version of the flow.
    pub version: Option<u32>,
    /// This state.
    pub status: Option<SagaStatus>,
    /// Started with this idempotency key.
    pub idempotency_key: Option<String>,
    /// Created at or after.
    pub created_from: Option<DateTime<Utc>>,
    /// Created strictly before.
    pub created_to: Option<DateTime<Utc>>,
    /// Search attributes that must all match exactly.
    pub attributes: Vec<(String, String)>,
}

/// Sagas matching `filter`, newest first, after `cursor`. Only the
/// conditions the filter sets are written into the statement, so each
/// combination gets a plan that uses its index (an attribute is looked up
/// in `saga_attributes`' primary key, not by scanning sagas).
pub async fn list(
    pool: &PgPool,
    filter: &SagaFilter,
    cursor: Option<Cursor>,
    limit: i64,
) -> Result<Vec<SagaRecord>, StoreError> {
    let mut query =
        QueryBuilder::<Postgres>::new(format!("SELECT id, {COLUMNS} FROM sagas WHERE true"));
    if let Some(types) = &filter.saga_types {
        query
            .push(" AND saga_type = ANY(")
            .push_bind(types.clone())
            .push(")");
    }
    if let Some(version) = filter.version {
        query.push(" AND version = ").push_bind(version as i32);
    }
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(key) = &filter.idempotency_key {
        query.push(" AND idempotency_key = ").push_bind(key.clone());
    }
    if let Some(from) = filter.created_from {
        query.push(" AND created_at >= ").push_bind(from);
    }
    if let Some(to) = filter.created_to {
        query.push(" AND created_at < ").push_bind(to);
    }
    for (name, value) in &filter.attributes {
        query
            .push(" AND id IN (SELECT saga_id FROM saga_attributes WHERE name = ")
            .push_bind(name.clone())
            .push(" AND value = ")
            .push_bind(value.clone())
            .push(")");
    }
    if let Some(cursor) = cursor {
        query
            .push(" AND (created_at, id) < (")
            .push_bind(cursor.created_at)
            .push(", ")
            .push_bind(cursor.id)
            .push(")");
    }
    query
        .push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(limit);
    let rows = query.build().fetch_all(pool).await?;
    rows.iter().map(decode).collect()
}
