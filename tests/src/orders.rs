//! Order sagas with a known fate, and a steady load of them that keeps
//! going while orchestrators die: each order is started with its order id
//! as idempotency key and retried (bounded) on any orchestrator until one
//! answers, so an order is never started twice even when a StartSaga
//! commit's outcome was lost.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use saga_proto::v1::{StartSagaRequest, saga_service_client::SagaServiceClient};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::Channel;

use crate::cluster::order_input;

/// How an order is meant to end (when nothing breaks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Everything succeeds.
    Completes,
    /// Payment refuses it (more than the opening balance): compensated.
    InsufficientFunds,
    /// Inventory refuses it (no such SKU): compensated.
    UnknownSku,
}

static NEXT_ORDER: AtomicU64 = AtomicU64::new(1);

/// A fresh order id and its input for `fate`. Orders spread over 20 SKUs
/// and 5 customers, so concurrent sagas contend for the same rows.
pub fn order(fate: Fate) -> (String, String) {
    let n = NEXT_ORDER.fetch_add(1, Ordering::SeqCst);
    let order_id = format!("o-{n}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let customer = format!("c-{}", n % 5);
    let input = match fate {
        Fate::Completes => order_input(&order_id, &customer, &format!("sku-{}", 1 + n % 20), 150),
        Fate::InsufficientFunds => order_input(&order_id, &customer, "sku-1", 200_000_000),
        Fate::UnknownSku => order_input(&order_id, &customer, "sku-none", 150),
    };
    (order_id, input)
}

/// Settings of an [`OrderLoad`].
#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// Orders started per second.
    pub rate_per_sec: f64,
    /// Stop after this many orders.
    pub max_orders: usize,
    /// Share of orders meant to compensate (half unknown SKU, half
    /// insufficient funds).
    pub compensating_share: f64,
    /// How long to keep retrying one StartSaga before giving up on it.
    pub give_up_after: Duration,
}

impl Default for LoadSettings {
    fn default() -> Self {
        Self {
            rate_per_sec: 5.0,
            max_orders: usize::MAX,
            compensating_share: 0.3,
            give_up_after: Duration::from_secs(120),
        }
    }
}

/// What a load did.
#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    /// Saga ids of the orders the API confirmed.
    pub started: Vec<String>,
    /// How each of them is meant to end, by saga id.
    pub fates: std::collections::HashMap<String, Fate>,
    /// StartSaga calls that failed and were retried.
    pub failed_calls: u64,
    /// Of which refused for capacity (RESOURCE_EXHAUSTED), retried after
    /// the server's hint.
    pub refused_calls: u64,
    /// Orders started by spikes (with the load's, in `started`).
    pub spike_orders: u64,
    /// Orders given up on (their saga may still exist: the checker counts
    /// whatever is in the database).
    pub given_up: u64,
    /// Orders by version (v1, v2).
    pub by_version: [u64; 2],
}

/// A background stream of order sagas over several orchestrators.
#[derive(Debug)]
pub struct OrderLoad {
    /// Stops new orders.
    stop: CancellationToken,
    /// The generator and every start in flight.
    tasks: TaskTracker,
    /// What happened so far.
    stats: Arc<Mutex<LoadStats>>,
    /// Starts extra orders at once.
    spike: Spike,
}

/// Starts orders of a load all at once (a traffic spike), each retried
/// like the load's until admitted, and counted with them.
#[derive(Debug, Clone)]
pub struct Spike {
    clients: Vec<SagaServiceClient<Channel>>,
    tasks: TaskTracker,
    stats: Arc<Mutex<LoadStats>>,
    give_up: Duration,
    compensating_share: f64,
}

impl Spike {
    /// Starts `count` orders at once (fates and versions from `seed`);
    /// returns without waiting for them.
    pub fn fire(&self, count: usize, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        self.stats.lock().expect("load stats").spike_orders += count as u64;
        for n in 0..count {
            let fate = draw_fate(&mut rng, self.compensating_share);
            let version = rng.random_range(1..=2u32);
            spawn_start(
                &self.tasks,
                self.clients.clone(),
                self.stats.clone(),
                fate,
                version,
                n,
                self.give_up,
                None,
            );
        }
    }
}

fn draw_fate(rng: &mut StdRng, compensating_share: f64) -> Fate {
    if rng.random_bool(compensating_share.clamp(0.0, 1.0)) {
        if rng.random_bool(0.5) {
            Fate::UnknownSku
        } else {
            Fate::InsufficientFunds
        }
    } else {
        Fate::Completes
    }
}

