//! `saga-chaos`: the real system under a steady load of order sagas (both
//! versions) while every fault of the failure-injection suites is injected
//! at random — seeded, so a failing schedule can be replayed — then drained
//! and checked by the invariant checker.
//!
//! ```text
//!  load (rate R, v1+v2, 30 % meant to compensate) ──▶ orchestrator-1, orchestrator-2
//!  faults (seed N): kill -9, crash points, outages, latency, cuts, lost
//!                   commits, duplicates, stale replies, early
//!                   compensations, poison, bad gRPC input, cancels
//!  supervisor: restarts whatever died (crash points abort the process)
//!  operator:   RetrySaga on FAILED sagas while no outage is on
//!  then: stop load and faults, heal, restart, retry FAILED, settle,
//!        stop everything, invariants::check → report
//! ```
//!
//! Layout: [`faults`] (the kinds, their weights and how each is injected),
//! [`report`] (what is printed). The services run as child processes of
//! this very binary (`saga-chaos orchestrator`, `saga-chaos participants`),
//! so they are always built from the same sources.

pub mod faults;
pub mod report;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use rand::{Rng, SeedableRng, rngs::StdRng};
use saga_proto::v1::{RetrySagaRequest, saga_service_client::SagaServiceClient};
use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use self::{faults::FaultBook, report::ChaosReport};
use crate::{
    cluster::{Cluster, ClusterOptions},
    invariants::Expectations,
    orders::{LoadSettings, OrderLoad},
    processes::{Launcher, Launchers},
};

/// Parses `90s`, `15m`, `500ms`, `2h` (a bare number is seconds).
pub fn duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Command line of `saga-chaos`.
#[derive(Debug, Clone, Parser)]
#[command(
    about = "Chaos soak of saga-orchestrator: load + random faults, then the invariant checker"
)]
pub struct Args {
    /// How long load and faults run (then the system is drained).
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub duration: Duration,
    /// Seed of the fault schedule and of the load (random when absent; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Order sagas started per second.
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Orchestrator processes.
    #[arg(long, default_value_t = 2)]
    pub orchestrators: usize,
    /// Mean time between two faults.
    #[arg(long, default_value = "3s", value_parser = duration)]
    pub fault_interval: Duration,
    /// Longest broker or database outage.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub max_outage: Duration,
    /// Longest time the drain may take before the run counts as failed.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub drain_timeout: Duration,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Keep the run's databases and queues afterwards (for a post-mortem).
    #[arg(long)]
    pub keep: bool,
    /// Run on a private RabbitMQ cluster of this many nodes (3 for a
    /// quorum that survives a node), with node kills among the faults; 0
    /// (the default): the machine's RabbitMQ, no node kills.
    #[arg(long, default_value_t = 0)]
    pub rabbit_nodes: usize,
}

/// Node names and indices the fault tasks refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Orchestrator `i`.
    Orchestrator(usize),
    /// Participant process `i`.
    Participants(usize),
}

