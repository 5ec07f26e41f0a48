//! What a handler sees and returns: the transaction ([`Tx`]), the typed
//! command ([`Command`]), a typed reply or a [`HandlerError`].
//!
//! A handler is a plain `async fn`:
//!
//! ```
//! use participants::kit::{Command, HandlerError, Tx};
//! use sagas::flows::order_placement::contracts::orders::{ConfirmPayload, Confirmed};
//!
//! async fn confirm(tx: &Tx, command: Command<ConfirmPayload>) -> Result<Confirmed, HandlerError> {
//!     let order = &command.payload;
//!     sqlx::query("INSERT INTO orders (order_id) VALUES ($1) ON CONFLICT DO NOTHING")
//!         .bind(&order.order_id)
//!         .execute(tx)
//!         .await?;
//!     Ok(Confirmed { order_id: order.order_id.clone(), status: "confirmed".into() })
//! }
//! ```
//!
//! registered for its contract with
//! [`ParticipantBuilder::action`](super::ParticipantBuilder::action).

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use saga_proto::amqp::{CommandMessage, Phase};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Describe, Either, Execute, Executor, PgConnection, Postgres, Transaction};
use uuid::Uuid;

/// The transaction a handler runs in: the kit's inbox row, the handler's
/// business change and the reply's outbox row commit together in it.
///
/// `&Tx` is an sqlx [`Executor`], so statements take it as it is
/// (`.execute(tx)`, `.fetch_one(tx)`), as often as needed. Handlers must
/// not commit or roll back: the kit does, once it knows the outcome.
/// Statements of one handler run one after another (they share one
/// connection); a statement's rows are read whole before the next starts.
#[derive(Debug)]
pub struct Tx {
    /// The open transaction; the lock is only ever contended by statements
    /// of the same handler that were started together.
    conn: tokio::sync::Mutex<Transaction<'static, Postgres>>,
}

impl Tx {
    pub(crate) fn new(transaction: Transaction<'static, Postgres>) -> Self {
        Self {
            conn: tokio::sync::Mutex::new(transaction),
        }
    }

    /// The connection, for the kit's own statements between handlers.
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        self.conn.get_mut()
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.conn.into_inner().commit().await
    }

    pub(crate) async fn rollback(self) -> Result<(), sqlx::Error> {
        self.conn.into_inner().rollback().await
    }
}

impl<'c> Executor<'c> for &'c Tx {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        // The guard cannot outlive this call's stream, so the rows are read
        // whole under it and handed out afterwards.
        futures::stream::once(async move {
            let mut conn = self.conn.lock().await;
            let items: Vec<_> = (&mut **conn).fetch_many(query).collect().await;
            futures::stream::iter(items)
        })
        .flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        async move { (&mut **self.conn.lock().await).fetch_optional(query).await }.boxed()
    }

    fn execute<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<PgQueryResult, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        async move { (&mut **self.conn.lock().await).execute(query).await }.boxed()
    }

    fn fetch_all<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Vec<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        async move { (&mut **self.conn.lock().await).fetch_all(query).await }.boxed()
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        async move {
            (&mut **self.conn.lock().await)
                .prepare_with(sql, parameters)
                .await
        }
        .boxed()
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        async move { (&mut **self.conn.lock().await).describe(sql).await }.boxed()
    }
}

/// A decoded command handed to a handler: the envelope, the typed payload
/// and, for a compensation, what the action it undoes returned.
#[derive(Debug, Clone)]
pub struct Command<P> {
    /// The envelope as received (its `payload` is the raw JSON).
    pub message: Arc<CommandMessage>,
    /// The payload decoded into the contract's type.
    pub payload: P,
    /// For a compensation: the success data of the action it undoes, as
    /// stored in the inbox (e.g. `{"reservation_id": ...}`), so it can find
    /// what to undo even when the saga never learnt the action's result.
    pub action_data: Option<serde_json::Value>,
}

impl<P> Command<P> {
    /// The saga the command belongs to.
    pub fn saga_id(&self) -> Uuid {
        self.message.saga_id
    }

    /// This command's idempotency key.
    pub fn idempotency_key(&self) -> &str {
        &self.message.idempotency_key
    }

    /// The key of the action this command is about: its own key for an
    /// action, the `compensates` key for a compensation. Business rows
    /// created by an action are keyed by it so the compensation finds them.
    pub fn action_key(&self) -> &str {
        match self.message.phase {
            Phase::Action => &self.message.idempotency_key,
            Phase::Compensation => self
                .message
                .compensates
                .as_deref()
                .unwrap_or(&self.message.idempotency_key),
        }
    }
}

/// The final answer to a command; both variants are remembered in the
/// inbox, so a duplicate gets the same answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done: the data goes into the reply (and the saga's data).
    Success(serde_json::Value),
    /// A business rule refused the command. Whatever the handler wrote
    /// before deciding is rolled back (an action's whole transaction, a
    /// compensation's savepoint), so a rejection has no effect.
    Rejected(String),
}

/// Why a handler did not succeed.
///
/// A handler's own error type converts into it (`impl From<MyError> for
/// HandlerError`), saying which of its cases are final business refusals
/// and which are passing faults.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A business rule refused the command: final and remembered, answered
    /// `rejected`; whatever the handler wrote is rolled back.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The database failed (connection lost, lock timeout, deadlock ...):
    /// rolled back, nothing remembered, answered `transient_error`, so the
    /// orchestrator retries.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// Any other passing condition the handler detected; treated as
    /// [`HandlerError::Database`] is.
    #[error("{0}")]
    Transient(String),
}

impl HandlerError {
    /// A business refusal with a human-readable reason.
    pub fn rejected(reason: impl Into<String>) -> Self {
        Self::Rejected(reason.into())
    }

