//! A participant's part of its saga's trace: the delivery's
//! `process <queue>` span (child of the orchestrator's `publish` span,
//! whose context the command's headers carry), the handler's
//! `handle <command>` span, and the reply's `publish` span, whose context
//! goes into the reply's headers so the orchestrator's transition
//! continues the chain. Disabled spans, at no cost, when spans are not
//! exported.

use saga_proto::{
    amqp::CommandMessage,
    telemetry::{TraceContext, propagation},
};
use tracing::Span;

/// The consumer span of one command delivery.
pub(crate) fn process(queue: &str, from: Option<&TraceContext>, message: &CommandMessage) -> Span {
    // A trace the sampler did not keep: no span, the context is passed on
    // as it came ([`reply`]).
    propagation::continue_from(from, || {
        tracing::info_span!(
            parent: None,
            "process",
            otel.name = %format!("process {queue}"),
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = %queue,
            saga.id = %message.saga_id,
            "saga.type" = %message.saga_type,
            saga.version = message.saga_version,
            saga.step = %message.step,
            saga.attempt = message.attempt,
            saga.phase = message.phase.as_str(),
            saga.idempotency_key = %message.idempotency_key,
        )
    })
}

/// The span of the handler deciding `message`, child of its delivery's.
pub(crate) fn handle(parent: &Span, message: &CommandMessage) -> Span {
    if !propagation::exporting() || parent.is_disabled() {
        return Span::none();
    }
    tracing::info_span!(
        parent: parent,
        "handle",
        otel.name = %format!("handle {}", message.command),
        saga.id = %message.saga_id,
        saga.step = %message.step,
        participant = %message.participant,
        command = %message.command,
    )
}

/// The producer span of a reply and the context its headers carry.
/// In a trace that is not sampled: no span, and the command's own context
/// (`received`), so the orchestrator follows the same decision.
pub(crate) fn reply(
    parent: &Span,
    reply_to: &str,
    received: Option<&TraceContext>,
) -> (Span, Option<TraceContext>) {
    if !propagation::exporting() {
        return (Span::none(), None);
    }
    if parent.is_disabled() {
        return (Span::none(), received.cloned());
    }
    let span = tracing::info_span!(
        parent: parent,
        "publish",
        otel.name = "publish (default exchange)",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "publish",
        messaging.destination.name = "",
        messaging.rabbitmq.destination.routing_key = %reply_to,
    );
    let context = TraceContext::of(&span);
    (span, context)
}
