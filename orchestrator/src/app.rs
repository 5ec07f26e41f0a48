//! Wires the orchestrator together and runs it until shutdown: the
//! embedding API.
//!
//! A service of one's own runs the orchestrator with its own flows:
//!
//! ```no_run
//! # async fn serve(config: orchestrator::Config, my_flows: Vec<sagas::Flow>) -> Result<(), orchestrator::StartupError> {
//! use orchestrator::Orchestrator;
//! use tokio_util::sync::CancellationToken;
//!
//! let shutdown = CancellationToken::new();
//! Orchestrator::builder(config)
//!     .flows(sagas::flows::order_placement::definitions())
//!     .flows(my_flows)
//!     .run(shutdown)
//!     .await
//! # }
//! ```
//!
//! [`OrchestratorBuilder::start`] connects to PostgreSQL (creating the database and
//! applying migrations), binds the gRPC listener (port 0 in tests; the real
//! port is reported), and starts every task on a shared
//! [`CancellationToken`]. [`Application::run_until_stopped`] waits for the
//! token, then for every task to finish what it holds: the gRPC server stops
//! taking calls, the reply consumer finishes and acknowledges its batch, the
//! publisher flushes and awaits its confirms.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use saga_proto::v1::{FILE_DESCRIPTOR_SET, saga_service_server::SagaServiceServer};
use sagas::{Catalog, CatalogError, Flow, errors::Chain};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::ServingStatus;

use crate::{
    admission::Admission,
    after_commit::AfterCommit,
    api::SagaApi,
    bus::{self, BusSettings, publisher},
    cache::SagaCache,
    config::Config,
    engine::Engine,
    health::Health,
    messages::Envelopes,
    relay,
    security::{self, ApiSecurity, AuthLayer, SecurityError, size_limit::SizeLimitLayer},
    store::{Store, StoreError},
    timers::{self, TimerSettings, TimerWakeups},
    watch::WatchHub,
};

/// Largest gRPC request accepted (bigger ones get RESOURCE_EXHAUSTED).
pub const MAX_GRPC_MESSAGE_BYTES: usize = 1024 * 1024;

