//! Live saga history for `WatchSaga`, across instances.
//!
//! Every transaction that appends history rows also sends a PostgreSQL
//! NOTIFY with the saga id; one LISTEN connection per instance fans those out
//! to the watch streams, which then read the new rows. A notification lost
//! while the listener reconnects only delays a stream until its next
//! periodic re-read.

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
                                let _ = self.tx.send(id);
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
