//! `saga-bench`: drives order sagas (or synthetic N-step chains) through the
//! gRPC API of an orchestrator it starts as a child process, with echo or
//! demo participants, and reports throughput, start-to-terminal latency,
//! the orchestrator's CPU time and peak RSS, and optionally the raw
//! ceilings of this machine.

pub mod calibrate;
pub mod echo;
pub mod load;
pub mod system;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use saga_proto::amqp::Topology;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::{
    load::{Clients, Tracker, Workload},
    system::Orchestrator,
};

/// Which participants answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Reply at once, no database: measures the orchestrator alone.
    Echo,
    /// The real demo participants with their ledgers.
    Demo,
}

/// How load is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopKind {
    /// Fixed concurrency: each worker starts the next saga when the last ended (peak throughput).
    Closed,
    /// Fixed arrival rate, whatever the latency (honest latency).
    Open,
}

fn duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 2m, 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unit must be ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Command line of saga-bench.
#[derive(Debug, Clone, Parser)]
#[command(about = "Throughput and latency of saga-orchestrator")]
pub struct Args {
    /// Participants: echo (no database) or demo (real ledgers).
    #[arg(long, value_enum, default_value = "echo")]
    pub mode: Mode,
    /// Closed loop (fixed concurrency) or open loop (fixed rate).
    #[arg(long = "loop", value_enum, default_value = "closed")]
    pub loop_kind: LoopKind,
    /// Workers of the closed loop.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Sagas per second of the open loop.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Open loop: sagas per second during a spike (with --spike-at and
    /// --spike-length); --rate before and after it.
    #[arg(long, requires = "spike_length")]
    pub spike_rate: Option<f64>,
    /// When the spike starts, from the start of the load (warm-up
    /// included).
    #[arg(long, default_value = "0s", value_parser = duration)]
    pub spike_at: Duration,
    /// How long the spike lasts.
    #[arg(long, value_parser = duration, requires = "spike_rate")]
    pub spike_length: Option<Duration>,
    /// Orchestrator instances (one database, one namespace); the starts
    /// are spread over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    pub orchestrators: u16,
    /// order_placement version to run.
    #[arg(long, default_value_t = 1)]
    pub version: u32,
    /// Run the synthetic N-step chain (1, 3, 6 or 12) instead of order_placement (echo mode).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Load before the measured window.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub warmup: Duration,
    /// Measured window.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub duration: Duration,
    /// Also measure the raw RabbitMQ and PostgreSQL ceilings.
    #[arg(long)]
    pub calibrate: bool,
    /// Insert this many finished sagas before the run.
    #[arg(long, default_value_t = 0)]
    pub prefill: u64,
    /// Instead of a throughput run: start this many sagas with participants
    /// paused, then let them finish; reports peak RSS with that many in flight.
    #[arg(long)]
    pub inflight: Option<u64>,
    /// Write the JSON report here too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Namespace of the run (its queues are removed afterwards).
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    /// PostgreSQL server (no database name).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub postgres: String,
    /// RabbitMQ URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Extra argument for `orchestrator serve` (repeatable), e.g. --orchestrator-arg=--reply-batch=256.
    #[arg(long = "orchestrator-arg", allow_hyphen_values = true)]
    pub orchestrator_args: Vec<String>,
    /// Queue type of the reply and participant queues (echo mode).
    #[arg(long, default_value = "quorum")]
    pub queue_type: orchestrator::bus::QueueType,
    /// gRPC connections used to start sagas.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Demo mode: transactions in flight per participant (with more than
    /// one, batches that lock the same stock rows wait on each other and
    /// can deadlock).
    #[arg(long, default_value_t = 1)]
    pub participant_concurrency: usize,
    /// Demo mode: most commands one participant transaction answers.
    #[arg(long, default_value_t = 64)]
    pub participant_batch: usize,
}

/// The machine a report was measured on.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// Total memory, GiB.
    pub memory_gib: f64,
    /// CPU model.
    pub cpu_model: String,
    /// `uname -r`.
    pub kernel: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        cpu_model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_owned(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

/// Latency percentiles in milliseconds (all 0 before anything was
/// measured).
#[derive(Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Sagas measured.
    pub samples: u64,
}