/// What every task of a run shares.
pub struct Shared {
    /// The system (locked briefly for process and proxy operations).
    pub cluster: Mutex<Cluster>,
    /// Processes a fault holds down until the given instant (the
    /// supervisor leaves them alone meanwhile).
    pub held: Mutex<Vec<(Target, Instant)>>,
    /// Whether an outage (broker, database, latency) is on.
    pub outage_on: AtomicBool,
    /// Faults injected and their measurements.
    pub book: Mutex<FaultBook>,
    /// gRPC clients of each orchestrator (lazy, reconnecting).
    pub clients: Vec<SagaServiceClient<Channel>>,
    /// Health clients of each orchestrator.
    pub health: Vec<HealthClient<Channel>>,
    /// A direct pool on the orchestrator's database.
    pub pool: PgPool,
    /// Orchestrators and participant processes.
    pub counts: (usize, usize),
    /// Sagas the operator retried (distinct) and retries in all.
    pub operator: Mutex<(HashSet<String>, u64)>,
    /// Stops the fault tasks.
    pub stop_faults: CancellationToken,
    /// When the run started (for the event log).
    pub started: Instant,
    /// Starts extra orders of the load at once (the spike fault).
    pub spike: crate::orders::Spike,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// Prints one line of the run's event log (stderr).
    pub fn note(&self, event: &str) {
        eprintln!(
            "saga-chaos: {:>6.1}s  {event}",
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Whether `target` is held down by a fault right now.
    pub async fn is_held(&self, target: Target) -> bool {
        let now = Instant::now();
        self.held
            .lock()
            .await
            .iter()
            .any(|(t, until)| *t == target && *until > now)
    }

    /// Ends every hold of `target`.
    pub async fn release(&self, target: Target) {
        self.held.lock().await.retain(|(t, _)| *t != target);
    }

    /// Holds `target` down for `length` (the supervisor will not restart it).
    pub async fn hold(&self, target: Target, length: Duration) {
        let mut held = self.held.lock().await;
        let now = Instant::now();
        held.retain(|(_, until)| *until > now);
        held.push((target, now + length));
    }
}

/// The `saga-chaos` binary: dispatches the hidden subcommands (the two
/// services, and `cleanup <namespace>...` after `--keep`), else runs a soak.
pub fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(sub @ ("orchestrator" | "participants")) => {
            let sub = sub.to_owned();
            args.remove(1);
            if sub == "orchestrator" {
                crate::processes::entry::orchestrator(args)?;
            } else {
                crate::processes::entry::participants(args)?;
            }
            Ok(())
        }
        Some("cleanup") => {
            // `saga-chaos cleanup <namespace>...`: removes what `--keep` left.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                for namespace in &args[2..] {
                    let mut env = crate::env::TestEnv::new();
                    env.namespace = namespace.clone();
                    for suffix in ["orch", "inventory", "payment", "orders", "notification"] {
                        env.database_url(suffix);
                    }
                    env.track_queue(&format!("{namespace}.injected.replies"));
                    // Dropping the env removes its databases and queues.
                    drop(env);
                }
            });
            Ok(())
        }
        _ => {
            let args = Args::parse();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let report = runtime.block_on(run(args.clone()))?;
            println!("{report}");
            if let Some(path) = &args.json {
                std::fs::write(path, serde_json::to_string_pretty(&report.to_json())?)?;
            }
            if !report.violations.is_empty() {
                anyhow::bail!(
                    "{} invariant violation(s); replay with --seed {}",
                    report.violations.len(),
                    report.seed
                );
            }
            Ok(())
        }
    }
}

