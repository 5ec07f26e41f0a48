//! The namespace's dead-letter queue, for operators: what is in it, and
//! putting messages back where they died or throwing them away
//! (`ListDeadLetters`, `RequeueDeadLetters`, `DiscardDeadLetters`, the
//! console). [`depth`] keeps the `saga_dead_letters` gauge.
//!
//! RabbitMQ has no "peek": a message is read by taking it (`basic.get`
//! without auto-ack) and given back by not acknowledging it. Every call
//! here runs on a connection of its own, takes up to [`MAX_SCAN`] messages,
//! acts on the ones asked for, and closes: closing gives back every message
//! it did not acknowledge, whatever happened, crashes included. So:
//!
//! - a listing changes nothing (the messages return to the queue; other
//!   readers see fewer of them for the moment one is held);
//! - a requeue republishes each selected message to the queue it died in,
//!   waits for the broker's confirm of every one, and only then
//!   acknowledges (removes) the dead letters. A crash in between leaves
//!   the dead letter in place *and* the message in its queue: at most a
//!   duplicate, which receivers de-duplicate (inbox, attempt numbers);
//! - a selection with any id that is not in the queue changes nothing.
//!
//! On RabbitMQ 4.x a quorum queue counts every return of a message
//! against its delivery limit (20 by default); see docs/OPERATIONS.md for
//! the policy that exempts the dead-letter queue.

pub mod depth;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
};
use saga_proto::{amqp::Topology, connect::broker::Broker};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Most messages one call reads from the queue: a listing shows the
/// oldest of them, a requeue or discard finds its ids among them.
pub const MAX_SCAN: usize = 5_000;
/// Most ids in one requeue or discard.
pub const MAX_SELECTION: usize = 500;

/// One dead-lettered message, as an operator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its `message_id`, or `sha256:<hex>` of its body when it has none.
    pub id: String,
    /// The queue it died in, where a requeue sends it (empty if unknown).
    pub original_queue: String,
    /// Why it died there (`rejected`, `expired`, `maxlen`, `delivery_limit`).
    pub reason: String,
    /// How many times it died there.
    pub death_count: u64,
    /// When it first died, if the broker said.
    pub first_death_at: Option<DateTime<Utc>>,
    /// The AMQP `type` property.
    pub message_type: String,
    /// The saga, when the body is JSON with a `saga_id`.
    pub saga_id: Option<Uuid>,
    /// The step, when the body is JSON with a `step`.
    pub step: Option<String>,
    /// The body as it is.
    pub body: Vec<u8>,
    /// The `content_type` property.
    pub content_type: String,
}

/// Why a dead-letter operation did nothing (or, for [`Self::Broker`] in
/// the middle of a requeue, possibly part of it: see the module docs).
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The broker could not be reached or broke the call off.
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    /// Some ids are not among the first [`MAX_SCAN`] messages of the queue
    /// (requeued or discarded already, or never there).
    #[error("not in {queue}: {}", ids.join(", "))]
    NotFound {
        /// The dead-letter queue.
        queue: String,
        /// The ids missing.
        ids: Vec<String>,
    },
    /// A selected message cannot be sent back: it names no queue, or one
    /// outside this namespace (only this deployment's queues are ours to
    /// publish into).
    #[error("dead letter {id} cannot be requeued: {why}")]
    NoWayBack {
        /// The dead letter.
        id: String,
        /// What is wrong with its origin.
        why: String,
    },
    /// The broker refused (nacked) or could not route a republished
    /// message; no dead letter was removed.
    #[error("RabbitMQ did not take dead letter {id} back into {queue}: {why}; nothing was removed")]
    NotTaken {
        /// The dead letter.
        id: String,
        /// Where it was sent.
        queue: String,
        /// The broker's answer.
        why: String,
    },
}

/// The dead-letter queue of one namespace.
#[derive(Debug, Clone)]
pub struct DeadLetterQueue {
    broker: Broker,
    topology: Topology,
}

fn text(value: Option<&AMQPValue>) -> String {
    match value {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        _ => String::new(),
    }
}

fn number(value: Option<&AMQPValue>) -> u64 {
    match value {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        _ => 0,
    }
}

/// The id an operator uses for `delivery`.
fn id_of(properties: &BasicProperties, body: &[u8]) -> String {
    match properties.message_id() {
        Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
        _ => format!("sha256:{}", hex::encode(&Sha256::digest(body)[..16])),
    }
}

