//! Load drivers (open and closed loop) and completion tracking through the
//! lifecycle events the orchestrator publishes.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::{
    Connection, ConnectionProperties, ExchangeKind,
    options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use saga_proto::{
    amqp::{LifecycleEvent, SagaLifecycleState, Topology},
    v1::{StartSagaRequest, saga_service_client::SagaServiceClient},
};
use tokio::sync::{Semaphore, oneshot};
use tonic::transport::Channel;
use uuid::Uuid;

/// What a finished saga ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// COMPLETED.
    Completed,
    /// COMPENSATED.
    Compensated,
    /// FAILED.
    Failed,
}

struct Waiting {
    started: Instant,
    done: Option<oneshot::Sender<Ending>>,
}

#[derive(Default)]
struct TrackerState {
    waiting: HashMap<Uuid, Waiting>,
    /// Endings seen before the StartSaga response came back.
    early: HashMap<Uuid, (Instant, Ending)>,
}

/// Matches lifecycle events with started sagas and measures latency.
pub struct Tracker {
    state: Mutex<TrackerState>,
    /// Latencies (µs) of sagas started inside the measured window.
    latency: Mutex<Histogram<u64>>,
    /// Completions (any ending) with the time they were seen.
    window: Mutex<Option<(Instant, Instant)>>,
    /// Endings inside the window.
    in_window: AtomicU64,
    /// Endings seen at all.
    pub finished: AtomicU64,
    /// COMPLETED endings.
    pub completed: AtomicU64,
    /// COMPENSATED or FAILED endings.
    pub not_completed: AtomicU64,
    /// StartSaga errors.
    pub start_errors: AtomicU64,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
            ),
            window: Mutex::new(None),
            in_window: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            not_completed: AtomicU64::new(0),
            start_errors: AtomicU64::new(0),
        }
    }
}

impl Tracker {
    /// Opens the measured window [`start`, `end`).
    pub fn set_window(&self, start: Instant, end: Instant) {
        *self.window.lock().unwrap() = Some((start, end));
    }

    fn in_window(&self, at: Instant) -> bool {
        self.window
            .lock()
            .unwrap()
            .is_some_and(|(s, e)| at >= s && at < e)
    }

    /// Registers a started saga; the receiver resolves when it ends.
    pub fn started(&self, id: Uuid, started: Instant) -> oneshot::Receiver<Ending> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().unwrap();
        if let Some((at, ending)) = state.early.remove(&id) {
            drop(state);
            self.record(started, at, ending);
            let _ = tx.send(ending);
        } else {
            state.waiting.insert(
                id,
                Waiting {
                    started,
                    done: Some(tx),
                },
            );
        }
        rx
    }

    fn ended(&self, id: Uuid, ending: Ending, at: Instant) {
        let mut state = self.state.lock().unwrap();
        match state.waiting.remove(&id) {
            Some(mut waiting) => {
                drop(state);
                self.record(waiting.started, at, ending);
                if let Some(done) = waiting.done.take() {
                    let _ = done.send(ending);
                }
            }
            None => {
                state.early.insert(id, (at, ending));
            }
        }
    }

    fn record(&self, started: Instant, ended: Instant, ending: Ending) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        match ending {
            Ending::Completed => self.completed.fetch_add(1, Ordering::Relaxed),
            _ => self.not_completed.fetch_add(1, Ordering::Relaxed),
        };
        if self.in_window(ended) {
            self.in_window.fetch_add(1, Ordering::Relaxed);
        }
        if self.in_window(started) {
            let micros = ended.duration_since(started).as_micros() as u64;
            let _ = self.latency.lock().unwrap().record(micros.max(1));
        }
    }

    /// Endings seen inside the window.
    pub fn window_count(&self) -> u64 {
        self.in_window.load(Ordering::Relaxed)
    }

    /// Latency histogram (µs) of sagas started in the window.
    pub fn latency(&self) -> Histogram<u64> {
        self.latency.lock().unwrap().clone()
    }

    /// Sagas started and not yet ended.
    pub fn outstanding(&self) -> usize {
        self.state.lock().unwrap().waiting.len()
    }
}

