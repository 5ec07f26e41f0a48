//! Log lines that can be found from a trace and the other way round: a
//! JSON line written inside a span carries the span's `trace_id` and
//! `span_id` (when spans are exported) and the `saga_id` of the saga the
//! span concerns, even when the line itself does not name it.

use std::fmt;

use json_subscriber::JsonLayer;
use opentelemetry::trace::TraceContextExt;
use tracing::{Subscriber, field::Field, span};
use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

/// The saga a span concerns: its own `saga.id` field, else its parent's.
#[derive(Debug, Clone)]
pub(super) struct SagaId(String);

/// Remembers on each span the saga it concerns ([`SagaId`]), so the JSON
/// layer can print it on every line written inside. Spans name the saga
/// `saga.id` (the OpenTelemetry attribute); logs call it `saga_id`.
pub(super) struct SagaIds;

struct FindSagaId(Option<String>);

impl tracing::field::Visit for FindSagaId {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "saga.id" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "saga.id" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S> Layer<S> for SagaIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut found = FindSagaId(None);
        attrs.record(&mut found);
        let saga = found.0.map(SagaId).or_else(|| {
            span.parent()
                .and_then(|parent| parent.extensions().get::<SagaId>().cloned())
        });
        if let Some(saga) = saga {
            span.extensions_mut().insert(saga);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let mut found = FindSagaId(None);
        values.record(&mut found);
        if let (Some(saga), Some(span)) = (found.0, ctx.span(id)) {
            span.extensions_mut().replace(SagaId(saga));
        }
    }
}

/// One JSON object per line: time, level, the event's fields at the top
/// level, the fields of the spans it is in, and the correlation ids.
pub(super) fn json<S>() -> JsonLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let mut layer = JsonLayer::stdout();
    layer
        .with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime)
        .with_level("level")
        .with_target("target")
        .with_flattened_event()
        .with_top_level_flattened_span_list();
    layer.add_from_extension_ref::<SagaId, _, _>("saga_id", |saga| Some(&saga.0));
    layer.add_multiple_dynamic_fields(|_event, ctx, writer| {
        let Some(span) = ctx.lookup_current() else {
            return;
        };
        let context = tracing::dispatcher::get_default(|dispatch| {
            tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
        });
        if let Some(context) = context {
            let span = context.span();
            let ids = span.span_context();
            if ids.is_valid() {
                let _ = writer.write_field("trace_id", ids.trace_id().to_string());
                let _ = writer.write_field("span_id", ids.span_id().to_string());
            }
        }
    });
    layer
}
