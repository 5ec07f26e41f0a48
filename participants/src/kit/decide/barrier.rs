//! The compensation barrier, keyed by the *action's* idempotency key
//! (which a compensation carries in `compensates`).
//!
//! It lives in the inbox itself, because the inbox row of the action key
//! is exactly what both sides must serialise on:
//!
//! - A compensation tries to insert an inbox row for the action key holding
//!   a stored rejection (a *fence*). If that succeeds, the action never
//!   arrived: the compensation is a no-op success, and the action, if it
//!   ever arrives, finds its key taken and replays the rejection — it is
//!   refused with no effect.
//! - If the action key is already there, the compensation locks it
//!   (`FOR UPDATE`): a concurrent compensation under another key for the
//!   same action waits, then sees `compensated_by` set and does nothing.
//! - An action and a compensation racing each other both insert the same
//!   key; the unique index makes one wait for the other's commit.

use saga_proto::amqp::CommandMessage;
use sqlx::PgConnection;
use sqlx::types::Json;

/// Where the action stands when its compensation arrives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Barrier {
    /// The action never arrived; the fence is now in place.
    ActionNeverArrived,
    /// Another compensation (key given) already undid or fenced it.
    AlreadyCompensated(String),
    /// The action was rejected: there is nothing to undo.
    ActionRejected,
    /// The action succeeded with this data: the handler must undo it.
    Undo(serde_json::Value),
}

/// Reason stored in the fence and replayed to a late action.
pub(crate) const FENCED_REASON: &str =
    "refused: this action was already compensated before it arrived";

/// Enters the barrier for `compensation`, whose action key is `action_key`.
/// Must run in the compensation's transaction, after it claimed its own key.
pub(crate) async fn enter(
    conn: &mut PgConnection,
    compensation: &CommandMessage,
    action_key: &str,
) -> Result<Barrier, sqlx::Error> {
    let fenced = sqlx::query(
        "INSERT INTO kit_inbox (idempotency_key, kind, saga_id, step, phase, command, status,
                                reason, compensated_by, compensated_at, completed_at)
         VALUES ($1, 'barrier', $2, $3, 'action', '', 'rejected', $4, $5, now(), now())
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(action_key)
    .bind(compensation.saga_id)
    .bind(&compensation.step)
    .bind(FENCED_REASON)
    .bind(&compensation.idempotency_key)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if fenced == 1 {
        return Ok(Barrier::ActionNeverArrived);
    }
    let (status, data, compensated_by): (
        Option<String>,
        Option<Json<serde_json::Value>>,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT status, data, compensated_by FROM kit_inbox
         WHERE idempotency_key = $1 FOR UPDATE",
    )
    .bind(action_key)
    .fetch_one(conn)
    .await?;
    Ok(match (compensated_by, status.as_deref()) {
        (Some(by), _) => Barrier::AlreadyCompensated(by),
        (None, Some("success")) => Barrier::Undo(data.map(|d| d.0).unwrap_or_default()),
        (None, _) => Barrier::ActionRejected,
    })
}

/// Marks the action as compensated by `compensation_key`.
pub(crate) async fn mark_compensated(
    conn: &mut PgConnection,
    action_key: &str,
    compensation_key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE kit_inbox SET compensated_by = $2, compensated_at = now()
         WHERE idempotency_key = $1",
    )
    .bind(action_key)
    .bind(compensation_key)
    .execute(conn)
    .await?;
    Ok(())
}
