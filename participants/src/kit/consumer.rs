//! The consumer loop shared by command participants and event subscribers:
//! connect (with backoff), declare, consume with bounded prefetch and
//! bounded concurrency, and on any connection failure start over.
//!
//! Shutdown: stop taking deliveries (`basic.cancel`), let every task in
//! hand finish (publish, ack), stop background work, run the final drain
//! (outbox flush), close the connection.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a consumer does with its queue.
pub(crate) trait DeliveryHandler: Send + Sync + 'static {
    /// Name for logs and the consumer tag.
    fn name(&self) -> &str;
    /// The queue consumed.
    fn queue(&self) -> String;
    /// Declares the topology (idempotent; runs on every connection).
    fn declare(&self, channel: &Channel) -> impl Future<Output = lapin::Result<()>> + Send;
    /// Handles one delivery and acknowledges it one way or another.
    /// `publisher` is a confirm-mode channel.
    fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        publisher: Channel,
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
    /// Broker URL.
    pub amqp_url: String,
    /// Most unacknowledged deliveries the broker pushes (`basic.qos`).
    pub prefetch: u16,
    /// Most deliveries handled at once.
    pub concurrency: usize,
}

/// How a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("the broker cancelled the consumer")]
    Cancelled,
    #[error("a channel was closed")]
    ChannelClosed,
}

fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
}

/// Connects with backoff; the connection is named after the queue so an
/// operator can tell participants (and namespaces) apart in the broker.
async fn connect(url: &str, name: &str, queue: &str) -> lapin::Result<Connection> {
    let connect = || async {
        Connection::connect(
            url,
            ConnectionProperties::default()
                .with_connection_name(format!("participant {name} on {queue}").into()),
        )
        .await
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
            c = connect(&settings.amqp_url, handler.name(), &queue) => match c {
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
                connection.close(200, "shutdown".into()).await.ok();
                tracing::info!(participant = handler.name(), "stopped");
                return;
            }
            Err(e) => {
                connection.close(320, "reconnecting".into()).await.ok();
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

async fn session<H: DeliveryHandler>(
    handler: &Arc<H>,
    settings: &ConsumerSettings,
    connection: &Connection,
    shutdown: &CancellationToken,
    first: bool,
    ready: &watch::Sender<bool>,
    became_ready: &mut bool,
) -> Result<(), SessionError> {
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
    let mut consumer = consume_channel
        .basic_consume(
            handler.queue().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
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
    let result = loop {
        // Take a permit before the next delivery so at most `concurrency`
        // are in hand; the rest wait in the prefetch buffer.
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            _ = health.tick() => {
                // A channel closed by the broker (not the connection) would
                // otherwise leave us consuming with no way to reply.
                if !publish_channel.status().connected() || !consume_channel.status().connected() {
                    break Err(SessionError::ChannelClosed);
                }
                continue;
            }
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let handler = handler.clone();
                let publisher = publish_channel.clone();
                tasks.spawn(async move {
                    let acker = delivery.acker.clone();
                    let handled = AssertUnwindSafe(handler.clone().handle(delivery, publisher))
                        .catch_unwind()
                        .await;
                    if handled.is_err() {
                        // Requeue: the quorum queue's delivery limit
                        // dead-letters a message that keeps panicking.
                        tracing::error!(
                            participant = handler.name(),
                            "handler panicked; requeueing the delivery"
                        );
                        acker
                            .nack(BasicNackOptions {
                                requeue: true,
                                ..BasicNackOptions::default()
                            })
                            .await
                            .ok();
                    }
                    drop(permit);
                });
            }
            Some(Err(e)) => break Err(SessionError::Amqp(e)),
            None => break Err(SessionError::Cancelled),
        }
    };
    if result.is_ok() {
        consume_channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .ok();
    }
    tasks.close();
    tasks.wait().await;
    stop_background.cancel();
    background.await.ok();
    if result.is_ok() {
        handler.clone().drain(publish_channel.clone()).await;
        consume_channel.close(200, "shutdown".into()).await.ok();
        publish_channel.close(200, "shutdown".into()).await.ok();
    }
    result
}
