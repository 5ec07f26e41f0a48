//! The one declaration of the RabbitMQ topology (feature `lapin`), used by
//! the orchestrator and by the participant kit alike.
//!
//! RabbitMQ refuses (PRECONDITION_FAILED, closing the channel) a
//! re-declaration of a queue with arguments other than those it was first
//! declared with. Every process declares what it consumes from, in any
//! start order, so the arguments of a queue must be written exactly once:
//! here. Participants in other languages find the same arguments in
//! `AMQP.md`.

use std::str::FromStr;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::{DELIVERY_LIMIT, Topology};

/// Which kind of queue the work queues are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Raft-replicated, with a delivery limit for poison messages (the
    /// default, and the only kind participants declare).
    #[default]
    Quorum,
    /// Classic durable queue (no delivery limit: poison messages are only
    /// dead-lettered when a consumer rejects them). For measurements of the
    /// reply queue only.
    Classic,
}

impl FromStr for QueueType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "quorum" => Ok(Self::Quorum),
            "classic" => Ok(Self::Classic),
            other => Err(format!(
                "unknown queue type {other:?}: use quorum or classic"
            )),
        }
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Arguments of the dead-letter queue: a plain quorum queue (no dead-letter
/// exchange of its own: dead letters stay until an operator looks).
pub fn dead_letter_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    args
}

/// Arguments of every work queue (participant queues, the reply queue,
/// event subscriptions): dead-lettered to `<ns>.dead-letter` and, as
/// quorum queues, delivered at most [`DELIVERY_LIMIT`] times so a message
/// that keeps failing cannot block the queue.
pub fn work_queue_arguments(topology: &Topology, queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), string("quorum"));
    }
    args.insert(
        "x-dead-letter-exchange".into(),
        string(&topology.dead_letter_exchange()),
    );
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
    }
    args
}

async fn exchange(channel: &Channel, name: String, kind: ExchangeKind) -> lapin::Result<()> {
    channel
        .exchange_declare(name.into(), kind, durable_exchange(), FieldTable::default())
        .await
}

async fn bound_queue(
    channel: &Channel,
    queue: String,
    arguments: FieldTable,
    exchange: String,
    routing_key: &str,
) -> lapin::Result<()> {
    channel
        .queue_declare(queue.clone().into(), durable_queue(), arguments)
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declares `<ns>.dead-letter` (fanout) and `<ns>.dead-letters` bound to it.
pub async fn dead_letters(channel: &Channel, topology: &Topology) -> lapin::Result<()> {
    exchange(
        channel,
        topology.dead_letter_exchange(),
        ExchangeKind::Fanout,
    )
    .await?;
    bound_queue(
        channel,
        topology.dead_letter_queue(),
        dead_letter_queue_arguments(),
        topology.dead_letter_exchange(),
        "",
    )
    .await
}

/// Declares the orchestrator's side: the commands (direct) and events
/// (topic) exchanges, the dead letters, and the reply queue it consumes.
pub async fn orchestrator(
    channel: &Channel,
    topology: &Topology,
    reply_queue_type: QueueType,
) -> lapin::Result<()> {
    exchange(channel, topology.commands_exchange(), ExchangeKind::Direct).await?;
    exchange(channel, topology.events_exchange(), ExchangeKind::Topic).await?;
    dead_letters(channel, topology).await?;
    channel
        .queue_declare(
            topology.reply_queue().into(),
            durable_queue(),
            work_queue_arguments(topology, reply_queue_type),
        )
        .await?;
    Ok(())
}

/// Declares what a command-handling participant consumes from: the commands
/// exchange, the dead letters, and `<ns>.participant.<name>` bound with
/// routing key `name`. The reply queue is the orchestrator's to declare.
pub async fn participant(
    channel: &Channel,
    topology: &Topology,
    participant: &str,
) -> lapin::Result<()> {
    exchange(channel, topology.commands_exchange(), ExchangeKind::Direct).await?;
    dead_letters(channel, topology).await?;
    bound_queue(
        channel,
        topology.participant_queue(participant),
        work_queue_arguments(topology, QueueType::Quorum),
        topology.commands_exchange(),
        participant,
    )
    .await
}

/// Declares the events exchange and a work queue bound to it with
/// `binding_key` (e.g. `order_placement.*`), for a lifecycle-event
/// subscriber.
pub async fn event_subscription(
    channel: &Channel,
    topology: &Topology,
    queue: &str,
    binding_key: &str,
) -> lapin::Result<()> {
    exchange(channel, topology.events_exchange(), ExchangeKind::Topic).await?;
    dead_letters(channel, topology).await?;
    bound_queue(
        channel,
        queue.to_owned(),
        work_queue_arguments(topology, QueueType::Quorum),
        topology.events_exchange(),
        binding_key,
    )
    .await
}

/// Deletes everything a deployment in `topology`'s namespace declared: the
/// reply and dead-letter queues, the queue of each of `participants`, the
/// subscription queue of each of `subscribers`, `extra_queues`, and the
/// three exchanges. For tests and for tearing a namespace down; what does
/// not exist is skipped (each delete runs on a fresh channel, since a
/// failed one closes its channel).
pub async fn delete_all(
    connection: &lapin::Connection,
    topology: &Topology,
    participants: &[&str],
    subscribers: &[&str],
    extra_queues: &[String],
) {
    let mut queues = vec![topology.reply_queue(), topology.dead_letter_queue()];
    queues.extend(participants.iter().map(|p| topology.participant_queue(p)));
    queues.extend(subscribers.iter().map(|s| topology.subscription_queue(s)));
    queues.extend(extra_queues.iter().cloned());
    for queue in queues {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
                .await;
        }
    }
    for exchange in [
        topology.commands_exchange(),
        topology.events_exchange(),
        topology.dead_letter_exchange(),
    ] {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .exchange_delete(
                    exchange.into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_work_queues_dead_letter_with_a_delivery_limit_and_classic_ones_without() {
        let topology = Topology::new("ns").unwrap();
        let quorum = work_queue_arguments(&topology, QueueType::Quorum);
        let inner = quorum.inner();
        assert_eq!(inner.get("x-queue-type"), Some(&string("quorum")));
        assert_eq!(
            inner.get("x-dead-letter-exchange"),
            Some(&string("ns.dead-letter"))
        );
        assert_eq!(
            inner.get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(DELIVERY_LIMIT))
        );
        let classic = work_queue_arguments(&topology, QueueType::Classic);
        assert_eq!(classic.inner().len(), 1);
        assert!(classic.inner().contains_key("x-dead-letter-exchange"));
        assert_eq!("classic".parse(), Ok(QueueType::Classic));
        assert!("fast".parse::<QueueType>().unwrap_err().contains("fast"));
    }
}
