//! Logs, traces and metrics, set up the same way by every service (the
//! orchestrator, each participant built on the kit, the tools), so that
//! one saga's spans from every process join into one trace and every log
//! line can be found from it.
//!
//! - [`init`]: the global `tracing` subscriber. Log lines go to stdout,
//!   pretty or JSON; JSON lines carry `trace_id`, `span_id` and `saga_id`
//!   of the span they were written in. Spans are exported over OTLP/gRPC
//!   only when the standard variables ask for it
//!   (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`;
//!   `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`
//!   and `OTEL_TRACES_SAMPLER_ARG` as the specification says). Without
//!   them nothing is exported and no exporter exists.
//! - [`propagation`]: the W3C trace context of a span, as text that can
//!   be stored with a message (the outbox) and carried in AMQP headers or
//!   gRPC metadata, and back.
//! - [`prometheus`]: the Prometheus exporter, with the one list of
//!   histogram buckets.

mod logs;
pub mod prometheus;
pub mod propagation;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

pub use propagation::TraceContext;

/// How a service wants its telemetry.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `service.name` when `OTEL_SERVICE_NAME` does not say
    /// (`saga-orchestrator`, `participant-inventory`).
    pub service_name: String,
    /// JSON log lines instead of human-readable ones.
    pub json: bool,
    /// The log filter when `RUST_LOG` is not set.
    pub default_filter: String,
}

/// A telemetry variable that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A variable holds a value the specification does not allow.
    #[error("{variable}={value:?}: {expected}")]
    Invalid {
        /// The variable.
        variable: &'static str,
        /// What it holds.
        value: String,
        /// What it may hold.
        expected: &'static str,
    },
    /// The OTLP exporter could not be built from the variables.
    #[error("cannot build the OTLP span exporter")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The installed telemetry; dropping it (at the end of `main`) exports
/// the spans still buffered.
#[derive(Debug)]
#[must_use = "dropping it stops the span export"]
pub struct Telemetry {
    /// Present when spans are exported.
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter, waiting at most
    /// a few seconds for the collector.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.force_flush();
            if let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("span export did not finish: {error}");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where spans go, from the environment: `None` when no OTLP endpoint is
/// configured (an empty value counts as none, as compose files pass
/// `${OTEL_EXPORTER_OTLP_ENDPOINT:-}`), or when `OTEL_SDK_DISABLED=true`
/// or `OTEL_TRACES_EXPORTER=none`.
pub fn otlp_endpoint() -> Result<Option<String>, TelemetryError> {
    endpoint_from(|name| std::env::var(name).ok())
}

/// [`otlp_endpoint`] over any source of variables.
fn endpoint_from(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, TelemetryError> {
    let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match var("OTEL_TRACES_EXPORTER").as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(TelemetryError::Invalid {
                variable: "OTEL_TRACES_EXPORTER",
                value: other.to_owned(),
                expected: "expected otlp or none",
            });
        }
    }
    let (variable, value) = match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Some(v) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", v),
        None => match var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(v) => ("OTEL_EXPORTER_OTLP_ENDPOINT", v),
            None => return Ok(None),
        },
    };
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(TelemetryError::Invalid {
            variable,
            value,
            expected: "expected an http:// or https:// URL of an OTLP/gRPC collector, e.g. http://127.0.0.1:4317",
        });
    };
    if !matches!(scheme, "http" | "https") || rest.is_empty() {
        return Err(TelemetryError::Invalid {
            variable,
            value,
            expected: "expected an http:// or https:// URL of an OTLP/gRPC collector, e.g. http://127.0.0.1:4317",
        });
    }
    if let Some(protocol) =
        var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        && protocol != "grpc"
    {
        return Err(TelemetryError::Invalid {
            variable: "OTEL_EXPORTER_OTLP_PROTOCOL",
            value: protocol,
            expected: "only grpc is supported (port 4317 of a collector or Jaeger)",
        });
    }
    Ok(Some(value))
}

/// Checks `OTEL_TRACES_SAMPLER` and its argument: the SDK falls back to
/// sampling everything on a typo, which at a saga per millisecond is a
/// surprise nobody wants, so a wrong value stops the start instead.
fn check_sampler(lookup: impl Fn(&str) -> Option<String>) -> Result<(), TelemetryError> {
    let Some(sampler) = lookup("OTEL_TRACES_SAMPLER") else {
        return Ok(());
    };
    let ratio = match sampler.as_str() {
        "always_on" | "always_off" | "parentbased_always_on" | "parentbased_always_off" => false,
        "traceidratio" | "parentbased_traceidratio" => true,
        _ => {
            return Err(TelemetryError::Invalid {
                variable: "OTEL_TRACES_SAMPLER",
                value: sampler,
                expected: "expected always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio",
            });
        }
    };
    if ratio {
        let arg = lookup("OTEL_TRACES_SAMPLER_ARG").unwrap_or_default();
        match arg.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => {}
            _ => {
                return Err(TelemetryError::Invalid {
                    variable: "OTEL_TRACES_SAMPLER_ARG",
                    value: arg,
                    expected: "expected the sampled fraction, a number from 0 to 1 (0.1 samples one trace in ten)",
                });
            }
        }
    }
    Ok(())
}