    /// The text of a passing failure for the `transient_error` reply: the
    /// error and every cause, once each.
    pub(crate) fn transient_reason(&self) -> String {
        sagas::errors::Chain(self).to_string()
    }
}

/// What a handler of an erased route returns: its outcome, or a passing
/// failure.
pub(crate) type HandlerResult = Result<Outcome, HandlerError>;

/// A handler: an `async fn(&Tx, Command<P>) -> Result<R, E>` with a
/// serializable `R` and any `E` that converts into [`HandlerError`].
/// Implemented for every such function; the lifetime lets its future
/// borrow the transaction.
pub trait Handler<'a, P>: Send + Sync + 'static {
    /// The success reply (the reply's `data`).
    type Reply: Serialize;
    /// The handler's own error type.
    type Error: Into<HandlerError>;
    /// The handler's future.
    type Future: Future<Output = Result<Self::Reply, Self::Error>> + Send + 'a;
    /// Handles one command.
    fn call(&self, tx: &'a Tx, command: Command<P>) -> Self::Future;
}

impl<'a, P, F, Fut, R, E> Handler<'a, P> for F
where
    F: Fn(&'a Tx, Command<P>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'a,
    R: Serialize,
    E: Into<HandlerError>,
{
    type Reply = R;
    type Error = E;
    type Future = Fut;

    fn call(&self, tx: &'a Tx, command: Command<P>) -> Fut {
        self(tx, command)
    }
}

/// A handler with shared state: an `async fn(&S, &Tx, Command<P>) ->
/// Result<R, E>`, registered with
/// [`ParticipantBuilder::action_with`](super::ParticipantBuilder::action_with)
/// together with the state (a client, settings, a cache) every call gets.
pub trait HandlerWith<'a, S, P>: Send + Sync + 'static {
    /// The success reply (the reply's `data`).
    type Reply: Serialize;
    /// The handler's own error type.
    type Error: Into<HandlerError>;
    /// The handler's future.
    type Future: Future<Output = Result<Self::Reply, Self::Error>> + Send + 'a;
    /// Handles one command.
    fn call(&self, state: &'a S, tx: &'a Tx, command: Command<P>) -> Self::Future;
}

impl<'a, S, P, F, Fut, R, E> HandlerWith<'a, S, P> for F
where
    S: 'a,
    F: Fn(&'a S, &'a Tx, Command<P>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'a,
    R: Serialize,
    E: Into<HandlerError>,
{
    type Reply = R;
    type Error = E;
    type Future = Fut;

    fn call(&self, state: &'a S, tx: &'a Tx, command: Command<P>) -> Fut {
        self(state, tx, command)
    }
}

/// A handler with its payload and reply types erased. Decoding the payload
/// can fail: the reason becomes a (remembered) rejection.
pub(crate) type ErasedHandler = Arc<
    dyn for<'a> Fn(
            &'a Tx,
            Command<serde_json::Value>,
        ) -> Result<BoxFuture<'a, HandlerResult>, String>
        + Send
        + Sync,
>;

/// Gives a closure the higher-ranked signature of [`ErasedHandler`]
/// (closures only get one where a bound asks for it).
fn erase_with<F>(f: F) -> ErasedHandler
where
    F: for<'a> Fn(
            &'a Tx,
            Command<serde_json::Value>,
        ) -> Result<BoxFuture<'a, HandlerResult>, String>
        + Send
        + Sync
        + 'static,
{
    Arc::new(f)
}

/// Decodes the payload of `command` as `P` (naming the failing field).
fn decode<P: DeserializeOwned>(command: Command<serde_json::Value>) -> Result<Command<P>, String> {
    let payload: P = serde_path_to_error::deserialize(&command.payload)
        .map_err(|e| format!("invalid payload: {e}"))?;
    Ok(Command {
        message: command.message,
        payload,
        action_data: command.action_data,
    })
}

/// Serializes a handler's reply, and sorts its error into a (remembered)
/// rejection or a passing failure.
fn outcome<R: Serialize, E: Into<HandlerError>>(result: Result<R, E>) -> HandlerResult {
    match result.map_err(Into::into) {
        Ok(reply) => Ok(match serde_json::to_value(reply) {
            Ok(data) => Outcome::Success(data),
            Err(e) => Outcome::Rejected(format!("reply data could not be serialized: {e}")),
        }),
        Err(HandlerError::Rejected(reason)) => Ok(Outcome::Rejected(reason)),
        Err(passing) => Err(passing),
    }
}

/// Erases a typed handler.
pub(crate) fn erase<P, H>(handler: H) -> ErasedHandler
where
    P: DeserializeOwned + Send + 'static,
    H: for<'a> Handler<'a, P>,
{
    erase_with(move |tx, command| {
        let handling = handler.call(tx, decode(command)?);
        Ok(async move { outcome(handling.await) }.boxed())
    })
}

/// Erases a typed handler with its state.
pub(crate) fn erase_with_state<S, P, H>(state: Arc<S>, handler: H) -> ErasedHandler
where
    S: Send + Sync + 'static,
    P: DeserializeOwned + Send + 'static,
    H: for<'a> HandlerWith<'a, S, P>,
{
    let handler = Arc::new(handler);
    erase_with(move |tx, command| {
        let command = decode(command)?;
        let (state, handler) = (state.clone(), handler.clone());
        // The call borrows the state and the handler held by this future.
        Ok(async move { outcome(handler.call(&state, tx, command).await) }.boxed())
    })
}

/// A registered command.
#[derive(Clone)]
pub(crate) struct Route {
    /// Whether the command is an action or a compensation.
    pub phase: Phase,
    /// The handler.
    pub handler: ErasedHandler,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}