/// Reads what RabbitMQ wrote into a dead letter: the latest `x-death`
/// entry says where and why it died (falling back on the
/// `x-first-death-*` headers), and the earliest time of any entry is its
/// first death.
fn describe(message: &BasicGetMessage) -> DeadLetter {
    let properties = &message.delivery.properties;
    let body = &message.delivery.data;
    let headers = properties.headers().clone().unwrap_or_default();
    let headers = headers.inner();
    let deaths: Vec<&FieldTable> = match headers.get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths
            .as_slice()
            .iter()
            .filter_map(|d| match d {
                AMQPValue::FieldTable(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let latest = deaths.first();
    let pick = |key: &str, fallback: &str| {
        let found = latest.map(|d| text(d.inner().get(key))).unwrap_or_default();
        if found.is_empty() {
            text(headers.get(fallback))
        } else {
            found
        }
    };
    let first_death_at = deaths
        .iter()
        .filter_map(|d| match d.inner().get("time") {
            Some(AMQPValue::Timestamp(seconds)) => {
                DateTime::from_timestamp(i64::try_from(*seconds).ok()?, 0)
            }
            _ => None,
        })
        .min();
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    DeadLetter {
        id: id_of(properties, body),
        original_queue: pick("queue", "x-first-death-queue"),
        reason: pick("reason", "x-first-death-reason"),
        death_count: latest.map(|d| number(d.inner().get("count"))).unwrap_or(0),
        first_death_at,
        message_type: properties
            .kind()
            .as_ref()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        saga_id: field("saga_id").and_then(|s| s.parse().ok()),
        step: field("step"),
        body: body.clone(),
        content_type: properties
            .content_type()
            .as_ref()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
    }
}

/// The properties of a dead letter sent back: everything it had, without
/// the broker's death records (it dies afresh if it fails again).
fn republished(properties: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (key, value) in old.inner() {
            let key_text = key.as_str();
            if key_text == "x-death"
                || key_text.starts_with("x-first-death-")
                || key_text.starts_with("x-last-death-")
            {
                continue;
            }
            headers.insert(key.clone(), value.clone());
        }
    }
    properties.clone().with_headers(headers)
}

/// Messages taken from the queue by one call, held (unacknowledged) until
/// the call's connection closes.
struct Taken {
    channel: Channel,
    messages: Vec<BasicGetMessage>,
    depth: u64,
}

impl DeadLetterQueue {
    /// The dead-letter queue of `topology`'s namespace on `broker`.
    pub fn new(broker: Broker, topology: Topology) -> Self {
        Self { broker, topology }
    }

    /// The queue's name.
    pub fn queue(&self) -> String {
        self.topology.dead_letter_queue()
    }

    async fn connect(&self) -> Result<Connection, DeadLetterError> {
        let connecting = self.broker.connect(ConnectionProperties::default());
        match tokio::time::timeout(std::time::Duration::from_secs(10), connecting).await {
            Ok(connection) => Ok(connection?),
            Err(_) => Err(DeadLetterError::Broker(lapin::Error::from(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no AMQP handshake within 10 s",
                ),
            ))),
        }
    }

    /// Takes up to `limit` messages from the head of the queue.
    async fn take(&self, connection: &Connection, limit: usize) -> Result<Taken, DeadLetterError> {
        let channel = connection.create_channel().await?;
        let queue = self.queue();
        let mut messages = Vec::new();
        let mut depth = 0;
        while messages.len() < limit {
            let Some(message) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            if messages.is_empty() {
                depth = u64::from(message.message_count) + 1;
            }
            messages.push(message);
        }
        Ok(Taken {
            channel,
            messages,
            depth,
        })
    }

    /// How many messages the queue holds (a passive declare: nothing is
    /// taken).
    pub async fn depth(&self) -> Result<u64, DeadLetterError> {
        let connection = self.connect().await?;
        let result = async {
            let channel = connection.create_channel().await?;
            let declared = channel
                .queue_declare(
                    self.queue().as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok(u64::from(declared.message_count()))
        }
        .await;
        let _ = connection.close(200, "counted".into()).await;
        result
    }

    /// The oldest `limit` dead letters (at most [`MAX_SCAN`]) and the
    /// queue's depth; nothing is removed.
    #[tracing::instrument(skip(self))]
    pub async fn list(&self, limit: usize) -> Result<(Vec<DeadLetter>, u64), DeadLetterError> {
        let connection = self.connect().await?;
        let result = self
            .take(&connection, limit.min(MAX_SCAN))
            .await
            .map(|taken| (taken.messages.iter().map(describe).collect(), taken.depth));
        // Closing gives every message back.
        let _ = connection.close(200, "listed".into()).await;
        result
    }

    /// The held messages whose id is in `ids`, or NotFound naming the ids
    /// that are not there.
    fn select<'a>(
        &self,
        taken: &'a Taken,
        ids: &[String],
    ) -> Result<Vec<(&'a BasicGetMessage, DeadLetter)>, DeadLetterError> {
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut selected = Vec::new();
        for message in &taken.messages {
            let letter = describe(message);
            if let Some(id) = wanted.get(letter.id.as_str()) {
                *seen.entry(id).or_default() += 1;
                selected.push((message, letter));
            }
        }
        let mut missing: Vec<String> = wanted
            .iter()
            .filter(|id| !seen.contains_key(*id))
            .map(|id| (*id).to_owned())
            .collect();
        if missing.is_empty() {
            Ok(selected)
        } else {
            missing.sort();
            Err(DeadLetterError::NotFound {
                queue: self.queue(),
                ids: missing,
            })
        }
    }

    /// Publishes the dead letters `ids` back to the queues they died in
    /// and removes them once every republication is confirmed. Returns
    /// how many messages went back.
    #[tracing::instrument(skip(self), fields(count = ids.len()))]
    pub async fn requeue(&self, ids: &[String]) -> Result<u32, DeadLetterError> {
        let connection = self.connect().await?;
        let result = self.requeue_on(&connection, ids).await;
        let _ = connection.close(200, "requeued".into()).await;
        result
    }

    async fn requeue_on(
        &self,
        connection: &Connection,
        ids: &[String],
    ) -> Result<u32, DeadLetterError> {
        let taken = self.take(connection, MAX_SCAN).await?;
        let selected = self.select(&taken, ids)?;
        let namespace = format!("{}.", self.topology.namespace());
        for (_, letter) in &selected {
            if letter.original_queue.is_empty() {
                return Err(DeadLetterError::NoWayBack {
                    id: letter.id.clone(),
                    why: "it carries no x-death record naming its queue".into(),
                });
            }
            if !letter.original_queue.starts_with(&namespace)
                || letter.original_queue == self.queue()
            {
                return Err(DeadLetterError::NoWayBack {
                    id: letter.id.clone(),
                    why: format!(
                        "it died in {:?}, which is not a queue of namespace {}",
                        letter.original_queue,
                        self.topology.namespace()
                    ),
                });
            }
        }
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut confirms = Vec::new();
        for (message, letter) in &selected {
            // Straight to the queue through the default exchange; mandatory,
            // so a queue deleted since comes back as unroutable.
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    letter.original_queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.delivery.data,
                    republished(&message.delivery.properties),
                )
                .await?;
            confirms.push((letter, confirm));
        }
        for (letter, confirm) in confirms {
            let not_taken = |why: String| DeadLetterError::NotTaken {
                id: letter.id.clone(),
                queue: letter.original_queue.clone(),
                why,
            };
            match confirm.await? {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(returned)) => {
                    return Err(not_taken(format!(
                        "unroutable ({} {})",
                        returned.reply_code, returned.reply_text
                    )));
                }
                Confirmation::Nack(_) => return Err(not_taken("refused (nack)".into())),
            }
        }
        crate::crash_point!("orchestrator::dead_letter_after_republish_before_ack");
        self.acknowledge(&taken, &selected).await?;
        Ok(selected.len() as u32)
    }

    /// Removes the dead letters `ids` for good. Returns how many messages
    /// were removed.
    #[tracing::instrument(skip(self), fields(count = ids.len()))]
    pub async fn discard(&self, ids: &[String]) -> Result<u32, DeadLetterError> {
        let connection = self.connect().await?;
        let result = async {
            let taken = self.take(&connection, MAX_SCAN).await?;
            let selected = self.select(&taken, ids)?;
            self.acknowledge(&taken, &selected).await?;
            Ok(selected.len() as u32)
        }
        .await;
        let _ = connection.close(200, "discarded".into()).await;
        result
    }

    async fn acknowledge(
        &self,
        taken: &Taken,
        selected: &[(&BasicGetMessage, DeadLetter)],
    ) -> Result<(), DeadLetterError> {
        for (message, _) in selected {
            taken
                .channel
                .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
                .await?;
        }
        // The acks are asynchronous: closing the channel cleanly makes the
        // broker process them before it returns the rest.
        taken.channel.close(200, "done".into()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_without_an_id_are_named_by_their_body() {
        let with = BasicProperties::default().with_message_id("m-1".into());
        assert_eq!(id_of(&with, b"x"), "m-1");
        let without = id_of(&BasicProperties::default(), b"{}");
        assert!(without.starts_with("sha256:"), "{without}");
        assert_eq!(without.len(), "sha256:".len() + 32);
        assert_ne!(without, id_of(&BasicProperties::default(), b"{ }"));
    }

    #[test]
    fn republished_messages_lose_their_death_records_only() {
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        headers.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString("ns.participant.a".into()),
        );
        headers.insert("traceparent".into(), AMQPValue::LongString("00-abc".into()));
        let properties = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(headers);
        let again = republished(&properties);
        let kept = again.headers().clone().unwrap();
        assert_eq!(kept.inner().len(), 1);
        assert!(kept.inner().contains_key("traceparent"));
        assert_eq!(again.message_id(), properties.message_id());
    }
}
