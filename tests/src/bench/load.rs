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

/// What happened in one second of the run (from the start of the load).
#[derive(Debug, Clone)]
pub struct Second {
    /// Starts answered with a saga id.
    pub admitted: u64,
    /// Starts refused with RESOURCE_EXHAUSTED.
    pub refused: u64,
    /// Sagas that ended COMPLETED in this second.
    pub completed: u64,
    /// Sagas that ended otherwise in this second.
    pub not_completed: u64,
    /// Start-to-end latency (µs) of the sagas started in this second.
    pub latency: Histogram<u64>,
}

impl Default for Second {
    fn default() -> Self {
        Self {
            admitted: 0,
            refused: 0,
            completed: 0,
            not_completed: 0,
            latency: latency_histogram(),
        }
    }
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
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
    /// StartSaga errors other than refusals for capacity.
    pub start_errors: AtomicU64,
    /// StartSaga calls refused with RESOURCE_EXHAUSTED.
    pub refused: AtomicU64,
    /// Refusals answered inside the window.
    refused_in_window: AtomicU64,
    /// How long a refusal took to come back (µs), inside the window.
    refusal_latency: Mutex<Histogram<u64>>,
    /// Per second since [`Tracker::set_origin`].
    series: Mutex<(Option<Instant>, Vec<Second>)>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            latency: Mutex::new(latency_histogram()),
            window: Mutex::new(None),
            in_window: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            not_completed: AtomicU64::new(0),
            start_errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refused_in_window: AtomicU64::new(0),
            refusal_latency: Mutex::new(latency_histogram()),
            series: Mutex::new((None, Vec::new())),
        }
    }
}

impl Tracker {
    /// Opens the measured window [`start`, `end`).
    pub fn set_window(&self, start: Instant, end: Instant) {
        *self.window.lock().unwrap() = Some((start, end));
    }

    /// Counts the per-second series from `origin` on.
    pub fn set_origin(&self, origin: Instant) {
        self.series.lock().unwrap().0 = Some(origin);
    }

    /// Updates the second `at` falls in.
    fn in_second(&self, at: Instant, update: impl FnOnce(&mut Second)) {
        let mut series = self.series.lock().unwrap();
        let Some(origin) = series.0 else { return };
        let Some(since) = at.checked_duration_since(origin) else {
            return;
        };
        let index = since.as_secs() as usize;
        if series.1.len() <= index {
            series.1.resize_with(index + 1, Second::default);
        }
        update(&mut series.1[index]);
    }

    /// The per-second series so far.
    pub fn series(&self) -> Vec<Second> {
        self.series.lock().unwrap().1.clone()
    }

    /// A start sent at `sent` was refused for capacity now.
    pub fn refused(&self, sent: Instant) {
        let now = Instant::now();
        self.refused.fetch_add(1, Ordering::Relaxed);
        if self.in_window(now) {
            self.refused_in_window.fetch_add(1, Ordering::Relaxed);
            let micros = now.duration_since(sent).as_micros() as u64;
            let _ = self.refusal_latency.lock().unwrap().record(micros.max(1));
        }
        self.in_second(sent, |s| s.refused += 1);
    }

    /// Refusals answered inside the window.
    pub fn refused_in_window(&self) -> u64 {
        self.refused_in_window.load(Ordering::Relaxed)
    }

    /// How long refusals took (µs), inside the window.
    pub fn refusal_latency(&self) -> Histogram<u64> {
        self.refusal_latency.lock().unwrap().clone()
    }

    fn in_window(&self, at: Instant) -> bool {
        self.window
            .lock()
            .unwrap()
            .is_some_and(|(s, e)| at >= s && at < e)
    }