/// Runs one soak and returns its report.
pub async fn run(args: Args) -> anyhow::Result<ChaosReport> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,lapin=off,sqlx=error")
            }),
        )
        .with_target(false)
        .try_init();
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!(
        "saga-chaos: seed {seed}, {:?} of load at {}/s, {} orchestrators (replay with --seed {seed})",
        args.duration, args.rate, args.orchestrators
    );
    let launchers = Launchers {
        orchestrator: Launcher::current_exe("orchestrator")?,
        participants: Launcher::current_exe("participants")?,
    };
    let cluster = Cluster::start(
        &launchers,
        ClusterOptions {
            orchestrators: args.orchestrators.max(1),
            rabbit_nodes: args.rabbit_nodes,
            // The shipped default, which the test harness turns off: the
            // soak proves admission control among the other faults.
            orchestrator_env: vec![("ADMISSION".into(), "adaptive".into())],
            ..ClusterOptions::default()
        },
    )
    .await?;
    eprintln!("saga-chaos: logs in {}", cluster.log_dir().display());
    let clients: Vec<_> = (0..cluster.orchestrators.len())
        .map(|i| cluster.client(i))
        .collect();
    let health: Vec<_> = (0..cluster.orchestrators.len())
        .map(|i| {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.grpc_addr(i)))
                    .expect("valid endpoint")
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(2))
                    .connect_lazy();
            HealthClient::new(channel)
        })
        .collect();
    let pool = cluster.pool.clone();
    let counts = (cluster.orchestrators.len(), cluster.participants.len());
    let load = OrderLoad::spawn(
        cluster.load_clients(),
        LoadSettings {
            rate_per_sec: args.rate,
            // Outlives the longest outage of the orchestrators.
            give_up_after: args.max_outage + Duration::from_secs(120),
            ..LoadSettings::default()
        },
        seed,
    );
    let shared = Arc::new(Shared {
        cluster: Mutex::new(cluster),
        held: Mutex::new(Vec::new()),
        outage_on: AtomicBool::new(false),
        book: Mutex::new(FaultBook::default()),
        clients,
        health,
        pool,
        counts,
        operator: Mutex::new((HashSet::new(), 0)),
        stop_faults: CancellationToken::new(),
        started: Instant::now(),
        spike: load.spike(),
    });
    let injector =
        Arc::new(crate::inject::Injector::connect(shared.cluster.lock().await.env()).await?);

    let started = Instant::now();
    let stop_supervisor = CancellationToken::new();
    let supervisor = tokio::spawn(supervise(shared.clone(), stop_supervisor.clone()));
    let operator = tokio::spawn(operate(shared.clone(), stop_supervisor.clone()));
    let faults = tokio::spawn(faults::schedule(
        shared.clone(),
        injector.clone(),
        args.clone(),
        StdRng::seed_from_u64(seed ^ 0x5a5a_5a5a),
    ));
    let progress = tokio::spawn(progress(shared.clone(), started));
    tokio::time::sleep(args.duration).await;

    // Drain: no new load, no new faults; the ones on finish and heal.
    eprintln!("saga-chaos: draining");
    let drain_started = Instant::now();
    shared.stop_faults.cancel();
    let _ = faults.await;
    {
        let cluster = shared.cluster.lock().await;
        cluster.heal_all();
        for node in cluster.nodes() {
            node.database.cut_after_commits(0);
        }
    }
    shared.held.lock().await.clear();
    // Starts still in flight go through now that nothing is broken.
    let load_stats = load.stop().await;
    // Let the supervisor bring everything back, then the operator finish
    // what is FAILED.
    let deadline = drain_started + args.drain_timeout;
    wait_all_running(&shared, deadline).await;
    stop_supervisor.cancel();
    let _ = supervisor.await;
    let _ = operator.await;
    for _ in 0..6 {
        wait_no_active(&shared, deadline).await;
        if Instant::now() >= deadline || !retry_failed(&shared).await {
            break;
        }
    }

    let mut book = shared.book.lock().await.clone();
    book.commits_cut = shared
        .cluster
        .lock()
        .await
        .nodes()
        .map(|n| n.database.stats().commits_cut)
        .sum();
    let operator = shared.operator.lock().await.clone();
    let outcomes =
        crate::outage::OutageSummary::measure(&shared.pool, &load_stats, operator.0.len())
            .await
            .unwrap_or_default();
    let mut cluster = shared.cluster.lock().await;
    let leftovers = bad_input_leftovers(&cluster).await;
    let expectations = Expectations {
        poison_dead_letters: Some(book.poison_injected),
        ..Expectations::default()
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(60));
    let check = cluster.finish(&expectations, left).await;
    let drain = drain_started.elapsed();
    let mut violations = check.violations.clone();
    violations.extend(book.violations.iter().cloned());
    if leftovers > 0 {
        violations.push(format!("{leftovers} saga(s) persisted from bad gRPC input"));
    }
    let env_name = cluster.env().namespace.clone();
    progress.abort();
    drop(cluster);
    if args.keep {
        // The processes are stopped; leave the databases and queues for a
        // post-mortem (the namespace is in the report).
        std::mem::forget(shared.clone());
    }
    drop(injector);
    Ok(ChaosReport {
        seed,
        duration: args.duration,
        rate: args.rate,
        orchestrators: counts.0,
        namespace: env_name,
        load: load_stats,
        outcomes,
        check,
        faults: book,
        operator_retried_sagas: operator.0.len() as u64,
        operator_retries: operator.1,
        drain,
        total: started.elapsed(),
        violations,
    })
}

