//! Consumes participant replies in batches: every reply the broker has
//! already pushed (up to the batch size) is applied in one database
//! transaction, and each delivery is acknowledged only after that
//! transaction committed. An undecodable reply is rejected without requeue,
//! so the queue dead-letters it, and counted; it never blocks the queue.

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt};
use lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions},
    types::FieldTable,
};
use saga_proto::amqp::ReplyMessage;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

/// Consumes `queue` until `shutdown` (after finishing and acknowledging the
/// batch in hand) or until the channel breaks.
pub async fn run(
    channel: Channel,
    queue: String,
    prefetch: u16,
    max_batch: usize,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
) -> lapin::Result<()> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("orchestrator-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => return Err(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "consumer ended").into()),
            },
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match consumer.next().now_or_never() {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                _ => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        for delivery in batch {
            match serde_json::from_slice::<ReplyMessage>(&delivery.data) {
                Ok(reply) => {
                    replies.push(reply);
                    accepted.push(delivery);
                }
                Err(error) => {
                    tracing::warn!(%error, "undecodable reply sent to the dead-letter queue");
                    metrics::counter!("saga_replies_dead_lettered_total").increment(1);
                    delivery
                        .reject(BasicRejectOptions { requeue: false })
                        .await?;
                }
            }
        }
        if !apply_until_committed(&engine, &replies, &shutdown).await {
            // Shutting down before the batch committed: leave it unacked so
            // the broker hands it to another instance.
            return Ok(());
        }
        crate::crash_point!("orchestrator::after_reply_commit_before_ack");
        for delivery in &accepted {
            ack(delivery).await?;
        }
    }
}

async fn ack(delivery: &Delivery) -> lapin::Result<()> {
    delivery.ack(BasicAckOptions::default()).await.map(|_| ())
}

/// Applies the batch, retrying with backoff while the database is away.
/// Returns false if shutdown came first.
async fn apply_until_committed(
    engine: &Engine,
    replies: &[ReplyMessage],
    shutdown: &CancellationToken,
) -> bool {
    if replies.is_empty() {
        return true;
    }
    let attempt = || engine.apply_replies(replies);
    let retrying = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times(),
        )
        .notify(|error, delay| tracing::warn!(%error, retry_in = ?delay, "could not apply replies; retrying"));
    tokio::select! {
        result = retrying => result.is_ok(),
        () = shutdown.cancelled() => false,
    }
}
