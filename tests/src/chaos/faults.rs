//! The faults of a chaos soak: what kinds there are, how often each is
//! drawn, and how each is injected (and healed). Every fault task gets its
//! own random generator derived from the run's seed, so a schedule can be
//! replayed.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rand::{Rng, SeedableRng, rngs::StdRng};
use saga_proto::{
    amqp::{Phase, ReplyMessage, ReplyStatus},
    v1::{CancelSagaRequest, GetSagaRequest, StartSagaRequest},
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::task::TaskTracker;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use super::{Args, Shared, Target};
use crate::{
    inject::{Injector, POISON_TARGETS, order_command, poison_bodies},
    proxy::Mode,
};

/// The kinds of fault a soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// kill -9 of an orchestrator at a random moment.
    OrchestratorKill,
    /// An orchestrator restarted to abort at a named crash point.
    OrchestratorCrashPoint,
    /// kill -9 of a participant process at a random moment.
    ParticipantKill,
    /// A participant process restarted to abort at a named crash point.
    ParticipantCrashPoint,
    /// RabbitMQ unreachable (refused or black-holed) for some or all.
    BrokerOutage,
    /// One service's PostgreSQL unreachable (refused or black-holed).
    DatabaseOutage,
    /// Latency on a service's connections.
    Latency,
    /// A service's connections reset (RST) or closed (FIN) once.
    ConnectionCut,
    /// Commits whose outcome the service never learns.
    LostCommit,
    /// Real commands delivered again.
    DuplicateCommands,
    /// Replies to attempts that never were, and replies after the end.
    StaleReplies,
    /// A compensation delivered before its action.
    EarlyCompensation,
    /// Undecodable messages on a queue.
    Poison,
    /// Bad gRPC input.
    BadInput,
    /// CancelSaga on a running saga.
    Cancel,
    /// kill -9 of a node of the private RabbitMQ cluster, restarted a few
    /// seconds later (only with `--rabbit-nodes`).
    RabbitNodeKill,
    /// Every orchestrator restarted in turn: SIGTERM, wait for the exit,
    /// start, wait until it serves.
    RollingRestart,
    /// A traffic spike: hundreds of orders started at once, each retried
    /// with its idempotency key while refused for capacity.
    Spike,
}

impl FaultKind {
    /// Every kind with its weight in the draw.
    pub const WEIGHTS: [(FaultKind, u32); 18] = [
        (FaultKind::OrchestratorKill, 6),
        (FaultKind::OrchestratorCrashPoint, 8),
        (FaultKind::ParticipantKill, 6),
        (FaultKind::ParticipantCrashPoint, 6),
        (FaultKind::BrokerOutage, 4),
        (FaultKind::DatabaseOutage, 5),
        (FaultKind::Latency, 4),
        (FaultKind::ConnectionCut, 5),
        (FaultKind::LostCommit, 6),
        (FaultKind::DuplicateCommands, 5),
        (FaultKind::StaleReplies, 5),
        (FaultKind::EarlyCompensation, 4),
        (FaultKind::Poison, 5),
        (FaultKind::BadInput, 4),
        (FaultKind::Cancel, 5),
        (FaultKind::RabbitNodeKill, 4),
        (FaultKind::RollingRestart, 2),
        (FaultKind::Spike, 3),
    ];

