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
                    let fate = if rng.random_bool(settings.compensating_share.clamp(0.0, 1.0)) {
                        if rng.random_bool(0.5) {
                            Fate::UnknownSku
                        } else {
                            Fate::InsufficientFunds
                        }
                    } else {
                        Fate::Completes
                    };
                    let version = rng.random_range(1..=2u32);
                    let (order_id, input) = order(fate);
                    let request = StartSagaRequest {
                        saga_type: "order_placement".into(),
                        input_json: input,
                        idempotency_key: order_id,
                        definition_version: version,
                    };
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        break;
                    };
                    let clients = clients.clone();
                    let stats = stats.clone();
                    let give_up = settings.give_up_after;
                    tasks.spawn(async move {
                        let outcome = start_with_failover(&clients, request, n, give_up).await;
                        let mut stats = stats.lock().expect("load stats");
                        stats.failed_calls += outcome.failed_calls;
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
            }
        };
        tasks.spawn(generator);
        Self { stop, tasks, stats }
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
}

/// Starts one order, trying the orchestrators in turn (same idempotency
/// key every time) until one answers or `give_up` passed.
async fn start_with_failover(
    clients: &[SagaServiceClient<Channel>],
    request: StartSagaRequest,
    n: usize,
    give_up: Duration,
) -> StartOutcome {
    let deadline = Instant::now() + give_up;
    let mut failed_calls = 0;
    let mut turn = n;
    loop {
        let mut client = clients[turn % clients.len()].clone();
        turn += 1;
        match client.start_saga(request.clone()).await {
            Ok(response) => {
                return StartOutcome {
                    saga_id: Some(response.into_inner().saga_id),
                    failed_calls,
                };
            }
            Err(status) => {
                failed_calls += 1;
                tracing::debug!(%status, key = %request.idempotency_key, "StartSaga failed; retrying");
            }
        }
        if Instant::now() > deadline {
            return StartOutcome {
                saga_id: None,
                failed_calls,
            };
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
