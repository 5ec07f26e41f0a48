//! A participant: what it serves (typed commands, an event subscription),
//! its migrations, and starting it. Starting opens its database and
//! spawns one consumer per queue: the command queue's pipeline is a
//! [`Decider`] (SQL) under a [`CommandService`] (AMQP); an event
//! subscription's is an [`EventRecorder`] under an [`EventService`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use saga_proto::amqp::{Phase, Topology};
use saga_proto::connect::broker::Broker;
use sagas::contract::{Action, Compensation, Contract};
use sagas::names::ParticipantName;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::database::{self, DatabaseError, PoolSettings};
use super::decide::Decider;
use super::decide::events::{self, ErasedEventHandler, EventHandler, EventRecorder};
use super::deliver::commands::CommandService;
use super::deliver::consumer::{self, ConsumerSettings, DeliveryHandler};
use super::deliver::events::EventService;
use super::faults::FaultInjector;
use super::handler::{ErasedHandler, Handler, HandlerWith, Route, erase, erase_with_state};
use super::stats::{Stats, StatsSnapshot};

/// Why a participant could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The participant's name is not usable in queue names and routing keys.
    #[error(transparent)]
    InvalidName(#[from] sagas::names::InvalidName),
    /// Nothing was registered: no command and no event subscription.
    #[error("participant {0} registers no command and subscribes to no event")]
    NothingToServe(String),
    /// A command name was registered twice.
    #[error("participant {participant} registers command {command} twice")]
    DuplicateCommand {
        /// The participant.
        participant: String,
        /// The command.
        command: String,
    },
    /// A contract of another participant was registered: its commands are
    /// routed to that participant's queue, never to this one.
    #[error(
        "participant {participant} registers {contract_participant}.{command}, a command of another participant"
    )]
    ForeignContract {
        /// The participant built.
        participant: String,
        /// The participant the contract names.
        contract_participant: String,
        /// The command.
        command: String,
    },
    /// Two event subscriptions were registered; a participant has one
    /// subscription queue.
    #[error("participant {0} subscribes to events twice")]
    DuplicateSubscription(String),
    /// The database could not be prepared.
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// The start-up hook failed.
    #[error("start-up of participant {participant} failed")]
    Setup {
        /// The participant.
        participant: String,
        /// What failed.
        #[source]
        source: sqlx::Error,
    },
    /// Shutdown was requested before the participant was running.
    #[error("shut down before participant {0} started")]
    ShutDown(String),
}

/// A start-up hook: runs once on the migrated pool before consuming
/// (e.g. seeding reference data).
pub type SetupHook = Arc<
    dyn Fn(PgPool) -> Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send>> + Send + Sync,
>;

/// An event subscription: routing keys and the handler.
#[derive(Clone)]
struct Subscription {
    /// Routing keys on `<ns>.events`, e.g. `order_placement.*`.
    binding_key: String,
    /// Records a batch of events.
    handler: ErasedEventHandler,
}

/// Registers what a participant serves. See [`Participant::builder`].
pub struct ParticipantBuilder {
    /// Participant name: routing key and queue suffix.
    name: String,
    /// Command name → handler.
    routes: BTreeMap<String, Route>,
    /// Its lifecycle-event subscription, if any.
    subscription: Option<Subscription>,
    /// First registration error, reported by `build` (builder methods
    /// returning `Result` would break the chain).
    refused: Option<KitError>,
    /// The service's own migrations (versions ≥ 1000).
    migrations: Option<Migrator>,
    /// Runs after migrations, before consuming.
    setup: Option<SetupHook>,
}

