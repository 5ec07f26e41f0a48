//! The spans of a saga's path, one trace per saga: the `StartSaga` call
//! (continuing the caller's `traceparent`), each transition, each message
//! published (`publish <exchange>`, whose context is stored with the
//! outbox row and travels in the AMQP headers), and on the way back the
//! reply's `process <queue>` span, parent of the transition it causes.
//! Timers and operator calls continue the saga's own trace, remembered in
//! its state ([`SagaInstance::trace`]).
//!
//! Names and attributes follow the OpenTelemetry messaging conventions
//! (`messaging.system = rabbitmq`, `messaging.destination.name`, ...)
//! plus `saga.id`, `saga.type`, `saga.version`, `saga.step`,
//! `saga.attempt`, `saga.phase`.
//!
//! When spans are not exported every constructor here returns a disabled
//! span without formatting a field: tracing costs nothing then. In a trace
//! the sampler did not keep, no span below the root is built either: the
//! messages carry the saga's root context (flagged unsampled) so the
//! participants follow the decision, and that is all it costs.

use saga_proto::telemetry::{TraceContext, propagation};
use sagas::{Command, Event, HistoryEntry, HistoryKind, SagaInstance};
use tracing::{Span, field::Empty};
use uuid::Uuid;

/// A message's place in its saga's trace: the context it carries on the
/// wire (stored with its outbox row), and, in the process that created it,
/// the producer span, which ends when the message is dropped (after the
/// broker's confirm, or when it is left to the relay).
#[derive(Debug, Clone, Default)]
pub struct MessageTrace {
    /// What goes into the `traceparent` / `tracestate` headers.
    context: Option<TraceContext>,
    /// The producer span, alive until the message is done with: held, never
    /// read (dropping the last clone ends it).
    #[allow(dead_code)]
    span: Option<Span>,
}

impl PartialEq for MessageTrace {
    fn eq(&self, other: &Self) -> bool {
        self.context == other.context
    }
}

impl Eq for MessageTrace {}

impl MessageTrace {
    /// The context read back from an outbox row.
    pub fn stored(traceparent: Option<String>, tracestate: Option<String>) -> Self {
        Self {
            context: traceparent.and_then(|tp| TraceContext::parse(&tp, tracestate.as_deref())),
            span: None,
        }
    }

    /// What the message carries, if it belongs to an exported trace.
    pub fn context(&self) -> Option<&TraceContext> {
        self.context.as_ref()
    }

    /// A producer span for a message the relay publishes for an instance
    /// that did not (it crashed, or the broker was away): a child of the
    /// context stored with the row, so the message stays in its saga's
    /// trace.
    pub fn relayed(
        &self,
        exchange: &str,
        routing_key: &str,
        saga_id: Uuid,
        message_id: Uuid,
    ) -> Self {
        let Some(stored) = &self.context else {
            return Self::default();
        };
        if !propagation::exporting() || !stored.sampled() {
            return self.clone();
        }
        let span = publish_span(
            Published {
                exchange,
                routing_key,
                message_id,
                saga_id,
                relayed: true,
            },
            None,
            None,
        );
        stored.adopt(&span);
        Self {
            context: TraceContext::of(&span).or_else(|| Some(stored.clone())),
            span: Some(span),
        }
    }
}

/// The server span of a `StartSaga` call, continuing the caller's trace
/// when its metadata carries a `traceparent`.
pub fn start_saga(caller: Option<TraceContext>, saga_type: &str) -> Span {
    if !propagation::exporting() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "StartSaga",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "saga.v1.SagaService",
        rpc.method = "StartSaga",
        "saga.type" = %saga_type,
        saga.id = Empty,
        saga.version = Empty,
    );
    if let Some(caller) = caller {
        caller.adopt(&span);
    }
    span
}

/// The saga's root context: where its timers and operator events attach.
pub fn root_of_current() -> Option<String> {
    if !propagation::exporting() {
        return None;
    }
    TraceContext::of(&Span::current()).map(|c| c.traceparent)
}

/// What a transition's span hangs from.
#[derive(Debug, Clone, Copy)]
pub enum Cause<'a> {
    /// A span of this process (the reply's `process` span, the API call).
    Span(&'a Span),
    /// The saga's own trace (timers, operator events).
    Saga,
}

/// The span of one event applied to one saga.
pub fn transition(state: &SagaInstance, event: &Event, cause: Cause<'_>) -> Span {
    if !propagation::exporting() {
        return Span::none();
    }
    let root = match cause {
        Cause::Span(parent) if !TraceContext::span_sampled(parent) => return Span::none(),
        Cause::Span(_) => None,
        Cause::Saga => match state
            .trace
            .as_deref()
            .and_then(|tp| TraceContext::parse(tp, None))
        {
            Some(root) if root.sampled() => Some(root),
            _ => return Span::none(),
        },
    };
    let (kind, step, attempt) = match event {
        Event::Started => ("started", None, None),
        Event::Reply(reply) => ("reply", Some(reply.step.as_str()), Some(reply.attempt)),
        Event::TimerFired(timer) => ("timer", Some(timer.step.as_str()), Some(timer.attempt)),
        Event::CancelRequested { .. } => ("cancel", None, None),
        Event::OperatorRetry => ("operator_retry", None, None),
    };
    let parent = match cause {
        Cause::Span(parent) => parent.id(),
        Cause::Saga => None,
    };
    let span = tracing::info_span!(
        parent: parent,
        "saga.transition",
        saga.id = %state.id,
        "saga.type" = %state.saga_type,
        saga.version = state.version,
        saga.event = kind,
        saga.step = step,
        saga.attempt = attempt,
    );
    if let Some(root) = root {
        root.adopt(&span);
    }
    span
}