/// Subscribes to terminal lifecycle events and feeds `tracker` until `stop`.
pub async fn follow_endings(
    amqp_url: &str,
    topology: &Topology,
    tracker: Arc<Tracker>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            topology.events_exchange().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // A private, exclusive queue: nothing to clean up afterwards.
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    for key in ["*.completed", "*.compensated", "*.failed"] {
        channel
            .queue_bind(
                queue.name().clone(),
                topology.events_exchange().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(tokio::spawn(async move {
        let _connection = connection;
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = consumer.next() => next,
            };
            let Some(Ok(delivery)) = next else { return };
            let now = Instant::now();
            if let Ok(event) = serde_json::from_slice::<LifecycleEvent>(&delivery.data) {
                let ending = match event.state {
                    SagaLifecycleState::Completed => Ending::Completed,
                    SagaLifecycleState::Compensated => Ending::Compensated,
                    SagaLifecycleState::Failed => Ending::Failed,
                    _ => continue,
                };
                tracker.ended(event.saga_id, ending, now);
            }
        }
    }))
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Flow name.
    pub saga_type: String,
    /// Flow version (0 = latest).
    pub version: u32,
    /// Builds the input of the n-th saga.
    pub input: fn(u64) -> String,
}

/// gRPC clients spread over several HTTP/2 connections.
#[derive(Clone)]
pub struct Clients {
    clients: Vec<SagaServiceClient<Channel>>,
    next: Arc<AtomicU64>,
}

impl Clients {
    /// `n` connections to `addr`.
    pub async fn connect(addr: &str, n: usize) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(SagaServiceClient::connect(format!("http://{addr}")).await?);
        }
        Ok(Self {
            clients,
            next: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The next client, round robin.
    pub fn pick_client(&self) -> SagaServiceClient<Channel> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.clients.len();
        self.clients[i].clone()
    }
}

/// Starts one saga; returns when it has ended (or failed to start).
async fn one_saga(
    clients: &Clients,
    workload: &Workload,
    n: u64,
    tracker: &Tracker,
) -> Option<Ending> {
    let started = Instant::now();
    let response = clients
        .pick_client()
        .start_saga(StartSagaRequest {
            saga_type: workload.saga_type.clone(),
            input_json: (workload.input)(n),
            idempotency_key: String::new(),
            definition_version: workload.version,
        })
        .await;
    let id = match response.map(|r| r.into_inner().saga_id.parse::<Uuid>()) {
        Ok(Ok(id)) => id,
        _ => {
            tracker.start_errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    tracker.started(id, started).await.ok()
}

/// Closed loop: `concurrency` workers each start a saga, wait for its end,
/// and repeat until `until`.
pub async fn closed_loop(
    clients: Clients,
    workload: Workload,
    tracker: Arc<Tracker>,
    concurrency: usize,
    until: Instant,
) {
    let counter = Arc::new(AtomicU64::new(0));
    let workers = (0..concurrency).map(|_| {
        let clients = clients.clone();
        let workload = workload.clone();
        let tracker = tracker.clone();
        let counter = counter.clone();
        tokio::spawn(async move {
            while Instant::now() < until {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                one_saga(&clients, &workload, n, &tracker).await;
            }
        })
    });
    futures::future::join_all(workers).await;
}

/// Open loop: starts sagas at `rate` per second until `until`, whatever the
/// latency (at most `max_outstanding` at once; beyond that starts are
/// counted as skipped).
pub async fn open_loop(
    clients: Clients,
    workload: Workload,
    tracker: Arc<Tracker>,
    rate: f64,
    until: Instant,
    max_outstanding: usize,
) -> u64 {
    let limit = Arc::new(Semaphore::new(max_outstanding));
    let begin = Instant::now();
    let mut issued: u64 = 0;
    let mut skipped = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < until {
        tick.tick().await;
        let due = (begin.elapsed().as_secs_f64() * rate) as u64;
        while issued < due {
            issued += 1;
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                skipped += 1;
                continue;
            };
            let clients = clients.clone();
            let workload = workload.clone();
            let tracker = tracker.clone();
            tokio::spawn(async move {
                one_saga(&clients, &workload, issued, &tracker).await;
                drop(permit);
            });
        }
    }
    skipped
}
