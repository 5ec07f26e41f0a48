//! Deciding: everything a command's answer depends on, in SQL and
//! nothing else. Given the commands of a batch (already decoded by the
//! delivering side), it claims their keys in the inbox, runs the barrier
//! and the handlers, records the outcomes and writes the replies to the
//! outbox, and returns a [`Decision`] per command as data; publishing the
//! replies and settling the deliveries is [`super::deliver`]'s.
//!
//! Batching lives here too: commands that arrive together share one
//! transaction; a batch that cannot commit cleanly is rolled back whole
//! and decided one by one, and a command that loses a deadlock is decided
//! again (see [`Decider::decide_all`]).

pub(crate) mod barrier;
pub(crate) mod cleaner;
pub(crate) mod events;
pub(crate) mod inbox;
pub(crate) mod outbox;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use saga_proto::amqp::{CommandMessage, Phase};
use sqlx::PgPool;
use tracing::Instrument;

use self::barrier::Barrier;
use self::cleaner::OutboxCleaner;
pub(crate) use self::outbox::{Lease, Leased, PendingReply, Sweep};
use saga_proto::connect::silence::Silence;

use super::database::Database;
use super::faults::FaultInjector;
use super::handler::{Command, HandlerError, Outcome, Route, Tx};
use super::stats::{Stats, bump};

/// A decoded command to decide: the envelope and where its reply goes.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// The command.
    pub message: Arc<CommandMessage>,
    /// Where its reply goes.
    pub reply_to: String,
    /// Its delivery's span (parent of the handler's).
    pub span: tracing::Span,
    /// The trace context it came with (passed on when no span is built).
    pub trace: Option<saga_proto::telemetry::TraceContext>,
}

/// What the transaction decided for one command.
pub(crate) enum Decision {
    /// An outcome is committed (now or earlier); `pending` is `None` when
    /// the drop-reply fault swallowed the reply.
    Answered {
        /// The reply to publish, already in the outbox.
        pending: Option<PendingReply>,
        /// Whether the outcome came from the inbox (a duplicate).
        replay: bool,
    },
    /// Nothing was applied; tell the orchestrator to retry.
    Transient {
        /// The `transient_error` reply (not in the outbox: nothing to lose).
        pending: PendingReply,
    },
    /// A commit was sent and its outcome never came back, and the inbox
    /// could not be asked either: the effect may be applied. No answer is
    /// sent (`transient_error` would claim nothing was applied); the
    /// command is acknowledged, and the orchestrator's reply timeout
    /// retries the same key, which the inbox then answers.
    Unknown,
}

/// Why deciding one command failed.
#[derive(Debug)]
struct DecideError {
    /// The statement's error.
    error: sqlx::Error,
    /// It came from the `COMMIT`: the transaction may have committed.
    at_commit: bool,
}

impl From<sqlx::Error> for DecideError {
    fn from(error: sqlx::Error) -> Self {
        Self {
            error,
            at_commit: false,
        }
    }
}

/// A commit whose answer was lost: the transaction may have committed.
fn commit_unknown(error: sqlx::Error) -> DecideError {
    DecideError {
        error,
        at_commit: true,
    }
}

/// Why a batch was rolled back to be decided one command at a time.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// A statement failed (including a deadlock with another batch).
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The batch's `COMMIT` failed: it may have committed.
    #[error("the batch's commit failed; its outcome is unknown")]
    CommitUnknown(#[source] sqlx::Error),
    /// A handler failed.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// An action rejected after writing; only a rollback undoes it.
    #[error("an action rejected after writing")]
    RejectedAfterWriting,
    /// A key already taken had no stored outcome (cannot happen once the
    /// claim statement returned: a taken key is committed).
    #[error("a key already taken has no stored outcome")]
    NoStoredOutcome,
}

/// What running a command left in its transaction.
enum Executed {
    /// The transaction holds exactly the outcome's effects.
    Clean(Outcome),
    /// An action rejected; it ran without a savepoint, so whatever it wrote
    /// before deciding must be rolled back with the whole transaction.
    RejectedAfterWriting(String),
}

/// The pauses before asking the inbox again after a commit whose outcome
/// was lost (about a second in all, far below any reply timeout).
const ASK_AGAIN: [std::time::Duration; 4] = [
    std::time::Duration::from_millis(50),
    std::time::Duration::from_millis(100),
    std::time::Duration::from_millis(250),
    std::time::Duration::from_millis(500),
];

