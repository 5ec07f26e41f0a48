//! Configuration: flags with environment fallbacks, validated once at start.
//! A bad value fails fast with a message naming the flag and variable.

use std::{net::SocketAddr, path::PathBuf};

use saga_proto::{
    amqp::Topology,
    connect::{FileError, broker::BrokerFlags, read_secret_file, redact},
};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when on a terminal.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Settings of `orchestrator serve` (and of the orchestrator inside `dev`).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// PostgreSQL URL; the database is created if missing. `sslmode` and
    /// `sslrootcert` are honoured; a remote host without `sslmode` gets
    /// `verify-full`.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/sagas", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: String,
    /// File holding the PostgreSQL URL (instead of --database-url, so that
    /// its password is in no environment or process list).
    #[arg(long, env = "DATABASE_URL_FILE", conflicts_with = "database_url")]
    pub database_url_file: Option<PathBuf>,
    /// RabbitMQ: URL and TLS files.
    #[command(flatten)]
    pub broker: BrokerFlags,
    /// Address the gRPC API listens on (port 0 picks a free one).
    #[arg(long, env = "GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Prefix of every exchange and queue name.
    #[arg(long = "namespace", env = "SAGA_NAMESPACE", default_value = "saga", value_parser = parse_namespace)]
    pub namespace: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// Largest database connection pool.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=200))]
    pub db_max_connections: u32,
    /// Unacknowledged replies RabbitMQ may push at once.
    #[arg(long, env = "REPLY_PREFETCH", default_value_t = 512, value_parser = clap::value_parser!(u16).range(1..))]
    pub reply_prefetch: u16,
    /// Most replies applied in one database transaction.
    #[arg(long, env = "REPLY_BATCH", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub reply_batch: u16,
    /// Kind of the reply queue (quorum unless measuring).
    #[arg(long, env = "SAGA_QUEUE_TYPE", default_value = "quorum")]
    pub queue_type: crate::bus::QueueType,
    /// Also run the synthetic `bench_chain_<n>` flows (for saga-bench).
    #[arg(long, env = "SAGA_BENCH_FLOWS")]
    pub bench_flows: bool,
    /// Reply batches applied at once (each in its own transaction).
    #[arg(long, env = "REPLY_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub reply_workers: u16,
    /// Serve the operator console (HTTP; HTTPS with --tls-cert) on this
    /// address (off when unset; `dev` serves it on 127.0.0.1:8080).
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Serve Prometheus metrics on this address (off when unset).
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve the gRPC API over TLS with this certificate chain (PEM, leaf
    /// first; re-read on SIGHUP). Needs --tls-key.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM; re-read on SIGHUP).
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM; mTLS; re-read on
    /// SIGHUP). The certificate's first DNS name, else its CN, is the
    /// caller; its roles come from the --auth-tokens file's `[[certificate]]`
    /// entries.
    #[arg(long, env = "TLS_CLIENT_CA_FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// The access file (TOML: token hashes and certificate subjects with
    /// their roles; re-read on SIGHUP). Without it the API is open.
    #[arg(long, env = "AUTH_TOKENS_FILE")]
    pub auth_tokens: Option<PathBuf>,
    /// Dead-letter and count every reply whose AMQP `user_id` is not the
    /// broker user of its step's participant (docs/SECURITY.md).
    #[arg(long, env = "VERIFY_REPLY_SENDER")]
    pub verify_reply_sender: bool,
    /// `participant=user`: the broker user of a participant whose user is
    /// not named like it (repeatable, or comma-separated in the variable).
    #[arg(long = "reply-sender", env = "REPLY_SENDERS", value_delimiter = ',', value_parser = crate::bus::senders::parse_pair, requires = "verify_reply_sender")]
    pub reply_senders: Vec<(sagas::names::ParticipantName, String)>,
    /// How starts are admitted: `adaptive` bounds the sagas in flight by
    /// the participants' measured latency, `fixed` by --max-in-flight, `off`
    /// admits everything (docs/RELIABILITY.md, "Traffic spikes").
    #[arg(long, env = "ADMISSION", value_enum, default_value = "adaptive")]
    pub admission: crate::admission::Mode,
    /// Most sagas in flight in the whole system: the limit with
    /// `--admission fixed`, the adaptive limit's ceiling otherwise.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight: u32,
    /// Queueing delay the adaptive limit aims at, in milliseconds: how much
    /// longer than at rest a step's round trip may take.
    #[arg(long, env = "ADMISSION_TARGET_MS", default_value_t = 150, value_parser = clap::value_parser!(u32).range(5..=60_000))]
    pub admission_target_ms: u32,
    /// How long a finished (COMPLETED or COMPENSATED) saga is kept, with
    /// its history, before it is deleted: `7d`, `12h`, `30m`, or `off` to
    /// keep everything. FAILED sagas are never deleted.
    #[arg(long, env = "RETENTION", default_value = "7d", value_parser = parse_retention)]
    pub retention: Retention,
    /// How often the retention sweep looks for sagas past `--retention`.
    #[arg(long, env = "RETENTION_INTERVAL", default_value = "30s", value_parser = parse_interval)]
    pub retention_interval: std::time::Duration,
    /// Allow serving on a non-loopback address without TLS and
    /// authentication (logged as a warning at start and every hour).
    #[arg(long, env = "SAGA_INSECURE")]
    pub insecure: bool,
}

