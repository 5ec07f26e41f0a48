//! Consumes participant replies in batches: every reply the broker has
//! already pushed (up to the batch size) is applied in one database
//! transaction, and each delivery is acknowledged only after that
//! transaction committed. An undecodable reply is rejected without requeue,
//! so the queue dead-letters it, and counted; it never blocks the queue.
//!
//! When the database goes away the consumer stops rather than hold its
//! replies: a batch that cannot commit, while the database does not answer
//! a ping on another connection either (one lost connection is retried
//! in place: each give-back counts against the queue's delivery limit),
//! ends the run with
//! [`Ended::DatabaseAway`], after the batches in hand settled (for at most
//! [`HAND_BACK_WITHIN`]) and what committed was acknowledged. The caller
//! closes the channel, which gives every unacknowledged reply back to the
//! queue at once, so another instance (one that has its database) applies
//! them before their steps time out.

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

/// Longest wait, once the database went away, for the batches in hand to
/// settle before their replies are given back (a batch stuck in a silent
/// connection must not hold them: if it commits after all, the redelivered
/// replies are ignored as duplicates). Longer than the store's deadline,
/// so that a batch stuck on a dead connection ends by its deadline (which
/// marks the pool) rather than by being dropped.
pub const HAND_BACK_WITHIN: Duration = Duration::from_secs(6);

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `shutdown` fired; everything in hand was applied and acknowledged.
    Shutdown,
    /// A batch could not commit for want of the database. What committed is
    /// acknowledged; the rest is unacknowledged, for the caller to give
    /// back by closing the channel.
    DatabaseAway,
}

/// How one batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// Committed: its deliveries may be acknowledged.
    Committed,
    /// Not committed: the database is unreachable.
    DatabaseAway,
    /// Not committed: stopping.
    Stopped,
}

/// Consumes `queue` until `shutdown` (after finishing and acknowledging the
/// batches in hand), until the database goes away, or until the channel
/// breaks. Up to `workers` batches are applied at once; replies of one saga
/// in two batches serialise on the saga's row lock, and the machine accepts
/// them in either order.
pub async fn run(
    channel: Channel,
    queue: String,
    settings: ConsumerSettings,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
) -> lapin::Result<Ended> {
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
                let (tags, batch): (Vec<u64>, Batch) = done;
                match batch {
                    Batch::Committed => {
                        if let Err(error) = acks.settle(&channel, &tags).await {
                            break Err(error);
                        }
                    }
                    Batch::DatabaseAway => break Ok(Ended::DatabaseAway),
                    Batch::Stopped => {}
                }
            }
            () = shutdown.cancelled() => break Ok(Ended::Shutdown),
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
    if matches!(result, Ok(Ended::DatabaseAway)) {
        // Settle what can be settled, briefly, then hand the rest back.
        let _ = tokio::time::timeout(HAND_BACK_WITHIN, async {
            while let Some((tags, batch)) = in_flight.next().await {
                if batch == Batch::Committed {
                    acks.settle(&channel, &tags).await?;
                }
            }
            lapin::Result::Ok(())
        })
        .await;
        acks.settle_every_committed(&channel).await?;
        return result;
    }
    // Finish what is in hand, even when stopping.
    while let Some((tags, batch)) = in_flight.next().await {
        if batch == Batch::Committed {
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

    /// Acknowledges every committed delivery one by one, including those a
    /// batch still in hand holds back: the channel is about to close and
    /// give the uncommitted back, so no window is needed.
    async fn settle_every_committed(&mut self, channel: &Channel) -> lapin::Result<()> {
        for tag in std::mem::take(&mut self.committed) {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await?;
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

/// Applies one batch; returns its tags and how it ended.
async fn apply(
    engine: Arc<Engine>,
    replies: Vec<Received>,
    tags: Vec<u64>,
    shutdown: CancellationToken,
) -> (Vec<u64>, Batch) {
    // A batch that does not commit stays unacknowledged, so the broker
    // hands it to another instance once this one lets go of it.
    let batch = apply_until_committed(&engine, &replies, &shutdown).await;
    (tags, batch)
}

/// Applies the batch, retrying other failures (a conflict, a deadlock)
/// with backoff; an unreachable database ends it at once, for the consumer
/// to let go of its replies. An attempt in progress always finishes; once
/// `shutdown` fires no new attempt starts.
async fn apply_until_committed(
    engine: &Engine,
    replies: &[Received],
    shutdown: &CancellationToken,
) -> Batch {
    if replies.is_empty() {
        return Batch::Committed;
    }
    let attempt = || engine.apply_replies(replies);
    let mut connection_lost = 0;
    loop {
        let result = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(5))
                    .without_max_times(),
            )
            .when(|error: &EngineError| !shutdown.is_cancelled() && !error.is_database_away())
            .notify(|error: &EngineError, delay| tracing::warn!(error = %Chain(error), retry_in = ?delay, "could not apply replies; retrying"))
            .await;
        match result {
            Ok(_) => return Batch::Committed,
            Err(error) if error.is_database_away() => {
                // One connection lost (a cut, a backend killed, a failover)
                // is not the database gone: if it answers on another
                // connection, the batch is applied again here (a commit
                // that did happen makes the replies duplicates, ignored).
                // Giving the replies back instead would count a delivery
                // against the queue's limit each time, and a few cuts in a
                // row would dead-letter valid replies.
                if connection_lost < SAME_BATCH_AFTER_A_LOST_CONNECTION
                    && !shutdown.is_cancelled()
                    && engine.store().ping().await
                {
                    connection_lost += 1;
                    tracing::warn!(error = %Chain(&error), "could not apply replies: a connection failed but the database answers; applying them again");
                    continue;
                }
                tracing::warn!(error = %Chain(&error), "could not apply replies: the database is unreachable");
                return Batch::DatabaseAway;
            }
            Err(_) => return Batch::Stopped,
        }
    }
}

/// How many times a batch is applied again after a lost connection while
/// the database answers, before it is taken for away (a proxy that breaks
/// every connection at its commit would otherwise hold the batch for ever).
const SAME_BATCH_AFTER_A_LOST_CONNECTION: u32 = 5;