impl std::fmt::Debug for ParticipantBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticipantBuilder")
            .field("name", &self.name)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl ParticipantBuilder {
    fn register<C: Contract>(mut self, phase: Phase, handler: ErasedHandler) -> Self {
        let refusal = if C::PARTICIPANT != self.name {
            Some(KitError::ForeignContract {
                participant: self.name.clone(),
                contract_participant: C::PARTICIPANT.to_owned(),
                command: C::COMMAND.to_owned(),
            })
        } else {
            let route = Route { phase, handler };
            self.routes
                .insert(C::COMMAND.to_owned(), route)
                .map(|_| KitError::DuplicateCommand {
                    participant: self.name.clone(),
                    command: C::COMMAND.to_owned(),
                })
        };
        if self.refused.is_none() {
            self.refused = refusal;
        }
        self
    }

    /// Serves the action `C` with `handler`: an `async fn(&Tx, Command<C::Payload>)
    /// -> Result<C::Reply, E>` with `E: Into<HandlerError>`. A payload that
    /// does not decode as `C::Payload` is rejected (final, remembered) with
    /// the failing field's path in the reason.
    ///
    /// ```
    /// use participants::kit::{Command, HandlerError, Participant, Tx};
    /// use sagas::flows::order_placement::contracts::orders::{Confirm, ConfirmPayload, Confirmed};
    ///
    /// async fn confirm(tx: &Tx, command: Command<ConfirmPayload>) -> Result<Confirmed, HandlerError> {
    ///     sqlx::query("INSERT INTO orders (order_id) VALUES ($1) ON CONFLICT DO NOTHING")
    ///         .bind(&command.payload.order_id)
    ///         .execute(tx)
    ///         .await?;
    ///     Ok(Confirmed { order_id: command.payload.order_id, status: "confirmed".into() })
    /// }
    ///
    /// let orders = Participant::builder("orders").action::<Confirm>(confirm).build()?;
    /// # Ok::<(), participants::kit::KitError>(())
    /// ```
    ///
    /// A handler whose payload or reply is not the contract's does not
    /// compile:
    ///
    /// ```compile_fail,E0271
    /// use participants::kit::{Command, HandlerError, Participant, Tx};
    /// use sagas::flows::order_placement::contracts::{inventory::ReservePayload, orders::{Confirm, Confirmed}};
    ///
    /// async fn confirm(tx: &Tx, command: Command<ReservePayload>) -> Result<Confirmed, HandlerError> {
    ///     Ok(Confirmed { order_id: command.payload.order_id, status: "confirmed".into() })
    /// }
    ///
    /// let orders = Participant::builder("orders").action::<Confirm>(confirm);
    /// ```
    pub fn action<C: Action>(
        self,
        handler: impl for<'a> Handler<'a, C::Payload, Reply = C::Reply>,
    ) -> Self {
        self.register::<C>(Phase::Action, erase(handler))
    }

    /// Serves the compensation `C` with `handler` (same shape as
    /// [`action`](Self::action)). The kit only runs it when the action it
    /// undoes (the command's `compensates` key) succeeded here and was not
    /// compensated yet; otherwise it answers success without calling it.
    pub fn compensation<C: Compensation>(
        self,
        handler: impl for<'a> Handler<'a, C::Payload, Reply = C::Reply>,
    ) -> Self {
        self.register::<C>(Phase::Compensation, erase(handler))
    }

    /// Serves the action `C` with a handler that also gets `state` (shared
    /// by every call): an `async fn(&S, &Tx, Command<C::Payload>) ->
    /// Result<C::Reply, E>`. For what a handler needs beside its
    /// transaction: a client of another system, settings, a cache.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use participants::kit::{Command, HandlerError, Participant, Tx};
    /// use sagas::flows::order_placement::contracts::orders::{Confirm, ConfirmPayload, Confirmed};
    ///
    /// struct Limits { max_total_cents: u64 }
    ///
    /// async fn confirm(limits: &Limits, tx: &Tx, command: Command<ConfirmPayload>) -> Result<Confirmed, HandlerError> {
    ///     if command.payload.total_cents > limits.max_total_cents {
    ///         return Err(HandlerError::rejected("total_cents: above the limit"));
    ///     }
    ///     sqlx::query("INSERT INTO orders (order_id) VALUES ($1) ON CONFLICT DO NOTHING")
    ///         .bind(&command.payload.order_id)
    ///         .execute(tx)
    ///         .await?;
    ///     Ok(Confirmed { order_id: command.payload.order_id, status: "confirmed".into() })
    /// }
    ///
    /// let limits = Arc::new(Limits { max_total_cents: 1_000_000 });
    /// let orders = Participant::builder("orders").action_with::<Confirm, _>(limits, confirm).build()?;
    /// # Ok::<(), participants::kit::KitError>(())
    /// ```
    pub fn action_with<C: Action, S: Send + Sync + 'static>(
        self,
        state: Arc<S>,
        handler: impl for<'a> HandlerWith<'a, S, C::Payload, Reply = C::Reply>,
    ) -> Self {
        self.register::<C>(Phase::Action, erase_with_state(state, handler))
    }

    /// Serves the compensation `C` with a handler that also gets `state`
    /// (see [`action_with`](Self::action_with) and
    /// [`compensation`](Self::compensation)).
    pub fn compensation_with<C: Compensation, S: Send + Sync + 'static>(
        self,
        state: Arc<S>,
        handler: impl for<'a> HandlerWith<'a, S, C::Payload, Reply = C::Reply>,
    ) -> Self {
        self.register::<C>(Phase::Compensation, erase_with_state(state, handler))
    }

    /// Subscribes to saga lifecycle events whose routing key
    /// (`<saga_type>.<state>`) matches `binding_key` (e.g.
    /// `order_placement.*`), on the queue `<ns>.<name>.lifecycle`.
    /// `handler` is an `async fn(&Tx, &[LifecycleEvent]) -> Result<u64, E>`
    /// returning how many events were new to it; it must de-duplicate
    /// (a unique key per event), since events can be delivered again.
    pub fn subscribe(mut self, binding_key: &str, handler: impl for<'a> EventHandler<'a>) -> Self {
        let subscription = Subscription {
            binding_key: binding_key.to_owned(),
            handler: events::erase(handler),
        };
        if self.subscription.replace(subscription).is_some() && self.refused.is_none() {
            self.refused = Some(KitError::DuplicateSubscription(self.name.clone()));
        }
        self
    }

    /// The service's migrations (`sqlx::migrate!("migrations/<svc>")`),
    /// applied after the kit's; their versions must be ≥ 1000.
    pub fn migrations(mut self, migrations: Migrator) -> Self {
        self.migrations = Some(migrations);
        self
    }

    /// A hook run once on the migrated pool before consuming.
    pub fn setup<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(PgPool) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), sqlx::Error>> + Send + 'static,
    {
        self.setup = Some(Arc::new(move |pool| Box::pin(hook(pool))));
        self
    }

    /// Checks the registration.
    pub fn build(self) -> Result<Participant, KitError> {
        let name = ParticipantName::new(self.name)?;
        if let Some(refused) = self.refused {
            return Err(refused);
        }
        if self.routes.is_empty() && self.subscription.is_none() {
            return Err(KitError::NothingToServe(name.into()));
        }
        Ok(Participant {
            name,
            routes: Arc::new(self.routes),
            subscription: self.subscription,
            migrations: self.migrations,
            setup: self.setup,
        })
    }
}

