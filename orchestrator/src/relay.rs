//! The outbox relay: publishes rows whose lease ran out — left behind by a
//! crashed instance, a broken broker connection, or pushed back because no
//! queue was bound for them yet. Claims rows with `FOR UPDATE SKIP LOCKED`
//! (re-leasing them) so several instances never publish the same row at once.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::{bus::publisher::Publisher, engine::Engine, health::Health, store::outbox};

/// Rows claimed per round.
const BATCH: i64 = 500;

/// Runs until `shutdown`: every `interval`, and whenever the engine asks.
pub async fn run(
    engine: Arc<Engine>,
    publisher: Publisher,
    health: Health,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
            () = engine.relay_requested() => {}
        }
        if !health.broker_up() {
            continue;
        }
        loop {
            match outbox::claim_expired(engine.store().pool(), Utc::now(), BATCH).await {
                Ok(rows) => {
                    let claimed = rows.len() as i64;
                    if claimed > 0 {
                        tracing::info!(count = claimed, "relaying outbox rows");
                        metrics::counter!("saga_outbox_relayed_total").increment(claimed as u64);
                    }
                    publisher.publish(rows);
                    if claimed < BATCH {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "outbox relay could not read the outbox");
                    break;
                }
            }
        }
    }
}
