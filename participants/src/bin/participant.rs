//! `participant <name>... | all`: runs demo participants until SIGINT/SIGTERM.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use participants::demo::{self, DemoConfig, Service};
use participants::kit::{FaultConfig, PoolSettings, faults::parse_rate};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

fn rate(value: &str) -> Result<f64, String> {
    parse_rate("rate", value).map_err(|e| e.message)
}

fn database_url(value: &str) -> Result<String, String> {
    saga_proto::connect::postgres::connect_options(value).map_err(|e| e.to_string())?;
    Ok(value.to_owned())
}

fn participant_name(value: &str) -> Result<String, String> {
    Service::parse_list(&[value]).map_err(|e| e.to_string())?;
    Ok(value.to_owned())
}

fn namespace(value: &str) -> Result<String, String> {
    sagas::names::Namespace::new(value).map_err(|e| e.to_string())?;
    Ok(value.to_owned())
}

/// Runs the demo saga participants (inventory, payment, orders,
/// notification), each with its own database and queue.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Participants to run: inventory, payment, orders, notification, or all.
    #[arg(required = true, value_name = "NAME", value_parser = participant_name)]
    names: Vec<String>,

    /// Base PostgreSQL URL; each participant uses the database PREFIX + NAME on that server.
    /// `sslmode`/`sslrootcert` are honoured; a remote host without `sslmode` gets `verify-full`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        value_parser = database_url,
        hide_env_values = true
    )]
    database_url: String,

    /// Serve Prometheus metrics (`/metrics`) on this address, e.g. 0.0.0.0:9001.
    #[arg(long, env = "METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,

    /// File holding the base PostgreSQL URL (instead of --database-url).
    #[arg(long, env = "DATABASE_URL_FILE", conflicts_with = "database_url")]
    database_url_file: Option<std::path::PathBuf>,

    /// Prefix (PREFIX) of the per-participant database names; default: the namespace and '_'.
    #[arg(long, env = "DATABASE_PREFIX")]
    database_prefix: Option<String>,

    /// RabbitMQ: URL and TLS files.
    #[command(flatten)]
    broker: saga_proto::connect::broker::BrokerFlags,

    /// Namespace prefixed to every exchange and queue name.
    #[arg(long, env = "SAGA_NAMESPACE", default_value = "saga", value_parser = namespace)]
    namespace: String,

    /// Log output format (filter with RUST_LOG).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    log_format: LogFormat,

    /// Database connections per participant.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    db_pool_size: u32,

    /// Unacknowledged commands the broker pushes per participant.
    #[arg(long, env = "PREFETCH", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,

    /// Batches handled at once per participant (each is one transaction).
    #[arg(long, env = "CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,

    /// Most commands answered in one transaction (the deliveries already
    /// pushed by the broker when a batch starts; 1 turns batching off).
    #[arg(long, env = "MAX_BATCH", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_batch: u32,

    /// Milliseconds between outbox relay passes.
    #[arg(long, env = "RELAY_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    relay_interval_ms: u64,

    /// Probability (0..1) that a command fails with a transient error.
    #[arg(long, env = "FAULT_FAILURE_RATE", default_value_t = 0.0, value_parser = rate)]
    fault_failure_rate: f64,

    /// Milliseconds added before handling each batch of commands.
    #[arg(long, env = "FAULT_LATENCY_MS", default_value_t = 0)]
    fault_latency_ms: u64,

    /// Probability (0..1) that a committed reply is never published.
    #[arg(long, env = "FAULT_DROP_REPLY_RATE", default_value_t = 0.0, value_parser = rate)]
    fault_drop_reply_rate: f64,

    /// Probability (0..1) that a reply is published twice.
    #[arg(long, env = "FAULT_DUPLICATE_REPLY_RATE", default_value_t = 0.0, value_parser = rate)]
    fault_duplicate_reply_rate: f64,

    /// Abort the process after this many commands committed.
    #[arg(long, env = "FAULT_CRASH_AFTER", value_parser = clap::value_parser!(u64).range(1..))]
    fault_crash_after: Option<u64>,
}

/// Logs, and spans when the `OTEL_*` variables ask for them; the service
/// is named after the participants it runs (`participant-inventory`).
fn init_telemetry(
    format: LogFormat,
    services: &[Service],
) -> anyhow::Result<saga_proto::telemetry::Telemetry> {
    let names: Vec<&str> = services.iter().map(|s| s.name()).collect();
    Ok(saga_proto::telemetry::init(
        &saga_proto::telemetry::Settings {
            service_name: format!("participant-{}", names.join("-")),
            json: matches!(format, LogFormat::Json),
            default_filter: "info,sqlx::postgres::notice=warn".to_owned(),
        },
    )?)
}

fn config(args: &Args) -> anyhow::Result<DemoConfig> {
    let database_url = match &args.database_url_file {
        Some(path) => saga_proto::connect::read_secret_file("DATABASE_URL_FILE", path)?,
        None => args.database_url.clone(),
    };
    let mut config = DemoConfig::from_urls(&args.broker.amqp_url, &args.namespace, &database_url)?;
    config.broker = args.broker.broker()?;
    config.database_prefix = args.database_prefix.clone();
    config.pool = PoolSettings {
        max_connections: args.db_pool_size,
        ..PoolSettings::default()
    };
    config.prefetch = args.prefetch;
    config.concurrency = args.concurrency as usize;
    config.max_batch = args.max_batch as usize;
    config.relay_interval = Duration::from_millis(args.relay_interval_ms);
    config.faults = FaultConfig {
        failure_rate: args.fault_failure_rate,
        latency: Duration::from_millis(args.fault_latency_ms),
        drop_reply_rate: args.fault_drop_reply_rate,
        duplicate_reply_rate: args.fault_duplicate_reply_rate,
        crash_after: args.fault_crash_after,
    };
    Ok(config)
}

async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    ctrl_c.await.ok();
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.ok();
    tracing::info!("shutting down");
    token.cancel();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Reads FAILPOINTS (only with the `failpoints` feature; see `crash_point!`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let services = Service::parse_list(&args.names).context("NAME argument")?;
    let config = config(&args)?;
    let _telemetry = init_telemetry(args.log_format, &services)?;
    if let Some(addr) = args.metrics_addr {
        saga_proto::telemetry::prometheus::install(addr)?;
    }
    if config.faults.is_active() {
        tracing::warn!(faults = ?config.faults, "fault injection is on");
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_signal(shutdown.clone()));
    tracing::info!(
        participants = ?services.iter().map(|s| s.name()).collect::<Vec<_>>(),
        namespace = %config.topology.namespace(),
        "starting"
    );
    demo::run(&services, config, shutdown).await?;
    Ok(())
}
