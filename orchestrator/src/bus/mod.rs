//! RabbitMQ edge: connection supervision, the outbox publisher and the
//! reply consumer (the topology itself is declared by
//! [`saga_proto::amqp::declare`], shared with the participants).
//!
//! [`run`] keeps one connection alive: it connects with backoff, declares the
//! topology, runs the [`publisher`] and the [`consumer`] on their own
//! channels, and starts over when the connection breaks. Health follows the
//! connection. Messages are never lost by a broken connection: commands and
//! events stay in the outbox until confirmed, and unacknowledged replies are
//! redelivered by the broker.

pub mod backlog;
pub mod consumer;
pub mod dead_letters;
pub mod publisher;
pub mod senders;

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use lapin::{Connection, ConnectionProperties};
use saga_proto::{
    amqp::{Topology, declare},
    connect::broker::Broker,
};
use tokio_util::sync::CancellationToken;

use crate::{engine::Engine, health::Health, relay::Kick};

/// Settings of the RabbitMQ edge.
#[derive(Debug, Clone)]
pub struct BusSettings {
    /// The broker, with its TLS settings.
    pub broker: Broker,
    /// Names of exchanges and queues.
    pub topology: Topology,
    /// Unacknowledged replies the broker may push at once.
    pub prefetch: u16,
    /// Most replies handled in one database transaction.
    pub max_batch: usize,
    /// Reply batches applied at once.
    pub workers: usize,
    /// Kind of the reply queue.
    pub queue_type: QueueType,
    /// With `--verify-reply-sender`: who may answer for which participant.
    pub senders: Option<Arc<senders::ReplySenders>>,
}

/// Which kind of queue the reply queue is (quorum unless measuring).
pub use saga_proto::amqp::declare::QueueType;

/// Longest wait for one connection attempt (a black-holed broker would
/// otherwise hold the handshake forever).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two connection attempts: short, because the
/// service is NOT_SERVING for as long as it is disconnected.
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Amqp(lapin::Error),
    #[error("no AMQP handshake within {0:?}")]
    TimedOut(Duration),
}

/// Connects with exponential backoff (100 ms doubling to
/// `MAX_RECONNECT_DELAY`, jittered) until it succeeds or `shutdown` fires.
pub async fn connect(broker: &Broker, shutdown: &CancellationToken) -> Option<Connection> {
    let attempt = || async {
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            broker.connect(ConnectionProperties::default()),
        )
        .await
        .map_err(|_| ConnectError::TimedOut(CONNECT_TIMEOUT))?
        .map_err(ConnectError::Amqp)
    };
    let retrying = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(MAX_RECONNECT_DELAY)
                .with_jitter()
                .without_max_times(),
        )
        .notify(|error, delay| tracing::warn!(%error, ?delay, "cannot reach RabbitMQ, retrying"));
    tokio::select! {
        connection = retrying => connection.ok(),
        () = shutdown.cancelled() => None,
    }
}

/// RabbitMQ refused the TLS handshake, or showed a certificate that does
/// not verify.
#[derive(Debug, thiserror::Error)]
#[error("RabbitMQ at {broker}: the TLS connection failed")]
pub struct BrokerTlsError {
    /// The broker, redacted.
    broker: String,
    /// lapin's reason.
    source: lapin::Error,
}

