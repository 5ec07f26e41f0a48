//! The AMQP contract between the orchestrator and participants.
//!
//! Every name is prefixed by a deployment namespace (see [`Topology`]) so that
//! several deployments, or parallel tests, share one broker. Bodies are JSON
//! (`content_type = application/json`); every message carries a per-delivery
//! `message_id`, the saga id as `correlation_id`, a `type` naming the envelope
//! and a W3C `traceparent` header whose trace id is the saga id.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[cfg(feature = "lapin")]
pub mod declare;

/// `content_type` of every message.
pub const CONTENT_TYPE: &str = "application/json";
/// Header carrying the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// AMQP `type` property of a [`CommandMessage`].
pub const COMMAND_TYPE: &str = "saga.command";
/// AMQP `type` property of a [`ReplyMessage`].
pub const REPLY_TYPE: &str = "saga.reply";
/// AMQP `type` property of a [`LifecycleEvent`].
pub const LIFECYCLE_EVENT_TYPE: &str = "saga.lifecycle";
/// Largest number of deliveries of one message before a quorum queue
/// dead-letters it (`x-delivery-limit`), so a poison message never blocks a queue.
pub const DELIVERY_LIMIT: i64 = 5;

pub use sagas::names::{InvalidName, Namespace};

/// The exchange and queue names of one deployment namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Prefix of every name, e.g. `saga`.
    namespace: Namespace,
}

impl Topology {
    /// Names for `namespace` (parsed as a [`Namespace`]).
    pub fn new(namespace: &str) -> Result<Self, InvalidName> {
        Ok(Self {
            namespace: Namespace::new(namespace)?,
        })
    }

    /// The namespace itself.
    pub fn namespace(&self) -> &str {
        self.namespace.as_str()
    }

    /// Durable `direct` exchange the orchestrator publishes commands to;
    /// the routing key is the participant's name.
    pub fn commands_exchange(&self) -> String {
        format!("{}.commands", self.namespace)
    }

    /// The durable quorum queue a participant consumes its commands from,
    /// bound to [`Self::commands_exchange`] with its own name as routing key.
    pub fn participant_queue(&self, participant: &str) -> String {
        format!("{}.participant.{participant}", self.namespace)
    }

    /// The durable quorum queue an event subscriber (e.g. `notification`)
    /// consumes lifecycle events from, bound to [`Self::events_exchange`].
    pub fn subscription_queue(&self, subscriber: &str) -> String {
        format!("{}.{subscriber}.lifecycle", self.namespace)
    }

    /// The durable quorum queue the orchestrator consumes replies from;
    /// participants publish replies to it through the default exchange
    /// (routing key = this name, also given in each command's `reply_to`).
    pub fn reply_queue(&self) -> String {
        format!("{}.replies", self.namespace)
    }

    /// Durable `topic` exchange of saga lifecycle events, routing key
    /// `<saga_type>.<state>` (see [`event_routing_key`]).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// Durable `fanout` exchange that rejected and poison messages go to.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.namespace)
    }

    /// Durable quorum queue bound to [`Self::dead_letter_exchange`].
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letters", self.namespace)
    }
}

/// Routing key of a lifecycle event on the events exchange, e.g.
/// `order_placement.completed`.
pub fn event_routing_key(saga_type: &str, state: SagaLifecycleState) -> String {
    format!("{saga_type}.{}", state.as_str())
}

/// W3C `traceparent` value for a message of saga `saga_id`: the trace id is
/// the saga id, so all messages of one saga form one trace; the parent span
/// id is taken from the message's own id.
pub fn traceparent(saga_id: Uuid, message_id: Uuid) -> String {
    let span = &message_id.simple().to_string()[..16];
    format!("00-{}-{span}-01", saga_id.simple())
}

/// Whether a command performs a step's action or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step's forward action (e.g. `reserve`).
    Action,
    /// The step's compensation (e.g. `release`).
    Compensation,
}

impl Phase {
    /// The wire name (`action`, `compensation`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Compensation => "compensation",
        }
    }
}

/// A command sent to a participant (AMQP `type` = `saga.command`).
///
/// Unknown fields are ignored when decoding, so that a newer orchestrator
/// may add fields without older participants dead-lettering its commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMessage {
    /// The saga this command belongs to.
    pub saga_id: Uuid,
    /// Flow name, e.g. `order_placement`.
    pub saga_type: String,
    /// Flow version the saga runs.
    pub saga_version: u32,
    /// Step name, e.g. `reserve_inventory`; echoed in the reply.
    pub step: String,
    /// Action or compensation; echoed in the reply.
    pub phase: Phase,
    /// 1 for the first delivery of this (step, phase), +1 per retry; echoed in
    /// the reply. Retries keep the same `idempotency_key`.
    pub attempt: u32,
    /// Participant that must handle it (also the routing key).
    pub participant: String,
    /// Command name within the participant, e.g. `reserve`.
    pub command: String,
    /// Stable key of this logical command: the same for every retry. A
    /// participant applies the effect of one key at most once and answers
    /// a repeat with its first reply.
    pub idempotency_key: String,
    /// For a compensation: the idempotency key of the action it undoes, so
    /// the participant can compensate an action it never saw as a no-op and
    /// refuse that action if it arrives later. Absent for actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensates: Option<String>,
    /// Command arguments built by the flow from the saga's data.
    pub payload: serde_json::Value,
}

