//! The reply outbox (its rows; publishing them is the delivering side's).
//!
//! A reply is inserted in the same transaction as the outcome it reports,
//! so it can never be lost once the outcome is committed. The consumer
//! publishes it right after the commit (publisher confirm, `mandatory`) and
//! the row is deleted on a clean confirm ([`super::cleaner`]). Rows it
//! could not publish (broker down, reply queue not declared yet) and rows
//! left behind by a crash are leased by the relay ([`lease`]) once their
//! `available_at` has passed.

use std::time::Duration;

use saga_proto::amqp::ReplyMessage;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::inbox;
use crate::kit::handler::Outcome;

/// How long the consumer owns a freshly written row before the relay may
/// take it: longer than the consumer's own publish retries, so the two do
/// not publish the same row at once in the normal case.
pub(crate) const CONSUMER_GRACE: Duration = Duration::from_secs(15);

/// A reply ready to be published.
#[derive(Debug, Clone)]
pub(crate) struct PendingReply {
    /// Outbox row, if one was written.
    pub outbox_id: Option<i64>,
    /// Queue to publish to through the default exchange.
    pub reply_to: String,
    /// Saga id: `correlation_id` and trace id.
    pub saga_id: Uuid,
    /// Serialized [`ReplyMessage`].
    pub body: String,
    /// What it answers (for the command latency's `outcome` label);
    /// `None` for a row read back by the relay.
    pub status: Option<saga_proto::amqp::ReplyStatus>,
}

impl PendingReply {
    pub(crate) fn new(reply_to: &str, reply: &ReplyMessage) -> Self {
        Self {
            outbox_id: None,
            reply_to: reply_to.to_owned(),
            saga_id: reply.saga_id,
            body: serde_json::to_string(reply).expect("a ReplyMessage always serializes"),
            status: Some(reply.status),
        }
    }
}

/// Writes `reply` to the outbox in the caller's transaction.
pub(crate) async fn insert(
    conn: &mut PgConnection,
    reply: &mut PendingReply,
) -> Result<(), sqlx::Error> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO kit_outbox (saga_id, reply_to, body, available_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))
         RETURNING id",
    )
    .bind(reply.saga_id)
    .bind(&reply.reply_to)
    .bind(&reply.body)
    .bind(CONSUMER_GRACE.as_secs_f64())
    .fetch_one(conn)
    .await?;
    reply.outbox_id = Some(id);
    Ok(())
}

/// Records `key`'s final outcome in the inbox and inserts its reply in the
/// outbox in one statement (one round trip instead of two; both in the
/// caller's transaction).
pub(crate) async fn insert_completing(
    conn: &mut PgConnection,
    key: &str,
    outcome: &Outcome,
    reply: &mut PendingReply,
) -> Result<(), sqlx::Error> {
    let (status, data, reason) = inbox::columns(outcome);
    let id: i64 = sqlx::query_scalar(
        "WITH completed AS (
             UPDATE kit_inbox SET status = $5, data = $6, reason = $7, completed_at = now()
             WHERE idempotency_key = $4
         )
         INSERT INTO kit_outbox (saga_id, reply_to, body, available_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $8))
         RETURNING id",
    )
    .bind(reply.saga_id)
    .bind(&reply.reply_to)
    .bind(&reply.body)
    .bind(key)
    .bind(status)
    .bind(data.map(sqlx::types::Json))
    .bind(reason)
    .bind(CONSUMER_GRACE.as_secs_f64())
    .fetch_one(conn)
    .await?;
    reply.outbox_id = Some(id);
    Ok(())
}

/// Hands a row the consumer could not publish to the relay right away
/// (instead of after [`CONSUMER_GRACE`]), counting the failure.
pub(crate) async fn defer(pool: &PgPool, id: i64, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE kit_outbox SET attempts = attempts + 1, last_error = $2, available_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// One reply of a batch for [`insert_all`]: with `completes`, the command's
/// own key whose outcome is recorded in the inbox in the same statement.
pub(crate) struct BatchReply<'a> {
    /// The reply; its `outbox_id` is filled in.
    pub pending: PendingReply,
    /// Key and outcome to record (a fresh claim), or `None` (a replay).
    pub completes: Option<(&'a str, &'a Outcome)>,
}

