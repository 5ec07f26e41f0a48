//! `notification`: subscribes to saga lifecycle events and records the
//! message it would send the customer.
//!
//! Built on the kit like the command participants
//! ([`ParticipantBuilder::subscribe`](crate::kit::ParticipantBuilder::subscribe)):
//! the kit declares the topic exchange `<ns>.events` and the quorum queue
//! `<ns>.notification.lifecycle` bound with `order_placement.*`, and hands
//! each batch of events to `record` in one transaction. Each
//! [`LifecycleEvent`] becomes one row of `notifications`, unique on
//! (saga_id, state), so a redelivered event is recorded once. Undecodable
//! events are dead-lettered and counted as poison.

use saga_proto::amqp::{LifecycleEvent, SagaLifecycleState, Topology};

use crate::kit::{KitError, Participant, Tx};

/// Service name.
pub const NAME: &str = "notification";
/// Routing keys it subscribes to.
pub const BINDING_KEY: &str = "order_placement.*";

/// The queue of the notification service in `topology`'s namespace.
pub fn queue(topology: &Topology) -> String {
    topology.subscription_queue(NAME)
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

/// The notification service: a participant that serves no command and
/// subscribes to lifecycle events.
pub fn participant() -> Result<Participant, KitError> {
    Participant::builder(NAME)
        .migrations(sqlx::migrate!("migrations/notification"))
        .subscribe(BINDING_KEY, record)
        .build()
}

/// Records `events` in one statement; returns how many were new (the
/// others, redelivered, were already recorded).
async fn record(tx: &Tx, events: &[LifecycleEvent]) -> Result<u64, sqlx::Error> {
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
    .execute(tx)
    .await?
    .rows_affected();
    Ok(inserted)
}
