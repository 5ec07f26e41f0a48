//! Publishes committed outbox rows with publisher confirms, pipelined: many
//! messages are in flight at once and each row is deleted only after the
//! broker confirmed it. An unroutable command (mandatory, no queue bound) is
//! pushed back in the outbox with a growing delay and a warning, never
//! dropped.

use std::time::{Duration, Instant};

use futures::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
};
use saga_proto::amqp::{CONTENT_TYPE, TRACEPARENT_HEADER, traceparent};
use sagas::errors::Chain;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{
    Store,
    outbox::{self, OutboxMessage},
};

/// Hands committed outbox rows to the publisher (cheap to clone).
#[derive(Debug, Clone)]
pub struct Publisher {
    /// Bounded: when the broker is away the queue fills and further rows
    /// simply wait in the outbox for the relay.
    tx: mpsc::Sender<OutboxMessage>,
}

/// The publisher's receiving end, kept across reconnections.
#[derive(Debug)]
pub struct Outgoing {
    /// Rows to publish.
    rx: mpsc::Receiver<OutboxMessage>,
}

/// A publisher handle and its receiving end, holding at most `capacity` rows.
pub fn channel(capacity: usize) -> (Publisher, Outgoing) {
    let (tx, rx) = mpsc::channel(capacity);
    (Publisher { tx }, Outgoing { rx })
}

impl Publisher {
    /// Queues rows for publishing. Rows that do not fit stay in the outbox
    /// until their lease runs out and the relay takes them.
    pub fn publish(&self, messages: Vec<OutboxMessage>) {
        for message in messages {
            if self.tx.try_send(message).is_err() {
                metrics::counter!("saga_outbox_deferred_to_relay_total").increment(1);
            }
        }
    }
}

/// Delay before retrying an unroutable message after `attempts` tries.
fn unroutable_backoff(attempts: i32) -> Duration {
    let ms = 500u64.saturating_mul(1 << attempts.clamp(0, 6));
    Duration::from_millis(ms.min(30_000))
}

fn properties(message: &OutboxMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    match message.trace.context() {
        Some(context) => context.to_amqp(&mut headers),
        // Spans are not exported: the contract's saga-id trace context
        // still ties the saga's messages together.
        None => {
            headers.insert(
                TRACEPARENT_HEADER.into(),
                AMQPValue::LongString(traceparent(message.saga_id, message.message_id).into()),
            );
        }
    }
    let properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(message.message_id.to_string().into())
        .with_correlation_id(message.saga_id.to_string().into())
        .with_type(message.message_type.as_str().into())
        .with_headers(headers);
    match &message.reply_to {
        Some(reply_to) => properties.with_reply_to(reply_to.as_str().into()),
        None => properties,
    }
}

async fn send(
    channel: &Channel,
    message: &OutboxMessage,
) -> lapin::Result<lapin::PublisherConfirm> {
    channel
        .basic_publish(
            message.exchange.as_str().into(),
            message.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: message.mandatory,
                ..Default::default()
            },
            &message.body,
            properties(message),
        )
        .await
}

/// A published message awaiting its confirm.
type InFlight = std::pin::Pin<
    Box<dyn std::future::Future<Output = (OutboxMessage, lapin::Result<Confirmation>)> + Send>,
>;

/// Publishes from `outgoing` on `channel` until `stop` fires (then it
/// publishes what is queued, waits for every confirm and returns) or the
/// channel breaks (then unconfirmed rows stay in the outbox for the relay).
pub async fn run(
    channel: Channel,
    outgoing: &mut Outgoing,
    store: Store,
    stop: CancellationToken,
) -> lapin::Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let deleter_stop = CancellationToken::new();
    let deleter = tokio::spawn(delete_confirmed(store.clone(), deleter_stop.clone()));
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut stopping = false;
    // The first and the latest refusal of the current streak.
    let mut refusals: Option<(Instant, Instant)> = None;
    let result = loop {
        tokio::select! {
            biased;
            Some((message, confirmation)) = in_flight.next() => {
                match settle(&store, message, confirmation) {
                    Err(error) => break Err(error),
                    Ok(Settled::Refused) => {
                        let now = Instant::now();
                        let first = match refusals {
                            Some((first, last)) if now - last < STREAK_GAP => first,
                            _ => now,
                        };
                        refusals = Some((first, now));
                        if now - first >= REFUSED_FOR {
                            break Err(std::io::Error::other(format!(
                                "the broker kept refusing messages for {REFUSED_FOR:?}; reconnecting"
                            ))
                            .into());
                        }
                    }
                    Ok(Settled::Taken) => {}
                }
            }
            message = outgoing.rx.recv(), if !stopping => match message {
                Some(message) => match send(&channel, &message).await {
                    Ok(confirm) => in_flight.push(Box::pin(async move { (message, confirm.await) })),
                    Err(error) => break Err(error),
                },
                None => stopping = true,
            },
            () = stop.cancelled(), if !stopping => stopping = true,
            else => break Ok(()),
        }
        if stopping {
            // Flush: publish what is queued, then wait for every confirm.
            while let Ok(message) = outgoing.rx.try_recv() {
                match send(&channel, &message).await {
                    Ok(confirm) => {
                        in_flight.push(Box::pin(async move { (message, confirm.await) }))
                    }
                    Err(error) => return Err(error),
                }
            }
            if in_flight.is_empty() {
                break Ok(());
            }
        }
    };
    deleter_stop.cancel();
    let _ = deleter.await;
    result
}

