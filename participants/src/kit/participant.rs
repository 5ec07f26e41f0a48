//! A command-handling participant: registration, start-up, and the
//! per-batch pipeline (decode → inbox claims → barrier → handlers →
//! inbox + outbox → commit → publish with confirm → delete outbox rows →
//! ack), falling back to one command per transaction when a batch cannot
//! commit cleanly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::message::Delivery;
use lapin::{Acker, Channel};
use saga_proto::amqp::{CommandMessage, Phase, Topology, validate_name};
use serde::de::DeserializeOwned;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::barrier::{self, Barrier};
use super::cleaner::OutboxCleaner;
use super::consumer::{self, ConsumerSettings, DeliveryHandler, Settle};
use super::database::{self, DatabaseError, PoolSettings};
use super::faults::FaultInjector;
use super::handler::{Command, Handler, HandlerError, Outcome, Route, erase};
use super::inbox;
use super::outbox::{self, PendingReply, PublishError, Sweep};
use super::stats::{Stats, StatsSnapshot, bump};
use super::topology;

/// Why a participant could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The participant's name is not usable in queue names and routing keys.
    #[error(transparent)]
    InvalidName(#[from] saga_proto::amqp::InvalidName),
    /// No command was registered.
    #[error("participant {0} registers no command")]
    NoCommands(String),
    /// A command name was registered twice.
    #[error("participant {participant} registers command {command} twice")]
    DuplicateCommand {
        /// The participant.
        participant: String,
        /// The command.
        command: String,
    },
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

/// Registers a participant's commands. See [`Participant::builder`].
pub struct ParticipantBuilder {
    /// Participant name: routing key and queue suffix.
    name: String,
    /// Command name → handler.
    routes: BTreeMap<String, Route>,
    /// First duplicate registration, reported by `build`.
    duplicate: Option<String>,
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
    fn register<P, H>(mut self, command: &str, phase: Phase, handler: H) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        H: Handler<P>,
    {
        let route = Route {
            phase,
            handler: erase(handler),
        };
        if self.routes.insert(command.to_owned(), route).is_some() && self.duplicate.is_none() {
            self.duplicate = Some(command.to_owned());
        }
        self
    }

    /// Registers a forward action. Its payload is decoded into `P`; a
    /// payload that does not fit is rejected (final, remembered) with the
    /// failing field's path in the reason.
    pub fn action<P, H>(self, command: &str, handler: H) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        H: Handler<P>,
    {
        self.register(command, Phase::Action, handler)
    }

    /// Registers a compensation. The kit only runs it when the action it
    /// undoes (the command's `compensates` key) succeeded here and was not
    /// compensated yet; otherwise it answers success without calling it.
    pub fn compensation<P, H>(self, command: &str, handler: H) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        H: Handler<P>,
    {
        self.register(command, Phase::Compensation, handler)
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
        validate_name(&self.name)?;
        if let Some(command) = self.duplicate {
            return Err(KitError::DuplicateCommand {
                participant: self.name,
                command,
            });
        }
        if self.routes.is_empty() {
            return Err(KitError::NoCommands(self.name));
        }
        Ok(Participant {
            name: self.name,
            routes: Arc::new(self.routes),
            migrations: self.migrations,
            setup: self.setup,
        })
    }
}

/// Where and how a participant runs.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// RabbitMQ URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub amqp_url: String,
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
    pub fn new(amqp_url: &str, topology: Topology, database: PgConnectOptions) -> Self {
        Self {
            amqp_url: amqp_url.to_owned(),
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
    name: String,
    /// Command name → handler.
    routes: Arc<BTreeMap<String, Route>>,
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
    /// Starts registering the commands of participant `name`.
    pub fn builder(name: &str) -> ParticipantBuilder {
        ParticipantBuilder {
            name: name.to_owned(),
            routes: BTreeMap::new(),
            duplicate: None,
            migrations: None,
            setup: None,
        }
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens (creates, migrates) the database, waiting for PostgreSQL with
    /// backoff, runs the setup hook, then spawns the consumer. Returns once
    /// the consumer task is spawned; use [`ParticipantHandle::ready`] to
    /// wait until it is registered with the broker. Runs until `shutdown`.
    pub async fn start(
        self,
        config: ParticipantConfig,
        shutdown: CancellationToken,
    ) -> Result<ParticipantHandle, KitError> {
        let pool = database::open(
            config.database.clone(),
            &config.pool,
            self.migrations,
            &shutdown,
        )
        .await?
        .ok_or_else(|| KitError::ShutDown(self.name.clone()))?;
        if let Some(setup) = &self.setup {
            setup(pool.clone())
                .await
                .map_err(|source| KitError::Setup {
                    participant: self.name.clone(),
                    source,
                })?;
        }
        let stats = Arc::new(Stats::default());
        let service = Arc::new(CommandService {
            name: self.name.clone(),
            topology: config.topology.clone(),
            routes: self.routes,
            pool: pool.clone(),
            faults: config.faults.clone(),
            stats: stats.clone(),
            relay_interval: config.relay_interval,
            cleaner: OutboxCleaner::spawn(pool.clone(), self.name.clone()),
        });
        Ok(ParticipantHandle::spawn(
            self.name,
            service,
            ConsumerSettings {
                amqp_url: config.amqp_url,
                prefetch: config.prefetch,
                concurrency: config.concurrency,
                max_batch: config.max_batch,
            },
            pool,
            stats,
            shutdown,
        ))
    }
}

/// A running participant (or event subscriber).
#[derive(Debug)]
pub struct ParticipantHandle {
    /// Participant name.
    name: String,
    /// Its database pool (closed when the participant stops).
    pool: PgPool,
    /// What it did so far.
    stats: Arc<Stats>,
    /// True once consuming.
    ready: watch::Receiver<bool>,
    /// The consumer task; ends after shutdown.
    task: JoinHandle<()>,
}

impl ParticipantHandle {
    pub(crate) fn spawn<H: DeliveryHandler>(
        name: String,
        handler: Arc<H>,
        settings: ConsumerSettings,
        pool: PgPool,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
    ) -> Self {
        let (ready_tx, ready) = watch::channel(false);
        let task_pool = pool.clone();
        let task = tokio::spawn(async move {
            consumer::serve(handler, settings, shutdown, ready_tx).await;
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

    /// Waits until its queue is declared and consumed from: `true` then,
    /// `false` if it stopped (shutdown) without ever consuming. While the
    /// broker is unreachable this keeps waiting, so bound it with a timeout
    /// where that matters.
    pub async fn ready(&mut self) -> bool {
        self.ready.wait_for(|ready| *ready).await.is_ok()
    }

    /// Waits until it stopped (after shutdown: in-hand work finished,
    /// outbox flushed, connections closed).
    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            tracing::error!(participant = %self.name, error = %e, "participant task failed");
        }
    }
}

/// The command pipeline of one participant.
struct CommandService {
    /// Participant name.
    name: String,
    /// Namespace.
    topology: Topology,
    /// Command name → handler.
    routes: Arc<BTreeMap<String, Route>>,
    /// Its own database.
    pool: PgPool,
    /// Fault injection.
    faults: Arc<FaultInjector>,
    /// Counters.
    stats: Arc<Stats>,
    /// Period of the relay.
    relay_interval: Duration,
    /// Deletes confirmed outbox rows in groups.
    cleaner: OutboxCleaner,
}

/// What the transaction decided for one command.
enum Decision {
    /// An outcome is committed (now or earlier); `pending` is `None` when
    /// the drop-reply fault swallowed the reply.
    Answered {
        /// The reply to publish, already in the outbox.
        pending: Option<PendingReply>,
        /// Whether the outcome came from the inbox (a duplicate).
        replay: bool,
    },
    /// Nothing was applied; tell the orchestrator to retry.
    Transient {
        /// The `transient_error` reply (not in the outbox: nothing to lose).
        pending: PendingReply,
    },
}

/// A decoded command in hand.
struct Incoming {
    /// Settles its delivery.
    acker: Acker,
    /// The command.
    message: Arc<CommandMessage>,
    /// Where its reply goes.
    reply_to: String,
}

/// Why a batch was rolled back to be decided one command at a time.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// A statement failed (including a deadlock with another batch).
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A handler failed.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// An action rejected after writing; only a rollback undoes it.
    #[error("an action rejected after writing")]
    RejectedAfterWriting,
    /// A key already taken had no stored outcome (cannot happen once the
    /// claim statement returned: a taken key is committed).
    #[error("a key already taken has no stored outcome")]
    NoStoredOutcome,
}

/// What running a command left in its transaction.
enum Executed {
    /// The transaction holds exactly the outcome's effects.
    Clean(Outcome),
    /// An action rejected; it ran without a savepoint, so whatever it wrote
    /// before deciding must be rolled back with the whole transaction.
    RejectedAfterWriting(String),
}

/// How many times a command that lost a deadlock is decided again.
const RACE_RETRIES: u32 = 3;

/// Whether `error` rolled the transaction back only because it lost a race
/// with another one (deadlock, serialization failure): trying again is safe
/// and expected to succeed.
fn lost_a_race(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// Most outbox rows one relay transaction claims.
const RELAY_BATCH: i64 = 100;

impl CommandService {
    async fn decide(
        &self,
        message: &Arc<CommandMessage>,
        reply_to: &str,
    ) -> Result<Decision, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !inbox::claim(&mut tx, message).await? {
            return self.replay(tx, message, reply_to).await;
        }
        let outcome = match self.execute(&mut tx, message).await {
            Ok(Executed::Clean(outcome)) => outcome,
            Ok(Executed::RejectedAfterWriting(reason)) => {
                // Actions run without a savepoint (two round trips fewer on
                // every success); a rejection instead rolls everything back
                // and records itself in a fresh transaction.
                tx.rollback().await?;
                tx = self.pool.begin().await?;
                if !inbox::claim(&mut tx, message).await? {
                    // A duplicate delivery claimed the key meanwhile.
                    return self.replay(tx, message, reply_to).await;
                }
                Outcome::Rejected(reason)
            }
            Err(HandlerError::Database(e)) if lost_a_race(&e) => {
                // A deadlock victim: nothing applied; the caller tries again.
                tx.rollback().await.ok();
                return Err(e);
            }
            Err(e) => {
                tx.rollback().await.ok();
                return Ok(self.transient(message, reply_to, e.to_string()));
            }
        };
        let pending = self
            .queue_reply(&mut tx, message, &outcome, reply_to, true)
            .await?;
        tx.commit().await?;
        match outcome {
            Outcome::Success(_) => bump(
                &self.stats.applied,
                &self.name,
                "participant_commands_applied_total",
                1,
            ),
            Outcome::Rejected(_) => bump(
                &self.stats.rejected,
                &self.name,
                "participant_commands_rejected_total",
                1,
            ),
        }
        Ok(Decision::Answered {
            pending,
            replay: false,
        })
    }

    /// Answers a key already claimed with its stored outcome.
    async fn replay(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        message: &Arc<CommandMessage>,
        reply_to: &str,
    ) -> Result<Decision, sqlx::Error> {
        let key = message.idempotency_key.as_str();
        let outcome = inbox::stored_outcomes(&mut tx, &[key])
            .await?
            .remove(key)
            .ok_or_else(|| sqlx::Error::RowNotFound)?;
        let pending = self
            .queue_reply(&mut tx, message, &outcome, reply_to, false)
            .await?;
        tx.commit().await?;
        bump(
            &self.stats.replayed,
            &self.name,
            "participant_commands_replayed_total",
            1,
        );
        Ok(Decision::Answered {
            pending,
            replay: true,
        })
    }

    fn transient(&self, message: &CommandMessage, reply_to: &str, reason: String) -> Decision {
        tracing::warn!(participant = %self.name, saga_id = %message.saga_id, key = %message.idempotency_key, %reason, "transient error");
        bump(
            &self.stats.transient,
            &self.name,
            "participant_commands_transient_total",
            1,
        );
        Decision::Transient {
            pending: PendingReply::new(reply_to, &inbox::transient_reply(message, reason)),
        }
    }

    /// Runs the command in the claimed transaction.
    async fn execute(
        &self,
        tx: &mut PgConnection,
        message: &Arc<CommandMessage>,
    ) -> Result<Executed, HandlerError> {
        let clean = |reason: String| Ok(Executed::Clean(Outcome::Rejected(reason)));
        if message.participant != self.name {
            return clean(format!(
                "command addressed to participant {:?} reached {:?}",
                message.participant, self.name
            ));
        }
        let Some(route) = self.routes.get(&message.command) else {
            let known: Vec<&str> = self.routes.keys().map(String::as_str).collect();
            return clean(format!(
                "unknown command {:?} for participant {}; known: {}",
                message.command,
                self.name,
                known.join(", ")
            ));
        };
        if route.phase != message.phase {
            return clean(format!(
                "command {} is registered as {}, received as {}",
                message.command,
                inbox::phase_name(route.phase),
                inbox::phase_name(message.phase)
            ));
        }
        if route.phase == Phase::Action {
            return Ok(match self.call(tx, route, message, None).await? {
                Outcome::Rejected(reason) => Executed::RejectedAfterWriting(reason),
                success => Executed::Clean(success),
            });
        }
        let Some(action_key) = message.compensates.as_deref() else {
            return clean("a compensation must name the action it undoes in `compensates`".into());
        };
        let noop = |why: &str| {
            bump(
                &self.stats.compensation_noops,
                &self.name,
                "participant_compensation_noops_total",
                1,
            );
            Outcome::Success(serde_json::json!({ "noop": why }))
        };
        Ok(Executed::Clean(
            match barrier::enter(tx, message, action_key).await? {
                Barrier::ActionNeverArrived => noop("action_never_arrived"),
                Barrier::AlreadyCompensated(_) => noop("already_compensated"),
                Barrier::ActionRejected => {
                    barrier::mark_compensated(tx, action_key, &message.idempotency_key).await?;
                    noop("action_rejected")
                }
                Barrier::Undo(action_data) => {
                    let outcome = self
                        .call_in_savepoint(tx, route, message, action_data)
                        .await?;
                    if matches!(outcome, Outcome::Success(_)) {
                        barrier::mark_compensated(tx, action_key, &message.idempotency_key).await?;
                    }
                    outcome
                }
            },
        ))
    }

    /// Calls a compensation handler inside a savepoint, so a rejection
    /// leaves no trace of what it wrote but keeps the barrier's reads.
    /// (Rejected compensations are rare; actions skip the savepoint.)
    async fn call_in_savepoint(
        &self,
        tx: &mut PgConnection,
        route: &Route,
        message: &Arc<CommandMessage>,
        action_data: serde_json::Value,
    ) -> Result<Outcome, HandlerError> {
        sqlx::query("SAVEPOINT kit_handler")
            .execute(&mut *tx)
            .await?;
        let outcome = self.call(tx, route, message, Some(action_data)).await?;
        let end = match outcome {
            Outcome::Success(_) => "RELEASE SAVEPOINT kit_handler",
            Outcome::Rejected(_) => "ROLLBACK TO SAVEPOINT kit_handler",
        };
        sqlx::query(end).execute(&mut *tx).await?;
        Ok(outcome)
    }

    /// Calls the handler (its payload decoding error is a rejection).
    async fn call(
        &self,
        tx: &mut PgConnection,
        route: &Route,
        message: &Arc<CommandMessage>,
        action_data: Option<serde_json::Value>,
    ) -> Result<Outcome, HandlerError> {
        let command = Command {
            message: message.clone(),
            payload: message.payload.clone(),
            action_data,
        };
        Ok(match (route.handler)(&mut *tx, command) {
            Ok(handling) => handling.await?,
            Err(reason) => Outcome::Rejected(reason),
        })
    }

    /// Writes the reply to `outcome` in the outbox; with `record_outcome`
    /// (a fresh claim, not a replay), also records the outcome in the
    /// command's inbox row (in the same statement).
    async fn queue_reply(
        &self,
        tx: &mut PgConnection,
        message: &CommandMessage,
        outcome: &Outcome,
        reply_to: &str,
        record_outcome: bool,
    ) -> Result<Option<PendingReply>, sqlx::Error> {
        let key = message.idempotency_key.as_str();
        if self.faults.drop_reply() {
            tracing::warn!(participant = %self.name, saga_id = %message.saga_id, key = %message.idempotency_key, "fault injection: dropping the reply");
            if record_outcome {
                inbox::complete(tx, key, outcome).await?;
            }
            return Ok(None);
        }
        let mut pending = PendingReply::new(reply_to, &inbox::reply(message, outcome));
        if record_outcome {
            outbox::insert_completing(tx, key, outcome, &mut pending).await?;
        } else {
            outbox::insert(tx, &mut pending).await?;
        }
        Ok(Some(pending))
    }

    /// Publishes with a few quick retries (e.g. the reply queue is being
    /// declared right now); on failure the outbox row stays for the relay.
    async fn publish(&self, publisher: &Channel, pending: &PendingReply) {
        let attempt = || outbox::publish(publisher, pending);
        let published = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(5),
            )
            // A failed channel stays failed; the relay retries on the next.
            .when(|e| !matches!(e, PublishError::Amqp(_) | PublishError::TimedOut(_)))
            .await;
        match published {
            Ok(()) => {
                bump(
                    &self.stats.replies_published,
                    &self.name,
                    "participant_replies_published_total",
                    1,
                );
                if let Some(id) = pending.outbox_id {
                    // Deleted with the other rows confirmed meanwhile.
                    self.cleaner.confirmed(id);
                }
            }
            Err(e) => {
                bump(
                    &self.stats.replies_deferred,
                    &self.name,
                    "participant_replies_deferred_total",
                    1,
                );
                tracing::warn!(participant = %self.name, saga_id = %pending.saga_id, error = %e, "reply not published; left to the relay");
                if let Some(id) = pending.outbox_id
                    && let Err(e) = outbox::defer(&self.pool, id, &e.to_string()).await
                {
                    // It still becomes due after the grace period.
                    tracing::warn!(participant = %self.name, outbox_id = id, error = %e, "could not hand a reply to the relay");
                }
            }
        }
    }

    /// Decodes a delivery; an undecodable one is dead-lettered (`None`).
    async fn accept(&self, delivery: Delivery) -> Option<Incoming> {
        let message: CommandMessage = match serde_json::from_slice(&delivery.data) {
            Ok(message) => message,
            Err(e) => {
                bump(
                    &self.stats.poison,
                    &self.name,
                    "participant_poison_messages_total",
                    1,
                );
                tracing::warn!(participant = %self.name, error = %e, bytes = delivery.data.len(), "undecodable command: dead-lettering it");
                if let Err(e) = consumer::settle(&delivery.acker, Settle::DeadLetter).await {
                    tracing::warn!(participant = %self.name, error = %e, "could not reject a poison message; it comes back");
                }
                return None;
            }
        };
        let reply_to = delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|q| q.as_str().to_owned())
            .filter(|q| !q.is_empty())
            .unwrap_or_else(|| self.topology.reply_queue());
        Some(Incoming {
            acker: delivery.acker,
            message: Arc::new(message),
            reply_to,
        })
    }

    /// Publishes a command's reply (if any) and acks its delivery.
    async fn finish(&self, publisher: &Channel, incoming: Incoming, pending: Option<PendingReply>) {
        if let Some(pending) = pending {
            self.publish(publisher, &pending).await;
            if self.faults.duplicate_reply() {
                tracing::warn!(participant = %self.name, saga_id = %incoming.message.saga_id, "fault injection: duplicating the reply");
                outbox::publish(publisher, &pending).await.ok();
            }
        }
        crate::crash_point!("participant::before_ack");
        if let Err(e) = consumer::settle(&incoming.acker, Settle::Ack).await {
            // The broker redelivers it; the inbox answers with the same reply.
            tracing::warn!(participant = %self.name, error = %e, "could not ack a command");
        }
    }

    /// Decides every command of a batch, in order: together in one
    /// transaction when there are several, alone otherwise. A batch that
    /// cannot finish cleanly (a rejection after writing, a handler or
    /// database error, a deadlock with another batch) is rolled back as a
    /// whole and its commands are decided one by one, so batching never
    /// changes an outcome. A command that repeats a key of the batch, and
    /// an action with its compensation both in the batch, are decided alone
    /// after the batch commits, in arrival order.
    async fn decide_all(&self, batch: &[Incoming]) -> Vec<Decision> {
        let mut keys = HashSet::with_capacity(batch.len());
        let (firsts, repeats): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| keys.insert(batch[i].message.idempotency_key.as_str()));
        // Actions compensated within the batch: the barrier must see each
        // pair in arrival order, one committed before the other.
        let undone: HashSet<&str> = firsts
            .iter()
            .filter_map(|&i| batch[i].message.compensates.as_deref())
            .filter(|action| keys.contains(action))
            .collect();
        let (together, mut after): (Vec<usize>, Vec<usize>) = firsts.into_iter().partition(|&i| {
            let message = &batch[i].message;
            !undone.contains(message.idempotency_key.as_str())
                && message
                    .compensates
                    .as_deref()
                    .is_none_or(|action| !undone.contains(action))
        });
        after.extend(repeats);
        let mut decisions: Vec<Option<Decision>> = batch.iter().map(|_| None).collect();
        if together.len() > 1 {
            match self.decide_together(batch, &together).await {
                Ok(decided) => {
                    for (i, decision) in together.iter().zip(decided) {
                        decisions[*i] = Some(decision);
                    }
                }
                Err(e) => {
                    bump(
                        &self.stats.batches_split,
                        &self.name,
                        "participant_batches_split_total",
                        1,
                    );
                    tracing::debug!(participant = %self.name, commands = together.len(), error = %e, "batch rolled back; deciding its commands one by one");
                    after.extend(together);
                }
            }
        } else {
            after.extend(together);
        }
        // Whatever is decided alone goes in arrival order.
        after.sort_unstable();
        for i in after {
            decisions[i] = Some(self.decide_alone(&batch[i]).await);
        }
        decisions
            .into_iter()
            .map(|d| d.expect("every command of the batch is decided"))
            .collect()
    }

    /// Decides one command in a transaction of its own. A deadlock victim
    /// (more likely now that batches hold many locks) is decided again, up
    /// to [`RACE_RETRIES`] times, rather than answered `transient_error`.
    async fn decide_alone(&self, incoming: &Incoming) -> Decision {
        let mut retries = 0;
        loop {
            match self.decide(&incoming.message, &incoming.reply_to).await {
                Ok(decision) => return decision,
                Err(e) if lost_a_race(&e) && retries < RACE_RETRIES => {
                    retries += 1;
                    tracing::debug!(participant = %self.name, key = %incoming.message.idempotency_key, error = %e, "deciding the command again");
                }
                Err(e) => {
                    return self.transient(
                        &incoming.message,
                        &incoming.reply_to,
                        format!("database error: {e}"),
                    );
                }
            }
        }
    }

    /// Decides the commands `which` of `batch` (distinct keys, none
    /// compensating another) in one transaction: one claim statement, the
    /// handlers in order, one statement recording every outcome and reply,
    /// one commit.
    async fn decide_together(
        &self,
        batch: &[Incoming],
        which: &[usize],
    ) -> Result<Vec<Decision>, BatchError> {
        let messages: Vec<&CommandMessage> = which.iter().map(|&i| &*batch[i].message).collect();
        let mut tx = self.pool.begin().await?;
        let claimed = inbox::claim_all(&mut tx, &messages).await?;
        let known: Vec<&str> = messages
            .iter()
            .map(|m| m.idempotency_key.as_str())
            .filter(|key| !claimed.contains(*key))
            .collect();
        let mut stored = if known.is_empty() {
            HashMap::new()
        } else {
            inbox::stored_outcomes(&mut tx, &known).await?
        };
        let mut outcomes = Vec::with_capacity(which.len());
        for &i in which {
            let message = &batch[i].message;
            let key = message.idempotency_key.as_str();
            outcomes.push(if claimed.contains(key) {
                match self.execute(&mut tx, message).await? {
                    Executed::Clean(outcome) => (outcome, true),
                    Executed::RejectedAfterWriting(_) => {
                        return Err(BatchError::RejectedAfterWriting);
                    }
                }
            } else {
                let outcome = stored.remove(key).ok_or(BatchError::NoStoredOutcome)?;
                (outcome, false)
            });
        }
        let mut replies = Vec::with_capacity(which.len());
        let mut positions = Vec::with_capacity(which.len());
        for (position, (&i, (outcome, fresh))) in which.iter().zip(&outcomes).enumerate() {
            let Incoming {
                message, reply_to, ..
            } = &batch[i];
            let key = message.idempotency_key.as_str();
            if self.faults.drop_reply() {
                tracing::warn!(participant = %self.name, saga_id = %message.saga_id, key, "fault injection: dropping the reply");
                if *fresh {
                    inbox::complete(&mut tx, key, outcome).await?;
                }
                continue;
            }
            replies.push(outbox::BatchReply {
                pending: PendingReply::new(reply_to, &inbox::reply(message, outcome)),
                completes: fresh.then_some((key, outcome)),
            });
            positions.push(position);
        }
        if !replies.is_empty() {
            outbox::insert_all(&mut tx, &mut replies).await?;
        }
        tx.commit().await?;
        let mut pending: Vec<Option<PendingReply>> = which.iter().map(|_| None).collect();
        for (position, reply) in positions.into_iter().zip(replies) {
            pending[position] = Some(reply.pending);
        }
        let count =
            |pick: fn(&(Outcome, bool)) -> bool| outcomes.iter().filter(|o| pick(o)).count() as u64;
        let applied = count(|(o, fresh)| *fresh && matches!(o, Outcome::Success(_)));
        let rejected = count(|(o, fresh)| *fresh && matches!(o, Outcome::Rejected(_)));
        let replayed = count(|(_, fresh)| !*fresh);
        for (counter, metric, by) in [
            (
                &self.stats.batched,
                "participant_commands_batched_total",
                which.len() as u64,
            ),
            (
                &self.stats.applied,
                "participant_commands_applied_total",
                applied,
            ),
            (
                &self.stats.rejected,
                "participant_commands_rejected_total",
                rejected,
            ),
            (
                &self.stats.replayed,
                "participant_commands_replayed_total",
                replayed,
            ),
        ] {
            if by > 0 {
                bump(counter, &self.name, metric, by);
            }
        }
        Ok(outcomes
            .into_iter()
            .zip(pending)
            .map(|((_, fresh), pending)| Decision::Answered {
                pending,
                replay: !fresh,
            })
            .collect())
    }

    async fn relay(&self, publisher: &Channel, sweep: Sweep) -> bool {
        loop {
            match outbox::relay_once(&self.pool, publisher, sweep, RELAY_BATCH).await {
                Ok((published, failed)) => {
                    if published > 0 {
                        tracing::info!(participant = %self.name, published, "relay published replies");
                        bump(
                            &self.stats.relayed,
                            &self.name,
                            "participant_replies_relayed_total",
                            published as u64,
                        );
                        bump(
                            &self.stats.replies_published,
                            &self.name,
                            "participant_replies_published_total",
                            published as u64,
                        );
                    }
                    if failed > 0 || published < RELAY_BATCH as usize {
                        return failed == 0;
                    }
                }
                Err(e) => {
                    tracing::warn!(participant = %self.name, error = %e, "relay pass failed");
                    return false;
                }
            }
        }
    }
}

