//! Retention: sagas that finished (COMPLETED or COMPENSATED) longer ago
//! than `--retention` are deleted with their history, search attributes
//! and watcher rows, so that storage stays bounded.
//!
//! Deletes go in small batches ([`BATCH`] sagas, one statement each, rows
//! locked with `SKIP LOCKED`), so a sweep never holds many locks, never
//! waits for a saga another transaction holds, and several instances can
//! sweep at once. A sweep that found a full batch goes on at once; one
//! that found less waits for the next [`INTERVAL`].
//!
//! FAILED sagas are never deleted: they wait for an operator. Running and
//! compensating sagas are never touched. An idempotency key is remembered
//! as long as its saga is kept: a start repeated after the saga was
//! deleted starts a new one.

use std::time::Duration;

use chrono::Utc;
use sagas::errors::Chain;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, retention as rows};

/// Sagas deleted per statement.
pub const BATCH: i64 = 500;
/// Pause between sweeps that found less than a full batch.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// Settings of the sweeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// How long a finished saga is kept.
    pub keep: Duration,
    /// Pause between sweeps.
    pub interval: Duration,
}

/// Deletes what is past `settings.keep` until `shutdown`.
pub async fn run(store: Store, settings: RetentionSettings, shutdown: CancellationToken) {
    let Ok(keep) = chrono::Duration::from_std(settings.keep) else {
        tracing::warn!(keep = ?settings.keep, "retention longer than chrono can count: nothing is deleted");
        return;
    };
    loop {
        let cutoff = Utc::now() - keep;
        let deleted = store
            .within(rows::delete_finished_before(store.pool(), cutoff, BATCH))
            .await;
        let full = match deleted {
            Ok(deleted) => {
                if deleted > 0 {
                    metrics::counter!("saga_retention_deleted_total").increment(deleted);
                    tracing::debug!(deleted, %cutoff, "finished sagas deleted");
                }
                deleted == BATCH as u64
            }
            Err(error) => {
                tracing::warn!(error = %Chain(&error), "retention sweep failed; will retry");
                false
            }
        };
        let pause = if full {
            Duration::ZERO
        } else {
            settings.interval
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
