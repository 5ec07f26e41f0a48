//! The W3C trace context (`traceparent`, `tracestate`) of a span as plain
//! text, so it can be written with a message in the same transaction as
//! the saga's state and carried by whatever transport takes the message
//! later: AMQP headers, gRPC metadata. A message published after a crash,
//! by another process, still joins the trace it was created in.
//!
//! With no span exporter installed, a span has no context and
//! [`TraceContext::of`] returns `None`: callers fall back to what they did
//! before (the AMQP contract's saga-id `traceparent`).

use std::collections::HashMap;

use opentelemetry::{
    KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Header and metadata key of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header and metadata key of the W3C vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// A span's W3C trace context, as the `traceparent` and `tracestate`
/// header values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-<trace id>-<span id>-<flags>`.
    pub traceparent: String,
    /// Vendor state; empty when there is none.
    pub tracestate: String,
}

struct Headers<'a>(&'a mut HashMap<String, String>);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Found<'a>(&'a TraceContext);

impl Extractor for Found<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(&self.0.traceparent),
            TRACESTATE if !self.0.tracestate.is_empty() => Some(&self.0.tracestate),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

impl TraceContext {
    /// The context of `span`, when spans are exported and it is valid.
    pub fn of(span: &tracing::Span) -> Option<Self> {
        let context = span.context();
        if !context.span().span_context().is_valid() {
            return None;
        }
        let mut headers = HashMap::new();
        TraceContextPropagator::new().inject_context(&context, &mut Headers(&mut headers));
        Some(Self {
            traceparent: headers.remove(TRACEPARENT)?,
            tracestate: headers.remove(TRACESTATE).unwrap_or_default(),
        })
    }

    /// A context received from elsewhere; `None` when `traceparent` is not
    /// a valid W3C value (it is then ignored, as the specification says).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        // The propagator accepts ids of the wrong length; the
        // specification does not.
        let hex = |part: &str, len: usize| {
            part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit())
        };
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        if parts.len() < 4
            || !hex(parts[0], 2)
            || !hex(parts[1], 32)
            || !hex(parts[2], 16)
            || !hex(parts[3], 2)
        {
            return None;
        }
        let candidate = Self {
            traceparent: traceparent.trim().to_owned(),
            tracestate: tracestate.unwrap_or_default().trim().to_owned(),
        };
        let context = TraceContextPropagator::new().extract(&Found(&candidate));
        context
            .span()
            .span_context()
            .is_valid()
            .then_some(candidate)
    }

    /// Whether the trace is sampled (the `01` flag): an unsampled trace's
    /// spans are not built at all, only its context is passed on, so that
    /// the next process follows the same decision.
    pub fn sampled(&self) -> bool {
        self.traceparent
            .rsplit('-')
            .next()
            .and_then(|flags| u8::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 1 == 1)
    }

    /// Whether `span` exists and is sampled (its children are worth
    /// building).
    pub fn span_sampled(span: &tracing::Span) -> bool {
        !span.is_disabled() && span.context().span().span_context().is_sampled()
    }

    /// The trace id, 32 hex digits.
    pub fn trace_id(&self) -> &str {
        self.traceparent.split('-').nth(1).unwrap_or_default()
    }

    /// Makes `span` a child of this context (a span in another process, or
    /// one that ended before a crash). Must be called before the span is
    /// first entered; does nothing when spans are not exported.
    pub fn adopt(&self, span: &tracing::Span) {
        let context = TraceContextPropagator::new().extract(&Found(self));
        let _ = span.set_parent(context);
    }

    /// The context from gRPC request metadata, if the caller sent one.
    pub fn from_grpc(metadata: &tonic::metadata::MetadataMap) -> Option<Self> {
        let traceparent = metadata.get(TRACEPARENT)?.to_str().ok()?;
        let tracestate = metadata.get(TRACESTATE).and_then(|v| v.to_str().ok());
        Self::parse(traceparent, tracestate)
    }

    /// The context from AMQP message headers, if the publisher sent one.
    #[cfg(feature = "lapin")]
    pub fn from_amqp(headers: Option<&lapin::types::FieldTable>) -> Option<Self> {
        let headers = headers?.inner();
        let text = |key: &str| match headers.get(key)? {
            lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
            lapin::types::AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        };
        Self::parse(&text(TRACEPARENT)?, text(TRACESTATE).as_deref())
    }

    /// Adds the context to AMQP message headers.
    #[cfg(feature = "lapin")]
    pub fn to_amqp(&self, headers: &mut lapin::types::FieldTable) {
        use lapin::types::{AMQPValue, LongString};
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(LongString::from(self.traceparent.as_str())),
        );
        if !self.tracestate.is_empty() {
            headers.insert(
                TRACESTATE.into(),
                AMQPValue::LongString(LongString::from(self.tracestate.as_str())),
            );
        }
    }
}

/// The span of a message received with the context `from`, built by
/// `make` (whose span must have no parent) and made a child of `from`;
/// none at all when spans are not exported or the sender's trace is not
/// sampled (the context is then passed on as it came, so the next process
/// follows the same decision). Every consumer span is built this way.
pub fn continue_from(
    from: Option<&TraceContext>,
    make: impl FnOnce() -> tracing::Span,
) -> tracing::Span {
    if !exporting() || from.is_some_and(|f| !f.sampled()) {
        return tracing::Span::none();
    }
    let span = make();
    if let Some(from) = from {
        from.adopt(&span);
    }
    span
}

/// Records a span event (exported with the span, not logged): what a
/// trace shows of a retry, a timeout or a compensation.
pub fn add_event(
    span: &tracing::Span,
    name: &'static str,
    attributes: Vec<(&'static str, String)>,
) {
    if !exporting() || span.is_disabled() {
        return;
    }
    span.add_event(
        name,
        attributes
            .into_iter()
            .map(|(key, value)| KeyValue::new(key, value))
            .collect(),
    );
}

/// Set once this process's subscriber exports spans.
pub(super) static EXPORTING: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported by this process (so building events and
/// attributes for them is worth it).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_kept_and_a_bad_one_refused() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceContext::parse(good, Some("vendor=1")).expect("valid");
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.tracestate, "vendor=1");
        assert!(parsed.sampled());
        let unsampled = TraceContext::parse(&good.replace("-01", "-00"), None).expect("valid");
        assert!(!unsampled.sampled());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn without_an_exporter_a_span_has_no_context() {
        let span = tracing::info_span!("x");
        assert_eq!(TraceContext::of(&span), None);
    }
}