/// Raw ceilings of the machine.
#[derive(Debug, Serialize)]
pub struct Calibration {
    /// Persistent confirmed publish + consume + ack per second (quorum queue).
    pub rabbitmq_messages_per_s: f64,
    /// Single-row commits per second (8 clients).
    pub postgres_commits_per_s: f64,
    /// Messages one saga of this workload needs (commands, replies, lifecycle events).
    pub messages_per_saga: u32,
    /// State transactions one saga needs if none were batched.
    pub commits_per_saga: u32,
    /// min(messages ceiling, commits ceiling) in sagas per second.
    pub implied_ceiling_sagas_per_s: f64,
    /// Measured sagas/s divided by that ceiling.
    pub fraction_of_ceiling: f64,
    /// One persistent message alone through a quorum queue, publish to
    /// delivery: median ms.
    pub rabbitmq_hop_p50_ms: f64,
    /// One single-row commit alone: median ms.
    pub postgres_commit_p50_ms: f64,
    /// Messages on one saga's critical path (each command, each reply, the
    /// terminal event); they cannot overlap.
    pub hops_on_path: u32,
    /// hops × hop median + commits × commit median: the latency one saga
    /// alone cannot beat whatever the orchestrator does, ms.
    pub implied_latency_floor_ms: f64,
}

/// What a window of sagas cost the database server, per saga.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct DatabaseCost {
    /// WAL bytes per saga.
    pub wal_bytes_per_saga: f64,
    /// WAL records per saga.
    pub wal_records_per_saga: f64,
    /// Committed transactions per saga.
    pub commits_per_saga: f64,
}

/// The server's cumulative WAL and commit counters.
#[derive(Debug, Default, Clone, Copy)]
struct DatabaseCounters {
    wal_bytes: f64,
    wal_records: i64,
    commits: i64,
}

async fn database_counters(pool: &sqlx::PgPool) -> Result<DatabaseCounters, sqlx::Error> {
    let (wal_bytes, wal_records, commits): (f64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT wal_bytes::float8 FROM pg_stat_wal),
                (SELECT wal_records FROM pg_stat_wal),
                (SELECT sum(xact_commit)::int8 FROM pg_stat_database)",
    )
    .fetch_one(pool)
    .await?;
    Ok(DatabaseCounters {
        wal_bytes,
        wal_records,
        commits,
    })
}

/// One run's results.
#[derive(Debug, Serialize)]
pub struct Report {
    /// When (UTC, RFC 3339).
    pub date: String,
    /// Where.
    pub machine: Machine,
    /// Flow name.
    pub flow: String,
    /// Steps per saga.
    pub steps: usize,
    /// Participants.
    pub mode: Mode,
    /// Load shape.
    pub loop_kind: LoopKind,
    /// Closed-loop workers.
    pub concurrency: Option<usize>,
    /// Open-loop target rate.
    pub target_rate: Option<f64>,
    /// Finished sagas already in the tables.
    pub prefilled: u64,
    /// Measured window, seconds.
    pub window_s: f64,
    /// Sagas that ended inside the window, per second.
    pub sagas_per_s: f64,
    /// Start-to-terminal latency of sagas started in the window.
    pub latency: Latency,
    /// Orchestrator instances.
    pub orchestrators: u16,
    /// Orchestrator CPU seconds during the window (all instances).
    pub orchestrator_cpu_s: f64,
    /// This load generator's own CPU seconds during the window (it shares
    /// the machine).
    pub bench_cpu_s: f64,
    /// Orchestrator CPU milliseconds per saga.
    pub orchestrator_cpu_ms_per_saga: f64,
    /// What the window cost PostgreSQL, per saga ended in it: WAL bytes,
    /// WAL records and commits of the whole server (`pg_stat_wal`,
    /// `pg_stat_database`; in demo mode the participants' databases are
    /// included). Statistics reach those views within about a second, so
    /// a short window is off by that much.
    pub database: DatabaseCost,
    /// Orchestrator peak RSS over the run, MB (the largest instance).
    pub orchestrator_peak_rss_mb: f64,
    /// Orchestrator RSS at the end of the run, MB (the largest instance).
    pub orchestrator_end_rss_mb: f64,
    /// Sagas that ended COMPLETED / otherwise during the whole run.
    pub completed: u64,
    /// Sagas that ended COMPENSATED or FAILED.
    pub not_completed: u64,
    /// StartSaga calls that failed, other than refusals for capacity.
    pub start_errors: u64,
    /// StartSaga calls refused with RESOURCE_EXHAUSTED (whole run).
    pub refused: u64,
    /// Refusals answered inside the window, per second.
    pub refused_per_s: f64,
    /// How long a refusal took to come back, inside the window.
    pub refusal_latency: Latency,
    /// Open loop: starts sent.
    pub issued_starts: u64,
    /// Open loop: starts skipped because too many were outstanding.
    pub skipped_starts: u64,
    /// Open loop: starts due by the end but never sent (the generator fell
    /// behind).
    pub behind_starts: u64,
    /// Open loop: per second from the start of the load (warm-up
    /// included).
    pub series: Vec<SecondReport>,
    /// Sagas in flight at the peak (in-flight runs only).
    pub inflight: Option<u64>,
    /// Seconds to finish all of them once participants resumed (in-flight runs).
    pub drain_s: Option<f64>,
    /// Raw ceilings, when asked for.
    pub calibration: Option<Calibration>,
}

