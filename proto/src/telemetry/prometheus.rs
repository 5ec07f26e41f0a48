//! The Prometheus exporter every service installs: `/metrics` on the
//! given address, histograms (never summaries, which cannot be summed
//! across instances) with the buckets below, the one place they are
//! chosen.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Latencies from a millisecond (one step on a local participant) to an
/// hour (a saga waiting out an outage), in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// Sizes of batches and groups (1 to 512 rows or messages).
pub const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the Prometheus exporter on {addr}")]
pub struct ExporterError {
    /// Where it was to listen.
    pub addr: SocketAddr,
    /// Why not.
    #[source]
    pub source: BuildError,
}

/// Serves `/metrics` on `addr` from a global recorder: every metric name
/// ending in `_seconds` is a histogram with [`LATENCY_BUCKETS`], every one
/// ending in `_size` one with [`SIZE_BUCKETS`].
pub fn install(addr: SocketAddr) -> Result<(), ExporterError> {
    let error = |source| ExporterError { addr, source };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(error)?
        .set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS)
        .map_err(error)?
        .install()
        .map_err(error)
}
