//! Consumes participant replies in batches: every reply the broker has
//! already pushed (up to the batch size) is applied in one database
//! transaction, and each delivery is acknowledged only after that
//! transaction committed. An undecodable reply is rejected without requeue,
//! so the queue dead-letters it, and counted; it never blocks the queue.

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
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
/// batches in hand) or until the channel breaks. Up to `workers` batches are
/// applied at once; replies of one saga in two batches serialise on the
/// saga's row lock, and the machine accepts them in either order.
pub async fn run(
    channel: Channel,
    queue: String,
    settings: ConsumerSettings,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
) -> lapin::Result<()> {
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
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
    let mut in_flight = FuturesUnordered::new();
    let result = loop {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(error) = done {
                    break Err(error);
                }
            }
            () = shutdown.cancelled() => break Ok(()),
            next = consumer.next(), if in_flight.len() < settings.workers => {
                let first = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(error)) => break Err(error),
                    None => break Err(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "consumer ended").into()),
                };
                let mut batch = vec![first];
                while batch.len() < settings.max_batch {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(delivery))) => batch.push(delivery),
                        _ => break,
                    }
                }
                match decode(batch).await {
                    Ok((replies, accepted)) => {
                        in_flight.push(apply_and_ack(engine.clone(), replies, accepted, shutdown.clone()))
                    }
                    Err(error) => break Err(error),
                }
            }
        }
    };
    // Finish what is in hand, even when stopping.
    while let Some(done) = in_flight.next().await {
        done?;
    }
    result
}

/// Consumer tuning.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerSettings {
    /// Unacknowledged replies the broker may push at once.
    pub prefetch: u16,
    /// Most replies in one transaction.
    pub max_batch: usize,
    /// Batches applied at once.
    pub workers: usize,
}

/// Splits a batch into decodable replies (with their deliveries) and rejects
/// the rest without requeue, so they are dead-lettered.
async fn decode(batch: Vec<Delivery>) -> lapin::Result<(Vec<ReplyMessage>, Vec<Delivery>)> {
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
    Ok((replies, accepted))
}

/// Applies one batch, then acknowledges its deliveries.
async fn apply_and_ack(
    engine: Arc<Engine>,
    replies: Vec<ReplyMessage>,
    accepted: Vec<Delivery>,
    shutdown: CancellationToken,
) -> lapin::Result<()> {
    if !apply_until_committed(&engine, &replies, &shutdown).await {
        // Stopping while the database is away: leave the batch unacked so the
        // broker hands it to another instance.
        return Ok(());
    }
    crate::crash_point!("orchestrator::after_reply_commit_before_ack");
    for delivery in &accepted {
        ack(delivery).await?;
    }
    Ok(())
}

async fn ack(delivery: &Delivery) -> lapin::Result<()> {
    delivery.ack(BasicAckOptions::default()).await.map(|_| ())
}

/// Applies the batch, retrying with backoff while the database is away.
/// An attempt in progress always finishes; once `shutdown` fires no new
/// attempt starts. Returns whether the batch committed.
async fn apply_until_committed(
    engine: &Engine,
    replies: &[ReplyMessage],
    shutdown: &CancellationToken,
) -> bool {
    if replies.is_empty() {
        return true;
    }
    let attempt = || engine.apply_replies(replies);
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times(),
        )
        .when(|_| !shutdown.is_cancelled())
        .notify(|error, delay| tracing::warn!(%error, retry_in = ?delay, "could not apply replies; retrying"))
        .await
        .is_ok()
}
