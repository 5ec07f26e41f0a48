//! The consumer loop shared by command participants and event subscribers:
//! connect (with backoff), declare, consume with bounded prefetch and
//! bounded concurrency, and on any connection failure start over.
//!
//! Deliveries are handed over in batches: when a batch may start, it takes
//! the delivery that woke the loop plus whatever the broker has already
//! pushed (up to `max_batch`), without waiting for more. Under light load a
//! batch is a single delivery; under heavy load a command participant
//! answers a whole batch in one database transaction.
//!
//! Shutdown: stop taking deliveries (`basic.cancel`), let every task in
//! hand finish (publish, ack), stop background work, run the final drain
//! (outbox flush), close the connection.
//!
//! Every wait on the broker is bounded ([`CONNECT_TIMEOUT`],
//! [`SETUP_TIMEOUT`], [`CONFIRM_TIMEOUT`], [`CLOSE_TIMEOUT`]): a connection
//! cut or black-holed at any moment ends the session (noticed through the
//! connection's error events even while every delivery permit is taken),
//! gives the deliveries in hand [`BROKEN_SESSION_GRACE`] to finish, and
//! reconnects. A delivery abandoned that way was not acked, so the broker
//! redelivers it and the inbox answers it again.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Connection, ConnectionProperties};
use saga_proto::connect::broker::Broker;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::kit::stats::{Stats, bump};

/// What a consumer does with its queue.
pub(crate) trait DeliveryHandler: Send + Sync + 'static {
    /// Name for logs and the consumer tag.
    fn name(&self) -> &str;
    /// The queue consumed.
    fn queue(&self) -> String;
    /// Declares the topology (idempotent; runs on every connection).
    fn declare(&self, channel: &Channel) -> impl Future<Output = lapin::Result<()>> + Send;
    /// Handles a batch of deliveries (one or more, in arrival order) and
    /// settles each one way or another. `publisher` is a confirm-mode
    /// channel. `slot` is the batch's share of the consumer's concurrency:
    /// dropping it once the database work is done lets the next batch start
    /// while this one still publishes and acks.
    fn handle(
        self: Arc<Self>,
        deliveries: Vec<Delivery>,
        publisher: Channel,
        slot: OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> + Send;
    /// Work running beside the consumer for the life of one connection
    /// (the outbox relay); must return when `stop` fires. `first` is true on
    /// the first connection of the process.
    fn background(
        self: Arc<Self>,
        publisher: Channel,
        stop: CancellationToken,
        first: bool,
    ) -> impl Future<Output = ()> + Send;
    /// Last work at shutdown, after every delivery in hand is done.
    fn drain(self: Arc<Self>, publisher: Channel) -> impl Future<Output = ()> + Send;
}

/// Connection and flow-control settings of a consumer.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerSettings {
    /// The broker.
    pub broker: Broker,
    /// Most unacknowledged deliveries the broker pushes (`basic.qos`).
    pub prefetch: u16,
    /// Most batches handled at once.
    pub concurrency: usize,
    /// Most deliveries in one batch: those the broker already pushed when
    /// a batch starts, taken without waiting for more.
    pub max_batch: usize,
}

/// Longest wait for one connection attempt (TCP, TLS-less AMQP handshake).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a session's set-up: channels, confirm mode, topology,
/// `basic.qos`, `basic.consume`.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for a publisher confirm, or for an ack, nack or reject to
/// be handed to the connection.
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a channel or connection close handshake.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the deliveries in hand of a broken session may still run
/// before the consumer reconnects without them.
pub(crate) const BROKEN_SESSION_GRACE: Duration = Duration::from_secs(5);

/// A broker operation that did not finish within its bound.
#[derive(Debug, thiserror::Error)]
#[error("{what} took longer than {limit:?}")]
pub struct TimedOut {
    /// What was waited for.
    pub what: &'static str,
    /// The bound.
    pub limit: Duration,
}

