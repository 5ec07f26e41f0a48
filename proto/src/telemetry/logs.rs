//! Log lines that can be found from a trace and the other way round: a
//! JSON line written inside a span carries the span's `trace_id` and
//! `span_id` (when spans are exported) and the `saga_id` of the saga the
//! span concerns, even when the line itself does not name it.

use std::fmt;
use std::sync::{Arc, OnceLock};

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
///
/// It also keeps the subscriber it is part of, which the JSON layer needs
/// to read a span's OpenTelemetry ids while it writes a line (inside an
/// event, `tracing`'s thread-local default cannot be asked for it).
#[derive(Default, Clone)]
pub(super) struct SagaIds {
    dispatch: Arc<OnceLock<tracing::dispatcher::WeakDispatch>>,
}

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
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.dispatch.set(subscriber.downgrade());
    }

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

/// What [`SagaIds`] looks at: spans at info level and above, never an
/// event. Decided once per callsite, so the many debug and trace events
/// of the libraries below stay switched off (a layer without a filter
/// would turn every callsite on, at a cost on every one of them).
pub(super) fn saga_span_filter()
-> tracing_subscriber::filter::FilterFn<fn(&tracing::Metadata<'_>) -> bool> {
    tracing_subscriber::filter::FilterFn::new(|meta| {
        meta.is_span() && *meta.level() <= tracing::Level::INFO
    })
}

/// One JSON object per line: time, level, the event's fields at the top
/// level, the fields of the spans it is in, and the correlation ids.
pub(super) fn json<S>(ids: &SagaIds) -> JsonLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    json_to(std::io::stdout, ids)
}

/// [`json`] writing to `writer`.
fn json_to<S, W>(writer: W, ids: &SagaIds) -> JsonLayer<S, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + 'static,
{
    let mut layer = JsonLayer::new(writer);
    layer
        .with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime)
        .with_level("level")
        .with_target("target")
        .with_flattened_event()
        .with_top_level_flattened_span_list();
    layer.add_from_extension_ref::<SagaId, _, _>("saga_id", |saga| Some(&saga.0));
    let dispatch = ids.dispatch.clone();
    layer.add_multiple_dynamic_fields(move |_event, ctx, writer| {
        let Some(span) = ctx.lookup_current() else {
            return;
        };
        let Some(dispatch) = dispatch.get().and_then(|d| d.upgrade()) else {
            return;
        };
        let context = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch);
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::{Layer as _, layer::SubscriberExt};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    fn lines(buffer: &Buffer) -> Vec<serde_json::Value> {
        String::from_utf8(buffer.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    }

    #[test]
    fn a_line_inside_a_saga_span_carries_the_trace_span_and_saga_ids() {
        let buffer = Buffer::default();
        // Spans are sampled and get ids; nothing is exported.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let ids = SagaIds::default();
        let subscriber = tracing_subscriber::registry()
            .with(ids.clone().with_filter(saga_span_filter()))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(json_to(buffer.clone(), &ids));
        tracing::subscriber::with_default(subscriber, || {
            let saga = tracing::info_span!("saga.transition", saga.id = "0190-saga");
            let _saga = saga.enter();
            let inner = tracing::info_span!("publish");
            let _inner = inner.enter();
            tracing::info!(step = "reserve", "command published");
        });
        let lines = lines(&buffer);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(
            line["saga_id"], "0190-saga",
            "inherited from the outer span: {line}"
        );
        assert_eq!(line["step"], "reserve");
        assert_eq!(line["level"], "INFO");
        let trace = line["trace_id"].as_str().expect("trace_id");
        let span = line["span_id"].as_str().expect("span_id");
        assert_eq!((trace.len(), span.len()), (32, 16), "{line}");
    }

    #[test]
    fn without_spans_exported_a_line_has_no_ids_to_lie_about() {
        let buffer = Buffer::default();
        let ids = SagaIds::default();
        let subscriber = tracing_subscriber::registry()
            .with(ids.clone().with_filter(saga_span_filter()))
            .with(json_to(buffer.clone(), &ids));
        tracing::subscriber::with_default(subscriber, || {
            let saga = tracing::info_span!("saga.transition", saga.id = "0190-saga");
            let _saga = saga.enter();
            tracing::warn!("no reply yet");
        });
        let line = &lines(&buffer)[0];
        assert_eq!(line["saga_id"], "0190-saga");
        assert!(line.get("trace_id").is_none(), "{line}");
    }
}
