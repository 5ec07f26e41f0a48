//! Logging setup: `RUST_LOG` filters, `LOG_FORMAT` picks pretty or JSON.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber (a second call is a no-op, so tests can
/// start several apps in one process).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        // lapin logs every returned (unroutable) message at WARN with its
        // whole body; the publisher logs its own one-line warning instead.
        .unwrap_or_else(|_| {
            EnvFilter::new(
                "info,sqlx=warn,lapin=warn,lapin::returned_messages=error,amq_protocol=warn",
            )
        });
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Pretty => registry.with(fmt::layer().with_target(false)).try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true))
            .try_init(),
    };
}
