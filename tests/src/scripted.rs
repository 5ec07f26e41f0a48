//! A participant scripted by the test, speaking the raw AMQP contract of
//! `proto/AMQP.md` with plain lapin (no participant kit): it declares and
//! binds its queue, records every command, and answers as told.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use saga_proto::amqp::{CONTENT_TYPE, CommandMessage, REPLY_TYPE, ReplyMessage, ReplyStatus};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::env::{AMQP_URL, TestEnv};

/// What to do with one command.
#[derive(Debug, Clone)]
pub enum Script {
    /// Answer once.
    Reply(ReplyStatus, Value, Option<String>),
    /// Answer twice (a duplicated delivery of the reply).
    ReplyTwice(ReplyStatus, Value, Option<String>),
    /// Never answer (a lost reply).
    Drop,
    /// Keep it until the test calls [`ScriptedParticipant::release_held`].
    Hold,
}

/// Success with `data`.
pub fn success(data: Value) -> Script {
    Script::Reply(ReplyStatus::Success, data, None)
}

/// Business rejection.
pub fn rejected(reason: &str) -> Script {
    Script::Reply(ReplyStatus::Rejected, Value::Null, Some(reason.to_owned()))
}

/// Transient error.
pub fn transient(reason: &str) -> Script {
    Script::Reply(
        ReplyStatus::TransientError,
        Value::Null,
        Some(reason.to_owned()),
    )
}

/// Decides the script for each command.
pub type Behaviour = Arc<dyn Fn(&CommandMessage) -> Script + Send + Sync>;

/// A running scripted participant.
pub struct ScriptedParticipant {
    /// Every command received, in order.
    received: Arc<Mutex<Vec<CommandMessage>>>,
    /// Commands kept by [`Script::Hold`], with their reply queue.
    held: Arc<Mutex<Vec<(CommandMessage, String)>>>,
    /// Publishes replies.
    channel: Channel,
    /// Keeps the connection open.
    connection: Connection,
    /// Stops the consumer.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for ScriptedParticipant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedParticipant")
            .finish_non_exhaustive()
    }
}

/// Builds the reply to `command`.
pub fn reply_to_command(
    command: &CommandMessage,
    status: ReplyStatus,
    data: Value,
    reason: Option<String>,
) -> ReplyMessage {
    ReplyMessage {
        saga_id: command.saga_id,
        step: command.step.clone(),
        phase: command.phase,
        attempt: command.attempt,
        idempotency_key: command.idempotency_key.clone(),
        status,
        data,
        reason,
    }
}

/// Publishes `reply` to `queue` through the default exchange and waits for
/// the broker's confirm.
pub async fn publish_reply(channel: &Channel, queue: &str, reply: &ReplyMessage) {
    let body = serde_json::to_vec(reply).unwrap();
    publish_raw(channel, queue, &body).await;
}

/// Publishes raw bytes to `queue` through the default exchange.
pub async fn publish_raw(channel: &Channel, queue: &str, body: &[u8]) {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_content_type(CONTENT_TYPE.into())
                .with_delivery_mode(2)
                .with_type(REPLY_TYPE.into())
                .with_message_id(uuid::Uuid::new_v4().to_string().into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

impl ScriptedParticipant {
    /// Declares `<ns>.participant.<name>` for each of `names`, binds them and
    /// starts answering; all share one log of received commands.
    pub async fn start(env: &TestEnv, names: &[&str], behaviour: Behaviour) -> Self {
        let topology = env.topology();
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let setup = connection.create_channel().await.unwrap();
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
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        for name in names {
            let queue = topology.participant_queue(name);
            setup
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    saga_proto::amqp::declare::work_queue_arguments(
                        &topology,
                        saga_proto::amqp::declare::QueueType::Quorum,
                    ),
                )
                .await
                .unwrap();
            setup
                .queue_bind(
                    queue.as_str().into(),
                    topology.commands_exchange().into(),
                    (*name).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let consume = connection.create_channel().await.unwrap();
            let consumer = consume
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            tokio::spawn(answer(
                consumer,
                behaviour.clone(),
                received.clone(),
                held.clone(),
                channel.clone(),
                topology.reply_queue(),
                shutdown.clone(),
            ));
        }
        Self {
            received,
            held,
            channel,
            connection,
            shutdown,
        }
    }

    /// Every command received so far.
    pub fn received(&self) -> Vec<CommandMessage> {
        self.received.lock().unwrap().clone()
    }

    /// How many commands are held.
    pub fn held_count(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Answers every held command with `script` (Reply or ReplyTwice).
    pub async fn release_held(&self, status: ReplyStatus, data: Value) {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for (command, queue) in held {
            publish_reply(
                &self.channel,
                &queue,
                &reply_to_command(&command, status, data.clone(), None),
            )
            .await;
        }
    }

    /// A channel to publish arbitrary replies with (confirms on).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Stops consuming and closes the connection.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

async fn answer(
    mut consumer: lapin::Consumer,
    behaviour: Behaviour,
    received: Arc<Mutex<Vec<CommandMessage>>>,
    held: Arc<Mutex<Vec<(CommandMessage, String)>>>,
    channel: Channel,
    default_reply_queue: String,
    shutdown: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => return,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                _ => return,
            },
        };
        let reply_queue = delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|q| q.as_str().to_owned())
            .unwrap_or_else(|| default_reply_queue.clone());
        let command: CommandMessage =
            serde_json::from_slice(&delivery.data).expect("valid command");
        received.lock().unwrap().push(command.clone());
        match behaviour(&command) {
            Script::Reply(status, data, reason) => {
                publish_reply(
                    &channel,
                    &reply_queue,
                    &reply_to_command(&command, status, data, reason),
                )
                .await;
            }
            Script::ReplyTwice(status, data, reason) => {
                let reply = reply_to_command(&command, status, data, reason);
                publish_reply(&channel, &reply_queue, &reply).await;
                publish_reply(&channel, &reply_queue, &reply).await;
            }
            Script::Drop => {}
            Script::Hold => held.lock().unwrap().push((command, reply_queue)),
        }
        let _ = delivery.ack(BasicAckOptions::default()).await;
    }
}