    /// The snake_case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::OrchestratorKill => "orchestrator_kill",
            FaultKind::OrchestratorCrashPoint => "orchestrator_crash_point",
            FaultKind::ParticipantKill => "participant_kill",
            FaultKind::ParticipantCrashPoint => "participant_crash_point",
            FaultKind::BrokerOutage => "broker_outage",
            FaultKind::DatabaseOutage => "database_outage",
            FaultKind::Latency => "latency",
            FaultKind::ConnectionCut => "connection_cut",
            FaultKind::LostCommit => "lost_commit",
            FaultKind::DuplicateCommands => "duplicate_commands",
            FaultKind::StaleReplies => "stale_replies",
            FaultKind::EarlyCompensation => "early_compensation",
            FaultKind::Poison => "poison",
            FaultKind::BadInput => "bad_input",
            FaultKind::Cancel => "cancel",
            FaultKind::RabbitNodeKill => "rabbit_node_kill",
            FaultKind::RollingRestart => "rolling_restart",
            FaultKind::Spike => "spike",
        }
    }

    /// Whether the kind breaks connections for a while (one at a time).
    pub fn is_outage(self) -> bool {
        matches!(
            self,
            FaultKind::BrokerOutage
                | FaultKind::DatabaseOutage
                | FaultKind::Latency
                | FaultKind::RabbitNodeKill
                | FaultKind::RollingRestart
        )
    }

    /// Draws a kind; node kills only when the soak runs on a private
    /// RabbitMQ cluster.
    fn draw(rng: &mut StdRng, rabbit_cluster: bool) -> Self {
        let weights = Self::WEIGHTS.map(|(kind, weight)| match kind {
            FaultKind::RabbitNodeKill if !rabbit_cluster => (kind, 0),
            _ => (kind, weight),
        });
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        let mut pick = rng.random_range(0..total);
        for (kind, weight) in weights {
            if pick < weight {
                return kind;
            }
            pick -= weight;
        }
        FaultKind::Poison
    }
}

/// One outage and how long the system took to recover from it.
#[derive(Debug, Clone, Serialize)]
pub struct OutageRecord {
    /// broker_outage, database_outage or latency.
    pub kind: String,
    /// Which services' roads.
    pub target: String,
    /// refuse, black_hole or latency `<ms>`.
    pub mode: String,
    /// How long it lasted.
    pub length: Duration,
    /// Whether the outage cut orchestrators off (else their health is
    /// not its business).
    pub affects_orchestrators: bool,
    /// From healing until every running orchestrator served again.
    pub serving_after: Option<Duration>,
    /// From healing until the next saga completed.
    pub completion_after: Option<Duration>,
}

/// What the faults did, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultBook {
    /// Faults injected, by kind name.
    pub injected: BTreeMap<String, u64>,
    /// Every outage with its recovery times.
    pub outages: Vec<OutageRecord>,
    /// Poison messages published (each must be dead-lettered once).
    pub poison_injected: u64,
    /// Commits cut by the proxies (outcome never learnt).
    pub commits_cut: u64,
    /// Processes restarted by the supervisor.
    pub restarts: u64,
    /// Of which after aborting at a crash point.
    pub crash_point_aborts: u64,
    /// Probes that could not conclude (their target was down).
    pub inconclusive: u64,
    /// What a probe found wrong (bad-input codes, barrier answers).
    pub violations: Vec<String>,
}

