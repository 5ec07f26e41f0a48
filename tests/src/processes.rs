//! Real service processes for failure-injection tests: start them with an
//! environment (including `FAILPOINTS`), `kill -9` them, let them crash at a
//! named point, restart them. Output goes to one log file per start under
//! the target directory (`target/saga-logs/<namespace>/<name>.<n>.log`),
//! and every process still running is killed when its handle is dropped,
//! even if the test panicked.
//!
//! The processes themselves are [`entry::orchestrator`] and
//! [`entry::participants`], wrapped by the thin binaries
//! `saga-orchestrator-proc` and `saga-participant-proc` (the test suite
//! finds them with `env!("CARGO_BIN_EXE_...")`) and by hidden subcommands of
//! `saga-chaos` (which runs itself, so it never uses stale binaries).

use std::{
    collections::BTreeMap,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use tokio::process::{Child, Command};

/// Why a process could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The log file could not be created.
    #[error("cannot create log file {path}: {source}")]
    Log {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The program could not be spawned.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How to launch one kind of service process: a program and leading
/// arguments (e.g. `saga-chaos orchestrator`).
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The executable.
    pub program: PathBuf,
    /// Arguments before anything else.
    pub args: Vec<String>,
}

impl Launcher {
    /// Runs `program` without arguments.
    pub fn program(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// Runs the current executable with `subcommand`.
    pub fn current_exe(subcommand: &str) -> std::io::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()?,
            args: vec![subcommand.to_owned()],
        })
    }
}

/// How the service processes are launched.
#[derive(Debug, Clone)]
pub struct Launchers {
    /// An orchestrator (`orchestrator serve` with crash points).
    pub orchestrator: Launcher,
    /// Demo participants (`PARTICIPANTS=inventory,payment ...`).
    pub participants: Launcher,
}

/// The directory of this build's target (`target/`), derived from the
/// running executable (`target/<profile>/deps/<test>` or
/// `target/<profile>/<bin>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("target/debug/x"));
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    // Now target/<profile>.
    dir.pop();
    dir
}