/// Starts one order of `fate` in the background and records it.
#[allow(clippy::too_many_arguments)]
fn spawn_start(
    tasks: &TaskTracker,
    clients: Vec<SagaServiceClient<Channel>>,
    stats: Arc<Mutex<LoadStats>>,
    fate: Fate,
    version: u32,
    n: usize,
    give_up: Duration,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let (order_id, input) = order(fate);
    let request = StartSagaRequest {
        saga_type: "order_placement".into(),
        input_json: input,
        idempotency_key: order_id,
        definition_version: version,
    };
    tasks.spawn(async move {
        let outcome = start_with_failover(&clients, request, n, give_up).await;
        let mut stats = stats.lock().expect("load stats");
        stats.failed_calls += outcome.failed_calls;
        stats.refused_calls += outcome.refused_calls;
        match outcome.saga_id {
            Some(id) => {
                stats.fates.insert(id.clone(), fate);
                stats.started.push(id);
                stats.by_version[(version - 1) as usize] += 1;
            }
            None => stats.given_up += 1,
        }
        drop(permit);
    });
}

impl OrderLoad {
    /// Starts orders at `settings.rate_per_sec` on `clients` (round robin,
    /// failing over), versions 1 and 2 at random, fates drawn from `seed`.
    pub fn spawn(
        clients: Vec<SagaServiceClient<Channel>>,
        settings: LoadSettings,
        seed: u64,
    ) -> Self {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let spike = Spike {
            clients: clients.clone(),
            tasks: tasks.clone(),
            stats: stats.clone(),
            give_up: settings.give_up_after,
            compensating_share: settings.compensating_share,
        };
        let generator = {
            let stop = stop.clone();
            let tasks = tasks.clone();
            let stats = stats.clone();
            async move {
                let mut rng = StdRng::seed_from_u64(seed);
                let in_flight = Arc::new(Semaphore::new(32));
                let period = Duration::from_secs_f64(1.0 / settings.rate_per_sec.max(0.01));
                let mut next = tokio::time::Instant::now();
                for n in 0..settings.max_orders {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep_until(next) => {}
                    }
                    next += period;
                    let fate = draw_fate(&mut rng, settings.compensating_share);
                    let version = rng.random_range(1..=2u32);
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        break;
                    };
                    spawn_start(
                        &tasks,
                        clients.clone(),
                        stats.clone(),
                        fate,
                        version,
                        n,
                        settings.give_up_after,
                        Some(permit),
                    );
                }
            }
        };
        tasks.spawn(generator);
        Self {
            stop,
            tasks,
            stats,
            spike,
        }
    }

    /// Starts extra orders of this load at once.
    pub fn spike(&self) -> Spike {
        self.spike.clone()
    }

    /// Orders started so far.
    pub fn started(&self) -> usize {
        self.stats.lock().expect("load stats").started.len()
    }

    /// Stops starting orders, waits for the starts in flight, returns the
    /// totals.
    pub async fn stop(self) -> LoadStats {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.stats.lock().expect("load stats").clone()
    }

    /// Waits until the load started `count` orders or `within` passed.
    pub async fn wait_started(&self, count: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.started() >= count {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

struct StartOutcome {
    saga_id: Option<String>,
    failed_calls: u64,
    refused_calls: u64,
}

/// Starts one order, trying the orchestrators in turn (same idempotency
/// key every time) until one answers or `give_up` passed.
async fn start_with_failover(
    clients: &[SagaServiceClient<Channel>],
    request: StartSagaRequest,
    n: usize,
    give_up: Duration,
) -> StartOutcome {
    use tonic_types::StatusExt;
    let deadline = Instant::now() + give_up;
    let mut failed_calls = 0;
    let mut refused_calls = 0;
    let mut turn = n;
    loop {
        let mut client = clients[turn % clients.len()].clone();
        turn += 1;
        // A refusal for capacity says when to come back.
        let mut wait = Duration::from_millis(250);
        match client.start_saga(request.clone()).await {
            Ok(response) => {
                return StartOutcome {
                    saga_id: Some(response.into_inner().saga_id),
                    failed_calls,
                    refused_calls,
                };
            }
            Err(status) => {
                failed_calls += 1;
                if status.code() == tonic::Code::ResourceExhausted {
                    refused_calls += 1;
                    if let Some(hint) = status.get_details_retry_info().and_then(|r| r.retry_delay)
                    {
                        wait = hint;
                    }
                }
                tracing::debug!(%status, key = %request.idempotency_key, "StartSaga failed; retrying");
            }
        }
        if Instant::now() > deadline {
            return StartOutcome {
                saga_id: None,
                failed_calls,
                refused_calls,
            };
        }
        tokio::time::sleep(wait).await;
    }
}
