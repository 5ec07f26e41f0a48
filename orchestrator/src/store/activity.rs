//! What is in flight, read for the gauges in one statement: sagas by flow
//! and state, the oldest running one of each flow, the oldest command of
//! each step still waiting for its reply, and the outbox backlog. It reads
//! the whole database, so every instance reports the whole system (and
//! dashboards aggregate these gauges with `max`, never `sum`).

use sqlx::{PgPool, Row};

use super::StoreError;

/// One reading of the system's activity.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Activity {
    /// (saga type, status, count) of running, compensating and failed sagas.
    pub active: Vec<(String, String, i64)>,
    /// (saga type, age in seconds) of the oldest running or compensating saga.
    pub oldest_active: Vec<(String, f64)>,
    /// (saga type, version, step, age in seconds) of the oldest command
    /// waiting for its reply, by step.
    pub waiting_steps: Vec<(String, u32, String, f64)>,
    /// Outbox rows not yet confirmed by the broker.
    pub outbox_pending: i64,
    /// Age in seconds of the oldest of them (0 when there is none).
    pub outbox_oldest_age: f64,
}

/// Reads [`Activity`] (one round trip).
pub async fn read(pool: &PgPool) -> Result<Activity, StoreError> {
    let rows = sqlx::query(
        "SELECT 'active' AS kind, saga_type AS a, status AS b, 0 AS version,
                count(*)::float8 AS value
           FROM sagas WHERE status IN ('running', 'compensating', 'failed')
           GROUP BY saga_type, status
         UNION ALL
         SELECT 'oldest', saga_type, NULL, 0,
                EXTRACT(EPOCH FROM now() - min(created_at))::float8
           FROM sagas WHERE status IN ('running', 'compensating')
           GROUP BY saga_type
         UNION ALL
         SELECT 'waiting', s.saga_type, st->>'name', s.version,
                EXTRACT(EPOCH FROM now())::float8 - min((st->'wait'->>'since_ms')::float8) / 1000.0
           FROM sagas s, jsonb_array_elements(s.state->'steps') AS st
          WHERE s.status IN ('running', 'compensating')
            AND st->'wait'->>'kind' = 'reply_timeout'
            AND (st->'wait'->>'since_ms')::int8 > 0
          GROUP BY s.saga_type, s.version, st->>'name'
         UNION ALL
         SELECT 'outbox', NULL, NULL, 0, (SELECT count(*) FROM outbox)::float8
         UNION ALL
         SELECT 'outbox_oldest', NULL, NULL, 0,
                COALESCE((SELECT EXTRACT(EPOCH FROM now() - created_at)::float8
                            FROM outbox ORDER BY id LIMIT 1), 0)",
    )
    .fetch_all(pool)
    .await?;
    let mut activity = Activity::default();
    for row in rows {
        let kind: String = row.try_get("kind")?;
        let a: Option<String> = row.try_get("a")?;
        let b: Option<String> = row.try_get("b")?;
        let version: i32 = row.try_get("version")?;
        let value: f64 = row.try_get("value")?;
        match kind.as_str() {
            "active" => {
                activity
                    .active
                    .push((a.unwrap_or_default(), b.unwrap_or_default(), value as i64))
            }
            "oldest" => activity
                .oldest_active
                .push((a.unwrap_or_default(), value.max(0.0))),
            "waiting" => activity.waiting_steps.push((
                a.unwrap_or_default(),
                version.max(0) as u32,
                b.unwrap_or_default(),
                value.max(0.0),
            )),
            "outbox" => activity.outbox_pending = value as i64,
            "outbox_oldest" => activity.outbox_oldest_age = value.max(0.0),
            _ => {}
        }
    }
    Ok(activity)
}

/// Sagas in flight in the whole system, for admission control: those with
/// a timer armed, which are exactly the running and compensating ones
/// (terminal and FAILED sagas have none). The partial index `sagas_due`
/// holds only them, so the count reads the index, not the table.
pub async fn in_flight(pool: &PgPool) -> Result<i64, StoreError> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas WHERE next_due_at IS NOT NULL")
        .fetch_one(pool)
        .await?;
    Ok(count)
}