/// Where and how a participant runs.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// RabbitMQ, with its TLS settings.
    pub broker: Broker,
    /// Namespace of every exchange and queue name.
    pub topology: Topology,
    /// The participant's own database (created if missing).
    pub database: PgConnectOptions,
    /// Pool sizing.
    pub pool: PoolSettings,
    /// Most unacknowledged deliveries the broker pushes at once.
    pub prefetch: u16,
    /// Most batches handled at once (each holds a pooled connection for its
    /// transaction).
    pub concurrency: usize,
    /// Most commands answered in one transaction: a batch takes the
    /// deliveries already pushed by the broker, so under light load it is
    /// one command and under heavy load one commit answers many.
    pub max_batch: usize,
    /// How often the relay looks for replies left in the outbox.
    pub relay_interval: Duration,
    /// Fault injection; share one injector across a process's participants.
    pub faults: Arc<FaultInjector>,
}

impl ParticipantConfig {
    /// Defaults for everything but the addresses: prefetch 16, concurrency
    /// 4, batches of up to 16, pool of 5, relay every second, no faults.
    pub fn new(broker: Broker, topology: Topology, database: PgConnectOptions) -> Self {
        Self {
            broker,
            topology,
            database,
            pool: PoolSettings::default(),
            prefetch: 16,
            concurrency: 4,
            max_batch: 16,
            relay_interval: Duration::from_secs(1),
            faults: FaultInjector::none(),
        }
    }
}

