//! The real system under failure injection: orchestrator and demo
//! participant *processes*, each reaching RabbitMQ and PostgreSQL through
//! its own [`FaultProxy`] pair, in a private [`TestEnv`].
//!
//! ```text
//!  test ──gRPC──▶ orchestrator-1 ──▶ proxy(amqp) ──▶ RabbitMQ ◀── proxy(amqp) ◀── inventory
//!                       │                                                          │
//!                       └──▶ proxy(pg) ──▶ PostgreSQL ◀──────────── proxy(pg) ◀────┘
//! ```
//!
//! Process-heavy tests take [`heavy_permit`] so they run one at a time even
//! when the test harness runs tests in parallel (the machine has 2 cores and
//! PostgreSQL 100 connections shared by everyone).

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use participants::demo::Service;
use saga_proto::v1::{StartSagaRequest, saga_service_client::SagaServiceClient};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{Semaphore, SemaphorePermit};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    env::{POSTGRES, TestEnv},
    invariants::{Expectations, Report, check, queued_messages, wait_settled},
    processes::{Launchers, ManagedProcess, ProcessError, entry::READY_LINE, log_dir},
    proxy::{FaultProxy, ProxyError},
};

/// RabbitMQ of the tests.
pub const RABBITMQ_ADDR: &str = "127.0.0.1:5672";
/// PostgreSQL of the tests.
pub const POSTGRES_ADDR: &str = "127.0.0.1:5432";
/// AMQP heartbeat (seconds) of every service in a cluster: a black-holed
/// broker is noticed within two of them.
pub const HEARTBEAT_SECS: u16 = 4;

static HEAVY: Semaphore = Semaphore::const_new(1);

/// Serialises process-heavy tests: hold the permit for the whole test.
pub async fn heavy_permit() -> SemaphorePermit<'static> {
    HEAVY
        .acquire()
        .await
        .expect("the semaphore is never closed")
}

/// Why a cluster could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A proxy could not start.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A process could not start.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The test's own database connection failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A process did not become ready in time.
    #[error("{process} not ready within {within:?}; last log lines:\n{log}")]
    NotReady {
        /// The process.
        process: String,
        /// The deadline.
        within: Duration,
        /// The end of its log.
        log: String,
    },
    /// A gRPC call failed.
    #[error("gRPC: {0}")]
    Grpc(#[from] tonic::Status),
    /// The private RabbitMQ cluster failed.
    #[error(transparent)]
    Rabbit(#[from] crate::rabbit_cluster::RabbitError),
}

/// What a node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// An orchestrator serving gRPC on `grpc`.
    Orchestrator {
        /// Its gRPC address (fixed across restarts).
        grpc: SocketAddr,
    },
    /// Demo participants.
    Participants(Vec<Service>),
}

/// One service process and the two proxies between it and the servers.
#[derive(Debug)]
pub struct Node {
    /// The process.
    pub process: ManagedProcess,
    /// Its road to RabbitMQ.
    pub broker: FaultProxy,
    /// Its road to PostgreSQL.
    pub database: FaultProxy,
    /// What it runs.
    pub role: Role,
    /// Its Prometheus exporter (fixed across restarts).
    pub metrics: SocketAddr,
    /// Taken out of the system for good: never restarted by
    /// [`Cluster::ensure_running`].
    pub retired: bool,
}

impl Node {
    /// Heals both proxies.
    pub fn heal(&self) {
        self.broker.pass();
        self.database.pass();
    }

    /// The demo services it runs (none for an orchestrator).
    pub fn services(&self) -> &[Service] {
        match &self.role {
            Role::Participants(services) => services,
            Role::Orchestrator { .. } => &[],
        }
    }
}

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Orchestrator processes (sharing one database and namespace).
    pub orchestrators: usize,
    /// One participant process per group.
    pub participant_groups: Vec<Vec<Service>>,
    /// Extra environment of every orchestrator process.
    pub orchestrator_env: Vec<(String, String)>,
    /// Extra environment of every participant process.
    pub participant_env: Vec<(String, String)>,
    /// Nodes of a private RabbitMQ cluster to run on (see
    /// [`crate::rabbit_cluster`]); 0: the machine's RabbitMQ. With a
    /// cluster each service's `AMQP_URL` lists every node, starting with a
    /// different one per service (its fault proxy sits on the road to that
    /// first node), so the services are spread over the nodes.
    pub rabbit_nodes: usize,
}

