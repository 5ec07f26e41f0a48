//! Messages a test (or the chaos soak) puts on the broker behind the
//! services' backs: duplicates of real commands, stale and late replies,
//! compensations ahead of their action, and poison of every kind. Also
//! reads queues directly, e.g. to hold a command back ("steal" it) and
//! deliver it late.
//!
//! Everything is published on a confirm-mode channel of a direct (not
//! proxied) connection and confirmed before the call returns.

use std::time::{Duration, Instant};

use lapin::{
    BasicProperties, Channel, Connection,
    message::BasicGetMessage,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use saga_proto::amqp::{
    COMMAND_TYPE, CONTENT_TYPE, CommandMessage, LIFECYCLE_EVENT_TYPE, Phase, REPLY_TYPE,
    ReplyMessage, Topology,
};
use uuid::Uuid;

use crate::env::TestEnv;

/// Why an injection failed.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The broker refused or the connection broke.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker did not confirm a publish.
    #[error("the broker did not confirm a message to {0}")]
    NotConfirmed(String),
}

/// Which queue a poison message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonTarget {
    /// The orchestrator's reply queue.
    Replies,
    /// A command participant's queue.
    Participant(&'static str),
    /// The notification service's lifecycle queue.
    Notification,
}

/// Every poison target of the demo system.
pub const POISON_TARGETS: [PoisonTarget; 5] = [
    PoisonTarget::Replies,
    PoisonTarget::Participant("inventory"),
    PoisonTarget::Participant("payment"),
    PoisonTarget::Participant("orders"),
    PoisonTarget::Notification,
];

/// Bodies no consumer can decode, by kind: none of them is a valid command,
/// reply or lifecycle event, so each must be dead-lettered.
pub fn poison_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let saga = Uuid::new_v4();
    vec![
        ("not JSON", b"{this is not json".to_vec()),
        ("binary", vec![0xff, 0x00, 0xfe, 0x13, 0x37]),
        ("empty", Vec::new()),
        ("JSON, not an object", b"[1, 2, 3]".to_vec()),
        (
            "wrong types",
            serde_json::json!({
                "saga_id": 42, "step": ["x"], "phase": "sideways", "attempt": "one",
                "saga_type": 7, "saga_version": "v1", "participant": null,
                "command": {}, "idempotency_key": 1, "payload": "x",
                "idempotency": true, "status": 3, "state": "nowhere", "data": {}, "at": 5
            })
            .to_string()
            .into_bytes(),
        ),
        (
            "reply with an unknown field",
            serde_json::json!({
                "saga_id": saga, "step": "reserve_inventory", "phase": "action",
                "attempt": 1, "idempotency_key": format!("{saga}:reserve_inventory:action:1"),
                "status": "success", "data": null, "surprise": true
            })
            .to_string()
            .into_bytes(),
        ),
    ]
}

/// A direct broker connection for injecting and inspecting messages.
#[derive(Debug)]
pub struct Injector {
    /// Kept open for the channels.
    connection: Connection,
    /// Confirm-mode channel for publishing.
    channel: Channel,
    /// Names of the env.
    topology: Topology,
    /// A private queue for answers to injected commands.
    private_replies: String,
}

impl Injector {
    /// Connects and declares a private reply queue (removed with `env`).
    pub async fn connect(env: &TestEnv) -> Result<Self, InjectError> {
        let connection = env.amqp_connection().await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let topology = env.topology();
        let private_replies = format!("{}.injected.replies", topology.namespace());
        channel
            .queue_declare(
                private_replies.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        env.track_queue(&private_replies);
        Ok(Self {
            connection,
            channel,
            topology,
            private_replies,
        })
    }

    /// The queue answers to injected commands go to.
    pub fn private_replies(&self) -> &str {
        &self.private_replies
    }

    /// The env's names.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Publishes `body` to `queue` through the default exchange, confirmed.
    pub async fn to_queue(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), InjectError> {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(InjectError::NotConfirmed(queue.to_owned()));
        }
        Ok(())
    }

    /// Sends `command` straight to its participant's queue; the answer goes
    /// to `reply_to` (the private queue when `None`).
    pub async fn command(
        &self,
        command: &CommandMessage,
        reply_to: Option<&str>,
    ) -> Result<(), InjectError> {
        let body = serde_json::to_vec(command).expect("commands serialise");
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(COMMAND_TYPE.into())
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_correlation_id(command.saga_id.to_string().into())
            .with_reply_to(reply_to.unwrap_or(&self.private_replies).into());
        self.to_queue(
            &self.topology.participant_queue(&command.participant),
            &body,
            properties,
        )
        .await
    }

    /// Sends `reply` to the orchestrator's reply queue.
    pub async fn reply(&self, reply: &ReplyMessage) -> Result<(), InjectError> {
        let body = serde_json::to_vec(reply).expect("replies serialise");
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(REPLY_TYPE.into())
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_correlation_id(reply.saga_id.to_string().into());
        self.to_queue(&self.topology.reply_queue(), &body, properties)
            .await
    }

    /// The queue of `target`.
    pub fn queue_of(&self, target: PoisonTarget) -> String {
        match target {
            PoisonTarget::Replies => self.topology.reply_queue(),
            PoisonTarget::Participant(name) => self.topology.participant_queue(name),
            PoisonTarget::Notification => participants::demo::notification::queue(&self.topology),
        }
    }

