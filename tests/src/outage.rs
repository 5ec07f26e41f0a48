//! What an outage cost the business, measured on the orchestrator's
//! database after a run: how many sagas ended as their orders were meant
//! to end (the load knows each order's [`Fate`]), how many operator
//! retries it took, and the longest pause: the longest time in which no
//! saga finished while the run was under way. Failure tests print it as
//! one line starting with `outage summary:`, which docs/RELIABILITY.md
//! quotes.

use std::{collections::HashMap, fmt, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::orders::{Fate, LoadStats};

/// The figures of one run.
#[derive(Debug, Clone, Default)]
pub struct OutageSummary {
    /// Sagas the load started.
    pub sagas: usize,
    /// Of which COMPLETED.
    pub completed: usize,
    /// Of which COMPENSATED.
    pub compensated: usize,
    /// Of which FAILED (or not terminal).
    pub failed: usize,
    /// Of which ended as their order was meant to: completed when it could
    /// be, compensated when a participant was meant to refuse it.
    pub as_meant: usize,
    /// Of the compensated, those meant to be (a participant refuses).
    pub compensated_as_meant: usize,
    /// Of the compensated, those cancelled (`CancelSaga`).
    pub cancelled: usize,
    /// Sagas that ended otherwise (id, state, meant), at most ten.
    pub not_as_meant: Vec<(String, String, Fate)>,
    /// FAILED sagas the operator had to retry.
    pub operator_retries: usize,
    /// The longest time between two consecutive saga ends (or from the
    /// first start to the first end) in the run.
    pub longest_pause: Duration,
    /// The longest time one saga took, from its start to its end.
    pub longest_saga: Duration,
}

impl OutageSummary {
    /// Reads the end of every saga of `load` from `pool`.
    pub async fn measure(
        pool: &PgPool,
        load: &LoadStats,
        operator_retries: usize,
    ) -> Result<Self, sqlx::Error> {
        let ids: Vec<uuid::Uuid> = load
            .started
            .iter()
            .filter_map(|id| id.parse().ok())
            .collect();
        let states: Vec<(uuid::Uuid, String, DateTime<Utc>)> =
            sqlx::query_as("SELECT id, status, created_at FROM sagas WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(pool)
                .await?;
        // The first terminal entry of each saga: later entries are replies
        // ignored after the end.
        let ends: HashMap<uuid::Uuid, DateTime<Utc>> = sqlx::query_as(
            "SELECT saga_id, min(at) FROM saga_history
             WHERE saga_id = ANY($1)
               AND kind IN ('saga_completed', 'saga_compensated', 'saga_failed')
             GROUP BY saga_id",
        )
        .bind(&ids)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        let cancelled: std::collections::HashSet<uuid::Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT saga_id FROM saga_history WHERE saga_id = ANY($1) AND kind = 'cancel_requested'",
        )
        .bind(&ids)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        let mut summary = Self {
            sagas: states.len(),
            operator_retries,
            ..Self::default()
        };
        for (id, status, _) in &states {
            let status = status.to_ascii_uppercase();
            let meant = load.fates.get(&id.to_string()).copied();
            let as_meant = matches!(
                (status.as_str(), meant),
                ("COMPLETED", Some(Fate::Completes))
                    | (
                        "COMPENSATED",
                        Some(Fate::InsufficientFunds | Fate::UnknownSku)
                    )
            );
            match status.as_str() {
                "COMPLETED" => summary.completed += 1,
                "COMPENSATED" => {
                    summary.compensated += 1;
                    if as_meant {
                        summary.compensated_as_meant += 1;
                    } else if cancelled.contains(id) {
                        summary.cancelled += 1;
                    }
                }
                _ => summary.failed += 1,
            }
            if as_meant {
                summary.as_meant += 1;
            } else if summary.not_as_meant.len() < 10
                && let Some(meant) = meant
            {
                summary.not_as_meant.push((id.to_string(), status, meant));
            }
        }
        summary.longest_saga = states
            .iter()
            .filter_map(|(id, _, created)| {
                Some((*ends.get(id)? - *created).to_std().unwrap_or_default())
            })
            .max()
            .unwrap_or_default();
        summary.longest_pause = longest_pause(
            states.iter().map(|(_, _, created)| *created).min(),
            ends.into_values().collect(),
        );
        Ok(summary)
    }

    /// Compensations neither meant nor asked for: the faults caused them.
    pub fn compensated_by_faults(&self) -> usize {
        self.compensated - self.compensated_as_meant - self.cancelled
    }

    /// The share of sagas that ended as meant, in percent.
    pub fn as_meant_percent(&self) -> f64 {
        if self.sagas == 0 {
            return 0.0;
        }
        100.0 * self.as_meant as f64 / self.sagas as f64
    }
}

/// The longest gap between `first_start` and the first end, or between
/// two consecutive ends.
fn longest_pause(first_start: Option<DateTime<Utc>>, mut ends: Vec<DateTime<Utc>>) -> Duration {
    ends.sort();
    let mut previous = first_start.or(ends.first().copied());
    let mut longest = Duration::ZERO;
    for end in ends {
        if let Some(previous) = previous {
            longest = longest.max((end - previous).to_std().unwrap_or_default());
        }
        previous = Some(end);
    }
    longest
}

impl fmt::Display for OutageSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outage summary: sagas={} completed={} compensated={} failed={} as_meant={} ({:.1}%) operator_retries={} longest_pause={:.1}s longest_saga={:.1}s",
            self.sagas,
            self.completed,
            self.compensated,
            self.failed,
            self.as_meant,
            self.as_meant_percent(),
            self.operator_retries,
            self.longest_pause.as_secs_f64(),
            self.longest_saga.as_secs_f64()
        )?;
        for (id, status, meant) in &self.not_as_meant {
            write!(f, "\n  not as meant: {id} {status} (meant {meant:?})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_pause_counts_from_the_first_start() {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(s, 0).unwrap();
        assert_eq!(
            longest_pause(Some(t(0)), vec![t(70), t(3), t(5)]),
            Duration::from_secs(65)
        );
        assert_eq!(
            longest_pause(Some(t(0)), vec![t(20), t(21)]),
            Duration::from_secs(20)
        );
        assert_eq!(longest_pause(None, vec![]), Duration::ZERO);
    }
}