/// How a participant answered a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyStatus {
    /// Done; `data` carries the result.
    Success,
    /// A business rule refused it (final: never retried); `reason` says why.
    /// The participant applied no effect.
    Rejected,
    /// A passing fault (database down, lock timeout ...); the orchestrator
    /// retries with backoff. The participant applied no effect.
    TransientError,
}

/// A participant's answer to a command (AMQP `type` = `saga.reply`),
/// published to the command's `reply_to` queue through the default exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyMessage {
    /// Copied from the command.
    pub saga_id: Uuid,
    /// Copied from the command.
    pub step: String,
    /// Copied from the command.
    pub phase: Phase,
    /// Copied from the command: replies to an older attempt are ignored.
    pub attempt: u32,
    /// Copied from the command.
    pub idempotency_key: String,
    /// What happened.
    pub status: ReplyStatus,
    /// Result data on success (e.g. `{"reservation_id": "..."}`); `null` otherwise.
    #[serde(default)]
    pub data: serde_json::Value,
    /// Human-readable reason for `rejected` and `transient_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A saga's state as named in lifecycle events and their routing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaLifecycleState {
    /// The saga started and is moving forward.
    Running,
    /// A step failed or a cancel arrived; completed steps are being undone.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Rolled back: everything that took effect was compensated.
    Compensated,
    /// Compensation (or forward recovery) could not finish; an operator must look.
    Failed,
}

impl SagaLifecycleState {
    /// The lowercase name used in routing keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
        }
    }
}

/// A saga changed state (AMQP `type` = `saga.lifecycle`), published to the
/// events exchange with routing key `<saga_type>.<state>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// The saga.
    pub saga_id: Uuid,
    /// Flow name.
    pub saga_type: String,
    /// Flow version.
    pub saga_version: u32,
    /// The state the saga entered.
    pub state: SagaLifecycleState,
    /// The saga's data at that moment (its input plus what steps returned).
    pub data: serde_json::Value,
    /// Why it compensated or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the transition happened, RFC 3339.
    pub at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_namespaced() {
        let t = Topology::new("saga").unwrap();
        assert_eq!(t.commands_exchange(), "saga.commands");
        assert_eq!(
            t.participant_queue("inventory"),
            "saga.participant.inventory"
        );
        assert_eq!(t.reply_queue(), "saga.replies");
        assert_eq!(t.events_exchange(), "saga.events");
        assert_eq!(
            event_routing_key("order_placement", SagaLifecycleState::Completed),
            "order_placement.completed"
        );
    }

    #[test]
    fn bad_namespaces_are_refused() {
        for bad in ["", "Saga", "1saga", "sa ga", "sa.ga", &"a".repeat(65)] {
            assert!(Topology::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn traceparent_is_w3c_shaped() {
        let saga = Uuid::new_v4();
        let tp = traceparent(saga, Uuid::new_v4());
        let parts: Vec<_> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], saga.simple().to_string());
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
    }

    #[test]
    fn reply_round_trips_with_documented_field_names() {
        let json = serde_json::json!({
            "saga_id": "0192e0a4-7a8e-7b3c-9d1e-2f3a4b5c6d7e",
            "step": "reserve_inventory",
            "phase": "action",
            "attempt": 1,
            "idempotency_key": "k",
            "status": "transient_error",
            "reason": "db down"
        });
        let reply: ReplyMessage = serde_json::from_value(json).unwrap();
        assert_eq!(reply.status, ReplyStatus::TransientError);
        assert_eq!(reply.data, serde_json::Value::Null);
        let back = serde_json::to_value(&reply).unwrap();
        assert_eq!(back["status"], "transient_error");
    }

    #[test]
    fn unknown_command_fields_are_ignored_for_forward_compatibility() {
        let json = serde_json::json!({
            "saga_id": "0192e0a4-7a8e-7b3c-9d1e-2f3a4b5c6d7e", "saga_type": "order_placement",
            "saga_version": 1, "step": "reserve_inventory", "phase": "action", "attempt": 2,
            "participant": "inventory", "command": "reserve", "idempotency_key": "k",
            "payload": {"order_id": "o-1"}, "deadline": "2030-01-01T00:00:00Z"
        });
        let command: CommandMessage = serde_json::from_value(json).unwrap();
        assert_eq!(command.command, "reserve");
        assert_eq!(command.attempt, 2);
        assert_eq!(command.compensates, None);
        assert_eq!(command.payload["order_id"], "o-1");
    }

    #[test]
    fn unknown_reply_fields_are_refused() {
        let json = serde_json::json!({
            "saga_id": "0192e0a4-7a8e-7b3c-9d1e-2f3a4b5c6d7e", "step": "s", "phase": "action",
            "attempt": 1, "idempotency_key": "k", "status": "success", "surprise": 1
        });
        assert!(serde_json::from_value::<ReplyMessage>(json).is_err());
    }
}