/// The producer span of a command about to be written to the outbox,
/// child of the current (transition) span.
pub fn command(
    state: &SagaInstance,
    command: &Command,
    exchange: &str,
    message_id: Uuid,
) -> MessageTrace {
    producer(
        state,
        exchange,
        &command.participant,
        message_id,
        Some(command),
    )
}

/// The producer span of a lifecycle event, child of the current span.
pub fn event(
    state: &SagaInstance,
    exchange: &str,
    routing_key: &str,
    message_id: Uuid,
) -> MessageTrace {
    producer(state, exchange, routing_key, message_id, None)
}

/// A `publish <exchange>` span and the context its message carries; the
/// step attributes when the message is a command.
fn producer(
    state: &SagaInstance,
    exchange: &str,
    routing_key: &str,
    message_id: Uuid,
    command: Option<&Command>,
) -> MessageTrace {
    if !propagation::exporting() {
        return MessageTrace::default();
    }
    if !TraceContext::span_sampled(&Span::current()) {
        return unsampled(state);
    }
    let span = publish_span(
        Published {
            exchange,
            routing_key,
            message_id,
            saga_id: state.id,
            relayed: false,
        },
        Some(state),
        command,
    );
    MessageTrace {
        context: TraceContext::of(&span),
        span: Some(span),
    }
}

/// What every `publish` span names.
struct Published<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    message_id: Uuid,
    saga_id: Uuid,
    /// Published by the relay for a writer that did not.
    relayed: bool,
}

/// The one shape of a `publish <exchange>` producer span, child of the
/// current span: the flow's attributes when the saga's state is at hand
/// (not in the relay), the step's when the message is a command.
fn publish_span(
    message: Published<'_>,
    state: Option<&SagaInstance>,
    command: Option<&Command>,
) -> Span {
    tracing::info_span!(
        "publish",
        otel.name = %format!("publish {}", message.exchange),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "publish",
        messaging.destination.name = %message.exchange,
        messaging.rabbitmq.destination.routing_key = %message.routing_key,
        messaging.message.id = %message.message_id,
        saga.id = %message.saga_id,
        "saga.type" = state.map(|s| s.saga_type.as_str()),
        saga.version = state.map(|s| s.version),
        saga.step = command.map(|c| c.step.as_str()),
        saga.attempt = command.map(|c| c.attempt),
        saga.phase = command.map(|c| c.phase.as_str()),
        saga.relayed = message.relayed.then_some(true),
    )
}

/// A message of a trace the sampler did not keep: no span, the saga's
/// root context (flagged unsampled) in the headers.
fn unsampled(state: &SagaInstance) -> MessageTrace {
    MessageTrace {
        context: state
            .trace
            .as_deref()
            .and_then(|tp| TraceContext::parse(tp, None)),
        span: None,
    }
}

/// The consumer span of one reply delivery, continuing the participant's
/// trace from the message headers (none when that trace is not sampled).
pub fn process_reply(
    queue: &str,
    from: Option<TraceContext>,
    saga_id: Uuid,
    step: &str,
    attempt: u32,
    message_id: Option<&str>,
) -> Span {
    propagation::continue_from(from.as_ref(), || {
        tracing::info_span!(
            parent: None,
            "process",
            otel.name = %format!("process {queue}"),
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = %queue,
            messaging.message.id = message_id,
            saga.id = %saga_id,
            saga.step = %step,
            saga.attempt = attempt,
        )
    })
}

/// Adds what a trace reader wants to see of `entry` to the current span:
/// retries, timeouts, transient errors, rejections and compensations, with
/// the step and the machine's own detail (attempt, reason).
pub fn history_event(entry: &HistoryEntry) {
    if !propagation::exporting() {
        return;
    }
    let interesting = matches!(
        entry.kind,
        HistoryKind::StepTimedOut
            | HistoryKind::RetryScheduled
            | HistoryKind::TransientError
            | HistoryKind::StepRejected
            | HistoryKind::StepFailed
            | HistoryKind::CompensationStarted
            | HistoryKind::StepCompensated
            | HistoryKind::CompensationFailed
            | HistoryKind::SagaCompleted
            | HistoryKind::SagaCompensated
            | HistoryKind::SagaFailed
            | HistoryKind::CancelRequested
            | HistoryKind::OperatorRetry
            | HistoryKind::ReplyIgnored
    );
    if interesting {
        propagation::add_event(
            &Span::current(),
            entry.kind.as_str(),
            vec![
                ("saga.step", entry.step.clone().unwrap_or_default()),
                ("saga.status", entry.status.as_str().to_owned()),
                ("detail", entry.detail.clone()),
            ],
        );
    }
}