/// Why the orchestrator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// PostgreSQL could not be reached or migrated.
    #[error("cannot prepare the PostgreSQL database")]
    Database(#[from] StoreError),
    /// The gRPC address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Running sagas need a flow version this build does not have.
    #[error("running sagas need flow versions this orchestrator does not have: {0}")]
    MissingFlows(String),
    /// The metrics exporter could not start.
    #[error("cannot start the metrics exporter: {0}")]
    Metrics(String),
    /// A flow version was registered twice.
    #[error("cannot register the flows")]
    Flows(#[source] CatalogError),
    /// No flow was registered: the orchestrator would refuse every start.
    #[error("no flows registered: add some with OrchestratorBuilder::flows")]
    NoFlows,
    /// The RabbitMQ settings (URL, TLS files) cannot be used.
    #[error("cannot use the RabbitMQ settings")]
    Broker(#[from] saga_proto::connect::broker::BrokerError),
    /// RabbitMQ refused the TLS handshake or presented a certificate that
    /// does not verify: retrying cannot cure it.
    #[error(transparent)]
    BrokerTls(#[from] bus::BrokerTlsError),
    /// A secret file cannot be used.
    #[error(transparent)]
    SecretFile(#[from] saga_proto::connect::FileError),
    /// The API's TLS or access settings are wrong, or would expose it.
    #[error("cannot secure the gRPC API")]
    Security(#[from] SecurityError),
}

/// The entry point of the embedding API: [`Orchestrator::builder`].
#[derive(Debug)]
pub struct Orchestrator;

impl Orchestrator {
    /// Starts describing an orchestrator that runs with `config` (a
    /// [`Config`] flattened into the service's own command line, or built
    /// with [`Config::from_args`]). Add the flows it runs with
    /// [`OrchestratorBuilder::flows`].
    pub fn builder(config: Config) -> OrchestratorBuilder {
        OrchestratorBuilder {
            config,
            catalog: Catalog::new(),
            duplicate: None,
        }
    }
}

/// The flows and settings of an orchestrator about to start.
#[derive(Debug)]
pub struct OrchestratorBuilder {
    /// Addresses, pool and batch sizes, logging, metrics.
    config: Config,
    /// Every flow version it runs.
    catalog: Catalog,
    /// The first flow version registered twice, reported at start (a
    /// builder method returning `Result` would break the chain).
    duplicate: Option<CatalogError>,
}

impl OrchestratorBuilder {
    /// Adds flow versions (several versions of one flow live side by side;
    /// a running saga keeps the version it started with).
    pub fn flows(mut self, flows: impl IntoIterator<Item = Flow>) -> Self {
        for flow in flows {
            if let Err(e) = self.catalog.register(flow) {
                self.duplicate.get_or_insert(e);
            }
        }
        self
    }

    /// Connects to PostgreSQL (creating the database and applying the
    /// migrations), refuses to start when running sagas need a flow version
    /// that is not registered, binds the gRPC listener and starts every
    /// task. Returns the running orchestrator; cancelling `shutdown` stops
    /// it gracefully.
    pub async fn start(self, shutdown: CancellationToken) -> Result<Application, StartupError> {
        if let Some(duplicate) = self.duplicate {
            return Err(StartupError::Flows(duplicate));
        }
        if self.catalog.is_empty() {
            return Err(StartupError::NoFlows);
        }
        Application::build(self.config, self.catalog, shutdown).await
    }

    /// [`start`](Self::start)s, then runs until `shutdown` is cancelled and
    /// every task has finished what it holds.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartupError> {
        self.start(shutdown).await?.run_until_stopped().await;
        Ok(())
    }
}

/// A running orchestrator.
#[derive(Debug)]
pub struct Application {
    /// Where the gRPC API listens.
    grpc_addr: SocketAddr,
    /// Where the console listens, when it is on.
    http_addr: Option<SocketAddr>,
    /// Stops everything.
    shutdown: CancellationToken,
    /// Every background task.
    tasks: TaskTracker,
    /// The engine (for tests and the dev runner).
    engine: Arc<Engine>,
    /// Dependency health.
    health: Health,
    /// SIGHUP reloads of the access and TLS files done so far.
    security_reloads: Arc<std::sync::atomic::AtomicU64>,
}

impl Application {
    /// Connects, migrates, binds and starts every task (what
    /// [`OrchestratorBuilder::start`] does once the flows are checked).
    pub async fn build(
        config: Config,
        catalog: Catalog,
        shutdown: CancellationToken,
    ) -> Result<Self, StartupError> {
        // Checked first: a wrong file or an exposed, open listener stops the
        // start before anything is connected to or written.
        let security = ApiSecurity::from_config(&config)?;
        let database_url = config.database_url()?;
        let broker = config.broker.broker()?;
        let broker_shown = broker.to_string();
        if broker.is_tls() {
            bus::check_tls(&broker).await?;
        }
        if let Some(addr) = config.metrics_addr {
            saga_proto::telemetry::prometheus::install(addr)
                .map_err(|e| StartupError::Metrics(Chain(&e).to_string()))?;
        }
        let connect = || Store::connect(&database_url, config.db_max_connections);
        let store = connect
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_total_delay(Some(Duration::from_secs(60))),
            )
            // A wrong URL or a TLS refusal (a certificate of another CA or
            // for another host) will not cure itself: stop at once.
            .when(|error: &StoreError| !error.cannot_heal())
            .notify(|error: &StoreError, delay| tracing::warn!(error = %Chain(error), ?delay, "database not ready; retrying"))
            .await?;
        check_flows(&store, &catalog).await?;
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: config.grpc_addr,
                source,
            })?;
        let grpc_addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: config.grpc_addr,
            source,
        })?;
        let console_listener = match config.http_addr {
            None => None,
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartupError::Bind { addr, source })?,
            ),
        };
        let http_addr = console_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .map_err(|source| StartupError::Bind {
                addr: config.http_addr.unwrap_or(config.grpc_addr),
                source,
            })?;

        let health = Health::new();
        health.set_database(true);
        let (publisher, outgoing) = publisher::channel(65_536);
        let wakeups = TimerWakeups::default();
        let topology = config.topology();
        let hub = WatchHub::new();
        let admission = Admission::new(
            config.admission,
            config.max_in_flight,
            Duration::from_millis(u64::from(config.admission_target_ms)),
        );
        let after_commit = AfterCommit::new(
            SagaCache::new(SagaCache::DEFAULT_CAPACITY),
            publisher.clone(),
            hub.clone(),
            wakeups.clone(),
            admission.clone(),
        );
        let catalog = Arc::new(catalog);
        crate::telemetry::metrics::register(&catalog);
        let engine = Arc::new(Engine::new(
            store.clone(),
            catalog.clone(),
            Envelopes::new(topology.clone()),
            after_commit,
            health.clone(),
        ));
        let kick = relay::Kick::default();
        let tasks = TaskTracker::new();

        let dead_letters =
            bus::dead_letters::DeadLetterQueue::new(broker.clone(), topology.clone());
        tasks.spawn(bus::run(
            BusSettings {
                broker,
                topology,
                prefetch: config.reply_prefetch,
                max_batch: usize::from(config.reply_batch),
                workers: usize::from(config.reply_workers),
                queue_type: config.queue_type,
                senders: config.verify_reply_sender.then(|| {
                    Arc::new(bus::senders::ReplySenders::new(
                        config.reply_senders.iter().cloned(),
                    ))
                }),
            },
            engine.clone(),
            outgoing,
            health.clone(),
            kick.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(timers::run(
            engine.clone(),
            wakeups,
            TimerSettings::default(),
            shutdown.clone(),
        ));
        tasks.spawn(relay::run(
            store.clone(),
            publisher,
            health.clone(),
            kick,
            Duration::from_secs(1),
            shutdown.clone(),
        ));
        tasks.spawn(hub.clone().run(store.pool().clone(), shutdown.clone()));
        tasks.spawn(admission.run(store.clone(), shutdown.clone()));
        if let crate::config::Retention(Some(keep)) = config.retention {
            tasks.spawn(crate::retention::run(
                store.clone(),
                crate::retention::RetentionSettings {
                    keep,
                    interval: config.retention_interval,
                },
                shutdown.clone(),
            ));
        }
        tasks.spawn(crate::telemetry::gauges::run(
            store.clone(),
            catalog,
            shutdown.clone(),
        ));
        tasks.spawn(probe_database(
            store.clone(),
            health.clone(),
            shutdown.clone(),
        ));

        let (reporter, health_service) = tonic_health::server::health_reporter();
        tasks.spawn(mirror_health(health.clone(), reporter, shutdown.clone()));
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // v1alpha too: older grpcurl, Postman and grpcio-reflection speak
        // only that.
        let reflection_v1 = reflection()
            .build_v1()
            .expect("embedded descriptor sets are valid");
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .expect("embedded descriptor sets are valid");
        let saga_api = SagaApi::new(engine.clone(), store.clone(), hub, dead_letters.clone());
        if let Some(listener) = console_listener {
            let console = crate::console::Console::new(
                saga_api.clone(),
                store.clone(),
                security.access.clone(),
                dead_letters,
                security.tls.is_some(),
            );
            let server = crate::console::serve(
                listener,
                security.tls.clone(),
                crate::console::router(console),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                if let Err(error) = server.await {
                    tracing::error!(error = %Chain(&error), "console server failed");
                }
            });
        }
        let api =
            SagaServiceServer::new(saga_api).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        let router = tonic::transport::Server::builder()
            .layer(SizeLimitLayer::new(MAX_GRPC_MESSAGE_BYTES))
            .layer(AuthLayer::new(security.access.clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(api);
        let stopped = shutdown.clone().cancelled_owned();
        let server: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match &security.tls {
            Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
                security::tls::incoming(listener, tls.clone(), shutdown.clone()),
                stopped,
            )),
            None => Box::pin(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped),
            ),
        };
        tasks.spawn(async move {
            if let Err(error) = server.await {
                tracing::error!(error = %Chain(&error), "gRPC server failed");
            }
        });
        let tls = security.tls.is_some();
        let auth = security.access.is_on();
        let security_reloads = security.reloads();
        tasks.spawn(security.run(shutdown.clone()));
        tasks.close();
        tracing::info!(
            %grpc_addr,
            console = ?http_addr,
            tls,
            auth,
            postgres = %saga_proto::connect::redact(&database_url),
            rabbitmq = %broker_shown,
            namespace = %config.namespace,
            "orchestrator started"
        );
        Ok(Self {
            grpc_addr,
            http_addr,
            shutdown,
            tasks,
            engine,
            health,
            security_reloads,
        })
    }

    /// Counts the SIGHUP reloads of the access file and TLS files that
    /// have finished (a test waits on it after sending one).
    pub fn security_reloads(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.security_reloads.clone()
    }

    /// Where the gRPC API listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where the console listens (`None` when `--http-addr` is unset).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Dependency health.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Cancelling this stops the orchestrator gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for the shutdown token, then for every task to finish.
    pub async fn run_until_stopped(self) {
        self.shutdown.cancelled().await;
        tracing::info!("shutting down: finishing work in hand");
        self.tasks.wait().await;
        self.engine.store().close().await;
        tracing::info!("orchestrator stopped");
    }
}