/// Restarts every process that is down and not held by a fault, every
/// 250 ms, until `stop`. A process that aborted (a crash point) or was
/// killed comes back with its own environment, without `FAILPOINTS`.
async fn supervise(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let (orchestrators, participants) = shared.counts;
        let targets = (0..orchestrators)
            .map(Target::Orchestrator)
            .chain((0..participants).map(Target::Participants));
        for target in targets {
            if shared.is_held(target).await {
                continue;
            }
            let mut cluster = shared.cluster.lock().await;
            let node = match target {
                Target::Orchestrator(i) => &mut cluster.orchestrators[i],
                Target::Participants(i) => &mut cluster.participants[i],
            };
            if node.process.is_running() {
                continue;
            }
            let crashed = node
                .process
                .poll_exit()
                .is_some_and(|status| crate::processes::aborted(&status));
            let name = node.process.name().to_owned();
            if let Err(error) = node.process.start().await {
                tracing::error!(%error, "cannot restart a service process");
                continue;
            }
            drop(cluster);
            shared.note(&format!(
                "restarted {name}{}",
                if crashed {
                    " (aborted at a crash point)"
                } else {
                    ""
                }
            ));
            let mut book = shared.book.lock().await;
            book.restarts += 1;
            if crashed {
                book.crash_point_aborts += 1;
            }
        }
    }
}

/// Waits until every process runs again (or `deadline`).
async fn wait_all_running(shared: &Shared, deadline: Instant) {
    while Instant::now() < deadline {
        let mut cluster = shared.cluster.lock().await;
        let all = cluster.nodes_mut().all(|n| n.process.is_running());
        drop(cluster);
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Orchestrators serve again before the drain goes on.
    let cluster = shared.cluster.lock().await;
    for i in 0..cluster.orchestrators.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = cluster.wait_orchestrator_ready(i, left).await;
    }
}

/// The operator: every 10 s while no outage is on, RetrySaga on every
/// FAILED saga.
async fn operate(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        if !shared.outage_on.load(Ordering::SeqCst) {
            retry_failed(&shared).await;
        }
    }
}

/// RetrySaga on every FAILED saga; whether there was any.
async fn retry_failed(shared: &Shared) -> bool {
    let failed: Vec<uuid::Uuid> = {
        let cluster = shared.cluster.lock().await;
        sqlx::query_scalar("SELECT id FROM sagas WHERE status = 'failed'")
            .fetch_all(&cluster.pool)
            .await
            .unwrap_or_default()
    };
    if failed.is_empty() {
        return false;
    }
    let mut rng = StdRng::from_os_rng();
    for id in failed {
        let client = &shared.clients[rng.random_range(0..shared.clients.len())];
        let retried = client
            .clone()
            .retry_saga(RetrySagaRequest {
                saga_id: id.to_string(),
            })
            .await;
        if retried.is_ok() {
            let mut operator = shared.operator.lock().await;
            operator.0.insert(id.to_string());
            operator.1 += 1;
        }
    }
    true
}

/// Sagas created by the bad gRPC inputs of [`FaultKind::BadInput`] (must be 0).
async fn bad_input_leftovers(cluster: &Cluster) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sagas WHERE input LIKE '%chaos-bad-input%'")
        .fetch_one(&cluster.pool)
        .await
        .unwrap_or(-1)
}

/// Prints a line of saga counts every 10 s, so a stalled run shows where.
async fn progress(shared: Arc<Shared>, started: Instant) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let counts: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM sagas GROUP BY status ORDER BY status")
                .fetch_all(&shared.pool)
                .await
                .unwrap_or_default();
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&shared.pool)
            .await
            .unwrap_or(-1);
        let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
        eprintln!(
            "saga-chaos: {:>4}s  {}  outbox {outbox}",
            started.elapsed().as_secs(),
            counts.join(", ")
        );
    }
}

/// Waits until no saga is running or compensating (or `deadline`).
async fn wait_no_active(shared: &Shared, deadline: Instant) {
    while Instant::now() < deadline {
        let active = {
            let cluster = shared.cluster.lock().await;
            cluster.active_sagas().await.unwrap_or(1)
        };
        if active == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
