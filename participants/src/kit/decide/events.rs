//! Deciding for an event subscriber: a batch of lifecycle events is handed
//! to the service's handler in one transaction, retried in place with
//! backoff when the database fails (requeueing instead would spend the
//! queue's delivery limit). The handler de-duplicates (a unique key per
//! event), since a redelivered event comes again.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::FutureExt;
use futures::future::BoxFuture;
use saga_proto::amqp::LifecycleEvent;
use saga_proto::connect::silence::Silence;
use sqlx::PgPool;

use crate::kit::database::Database;
use crate::kit::handler::{HandlerError, Tx};
use crate::kit::stats::{Stats, bump};

/// An event handler: `async fn(&Tx, &[LifecycleEvent]) -> Result<u64, E>`
/// returning how many of the events were new to it (the others were
/// redeliveries it had recorded before). Implemented for every such
/// function.
pub trait EventHandler<'a>: Send + Sync + 'static {
    /// The handler's own error type.
    type Error: Into<HandlerError>;
    /// The handler's future.
    type Future: std::future::Future<Output = Result<u64, Self::Error>> + Send + 'a;
    /// Handles a batch of events.
    fn call(&self, tx: &'a Tx, events: &'a [LifecycleEvent]) -> Self::Future;
}

impl<'a, F, Fut, E> EventHandler<'a> for F
where
    F: Fn(&'a Tx, &'a [LifecycleEvent]) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64, E>> + Send + 'a,
    E: Into<HandlerError>,
{
    type Error = E;
    type Future = Fut;

    fn call(&self, tx: &'a Tx, events: &'a [LifecycleEvent]) -> Fut {
        self(tx, events)
    }
}

/// An event handler with its error type erased.
pub(crate) type ErasedEventHandler = Arc<
    dyn for<'a> Fn(&'a Tx, &'a [LifecycleEvent]) -> BoxFuture<'a, Result<u64, HandlerError>>
        + Send
        + Sync,
>;

fn erase_with<F>(f: F) -> ErasedEventHandler
where
    F: for<'a> Fn(&'a Tx, &'a [LifecycleEvent]) -> BoxFuture<'a, Result<u64, HandlerError>>
        + Send
        + Sync
        + 'static,
{
    Arc::new(f)
}

pub(crate) fn erase<H>(handler: H) -> ErasedEventHandler
where
    H: for<'a> EventHandler<'a>,
{
    erase_with(move |tx, events| {
        let handling = handler.call(tx, events);
        async move { handling.await.map_err(Into::into) }.boxed()
    })
}

/// The deciding half of an event subscriber.
pub(crate) struct EventRecorder {
    /// Service name.
    name: String,
    /// Its own database.
    pool: PgPool,
    /// When it was last silent, and how long one recording may take.
    silence: (Arc<Silence>, Duration),
    /// The service's handler.
    handler: ErasedEventHandler,
    /// Counters.
    stats: Arc<Stats>,
}

impl EventRecorder {
    pub(crate) fn new(
        name: String,
        database: Database,
        deadline: Duration,
        handler: ErasedEventHandler,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            name,
            pool: database.pool,
            silence: (database.silence, deadline),
            handler,
            stats,
        }
    }

    /// Records `events` (retrying a failing database a few times); `Err`
    /// once it gave up for now (the deliveries are then requeued).
    pub(crate) async fn record(&self, events: &[LifecycleEvent]) -> Result<(), HandlerError> {
        let (silence, deadline) = &self.silence;
        let once = || async {
            let work = async {
                let tx = Tx::new(self.pool.begin().await?);
                let new = (self.handler)(&tx, events).await?;
                tx.commit().await?;
                Ok::<_, HandlerError>(new)
            };
            // Recording again is safe (events are de-duplicated), so a
            // silent database is retried like any other failure.
            silence
                .within(*deadline, work)
                .await
                .map_err(|silent| HandlerError::Database(silent.into_sqlx()))?
        };
        let new = once
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(8),
            )
            // A refusal is not retried in place: the deliveries are
            // requeued, and a batch refused every time ends in the dead
            // letters at the queue's delivery limit.
            .when(|e| !matches!(e, HandlerError::Rejected(_)))
            .notify(|e, wait| tracing::warn!(participant = %self.name, error = %e.transient_reason(), retry_in = ?wait, "cannot record events"))
            .await?;
        let total = events.len() as u64;
        if new > 0 {
            bump(
                &self.stats.events_recorded,
                &self.name,
                "participant_events_recorded_total",
                new,
            );
        }
        if total > new {
            bump(
                &self.stats.replayed,
                &self.name,
                "participant_commands_replayed_total",
                total - new,
            );
        }
        Ok(())
    }
}
