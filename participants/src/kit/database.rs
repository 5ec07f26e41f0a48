//! A participant's own database: created when missing, migrated with the
//! kit's tables plus the service's, reached through a small pool.

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use saga_proto::connect::silence::{self, Silence};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Migrations below this version belong to the kit; a service's start here.
pub const FIRST_SERVICE_MIGRATION: i64 = 1000;

/// Why a participant's database could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The connect options name no database.
    #[error("the database options name no database")]
    NoDatabaseName,
    /// A service migration used a version reserved for the kit.
    #[error(
        "service migration {0} uses a version below {FIRST_SERVICE_MIGRATION}, which the kit reserves"
    )]
    ReservedMigrationVersion(i64),
    /// PostgreSQL refused us for a reason retrying will not fix (bad
    /// credentials, missing privilege ...).
    #[error("cannot use database {database}")]
    Refused {
        /// Database we tried to reach.
        database: String,
        /// The refusal.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the migrations failed (e.g. an applied one was edited).
    #[error("migrating database {database}")]
    Migrate {
        /// Database being migrated.
        database: String,
        /// What failed.
        #[source]
        source: MigrateError,
    },
}

/// Sizing and timeouts of a participant's pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most connections held open; PostgreSQL's `max_connections` is shared
    /// by every service and parallel test, so keep it small.
    pub max_connections: u32,
    /// How long a command waits for a pooled connection before it is
    /// answered `transient_error`.
    pub acquire_timeout: Duration,
    /// Lock wait bound per statement: a concurrent duplicate waiting on the
    /// inbox key, or a hot stock row, turns into a transient error instead
    /// of holding a delivery forever.
    pub lock_timeout: Duration,
    /// Longest wait for one command's transaction (or a batch's), its wait
    /// for a pooled connection included (keep it well above
    /// `acquire_timeout` plus `lock_timeout`): past it the database is taken
    /// for silent, the command is left unanswered
    /// (its outcome is unknown; the orchestrator's timeout retries it) and
    /// the pool's older connections are replaced. The server cancels a
    /// statement after four fifths of it.
    pub deadline: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 5,
            acquire_timeout: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(20),
        }
    }
}

fn is_refusal(error: &sqlx::Error) -> bool {
    // Class 28: invalid authorization; 42501: insufficient privilege.
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code.starts_with("28") || code == "42501")
}

/// Creates the database named by `options` when it does not exist (the
/// one way every service does it: [`saga_proto::connect::postgres`]).
pub use saga_proto::connect::postgres::ensure_database;
use saga_proto::connect::postgres::quote_identifier;

/// Drops the database named by `options` if it exists, disconnecting its
/// users (for tests and tear-downs).
pub async fn drop_database(options: &PgConnectOptions) -> Result<(), sqlx::Error> {
    let name = options
        .get_database()
        .ok_or_else(|| sqlx::Error::Configuration("no database name".into()))?
        .to_owned();
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_identifier(&name)
    ))
    .execute(&mut admin)
    .await?;
    admin.close().await.ok();
    Ok(())
}

fn kit_migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("migrations/kit");
    // The service's migrations share the _sqlx_migrations table.
    migrator.set_ignore_missing(true);
    migrator
}

/// Runs the kit's migrations, then `service`'s (whose versions must be at
/// least [`FIRST_SERVICE_MIGRATION`]).
pub async fn migrate(pool: &PgPool, service: Option<Migrator>) -> Result<(), MigrateError> {
    kit_migrator().run(pool).await?;
    if let Some(mut service) = service {
        service.set_ignore_missing(true);
        service.run(pool).await?;
    }
    Ok(())
}

/// A participant's open database.
#[derive(Debug, Clone)]
pub struct Database {
    /// Its pool (guarded against silent networks: see
    /// [`saga_proto::connect::silence`]).
    pub pool: PgPool,
    /// When it was last silent; [`Silence::within`] bounds work on it.
    pub silence: Arc<Silence>,
}

/// Opens a participant's database: creates it if missing, connects with
/// backoff (PostgreSQL may still be starting), runs the kit's and
/// `service`'s migrations. Returns `None` if `shutdown` fired first.
pub async fn open(
    options: PgConnectOptions,
    settings: &PoolSettings,
    service: Option<Migrator>,
    shutdown: &CancellationToken,
) -> Result<Option<Database>, DatabaseError> {
    let database = options
        .get_database()
        .ok_or(DatabaseError::NoDatabaseName)?
        .to_owned();
    if let Some(m) = service
        .iter()
        .flat_map(|s| s.iter())
        .find(|m| m.version < FIRST_SERVICE_MIGRATION)
    {
        return Err(DatabaseError::ReservedMigrationVersion(m.version));
    }
    let lock_timeout = format!("{}ms", settings.lock_timeout.as_millis());
    // The kit's batch statements join their input to the inbox; a plan
    // cached while the inbox was nearly empty (a new database, before the
    // first autoanalyze) would keep reading the whole inbox for every batch
    // as it grows. Every kit query has an index, so sequential scans are
    // planned only where nothing else exists; a handler that wants one can
    // `SET LOCAL enable_seqscan = on`.
    //
    // A participant runs the same few statements thousands of times, so
    // each is planned once (generic plan). Left to choose, PostgreSQL kept
    // planning the demo reservation (a statement over `unnest` of arrays)
    // on every call: 0.27 ms of planning for 0.16 ms of execution. A handler
    // whose statement needs a plan per parameter set can
    // `SET LOCAL plan_cache_mode = auto`.
    let options = options.options([
        ("lock_timeout", lock_timeout.as_str()),
        ("enable_seqscan", "off"),
        ("plan_cache_mode", "force_generic_plan"),
    ]);
    // Migrations may take long: they run on a connection of their own,
    // before the statement timeout applies.
    let migrating = options.clone();
    let options = silence::server_timeouts(
        options,
        settings.deadline * 4 / 5,
        settings.deadline + Duration::from_secs(5),
    );
    let silence = Silence::new();
    let connect = || async {
        ensure_database(&options).await?;
        silence
            .guard(PgPoolOptions::new())
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options.clone())
            .await
    };
    let attempt = connect
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times(),
        )
        .when(|e| !is_refusal(e))
        .notify(|e, wait| {
            tracing::warn!(database = %database, error = %e, retry_in = ?wait, "PostgreSQL not reachable")
        });
    let pool = tokio::select! {
        () = shutdown.cancelled() => return Ok(None),
        pool = attempt => pool.map_err(|source| DatabaseError::Refused { database: database.clone(), source })?,
    };
    let migrated = async {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(migrating)
            .await?;
        let result = migrate(&pool, service).await;
        pool.close().await;
        result
    };
    migrated
        .await
        .map_err(|source| DatabaseError::Migrate { database, source })?;
    Ok(Some(Database { pool, silence }))
}