/// One second of an open-loop run.
#[derive(Debug, Serialize)]
pub struct SecondReport {
    /// Seconds since the load started.
    pub second: usize,
    /// Starts admitted (answered with a saga id).
    pub admitted: u64,
    /// Starts refused for capacity.
    pub refused: u64,
    /// Sagas that ended COMPLETED in this second.
    pub completed: u64,
    /// Sagas that ended otherwise in this second.
    pub not_completed: u64,
    /// p99 start-to-end latency of the sagas started in this second, ms.
    pub p99_ms: f64,
}

fn latency_of(histogram: &hdrhistogram::Histogram<u64>) -> Latency {
    Latency {
        p50_ms: to_ms(histogram.value_at_quantile(0.50)),
        p95_ms: to_ms(histogram.value_at_quantile(0.95)),
        p99_ms: to_ms(histogram.value_at_quantile(0.99)),
        max_ms: to_ms(histogram.max()),
        samples: histogram.len(),
    }
}

fn order_input(n: u64) -> String {
    format!(
        r#"{{"order_id":"bench-{n}","customer_id":"customer-{}","items":[{{"sku":"sku-{}","quantity":1,"unit_price_cents":100}}]}}"#,
        n % 1000,
        n % 100 + 1
    )
}

fn chain_input(n: u64) -> String {
    format!(r#"{{"id":"bench-{n}"}}"#)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn to_ms(micros: u64) -> f64 {
    (micros as f64 / 10.0).round() / 100.0
}

/// Runs one benchmark as `args` says.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let topology = Topology::new(&args.namespace)?;
    let (workload, participants, steps, messages, commits) = match args.steps {
        Some(n) => {
            anyhow::ensure!(
                sagas::flows::bench::CHAIN_LENGTHS.contains(&n),
                "--steps must be one of 1, 3, 6, 12"
            );
            anyhow::ensure!(
                args.mode == Mode::Echo,
                "--steps runs with echo participants only"
            );
            let workload = Workload {
                saga_type: sagas::flows::bench::chain_name(n),
                version: 1,
                input: chain_input,
            };
            // n commands + n replies + 2 lifecycle events; start + n replies.
            (
                workload,
                vec![sagas::flows::bench::PARTICIPANT],
                n,
                (2 * n + 2) as u32,
                (n + 1) as u32,
            )
        }
        None => {
            let workload = Workload {
                saga_type: "order_placement".into(),
                version: args.version,
                input: order_input,
            };
            let steps = if args.version == 2 { 4 } else { 3 };
            (
                workload,
                vec!["inventory", "payment", "orders"],
                steps,
                (2 * steps + 2) as u32,
                (steps + 1) as u32,
            )
        }
    };

    let database = format!("{}_orchestrator", args.namespace);
    system::recreate_database(&args.postgres, &database).await?;
    let database_url = format!("{}/{database}", args.postgres);
    let mut orchestrator_args = args.orchestrator_args.clone();
    if args.queue_type == orchestrator::bus::QueueType::Classic {
        orchestrator_args.push("--queue-type=classic".into());
    }
    let mut orchestrators = Vec::new();
    for _ in 0..args.orchestrators {
        let orchestrator = Orchestrator::start(
            &database_url,
            &args.amqp_url,
            &args.namespace,
            &orchestrator_args,
        )
        .await?;
        eprintln!(
            "orchestrator {} serving on {}",
            orchestrator.pid(),
            orchestrator.addr
        );
        orchestrators.push(orchestrator);
    }
    let orchestrator = &orchestrators[0];
    if args.prefill > 0 {
        system::prefill_finished(&database_url, args.prefill).await?;
    }

    let stop = CancellationToken::new();
    let tracker = Arc::new(Tracker::default());
    let follower =
        load::follow_endings(&args.amqp_url, &topology, tracker.clone(), stop.clone()).await?;
    let participants_stop = CancellationToken::new();
    let start_participants = {
        let args = args.clone();
        let topology = topology.clone();
        let participants_stop = participants_stop.clone();
        let names: Vec<&'static str> = participants.clone();
        move || -> tokio::task::JoinHandle<anyhow::Result<()>> {
            tokio::spawn(async move {
                match args.mode {
                    Mode::Echo => {
                        echo::run(
                            &args.amqp_url,
                            &topology,
                            &names,
                            512,
                            args.queue_type,
                            participants_stop,
                        )
                        .await
                    }
                    Mode::Demo => {
                        use participants::demo::{self, DemoConfig, Service};
                        let mut config = DemoConfig::from_urls(
                            &args.amqp_url,
                            &args.namespace,
                            &format!("{}/postgres", args.postgres),
                        )?;
                        config.prefetch = 256;
                        // Few transactions, each answering every command
                        // waiting: one commit for many commands.
                        config.concurrency = args.participant_concurrency;
                        config.max_batch = args.participant_batch;
                        config.pool.max_connections =
                            u32::try_from(args.participant_concurrency + 2).unwrap_or(u32::MAX);
                        for service in Service::ALL {
                            system::recreate_database(
                                &args.postgres,
                                &config.database_name(service),
                            )
                            .await?;
                        }
                        let mut demo =
                            demo::start(&Service::ALL, config, participants_stop).await?;
                        demo.ready().await;
                        demo.stopped().await;
                        Ok(())
                    }
                }
            })
        }
    };
    let addrs: Vec<String> = orchestrators.iter().map(|o| o.addr.to_string()).collect();
    let clients = Clients::connect(&addrs, args.connections).await?;

    let mut report = Report {
        date: chrono::Utc::now().to_rfc3339(),
        machine: machine(),
        flow: workload.saga_type.clone(),
        steps,
        mode: args.mode,
        loop_kind: args.loop_kind,
        concurrency: (args.loop_kind == LoopKind::Closed).then_some(args.concurrency),
        target_rate: (args.loop_kind == LoopKind::Open).then_some(args.rate),
        prefilled: args.prefill,
        window_s: args.duration.as_secs_f64(),
        sagas_per_s: 0.0,
        latency: Latency::default(),
        orchestrators: args.orchestrators,
        orchestrator_cpu_s: 0.0,
        bench_cpu_s: 0.0,
        orchestrator_cpu_ms_per_saga: 0.0,
        database: DatabaseCost::default(),
        orchestrator_peak_rss_mb: 0.0,
        orchestrator_end_rss_mb: 0.0,
        completed: 0,
        not_completed: 0,
        start_errors: 0,
        refused: 0,
        refused_per_s: 0.0,
        refusal_latency: Latency::default(),
        issued_starts: 0,
        skipped_starts: 0,
        behind_starts: 0,
        series: Vec::new(),
        inflight: None,
        drain_s: None,
        calibration: None,
    };

    let participants_task;
    if let Some(count) = args.inflight {
        // Everything waits in the participants' queues until they start.
        let far = Instant::now() + Duration::from_secs(3600);
        tracker.set_window(Instant::now(), far);
        let starts = futures::stream::iter(0..count)
            .map(|n| {
                let clients = clients.clone();
                let workload = workload.clone();
                let tracker = tracker.clone();
                async move {
                    let started = Instant::now();
                    let response = clients_start(&clients, &workload, n).await;
                    match response {
                        Some(id) => Some(tracker.started(id, started)),
                        None => {
                            tracker.start_errors.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                    }
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>();
        use futures::StreamExt as _;
        let receivers: Vec<_> = starts.await.into_iter().flatten().collect();
        let before = orchestrator.stats()?;
        eprintln!(
            "{} sagas in flight; orchestrator RSS {:.1} MB",
            receivers.len(),
            before.rss_bytes as f64 / 1e6
        );
        let resume = Instant::now();
        participants_task = start_participants();
        for receiver in receivers {
            let _ = tokio::time::timeout(Duration::from_secs(600), receiver).await;
        }
        report.inflight = Some(count);
        report.drain_s = Some(resume.elapsed().as_secs_f64());
        report.window_s = resume.elapsed().as_secs_f64();
        report.sagas_per_s = tracker.finished.load(Ordering::Relaxed) as f64 / report.window_s;
    } else {
        participants_task = start_participants();
        // Let participants declare and bind before the first command.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let begin = Instant::now();
        let window_start = begin + args.warmup;
        let window_end = window_start + args.duration;
        tracker.set_window(window_start, window_end);
        tracker.set_origin(begin);
        let cpu_probe = |pids: Vec<u32>| {
            tokio::spawn(async move {
                let cpu = || -> f64 {
                    pids.iter()
                        .map(|pid| {
                            system::proc_stats(*pid)
                                .map(|s| s.cpu_seconds)
                                .unwrap_or(0.0)
                        })
                        .sum()
                };
                tokio::time::sleep_until(window_start.into()).await;
                let at_start = cpu();
                tokio::time::sleep_until(window_end.into()).await;
                cpu() - at_start
            })
        };
        let stats_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url)
            .await?;
        let database_probe = {
            let pool = stats_pool.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(window_start.into()).await;
                let at_start = database_counters(&pool).await.ok()?;
                tokio::time::sleep_until(window_end.into()).await;
                // The backends report their counters about once a second.
                tokio::time::sleep(Duration::from_millis(1100)).await;
                let at_end = database_counters(&pool).await.ok()?;
                Some((at_start, at_end))
            })
        };
        let orchestrators_cpu = cpu_probe(orchestrators.iter().map(|o| o.pid()).collect());
        let bench_cpu = cpu_probe(vec![std::process::id()]);
        match args.loop_kind {
            LoopKind::Closed => {
                load::closed_loop(
                    clients.clone(),
                    workload.clone(),
                    tracker.clone(),
                    args.concurrency,
                    window_end,
                )
                .await;
            }
            LoopKind::Open => {
                let shape = load::Shape {
                    base: args.rate,
                    spike: args
                        .spike_rate
                        .zip(args.spike_length)
                        .map(|(rate, length)| (rate, args.spike_at, length)),
                };
                let unissued = load::open_loop(
                    clients.clone(),
                    workload.clone(),
                    tracker.clone(),
                    shape,
                    window_end,
                    20_000,
                )
                .await;
                report.issued_starts = unissued.issued;
                report.skipped_starts = unissued.skipped;
                report.behind_starts = unissued.behind;
            }
        }
        report.orchestrator_cpu_s = orchestrators_cpu.await.unwrap_or(0.0);
        report.bench_cpu_s = bench_cpu.await.unwrap_or(0.0);
        report.refused_per_s = tracker.refused_in_window() as f64 / args.duration.as_secs_f64();
        report.sagas_per_s = tracker.window_count() as f64 / args.duration.as_secs_f64();
        report.orchestrator_cpu_ms_per_saga =
            report.orchestrator_cpu_s * 1000.0 / (tracker.window_count().max(1) as f64);
        if let Ok(Some((start, end))) = database_probe.await {
            let sagas = tracker.window_count().max(1) as f64;
            report.database = DatabaseCost {
                wal_bytes_per_saga: ((end.wal_bytes - start.wal_bytes) / sagas).round(),
                wal_records_per_saga: round2((end.wal_records - start.wal_records) as f64 / sagas),
                commits_per_saga: round2((end.commits - start.commits) as f64 / sagas),
            };
        }
        stats_pool.close().await;
        // Drain what is still running, so the next run starts clean.
        let drain_deadline = Instant::now() + Duration::from_secs(60);
        while tracker.outstanding() > 0 && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    report.latency = latency_of(&tracker.latency());
    report.refusal_latency = latency_of(&tracker.refusal_latency());
    let mb = |bytes: u64| (bytes as f64 / 1e5).round() / 10.0;
    for orchestrator in &orchestrators {
        let stats = orchestrator.stats()?;
        report.orchestrator_peak_rss_mb = report
            .orchestrator_peak_rss_mb
            .max(mb(stats.peak_rss_bytes));
        report.orchestrator_end_rss_mb = report.orchestrator_end_rss_mb.max(mb(stats.rss_bytes));
    }
    report.completed = tracker.completed.load(Ordering::Relaxed);
    report.not_completed = tracker.not_completed.load(Ordering::Relaxed);
    report.start_errors = tracker.start_errors.load(Ordering::Relaxed);
    report.refused = tracker.refused.load(Ordering::Relaxed);
    if args.loop_kind == LoopKind::Open {
        report.series = tracker
            .series()
            .into_iter()
            .enumerate()
            .map(|(second, s)| SecondReport {
                second,
                admitted: s.admitted,
                refused: s.refused,
                completed: s.completed,
                not_completed: s.not_completed,
                p99_ms: if s.latency.is_empty() {
                    0.0
                } else {
                    to_ms(s.latency.value_at_quantile(0.99))
                },
            })
            .collect();
    }

    participants_stop.cancel();
    let _ = participants_task.await;
    stop.cancel();
    let _ = follower.await;
    for orchestrator in orchestrators {
        orchestrator.stop().await?;
    }

    if args.calibrate {
        eprintln!("calibrating RabbitMQ and PostgreSQL ...");
        let rabbit = calibrate::rabbitmq(
            &args.amqp_url,
            &format!("{}.calibrate", args.namespace),
            10,
            1000,
        )
        .await?;
        let postgres = calibrate::postgres(&database_url, 10, 8).await?;
        let hop = calibrate::rabbitmq_hop(&args.amqp_url, &format!("{}.hop", args.namespace), 1000)
            .await?;
        let commit = calibrate::postgres_commit(&database_url, 1000).await?;
        let hops_on_path = 2 * steps as u32 + 1;
        let floor = f64::from(hops_on_path) * hop + f64::from(commits) * commit;
        let ceiling = (rabbit / f64::from(messages)).min(postgres / f64::from(commits));
        report.calibration = Some(Calibration {
            rabbitmq_messages_per_s: rabbit.round(),
            postgres_commits_per_s: postgres.round(),
            messages_per_saga: messages,
            commits_per_saga: commits,
            implied_ceiling_sagas_per_s: ceiling.round(),
            fraction_of_ceiling: round2(report.sagas_per_s / ceiling),
            rabbitmq_hop_p50_ms: round2(hop),
            postgres_commit_p50_ms: round2(commit),
            hops_on_path,
            implied_latency_floor_ms: round2(floor),
        });
    }
    cleanup(&args).await;
    Ok(report)
}

async fn clients_start(clients: &Clients, workload: &Workload, n: u64) -> Option<uuid::Uuid> {
    let response = clients
        .pick_client()
        .start_saga(saga_proto::v1::StartSagaRequest {
            saga_type: workload.saga_type.clone(),
            input_json: (workload.input)(n),
            idempotency_key: String::new(),
            definition_version: workload.version,
        })
        .await
        .ok()?;
    response.into_inner().saga_id.parse().ok()
}

/// Removes the run's queues and exchanges.
async fn cleanup(args: &Args) {
    crate::env::delete_namespace(&args.amqp_url, &args.namespace, Vec::new()).await;
}

/// Prints the report as a table.
pub fn print_table(report: &Report) {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(["metric", "value"]);
    let rows: Vec<(String, String)> = vec![
        (
            "flow".into(),
            format!("{} ({} steps)", report.flow, report.steps),
        ),
        (
            "participants".into(),
            format!("{:?}", report.mode).to_lowercase(),
        ),
        (
            "load".into(),
            match report.loop_kind {
                LoopKind::Closed => {
                    format!("closed loop, {} workers", report.concurrency.unwrap_or(0))
                }
                LoopKind::Open => {
                    format!("open loop, {} sagas/s", report.target_rate.unwrap_or(0.0))
                }
            },
        ),
        (
            "finished sagas in tables before".into(),
            report.prefilled.to_string(),
        ),
        ("window".into(), format!("{:.1} s", report.window_s)),
        ("sagas/s".into(), format!("{:.1}", report.sagas_per_s)),
        (
            "latency p50 / p95 / p99 / max".into(),
            format!(
                "{} / {} / {} / {} ms",
                report.latency.p50_ms,
                report.latency.p95_ms,
                report.latency.p99_ms,
                report.latency.max_ms
            ),
        ),
        (
            "orchestrator CPU".into(),
            format!(
                "{:.1} s ({:.2} ms per saga)",
                report.orchestrator_cpu_s, report.orchestrator_cpu_ms_per_saga
            ),
        ),
        (
            "load generator CPU".into(),
            format!("{:.1} s", report.bench_cpu_s),
        ),
        (
            "database per saga (whole server)".into(),
            format!(
                "{} B of WAL in {} records, {} commits",
                report.database.wal_bytes_per_saga,
                report.database.wal_records_per_saga,
                report.database.commits_per_saga
            ),
        ),
        (
            "orchestrator RSS peak / end".into(),
            format!(
                "{} MB / {} MB ({} instance(s))",
                report.orchestrator_peak_rss_mb,
                report.orchestrator_end_rss_mb,
                report.orchestrators
            ),
        ),
        (
            "completed / other / start errors".into(),
            format!(
                "{} / {} / {}",
                report.completed, report.not_completed, report.start_errors
            ),
        ),
        (
            "refused (RESOURCE_EXHAUSTED)".into(),
            format!(
                "{} ({:.1}/s in the window; answered in p99 {} ms, max {} ms)",
                report.refused,
                report.refused_per_s,
                report.refusal_latency.p99_ms,
                report.refusal_latency.max_ms
            ),
        ),
    ];
    for (k, v) in rows {
        table.add_row([k, v]);
    }
    if report.loop_kind == LoopKind::Open {
        table.add_row([
            "starts sent / skipped / behind".to_owned(),
            format!(
                "{} / {} / {}",
                report.issued_starts, report.skipped_starts, report.behind_starts
            ),
        ]);
    }
    if let (Some(n), Some(drain)) = (report.inflight, report.drain_s) {
        table.add_row([
            "in flight at peak".to_owned(),
            format!("{n} (drained in {drain:.1} s)"),
        ]);
    }
    if let Some(c) = &report.calibration {
        table.add_row([
            "RabbitMQ ceiling".to_owned(),
            format!(
                "{} msg/s ({} per saga)",
                c.rabbitmq_messages_per_s, c.messages_per_saga
            ),
        ]);
        table.add_row([
            "PostgreSQL ceiling".to_owned(),
            format!(
                "{} commits/s ({} per saga unbatched)",
                c.postgres_commits_per_s, c.commits_per_saga
            ),
        ]);
        table.add_row([
            "implied ceiling".to_owned(),
            format!(
                "{} sagas/s; measured = {:.0}%",
                c.implied_ceiling_sagas_per_s,
                c.fraction_of_ceiling * 100.0
            ),
        ]);
        table.add_row([
            "one hop / one commit alone".to_owned(),
            format!(
                "{:.2} ms / {:.2} ms (p50)",
                c.rabbitmq_hop_p50_ms, c.postgres_commit_p50_ms
            ),
        ]);
        table.add_row([
            "implied latency floor".to_owned(),
            format!(
                "{:.2} ms ({} hops + {} commits in sequence)",
                c.implied_latency_floor_ms, c.hops_on_path, c.commits_per_saga
            ),
        ]);
    }
    println!("{table}");
    if !report.series.is_empty() {
        let mut series = comfy_table::Table::new();
        series.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        series.set_header(["s", "admitted", "refused", "completed", "other", "p99 ms"]);
        for s in &report.series {
            series.add_row([
                s.second.to_string(),
                s.admitted.to_string(),
                s.refused.to_string(),
                s.completed.to_string(),
                s.not_completed.to_string(),
                s.p99_ms.to_string(),
            ]);
        }
        println!("{series}");
    }
}

/// Entry point of the binary.
pub async fn main_with(args: Args) -> anyhow::Result<()> {
    let json_path = args.json.clone();
    let report = run(args).await.context("benchmark failed")?;
    print_table(&report);
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = json_path {
        std::fs::write(&path, json)?;
    }
    Ok(())
}