/// Where the logs of `namespace`'s processes go (`SAGA_LOG_DIR` overrides
/// the base directory).
pub fn log_dir(namespace: &str) -> PathBuf {
    let base = std::env::var_os("SAGA_LOG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("saga-logs"));
    base.join(namespace)
}

/// Variables a service process must never inherit from the test process.
const SCRUBBED: [&str; 8] = [
    "FAILPOINTS",
    "DATABASE_URL",
    "AMQP_URL",
    "SAGA_NAMESPACE",
    "GRPC_ADDR",
    "METRICS_ADDR",
    "DATABASE_PREFIX",
    "PARTICIPANTS",
];

/// One service process that can be started, killed and restarted.
#[derive(Debug)]
pub struct ManagedProcess {
    /// Name in logs and log file names, e.g. `orchestrator-1`.
    name: String,
    /// What to run.
    launcher: Launcher,
    /// Environment of every start (on top of the inherited one).
    env: BTreeMap<String, String>,
    /// Where log files go.
    log_dir: PathBuf,
    /// The running child, if any.
    child: Option<Child>,
    /// Starts so far (numbers the log files).
    starts: u32,
    /// How the last run ended, once known.
    last_exit: Option<ExitStatus>,
}

impl ManagedProcess {
    /// A stopped process named `name`, logging under `log_dir`.
    pub fn new(name: &str, launcher: Launcher, log_dir: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            launcher,
            env: BTreeMap::new(),
            log_dir,
            child: None,
            starts: 0,
            last_exit: None,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets a variable for every later start.
    pub fn set_env(&mut self, key: &str, value: impl Into<String>) {
        self.env.insert(key.to_owned(), value.into());
    }

    /// Removes a variable for every later start.
    pub fn remove_env(&mut self, key: &str) {
        self.env.remove(key);
    }

    /// A variable of the next start.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// The log file of the current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        self.log_dir
            .join(format!("{}.{}.log", self.name, self.starts.max(1)))
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Starts it with its environment plus `extra` (for this run only,
    /// e.g. `FAILPOINTS`). A running instance is killed first.
    pub async fn start_with(&mut self, extra: &[(&str, &str)]) -> Result<u32, ProcessError> {
        if self.child.is_some() {
            self.kill().await;
        }
        std::fs::create_dir_all(&self.log_dir).map_err(|source| ProcessError::Log {
            path: self.log_dir.clone(),
            source,
        })?;
        self.starts += 1;
        let path = self.log_path();
        let log = std::fs::File::create(&path).map_err(|source| ProcessError::Log {
            path: path.clone(),
            source,
        })?;
        let err = log.try_clone().map_err(|source| ProcessError::Log {
            path: path.clone(),
            source,
        })?;
        let mut command = Command::new(&self.launcher.program);
        command
            .args(&self.launcher.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        for key in SCRUBBED {
            command.env_remove(key);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info,sqlx=warn,lapin=warn,amq_protocol=warn");
        }
        command.envs(&self.env);
        command.envs(extra.iter().copied());
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            program: self.launcher.program.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or_default();
        tracing::debug!(process = %self.name, pid, extra = ?extra, log = %path.display(), "started");
        self.child = Some(child);
        self.last_exit = None;
        Ok(pid)
    }

    /// Starts it with its own environment.
    pub async fn start(&mut self) -> Result<u32, ProcessError> {
        self.start_with(&[]).await
    }

    /// Its process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether it runs (reaps it if it exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none() && self.child.is_some()
    }

    /// How it ended, if it exited on its own (a crash point aborts with
    /// SIGABRT); `None` while running or never started.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            tracing::debug!(process = %self.name, %status, "exited");
            self.last_exit = Some(status);
            self.child = None;
        }
        self.last_exit
    }

    /// Waits up to `timeout` for it to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => {
                tracing::debug!(process = %self.name, %status, "exited");
                self.last_exit = Some(status);
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    /// `kill -9` and reap.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            tracing::debug!(process = %self.name, pid = child.id(), "kill -9");
            let _ = child.start_kill();
            if let Ok(status) = child.wait().await {
                self.last_exit = Some(status);
            }
        }
    }

    /// SIGTERM (graceful shutdown), then `kill -9` after `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        let Some(pid) = self.pid() else {
            self.child = None;
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        if self.wait_exit(grace).await.is_none() {
            tracing::warn!(process = %self.name, ?grace, "did not stop in time; killing it");
            self.kill().await;
        }
    }

    /// The last lines of the current log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Whether `status` is an abort (SIGABRT), as a crash point ends a process.
pub fn aborted(status: &ExitStatus) -> bool {
    status.signal() == Some(6)
}

/// The entry points of the service processes.
pub mod entry {
    use std::{net::SocketAddr, time::Duration};

    use clap::Parser;
    use orchestrator::{Config, Orchestrator, StartupError};
    use participants::demo::{self, DemoConfig, DemoError, Service, UnknownService};
    use participants::kit::{FaultConfig, FaultConfigError, PoolSettings};
    use tokio_util::sync::CancellationToken;

    /// Printed on stdout once a process serves.
    pub const READY_LINE: &str = "SAGA_PROCESS_READY";

