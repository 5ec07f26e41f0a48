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
use tokio::sync::OwnedSemaphorePermit;
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
            max_batch: config.max_batch,
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
    /// Records `events` in one statement; returns how many were new (the
    /// others, redelivered, were already recorded).
    async fn record(&self, events: &[LifecycleEvent]) -> Result<u64, sqlx::Error> {
        let field = |event: &LifecycleEvent, name: &str| {
            event
                .data
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let saga_ids: Vec<_> = events.iter().map(|e| e.saga_id).collect();
        let states: Vec<_> = events.iter().map(|e| e.state.as_str()).collect();
        let saga_types: Vec<_> = events.iter().map(|e| e.saga_type.as_str()).collect();
        let order_ids: Vec<_> = events.iter().map(|e| field(e, "order_id")).collect();
        let customer_ids: Vec<_> = events.iter().map(|e| field(e, "customer_id")).collect();
        let messages: Vec<_> = events.iter().map(message_for).collect();
        let bodies: Vec<_> = events
            .iter()
            .map(|e| serde_json::to_string(e).expect("a LifecycleEvent always serializes"))
            .collect();
        let inserted = sqlx::query(
            "INSERT INTO notifications (saga_id, state, saga_type, order_id, customer_id, message, event)
             SELECT saga_id, state, saga_type, order_id, customer_id, message, event::jsonb
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
                  AS e(saga_id, state, saga_type, order_id, customer_id, message, event)
             ORDER BY saga_id, state
             ON CONFLICT (saga_id, state) DO NOTHING",
        )
        .bind(&saga_ids)
        .bind(&states)
        .bind(&saga_types)
        .bind(&order_ids)
        .bind(&customer_ids)
        .bind(&messages)
        .bind(&bodies)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted)
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

    async fn handle(
        self: Arc<Self>,
        deliveries: Vec<Delivery>,
        _publisher: Channel,
        slot: OwnedSemaphorePermit,
    ) {
        let mut events = Vec::with_capacity(deliveries.len());
        let mut ackers = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match serde_json::from_slice::<LifecycleEvent>(&delivery.data) {
                Ok(event) => {
                    events.push(event);
                    ackers.push(delivery.acker);
                }
                Err(e) => {
                    bump(
                        &self.stats.poison,
                        NAME,
                        "participant_poison_messages_total",
                        1,
                    );
                    tracing::warn!(participant = NAME, error = %e, "undecodable lifecycle event: dead-lettering it");
                    settle(&delivery.acker, Settle::DeadLetter).await.ok();
                }
            }
        }
        if events.is_empty() {
            return;
        }
        // A database hiccup is retried in place rather than by requeueing,
        // which would spend the queue's delivery limit.
        let recorded = (|| self.record(&events))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(8),
            )
            .notify(|e, wait| tracing::warn!(participant = NAME, error = %e, retry_in = ?wait, "cannot record notifications"))
            .await;
        drop(slot);
        let settle_all =
            |how| futures::future::join_all(ackers.iter().map(move |a| settle(a, how)));
        match recorded {
            Ok(new) => {
                let total = events.len() as u64;
                if new > 0 {
                    bump(
                        &self.stats.events_recorded,
                        NAME,
                        "participant_events_recorded_total",
                        new,
                    );
                }
                if total > new {
                    bump(
                        &self.stats.replayed,
                        NAME,
                        "participant_commands_replayed_total",
                        total - new,
                    );
                }
                settle_all(Settle::Ack).await;
            }
            Err(e) => {
                tracing::error!(participant = NAME, events = events.len(), error = %e, "giving up recording notifications for now");
                settle_all(Settle::Requeue).await;
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