impl DeliveryHandler for CommandService {
    fn name(&self) -> &str {
        &self.name
    }

    fn queue(&self) -> String {
        self.topology.participant_queue(&self.name)
    }

    async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        topology::declare_participant(channel, &self.topology, &self.name).await
    }

    async fn handle(
        self: Arc<Self>,
        deliveries: Vec<Delivery>,
        publisher: Channel,
        slot: OwnedSemaphorePermit,
    ) {
        self.faults.delay().await;
        let mut answered = Vec::with_capacity(deliveries.len());
        let mut to_decide = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let Some(incoming) = self.accept(delivery).await else {
                continue;
            };
            if self.faults.fail_command() {
                let decision = self.transient(
                    &incoming.message,
                    &incoming.reply_to,
                    "fault injection: failure".into(),
                );
                answered.push((incoming, decision));
            } else {
                to_decide.push(incoming);
            }
        }
        let decisions = self.decide_all(&to_decide).await;
        // The database work is done: the next batch may start while this
        // one publishes and acks.
        drop(slot);
        answered.extend(to_decide.into_iter().zip(decisions));
        let mut committed = false;
        for (incoming, decision) in &answered {
            if let Decision::Answered { replay, .. } = decision {
                tracing::debug!(participant = %self.name, saga_id = %incoming.message.saga_id, key = %incoming.message.idempotency_key, replay, "answered");
                self.faults.committed();
                committed = true;
            }
        }
        if committed {
            crate::crash_point!("participant::after_commit_before_reply");
        }
        let finishing = answered.into_iter().map(|(incoming, decision)| {
            let pending = match decision {
                Decision::Answered { pending, .. } => pending,
                Decision::Transient { pending } => Some(pending),
            };
            self.finish(&publisher, incoming, pending)
        });
        futures::future::join_all(finishing).await;
    }

    async fn background(
        self: Arc<Self>,
        publisher: Channel,
        stop: CancellationToken,
        _first: bool,
    ) {
        // Every publish of earlier sessions is finished by now, so all rows
        // but the confirmed ones still queued for deletion are fair game:
        // crash leftovers get out at once.
        self.cleaner.flush().await;
        self.relay(&publisher, Sweep::All).await;
        let mut ticks = tokio::time::interval(self.relay_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => { self.relay(&publisher, Sweep::Due).await; }
            }
        }
    }

    async fn drain(self: Arc<Self>, publisher: Channel) {
        self.cleaner.flush().await;
        if !self.relay(&publisher, Sweep::All).await {
            tracing::warn!(participant = %self.name, "replies remain in the outbox at shutdown; the relay sends them on the next start");
        }
    }
}