/// Connects to an amqps:// broker once, before the orchestrator writes
/// anything: a certificate from another CA or for another host stops the
/// start with a message naming RabbitMQ. An unreachable broker does not:
/// the bus waits for it as it always does.
pub async fn check_tls(broker: &Broker) -> Result<(), BrokerTlsError> {
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        broker.connect(ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(connection)) => {
            let _ = connection.close(200, "start-up check".into()).await;
            Ok(())
        }
        Ok(Err(source)) if saga_proto::connect::broker::is_tls_error(&source) => {
            Err(BrokerTlsError {
                broker: broker.to_string(),
                source,
            })
        }
        Ok(Err(error)) => {
            tracing::warn!(%broker, %error, "RabbitMQ not reachable at start; will keep trying");
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// Keeps the broker side running until `shutdown`: publisher and reply
/// consumer on a live connection, reconnecting whenever it breaks.
pub async fn run(
    settings: BusSettings,
    engine: Arc<Engine>,
    mut outgoing: publisher::Outgoing,
    health: Health,
    kick: Kick,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let Some(connection) = connect(&settings.broker, &shutdown).await else {
            break;
        };
        match serve_connection(
            &connection,
            &settings,
            &engine,
            &mut outgoing,
            &health,
            &kick,
            &shutdown,
        )
        .await
        {
            Ok(()) => tracing::info!("RabbitMQ session ended"),
            Err(error) => tracing::warn!(%error, "RabbitMQ session broke; reconnecting"),
        }
        health.set_broker(false);
        let _ =
            tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
    }
}

/// How often a paused consumer looks whether the database is back (the
/// database probe refreshes health every second).
const DATABASE_RECHECK: Duration = Duration::from_millis(200);

/// The reply consumer over the connection's life: it runs on a channel of
/// its own; when the database goes away it closes that channel, which
/// gives every reply it held back to the queue (for an instance that has
/// its database), waits until health sees the database again, and consumes
/// on a new channel. Returns on shutdown or when the connection breaks.
async fn consume_replies(
    connection: &Connection,
    settings: &BusSettings,
    engine: &Arc<Engine>,
    health: &Health,
    shutdown: &CancellationToken,
) -> lapin::Result<()> {
    loop {
        let channel = connection.create_channel().await?;
        let ended = consumer::run(
            channel.clone(),
            settings.topology.reply_queue(),
            consumer::ConsumerSettings {
                senders: settings.senders.clone(),
                prefetch: settings.prefetch,
                max_batch: settings.max_batch,
                workers: settings.workers,
            },
            engine.clone(),
            shutdown.clone(),
        )
        .await?;
        if ended == consumer::Ended::Shutdown {
            return Ok(());
        }
        tracing::warn!(
            "database unreachable: reply consumer paused, held replies given back to the queue"
        );
        metrics::counter!("saga_reply_consumer_pauses_total").increment(1);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            channel.close(200, "database unreachable".into()),
        )
        .await;
        health.set_database(false);
        while !health.database_up() {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(DATABASE_RECHECK) => {}
            }
        }
        tracing::info!("database reachable again: consuming replies");
    }
}

/// One connection's life: returns when it breaks or on shutdown (after the
/// consumer finished its batch and the publisher flushed what it holds).
async fn serve_connection(
    connection: &Connection,
    settings: &BusSettings,
    engine: &Arc<Engine>,
    outgoing: &mut publisher::Outgoing,
    health: &Health,
    kick: &Kick,
    shutdown: &CancellationToken,
) -> lapin::Result<()> {
    let setup = connection.create_channel().await?;
    declare::orchestrator(&setup, &settings.topology, settings.queue_type).await?;
    let publish_channel = connection.create_channel().await?;
    health.set_broker(true);
    tracing::info!(
        namespace = settings.topology.namespace(),
        "connected to RabbitMQ"
    );
    // Rows whose lease ran out while the broker was away go out now.
    kick.now();

    // The consumer stops first on shutdown; the publisher then flushes.
    let consumer_done = CancellationToken::new();
    let mut events = connection.events_listener();
    let broken = async {
        while let Some(event) = events.next().await {
            match event {
                // lapin reports a channel the broker closed (a soft error,
                // such as a passive declare of a queue that does not exist
                // yet) among the connection's events; that channel's owner
                // sees it in its own calls, and the connection is fine.
                lapin::Event::Error(error) if error.is_amqp_soft_error() => {
                    tracing::debug!(%error, "a channel was closed by the broker");
                }
                lapin::Event::Error(error) => return error,
                _ => {}
            }
        }
        lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
            lapin::ConnectionState::Closed,
        ))
    };
    let consumer = consume_replies(connection, settings, engine, health, shutdown);
    let publisher = publisher::run(
        publish_channel,
        outgoing,
        engine.store().clone(),
        consumer_done.clone(),
    );
    let dead_letter_queue = settings.topology.dead_letter_queue();
    let depth = dead_letters::depth::watch(&setup, &dead_letter_queue);
    let participants = engine.catalog().participants();
    let backlog = backlog::watch(
        connection,
        &settings.topology,
        &participants,
        engine.backlogs(),
    );
    tokio::pin!(consumer, publisher, broken, depth, backlog);
    let mut consumer_result = None;
    loop {
        tokio::select! {
            result = &mut consumer, if consumer_result.is_none() => {
                // Consumer finished (shutdown) or broke: let the publisher
                // flush what it holds before returning.
                consumer_done.cancel();
                consumer_result = Some(result);
            }
            result = &mut publisher => {
                consumer_done.cancel();
                return match consumer_result {
                    Some(Err(e)) => Err(e),
                    _ => result,
                };
            }
            error = &mut broken => return Err(error),
            // Never ends; it only sets the gauge while the session lasts.
            () = &mut depth => {}
            // Never ends either; it reads the participants' queues.
            () = &mut backlog => {}
        }
    }
}
