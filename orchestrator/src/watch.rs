//! Live saga history for `WatchSaga`, across instances.
//!
//! The engine tells the hub of its own instance about every saga it changed
//! (in memory, after commit). For sagas driven by other instances, a watch
//! stream registers in `saga_watchers`; transitions of watched sagas send a
//! PostgreSQL NOTIFY with the saga id, and one LISTEN connection per instance
//! fans those out. A notification lost while the listener reconnects only
//! delays a stream until its next periodic re-read.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::history::CHANNEL;

/// Fan-out of "saga X has new history" (cheap to clone).
#[derive(Debug, Clone)]
pub struct WatchHub {
    /// Saga ids with new rows.
    tx: broadcast::Sender<Uuid>,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self::new()
    }
}

impl WatchHub {
    /// A hub with no listener yet.
    pub fn new() -> Self {
        Self {
            tx: broadcast::Sender::new(4096),
        }
    }

    /// Tells this instance's streams that `saga_id` has new history.
    pub fn notify(&self, saga_id: Uuid) {
        // No receiver (nobody watching) is the common case and costs nothing.
        let _ = self.tx.send(saga_id);
    }

    /// Subscribes to change notifications.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.tx.subscribe()
    }

    /// Listens on the database until `shutdown`, reconnecting as needed.
    pub async fn run(self, pool: PgPool, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, "watch listener cannot connect; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if let Err(error) = listener.listen(CHANNEL).await {
                tracing::warn!(%error, "watch listener cannot LISTEN; retrying");
                continue;
            }
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    notification = listener.try_recv() => match notification {
                        Ok(Some(n)) => {
                            if let Ok(id) = n.payload().parse::<Uuid>() {
                                self.notify(id);
                            }
                        }
                        // Connection lost: reconnect (streams re-read on their own).
                        Ok(None) | Err(_) => break,
                    },
                }
            }
        }
    }
}
