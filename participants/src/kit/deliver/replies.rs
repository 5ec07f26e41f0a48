//! Publishing replies: through the default exchange to the command's
//! `reply_to`, persistent and `mandatory`, confirmed by the broker within
//! [`CONFIRM_TIMEOUT`]. What to publish comes from the outbox rows the
//! deciding side wrote; this module only talks to the broker.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use saga_proto::amqp::{CONTENT_TYPE, REPLY_TYPE, TRACEPARENT_HEADER, traceparent};
use saga_proto::telemetry::TraceContext;
use uuid::Uuid;

use super::consumer::{CONFIRM_TIMEOUT, TimedOut, within};
use crate::kit::decide::PendingReply;

/// A reply could not be handed to the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("publishing failed")]
    Amqp(#[from] lapin::Error),
    /// The broker returned the message: nothing is bound to the routing key
    /// (the reply queue does not exist yet).
    #[error("reply returned unroutable ({code} {text}) by the broker")]
    Unroutable {
        /// AMQP reply code, 312 NO_ROUTE.
        code: u16,
        /// Broker's text.
        text: String,
    },
    /// The broker refused to take responsibility for the message.
    #[error("reply negatively acknowledged by the broker")]
    Nacked,
    /// The channel was not in confirm mode (a bug: the kit enables it).
    #[error("the publishing channel does not confirm")]
    NotConfirmed,
    /// The broker did not confirm in time (a cut or black-holed
    /// connection); the channel is not to be trusted any more.
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
}

impl PublishError {
    /// Whether the channel itself is gone, so every later publish on it
    /// fails the same way.
    pub(crate) fn channel_lost(&self) -> bool {
        matches!(self, Self::Amqp(_) | Self::TimedOut(_))
    }

    /// The error and its cause, once each, for logs and the outbox's
    /// `last_error`.
    pub(crate) fn with_cause(&self) -> String {
        sagas::errors::Chain(self).to_string()
    }
}

/// Publishes one reply through the default exchange and waits for the
/// broker's confirm, at most [`CONFIRM_TIMEOUT`]. `mandatory` turns "no
/// such queue" into an error here instead of a silent drop. `sender`, the
/// connection's broker user, goes in the `user_id` property: RabbitMQ
/// refuses a `user_id` other than the connection's own, so the
/// orchestrator can tell which participant's user published a reply.
/// `trace` is the reply span's context when spans are exported; without
/// it the contract's saga-id `traceparent` is sent.
pub(crate) async fn publish(
    channel: &Channel,
    reply: &PendingReply,
    sender: Option<&str>,
    trace: Option<&TraceContext>,
) -> Result<(), PublishError> {
    within(
        "a publisher confirm",
        CONFIRM_TIMEOUT,
        publish_unbounded(channel, reply, sender, trace),
    )
    .await?
}

async fn publish_unbounded(
    channel: &Channel,
    reply: &PendingReply,
    sender: Option<&str>,
    trace: Option<&TraceContext>,
) -> Result<(), PublishError> {
    let message_id = Uuid::now_v7();
    let mut headers = FieldTable::default();
    match trace {
        Some(trace) => trace.to_amqp(&mut headers),
        None => {
            headers.insert(
                TRACEPARENT_HEADER.into(),
                AMQPValue::LongString(LongString::from(traceparent(reply.saga_id, message_id))),
            );
        }
    }
    let properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(message_id.to_string().into())
        .with_correlation_id(reply.saga_id.to_string().into())
        .with_type(REPLY_TYPE.into())
        .with_headers(headers);
    let properties = match sender {
        Some(user) => properties.with_user_id(user.into()),
        None => properties,
    };
    let confirmation = channel
        .basic_publish(
            "".into(),
            reply.reply_to.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            reply.body.as_bytes(),
            properties,
        )
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(PublishError::Unroutable {
                code: returned.reply_code,
                text: returned.reply_text.to_string(),
            })
        }
        Confirmation::Nack(None) => Err(PublishError::Nacked),
        Confirmation::NotRequested => Err(PublishError::NotConfirmed),
    }
}