/// Refuses to start when running sagas need a flow version that is gone:
/// they could never finish.
async fn check_flows(store: &Store, catalog: &Catalog) -> Result<(), StartupError> {
    let missing: Vec<String> = store
        .flows_in_use()
        .await?
        .into_iter()
        .filter(|(name, version)| catalog.get(name, *version).is_err())
        .map(|(name, version)| format!("{name} v{version}"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StartupError::MissingFlows(missing.join(", ")))
    }
}

async fn probe_database(store: Store, health: Health, shutdown: CancellationToken) {
    loop {
        health.set_database(store.ping().await);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn mirror_health(
    health: Health,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut changes = health.subscribe();
    loop {
        let status = if health.is_serving() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter
            .set_service_status("saga.v1.SagaService", status)
            .await;
        tokio::select! {
            () = shutdown.cancelled() => {
                reporter.set_service_status("", ServingStatus::NotServing).await;
                return;
            }
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C: what a service's `main` passes
/// to [`OrchestratorBuilder::run`] (spawned beside it).
pub async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        // An address nothing listens on: the checks below must refuse
        // before anything is connected to.
        Config::from_args(["--database-url", "postgres://nobody@127.0.0.1:1/none"]).unwrap()
    }

    #[tokio::test]
    async fn a_builder_without_flows_or_with_a_version_twice_refuses_to_start_before_connecting() {
        let none = Orchestrator::builder(config())
            .start(CancellationToken::new())
            .await;
        assert!(matches!(none, Err(StartupError::NoFlows)), "{none:?}");

        let twice = Orchestrator::builder(config())
            .flows(sagas::flows::order_placement::definitions())
            .flows(sagas::flows::order_placement::definitions())
            .start(CancellationToken::new())
            .await;
        match twice {
            Err(StartupError::Flows(CatalogError::Duplicate { name, version })) => {
                assert_eq!((name.as_str(), version), ("order_placement", 1));
            }
            other => panic!("expected a duplicate flow, got {other:?}"),
        }
    }
}
