//! `notification`: subscribes to saga lifecycle events and records the
//! message it would send the customer.
//!
//! Declares the topic exchange `<ns>.events` and its own quorum queue
//! `<ns>.notification.lifecycle` bound with `order_placement.*`. Each
//! [`LifecycleEvent`] becomes one row of `notifications`, unique on
//! (saga_id, state), so a redelivered event is recorded once. Undecodable
//! events are dead-lettered and counted as poison.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::Channel;
use lapin::message::Delivery;
use saga_proto::amqp::{LifecycleEvent, SagaLifecycleState, Topology};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::kit::consumer::{ConsumerSettings, DeliveryHandler, Settle, settle};
use crate::kit::stats::bump;
use crate::kit::topology;
use crate::kit::{KitError, ParticipantConfig, ParticipantHandle, Stats, database};

/// Service name.
pub const NAME: &str = "notification";
/// Routing keys it subscribes to.
pub const BINDING_KEY: &str = "order_placement.*";

/// The queue of the notification service in `topology`'s namespace.
pub fn queue(topology: &Topology) -> String {
    format!("{}.notification.lifecycle", topology.namespace())
}

/// The customer-facing text for an event.
pub fn message_for(event: &LifecycleEvent) -> String {
    let order = event
        .data
        .get("order_id")
        .and_then(|v| v.as_str())
        .unwrap_or("(unknown)");
    match event.state {
        SagaLifecycleState::Running => format!("We received your order {order}."),
        SagaLifecycleState::Compensating => {
            format!("We hit a problem with your order {order} and are cancelling it.")
        }
        SagaLifecycleState::Completed => format!("Your order {order} is confirmed."),
        SagaLifecycleState::Compensated => match &event.error {
            Some(error) => {
                format!("Your order {order} was cancelled: {error}. You have not been charged.")
            }
            None => format!("Your order {order} was cancelled. You have not been charged."),
        },
        SagaLifecycleState::Failed => {
            format!("Your order {order} needs attention; our team is on it and will contact you.")
        }
    }
}

/// Starts the notification service (own database, own connection).
pub async fn start(
    config: ParticipantConfig,
    shutdown: CancellationToken,
) -> Result<ParticipantHandle, KitError> {
    let pool = database::open(
        config.database.clone(),
        &config.pool,
        Some(sqlx::migrate!("migrations/notification")),
        &shutdown,
    )
    .await?
    .ok_or_else(|| KitError::ShutDown(NAME.to_owned()))?;
    let stats = Arc::new(Stats::default());
    let service = Arc::new(NotificationService {
        topology: config.topology.clone(),
        pool: pool.clone(),
        stats: stats.clone(),
    });
    Ok(ParticipantHandle::spawn(
        NAME.to_owned(),
        service,
        ConsumerSettings {
            amqp_url: config.amqp_url,
            prefetch: config.prefetch,
            concurrency: config.concurrency,
        },
        pool,
        stats,
        shutdown,
    ))
}

struct NotificationService {
    /// Namespace.
    topology: Topology,
    /// Own database.
    pool: PgPool,
    /// Counters.
    stats: Arc<Stats>,
}

impl NotificationService {
    async fn record(&self, event: &LifecycleEvent) -> Result<bool, sqlx::Error> {
        let field = |name: &str| {
            event
                .data
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let inserted = sqlx::query(
            "INSERT INTO notifications (saga_id, state, saga_type, order_id, customer_id, message, event)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (saga_id, state) DO NOTHING",
        )
        .bind(event.saga_id)
        .bind(event.state.as_str())
        .bind(&event.saga_type)
        .bind(field("order_id"))
        .bind(field("customer_id"))
        .bind(message_for(event))
        .bind(sqlx::types::Json(event))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }
}

impl DeliveryHandler for NotificationService {
    fn name(&self) -> &str {
        NAME
    }

    fn queue(&self) -> String {
        queue(&self.topology)
    }

    async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        topology::declare_event_subscription(
            channel,
            &self.topology,
            &queue(&self.topology),
            BINDING_KEY,
        )
        .await
    }

    async fn handle(self: Arc<Self>, delivery: Delivery, _publisher: Channel) {
        let event: LifecycleEvent = match serde_json::from_slice(&delivery.data) {
            Ok(event) => event,
            Err(e) => {
                bump(
                    &self.stats.poison,
                    NAME,
                    "participant_poison_messages_total",
                    1,
                );
                tracing::warn!(participant = NAME, error = %e, "undecodable lifecycle event: dead-lettering it");
                settle(&delivery.acker, Settle::DeadLetter).await.ok();
                return;
            }
        };
        // A database hiccup is retried in place rather than by requeueing,
        // which would spend the queue's delivery limit.
        let recorded = (|| self.record(&event))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(8),
            )
            .notify(|e, wait| tracing::warn!(participant = NAME, error = %e, retry_in = ?wait, "cannot record a notification"))
            .await;
        match recorded {
            Ok(new) => {
                if new {
                    bump(
                        &self.stats.events_recorded,
                        NAME,
                        "participant_events_recorded_total",
                        1,
                    );
                } else {
                    bump(
                        &self.stats.replayed,
                        NAME,
                        "participant_commands_replayed_total",
                        1,
                    );
                }
                settle(&delivery.acker, Settle::Ack).await.ok();
            }
            Err(e) => {
                tracing::error!(participant = NAME, saga_id = %event.saga_id, error = %e, "giving up recording a notification for now");
                settle(&delivery.acker, Settle::Requeue).await.ok();
            }
        }
    }

    async fn background(
        self: Arc<Self>,
        _publisher: Channel,
        stop: CancellationToken,
        _first: bool,
    ) {
        stop.cancelled().await;
    }

    async fn drain(self: Arc<Self>, _publisher: Channel) {}
}
