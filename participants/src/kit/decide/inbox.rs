//! The inbox: one row per idempotency key, written in the same transaction
//! as the business change and the reply's outbox row.
//!
//! A command first *claims* its key with `INSERT ... ON CONFLICT DO
//! NOTHING`. PostgreSQL makes a concurrent duplicate wait on the unique
//! index until the first transaction ends: if it committed, the duplicate
//! sees the key taken and replays the stored outcome; if it rolled back (a
//! transient error), the duplicate claims the key itself. Either way only
//! one transaction ever applies the effect of a key.

use std::collections::{HashMap, HashSet};

use saga_proto::amqp::{CommandMessage, Phase, ReplyMessage, ReplyStatus};
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::kit::handler::Outcome;

pub(crate) fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Action => "action",
        Phase::Compensation => "compensation",
    }
}

/// Claims `command`'s key; `false` when it was already answered (or fenced
/// by the compensation barrier).
pub(crate) async fn claim(
    conn: &mut PgConnection,
    command: &CommandMessage,
) -> Result<bool, sqlx::Error> {
    let claimed = sqlx::query(
        "INSERT INTO kit_inbox (idempotency_key, kind, saga_id, step, phase, command)
         VALUES ($1, 'command', $2, $3, $4, $5)
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(&command.idempotency_key)
    .bind(command.saga_id)
    .bind(&command.step)
    .bind(phase_name(command.phase))
    .bind(&command.command)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(claimed == 1)
}

/// Claims the keys of `commands` (distinct keys) in one statement, in key
/// order so two batches claiming overlapping keys cannot deadlock on them.
/// Returns the keys claimed; the others were already answered (or fenced).
pub(crate) async fn claim_all(
    conn: &mut PgConnection,
    commands: &[&CommandMessage],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut keys = Vec::with_capacity(commands.len());
    let mut saga_ids = Vec::with_capacity(commands.len());
    let mut steps = Vec::with_capacity(commands.len());
    let mut phases = Vec::with_capacity(commands.len());
    let mut names = Vec::with_capacity(commands.len());
    for command in commands {
        keys.push(command.idempotency_key.as_str());
        saga_ids.push(command.saga_id);
        steps.push(command.step.as_str());
        phases.push(phase_name(command.phase));
        names.push(command.command.as_str());
    }
    let claimed: Vec<String> = sqlx::query_scalar(
        "INSERT INTO kit_inbox (idempotency_key, kind, saga_id, step, phase, command)
         SELECT key, 'command', saga_id, step, phase, command
         FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[])
              AS c(key, saga_id, step, phase, command)
         ORDER BY key
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING idempotency_key",
    )
    .bind(&keys)
    .bind(&saga_ids)
    .bind(&steps)
    .bind(&phases)
    .bind(&names)
    .fetch_all(conn)
    .await?;
    Ok(claimed.into_iter().collect())
}

/// An inbox row's key with its `status`, `data`, `reason`.
type KeyedRow = (
    String,
    Option<String>,
    Option<Json<serde_json::Value>>,
    Option<String>,
);

/// The outcomes stored for `keys` (in one statement); unknown keys are
/// missing from the map.
pub(crate) async fn stored_outcomes(
    conn: &mut PgConnection,
    keys: &[&str],
) -> Result<HashMap<String, Outcome>, sqlx::Error> {
    let rows: Vec<KeyedRow> = sqlx::query_as(
        "SELECT idempotency_key, status, data, reason FROM kit_inbox
             WHERE idempotency_key = ANY($1)",
    )
    .bind(keys)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, status, data, reason)| (key, outcome_of(status, data, reason)))
        .collect())
}

/// The outcome a committed inbox row holds.
fn outcome_of(
    status: Option<String>,
    data: Option<Json<serde_json::Value>>,
    reason: Option<String>,
) -> Outcome {
    match status.as_deref() {
        Some("success") => Outcome::Success(data.map(|d| d.0).unwrap_or_default()),
        _ => Outcome::Rejected(reason.unwrap_or_default()),
    }
}

/// The inbox columns `(status, data, reason)` that record `outcome`.
pub(crate) fn columns(
    outcome: &Outcome,
) -> (&'static str, Option<&serde_json::Value>, Option<&str>) {
    match outcome {
        Outcome::Success(data) => ("success", Some(data), None),
        Outcome::Rejected(reason) => ("rejected", None, Some(reason.as_str())),
    }
}

/// Records the final outcome of a claimed key (when no reply is written
/// with it; see `outbox::insert_completing`).
pub(crate) async fn complete(
    conn: &mut PgConnection,
    key: &str,
    outcome: &Outcome,
) -> Result<(), sqlx::Error> {
    let (status, data, reason) = columns(outcome);
    let data = data.map(Json);
    sqlx::query(
        "UPDATE kit_inbox SET status = $2, data = $3, reason = $4, completed_at = now()
         WHERE idempotency_key = $1",
    )
    .bind(key)
    .bind(status)
    .bind(data)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// The reply to `command` for `outcome`; echo fields come from the command
/// being answered, so a replay to a retry carries the retry's `attempt`.
pub(crate) fn reply(command: &CommandMessage, outcome: &Outcome) -> ReplyMessage {
    let (status, data, reason) = match outcome {
        Outcome::Success(data) => (ReplyStatus::Success, data.clone(), None),
        Outcome::Rejected(reason) => (
            ReplyStatus::Rejected,
            serde_json::Value::Null,
            Some(reason.clone()),
        ),
    };
    ReplyMessage {
        saga_id: command.saga_id,
        step: command.step.clone(),
        phase: command.phase,
        attempt: command.attempt,
        idempotency_key: command.idempotency_key.clone(),
        status,
        data,
        reason,
    }
}

/// A `transient_error` reply (nothing applied, nothing remembered).
pub(crate) fn transient_reply(command: &CommandMessage, reason: String) -> ReplyMessage {
    ReplyMessage {
        saga_id: command.saga_id,
        step: command.step.clone(),
        phase: command.phase,
        attempt: command.attempt,
        idempotency_key: command.idempotency_key.clone(),
        status: ReplyStatus::TransientError,
        data: serde_json::Value::Null,
        reason: Some(reason),
    }
}
