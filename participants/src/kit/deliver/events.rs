//! Delivering for an event subscriber: decode each lifecycle event (poison
//! is dead-lettered), hand the batch to the [`EventRecorder`], then ack,
//! or requeue when it gave up for now.

use std::sync::Arc;

use lapin::Channel;
use lapin::message::Delivery;
use saga_proto::amqp::{LifecycleEvent, Topology};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::consumer::{DeliveryHandler, Settle, decode_or_dead_letter, settle};
use crate::kit::decide::events::EventRecorder;
use crate::kit::stats::Stats;
use crate::kit::topology;

/// An event subscription, broker side.
pub(crate) struct EventService {
    /// Service name.
    name: String,
    /// Namespace.
    topology: Topology,
    /// Routing keys it subscribes to (e.g. `order_placement.*`).
    binding_key: String,
    /// Records each batch.
    recorder: EventRecorder,
    /// Counters.
    stats: Arc<Stats>,
}

impl EventService {
    pub(crate) fn new(
        name: String,
        topology: Topology,
        binding_key: String,
        recorder: EventRecorder,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            name,
            topology,
            binding_key,
            recorder,
            stats,
        }
    }
}

impl DeliveryHandler for EventService {
    fn name(&self) -> &str {
        &self.name
    }

    fn queue(&self) -> String {
        self.topology.subscription_queue(&self.name)
    }

    async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        topology::declare_event_subscription(
            channel,
            &self.topology,
            &self.queue(),
            &self.binding_key,
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
            let decoded: Option<LifecycleEvent> =
                decode_or_dead_letter(&delivery, &self.name, &self.stats, "lifecycle event").await;
            if let Some(event) = decoded {
                events.push(event);
                ackers.push(delivery.acker);
            }
        }
        if events.is_empty() {
            return;
        }
        let recorded = self.recorder.record(&events).await;
        drop(slot);
        let how = match recorded {
            Ok(()) => Settle::Ack,
            Err(e) => {
                tracing::error!(participant = %self.name, events = events.len(), error = %e.transient_reason(), "giving up recording events for now");
                Settle::Requeue
            }
        };
        futures::future::join_all(ackers.iter().map(|a| settle(a, how))).await;
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