    /// Why a service process stopped with an error.
    #[derive(Debug, thiserror::Error)]
    pub enum EntryError {
        /// The async runtime could not start.
        #[error("cannot start the runtime: {0}")]
        Runtime(#[from] std::io::Error),
        /// The orchestrator could not start.
        #[error(transparent)]
        Orchestrator(#[from] StartupError),
        /// The participants could not start.
        #[error(transparent)]
        Participants(#[from] DemoError),
        /// `PARTICIPANTS` names an unknown service.
        #[error(transparent)]
        UnknownService(#[from] UnknownService),
        /// A `FAULT_*` variable is out of range.
        #[error(transparent)]
        Faults(#[from] FaultConfigError),
        /// An `OTEL_*` variable cannot be used.
        #[error(transparent)]
        Telemetry(#[from] saga_proto::telemetry::TelemetryError),
    }

    #[derive(Parser)]
    struct OrchestratorCli {
        #[command(flatten)]
        config: Config,
    }

    /// `orchestrator serve`, with the crash points of `FAILPOINTS` armed.
    /// Configured by the same flags and variables as `orchestrator serve`.
    pub fn orchestrator<I: IntoIterator<Item = String>>(args: I) -> Result<(), EntryError> {
        let cli = OrchestratorCli::parse_from(args);
        let _failpoints = fail::FailScenario::setup();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let _telemetry = orchestrator::telemetry::init(cli.config.log_format)?;
            let flows = cli.config.shipped_flows();
            let shutdown = CancellationToken::new();
            let app = Orchestrator::builder(cli.config)
                .flows(flows)
                .start(shutdown.clone())
                .await?;
            println!("{READY_LINE} grpc={}", app.grpc_addr());
            tokio::spawn(orchestrator::stop_on_signal(shutdown));
            app.run_until_stopped().await;
            Ok(())
        })
    }

    /// Settings of a participants process.
    #[derive(Debug, Parser)]
    struct ParticipantsCli {
        /// Comma-separated services: inventory, payment, orders, notification, all.
        #[arg(
            long,
            env = "PARTICIPANTS",
            default_value = "all",
            value_delimiter = ','
        )]
        participants: Vec<String>,
        /// Server URL; each service uses database `<namespace>_<name>` on it.
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        database_url: String,
        /// Broker URL.
        #[arg(
            long,
            env = "AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp_url: String,
        /// Namespace.
        #[arg(long, env = "SAGA_NAMESPACE", default_value = "saga")]
        namespace: String,
        /// Connections per service.
        #[arg(long, env = "DB_POOL_SIZE", default_value_t = 2)]
        db_pool_size: u32,
        /// Unacknowledged commands per service.
        #[arg(long, env = "PREFETCH", default_value_t = 16)]
        prefetch: u16,
        /// Commands handled at once per service.
        #[arg(long, env = "CONCURRENCY", default_value_t = 4)]
        concurrency: usize,
        /// Milliseconds between relay passes.
        #[arg(long, env = "RELAY_INTERVAL_MS", default_value_t = 500)]
        relay_interval_ms: u64,
        /// Prometheus exporter address (off when unset).
        #[arg(long, env = "METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
    }

    /// Demo participants (`PARTICIPANTS`), with `FAULT_*` knobs and the
    /// crash points of `FAILPOINTS` armed.
    pub fn participants<I: IntoIterator<Item = String>>(args: I) -> Result<(), EntryError> {
        let cli = ParticipantsCli::parse_from(args);
        let _failpoints = fail::FailScenario::setup();
        let services = Service::parse_list(&cli.participants)?;
        let faults = FaultConfig::from_env()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let _telemetry = saga_proto::telemetry::init(&saga_proto::telemetry::Settings {
                service_name: format!("participant-{}", cli.participants.join("-")),
                json: false,
                default_filter: "info".to_owned(),
            })
?;
            if let Some(addr) = cli.metrics_addr
                && let Err(error) = saga_proto::telemetry::prometheus::install(addr)
            {
                // Metrics are for the tests' evidence, not worth not serving.
                tracing::error!(error = %sagas::errors::Chain(&error), "cannot start the metrics exporter");
            }
            let mut config =
                DemoConfig::from_urls(&cli.amqp_url, &cli.namespace, &cli.database_url)?;
            config.pool = PoolSettings {
                max_connections: cli.db_pool_size.max(1),
                // Short, so a database outage turns into quick transient
                // errors rather than commands stuck for long.
                acquire_timeout: Duration::from_secs(3),
                ..PoolSettings::default()
            };
            config.prefetch = cli.prefetch;
            config.concurrency = cli.concurrency;
            config.relay_interval = Duration::from_millis(cli.relay_interval_ms);
            config.faults = faults;
            if config.faults.is_active() {
                tracing::warn!(faults = ?config.faults, "fault injection is on");
            }
            let shutdown = CancellationToken::new();
            tokio::spawn(orchestrator::stop_on_signal(shutdown.clone()));
            let mut running = demo::start(&services, config, shutdown).await?;
            if running.ready().await {
                println!("{READY_LINE} participants={}", cli.participants.join(","));
            }
            running.stopped().await;
            Ok(())
        })
    }
}
