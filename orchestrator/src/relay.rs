//! The outbox relay: publishes rows whose lease ran out — left behind by a
//! crashed instance, a broken broker connection, or pushed back because no
//! queue was bound for them yet. Claims rows with `FOR UPDATE SKIP LOCKED`
//! (re-leasing them) so several instances never publish the same row at once.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use sagas::errors::Chain;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{bus::publisher::Publisher, health::Health, store::Store};

/// Rows claimed per round.
const BATCH: i64 = 500;

/// Asks the relay to run now (cheap to clone): after a broker reconnect,
/// rows whose lease ran out while it was down go out at once.
#[derive(Debug, Clone, Default)]
pub struct Kick(Arc<Notify>);

impl Kick {
    /// Runs the relay as soon as it is free.
    pub fn now(&self) {
        self.0.notify_one();
    }
}

/// Runs until `shutdown`: every `interval`, and whenever kicked.
pub async fn run(
    store: Store,
    publisher: Publisher,
    health: Health,
    kick: Kick,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
            () = kick.0.notified() => {}
        }
        if !health.broker_up() {
            continue;
        }
        loop {
            match store.claim_expired_outbox(Utc::now(), BATCH).await {
                Ok(mut rows) => {
                    let claimed = rows.len() as i64;
                    // Each relayed message gets a producer span of its own,
                    // child of the context stored with its row: it stays in
                    // its saga's trace whoever wrote it.
                    for row in &mut rows {
                        row.trace = row.trace.relayed(
                            &row.exchange,
                            &row.routing_key,
                            row.saga_id,
                            row.message_id,
                        );
                    }
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
                    tracing::warn!(error = %Chain(&error), "outbox relay could not read the outbox");
                    break;
                }
            }
        }
    }
}