/// Awaits `future` for at most `limit`.
pub(crate) async fn within<T>(
    what: &'static str,
    limit: Duration,
    future: impl Future<Output = T>,
) -> Result<T, TimedOut> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| TimedOut { what, limit })
}

/// How a delivery is settled with the broker.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Settle {
    /// Done with it.
    Ack,
    /// Deliver it again (counts against the queue's delivery limit).
    Requeue,
    /// Reject it without requeue: the queue dead-letters it.
    DeadLetter,
}

/// Why a delivery could not be settled (the broker redelivers it).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SettleError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
}

/// Acks, requeues or dead-letters a delivery, waiting at most
/// [`CONFIRM_TIMEOUT`] for the connection to take it.
pub(crate) async fn settle(acker: &Acker, how: Settle) -> Result<(), SettleError> {
    let settled = match how {
        Settle::Ack => {
            within(
                "acking a delivery",
                CONFIRM_TIMEOUT,
                acker.ack(BasicAckOptions::default()),
            )
            .await
        }
        Settle::Requeue => {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            within(
                "requeueing a delivery",
                CONFIRM_TIMEOUT,
                acker.nack(requeue),
            )
            .await
        }
        Settle::DeadLetter => {
            let reject = BasicRejectOptions { requeue: false };
            within(
                "dead-lettering a delivery",
                CONFIRM_TIMEOUT,
                acker.reject(reject),
            )
            .await
        }
    };
    settled??;
    Ok(())
}

/// Decodes a delivery's JSON body as `T`. A body that does not decode is
/// poison: counted (`participant_poison_messages_total`), rejected without
/// requeue so the quorum queue dead-letters it, and `None` is returned.
/// `what` names the message in the warning ("command", "lifecycle event").
pub(crate) async fn decode_or_dead_letter<T: serde::de::DeserializeOwned>(
    delivery: &Delivery,
    participant: &str,
    stats: &Stats,
    what: &'static str,
) -> Option<T> {
    match serde_json::from_slice(&delivery.data) {
        Ok(decoded) => Some(decoded),
        Err(e) => {
            bump(
                &stats.poison,
                participant,
                "participant_poison_messages_total",
                1,
            );
            tracing::warn!(%participant, error = %e, bytes = delivery.data.len(), "undecodable {what}: dead-lettering it");
            if let Err(e) = settle(&delivery.acker, Settle::DeadLetter).await {
                tracing::warn!(%participant, error = %e, "could not reject a poison message; it comes back");
            }
            None
        }
    }
}

/// How a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
    #[error("the broker cancelled the consumer")]
    Cancelled,
    #[error("a channel was closed")]
    ChannelClosed,
    #[error("the connection failed: {0}")]
    ConnectionBroken(lapin::Error),
}

fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .without_max_times()
}

/// Connects with backoff, each attempt bounded by [`CONNECT_TIMEOUT`]; the
/// connection is named after the queue so an operator can tell participants
/// (and namespaces) apart in the broker.
async fn connect(broker: &Broker, name: &str, queue: &str) -> Result<Connection, SessionError> {
    let connect = || async {
        let attempt = broker.connect(
            ConnectionProperties::default()
                .with_connection_name(format!("participant {name} on {queue}").into()),
        );
        Ok(within("connecting to RabbitMQ", CONNECT_TIMEOUT, attempt).await??)
    };
    connect
        .retry(reconnect_backoff())
        .notify(|e, wait| {
            tracing::warn!(participant = name, error = %e, retry_in = ?wait, "RabbitMQ not reachable")
        })
        .await
}