    /// Sends one poison `body` to `target`.
    pub async fn poison(&self, target: PoisonTarget, body: &[u8]) -> Result<(), InjectError> {
        let kind = match target {
            PoisonTarget::Replies => REPLY_TYPE,
            PoisonTarget::Participant(_) => COMMAND_TYPE,
            PoisonTarget::Notification => LIFECYCLE_EVENT_TYPE,
        };
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(kind.into())
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_reply_to(self.private_replies.as_str().into());
        self.to_queue(&self.queue_of(target), body, properties)
            .await
    }

    /// Takes one message from `queue` (acked: it is gone from the broker).
    pub async fn take(&self, queue: &str) -> Result<Option<BasicGetMessage>, InjectError> {
        let got = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?;
        if let Some(message) = &got {
            message
                .delivery
                .acker
                .ack(BasicAckOptions::default())
                .await?;
        }
        Ok(got)
    }

    /// Takes one message from `queue` and rejects it without requeue, as a
    /// participant does with poison: the broker dead-letters it (reason
    /// `rejected`, queue `queue`). Returns whether there was one.
    pub async fn reject_one(&self, queue: &str) -> Result<bool, InjectError> {
        let got = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?;
        let Some(message) = got else {
            return Ok(false);
        };
        message
            .delivery
            .acker
            .reject(lapin::options::BasicRejectOptions { requeue: false })
            .await?;
        Ok(true)
    }

    /// Replies received on the private queue within `within`, until `count`
    /// arrived.
    pub async fn private_answers(
        &self,
        count: usize,
        within: Duration,
    ) -> Result<Vec<ReplyMessage>, InjectError> {
        let deadline = Instant::now() + within;
        let mut answers = Vec::new();
        while answers.len() < count && Instant::now() < deadline {
            match self.take(&self.private_replies.clone()).await? {
                Some(message) => {
                    if let Ok(reply) = serde_json::from_slice(&message.delivery.data) {
                        answers.push(reply);
                    }
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(answers)
    }

    /// Ready messages and consumers of `queue`.
    pub async fn queue_counts(&self, queue: &str) -> Result<(u32, u32), InjectError> {
        let channel = self.connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "bye".into()).await;
        let declared = declared?;
        Ok((declared.message_count(), declared.consumer_count()))
    }

    /// Every message in the dead-letter queue with how it died, read
    /// without consuming it (nothing is acked; closing the channel puts
    /// them back), at most `limit`.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, InjectError> {
        let channel = self.connection.create_channel().await?;
        let queue = self.topology.dead_letter_queue();
        let mut found = Vec::new();
        while found.len() < limit {
            let Some(message) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            found.push(DeadLetter::of(&message));
        }
        let _ = channel.close(200, "bye".into()).await;
        Ok(found)
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

/// A message found in the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its body.
    pub body: Vec<u8>,
    /// The queue it died in (`x-first-death-queue`).
    pub queue: String,
    /// Why (`x-first-death-reason`: `rejected`, `delivery_limit` ...).
    pub reason: String,
    /// How many times it died there (`x-death[0].count`).
    pub deaths: i64,
}

impl DeadLetter {
    fn of(message: &BasicGetMessage) -> Self {
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let text = |key: &str| match headers.inner().get(key) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
            _ => String::new(),
        };
        let deaths = match headers.inner().get("x-death") {
            Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
                Some(AMQPValue::FieldTable(death)) => match death.inner().get("count") {
                    Some(AMQPValue::LongLongInt(n)) => *n,
                    Some(AMQPValue::LongInt(n)) => i64::from(*n),
                    _ => 0,
                },
                _ => 0,
            },
            _ => 0,
        };
        Self {
            body: message.delivery.data.clone(),
            queue: text("x-first-death-queue"),
            reason: text("x-first-death-reason"),
            deaths,
        }
    }
}

/// The command the orchestrator sends for the first attempt of an
/// order_placement `step` (as `proto/AMQP.md` documents it), for
/// duplicates and early compensations.
pub fn order_command(
    saga_id: Uuid,
    version: u32,
    step: &str,
    phase: Phase,
    payload: serde_json::Value,
) -> CommandMessage {
    let (participant, action, compensation) = match step {
        "reserve_inventory" => ("inventory", "reserve", "release"),
        "charge_payment" => ("payment", "charge", "refund"),
        "authorize_payment" => ("payment", "authorize", "void"),
        "capture_payment" => ("payment", "capture", ""),
        _ => ("orders", "confirm", ""),
    };
    let action_key = format!("{saga_id}:{step}:action:1");
    let (command, idempotency_key, compensates) = match phase {
        Phase::Action => (action, action_key, None),
        Phase::Compensation => (
            compensation,
            format!("{saga_id}:{step}:compensation:1"),
            Some(action_key),
        ),
    };
    CommandMessage {
        saga_id,
        saga_type: "order_placement".into(),
        saga_version: version,
        step: step.into(),
        phase,
        attempt: 1,
        participant: participant.into(),
        command: command.into(),
        idempotency_key,
        compensates,
        payload,
    }
}
