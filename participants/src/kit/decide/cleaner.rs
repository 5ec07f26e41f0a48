//! Deletes outbox rows whose replies the broker confirmed, in groups: one
//! statement (and one commit) for every row confirmed while the previous
//! delete ran, instead of one commit per command.
//!
//! A row whose delete is still queued when the process dies is published
//! again by the relay after its grace period: a duplicate reply, which the
//! orchestrator ignores — the same outcome as a crash between the confirm
//! and a single-row delete.

use std::{sync::Arc, time::Duration};

use saga_proto::connect::silence::Silence;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

/// Most rows one delete statement takes.
const MAX_GROUP: usize = 512;
/// Tries of one group's delete before its rows are left to the relay.
const TRIES: u32 = 5;

enum Request {
    Delete(i64),
    /// Answered once every delete queued before it ran.
    Flush(oneshot::Sender<()>),
}

/// The queue of confirmed rows to delete (cheap to clone). Its task ends
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub(crate) struct OutboxCleaner {
    queue: mpsc::UnboundedSender<Request>,
}

impl OutboxCleaner {
    /// Spawns the deleting task over `pool` (needs a Tokio runtime).
    /// Each delete is bounded by `deadline` on `silence`.
    pub(crate) fn spawn(
        pool: PgPool,
        participant: String,
        silence: Arc<Silence>,
        deadline: Duration,
    ) -> Self {
        let (queue, requests) = mpsc::unbounded_channel();
        let bound = Bound { silence, deadline };
        tokio::spawn(run(pool, participant, bound, requests));
        Self { queue }
    }

    /// Queues the delete of a row whose reply was confirmed.
    pub(crate) fn confirmed(&self, id: i64) {
        // Only fails once the task ended: the relay then republishes the
        // row after its grace period, a harmless duplicate.
        self.queue.send(Request::Delete(id)).ok();
    }

    /// Waits until every delete queued so far ran (or was given up).
    pub(crate) async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(Request::Flush(done)).is_ok() {
            flushed.await.ok();
        }
    }
}

/// How long one delete may take, and the pool's silence record.
struct Bound {
    silence: Arc<Silence>,
    deadline: Duration,
}

async fn run(
    pool: PgPool,
    participant: String,
    bound: Bound,
    mut requests: mpsc::UnboundedReceiver<Request>,
) {
    let mut ids = Vec::with_capacity(MAX_GROUP);
    let mut flushes = Vec::new();
    while let Some(first) = requests.recv().await {
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Delete(id) => ids.push(id),
                Request::Flush(done) => flushes.push(done),
            }
            if ids.len() < MAX_GROUP {
                next = requests.try_recv().ok();
            }
        }
        if !ids.is_empty() {
            delete(&pool, &participant, &bound, &ids).await;
            ids.clear();
        }
        for done in flushes.drain(..) {
            done.send(()).ok();
        }
    }
}

async fn delete(pool: &PgPool, participant: &str, bound: &Bound, ids: &[i64]) {
    let mut wait = Duration::from_millis(50);
    for attempt in 1..=TRIES {
        let statement = sqlx::query("DELETE FROM kit_outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(pool);
        let deleted = bound.silence.within_sqlx(bound.deadline, statement).await;
        match deleted {
            Ok(_) => {
                metrics::histogram!("participant_outbox_delete_group_size", "participant" => participant.to_owned())
                    .record(ids.len() as f64);
                return;
            }
            Err(error) if attempt < TRIES => {
                tracing::warn!(participant, %error, rows = ids.len(), retry_in = ?wait, "could not delete published outbox rows");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(error) => {
                // The relay publishes them again: harmless duplicates.
                tracing::warn!(participant, %error, rows = ids.len(), "giving up deleting published outbox rows; the relay resends them");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flush_waits_for_the_deletes_queued_before_it() {
        // A pool that cannot connect: each delete fails fast and is given up
        // after its tries, so the flush still comes back.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(100))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let cleaner =
            OutboxCleaner::spawn(pool, "test".into(), Silence::new(), Duration::from_secs(10));
        for id in 0..10 {
            cleaner.confirmed(id);
        }
        tokio::time::timeout(Duration::from_secs(30), cleaner.flush())
            .await
            .expect("the flush comes back once the deletes were tried");
    }
}