/// Draws and injects faults until the run's fault phase ends; returns
/// once every fault task has healed what it broke.
pub async fn schedule(shared: Arc<Shared>, injector: Arc<Injector>, args: Args, mut rng: StdRng) {
    let tasks = TaskTracker::new();
    let probes = Arc::new(Mutex::new(()));
    let mean = args.fault_interval.as_secs_f64().max(0.1);
    loop {
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        let wait = Duration::from_secs_f64((-u.ln() * mean).clamp(0.2, 4.0 * mean));
        tokio::select! {
            () = shared.stop_faults.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        // Drawn from the seed alone, so the schedule replays; an outage
        // drawn while another is on is skipped (one at a time).
        let kind = FaultKind::draw(&mut rng, args.rabbit_nodes > 0);
        let task_rng = StdRng::seed_from_u64(rng.random());
        if kind.is_outage() && shared.outage_on.swap(true, Ordering::SeqCst) {
            *shared
                .book
                .lock()
                .await
                .injected
                .entry(format!("{} (skipped: another outage on)", kind.name()))
                .or_default() += 1;
            continue;
        }
        *shared
            .book
            .lock()
            .await
            .injected
            .entry(kind.name().to_owned())
            .or_default() += 1;
        tasks.spawn(inject(
            kind,
            shared.clone(),
            injector.clone(),
            args.clone(),
            task_rng,
            probes.clone(),
        ));
    }
    tasks.close();
    tasks.wait().await;
}

async fn inject(
    kind: FaultKind,
    shared: Arc<Shared>,
    injector: Arc<Injector>,
    args: Args,
    mut rng: StdRng,
    probes: Arc<Mutex<()>>,
) {
    let (orchestrators, participants) = shared.counts;
    let name = |cluster: &crate::cluster::Cluster, target: Target| match target {
        Target::Orchestrator(i) => cluster.orchestrators[i].process.name().to_owned(),
        Target::Participants(i) => cluster.participants[i].process.name().to_owned(),
    };
    match kind {
        FaultKind::OrchestratorKill => {
            let i = rng.random_range(0..orchestrators);
            let down = Duration::from_millis(rng.random_range(300..5000));
            shared.hold(Target::Orchestrator(i), down).await;
            let mut cluster = shared.cluster.lock().await;
            shared.note(&format!(
                "kill -9 {} for {down:?}",
                name(&cluster, Target::Orchestrator(i))
            ));
            cluster.orchestrators[i].process.kill().await;
        }
        FaultKind::ParticipantKill => {
            let i = rng.random_range(0..participants);
            let down = Duration::from_millis(rng.random_range(300..5000));
            shared.hold(Target::Participants(i), down).await;
            let mut cluster = shared.cluster.lock().await;
            shared.note(&format!(
                "kill -9 {} for {down:?}",
                name(&cluster, Target::Participants(i))
            ));
            cluster.participants[i].process.kill().await;
        }
        FaultKind::OrchestratorCrashPoint => {
            let points = [
                "orchestrator::after_commit_before_publish",
                "orchestrator::after_publish_before_outbox_delete",
                "orchestrator::after_reply_commit_before_ack",
                "orchestrator::timer_before_commit",
            ];
            let point = points[rng.random_range(0..points.len())];
            let skip = rng.random_range(0..40);
            let i = rng.random_range(0..orchestrators);
            crash_point(&shared, Target::Orchestrator(i), point, skip).await;
        }
        FaultKind::ParticipantCrashPoint => {
            let points = [
                "participant::after_commit_before_reply",
                "participant::before_ack",
            ];
            let point = points[rng.random_range(0..points.len())];
            let skip = rng.random_range(0..20);
            let commanders: Vec<usize> = {
                let cluster = shared.cluster.lock().await;
                (0..participants)
                    .filter(|&i| {
                        cluster.participants[i]
                            .services()
                            .iter()
                            .any(|s| *s != participants::demo::Service::Notification)
                    })
                    .collect()
            };
            let i = commanders[rng.random_range(0..commanders.len())];
            crash_point(&shared, Target::Participants(i), point, skip).await;
        }
        FaultKind::BrokerOutage | FaultKind::DatabaseOutage | FaultKind::Latency => {
            outage(kind, &shared, &args, &mut rng).await;
            shared.outage_on.store(false, Ordering::SeqCst);
        }
        FaultKind::RabbitNodeKill => {
            rabbit_node_kill(&shared, &mut rng).await;
            shared.outage_on.store(false, Ordering::SeqCst);
        }
        FaultKind::RollingRestart => {
            rolling_restart(&shared).await;
            shared.outage_on.store(false, Ordering::SeqCst);
        }
        FaultKind::ConnectionCut => {
            let cluster = shared.cluster.lock().await;
            let nodes: Vec<_> = cluster.nodes().collect();
            let node = nodes[rng.random_range(0..nodes.len())];
            match rng.random_range(0..3) {
                0 => {
                    shared.note(&format!(
                        "reset {}'s broker connections",
                        node.process.name()
                    ));
                    node.broker.cut();
                }
                1 => {
                    shared.note(&format!(
                        "close {}'s broker connections",
                        node.process.name()
                    ));
                    node.broker.close_all();
                }
                _ => {
                    shared.note(&format!(
                        "reset {}'s database connections",
                        node.process.name()
                    ));
                    node.database.cut();
                }
            }
        }
        FaultKind::LostCommit => {
            let cluster = shared.cluster.lock().await;
            let nodes: Vec<_> = cluster.nodes().collect();
            let i = rng.random_range(0..nodes.len());
            let node = nodes[i];
            if i < orchestrators && rng.random_bool(0.3) {
                shared.note(&format!(
                    "lose the next saga insert of {}",
                    node.process.name()
                ));
                node.database.cut_after_statement("INSERT INTO sagas", 1);
            } else {
                let count = rng.random_range(1..=3);
                shared.note(&format!(
                    "lose the next {count} commit(s) of {}",
                    node.process.name()
                ));
                node.database.cut_after_commits(count);
            }
        }
        FaultKind::DuplicateCommands => {
            shared.note("redeliver commands");
            duplicate_commands(&shared, &injector, &mut rng).await
        }
        FaultKind::StaleReplies => {
            shared.note("stale and late replies");
            stale_replies(&shared, &injector, &mut rng).await
        }
        FaultKind::EarlyCompensation => {
            let _one_at_a_time = probes.lock().await;
            shared.note("compensation ahead of its action");
            early_compensation(&shared, &injector, &mut rng).await;
        }
        FaultKind::Poison => {
            let bodies = poison_bodies();
            let (_, body) = &bodies[rng.random_range(0..bodies.len())];
            let target = POISON_TARGETS[rng.random_range(0..POISON_TARGETS.len())];
            shared.note(&format!("poison on {}", injector.queue_of(target)));
            if injector.poison(target, body).await.is_ok() {
                shared.book.lock().await.poison_injected += 1;
            }
        }
        FaultKind::BadInput => {
            shared.note("bad gRPC input");
            bad_input(&shared, &mut rng).await
        }
        FaultKind::Cancel => {
            shared.note("cancel a running saga");
            cancel(&shared, &mut rng).await
        }
        FaultKind::Spike => {
            // Far above what the soak's machine sustains for a moment (its
            // load is a few orders a second): the orders beyond the limit
            // are refused and come back with their keys; none may be lost,
            // started twice or compensated for it.
            let count = rng.random_range(100..400);
            shared.note(&format!("spike: {count} orders at once"));
            shared.spike.fire(count, rng.random());
        }
    }
}

/// Restarts `target` so that it aborts at `point` after `skip` passes; if
/// it has not after 30 s, restarts it without the crash point.
async fn crash_point(shared: &Shared, target: Target, point: &str, skip: u32) {
    let failpoints = format!("{point}={skip}*off->return");
    shared.hold(target, Duration::from_secs(1)).await;
    let pid = {
        let mut cluster = shared.cluster.lock().await;
        let node = match target {
            Target::Orchestrator(i) => &mut cluster.orchestrators[i],
            Target::Participants(i) => &mut cluster.participants[i],
        };
        shared.note(&format!(
            "restart {} to abort at {failpoints}",
            node.process.name()
        ));
        node.process
            .start_with(&[("FAILPOINTS", &failpoints)])
            .await
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !shared.stop_faults.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Still the armed run? Disarm it (a supervisor restart has a new pid).
    let mut cluster = shared.cluster.lock().await;
    let node = match target {
        Target::Orchestrator(i) => &mut cluster.orchestrators[i],
        Target::Participants(i) => &mut cluster.participants[i],
    };
    if pid.is_some() && node.process.pid() == pid && node.process.is_running() {
        let _ = node.process.start().await;
    }
}

/// Kills one node of the private RabbitMQ cluster (one at a time: it is an
/// outage, so two nodes never die together and the quorum queues keep
/// their majority), keeps it down for 2-20 s, restarts it on its data.
async fn rabbit_node_kill(shared: &Shared, rng: &mut StdRng) {
    let Some(mut rabbit) = shared.cluster.lock().await.rabbit.take() else {
        return;
    };
    if rabbit.nodes.len() < 2 {
        // Nothing to kill but the injector's node.
        shared.cluster.lock().await.rabbit = Some(rabbit);
        return;
    }
    // The first node holds the soak's own injector (its connection and its
    // private reply queue); the services are spread over every node, so a
    // kill of any other still takes some of them down.
    let node = rng.random_range(1..rabbit.nodes.len());
    let down = Duration::from_secs_f64(rng.random_range(2.0..20.0));
    let name = rabbit.nodes[node].name.clone();
    match rabbit.kill(node) {
        Ok(()) => {
            shared.note(&format!("kill -9 RabbitMQ node {name} for {down:.1?}"));
            tokio::select! {
                () = shared.stop_faults.cancelled() => {}
                () = tokio::time::sleep(down) => {}
            }
            match rabbit.restart(node).await {
                Ok(()) => shared.note(&format!("RabbitMQ node {name} restarted")),
                Err(error) => shared
                    .book
                    .lock()
                    .await
                    .violations
                    .push(format!("RabbitMQ node {name} did not restart: {error}")),
            }
        }
        Err(error) => shared.note(&format!("could not kill RabbitMQ node {name}: {error}")),
    }
    shared.cluster.lock().await.rabbit = Some(rabbit);
}

/// Restarts every orchestrator in turn, gracefully: SIGTERM, wait for the
/// exit (a clean one: anything else is a violation), start, wait until it
/// serves. Held meanwhile, so the supervisor does not step in.
async fn rolling_restart(shared: &Shared) {
    let (orchestrators, _) = shared.counts;
    for i in 0..orchestrators {
        shared
            .hold(Target::Orchestrator(i), Duration::from_secs(120))
            .await;
        let mut cluster = shared.cluster.lock().await;
        let process = &mut cluster.orchestrators[i].process;
        let Some(pid) = process.pid().filter(|_| process.is_running()) else {
            drop(cluster);
            shared.release(Target::Orchestrator(i)).await;
            continue;
        };
        let name = process.name().to_owned();
        shared.note(&format!("rolling restart: SIGTERM {name}"));
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        match process.wait_exit(Duration::from_secs(30)).await {
            Some(status) if status.success() => {}
            Some(status) => shared
                .book
                .lock()
                .await
                .violations
                .push(format!("{name} exited with {status} on SIGTERM")),
            None => shared
                .book
                .lock()
                .await
                .violations
                .push(format!("{name} did not stop within 30 s of SIGTERM")),
        }
        if let Err(error) = cluster.restart_orchestrator(i, &[]).await {
            shared.note(&format!(
                "rolling restart: {name} did not come back: {error}"
            ));
        }
        drop(cluster);
        shared.release(Target::Orchestrator(i)).await;
    }
}

/// How long an outage lasts: mostly seconds, sometimes up to `max`.
fn outage_length(rng: &mut StdRng, max: Duration) -> Duration {
    let max = max.as_secs_f64().max(2.0);
    let seconds = match rng.random_range(0..100) {
        0..70 => rng.random_range(2.0..10.0_f64.min(max)),
        70..95 => rng.random_range(10.0_f64.min(max - 1.0)..30.0_f64.min(max)),
        _ => rng.random_range(30.0_f64.min(max - 1.0)..max),
    };
    Duration::from_secs_f64(seconds)
}

async fn outage(kind: FaultKind, shared: &Shared, args: &Args, rng: &mut StdRng) {
    let (orchestrators, _) = shared.counts;
    let node_count = shared.cluster.lock().await.nodes().count();
    let everyone = kind == FaultKind::BrokerOutage && rng.random_bool(0.5);
    let node = rng.random_range(0..node_count);
    let mode = match kind {
        FaultKind::Latency => Mode::Latency(Duration::from_millis(rng.random_range(50..1500))),
        _ => match rng.random_range(0..3) {
            0 => Mode::Refuse,
            1 => Mode::BlackHole,
            _ => Mode::Partition,
        },
    };
    let length = match kind {
        FaultKind::Latency => Duration::from_secs_f64(rng.random_range(5.0..20.0)),
        _ => outage_length(rng, args.max_outage),
    };
    let apply = |cluster: &crate::cluster::Cluster, mode: Mode| {
        for (i, n) in cluster.nodes().enumerate() {
            if !everyone && i != node {
                continue;
            }
            match kind {
                FaultKind::BrokerOutage => n.broker.set_mode(mode),
                FaultKind::DatabaseOutage => n.database.set_mode(mode),
                _ => {
                    n.broker.set_mode(mode);
                    n.database.set_mode(mode);
                }
            }
        }
    };
    let broken_at = Instant::now();
    let target_name = {
        let cluster = shared.cluster.lock().await;
        apply(&cluster, mode);
        if everyone {
            "every service".to_owned()
        } else {
            cluster
                .nodes()
                .nth(node)
                .map(|n| n.process.name().to_owned())
                .unwrap_or_default()
        }
    };
    shared.note(&format!(
        "{} of {target_name}: {mode:?} for {length:.1?}",
        kind.name()
    ));
    tokio::select! {
        () = shared.stop_faults.cancelled() => {}
        () = tokio::time::sleep(length) => {}
    }
    let healed_at = Instant::now();
    shared.note(&format!("{} of {target_name} healed", kind.name()));
    let healed_wall = Utc::now();
    {
        let cluster = shared.cluster.lock().await;
        apply(&cluster, Mode::Pass);
    }
    let length = healed_at.duration_since(broken_at);
    let affects_orchestrators = everyone || node < orchestrators;
    let (serving_after, completion_after) =
        recovery(shared, healed_at, healed_wall, affects_orchestrators).await;
    shared.book.lock().await.outages.push(OutageRecord {
        kind: kind.name().to_owned(),
        target: target_name,
        mode: match mode {
            Mode::Refuse => "refuse".to_owned(),
            Mode::BlackHole => "black_hole".to_owned(),
            Mode::Partition => "partition".to_owned(),
            Mode::Latency(d) => format!("latency {}ms", d.as_millis()),
            Mode::Pass => "pass".to_owned(),
        },
        length,
        affects_orchestrators,
        serving_after,
        completion_after,
    });
}

/// After healing: how long until every running orchestrator serves, and
/// until a saga completes (each bounded by 3 minutes).
async fn recovery(
    shared: &Shared,
    healed_at: Instant,
    healed_wall: DateTime<Utc>,
    affects_orchestrators: bool,
) -> (Option<Duration>, Option<Duration>) {
    let mut serving = (!affects_orchestrators).then_some(Duration::ZERO);
    let mut completion = None;
    let deadline = healed_at + Duration::from_secs(180);
    while Instant::now() < deadline && (serving.is_none() || completion.is_none()) {
        if serving.is_none() {
            let mut all = true;
            for client in &shared.health {
                let status = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.clone().check(HealthCheckRequest {
                        service: String::new(),
                    }),
                )
                .await;
                let serves = matches!(&status, Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32);
                // A killed orchestrator does not answer: it is not an outage matter.
                let down = matches!(&status, Ok(Err(e)) if e.code() == Code::Unavailable);
                all &= serves || down;
            }
            if all {
                serving = Some(healed_at.elapsed());
            }
        }
        if completion.is_none() {
            let done: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM sagas WHERE status = 'completed' AND updated_at > $1)",
            )
            .bind(healed_wall)
            .fetch_one(&shared.pool)
            .await
            .unwrap_or(false);
            if done {
                completion = Some(healed_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (serving, completion)
}

/// (id, version, status, input) of up to `n` random sagas matching `filter`.
async fn some_sagas(
    shared: &Shared,
    filter: &str,
    n: i64,
) -> Vec<(uuid::Uuid, i32, String, String)> {
    sqlx::query_as(&format!(
        "SELECT id, version, status, input FROM sagas WHERE {filter} ORDER BY random() LIMIT $1"
    ))
    .bind(n)
    .fetch_all(&shared.pool)
    .await
    .unwrap_or_default()
}

/// The reserve_inventory payload the orchestrator builds from an input.
fn reserve_payload(input: &str) -> Option<serde_json::Value> {
    let input: serde_json::Value = serde_json::from_str(input).ok()?;
    let items: Vec<serde_json::Value> = input["items"]
        .as_array()?
        .iter()
        .map(|i| json!({"sku": i["sku"], "quantity": i["quantity"]}))
        .collect();
    Some(json!({"order_id": input["order_id"], "items": items}))
}

async fn duplicate_commands(shared: &Shared, injector: &Injector, rng: &mut StdRng) {
    let count = rng.random_range(1..=5);
    let replies = injector.topology().reply_queue();
    for (id, version, _, input) in some_sagas(shared, "true", count).await {
        let Some(payload) = reserve_payload(&input) else {
            continue;
        };
        let command = order_command(
            id,
            version as u32,
            "reserve_inventory",
            Phase::Action,
            payload,
        );
        let _ = injector.command(&command, Some(&replies)).await;
    }
}

async fn stale_replies(shared: &Shared, injector: &Injector, rng: &mut StdRng) {
    let statuses = [
        ReplyStatus::Success,
        ReplyStatus::Rejected,
        ReplyStatus::TransientError,
    ];
    let steps = ["reserve_inventory", "charge_payment", "confirm_order"];
    // Attempts that never were: ignored whatever the saga is doing.
    for (id, _, _, _) in some_sagas(shared, "true", rng.random_range(1..=5)).await {
        let step = steps[rng.random_range(0..steps.len())];
        let reply = ReplyMessage {
            saga_id: id,
            step: step.into(),
            phase: Phase::Action,
            attempt: rng.random_range(1000..2000),
            idempotency_key: format!("{id}:{step}:action:1"),
            status: statuses[rng.random_range(0..statuses.len())],
            data: json!(null),
            reason: Some("stale".into()),
        };
        let _ = injector.reply(&reply).await;
    }
    // After the end: anything goes, nothing changes.
    for (id, _, _, _) in some_sagas(
        shared,
        "status IN ('completed', 'compensated')",
        rng.random_range(1..=5),
    )
    .await
    {
        let step = steps[rng.random_range(0..steps.len())];
        let reply = ReplyMessage {
            saga_id: id,
            step: step.into(),
            phase: if rng.random_bool(0.5) {
                Phase::Action
            } else {
                Phase::Compensation
            },
            attempt: rng.random_range(1..4),
            idempotency_key: format!("{id}:{step}:action:1"),
            status: statuses[rng.random_range(0..statuses.len())],
            data: json!(null),
            reason: Some("late".into()),
        };
        let _ = injector.reply(&reply).await;
    }
}

/// A compensation for an action that has not arrived, then the action:
/// the first is a remembered no-op, the second is refused with no effect.
async fn early_compensation(shared: &Shared, injector: &Injector, rng: &mut StdRng) {
    let saga = uuid::Uuid::new_v4();
    let order_id = format!("chaos-fake-{saga}");
    let (step, payload) = if rng.random_bool(0.5) {
        (
            "reserve_inventory",
            json!({"order_id": order_id, "items": [{"sku": "sku-1", "quantity": 1}]}),
        )
    } else {
        (
            "authorize_payment",
            json!({"order_id": order_id, "customer_id": "chaos-fake", "amount_cents": 100}),
        )
    };
    let compensation = order_command(saga, 2, step, Phase::Compensation, payload.clone());
    let action = order_command(saga, 2, step, Phase::Action, payload);
    let Some(first) = ask(injector, &compensation).await else {
        shared.book.lock().await.inconclusive += 1;
        return;
    };
    let noop = first.status == ReplyStatus::Success
        && first.data.get("noop").and_then(|v| v.as_str()) == Some("action_never_arrived");
    if !noop {
        shared.book.lock().await.violations.push(format!(
            "early compensation of {step} for fake saga {saga} answered {first:?}, expected a no-op"
        ));
        return;
    }
    let Some(second) = ask(injector, &action).await else {
        shared.book.lock().await.inconclusive += 1;
        return;
    };
    if second.status != ReplyStatus::Rejected {
        shared.book.lock().await.violations.push(format!(
            "late action {step} for fake saga {saga} answered {second:?}, expected rejected (fenced)"
        ));
    }
}

/// Sends `command` and waits (up to 2 minutes: its participant may be
/// down) for the answer to its key on the private queue.
async fn ask(
    injector: &Injector,
    command: &saga_proto::amqp::CommandMessage,
) -> Option<ReplyMessage> {
    injector.command(command, None).await.ok()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        for answer in injector
            .private_answers(1, Duration::from_secs(1))
            .await
            .ok()?
        {
            if answer.idempotency_key == command.idempotency_key
                && answer.status != ReplyStatus::TransientError
            {
                return Some(answer);
            }
            if answer.idempotency_key == command.idempotency_key {
                // Nothing applied: ask again, as an orchestrator would.
                injector.command(command, None).await.ok()?;
            }
        }
    }
    None
}

/// Bad StartSaga / GetSaga requests with the code each must get.
async fn bad_input(shared: &Shared, rng: &mut StdRng) {
    let marker = "chaos-bad-input";
    let item = json!({"sku": "sku-1", "quantity": 1, "unit_price_cents": 1});
    let start = |input: String| StartSagaRequest {
        saga_type: "order_placement".into(),
        input_json: input,
        idempotency_key: String::new(),
        definition_version: 0,
    };
    let starts: Vec<(StartSagaRequest, Code)> = vec![
        (start(format!("{{\"order_id\": \"{marker}\"")), Code::InvalidArgument),
        (
            start(json!({"order_id": marker, "customer_id": "c", "items": [item], "extra": 1}).to_string()),
            Code::InvalidArgument,
        ),
        (
            start(json!({"order_id": marker, "customer_id": "c", "items": [{"sku": "sku-1", "quantity": "1", "unit_price_cents": 1}]}).to_string()),
            Code::InvalidArgument,
        ),
        (
            start(json!({"order_id": marker, "customer_id": "c", "items": []}).to_string()),
            Code::InvalidArgument,
        ),
        (
            start(json!({"order_id": marker, "pad": "x".repeat(70_000)}).to_string()),
            Code::InvalidArgument,
        ),
        (
            StartSagaRequest {
                saga_type: "no_such_flow".into(),
                ..start(json!({"order_id": marker, "customer_id": "c", "items": [item]}).to_string())
            },
            Code::NotFound,
        ),
        (
            StartSagaRequest {
                idempotency_key: "k".repeat(300),
                ..start(json!({"order_id": marker, "customer_id": "c", "items": [item]}).to_string())
            },
            Code::InvalidArgument,
        ),
    ];
    let client = &shared.clients[rng.random_range(0..shared.clients.len())];
    let pick = rng.random_range(0..starts.len() + 1);
    let result = if pick < starts.len() {
        let (request, expected) = starts[pick].clone();
        client
            .clone()
            .start_saga(request)
            .await
            .map(|_| ())
            .map_err(|s| (s, expected))
    } else {
        client
            .clone()
            .get_saga(GetSagaRequest {
                saga_id: "not-a-uuid".into(),
            })
            .await
            .map(|_| ())
            .map_err(|s| (s, Code::InvalidArgument))
    };
    let mut book = shared.book.lock().await;
    match result {
        Ok(()) => book
            .violations
            .push("a bad gRPC request was accepted".to_owned()),
        Err((status, expected)) if status.code() == expected => {}
        // The orchestrator or its database was down: says nothing.
        Err((status, _))
            if matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ) =>
        {
            book.inconclusive += 1
        }
        Err((status, expected)) => book.violations.push(format!(
            "bad gRPC input got {:?} ({}), expected {expected:?}",
            status.code(),
            status.message()
        )),
    }
}

async fn cancel(shared: &Shared, rng: &mut StdRng) {
    let Some((id, ..)) = some_sagas(shared, "status = 'running'", 1).await.pop() else {
        return;
    };
    let client = &shared.clients[rng.random_range(0..shared.clients.len())];
    let result = client
        .clone()
        .cancel_saga(CancelSagaRequest {
            saga_id: id.to_string(),
            reason: "chaos: customer changed their mind".into(),
        })
        .await;
    if let Err(status) = result
        && !matches!(
            status.code(),
            Code::FailedPrecondition | Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        )
    {
        shared.book.lock().await.violations.push(format!(
            "CancelSaga on a running saga got {:?}: {}",
            status.code(),
            status.message()
        ));
    }
}