/// Records the outcomes of a batch's fresh claims and inserts every reply
/// in the outbox, all in one statement in the caller's transaction.
pub(crate) async fn insert_all(
    conn: &mut PgConnection,
    replies: &mut [BatchReply<'_>],
) -> Result<(), sqlx::Error> {
    let n = replies.len();
    let (mut keys, mut statuses, mut data, mut reasons) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut saga_ids, mut reply_tos, mut bodies) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for reply in replies.iter() {
        let (key, columns) = match reply.completes {
            Some((key, outcome)) => (Some(key), Some(inbox::columns(outcome))),
            None => (None, None),
        };
        keys.push(key);
        statuses.push(columns.map(|(status, _, _)| status));
        data.push(columns.and_then(|(_, data, _)| data).map(|d| d.to_string()));
        reasons.push(columns.and_then(|(_, _, reason)| reason));
        saga_ids.push(reply.pending.saga_id);
        reply_tos.push(reply.pending.reply_to.as_str());
        bodies.push(reply.pending.body.as_str());
    }
    // The ids are drawn in a CTE referenced twice, so it is evaluated once
    // and each id is matched to its reply by position. `= ANY($1)` gives
    // the planner the inbox keys as an index condition.
    let ids: Vec<(i64, i64)> = sqlx::query_as(
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                  $5::uuid[], $6::text[], $7::text[])
                 WITH ORDINALITY AS i(key, status, data, reason, saga_id, reply_to, body, n)
         ),
         completed AS (
             UPDATE kit_inbox k
             SET status = i.status, data = i.data::jsonb, reason = i.reason, completed_at = now()
             FROM input i
             WHERE k.idempotency_key = ANY($1) AND k.idempotency_key = i.key
         ),
         ids AS (
             SELECT n, nextval('kit_outbox_id_seq') AS id FROM input
         ),
         inserted AS (
             INSERT INTO kit_outbox (id, saga_id, reply_to, body, available_at)
             SELECT ids.id, i.saga_id, i.reply_to, i.body, now() + make_interval(secs => $8)
             FROM input i JOIN ids USING (n)
         )
         SELECT n, id FROM ids",
    )
    .bind(&keys)
    .bind(&statuses)
    .bind(&data)
    .bind(&reasons)
    .bind(&saga_ids)
    .bind(&reply_tos)
    .bind(&bodies)
    .bind(CONSUMER_GRACE.as_secs_f64())
    .fetch_all(conn)
    .await?;
    for (position, id) in ids {
        let slot = usize::try_from(position - 1)
            .ok()
            .and_then(|i| replies.get_mut(i))
            .ok_or_else(|| {
                sqlx::Error::Protocol(format!("outbox id for unknown row {position}"))
            })?;
        slot.pending.outbox_id = Some(id);
    }
    Ok(())
}

/// Which rows a relay pass takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sweep {
    /// Rows whose `available_at` has passed (periodic pass).
    Due,
    /// Every row (start-up and shutdown flush: no publish of this process
    /// is in flight then).
    All,
}

/// Backoff of a row the relay failed to publish, after `attempts` failures.
fn relay_backoff(attempts: i32) -> Duration {
    let exp = attempts.clamp(0, 8) as u32;
    Duration::from_millis(250 * 2u64.pow(exp)).min(Duration::from_secs(30))
}

/// Rows of the outbox held by one relay pass: claimed with `FOR UPDATE
/// SKIP LOCKED` (several relays never publish the same row), then each
/// marked published (deleted) or failed (rescheduled with backoff), all
/// committed together by [`Lease::finish`].
pub(crate) struct Lease {
    /// The transaction holding the row locks.
    tx: Transaction<'static, Postgres>,
    /// The replies leased.
    replies: Vec<Leased>,
}

/// One leased outbox row.
pub(crate) struct Leased {
    /// The row.
    pub id: i64,
    /// Its reply.
    pub reply: PendingReply,
    /// Failed publishes so far (sets the backoff of the next).
    pub attempts: i32,
}

/// Leases up to `batch` rows for a relay pass.
pub(crate) async fn lease(pool: &PgPool, sweep: Sweep, batch: i64) -> Result<Lease, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, Uuid, String, String, i32)> = sqlx::query_as(
        "SELECT id, saga_id, reply_to, body, attempts FROM kit_outbox
         WHERE $1 OR available_at <= now()
         ORDER BY id
         LIMIT $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(sweep == Sweep::All)
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    let replies = rows
        .into_iter()
        .map(|(id, saga_id, reply_to, body, attempts)| {
            let reply = PendingReply {
                outbox_id: Some(id),
                reply_to,
                saga_id,
                body,
                status: None,
            };
            Leased {
                id,
                reply,
                attempts,
            }
        })
        .collect();
    Ok(Lease { tx, replies })
}

impl Lease {
    /// The replies to publish (taken out; each is then reported with
    /// [`Lease::published`] or [`Lease::failed`]).
    pub(crate) fn take(&mut self) -> Vec<Leased> {
        std::mem::take(&mut self.replies)
    }

    /// The broker confirmed row `id`: it is deleted with the lease.
    pub(crate) async fn published(&mut self, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM kit_outbox WHERE id = $1")
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Row `id` could not be published after `attempts` earlier failures:
    /// it is due again after a growing delay, which it returns.
    pub(crate) async fn failed(
        &mut self,
        id: i64,
        attempts: i32,
        error: &str,
    ) -> Result<Duration, sqlx::Error> {
        let wait = relay_backoff(attempts);
        sqlx::query(
            "UPDATE kit_outbox SET attempts = attempts + 1, last_error = $2,
                    available_at = now() + make_interval(secs => $3)
             WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(wait.as_secs_f64())
        .execute(&mut *self.tx)
        .await?;
        Ok(wait)
    }

    /// Commits what the pass did.
    pub(crate) async fn finish(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_backoff_grows_and_caps() {
        assert_eq!(relay_backoff(0), Duration::from_millis(250));
        assert_eq!(relay_backoff(1), Duration::from_millis(500));
        assert_eq!(relay_backoff(100), Duration::from_secs(30));
    }
}
