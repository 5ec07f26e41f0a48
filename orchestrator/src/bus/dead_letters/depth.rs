//! The depth of the namespace's dead-letter queue, as the
//! `saga_dead_letters` gauge: what poison, forged and undeliverable
//! messages an operator has to look at. Read with a passive declare (which
//! changes nothing) every [`INTERVAL`] on the session's set-up channel; the
//! queue holds the whole namespace's dead letters, so every instance
//! reports the same number (aggregate with `max`).

use std::time::Duration;

use lapin::{Channel, options::QueueDeclareOptions, types::FieldTable};
use sagas::errors::Chain;

/// How often the depth is read.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Sets the gauge every [`INTERVAL`] for as long as the session lasts. If
/// the broker refuses the declare (it closes the channel), it stops
/// reading and waits for the session to end; it never ends one itself.
pub async fn watch(channel: &Channel, queue: &str) {
    loop {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
        {
            Ok(declared) => {
                metrics::gauge!("saga_dead_letters").set(f64::from(declared.message_count()))
            }
            Err(error) => {
                tracing::warn!(error = %Chain(&error), %queue, "cannot read the dead-letter queue's depth");
                std::future::pending::<()>().await;
            }
        }
        tokio::time::sleep(INTERVAL).await;
    }
}
