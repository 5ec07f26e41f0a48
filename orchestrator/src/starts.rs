//! Group commit of `StartSaga`: concurrent starts are written together, in
//! one statement and one commit.
//!
//! Each start is queued with a channel for its answer. [`WRITERS`] writer
//! tasks take turns at the queue: one takes every start waiting there (up
//! to [`MAX_GROUP`]) and writes them while the next waits for the following
//! ones, so a group never waits to fill — a lone start is written at once,
//! and under load a group holds whatever arrived during the previous write.
//! A group that fails is written again one start at a time, so one start's
//! error never becomes another's.

use std::sync::Arc;

use chrono::Utc;
use sagas::errors::Chain;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::store::{
    Store, StoreError,
    outbox::{self, OutboxMessage},
    transition::{self, Inserted, StartRow},
};

/// Most starts written in one statement.
pub const MAX_GROUP: usize = 64;
/// Writer tasks (each holds at most one pooled connection at a time).
pub const WRITERS: usize = 2;
/// Starts that may wait for a writer before callers wait to queue.
const QUEUE: usize = 4 * MAX_GROUP;

/// What a start's write came to: its messages with their outbox ids, or
/// `None` when its idempotency key was taken.
pub type Written = Result<Option<Vec<OutboxMessage>>, StoreError>;

/// A start waiting to be written.
struct Pending {
    row: StartRow,
    answer: oneshot::Sender<Written>,
}

/// The queue of starts to write (cheap to clone). Its writer tasks end
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct StartWriter {
    queue: mpsc::Sender<Pending>,
}

/// Why a start could not be handed to a writer.
#[derive(Debug, thiserror::Error)]
#[error("the start writer stopped")]
pub struct WriterStopped;

impl StartWriter {
    /// Spawns the writer tasks over `store` (needs a Tokio runtime).
    pub fn spawn(store: Store) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..WRITERS {
            tokio::spawn(write_groups(store.clone(), receiver.clone()));
        }
        Self { queue }
    }

    /// Writes `row` with whatever other starts are waiting; resolves after
    /// the commit.
    pub async fn write(&self, row: StartRow) -> Result<Written, WriterStopped> {
        let (answer, written) = oneshot::channel();
        self.queue
            .send(Pending { row, answer })
            .await
            .map_err(|_| WriterStopped)?;
        written.await.map_err(|_| WriterStopped)
    }
}

/// One writer: takes a group, writes it, answers, again.
async fn write_groups(store: Store, receiver: Arc<Mutex<mpsc::Receiver<Pending>>>) {
    loop {
        let group = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match receiver.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
            group
        };
        write_group(&store, group).await;
    }
}

/// Writes a group in one statement; if that fails, each start alone.
async fn write_group(store: &Store, mut group: Vec<Pending>) {
    metrics::histogram!("saga_start_group_size").record(group.len() as f64);
    // One order for every writer: two groups with the same keys wait for
    // each other instead of deadlocking.
    group.sort_by(|a, b| {
        (&a.row.saga_type, &a.row.idempotency_key).cmp(&(&b.row.saga_type, &b.row.idempotency_key))
    });
    let rows: Vec<&StartRow> = group.iter().map(|p| &p.row).collect();
    match write_rows(store, &rows).await {
        Ok(inserted) => {
            for Pending { row, answer } in group {
                answer.send(Ok(inserted.take(row))).ok();
            }
        }
        // A silent database would be as silent for each start alone.
        Err(StoreError::Silent(silent)) => {
            for Pending { answer, .. } in group {
                answer.send(Err(StoreError::Silent(silent))).ok();
            }
        }
        Err(error) if group.len() == 1 => {
            let Pending { answer, .. } = group.pop().expect("one start");
            answer.send(Err(error)).ok();
        }
        Err(error) => {
            tracing::warn!(error = %Chain(&error), starts = group.len(), "group start failed; writing each start alone");
            for Pending { row, answer } in group {
                let written = write_rows(store, &[&row]).await.map(|i| i.take(row));
                answer.send(written).ok();
            }
        }
    }
}

async fn write_rows(store: &Store, rows: &[&StartRow]) -> Result<Inserted, StoreError> {
    store
        .within(async {
            let mut conn = store.pool().acquire().await?;
            let now = Utc::now();
            transition::insert_started(&mut conn, rows, now, now + outbox::PUBLISH_LEASE).await
        })
        .await
}
