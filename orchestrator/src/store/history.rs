//! The append-only `saga_history` table, and the NOTIFY channel that tells
//! every orchestrator instance (and so every `WatchSaga` stream) that a saga
//! has new history rows.

use chrono::{DateTime, Utc};
use sagas::{HistoryEntry, SagaStatus};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::StoreError;

/// PostgreSQL NOTIFY channel; the payload is the saga id.
pub const CHANNEL: &str = "saga_history";

/// A stored history row.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    /// The saga.
    pub saga_id: Uuid,
    /// 1, 2, 3 ... per saga.
    pub seq: i64,
    /// What happened (see `sagas::HistoryKind`).
    pub kind: String,
    /// The step concerned, if any.
    pub step: Option<String>,
    /// The saga's status after it happened.
    pub status: SagaStatus,
    /// Human-readable detail.
    pub detail: String,
    /// When.
    pub at: DateTime<Utc>,
}

impl HistoryRow {
    /// Whether nothing follows this row unless an operator acts.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "saga_completed" | "saga_compensated" | "saga_failed"
        )
    }
}

/// Appends entries of several sagas in one statement and notifies
/// listeners when the transaction commits.
pub async fn append(
    conn: &mut PgConnection,
    entries: &[(Uuid, HistoryEntry)],
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = entries.iter().map(|(id, _)| *id).collect();
    let seqs: Vec<i64> = entries.iter().map(|(_, e)| e.seq as i64).collect();
    let kinds: Vec<&str> = entries.iter().map(|(_, e)| e.kind.as_str()).collect();
    let steps: Vec<Option<&str>> = entries.iter().map(|(_, e)| e.step.as_deref()).collect();
    let statuses: Vec<&str> = entries.iter().map(|(_, e)| e.status.as_str()).collect();
    let details: Vec<&str> = entries.iter().map(|(_, e)| e.detail.as_str()).collect();
    sqlx::query(
        "INSERT INTO saga_history (saga_id, seq, kind, step, status, detail, at)
         SELECT u.id, u.seq, u.kind, u.step, u.status, u.detail, $7
         FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[])
              AS u(id, seq, kind, step, status, detail)",
    )
    .bind(&ids)
    .bind(&seqs)
    .bind(&kinds)
    .bind(&steps)
    .bind(&statuses)
    .bind(&details)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    let mut distinct: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    distinct.sort_unstable();
    distinct.dedup();
    sqlx::query("SELECT pg_notify($1, id) FROM UNNEST($2::text[]) AS id")
        .bind(CHANNEL)
        .bind(&distinct)
        .execute(conn)
        .await?;
    Ok(())
}

/// A saga's history rows after `after_seq`, in order.
pub async fn since(
    pool: &PgPool,
    saga_id: Uuid,
    after_seq: i64,
) -> Result<Vec<HistoryRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT saga_id, seq, kind, step, status, detail, at FROM saga_history
         WHERE saga_id = $1 AND seq > $2 ORDER BY seq",
    )
    .bind(saga_id)
    .bind(after_seq)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let status: String = row.try_get("status")?;
            Ok(HistoryRow {
                saga_id: row.try_get("saga_id")?,
                seq: row.try_get("seq")?,
                kind: row.try_get("kind")?,
                step: row.try_get("step")?,
                status: SagaStatus::parse(&status).ok_or(StoreError::UnknownStatus(status))?,
                detail: row.try_get("detail")?,
                at: row.try_get("at")?,
            })
        })
        .collect()
}
