//! What a command handler sees and returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use saga_proto::amqp::{CommandMessage, Phase};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use uuid::Uuid;

/// A decoded command handed to a handler: the envelope, the typed payload
/// and, for a compensation, what the action it undoes returned.
#[derive(Debug, Clone)]
pub struct Command<P> {
    /// The envelope as received (its `payload` is the raw JSON).
    pub message: Arc<CommandMessage>,
    /// The payload decoded into the handler's type.
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

/// The final answer of a handler; both variants are remembered in the inbox.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done: the data goes into the reply (and the saga's data).
    Success(serde_json::Value),
    /// A business rule refused the command. Whatever the handler wrote
    /// before deciding is rolled back (an action's whole transaction, a
    /// compensation's savepoint), so a rejection has no effect.
    Rejected(String),
}

impl Outcome {
    /// Success carrying `data` serialized to JSON.
    pub fn success(data: impl Serialize) -> Self {
        match serde_json::to_value(data) {
            Ok(value) => Self::Success(value),
            Err(e) => Self::Rejected(format!("reply data could not be serialized: {e}")),
        }
    }

    /// A business rejection with a human-readable reason.
    pub fn rejected(reason: impl Into<String>) -> Self {
        Self::Rejected(reason.into())
    }
}

/// A passing failure: the transaction is rolled back, nothing is
/// remembered, and the reply says `transient_error` so the orchestrator
/// retries.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The database failed (connection lost, lock timeout, deadlock ...).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Any other passing condition the handler detected.
    #[error("{0}")]
    Transient(String),
}

/// What a handler returns.
pub type HandlerResult = Result<Outcome, HandlerError>;

/// The boxed future of a handler, borrowing the transaction's connection.
pub type HandlerFuture<'c> = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'c>>;

/// A command handler: runs inside the kit's transaction (`conn`), which
/// also holds the inbox row and the reply's outbox row, so the business
/// change, the de-duplication record and the reply commit together.
///
/// Implemented by any `fn(&mut PgConnection, Command<P>) -> HandlerFuture<'_>`.
/// Handlers must not commit or roll back themselves.
pub trait Handler<P>: Send + Sync + 'static {
    /// Handles one command.
    fn call<'c>(&self, conn: &'c mut PgConnection, command: Command<P>) -> HandlerFuture<'c>;
}

impl<P, F> Handler<P> for F
where
    F: for<'c> Fn(&'c mut PgConnection, Command<P>) -> HandlerFuture<'c> + Send + Sync + 'static,
{
    fn call<'c>(&self, conn: &'c mut PgConnection, command: Command<P>) -> HandlerFuture<'c> {
        self(conn, command)
    }
}

/// A handler with its payload type erased. Decoding the payload can fail:
/// the reason becomes a (remembered) rejection.
pub(crate) type ErasedHandler = Arc<
    dyn for<'c> Fn(
            &'c mut PgConnection,
            Command<serde_json::Value>,
        ) -> Result<HandlerFuture<'c>, String>
        + Send
        + Sync,
>;

fn erase_with<F>(f: F) -> ErasedHandler
where
    F: for<'c> Fn(
            &'c mut PgConnection,
            Command<serde_json::Value>,
        ) -> Result<HandlerFuture<'c>, String>
        + Send
        + Sync
        + 'static,
{
    Arc::new(f)
}

pub(crate) fn erase<P, H>(handler: H) -> ErasedHandler
where
    P: DeserializeOwned + Send + 'static,
    H: Handler<P>,
{
    erase_with(move |conn, command| {
        let payload: P = serde_path_to_error::deserialize(&command.payload)
            .map_err(|e| format!("invalid payload: {e}"))?;
        Ok(handler.call(
            conn,
            Command {
                message: command.message,
                payload,
                action_data: command.action_data,
            },
        ))
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
