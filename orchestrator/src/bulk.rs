//! Bulk retry: every FAILED saga matching a filter is retried, at a
//! bounded rate, with progress anyone holding a receiver can watch
//! (`RetryFailedSagas` streams it; the console shows it).
//!
//! The matching sagas are read once, at the start: a saga that fails while
//! the run is going is not swept up by it, and a saga someone else retried
//! meanwhile is *skipped* (the engine refuses to retry what is not FAILED,
//! so nothing is retried twice). The rate bounds the extra load a run puts
//! on participants that may be what made those sagas fail. The run stops
//! when the last receiver of its progress goes away: what was retried
//! stays retried, the rest stays FAILED.

use std::{sync::Arc, time::Duration};

use sagas::{SagaStatus, errors::Chain};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    engine::{Engine, EngineError},
    store::{StoreError, sagas::SagaFilter},
};

/// Retries per second when the caller says 0.
pub const DEFAULT_RATE: u32 = 20;
/// Most retries per second.
pub const MAX_RATE: u32 = 500;
/// Most sagas one run takes on (a larger set is retried in several runs,
/// narrowed by time range).
pub const MAX_MATCHED: usize = 100_000;
/// Reasons kept for sagas that could not be retried.
const KEPT_ERRORS: usize = 5;
/// Rows read per page while collecting the matching sagas.
const PAGE: i64 = 1_000;

/// How far a run has come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// FAILED sagas matched when the run began.
    pub matched: u64,
    /// Retried so far.
    pub retried: u64,
    /// No longer FAILED (or gone) when their turn came.
    pub skipped: u64,
    /// Could not be retried.
    pub failed: u64,
    /// The first few reasons for `failed`.
    pub errors: Vec<String>,
    /// The run is over.
    pub done: bool,
}

/// The ids of the FAILED sagas matching `filter`, newest first.
async fn matching(engine: &Engine, filter: &SagaFilter) -> Result<Vec<Uuid>, StoreError> {
    let filter = SagaFilter {
        status: Some(SagaStatus::Failed),
        ..filter.clone()
    };
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = engine.store().list_sagas(&filter, cursor, PAGE).await?;
        let full = page.len() as i64 == PAGE;
        cursor = page.last().map(|r| crate::store::sagas::Cursor {
            created_at: r.created_at,
            id: r.state.id,
        });
        ids.extend(page.iter().map(|r| r.state.id));
        if !full || ids.len() >= MAX_MATCHED {
            ids.truncate(MAX_MATCHED);
            return Ok(ids);
        }
    }
}

/// Runs one bulk retry over `filter` (already limited to the sagas `by`
/// may operate on) at `rate` per second, publishing progress to
/// `progress`. Fails only if the matching sagas cannot be read.
#[tracing::instrument(skip(engine, filter, progress), fields(saga.type = ?filter.saga_types))]
pub async fn retry_failed(
    engine: Arc<Engine>,
    filter: SagaFilter,
    rate: u32,
    by: String,
    progress: watch::Sender<Progress>,
) -> Result<Progress, StoreError> {
    let ids = matching(&engine, &filter).await?;
    progress.send_modify(|p| p.matched = ids.len() as u64);
    let rate = rate.clamp(1, MAX_RATE);
    let mut pace = tokio::time::interval(Duration::from_secs(1) / rate);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for id in ids {
        if progress.is_closed() {
            tracing::info!("bulk retry abandoned: nobody watches it any more");
            break;
        }
        pace.tick().await;
        let outcome = engine.retry(id, &by).await;
        progress.send_modify(|p| match outcome {
            Ok(_) => p.retried += 1,
            Err(EngineError::Refused(_) | EngineError::SagaNotFound(_)) => p.skipped += 1,
            Err(error) => {
                p.failed += 1;
                if p.errors.len() < KEPT_ERRORS {
                    p.errors.push(format!("saga {id}: {}", Chain(&error)));
                }
            }
        });
    }
    progress.send_modify(|p| p.done = true);
    let last = progress.borrow().clone();
    tracing::info!(
        matched = last.matched,
        retried = last.retried,
        skipped = last.skipped,
        failed = last.failed,
        "bulk retry finished"
    );
    Ok(last)
}