impl Default for ClusterOptions {
    /// One orchestrator; inventory, payment, orders and notification each in
    /// its own process.
    fn default() -> Self {
        Self {
            orchestrators: 1,
            participant_groups: Service::ALL.iter().map(|s| vec![*s]).collect(),
            orchestrator_env: Vec::new(),
            participant_env: Vec::new(),
            rabbit_nodes: 0,
        }
    }
}

/// A running system of processes in its own namespace; everything is
/// killed and removed on drop.
#[derive(Debug)]
pub struct Cluster {
    /// Orchestrator nodes.
    pub orchestrators: Vec<Node>,
    /// Participant nodes, one per group.
    pub participants: Vec<Node>,
    /// A direct (unproxied) pool on the orchestrator's database.
    pub pool: PgPool,
    /// The namespace and databases.
    env: TestEnv,
    /// The private RabbitMQ cluster, if the options asked for one (dropped
    /// after every process).
    pub rabbit: Option<crate::rabbit_cluster::RabbitCluster>,
}

/// Where a service's broker road goes: the machine's RabbitMQ, or the
/// nodes of a private cluster.
struct BrokerRoads<'a> {
    rabbit: Option<&'a crate::rabbit_cluster::RabbitCluster>,
    /// Services given a road so far (picks each one's first node).
    given: usize,
}

impl BrokerRoads<'_> {
    /// A fault proxy for the next service and its `AMQP_URL`.
    async fn next(&mut self) -> Result<(FaultProxy, String), ClusterError> {
        let Some(rabbit) = self.rabbit else {
            let proxy = FaultProxy::start(RABBITMQ_ADDR.parse().expect("valid address")).await?;
            let url = amqp_url(&proxy);
            return Ok((proxy, url));
        };
        let count = rabbit.nodes.len();
        let first = self.given % count;
        self.given += 1;
        let proxy = FaultProxy::start(rabbit.nodes[first].addr()).await?;
        let mut urls = vec![amqp_url(&proxy)];
        urls.extend((1..count).map(|k| rabbit.nodes[(first + k) % count].url(HEARTBEAT_SECS)));
        Ok((proxy, urls.join(",")))
    }
}

/// A free loopback port for a service to listen on, kept across its
/// restarts. Drawn below Linux's ephemeral range (32768+), which outgoing
/// connections (there are many here) take their ports from, so a port
/// picked now is not taken by a client connection before the service binds
/// it; checked free by binding it, and never handed out twice by this
/// process.
pub fn free_port() -> u16 {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().expect("port list");
    for _ in 0..1000 {
        let port = rand::random_range(20_000..32_000);
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
    panic!("no free loopback port between 20000 and 32000")
}

fn amqp_url(proxy: &FaultProxy) -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat={HEARTBEAT_SECS}",
        proxy.port()
    )
}

/// An order_placement input for `order_id` paid by `customer_id`.
pub fn order_input(order_id: &str, customer_id: &str, sku: &str, unit_price_cents: u64) -> String {
    json!({
        "order_id": order_id,
        "customer_id": customer_id,
        "items": [{"sku": sku, "quantity": 2, "unit_price_cents": unit_price_cents}],
    })
    .to_string()
}

