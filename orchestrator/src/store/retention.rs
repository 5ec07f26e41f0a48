//! The deletes of [`crate::retention`].

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

/// Deletes up to `limit` sagas that finished (COMPLETED or COMPENSATED)
/// and were created and last changed before `cutoff`, with their history,
/// search attributes and watcher rows, in one statement. Sagas another
/// transaction holds are skipped. Returns how many were deleted.
///
/// The sagas are found through the status index (`status`, `created_at`):
/// a saga created before the cutoff is a candidate, and it goes only if it
/// also last changed before it.
pub async fn delete_finished_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<u64, StoreError> {
    let deleted: i64 = sqlx::query_scalar(
        "WITH doomed AS (
                SELECT id FROM sagas
                 WHERE status IN ('completed', 'compensated')
                   AND created_at < $1 AND updated_at < $1
                 ORDER BY created_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED),
              history AS (DELETE FROM saga_history WHERE saga_id IN (SELECT id FROM doomed)),
              attributes AS (DELETE FROM saga_attributes WHERE saga_id IN (SELECT id FROM doomed)),
              watchers AS (DELETE FROM saga_watchers WHERE saga_id IN (SELECT id FROM doomed)),
              gone AS (DELETE FROM sagas WHERE id IN (SELECT id FROM doomed) RETURNING id)
         SELECT count(*) FROM gone",
    )
    .bind(cutoff)
    .bind(limit)
    .fetch_one(pool)
    .await?;
    Ok(deleted as u64)
}