/// How many times a command that lost a deadlock is decided again.
const RACE_RETRIES: u32 = 3;

/// Whether `error` rolled the transaction back only because it lost a race
/// with another one (deadlock, serialization failure): trying again is safe
/// and expected to succeed.
fn lost_a_race(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// The deciding half of a command participant: its routes, its database,
/// and what it counts.
pub(crate) struct Decider {
    /// Participant name.
    name: String,
    /// Command name → handler.
    routes: Arc<BTreeMap<String, Route>>,
    /// Its own database.
    pool: PgPool,
    /// When it was last silent; bounds every decision.
    silence: Arc<Silence>,
    /// Longest wait for one decision's transaction.
    deadline: std::time::Duration,
    /// Fault injection (a dropped reply is decided here: recorded, not
    /// written to the outbox).
    faults: Arc<FaultInjector>,
    /// Counters.
    stats: Arc<Stats>,
    /// Deletes confirmed outbox rows in groups.
    cleaner: OutboxCleaner,
}

impl Decider {
    pub(crate) fn new(
        name: String,
        routes: Arc<BTreeMap<String, Route>>,
        database: Database,
        deadline: std::time::Duration,
        faults: Arc<FaultInjector>,
        stats: Arc<Stats>,
    ) -> Self {
        let pool = database.pool;
        let cleaner = OutboxCleaner::spawn(
            pool.clone(),
            name.clone(),
            database.silence.clone(),
            deadline,
        );
        Self {
            name,
            routes,
            pool,
            silence: database.silence,
            deadline,
            faults,
            stats,
            cleaner,
        }
    }

    /// The broker confirmed the reply of outbox row `id`: it is deleted
    /// with the other rows confirmed meanwhile.
    pub(crate) fn confirmed(&self, id: i64) {
        self.cleaner.confirmed(id);
    }

    /// Waits until every confirmed row queued so far is deleted.
    pub(crate) async fn flush_confirmed(&self) {
        self.cleaner.flush().await;
    }

    /// Hands outbox row `id`, which could not be published, to the relay
    /// right away.
    pub(crate) async fn defer(&self, id: i64, error: &str) {
        let deferred = self
            .silence
            .within_sqlx(self.deadline, outbox::defer(&self.pool, id, error))
            .await;
        if let Err(e) = deferred {
            // It still becomes due after the grace period.
            tracing::warn!(participant = %self.name, outbox_id = id, error = %e, "could not hand a reply to the relay");
        }
    }

    /// Leases outbox rows for a relay pass.
    pub(crate) async fn lease(&self, sweep: Sweep, batch: i64) -> Result<Lease, sqlx::Error> {
        self.silence
            .within_sqlx(self.deadline, outbox::lease(&self.pool, sweep, batch))
            .await
    }

    /// Decides every command of a batch, in order: together in one
    /// transaction when there are several, alone otherwise. A batch that
    /// cannot finish cleanly (a rejection after writing, a handler or
    /// database error, a deadlock with another batch) is rolled back as a
    /// whole and its commands are decided one by one, so batching never
    /// changes an outcome. A command that repeats a key of the batch, and
    /// an action with its compensation both in the batch, are decided alone
    /// after the batch commits, in arrival order.
    pub(crate) async fn decide_all(&self, batch: &[Received]) -> Vec<Decision> {
        let mut keys = HashSet::with_capacity(batch.len());
        let (firsts, repeats): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| keys.insert(batch[i].message.idempotency_key.as_str()));
        // Actions compensated within the batch: the barrier must see each
        // pair in arrival order, one committed before the other.
        let undone: HashSet<&str> = firsts
            .iter()
            .filter_map(|&i| batch[i].message.compensates.as_deref())
            .filter(|action| keys.contains(action))
            .collect();
        let (together, mut after): (Vec<usize>, Vec<usize>) = firsts.into_iter().partition(|&i| {
            let message = &batch[i].message;
            !undone.contains(message.idempotency_key.as_str())
                && message
                    .compensates
                    .as_deref()
                    .is_none_or(|action| !undone.contains(action))
        });
        after.extend(repeats);
        let mut decisions: Vec<Option<Decision>> = batch.iter().map(|_| None).collect();
        // Commands whose batch commit may have applied them.
        let mut uncertain = HashSet::new();
        if together.len() > 1 {
            let decided = self
                .silence
                .within(self.deadline, self.decide_together(batch, &together))
                .await;
            match decided {
                Ok(Ok(decided)) => {
                    for (i, decision) in together.iter().zip(decided) {
                        decisions[*i] = Some(decision);
                    }
                }
                Ok(Err(e)) => {
                    bump(
                        &self.stats.batches_split,
                        &self.name,
                        "participant_batches_split_total",
                        1,
                    );
                    if matches!(e, BatchError::CommitUnknown(_)) {
                        uncertain.extend(together.iter().copied());
                    }
                    tracing::debug!(participant = %self.name, commands = together.len(), error = %e, "batch rolled back; deciding its commands one by one");
                    after.extend(together);
                }
                Err(silent) => {
                    // Whether it committed is unknown, and each command
                    // alone would wait as long: none is answered.
                    tracing::warn!(participant = %self.name, commands = together.len(), error = %silent, "database silent; the batch's commands are left unanswered");
                    for &i in &together {
                        decisions[i] = Some(self.unknown());
                    }
                }
            }
        } else {
            after.extend(together);
        }
        // Whatever is decided alone goes in arrival order.
        after.sort_unstable();
        for i in after {
            decisions[i] = Some(self.decide_alone(&batch[i], uncertain.contains(&i)).await);
        }
        decisions
            .into_iter()
            .map(|d| d.expect("every command of the batch is decided"))
            .collect()
    }

    /// Decides one command in a transaction of its own. A deadlock victim
    /// (more likely now that batches hold many locks) is decided again, up
    /// to [`RACE_RETRIES`] times, rather than answered `transient_error`.
    ///
    /// `transient_error` promises that nothing was applied, so it is only
    /// answered when that is known. After a `COMMIT` whose answer was lost
    /// (here, or for the batch the command was in: `uncertain`) the command
    /// is decided again, after the pauses of [`ASK_AGAIN`], on whatever
    /// connection the pool gives then (the broken ones are gone): the inbox
    /// answers with the committed outcome, or the key is free and the
    /// command applies now. If every try fails, the outcome stays unknown
    /// and nothing is answered ([`Decision::Unknown`]).
    async fn decide_alone(&self, incoming: &Received, mut uncertain: bool) -> Decision {
        let mut retries = 0;
        let mut asked_again = 0;
        loop {
            let decided = self
                .silence
                .within(
                    self.deadline,
                    self.decide(&incoming.message, &incoming.reply_to, &incoming.span),
                )
                .await;
            let e = match decided {
                Ok(Ok(decision)) => return decision,
                Ok(Err(e)) => e,
                Err(silent) => {
                    // Whether it committed is unknown, and the database
                    // would be as silent when asked again.
                    tracing::warn!(participant = %self.name, saga_id = %incoming.message.saga_id, key = %incoming.message.idempotency_key, error = %silent, "database silent: no answer; the orchestrator's timeout retries the key");
                    return self.unknown();
                }
            };
            let key = &incoming.message.idempotency_key;
            if lost_a_race(&e.error) && retries < RACE_RETRIES {
                retries += 1;
                tracing::debug!(participant = %self.name, %key, error = %e.error, "deciding the command again");
                continue;
            }
            uncertain |= e.at_commit;
            if uncertain && asked_again < ASK_AGAIN.len() {
                // The pool's other connections may have broken with this
                // one: each try after a short pause gets a fresh one.
                tracing::warn!(participant = %self.name, %key, error = %e.error, "commit outcome unknown; asking the inbox on a fresh connection");
                tokio::time::sleep(ASK_AGAIN[asked_again]).await;
                asked_again += 1;
                continue;
            }
            if uncertain {
                tracing::warn!(participant = %self.name, saga_id = %incoming.message.saga_id, %key, error = %e.error, "commit outcome unknown and the inbox unreachable: no answer; the orchestrator's timeout retries the key");
                return self.unknown();
            }
            return self.transient(
                &incoming.message,
                &incoming.reply_to,
                format!("database error: {}", e.error),
            );
        }
    }

    /// Decides the commands `which` of `batch` (distinct keys, none
    /// compensating another) in one transaction: one claim statement, the
    /// handlers in order, one statement recording every outcome and reply,
    /// one commit.
    async fn decide_together(
        &self,
        batch: &[Received],
        which: &[usize],
    ) -> Result<Vec<Decision>, BatchError> {
        let messages: Vec<&CommandMessage> = which.iter().map(|&i| &*batch[i].message).collect();
        let mut tx = Tx::new(self.pool.begin().await?);
        let claimed = inbox::claim_all(tx.conn(), &messages).await?;
        let known: Vec<&str> = messages
            .iter()
            .map(|m| m.idempotency_key.as_str())
            .filter(|key| !claimed.contains(*key))
            .collect();
        let mut stored = if known.is_empty() {
            HashMap::new()
        } else {
            inbox::stored_outcomes(tx.conn(), &known).await?
        };
        let mut outcomes = Vec::with_capacity(which.len());
        for &i in which {
            let message = &batch[i].message;
            let key = message.idempotency_key.as_str();
            outcomes.push(if claimed.contains(key) {
                let span = crate::kit::spans::handle(&batch[i].span, message);
                match self.execute(&mut tx, message).instrument(span).await? {
                    Executed::Clean(outcome) => (outcome, true),
                    Executed::RejectedAfterWriting(_) => {
                        return Err(BatchError::RejectedAfterWriting);
                    }
                }
            } else {
                let outcome = stored.remove(key).ok_or(BatchError::NoStoredOutcome)?;
                (outcome, false)
            });
        }
        let mut replies = Vec::with_capacity(which.len());
        let mut positions = Vec::with_capacity(which.len());
        for (position, (&i, (outcome, fresh))) in which.iter().zip(&outcomes).enumerate() {
            let Received {
                message, reply_to, ..
            } = &batch[i];
            let key = message.idempotency_key.as_str();
            if self.faults.drop_reply() {
                tracing::warn!(participant = %self.name, saga_id = %message.saga_id, key, "fault injection: dropping the reply");
                if *fresh {
                    inbox::complete(tx.conn(), key, outcome).await?;
                }
                continue;
            }
            replies.push(outbox::BatchReply {
                pending: PendingReply::new(reply_to, &inbox::reply(message, outcome)),
                completes: fresh.then_some((key, outcome)),
            });
            positions.push(position);
        }
        if !replies.is_empty() {
            outbox::insert_all(tx.conn(), &mut replies).await?;
        }
        tx.commit().await.map_err(BatchError::CommitUnknown)?;
        let mut pending: Vec<Option<PendingReply>> = which.iter().map(|_| None).collect();
        for (position, reply) in positions.into_iter().zip(replies) {
            pending[position] = Some(reply.pending);
        }
        let count =
            |pick: fn(&(Outcome, bool)) -> bool| outcomes.iter().filter(|o| pick(o)).count() as u64;
        let applied = count(|(o, fresh)| *fresh && matches!(o, Outcome::Success(_)));
        let rejected = count(|(o, fresh)| *fresh && matches!(o, Outcome::Rejected(_)));
        let replayed = count(|(_, fresh)| !*fresh);
        for (counter, metric, by) in [
            (
                &self.stats.batched,
                "participant_commands_batched_total",
                which.len() as u64,
            ),
            (
                &self.stats.applied,
                "participant_commands_applied_total",
                applied,
            ),
            (
                &self.stats.rejected,
                "participant_commands_rejected_total",
                rejected,
            ),
            (
                &self.stats.replayed,
                "participant_commands_replayed_total",
                replayed,
            ),
        ] {
            if by > 0 {
                bump(counter, &self.name, metric, by);
            }
        }
        Ok(outcomes
            .into_iter()
            .zip(pending)
            .map(|((_, fresh), pending)| Decision::Answered {
                pending,
                replay: !fresh,
            })
            .collect())
    }

    /// Whether a handler is registered for `command`.
    pub(crate) fn handles(&self, command: &str) -> bool {
        self.routes.contains_key(command)
    }

    async fn decide(
        &self,
        message: &Arc<CommandMessage>,
        reply_to: &str,
        delivery: &tracing::Span,
    ) -> Result<Decision, DecideError> {
        let mut tx = Tx::new(self.pool.begin().await?);
        if !inbox::claim(tx.conn(), message).await? {
            return self.replay(tx, message, reply_to).await;
        }
        let span = crate::kit::spans::handle(delivery, message);
        let outcome = match self.execute(&mut tx, message).instrument(span).await {
            Ok(Executed::Clean(outcome)) => outcome,
            Ok(Executed::RejectedAfterWriting(reason)) => {
                // Actions run without a savepoint (two round trips fewer on
                // every success); a rejection instead rolls everything back
                // and records itself in a fresh transaction.
                tx.rollback().await?;
                tx = Tx::new(self.pool.begin().await?);
                if !inbox::claim(tx.conn(), message).await? {
                    // A duplicate delivery claimed the key meanwhile.
                    return self.replay(tx, message, reply_to).await;
                }
                Outcome::Rejected(reason)
            }
            Err(HandlerError::Database(e)) if lost_a_race(&e) => {
                // A deadlock victim: nothing applied; the caller tries again.
                tx.rollback().await.ok();
                return Err(e.into());
            }
            Err(e) => {
                tx.rollback().await.ok();
                return Ok(self.transient(message, reply_to, e.transient_reason()));
            }
        };
        let pending = self
            .queue_reply(tx.conn(), message, &outcome, reply_to, true)
            .await?;
        tx.commit().await.map_err(commit_unknown)?;
        match outcome {
            Outcome::Success(_) => bump(
                &self.stats.applied,
                &self.name,
                "participant_commands_applied_total",
                1,
            ),
            Outcome::Rejected(_) => bump(
                &self.stats.rejected,
                &self.name,
                "participant_commands_rejected_total",
                1,
            ),
        }
        Ok(Decision::Answered {
            pending,
            replay: false,
        })
    }

    /// Answers a key already claimed with its stored outcome.
    async fn replay(
        &self,
        mut tx: Tx,
        message: &Arc<CommandMessage>,
        reply_to: &str,
    ) -> Result<Decision, DecideError> {
        let key = message.idempotency_key.as_str();
        let outcome = inbox::stored_outcomes(tx.conn(), &[key])
            .await?
            .remove(key)
            .ok_or_else(|| sqlx::Error::RowNotFound)?;
        let pending = self
            .queue_reply(tx.conn(), message, &outcome, reply_to, false)
            .await?;
        // A replay's commit only adds a reply row: whether or not it
        // committed, the stored outcome stands, so asking again is safe.
        tx.commit().await.map_err(commit_unknown)?;
        bump(
            &self.stats.replayed,
            &self.name,
            "participant_commands_replayed_total",
            1,
        );
        Ok(Decision::Answered {
            pending,
            replay: true,
        })
    }

    /// No answer: the outcome is unknown (see [`Decision::Unknown`]).
    fn unknown(&self) -> Decision {
        bump(
            &self.stats.unknown,
            &self.name,
            "participant_commands_unanswered_total",
            1,
        );
        Decision::Unknown
    }

    /// A `transient_error` answer: nothing was applied, the orchestrator
    /// retries.
    pub(crate) fn transient(
        &self,
        message: &CommandMessage,
        reply_to: &str,
        reason: String,
    ) -> Decision {
        tracing::warn!(participant = %self.name, saga_id = %message.saga_id, key = %message.idempotency_key, %reason, "transient error");
        bump(
            &self.stats.transient,
            &self.name,
            "participant_commands_transient_total",
            1,
        );
        Decision::Transient {
            pending: PendingReply::new(reply_to, &inbox::transient_reply(message, reason)),
        }
    }

    /// Runs the command in the claimed transaction.
    async fn execute(
        &self,
        tx: &mut Tx,
        message: &Arc<CommandMessage>,
    ) -> Result<Executed, HandlerError> {
        let clean = |reason: String| Ok(Executed::Clean(Outcome::Rejected(reason)));
        if message.participant != self.name {
            return clean(format!(
                "command addressed to participant {:?} reached {:?}",
                message.participant, self.name
            ));
        }
        let Some(route) = self.routes.get(&message.command) else {
            let known: Vec<&str> = self.routes.keys().map(String::as_str).collect();
            return clean(format!(
                "unknown command {:?} for participant {}; known: {}",
                message.command,
                self.name,
                known.join(", ")
            ));
        };
        if route.phase != message.phase {
            return clean(format!(
                "command {} is registered as {}, received as {}",
                message.command,
                inbox::phase_name(route.phase),
                inbox::phase_name(message.phase)
            ));
        }
        if route.phase == Phase::Action {
            return Ok(match self.call(tx, route, message, None).await? {
                Outcome::Rejected(reason) => Executed::RejectedAfterWriting(reason),
                success => Executed::Clean(success),
            });
        }
        let Some(action_key) = message.compensates.as_deref() else {
            return clean("a compensation must name the action it undoes in `compensates`".into());
        };
        let noop = |why: &'static str| {
            barrier_outcome(&self.name, why);
            bump(
                &self.stats.compensation_noops,
                &self.name,
                "participant_compensation_noops_total",
                1,
            );
            Outcome::Success(serde_json::json!({ "noop": why }))
        };
        Ok(Executed::Clean(
            match barrier::enter(tx.conn(), message, action_key).await? {
                Barrier::ActionNeverArrived => noop("action_never_arrived"),
                Barrier::AlreadyCompensated(_) => noop("already_compensated"),
                Barrier::ActionRejected => {
                    barrier::mark_compensated(tx.conn(), action_key, &message.idempotency_key)
                        .await?;
                    noop("action_rejected")
                }
                Barrier::Undo(action_data) => {
                    barrier_outcome(&self.name, "undo");
                    let outcome = self
                        .call_in_savepoint(tx, route, message, action_data)
                        .await?;
                    if matches!(outcome, Outcome::Success(_)) {
                        barrier::mark_compensated(tx.conn(), action_key, &message.idempotency_key)
                            .await?;
                    }
                    outcome
                }
            },
        ))
    }

    /// Calls a compensation handler inside a savepoint, so a rejection
    /// leaves no trace of what it wrote but keeps the barrier's reads.
    /// (Rejected compensations are rare; actions skip the savepoint.)
    async fn call_in_savepoint(
        &self,
        tx: &mut Tx,
        route: &Route,
        message: &Arc<CommandMessage>,
        action_data: serde_json::Value,
    ) -> Result<Outcome, HandlerError> {
        sqlx::query("SAVEPOINT kit_handler")
            .execute(tx.conn())
            .await?;
        let outcome = self.call(tx, route, message, Some(action_data)).await?;
        let end = match outcome {
            Outcome::Success(_) => "RELEASE SAVEPOINT kit_handler",
            Outcome::Rejected(_) => "ROLLBACK TO SAVEPOINT kit_handler",
        };
        sqlx::query(end).execute(tx.conn()).await?;
        Ok(outcome)
    }

    /// Calls the handler (its payload decoding error is a rejection).
    async fn call(
        &self,
        tx: &Tx,
        route: &Route,
        message: &Arc<CommandMessage>,
        action_data: Option<serde_json::Value>,
    ) -> Result<Outcome, HandlerError> {
        let command = Command {
            message: message.clone(),
            payload: message.payload.clone(),
            action_data,
        };
        Ok(match (route.handler)(tx, command) {
            Ok(handling) => handling.await?,
            Err(reason) => Outcome::Rejected(reason),
        })
    }

    /// Writes the reply to `outcome` in the outbox; with `record_outcome`
    /// (a fresh claim, not a replay), also records the outcome in the
    /// command's inbox row (in the same statement).
    async fn queue_reply(
        &self,
        tx: &mut sqlx::PgConnection,
        message: &CommandMessage,
        outcome: &Outcome,
        reply_to: &str,
        record_outcome: bool,
    ) -> Result<Option<PendingReply>, sqlx::Error> {
        let key = message.idempotency_key.as_str();
        if self.faults.drop_reply() {
            tracing::warn!(participant = %self.name, saga_id = %message.saga_id, key = %message.idempotency_key, "fault injection: dropping the reply");
            if record_outcome {
                inbox::complete(tx, key, outcome).await?;
            }
            return Ok(None);
        }
        let mut pending = PendingReply::new(reply_to, &inbox::reply(message, outcome));
        if record_outcome {
            outbox::insert_completing(tx, key, outcome, &mut pending).await?;
        } else {
            outbox::insert(tx, &mut pending).await?;
        }
        Ok(Some(pending))
    }
}

/// Counts what the compensation barrier found
/// (`participant_barrier_outcomes_total`): `undo`, or why there was nothing
/// to undo.
fn barrier_outcome(participant: &str, outcome: &'static str) {
    metrics::counter!(
        "participant_barrier_outcomes_total",
        "participant" => participant.to_owned(),
        "outcome" => outcome,
    )
    .increment(1);
}