impl Cluster {
    /// Starts proxies and processes and waits until every orchestrator
    /// serves and every participant consumes.
    pub async fn start(
        launchers: &Launchers,
        options: ClusterOptions,
    ) -> Result<Self, ClusterError> {
        let env = TestEnv::new();
        let logs = log_dir(&env.namespace);
        let rabbit = if options.rabbit_nodes > 0 {
            let rabbit =
                crate::rabbit_cluster::RabbitCluster::start(&env.namespace, options.rabbit_nodes)
                    .await?;
            env.use_broker(&rabbit.url_list(0, HEARTBEAT_SECS));
            Some(rabbit)
        } else {
            None
        };
        let mut roads = BrokerRoads {
            rabbit: rabbit.as_ref(),
            given: 0,
        };
        let postgres: SocketAddr = POSTGRES_ADDR.parse().expect("valid address");
        let orchestrator_db = env.database_url("orch");
        let db_name = orchestrator_db
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        for service in Service::ALL {
            env.database_url(service.name());
        }
        let mut orchestrators = Vec::new();
        for i in 0..options.orchestrators {
            let (broker, broker_url) = roads.next().await?;
            let database = FaultProxy::start(postgres).await?;
            let grpc: SocketAddr = format!("127.0.0.1:{}", free_port())
                .parse()
                .expect("address");
            let metrics: SocketAddr = format!("127.0.0.1:{}", free_port())
                .parse()
                .expect("address");
            let mut process = ManagedProcess::new(
                &format!("orchestrator-{}", i + 1),
                launchers.orchestrator.clone(),
                logs.clone(),
            );
            process.set_env(
                "DATABASE_URL",
                // Plaintext on loopback: the fault proxy reads the
                // PostgreSQL protocol to find each COMMIT.
                format!(
                    "postgres://postgres@127.0.0.1:{}/{db_name}?sslmode=disable",
                    database.port()
                ),
            );
            process.set_env("AMQP_URL", broker_url);
            process.set_env("SAGA_NAMESPACE", env.namespace.clone());
            process.set_env("GRPC_ADDR", grpc.to_string());
            process.set_env("METRICS_ADDR", metrics.to_string());
            process.set_env("DB_MAX_CONNECTIONS", "4");
            process.set_env("REPLY_PREFETCH", "128");
            process.set_env("REPLY_BATCH", "32");
            // The failure suites size their loads to test faults, not
            // capacity, and their clients do not all wait out refusals:
            // admission control is proven by `spike` and the chaos soak,
            // which turn it back on.
            process.set_env("ADMISSION", "off");
            for (key, value) in &options.orchestrator_env {
                process.set_env(key, value.clone());
            }
            orchestrators.push(Node {
                process,
                broker,
                database,
                role: Role::Orchestrator { grpc },
                metrics,
                retired: false,
            });
        }
        let mut participants = Vec::new();
        for group in &options.participant_groups {
            let (broker, broker_url) = roads.next().await?;
            let database = FaultProxy::start(postgres).await?;
            let metrics: SocketAddr = format!("127.0.0.1:{}", free_port())
                .parse()
                .expect("address");
            let names: Vec<&str> = group.iter().map(|s| s.name()).collect();
            let mut process = ManagedProcess::new(
                &names.join("+"),
                launchers.participants.clone(),
                logs.clone(),
            );
            process.set_env("PARTICIPANTS", names.join(","));
            process.set_env(
                "DATABASE_URL",
                format!(
                    "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
                    database.port()
                ),
            );
            process.set_env("AMQP_URL", broker_url);
            process.set_env("SAGA_NAMESPACE", env.namespace.clone());
            process.set_env("METRICS_ADDR", metrics.to_string());
            process.set_env("DB_POOL_SIZE", "2");
            for (key, value) in &options.participant_env {
                process.set_env(key, value.clone());
            }
            participants.push(Node {
                process,
                broker,
                database,
                role: Role::Participants(group.clone()),
                metrics,
                retired: false,
            });
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy(&format!("{POSTGRES}/{db_name}"))?;
        let mut cluster = Self {
            orchestrators,
            participants,
            pool,
            env,
            rabbit,
        };
        for i in 0..cluster.orchestrators.len() {
            cluster.orchestrators[i].process.start().await?;
        }
        for i in 0..cluster.participants.len() {
            cluster.participants[i].process.start().await?;
        }
        for i in 0..cluster.orchestrators.len() {
            cluster
                .wait_orchestrator_ready(i, Duration::from_secs(60))
                .await?;
        }
        for i in 0..cluster.participants.len() {
            cluster
                .wait_participants_ready(i, Duration::from_secs(60))
                .await?;
        }
        Ok(cluster)
    }

    /// The namespace and databases.
    pub fn env(&self) -> &TestEnv {
        &self.env
    }

    /// The gRPC address of orchestrator `i`.
    pub fn grpc_addr(&self, i: usize) -> SocketAddr {
        match self.orchestrators[i].role {
            Role::Orchestrator { grpc } => grpc,
            Role::Participants(_) => unreachable!("orchestrator nodes have a gRPC address"),
        }
    }

    fn endpoint(&self, i: usize) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.grpc_addr(i)))
            .expect("valid endpoint")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
    }

    /// A client of orchestrator `i` (connects lazily, reconnects after
    /// restarts).
    pub fn client(&self, i: usize) -> SagaServiceClient<Channel> {
        SagaServiceClient::new(self.endpoint(i).connect_lazy())
            .max_decoding_message_size(16 * 1024 * 1024)
    }

    /// Clients of every orchestrator not retired, with a short request
    /// timeout, for an [`crate::orders::OrderLoad`].
    pub fn load_clients(&self) -> Vec<SagaServiceClient<Channel>> {
        (0..self.orchestrators.len())
            .filter(|&i| !self.orchestrators[i].retired)
            .map(|i| {
                SagaServiceClient::new(
                    self.endpoint(i)
                        .timeout(Duration::from_secs(5))
                        .connect_lazy(),
                )
            })
            .collect()
    }

    /// What orchestrator `i`'s standard health service says, or `None` if
    /// it does not answer within 2 s.
    pub async fn health(&self, i: usize) -> Option<ServingStatus> {
        let channel = self
            .endpoint(i)
            .timeout(Duration::from_secs(2))
            .connect_lazy();
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    /// Waits until orchestrator `i` reports `status` (bounded).
    pub async fn wait_health(
        &self,
        i: usize,
        status: ServingStatus,
        within: Duration,
    ) -> Result<Duration, ClusterError> {
        let started = Instant::now();
        loop {
            if self.health(i).await == Some(status) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                return Err(ClusterError::NotReady {
                    process: format!("{} ({status:?})", self.orchestrators[i].process.name()),
                    within,
                    log: self.orchestrators[i].process.log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until orchestrator `i` serves.
    pub async fn wait_orchestrator_ready(
        &self,
        i: usize,
        within: Duration,
    ) -> Result<Duration, ClusterError> {
        self.wait_health(i, ServingStatus::Serving, within).await
    }

    /// Waits until participant process `i` has printed its ready line.
    pub async fn wait_participants_ready(
        &self,
        i: usize,
        within: Duration,
    ) -> Result<Duration, ClusterError> {
        let started = Instant::now();
        let node = &self.participants[i];
        loop {
            let log = std::fs::read_to_string(node.process.log_path()).unwrap_or_default();
            if log.contains(READY_LINE) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                return Err(ClusterError::NotReady {
                    process: node.process.name().to_owned(),
                    within,
                    log: node.process.log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The participant node running `service`.
    pub fn participant(&mut self, service: Service) -> &mut Node {
        self.participants
            .iter_mut()
            .find(|n| n.services().contains(&service))
            .expect("every service runs in some participant node")
    }

    /// Index of the participant node running `service`.
    pub fn participant_index(&self, service: Service) -> usize {
        self.participants
            .iter()
            .position(|n| n.services().contains(&service))
            .expect("every service runs in some participant node")
    }

    /// Every node, orchestrators first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.orchestrators.iter().chain(&self.participants)
    }

    /// Every node, mutably.
    pub fn nodes_mut(&mut self) -> impl Iterator<Item = &mut Node> {
        self.orchestrators.iter_mut().chain(&mut self.participants)
    }

    /// Heals every proxy.
    pub fn heal_all(&self) {
        for node in self.nodes() {
            node.heal();
        }
    }

    /// Restarts orchestrator `i` (killing it first if it runs) with `extra`
    /// environment for this run, and waits until it serves.
    pub async fn restart_orchestrator(
        &mut self,
        i: usize,
        extra: &[(&str, &str)],
    ) -> Result<Duration, ClusterError> {
        self.orchestrators[i].process.start_with(extra).await?;
        self.wait_orchestrator_ready(i, Duration::from_secs(60))
            .await
    }

    /// Restarts orchestrator `i` with `extra` environment meant to abort it
    /// (`FAILPOINTS`), without waiting for it to serve: under load it may
    /// reach its crash point before it ever reports SERVING (its relay
    /// republishes what the last crash left, at once).
    pub async fn restart_orchestrator_to_crash(
        &mut self,
        i: usize,
        extra: &[(&str, &str)],
    ) -> Result<(), ClusterError> {
        self.orchestrators[i].process.start_with(extra).await?;
        Ok(())
    }

    /// Restarts participant process `i` with `extra` environment for this
    /// run, and waits until it consumes.
    pub async fn restart_participants(
        &mut self,
        i: usize,
        extra: &[(&str, &str)],
    ) -> Result<Duration, ClusterError> {
        self.participants[i].process.start_with(extra).await?;
        self.wait_participants_ready(i, Duration::from_secs(60))
            .await
    }

    /// Starts an order saga on orchestrator `i` (version 0 = latest).
    pub async fn start_order(
        &self,
        i: usize,
        version: u32,
        input: String,
        idempotency_key: &str,
    ) -> Result<String, ClusterError> {
        let response = self
            .client(i)
            .start_saga(StartSagaRequest {
                saga_type: "order_placement".into(),
                input_json: input,
                idempotency_key: idempotency_key.to_owned(),
                definition_version: version,
            })
            .await?;
        Ok(response.into_inner().saga_id)
    }

    /// Sagas not yet terminal (running or compensating).
    pub async fn active_sagas(&self) -> Result<i64, ClusterError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM sagas WHERE status IN ('running', 'compensating')",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Saga counts by status.
    pub async fn status_counts(&self) -> Result<Vec<(String, i64)>, ClusterError> {
        Ok(
            sqlx::query_as("SELECT status, count(*) FROM sagas GROUP BY status ORDER BY status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Waits until no saga is running or compensating; panics with the
    /// stragglers after `within`.
    pub async fn wait_all_terminal(&self, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            match self.active_sagas().await {
                Ok(0) => return started.elapsed(),
                Ok(_) | Err(_) if started.elapsed() < within => {}
                other => {
                    let stuck: Vec<(uuid::Uuid, String, String)> = sqlx::query_as(
                        "SELECT id, status, state::text FROM sagas
                         WHERE status IN ('running', 'compensating') LIMIT 3",
                    )
                    .fetch_all(&self.pool)
                    .await
                    .unwrap_or_default();
                    panic!(
                        "sagas still active after {within:?} ({other:?}): {stuck:#?}\nlogs in {}",
                        self.log_dir().display()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Where this cluster's processes log.
    pub fn log_dir(&self) -> PathBuf {
        log_dir(&self.env.namespace)
    }

    /// Heals every proxy, then stops every process gracefully (participants
    /// first, so their last replies reach a live orchestrator), so nothing
    /// consumes any more when the broker is inspected.
    pub async fn stop_all(&mut self) {
        self.heal_all();
        for node in &mut self.participants {
            node.process.terminate(Duration::from_secs(15)).await;
        }
        for node in &mut self.orchestrators {
            node.process.terminate(Duration::from_secs(15)).await;
        }
    }

    /// Starts every process that is not running (crashed or killed), with
    /// its own environment, and waits until each is ready.
    pub async fn ensure_running(&mut self) -> Result<(), ClusterError> {
        for i in 0..self.orchestrators.len() {
            if !self.orchestrators[i].retired && !self.orchestrators[i].process.is_running() {
                self.restart_orchestrator(i, &[]).await?;
            }
        }
        for i in 0..self.participants.len() {
            if !self.participants[i].retired && !self.participants[i].process.is_running() {
                self.restart_participants(i, &[]).await?;
            }
        }
        Ok(())
    }

    /// The index of an orchestrator that is running (not retired).
    pub fn live_orchestrator(&mut self) -> Option<usize> {
        (0..self.orchestrators.len())
            .find(|&i| !self.orchestrators[i].retired && self.orchestrators[i].process.is_running())
    }

    /// What an operator does about FAILED sagas once the fault is gone:
    /// `RetrySaga` on each, then wait (bounded) until none is active, up to
    /// `rounds` times. Returns the ids retried (each once per round).
    pub async fn operator_retry_failed(&mut self, rounds: usize, within: Duration) -> Vec<String> {
        let mut retried = Vec::new();
        for _ in 0..rounds {
            let failed: Vec<uuid::Uuid> =
                sqlx::query_scalar("SELECT id FROM sagas WHERE status = 'failed'")
                    .fetch_all(&self.pool)
                    .await
                    .unwrap_or_default();
            if failed.is_empty() {
                break;
            }
            let Some(i) = self.live_orchestrator() else {
                break;
            };
            for id in failed {
                let request = saga_proto::v1::RetrySagaRequest {
                    saga_id: id.to_string(),
                };
                match self.client(i).retry_saga(request).await {
                    Ok(_) => retried.push(id.to_string()),
                    Err(status) => tracing::warn!(%id, %status, "operator retry refused"),
                }
            }
            self.wait_all_terminal(within).await;
        }
        retried
    }

    /// Ends a run: heals every proxy, restarts whatever is down, waits (at
    /// most `within`) until nothing is in flight, stops every process and
    /// runs the invariant checker. A run that did not settle is a
    /// violation too.
    pub async fn finish(&mut self, expectations: &Expectations, within: Duration) -> Report {
        self.heal_all();
        let mut restarted = self.ensure_running().await;
        let (mut seen, _) = wait_settled(&self.env, within).await;
        self.stop_all().await;
        // Without rabbitmqctl the settle cannot see messages a service held
        // unacknowledged (say, replies an orchestrator could not apply while
        // its database was away): they are back in their queue now. Give
        // the system one more round to process them before judging.
        if seen.is_settled() && queued_messages(&self.env).await > 0 {
            tracing::info!("messages came back to their queues at shutdown; one more round");
            restarted = restarted.and(self.ensure_running().await);
            seen = wait_settled(&self.env, within).await.0;
            self.stop_all().await;
        }
        let mut report = check(&self.env, expectations).await;
        if let Err(e) = restarted {
            report.violations.push(format!("could not restart: {e}"));
        }
        if !seen.is_settled() {
            report.violations.push(format!(
                "still in flight after {within:?}: {seen:?} (logs in {})",
                self.log_dir().display()
            ));
        }
        report
    }

    /// Scrapes counter `name` (summed over label sets) from node's
    /// Prometheus exporter; `None` if it does not answer.
    pub async fn metric(node: &Node, name: &str) -> Option<f64> {
        let text = scrape(node.metrics).await?;
        Some(sum_metric(&text, name))
    }
}

/// Fetches `/metrics` from a Prometheus exporter.
pub async fn scrape(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .ok()
        .flatten()
}

/// Sums every sample of `name` (any labels) in a Prometheus text page.
pub fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let page = "# TYPE x counter\nx{a=\"1\"} 2\nx{a=\"2\"} 3\nxy 7\nx 1\n";
        assert_eq!(sum_metric(page, "x"), 6.0);
        assert_eq!(sum_metric(page, "nope"), 0.0);
    }
}
