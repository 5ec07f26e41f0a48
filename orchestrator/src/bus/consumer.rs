//! Consumes participant replies in batches: every reply the broker has
//! already pushed (up to the batch size) is applied in one database
//! transaction, and each delivery is acknowledged only after that
//! transaction committed. An undecodable reply is rejected without requeue,
//! so the queue dead-letters it, and counted; it never blocks the queue.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions},
    types::FieldTable,
};
use saga_proto::{amqp::ReplyMessage, telemetry::TraceContext};
use sagas::errors::Chain;
use tokio_util::sync::CancellationToken;

use crate::{
    bus::senders::{ReplySenders, Sender},
    engine::{Engine, EngineError},
    messages::Received,
    telemetry::spans,
};

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
    let mut acks = AckWindow::default();
    let result = loop {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (tags, committed): (Vec<u64>, bool) = done;
                if committed
                    && let Err(error) = acks.settle(&channel, &tags).await
                {
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
                match decode(batch, &queue, &engine, settings.senders.as_deref()).await {
                    Ok((replies, tags)) => {
                        acks.outstanding.extend(tags.iter().copied());
                        in_flight.push(apply(engine.clone(), replies, tags, shutdown.clone()));
                    }
                    Err(error) => break Err(error),
                }
            }
        }
    };
    // Finish what is in hand, even when stopping.
    while let Some((tags, committed)) = in_flight.next().await {
        if committed {
            acks.settle(&channel, &tags).await?;
        }
    }
    result
}

/// Acknowledges committed deliveries with as few frames as possible: one
/// `basic.ack(multiple)` up to the highest tag below which every delivery
/// committed. A batch still being applied (or that never committed) holds
/// the window back, so nothing is acknowledged before its commit.
#[derive(Debug, Default)]
struct AckWindow {
    /// Delivered and not yet committed.
    outstanding: BTreeSet<u64>,
    /// Committed and not yet acknowledged.
    committed: BTreeSet<u64>,
}

impl AckWindow {
    async fn settle(&mut self, channel: &Channel, tags: &[u64]) -> lapin::Result<()> {
        crate::crash_point!("orchestrator::after_reply_commit_before_ack");
        for tag in tags {
            self.outstanding.remove(tag);
            self.committed.insert(*tag);
        }
        let upto = match self.outstanding.first() {
            Some(&oldest) => self.committed.range(..oldest).next_back().copied(),
            None => self.committed.last().copied(),
        };
        if let Some(upto) = upto {
            channel
                .basic_ack(upto, BasicAckOptions { multiple: true })
                .await?;
            self.committed = self.committed.split_off(&(upto + 1));
        }
        Ok(())
    }
}

/// Consumer tuning.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// With `--verify-reply-sender`: who may answer for which participant.
    pub senders: Option<Arc<ReplySenders>>,
    /// Unacknowledged replies the broker may push at once.
    pub prefetch: u16,
    /// Most replies in one transaction.
    pub max_batch: usize,
    /// Batches applied at once.
    pub workers: usize,
}

/// Splits a batch into decodable replies (with their delivery tags) and
/// rejects the rest without requeue, so they are dead-lettered: the
/// undecodable, and, with `senders`, replies not published by the user of
/// their step's participant.
async fn decode(
    batch: Vec<Delivery>,
    queue: &str,
    engine: &Engine,
    senders: Option<&ReplySenders>,
) -> lapin::Result<(Vec<Received>, Vec<u64>)> {
    let mut replies = Vec::with_capacity(batch.len());
    let mut accepted = Vec::with_capacity(batch.len());
    for delivery in batch {
        match serde_json::from_slice::<ReplyMessage>(&delivery.data) {
            Ok(reply) => {
                if let Some(senders) = senders
                    && !sender_verified(engine, senders, &reply, &delivery).await?
                {
                    continue;
                }
                // The participant's reply span, carried in the headers, is
                // the parent of this delivery's span.
                let span = spans::process_reply(
                    queue,
                    saga_proto::telemetry::propagation::exporting()
                        .then(|| TraceContext::from_amqp(delivery.properties.headers().as_ref()))
                        .flatten(),
                    reply.saga_id,
                    &reply.step,
                    reply.attempt,
                    delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|id| id.as_str()),
                );
                replies.push(Received { reply, span });
                accepted.push(delivery.delivery_tag);
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

/// Whether `reply` may be applied: published by its step's participant's
/// user, or for a saga or step this orchestrator does not know (the engine
/// ignores those). A forged reply is dead-lettered and counted here; a
/// reply whose step cannot be looked up now (database away) goes back to
/// the queue. `Ok(false)`: the delivery is settled.
async fn sender_verified(
    engine: &Engine,
    senders: &ReplySenders,
    reply: &ReplyMessage,
    delivery: &Delivery,
) -> lapin::Result<bool> {
    let participant = match engine.step_participant(reply.saga_id, &reply.step).await {
        Ok(Some(participant)) => participant,
        Ok(None) => return Ok(true),
        Err(error) => {
            tracing::warn!(error = %Chain(&error), saga_id = %reply.saga_id, "cannot check a reply's sender now; requeued");
            delivery
                .reject(BasicRejectOptions { requeue: true })
                .await?;
            return Ok(false);
        }
    };
    let user_id = delivery.properties.user_id().as_ref().map(|u| u.as_str());
    match senders.check(&participant, user_id) {
        Sender::Verified => Ok(true),
        Sender::Forged {
            participant,
            expected,
            actual,
        } => {
            tracing::warn!(
                saga_id = %reply.saga_id,
                step = %reply.step,
                %participant,
                %expected,
                actual = actual.as_deref().unwrap_or("(none)"),
                "reply not published by the step's participant: dead-lettered, step not moved"
            );
            metrics::counter!("saga_replies_forged_total", "participant" => participant)
                .increment(1);
            delivery
                .reject(BasicRejectOptions { requeue: false })
                .await?;
            Ok(false)
        }
    }
}

/// Applies one batch; returns its tags and whether it committed.
async fn apply(
    engine: Arc<Engine>,
    replies: Vec<Received>,
    tags: Vec<u64>,
    shutdown: CancellationToken,
) -> (Vec<u64>, bool) {
    // Stopping while the database is away leaves the batch unacknowledged,
    // so the broker hands it to another instance.
    let committed = apply_until_committed(&engine, &replies, &shutdown).await;
    (tags, committed)
}

/// Applies the batch, retrying with backoff while the database is away.
/// An attempt in progress always finishes; once `shutdown` fires no new
/// attempt starts. Returns whether the batch committed.
async fn apply_until_committed(
    engine: &Engine,
    replies: &[Received],
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
        .notify(|error: &EngineError, delay| tracing::warn!(error = %Chain(error), retry_in = ?delay, "could not apply replies; retrying"))
        .await
        .is_ok()
}