/// Installs the global subscriber: the log filter (`RUST_LOG`, else
/// `settings.default_filter`), stdout logs and, when configured, the span
/// exporter. A second call in one process (tests start several services
/// in one) keeps the first subscriber and exports nothing more. Must run
/// inside a Tokio runtime when an endpoint is configured (the gRPC
/// exporter is a Tonic client).
pub fn init(settings: &Settings) -> Result<Telemetry, TelemetryError> {
    let endpoint = otlp_endpoint()?;
    check_sampler(|name| std::env::var(name).ok())?;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&settings.default_filter));
    let provider = match endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()?;
            // `Resource::builder` reads OTEL_SERVICE_NAME and
            // OTEL_RESOURCE_ATTRIBUTES; the service's own name only fills
            // a gap. The sampler comes from OTEL_TRACES_SAMPLER(_ARG).
            let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty()) {
                Resource::builder().build()
            } else {
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build()
            };
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    // Each output has its own filter: `RUST_LOG=warn` quiets the logs but
    // must not switch tracing off (with one global filter, the info-level
    // spans of a saga's path would not exist at all).
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("saga-orchestrator"))
            .with_tracked_inactivity(false)
            .with_filter(
                // The exporter's own gRPC client must not trace itself.
                [
                    "h2",
                    "hyper",
                    "hyper_util",
                    "tonic",
                    "tower",
                    "opentelemetry",
                    "opentelemetry_sdk",
                    "opentelemetry_otlp",
                ]
                .into_iter()
                .fold(
                    tracing_subscriber::filter::Targets::new()
                        .with_default(tracing::level_filters::LevelFilter::INFO),
                    |targets, noisy| {
                        targets.with_target(noisy, tracing::level_filters::LevelFilter::OFF)
                    },
                ),
            )
    });
    let ids = logs::SagaIds::default();
    let logs = if settings.json {
        logs::json(&ids).with_filter(filter).boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_filter(filter)
            .boxed()
    };
    let installed = tracing_subscriber::registry()
        .with(ids.with_filter(logs::saga_span_filter()))
        .with(otel)
        .with(logs)
        .try_init();
    match installed {
        Ok(()) => {
            if provider.is_some() {
                propagation::EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Telemetry { provider })
        }
        // Another service of this process installed its subscriber first.
        Err(_) => {
            if let Some(provider) = provider {
                let _ = provider.shutdown();
            }
            Ok(Telemetry { provider: None })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn spans_are_exported_only_when_an_endpoint_is_set() {
        assert_eq!(endpoint_from(vars(&[])).unwrap(), None);
        // Compose passes `${OTEL_EXPORTER_OTLP_ENDPOINT:-}`.
        assert_eq!(
            endpoint_from(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])).unwrap(),
            None
        );
        assert_eq!(
            endpoint_from(vars(&[(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://jaeger:4317"
            )]))
            .unwrap(),
            Some("http://jaeger:4317".to_owned())
        );
        // The signal's own variable wins.
        assert_eq!(
            endpoint_from(vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://b:4317"),
            ]))
            .unwrap(),
            Some("https://b:4317".to_owned())
        );
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(
                endpoint_from(vars(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
                    off
                ]))
                .unwrap(),
                None,
                "{off:?}"
            );
        }
    }

    #[test]
    fn a_wrong_variable_is_refused_naming_it() {
        let message = |pairs: &[(&str, &str)]| endpoint_from(vars(pairs)).unwrap_err().to_string();
        let bad = message(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "jaeger:4317")]);
        assert!(
            bad.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT=\"jaeger:4317\""),
            "{bad}"
        );
        assert!(bad.contains("http://"), "{bad}");
        let bad = message(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]);
        assert!(bad.contains("only grpc"), "{bad}");
        let bad = message(&[("OTEL_TRACES_EXPORTER", "zipkin")]);
        assert!(bad.starts_with("OTEL_TRACES_EXPORTER"), "{bad}");

        let sampler = |pairs: &[(&str, &str)]| check_sampler(vars(pairs));
        assert!(sampler(&[]).is_ok());
        assert!(sampler(&[("OTEL_TRACES_SAMPLER", "parentbased_always_on")]).is_ok());
        assert!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ])
            .is_ok()
        );
        let typo = sampler(&[("OTEL_TRACES_SAMPLER", "traceid_ratio")])
            .unwrap_err()
            .to_string();
        assert!(
            typo.starts_with("OTEL_TRACES_SAMPLER=\"traceid_ratio\""),
            "{typo}"
        );
        for arg in ["", "10", "-0.5", "ten percent"] {
            let refused = sampler(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", arg),
            ])
            .unwrap_err()
            .to_string();
            assert!(
                refused.starts_with("OTEL_TRACES_SAMPLER_ARG"),
                "{arg:?}: {refused}"
            );
        }
    }
}