/// A participant ready to start: name, handlers, migrations.
pub struct Participant {
    /// Participant name.
    name: ParticipantName,
    /// Command name → handler (empty for a pure event subscriber).
    routes: Arc<BTreeMap<String, Route>>,
    /// Its event subscription, if any.
    subscription: Option<Subscription>,
    /// Service migrations.
    migrations: Option<Migrator>,
    /// Start-up hook.
    setup: Option<SetupHook>,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.name)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl Participant {
    /// Starts registering what participant `name` serves.
    pub fn builder(name: &str) -> ParticipantBuilder {
        ParticipantBuilder {
            name: name.to_owned(),
            routes: BTreeMap::new(),
            subscription: None,
            refused: None,
            migrations: None,
            setup: None,
        }
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// Opens (creates, migrates) the database, waiting for PostgreSQL with
    /// backoff, runs the setup hook, then spawns a consumer for its command
    /// queue and one for its event subscription (whichever it has).
    /// Returns once they are spawned; use [`ParticipantHandle::ready`] to
    /// wait until they are registered with the broker. Runs until
    /// `shutdown`.
    pub async fn start(
        self,
        config: ParticipantConfig,
        shutdown: CancellationToken,
    ) -> Result<ParticipantHandle, KitError> {
        let database = database::open(
            config.database.clone(),
            &config.pool,
            self.migrations,
            &shutdown,
        )
        .await?
        .ok_or_else(|| KitError::ShutDown(self.name.to_string()))?;
        let pool = database.pool.clone();
        if let Some(setup) = &self.setup {
            setup(pool.clone())
                .await
                .map_err(|source| KitError::Setup {
                    participant: self.name.to_string(),
                    source,
                })?;
        }
        crate::kit::stats::register(&self.name);
        let stats = Arc::new(Stats::default());
        let settings = ConsumerSettings {
            broker: config.broker.clone(),
            prefetch: config.prefetch,
            concurrency: config.concurrency,
            max_batch: config.max_batch,
        };
        let mut consumers = Vec::new();
        if !self.routes.is_empty() {
            let decider = Decider::new(
                self.name.to_string(),
                self.routes,
                database.clone(),
                config.pool.deadline,
                config.faults.clone(),
                stats.clone(),
            );
            let service = CommandService::new(
                self.name.to_string(),
                config.topology.clone(),
                decider,
                config.faults.clone(),
                stats.clone(),
                config.relay_interval,
                Some(config.broker.user().to_owned()).filter(|u| !u.is_empty()),
            );
            consumers.push(spawn_consumer(
                Arc::new(service),
                settings.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(subscription) = self.subscription {
            let recorder = EventRecorder::new(
                self.name.to_string(),
                database.clone(),
                config.pool.deadline,
                subscription.handler,
                stats.clone(),
            );
            let service = EventService::new(
                self.name.to_string(),
                config.topology.clone(),
                subscription.binding_key,
                recorder,
                stats.clone(),
            );
            consumers.push(spawn_consumer(Arc::new(service), settings, shutdown));
        }
        Ok(ParticipantHandle::new(
            self.name.into(),
            consumers,
            pool,
            stats,
        ))
    }
}

/// Spawns the consumer loop of one queue: its readiness and its task.
fn spawn_consumer<H: DeliveryHandler>(
    handler: Arc<H>,
    settings: ConsumerSettings,
    shutdown: CancellationToken,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (ready_tx, ready) = watch::channel(false);
    let task = tokio::spawn(consumer::serve(handler, settings, shutdown, ready_tx));
    (ready, task)
}

/// A running participant.
#[derive(Debug)]
pub struct ParticipantHandle {
    /// Participant name.
    name: String,
    /// Its database pool (closed when the participant stops).
    pool: PgPool,
    /// What it did so far.
    stats: Arc<Stats>,
    /// One per queue consumed: true once consuming.
    ready: Vec<watch::Receiver<bool>>,
    /// Ends once every consumer stopped and the pool is closed.
    task: JoinHandle<()>,
}

impl ParticipantHandle {
    fn new(
        name: String,
        consumers: Vec<(watch::Receiver<bool>, JoinHandle<()>)>,
        pool: PgPool,
        stats: Arc<Stats>,
    ) -> Self {
        let (ready, tasks): (Vec<_>, Vec<_>) = consumers.into_iter().unzip();
        let task_pool = pool.clone();
        let task_name = name.clone();
        let task = tokio::spawn(async move {
            for result in futures::future::join_all(tasks).await {
                if let Err(e) = result {
                    tracing::error!(participant = %task_name, error = %e, "participant consumer failed");
                }
            }
            task_pool.close().await;
        });
        Self {
            name,
            pool,
            stats,
            ready,
            task,
        }
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its database pool (to inspect its tables).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Counters of what it did.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Waits until each of its queues is declared and consumed from: `true`
    /// then, `false` if it stopped (shutdown) without ever consuming. While
    /// the broker is unreachable this keeps waiting, so bound it with a
    /// timeout where that matters.
    pub async fn ready(&mut self) -> bool {
        for ready in &mut self.ready {
            if ready.wait_for(|ready| *ready).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Waits until it stopped (after shutdown: in-hand work finished,
    /// outbox flushed, connections closed).
    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            tracing::error!(participant = %self.name, error = %e, "participant task failed");
        }
    }
}