/// `orchestrator serve`'s flags alone, for [`Config::from_args`].
#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    config: Config,
}

impl Config {
    /// Parses the flags of `orchestrator serve` (without the program
    /// name), falling back to the same environment variables and defaults,
    /// for a service that embeds the orchestrator without a command line of
    /// its own (one that has one flattens [`Config`] into its parser).
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        let program = std::iter::once(std::ffi::OsString::from("orchestrator"));
        Flags::try_parse_from(program.chain(args.into_iter().map(Into::into)))
            .map(|flags| flags.config)
    }

    /// The shipped flows this configuration runs: order placement, and the
    /// synthetic `bench_chain_<n>` flows with `--bench-flows`.
    pub fn shipped_flows(&self) -> Vec<sagas::Flow> {
        let mut flows = sagas::flows::all();
        if self.bench_flows {
            flows.extend(sagas::flows::bench::definitions());
        }
        flows
    }

    /// The PostgreSQL URL: --database-url, or the content of
    /// --database-url-file (read now; an error names the file, never its
    /// content).
    pub fn database_url(&self) -> Result<String, FileError> {
        match &self.database_url_file {
            Some(path) => {
                let url = read_secret_file("DATABASE_URL_FILE", path)?;
                parse_database_url(&url).map_err(|problem| FileError {
                    what: "DATABASE_URL_FILE",
                    path: path.clone(),
                    problem: redact(&problem),
                })
            }
            None => Ok(self.database_url.clone()),
        }
    }

    /// Exchange and queue names for the configured namespace.
    pub fn topology(&self) -> Topology {
        Topology::new(&self.namespace).expect("validated by the parser")
    }
}

/// `--retention`: how long finished sagas are kept (`None`: for ever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<std::time::Duration>);

fn parse_retention(text: &str) -> Result<Retention, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(Retention(None));
    }
    humantime::parse_duration(text.trim())
        .map(|d| Retention(Some(d)))
        .map_err(|e| format!("{text:?} is not a duration such as 7d, 12h or 30m, nor off: {e}"))
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be longer than 0".into()),
        Err(e) => Err(format!("{text:?} is not a duration such as 30s or 5m: {e}")),
    }
}

fn parse_database_url(text: &str) -> Result<String, String> {
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        return Err("not a PostgreSQL URL: use postgres://user@host:port/database".into());
    }
    saga_proto::connect::postgres::connect_options(text)
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_namespace(text: &str) -> Result<String, String> {
    Topology::new(text)
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_bad_values_name_the_flag() {
        let config = Config::from_args(Vec::<String>::new()).unwrap();
        assert_eq!(config.namespace, "saga");
        assert_eq!(config.grpc_addr.port(), 50051);
        for (flag, value) in [
            ("--namespace", "Bad Name"),
            ("--grpc-addr", "nowhere"),
            ("--amqp-url", "http://x"),
            ("--database-url", "mysql://x"),
            ("--db-max-connections", "0"),
            ("--admission", "sometimes"),
            ("--max-in-flight", "0"),
            ("--admission-target-ms", "fast"),
            ("--admission-target-ms", "1"),
        ] {
            let error = Config::from_args([flag, value]).err().unwrap().to_string();
            assert!(error.contains(flag), "{flag}: {error}");
        }
    }
}
