//! Idempotent declarations of the exchanges and queues a participant needs.
//!
//! Arguments must match what the orchestrator declares byte for byte in
//! meaning: RabbitMQ refuses (PRECONDITION_FAILED, closing the channel) a
//! re-declaration of a queue with different arguments.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use saga_proto::amqp::{DELIVERY_LIMIT, Topology};

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

/// Arguments of the dead-letter queue: a plain quorum queue.
pub fn dead_letter_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    args
}

/// Arguments of every work queue (participant queues, the reply queue, the
/// notification queue): quorum, dead-lettered to `<ns>.dead-letter`, and at
/// most [`DELIVERY_LIMIT`] deliveries so a message that keeps failing cannot
/// block the queue.
pub fn work_queue_arguments(topology: &Topology) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    args.insert(
        "x-dead-letter-exchange".into(),
        string(&topology.dead_letter_exchange()),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    args
}

/// Declares `<ns>.dead-letter` (fanout) and `<ns>.dead-letters` bound to it.
pub async fn declare_dead_letters(channel: &Channel, topology: &Topology) -> lapin::Result<()> {
    channel
        .exchange_declare(
            topology.dead_letter_exchange().into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            topology.dead_letter_queue().into(),
            durable_queue(),
            dead_letter_queue_arguments(),
        )
        .await?;
    channel
        .queue_bind(
            topology.dead_letter_queue().into(),
            topology.dead_letter_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declares everything a command-handling participant consumes from: the
/// commands exchange, the dead-letter exchange and queue, and the queue
/// `<ns>.participant.<name>` bound with routing key `name`. The reply queue
/// is the orchestrator's to declare.
pub async fn declare_participant(
    channel: &Channel,
    topology: &Topology,
    participant: &str,
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            topology.commands_exchange().into(),
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    declare_dead_letters(channel, topology).await?;
    let queue = topology.participant_queue(participant);
    channel
        .queue_declare(
            queue.clone().into(),
            durable_queue(),
            work_queue_arguments(topology),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            topology.commands_exchange().into(),
            participant.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declares the topic exchange `<ns>.events` and a work queue bound to it
/// with `binding_key` (e.g. `order_placement.*`), for a lifecycle-event
/// subscriber.
pub async fn declare_event_subscription(
    channel: &Channel,
    topology: &Topology,
    queue: &str,
    binding_key: &str,
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            topology.events_exchange().into(),
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    declare_dead_letters(channel, topology).await?;
    channel
        .queue_declare(
            queue.into(),
            durable_queue(),
            work_queue_arguments(topology),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            topology.events_exchange().into(),
            binding_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}