    /// Registers a started saga; the receiver resolves when it ends.
    pub fn started(&self, id: Uuid, started: Instant) -> oneshot::Receiver<Ending> {
        self.in_second(started, |s| s.admitted += 1);
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
        let micros = (ended.duration_since(started).as_micros() as u64).max(1);
        if self.in_window(started) {
            let _ = self.latency.lock().unwrap().record(micros);
        }
        self.in_second(ended, |s| match ending {
            Ending::Completed => s.completed += 1,
            _ => s.not_completed += 1,
        });
        self.in_second(started, |s| {
            let _ = s.latency.record(micros);
        });
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
    /// `n` connections to each of `addrs` (several orchestrator instances
    /// share the starts round robin).
    pub async fn connect(addrs: &[String], n: usize) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..n {
            for addr in addrs {
                clients.push(SagaServiceClient::connect(format!("http://{addr}")).await?);
            }
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

/// How one start went.
enum Outcome {
    /// It started and ended.
    Ended,
    /// Refused for capacity, with the server's retry hint.
    Refused(Option<Duration>),
    /// Failed otherwise, or never ended.
    Lost,
}

/// Starts one saga; returns when it has ended (or failed to start).
async fn one_saga(clients: &Clients, workload: &Workload, n: u64, tracker: &Tracker) -> Outcome {
    use tonic_types::StatusExt;
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
        Err(status) if status.code() == tonic::Code::ResourceExhausted => {
            tracker.refused(started);
            let hint = status.get_details_retry_info().and_then(|r| r.retry_delay);
            return Outcome::Refused(hint);
        }
        _ => {
            tracker.start_errors.fetch_add(1, Ordering::Relaxed);
            return Outcome::Lost;
        }
    };
    match tracker.started(id, started).await {
        Ok(_) => Outcome::Ended,
        Err(_) => Outcome::Lost,
    }
}

/// Closed loop: `concurrency` workers each start a saga, wait for its end,
/// and repeat until `until`. A worker refused for capacity waits as long as
/// the refusal's retry hint says, as a well-behaved client does (one that
/// retried at once would measure its own refusals).
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
                if let Outcome::Refused(hint) = one_saga(&clients, &workload, n, &tracker).await {
                    let wait = hint.unwrap_or(Duration::from_millis(100));
                    tokio::time::sleep_until((Instant::now() + wait).into()).await;
                }
            }
        })
    });
    futures::future::join_all(workers).await;
}

/// The arrival rate of an open loop: `base` per second, and `spike` per
/// second from `spike_at` for `spike_length` (offsets from the loop's
/// start).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Sagas per second outside the spike.
    pub base: f64,
    /// (rate, start, length) of the spike, if any.
    pub spike: Option<(f64, Duration, Duration)>,
}

impl Shape {
    /// Starts due `elapsed` after the loop's start (the integral of the
    /// rate).
    pub fn due(&self, elapsed: Duration) -> u64 {
        let t = elapsed.as_secs_f64();
        let mut due = self.base * t;
        if let Some((rate, at, length)) = self.spike {
            let from = at.as_secs_f64();
            let overlap = (t.min(from + length.as_secs_f64()) - from).max(0.0);
            due += (rate - self.base) * overlap;
        }
        due as u64
    }
}

/// What an open loop could not do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unissued {
    /// Starts not sent because `max_outstanding` were outstanding.
    pub skipped: u64,
    /// Starts that were due when the loop ended but not yet sent (the
    /// generator fell behind its own schedule).
    pub behind: u64,
    /// Starts sent.
    pub issued: u64,
}

/// Open loop: starts sagas at the rate of `shape` until `until`, whatever
/// the latency (at most `max_outstanding` at once; beyond that starts are
/// counted as skipped).
pub async fn open_loop(
    clients: Clients,
    workload: Workload,
    tracker: Arc<Tracker>,
    shape: Shape,
    until: Instant,
    max_outstanding: usize,
) -> Unissued {
    let limit = Arc::new(Semaphore::new(max_outstanding));
    let begin = Instant::now();
    let mut issued: u64 = 0;
    let mut skipped = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < until {
        tick.tick().await;
        let due = shape.due(begin.elapsed());
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
    let due = shape.due(until.saturating_duration_since(begin));
    Unissued {
        skipped,
        behind: due.saturating_sub(issued),
        issued: issued - skipped,
    }
}
