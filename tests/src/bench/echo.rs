//! Echo participants: answer every command at once with success, no
//! database, so a run measures the orchestrator alone. Replies are still
//! persistent and confirmed, and a command is acked only after its reply's
//! confirm, like a real participant.

use futures::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use saga_proto::amqp::{
    CONTENT_TYPE, CommandMessage, REPLY_TYPE, ReplyMessage, ReplyStatus, Topology,
};
use tokio_util::sync::CancellationToken;

/// Declares `<ns>.participant.<name>` for each name and answers until `stop`.
pub async fn run(
    amqp_url: &str,
    topology: &Topology,
    names: &[&str],
    prefetch: u16,
    queue_type: orchestrator::bus::QueueType,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let setup = connection.create_channel().await?;
    setup
        .exchange_declare(
            topology.commands_exchange().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut tasks = Vec::new();
    for name in names {
        let queue = topology.participant_queue(name);
        setup
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                saga_proto::amqp::declare::work_queue_arguments(topology, queue_type),
            )
            .await?;
        setup
            .queue_bind(
                queue.as_str().into(),
                topology.commands_exchange().into(),
                (*name).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consume = connection.create_channel().await?;
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut consumer = consume
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let reply_queue = topology.reply_queue();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    Some((delivery, confirm)) = in_flight.next(), if !in_flight.is_empty() => {
                        let delivery: lapin::message::Delivery = delivery;
                        let confirm: lapin::Result<lapin::Confirmation> = confirm;
                        if confirm.is_ok() {
                            let _ = delivery.ack(BasicAckOptions::default()).await;
                        }
                    }
                    next = consumer.next() => {
                        let Some(Ok(delivery)) = next else { break };
                        let Ok(command) = serde_json::from_slice::<CommandMessage>(&delivery.data) else {
                            let _ = delivery.ack(BasicAckOptions::default()).await;
                            continue;
                        };
                        let reply = ReplyMessage {
                            saga_id: command.saga_id,
                            step: command.step,
                            phase: command.phase,
                            attempt: command.attempt,
                            idempotency_key: command.idempotency_key,
                            status: ReplyStatus::Success,
                            data: serde_json::json!({"reservation_id": "r", "payment_id": "p", "authorization_id": "a"}),
                            reason: None,
                        };
                        let body = serde_json::to_vec(&reply).expect("serialisable");
                        let to = delivery
                            .properties
                            .reply_to()
                            .as_ref()
                            .map(|q| q.as_str().to_owned())
                            .unwrap_or_else(|| reply_queue.clone());
                        let sent = publish
                            .basic_publish(
                                "".into(),
                                to.as_str().into(),
                                BasicPublishOptions::default(),
                                &body,
                                BasicProperties::default()
                                    .with_content_type(CONTENT_TYPE.into())
                                    .with_delivery_mode(2)
                                    .with_type(REPLY_TYPE.into())
                                    .with_correlation_id(command.saga_id.to_string().into()),
                            )
                            .await;
                        match sent {
                            Ok(confirm) => in_flight.push(async move { (delivery, confirm.await) }),
                            Err(_) => break,
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}
