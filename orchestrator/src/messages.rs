//! Between the pure machine and the wire: the machine's actions become the
//! outbox rows the publisher sends (exchange, routing key, envelope) and
//! the history to write, and a participant's reply becomes a machine
//! event. No I/O here: the engine writes what [`Envelopes::collect`]
//! returns, in the same transaction as the state.

use chrono::{DateTime, Utc};
use saga_proto::amqp::{
    self, COMMAND_TYPE, CommandMessage, LIFECYCLE_EVENT_TYPE, LifecycleEvent, ReplyMessage,
    ReplyStatus, SagaLifecycleState, Topology,
};
use sagas::{Action, Event, HistoryEntry, Outcome, Phase, Reply, SagaInstance, SagaStatus};
use tracing::Span;
use uuid::Uuid;

use crate::{
    store::outbox::OutboxMessage,
    telemetry::{metrics::Measured, spans},
};

/// What a saga's transitions produced: to write, then to act on.
#[derive(Debug, Default)]
pub struct Effects {
    /// History entries to append, by saga.
    pub history: Vec<(Uuid, HistoryEntry)>,
    /// Messages to write to the outbox and publish after the commit.
    pub outbox: Vec<OutboxMessage>,
    /// What to count and measure once committed.
    pub measured: Measured,
}

/// A decoded reply with the span of its delivery (disabled when spans
/// are not exported), parent of the transition it causes.
#[derive(Debug, Clone)]
pub struct Received {
    /// The reply.
    pub reply: ReplyMessage,
    /// Its `process <queue>` span.
    pub span: Span,
}

/// Builds the wire messages of one deployment namespace.
#[derive(Debug, Clone)]
pub struct Envelopes {
    /// Exchange and queue names.
    topology: Topology,
}

impl Envelopes {
    /// Messages addressed within `topology`.
    pub fn new(topology: Topology) -> Self {
        Self { topology }
    }

    /// Turns a transition's actions into outbox rows, history and the
    /// terminal states reached, added to `effects`. Timers need nothing
    /// here: they live in the state, and the engine arms them from the
    /// committed state.
    pub fn collect(
        &self,
        state: &SagaInstance,
        transition: sagas::Transition,
        now: DateTime<Utc>,
        effects: &mut Effects,
    ) {
        for entry in &transition.history {
            effects.measured.note(entry.kind);
            spans::history_event(entry);
        }
        effects
            .measured
            .observations
            .extend(transition.observations);
        effects.history.extend(
            transition
                .history
                .into_iter()
                .map(|entry| (state.id, entry)),
        );
        for action in transition.actions {
            match action {
                Action::SendCommand(command) => {
                    let exchange = self.topology.commands_exchange();
                    let message_id = Uuid::new_v4();
                    let trace = spans::command(state, &command, &exchange, message_id);
                    let message = CommandMessage {
                        saga_id: state.id,
                        saga_type: state.saga_type.clone(),
                        saga_version: state.version,
                        step: command.step,
                        phase: wire_phase(command.phase),
                        attempt: command.attempt,
                        participant: command.participant.clone(),
                        command: command.command,
                        idempotency_key: command.idempotency_key,
                        compensates: command.compensates,
                        payload: command.payload,
                    };
                    effects.outbox.push(OutboxMessage {
                        id: 0,
                        saga_id: state.id,
                        message_id,
                        message_type: COMMAND_TYPE.to_owned(),
                        exchange,
                        routing_key: command.participant,
                        reply_to: Some(self.topology.reply_queue()),
                        mandatory: true,
                        body: serde_json::to_vec(&message).expect("commands always serialise"),
                        attempts: 0,
                        trace,
                    });
                }
                Action::ScheduleTimer { .. } => {}
                Action::PublishLifecycle { status } => {
                    let state_name = lifecycle_state(status);
                    let event = LifecycleEvent {
                        saga_id: state.id,
                        saga_type: state.saga_type.clone(),
                        saga_version: state.version,
                        state: state_name,
                        data: state.data.clone(),
                        error: state.error.clone(),
                        at: now.to_rfc3339(),
                    };
                    let message_id = Uuid::new_v4();
                    let exchange = self.topology.events_exchange();
                    let routing_key = amqp::event_routing_key(&state.saga_type, state_name);
                    let trace = spans::event(state, &exchange, &routing_key, message_id);
                    effects.outbox.push(OutboxMessage {
                        id: 0,
                        saga_id: state.id,
                        message_id,
                        message_type: LIFECYCLE_EVENT_TYPE.to_owned(),
                        exchange,
                        routing_key,
                        reply_to: None,
                        // Nobody has to listen to lifecycle events.
                        mandatory: false,
                        body: serde_json::to_vec(&event).expect("events always serialise"),
                        attempts: 0,
                        trace,
                    });
                }
                // Counted from the machine's `SagaEnded` observation.
                Action::Finish { .. } => {}
            }
        }
    }
}

fn lifecycle_state(status: SagaStatus) -> SagaLifecycleState {
    match status {
        SagaStatus::Running => SagaLifecycleState::Running,
        SagaStatus::Compensating => SagaLifecycleState::Compensating,
        SagaStatus::Completed => SagaLifecycleState::Completed,
        SagaStatus::Compensated => SagaLifecycleState::Compensated,
        SagaStatus::Failed => SagaLifecycleState::Failed,
    }
}

fn wire_phase(phase: Phase) -> amqp::Phase {
    match phase {
        Phase::Action => amqp::Phase::Action,
        Phase::Compensation => amqp::Phase::Compensation,
    }
}

/// The attempt a command body in the outbox carries: (step, phase,
/// attempt), or `None` for a body this version cannot read.
pub fn command_attempt(body: &[u8]) -> Option<(String, Phase, u32)> {
    /// The fields of a [`CommandMessage`] that name its attempt.
    #[derive(serde::Deserialize)]
    struct Attempt {
        step: String,
        phase: amqp::Phase,
        attempt: u32,
    }
    let command: Attempt = serde_json::from_slice(body).ok()?;
    let phase = match command.phase {
        amqp::Phase::Action => Phase::Action,
        amqp::Phase::Compensation => Phase::Compensation,
    };
    Some((command.step, phase, command.attempt))
}

/// The machine's view of a reply.
pub fn reply_event(reply: &ReplyMessage) -> Event {
    let outcome = match reply.status {
        ReplyStatus::Success => Outcome::Success(reply.data.clone()),
        ReplyStatus::Rejected => {
            Outcome::Rejected(reply.reason.clone().unwrap_or_else(|| "rejected".into()))
        }
        ReplyStatus::TransientError => Outcome::TransientError(
            reply
                .reason
                .clone()
                .unwrap_or_else(|| "transient error".into()),
        ),
    };
    Event::Reply(Reply {
        step: reply.step.clone(),
        phase: match reply.phase {
            amqp::Phase::Action => Phase::Action,
            amqp::Phase::Compensation => Phase::Compensation,
        },
        attempt: reply.attempt,
        outcome,
    })
}