/// Runs `handler` until `shutdown` fires, reconnecting as needed. `ready`
/// turns true once the first consumer is registered with the broker.
pub(crate) async fn serve<H: DeliveryHandler>(
    handler: Arc<H>,
    settings: ConsumerSettings,
    shutdown: CancellationToken,
    ready: watch::Sender<bool>,
) {
    let mut first = true;
    let mut failures: u32 = 0;
    let queue = handler.queue();
    loop {
        let connection = tokio::select! {
            () = shutdown.cancelled() => return,
            c = connect(&settings.broker, handler.name(), &queue) => match c {
                Ok(c) => c,
                // Only reachable if the backoff were bounded.
                Err(e) => {
                    tracing::error!(participant = handler.name(), error = %e, "giving up connecting");
                    return;
                }
            },
        };
        let mut became_ready = false;
        let outcome = session(
            &handler,
            &settings,
            &connection,
            &shutdown,
            first,
            &ready,
            &mut became_ready,
        )
        .await;
        first = false;
        match outcome {
            Ok(()) => {
                close_connection(&connection, 200, "shutdown").await;
                tracing::info!(participant = handler.name(), "stopped");
                return;
            }
            Err(e) => {
                close_connection(&connection, 320, "reconnecting").await;
                failures = if became_ready { 1 } else { failures + 1 };
                // A session that fails before consuming (e.g. a declaration
                // the broker refuses) would otherwise spin reconnecting.
                let wait = Duration::from_millis(200 * 2u64.pow(failures.min(6)))
                    .min(Duration::from_secs(10));
                tracing::warn!(participant = handler.name(), error = %e, retry_in = ?wait, "AMQP session ended; reconnecting");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Closes a connection, waiting at most [`CLOSE_TIMEOUT`] for the broker.
async fn close_connection(connection: &Connection, code: u16, text: &str) {
    within(
        "closing the connection",
        CLOSE_TIMEOUT,
        connection.close(code, text.into()),
    )
    .await
    .ok();
}

/// The channels and consumer of one session, set up.
struct Session {
    consume_channel: Channel,
    publish_channel: Channel,
    consumer: lapin::Consumer,
    tag: String,
}

/// Opens the channels, declares the topology and starts consuming.
async fn open_session<H: DeliveryHandler>(
    handler: &Arc<H>,
    settings: &ConsumerSettings,
    connection: &Connection,
) -> Result<Session, SessionError> {
    let consume_channel = connection.create_channel().await?;
    let publish_channel = connection.create_channel().await?;
    publish_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    handler.declare(&consume_channel).await?;
    consume_channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("{}-{}", handler.name(), uuid::Uuid::new_v4().simple());
    let consumer = consume_channel
        .basic_consume(
            handler.queue().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(Session {
        consume_channel,
        publish_channel,
        consumer,
        tag,
    })
}

async fn session<H: DeliveryHandler>(
    handler: &Arc<H>,
    settings: &ConsumerSettings,
    connection: &Connection,
    shutdown: &CancellationToken,
    first: bool,
    ready: &watch::Sender<bool>,
    became_ready: &mut bool,
) -> Result<(), SessionError> {
    // Errors of the connection (a cut, a missed heartbeat) end the session
    // wherever it is waiting.
    let mut events = connection.events_listener();
    let broken = async move {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(error) = event {
                return error;
            }
        }
        lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
            lapin::ConnectionState::Closed,
        ))
    };
    tokio::pin!(broken);
    let opened = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        error = &mut broken => return Err(SessionError::ConnectionBroken(error)),
        opened = within("setting up the session", SETUP_TIMEOUT, open_session(handler, settings, connection)) => opened??,
    };
    let Session {
        consume_channel,
        publish_channel,
        mut consumer,
        tag,
    } = opened;
    tracing::info!(participant = handler.name(), queue = %handler.queue(), "consuming");
    ready.send_replace(true);
    *became_ready = true;

    let stop_background = shutdown.child_token();
    let background = tokio::spawn(handler.clone().background(
        publish_channel.clone(),
        stop_background.clone(),
        first,
    ));
    let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let tasks = TaskTracker::new();
    let mut health = tokio::time::interval(Duration::from_secs(1));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A permit is taken before the next batch so at most `concurrency`
    // batches are in their database work; the rest wait in the prefetch
    // buffer (which also bounds the batches still publishing). Shutdown, a broken
    // connection and the health check are watched all the while.
    let mut permit: Option<OwnedSemaphorePermit> = None;
    let result = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            error = &mut broken => break Err(SessionError::ConnectionBroken(error)),
            _ = health.tick() => {
                // A channel closed by the broker (not the connection) would
                // otherwise leave us consuming with no way to reply.
                if !publish_channel.status().connected() || !consume_channel.status().connected() {
                    break Err(SessionError::ChannelClosed);
                }
            }
            p = permits.clone().acquire_owned(), if permit.is_none() => {
                permit = Some(p.expect("the semaphore is never closed"));
            }
            next = consumer.next(), if permit.is_some() => match next {
                Some(Ok(delivery)) => {
                    // Whatever else the broker already pushed joins the batch;
                    // under light load a batch is one delivery and waits for
                    // nothing.
                    let mut batch = vec![delivery];
                    let mut ended = None;
                    while batch.len() < settings.max_batch.max(1) {
                        match consumer.next().now_or_never() {
                            Some(Some(Ok(delivery))) => batch.push(delivery),
                            Some(Some(Err(e))) => {
                                ended = Some(SessionError::Amqp(e));
                                break;
                            }
                            Some(None) => {
                                ended = Some(SessionError::Cancelled);
                                break;
                            }
                            None => break,
                        }
                    }
                    let slot = permit.take().expect("a permit is held while consuming");
                    let handler = handler.clone();
                    let publisher = publish_channel.clone();
                    tasks.spawn(handle_batch(handler, batch, publisher, slot));
                    if let Some(e) = ended {
                        break Err(e);
                    }
                }
                Some(Err(e)) => break Err(SessionError::Amqp(e)),
                None => break Err(SessionError::Cancelled),
            },
        }
    };
    tasks.close();
    if result.is_ok() {
        within(
            "cancelling the consumer",
            CLOSE_TIMEOUT,
            consume_channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
        )
        .await
        .ok();
        // Every wait inside a delivery is bounded, so this ends.
        tasks.wait().await;
    } else if within("deliveries in hand", BROKEN_SESSION_GRACE, tasks.wait())
        .await
        .is_err()
    {
        // Their deliveries were not acked: the broker redelivers them to
        // the next session, and the inbox answers them again.
        tracing::warn!(
            participant = handler.name(),
            in_hand = tasks.len(),
            "reconnecting without waiting longer for deliveries in hand"
        );
    }
    stop_background.cancel();
    let background_abort = background.abort_handle();
    if within("stopping background work", CONFIRM_TIMEOUT, background)
        .await
        .is_err()
    {
        background_abort.abort();
    }
    if result.is_ok() {
        handler.clone().drain(publish_channel.clone()).await;
        for channel in [&consume_channel, &publish_channel] {
            within(
                "closing a channel",
                CLOSE_TIMEOUT,
                channel.close(200, "shutdown".into()),
            )
            .await
            .ok();
        }
    }
    result
}

/// Handles one batch; a panicking handler gets every delivery of the batch
/// it had not settled yet requeued.
async fn handle_batch<H: DeliveryHandler>(
    handler: Arc<H>,
    deliveries: Vec<Delivery>,
    publisher: Channel,
    slot: OwnedSemaphorePermit,
) {
    let ackers: Vec<Acker> = deliveries.iter().map(|d| d.acker.clone()).collect();
    let handled = AssertUnwindSafe(handler.clone().handle(deliveries, publisher, slot))
        .catch_unwind()
        .await;
    if handled.is_err() {
        // Requeue: the quorum queue's delivery limit dead-letters a message
        // that keeps panicking. An acker is single-use, so deliveries the
        // handler already settled are left alone.
        tracing::error!(
            participant = handler.name(),
            deliveries = ackers.len(),
            "handler panicked; requeueing its deliveries"
        );
        for acker in &ackers {
            settle(acker, Settle::Requeue).await.ok();
        }
    }
}
