//! PostgreSQL storage: one owner per table.
//!
//! - [`sagas`]: the `sagas` table (state, idempotency, listing, due timers).
//! - [`history`]: the append-only `saga_history` table and its NOTIFY channel.
//! - [`outbox`]: the `outbox` table (messages committed with the state that
//!   produced them, deleted after the broker's confirm).
//! - [`transition`]: the one statement that writes a transition's states,
//!   history and outbox rows together.
//!
//! The schema lives in `orchestrator/migrations` and is embedded in the
//! binary; [`Store::connect`] creates the database if it is missing and
//! applies the migrations.

pub mod activity;
pub mod console;
pub mod history;
pub mod outbox;
pub mod retention;
pub mod sagas;
pub mod transition;

use std::{sync::Arc, time::Duration};

use saga_proto::connect::silence::{self, Silence};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, postgres::PgPoolOptions};
use uuid::Uuid;

/// Longest wait for any statement or transaction of the orchestrator: past
/// it the database is taken for silent (a black-holed network answers
/// nothing, and nothing else would end the wait).
pub const DEADLINE: Duration = Duration::from_secs(5);
/// The server cancels a statement running longer than this, so that a
/// merely slow statement fails cleanly before the deadline gives up on its
/// connection.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(4);
/// The server ends a session idle inside a transaction for this long (its
/// client vanished): its row locks do not outlive it.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a pooled connection, or to open one.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the health probe's `SELECT 1`: longer than a wait for
/// a pooled connection, so that a busy pool is not taken for a silent
/// database.
pub const PING_DEADLINE: Duration = Duration::from_secs(3);

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or a statement failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// No answer within the deadline: the network or the server is silent.
    #[error(transparent)]
    Silent(#[from] silence::Silent),
    /// The URL cannot be used.
    #[error(transparent)]
    Url(#[from] saga_proto::connect::postgres::PostgresUrlError),
    /// The schema could not be brought up to date.
    #[error("database migration failed")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A stored status is not one the model knows (a bug or a manual edit).
    #[error("unknown saga status {0:?} in the database")]
    UnknownStatus(String),
    /// A stored saga state could not be decoded (a bug or a manual edit).
    #[error("saga {id}: stored state is unreadable")]
    CorruptState {
        /// The saga.
        id: uuid::Uuid,
        /// Why decoding failed.
        source: serde_json::Error,
    },
}

impl StoreError {
    /// Whether retrying cannot cure it: a URL that does not parse, or a
    /// TLS refusal (a certificate of another CA or for another host).
    pub fn cannot_heal(&self) -> bool {
        match self {
            StoreError::Url(_) => true,
            StoreError::Database(e) => saga_proto::connect::postgres::is_tls_error(e),
            _ => false,
        }
    }
}

/// The orchestrator's database.
#[derive(Debug, Clone)]
pub struct Store {
    /// Pooled connections; prepared statements are cached per connection.
    pool: PgPool,
    /// Confirmed outbox rows not deleted yet.
    confirmed: outbox::Confirmed,
    /// When the database was last silent (see [`Store::within`]).
    silence: Arc<Silence>,
}

/// Embedded schema migrations.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
    /// Connects to `url` with at most `max_connections`, creating the database
    /// if it does not exist, and applies the embedded migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = saga_proto::connect::postgres::connect_options(url)?;
        saga_proto::connect::postgres::ensure_database(&options).await?;
        let options = options
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1))
            // Every query of the orchestrator finds its rows through an
            // index. Without this, a prepared statement planned while
            // `sagas` was nearly empty (a new database, before the first
            // autoanalyze) keeps a sequential-scan plan as the table grows,
            // and every transition then reads every saga ever written.
            // The same few statements run for every saga: each is planned
            // once (generic plan), never again per call.
            .options([
                ("enable_seqscan", "off"),
                ("plan_cache_mode", "force_generic_plan"),
            ]);
        // Migrations may take long on a big table: they run on a connection
        // of their own, without the statement timeout.
        let mut migrating =
            tokio::time::timeout(ACQUIRE_TIMEOUT * 5, PgConnection::connect_with(&options))
                .await
                .map_err(|_| StoreError::Silent(silence::Silent(ACQUIRE_TIMEOUT * 5)))??;
        MIGRATOR.run(&mut migrating).await?;
        migrating.close().await.ok();
        let options =
            silence::server_timeouts(options, STATEMENT_TIMEOUT, IDLE_IN_TRANSACTION_TIMEOUT);
        let silence = Silence::new();
        let pool = silence
            .guard(PgPoolOptions::new())
            .max_connections(max_connections)
            .min_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            confirmed: outbox::Confirmed::default(),
            silence,
        })
    }

    /// Runs `work` (statements on this store's pool) under [`DEADLINE`]:
    /// a silent database ends it with [`StoreError::Silent`], and the
    /// connections opened before are replaced.
    pub async fn within<T, E: From<StoreError>>(
        &self,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.silence
            .within(DEADLINE, work)
            .await
            .map_err(|silent| E::from(StoreError::Silent(silent)))?
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Outbox rows the broker confirmed that are not deleted yet.
    pub fn confirmed(&self) -> &outbox::Confirmed {
        &self.confirmed
    }

    /// Whether the database answers right now.
    pub async fn ping(&self) -> bool {
        let ping = sqlx::query("SELECT 1").execute(&self.pool);
        self.silence.within_sqlx(PING_DEADLINE, ping).await.is_ok()
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Sagas matching `filter`, newest first, after `cursor`.
    pub async fn list_sagas(
        &self,
        filter: &sagas::SagaFilter,
        cursor: Option<sagas::Cursor>,
        limit: i64,
    ) -> Result<Vec<sagas::SagaRecord>, StoreError> {
        self.within(sagas::list(&self.pool, filter, cursor, limit))
            .await
    }

    /// Registers a `WatchSaga` stream, so transitions of the saga NOTIFY.
    pub async fn add_watcher(&self, saga_id: Uuid, watcher_id: Uuid) -> Result<(), StoreError> {
        self.within(history::watch(&self.pool, saga_id, watcher_id))
            .await
    }

    /// Removes a `WatchSaga` stream's registration.
    pub async fn remove_watcher(&self, saga_id: Uuid, watcher_id: Uuid) -> Result<(), StoreError> {
        self.within(history::unwatch(&self.pool, saga_id, watcher_id))
            .await
    }

    /// A saga's history rows after `after_seq`, in order.
    pub async fn history_since(
        &self,
        saga_id: Uuid,
        after_seq: i64,
    ) -> Result<Vec<history::HistoryRow>, StoreError> {
        self.within(history::since(&self.pool, saga_id, after_seq))
            .await
    }

    /// Leases up to `limit` outbox rows whose lease ran out (for the relay).
    pub async fn claim_expired_outbox(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        limit: i64,
    ) -> Result<Vec<outbox::OutboxMessage>, StoreError> {
        self.within(outbox::claim_expired(&self.pool, now, limit))
            .await
    }

    /// The (type, version) of every saga that can still move (running,
    /// compensating, or failed and retriable), so a start can refuse to run
    /// without the flow versions they need.
    pub async fn flows_in_use(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let rows: Vec<(String, i32)> = self
            .within(async {
                sqlx::query_as(
                    "SELECT DISTINCT saga_type, version FROM sagas WHERE status IN ('running', 'compensating', 'failed')",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::from)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(name, version)| (name, version as u32))
            .collect())
    }
}
