//! The append-only `saga_history` table (written by [`super::transition`]),
//! and `saga_watchers`: sagas some `WatchSaga` stream follows, which the
//! transition NOTIFYs on [`CHANNEL`] so every instance hears of them.

use chrono::{DateTime, Utc};
use sagas::SagaStatus;
use sqlx::{PgPool, Row};
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
    /// The principal whose call produced it (start, cancel, retry); none
    /// for what the engine did on its own.
    pub principal: Option<String>,
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

/// Registers `watcher_id` as watching `saga_id`, so transitions of the saga
/// NOTIFY (whichever instance drives it).
pub async fn watch(pool: &PgPool, saga_id: Uuid, watcher_id: Uuid) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO saga_watchers (saga_id, watcher_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(saga_id)
    .bind(watcher_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Removes a watcher registration.
pub async fn unwatch(pool: &PgPool, saga_id: Uuid, watcher_id: Uuid) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM saga_watchers WHERE saga_id = $1 AND watcher_id = $2")
        .bind(saga_id)
        .bind(watcher_id)
        .execute(pool)
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
        "SELECT saga_id, seq, kind, step, status, detail, at, principal FROM saga_history
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
                principal: row.try_get("principal")?,
            })
        })
        .collect()
}