/// How long the broker may keep refusing (nacking) messages before the
/// publisher gives up on its connection: a channel can stay stuck on a
/// queue leader that died in a cluster (RabbitMQ 3.10 kept nacking one
/// channel's publishes to one queue for minutes after a node was killed,
/// while other queues took theirs), and a new connection, to the next
/// node, is the cure. Refusals count as one streak while no more than
/// [`STREAK_GAP`] apart, whatever was taken between them (the relay
/// retries a refused row when its lease runs out).
const REFUSED_FOR: Duration = Duration::from_secs(5);

/// Longest gap between two refusals of one streak: more than a lease.
const STREAK_GAP: Duration = Duration::from_secs(15);

/// What the broker did with a message.
enum Settled {
    /// Taken: confirmed, or returned as unroutable (the broker answers).
    Taken,
    /// Refused (nack): left to the relay.
    Refused,
}

/// Acts on one confirm: delete on ack, push back if unroutable, leave to the
/// relay on nack.
fn settle(
    store: &Store,
    message: OutboxMessage,
    confirmation: lapin::Result<Confirmation>,
) -> lapin::Result<Settled> {
    match confirmation? {
        Confirmation::Ack(None) | Confirmation::NotRequested => {
            metrics::counter!("saga_messages_published_total", "type" => message.message_type.clone())
                .increment(1);
            crate::crash_point!("orchestrator::after_publish_before_outbox_delete");
            store.confirmed().push(message.id);
        }
        Confirmation::Ack(Some(returned)) => {
            let delay = unroutable_backoff(message.attempts);
            tracing::warn!(
                exchange = %message.exchange,
                routing_key = %message.routing_key,
                reply = %returned.reply_text,
                retry_in = ?delay,
                "message is unroutable (no queue bound yet); kept in the outbox"
            );
            metrics::counter!("saga_messages_unroutable_total").increment(1);
            let store = store.clone();
            let reason = format!("{} {}", returned.reply_code, returned.reply_text);
            tokio::spawn(async move {
                if let Err(error) = store
                    .within(outbox::defer(store.pool(), message.id, delay, &reason))
                    .await
                {
                    tracing::warn!(error = %Chain(&error), "could not defer an unroutable message; the relay will retry it");
                }
            });
        }
        Confirmation::Nack(_) => {
            tracing::warn!(
                id = message.id,
                "broker refused a message; the relay will retry it"
            );
            metrics::counter!("saga_messages_nacked_total").increment(1);
            return Ok(Settled::Refused);
        }
    }
    Ok(Settled::Taken)
}

/// How long a confirmed row waits for a transition statement to delete it
/// on its way (see [`outbox::Confirmed`]) before the deleter deletes it
/// with a statement of its own; far below [`outbox::PUBLISH_LEASE`].
const DELETE_DELAY: Duration = Duration::from_millis(20);

/// Deletes the confirmed rows no transition took within [`DELETE_DELAY`]
/// (one statement for all of them), and every row left when `stop` fires.
async fn delete_confirmed(store: Store, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = store.confirmed().added() => {
                tokio::select! {
                    () = tokio::time::sleep(DELETE_DELAY) => {}
                    () = stop.cancelled() => {}
                }
            }
            () = stop.cancelled() => {}
        }
        loop {
            let ids = store.confirmed().take(outbox::MAX_DELETES_PER_WRITE);
            if ids.is_empty() {
                break;
            }
            let attempt = || async { store.within(outbox::delete(store.pool(), &ids)).await };
            let result = backon::Retryable::retry(
                attempt,
                backon::ExponentialBuilder::default()
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(10),
            )
            .await;
            if let Err(error) = result {
                // The rows stay: the next transition or deletion takes them
                // again; if none does before their lease runs out, the relay
                // publishes them again, which receivers de-duplicate.
                tracing::warn!(error = %Chain(&error), count = ids.len(), "could not delete confirmed outbox rows");
                store.confirmed().put_back(ids);
                break;
            }
        }
        if stop.is_cancelled() {
            return;
        }
    }
}
