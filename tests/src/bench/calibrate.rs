//! The raw ceilings of this machine, measured in the same run: RabbitMQ
//! persistent publish-with-confirm + consume + ack on a quorum queue, and
//! PostgreSQL single-row commits.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use sqlx::postgres::PgPoolOptions;

/// A durable quorum queue `queue`, a channel to publish on, and a consumer
/// of the queue on another channel with `prefetch`.
async fn quorum_queue(
    amqp_url: &str,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<(Connection, lapin::Channel, lapin::Consumer)> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    let consume = connection.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = consume
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, consumer))
}

/// Publishes `body` persistent to `queue` through the default exchange.
async fn publish_persistent(
    channel: &lapin::Channel,
    queue: &str,
    body: &[u8],
) -> lapin::Result<lapin::PublisherConfirm> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
}

/// Messages per second through one quorum queue: published persistent with
/// confirms (up to `window` unconfirmed), consumed and acked.
pub async fn rabbitmq(
    amqp_url: &str,
    queue: &str,
    seconds: u64,
    window: usize,
) -> anyhow::Result<f64> {
    let (connection, channel, mut consumer) = quorum_queue(amqp_url, queue, 1000).await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = consumed.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let _ = delivery.ack(BasicAckOptions::default()).await;
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = vec![b'x'; 400];
    let begin = Instant::now();
    let until = begin + Duration::from_secs(seconds);
    let mut in_flight = FuturesUnordered::new();
    let start_count = consumed.load(Ordering::Relaxed);
    while Instant::now() < until {
        while in_flight.len() < window {
            let confirm = publish_persistent(&channel, queue, &body).await?;
            in_flight.push(confirm);
        }
        in_flight.next().await;
    }
    let elapsed = begin.elapsed().as_secs_f64();
    let rate = (consumed.load(Ordering::Relaxed) - start_count) as f64 / elapsed;
    stop.store(true, Ordering::Relaxed);
    while in_flight.next().await.is_some() {}
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "bye".into()).await;
    reader.abort();
    Ok(rate)
}

/// Single-row INSERT commits per second with `connections` clients.
pub async fn postgres(database_url: &str, seconds: u64, connections: u32) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .connect(database_url)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_calibration (id BIGSERIAL PRIMARY KEY, v INT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let commits = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let begin = Instant::now();
    let workers = (0..connections).map(|_| {
        let pool = pool.clone();
        let commits = commits.clone();
        tokio::spawn(async move {
            while Instant::now() < until {
                if sqlx::query("INSERT INTO bench_calibration (v) VALUES (1)")
                    .execute(&pool)
                    .await
                    .is_ok()
                {
                    commits.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    });
    futures::future::join_all(workers).await;
    let rate = commits.load(Ordering::Relaxed) as f64 / begin.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_calibration")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(rate)
}

/// Median of samples in microseconds, in milliseconds.
fn median_ms(mut micros: Vec<u64>) -> f64 {
    micros.sort_unstable();
    micros[micros.len().saturating_sub(1) / 2] as f64 / 1000.0
}

/// One persistent message at a time through a quorum queue: the median time from
/// `basic.publish` to its delivery to a consumer on another channel (the
/// broker delivers only after the message is committed to its log). This
/// is the floor of every command and reply hop of a saga.
pub async fn rabbitmq_hop(amqp_url: &str, queue: &str, samples: usize) -> anyhow::Result<f64> {
    let (connection, channel, mut consumer) = quorum_queue(amqp_url, queue, 10).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = vec![b'x'; 400];
    let mut trips = Vec::with_capacity(samples);
    // The first messages warm the queue's process and log up.
    for i in 0..samples + 50 {
        let sent = Instant::now();
        let confirm = publish_persistent(&channel, queue, &body).await?;
        let delivery = consumer
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("calibration consumer ended"))??;
        if i >= 50 {
            trips.push(sent.elapsed().as_micros() as u64);
        }
        delivery.ack(BasicAckOptions::default()).await?;
        confirm.await?;
    }
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "bye".into()).await;
    Ok(median_ms(trips))
}

/// One single-row INSERT commit at a time with one client: the median, ms.
pub async fn postgres_commit(database_url: &str, samples: usize) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_commit_latency (id BIGSERIAL PRIMARY KEY, v INT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let mut commits = Vec::with_capacity(samples);
    for i in 0..samples + 50 {
        let begin = Instant::now();
        sqlx::query("INSERT INTO bench_commit_latency (v) VALUES (1)")
            .execute(&pool)
            .await?;
        if i >= 50 {
            commits.push(begin.elapsed().as_micros() as u64);
        }
    }
    sqlx::query("DROP TABLE bench_commit_latency")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(median_ms(commits))
}
