//! What the orchestrator tells its operators: logs (`RUST_LOG` filters,
//! `LOG_FORMAT` picks pretty or JSON), traces (exported over OTLP when the
//! standard `OTEL_*` variables ask for it, see [`saga_proto::telemetry`])
//! and Prometheus metrics.
//!
//! - [`spans`]: the spans of a saga's path (the API call, each
//!   transition, each message published) and a message's place in its
//!   saga's trace ([`spans::MessageTrace`]).
//! - [`metrics`]: what a committed transition counts and measures.
//! - [`gauges`]: what is active, stuck or waiting, read from the database
//!   on an interval.

pub mod gauges;
pub mod metrics;
pub mod spans;

pub use saga_proto::telemetry::{Telemetry, TelemetryError};

use crate::config::LogFormat;

/// Installs the global subscriber and, when configured, the span exporter
/// (a second call in one process is a no-op, so tests can start several
/// apps in one process). Keep the returned guard until the end of `main`:
/// dropping it exports the spans still buffered.
pub fn init(format: LogFormat) -> Result<Telemetry, TelemetryError> {
    saga_proto::telemetry::init(&saga_proto::telemetry::Settings {
        service_name: "saga-orchestrator".to_owned(),
        json: format == LogFormat::Json,
        // lapin logs every returned (unroutable) message at WARN with its
        // whole body; the publisher logs its own one-line warning instead.
        default_filter:
            "info,sqlx=warn,lapin=warn,lapin::returned_messages=error,amq_protocol=warn".to_owned(),
    })
}
