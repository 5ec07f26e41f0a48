//! The engine: load → apply the pure machine → persist state, history and
//! outbox in one transaction → commit → act. Turning actions into wire
//! messages is [`crate::messages`]'s; what happens after the commit is
//! [`crate::after_commit`]'s.
//!
//! Every event goes through one write: a start through the start writers
//! ([`Engine::start`]), replies ([`Engine::apply_replies`]) through one
//! compare-and-set statement on each cached saga's revision, or under row
//! locks (`FOR UPDATE`, in id order) for the others, timers
//! ([`Engine::fire_due_timers`]) and operator events ([`Engine::cancel`],
//! [`Engine::retry`]) under row locks. So no saga is ever driven by two
//! instances at once. Only after the commit are messages handed to the
//! publisher and timers armed. A crash at any point either loses the whole
//! write (the event is redelivered or re-fired) or leaves committed outbox
//! rows that the relay publishes.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use sagas::{
    Catalog, CatalogError, Context, Delivery, Event, HistoryEntry, InputError, Phase, Refused,
    SagaInstance, TimerFired, TimerKind,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    admission::{Admission, AtCapacity},
    after_commit::AfterCommit,
    backlog::Backlogs,
    health::Health,
    messages::{self, Effects, Envelopes, Received, reply_event},
    starts::StartWriter,
    store::{
        Store, StoreError,
        outbox::{self, OutboxMessage},
        sagas::{self as saga_rows, NewSaga, SagaRecord},
        transition::{self, StartRow},
    },
    telemetry::spans::{self, Cause},
    timers::TimerSweep,
};

/// An event for a saga, with the span it was caused by: a reply's
/// delivery span, or `None` for the saga's own trace (timers, operator
/// calls).
type Caused = (Uuid, Event, Option<tracing::Span>);

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The saga input is invalid.
    #[error("invalid input")]
    InvalidInput(#[from] InputError),
    /// Unknown saga type or version.
    #[error(transparent)]
    UnknownFlow(#[from] CatalogError),
    /// No saga with that id.
    #[error("saga {0} not found")]
    SagaNotFound(Uuid),
    /// The saga's state does not allow the request.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The saga holding an idempotency key vanished between two statements
    /// (it cannot: sagas are never deleted); retrying is safe.
    #[error("idempotency key conflict could not be resolved; retry")]
    IdempotencyRace,
    /// The engine is stopping; nothing was written.
    #[error("the orchestrator is shutting down")]
    ShuttingDown,
    /// Too many sagas in flight: the start was refused before anything
    /// was written.
    #[error(transparent)]
    AtCapacity(#[from] AtCapacity),
}

impl EngineError {
    /// The database could not be reached: nothing was written, or (a lost
    /// commit) whether it was is unknown. Waiting for the database is the
    /// only cure; retrying at once is not.
    pub fn is_database_away(&self) -> bool {
        match self {
            Self::Store(StoreError::Database(error)) => is_connection_error(error),
            Self::Store(StoreError::Silent(_)) => true,
            _ => false,
        }
    }
}

impl From<sqlx::Error> for EngineError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(error))
    }
}

/// A `StartSaga` request, validated by the API layer for shape.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// Flow name.
    pub saga_type: String,
    /// Flow version; 0 = latest.
    pub version: u32,
    /// Input JSON as sent.
    pub input: String,
    /// Idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// The principal starting it (recorded with the saga).
    pub started_by: String,
}

/// The answer to a start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// The saga's id.
    pub saga_id: Uuid,
    /// False when the idempotency key was seen before.
    pub created: bool,
}

/// Drives sagas: the only writer of saga state.
#[derive(Debug)]
pub struct Engine {
    /// Where saga state, history and outbox rows are written.
    store: Store,
    /// Flow definitions.
    catalog: Arc<Catalog>,
    /// Turns the machine's actions into wire messages.
    envelopes: Envelopes,
    /// What happens once a transition is committed.
    after_commit: AfterCommit,
    /// Reports database reachability.
    health: Health,
    /// Writes concurrent starts together.
    starts: StartWriter,
    /// Which participants are busy, for the timers (see [`Backlogs`]).
    backlogs: Backlogs,
    /// Bounds the sagas in flight (see [`crate::admission`]).
    admission: Admission,
}

/// One saga's new state, the revision it was computed from, and effects.
#[derive(Debug)]
struct Change {
    /// Revision (history seq) of the state the events were applied to.
    expected: u64,
    /// The new state.
    state: SagaInstance,
    /// What the transitions produced.
    effects: Effects,
}

fn context(now: DateTime<Utc>) -> Context {
    Context {
        now_ms: now.timestamp_millis(),
        jitter: rand::random::<f64>(),
    }
}

impl Engine {
    /// An engine over `store` running the flows of `catalog`, addressing
    /// its messages with `envelopes` and handing committed transitions to
    /// `after_commit`.
    pub fn new(
        store: Store,
        catalog: Arc<Catalog>,
        envelopes: Envelopes,
        after_commit: AfterCommit,
        health: Health,
    ) -> Self {
        Self {
            admission: after_commit.admission().clone(),
            catalog,
            envelopes,
            after_commit,
            health,
            starts: StartWriter::spawn(store.clone()),
            store,
            backlogs: Backlogs::default(),
        }
    }

    /// The admission control of starts.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// The participants' backlogs: the bus reads their queues into it.
    pub fn backlogs(&self) -> &Backlogs {
        &self.backlogs
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The flow catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Starts a saga, idempotently on (type, idempotency key). Input is
    /// validated, and the start admitted ([`crate::admission`]), before
    /// anything is written.
    pub async fn start(&self, request: StartRequest) -> Result<Started, EngineError> {
        let flow = self.catalog.get(&request.saga_type, request.version)?;
        let data = flow.parse_input(&request.input)?;
        let attributes: Vec<(String, String)> = flow
            .attributes_of(&request.input)?
            .into_iter()
            .map(|(name, value)| (name.into(), value))
            .collect();
        // Refused at capacity without a lookup of the idempotency key: a
        // refusal must cost the overloaded database nothing. A client
        // retrying a key that did start is answered with that saga once
        // admitted again.
        let permit = self.admission.try_admit()?;
        let now = Utc::now();
        let saga_id = Uuid::now_v7();
        let (mut state, transition) = sagas::start(&flow, saga_id, data, context(now));
        // The API call's span is the saga's root: its timers and operator
        // calls hang from it later.
        tracing::Span::current().record("saga.id", tracing::field::display(saga_id));
        tracing::Span::current().record("saga.version", state.version);
        state.trace = spans::root_of_current();
        let mut effects = Effects::default();
        self.envelopes
            .collect(&state, transition, now, &mut effects);
        let new = NewSaga {
            state: &state,
            idempotency_key: request.idempotency_key.as_deref(),
            input: &request.input,
            now,
            started_by: &request.started_by,
            attributes: &attributes,
        };
        let history = std::mem::take(&mut effects.history);
        let outbox = std::mem::take(&mut effects.outbox);
        let row = StartRow::new(&new, history, outbox);
        let result = async {
            // Written together with the other starts waiting (one commit;
            // the writer bounds the write, not the wait in its queue, so a
            // start is never reported failed and written afterwards).
            // A taken key is looked up; the saga holding it is committed
            // (ON CONFLICT waited for it).
            let written = self
                .starts
                .write(row)
                .await
                .map_err(|_| EngineError::ShuttingDown)??;
            match written {
                Some(published) => Ok::<_, EngineError>((saga_id, Some(published))),
                None => {
                    let key = request.idempotency_key.as_deref().unwrap_or_default();
                    let existing = self
                        .store
                        .within(async {
                            let mut conn = self.store.pool().acquire().await?;
                            saga_rows::find_by_idempotency_key(&mut conn, &request.saga_type, key)
                                .await
                                .map_err(EngineError::from)
                        })
                        .await?
                        .ok_or(EngineError::IdempotencyRace)?;
                    Ok((existing, None))
                }
            }
        }
        .await;
        let (saga_id, published) = self.observe(result)?;
        let created = published.is_some();
        if let Some(published) = published {
            permit.started();
            crate::telemetry::metrics::started(&request.saga_type);
            self.after_commit.act(&state, published, &effects.measured);
        }
        Ok(Started { saga_id, created })
    }

    /// Applies a batch of replies. Sagas whose state is cached are written
    /// in one compare-and-set statement; the others, and any whose cached
    /// copy proved stale, in one transaction under row locks.
    pub async fn apply_replies(&self, replies: &[Received]) -> Result<(), EngineError> {
        let events: Vec<Caused> = replies
            .iter()
            .map(|r| (r.reply.saga_id, reply_event(&r.reply), Some(r.span.clone())))
            .collect();
        let result = self.store.within(self.apply_events(&events)).await;
        self.observe(result)?;
        metrics::counter!("saga_replies_applied_total").increment(replies.len() as u64);
        Ok(())
    }

    /// Fires the timers of up to `limit` sagas that are due; returns how many
    /// sagas it handled.
    pub async fn fire_due_timers(&self, limit: i64) -> Result<usize, EngineError> {
        let result = self
            .store
            .within(async {
                let now = Utc::now();
                let mut tx = self.store.pool().begin().await?;
                let states = saga_rows::claim_due(&mut tx, now, limit).await?;
                if states.is_empty() {
                    tx.rollback().await?;
                    return Ok::<_, EngineError>(Vec::new());
                }
                let due: Vec<(Uuid, TimerFired)> = states
                    .iter()
                    .flat_map(|s| {
                        s.due_timers(now.timestamp_millis())
                            .into_iter()
                            .map(|t| (s.id, self.queued(s, t)))
                    })
                    .collect();
                let events: Vec<Caused> = self
                    .with_delivery(&mut tx, due)
                    .await?
                    .into_iter()
                    .map(|(id, t)| (id, Event::TimerFired(t), None))
                    .collect();
                let changes = self.apply_all(
                    states.into_iter().map(|s| (s.id, s)).collect(),
                    &events,
                    now,
                );
                let (written, _) = self.write_changes(&mut tx, changes, &[], now, None).await?;
                crate::crash_point!("orchestrator::timer_before_commit");
                tx.commit().await?;
                Ok(written)
            })
            .await;
        let written = self.observe(result)?;
        let count = written.len();
        metrics::counter!("saga_timers_fired_total").increment(count as u64);
        for (change, published) in written {
            self.after_commit
                .act(&change.state, published, &change.effects.measured);
        }
        Ok(count)
    }

    /// Marks a due reply timeout [`Delivery::Queued`] when its step's
    /// participant is busy: its command may still wait in that queue.
    fn queued(&self, state: &SagaInstance, mut timer: TimerFired) -> TimerFired {
        if timer.kind != TimerKind::ReplyTimeout {
            return timer;
        }
        let Ok(flow) = self.catalog.get(&state.saga_type, state.version) else {
            return timer;
        };
        let busy = flow
            .step_index(&timer.step)
            .is_some_and(|i| self.backlogs.busy(flow.steps()[i].participant.as_str()));
        if busy {
            timer.delivery = Delivery::Queued;
        }
        timer
    }

    /// Tells each due timer what stands between its step and the
    /// participant, so that the machine holds those that came due during an
    /// outage instead of counting them: with no broker connection every
    /// timer is held; otherwise a reply timeout whose command is still in
    /// the outbox is (the broker never confirmed it: the participant cannot
    /// have it, whichever instance wrote it), and one whose participant is
    /// busy already came marked [`Delivery::Queued`] (see [`Backlogs`]).
    async fn with_delivery(
        &self,
        conn: &mut PgConnection,
        mut due: Vec<(Uuid, TimerFired)>,
    ) -> Result<Vec<(Uuid, TimerFired)>, EngineError> {
        if !self.health.broker_up() {
            for (_, timer) in &mut due {
                timer.delivery = Delivery::BrokerAway;
            }
            return Ok(due);
        }
        let mut waiting: Vec<Uuid> = due
            .iter()
            .filter(|(_, t)| t.kind == TimerKind::ReplyTimeout)
            .map(|(id, _)| *id)
            .collect();
        waiting.dedup();
        if waiting.is_empty() {
            return Ok(due);
        }
        let confirmed = self.store.confirmed().not_deleted();
        let unsent: HashSet<(Uuid, String, Phase, u32)> =
            outbox::unsent_commands(conn, &waiting, &confirmed)
                .await?
                .into_iter()
                .filter_map(|(saga, body)| {
                    let (step, phase, attempt) = messages::command_attempt(&body)?;
                    Some((saga, step, phase, attempt))
                })
                .collect();
        for (id, timer) in &mut due {
            if timer.kind == TimerKind::ReplyTimeout
                && unsent.contains(&(*id, timer.step.clone(), timer.phase, timer.attempt))
            {
                timer.delivery = Delivery::Unsent;
            }
        }
        Ok(due)
    }

    /// Asks a running saga to compensate what it did; `by` is recorded
    /// with the history rows it produces.
    pub async fn cancel(
        &self,
        saga_id: Uuid,
        reason: String,
        by: &str,
    ) -> Result<SagaRecord, EngineError> {
        self.operator_event(saga_id, Event::CancelRequested { reason }, by)
            .await
    }

    /// Resumes a FAILED saga where it stopped; `by` is recorded with the
    /// history rows it produces.
    pub async fn retry(&self, saga_id: Uuid, by: &str) -> Result<SagaRecord, EngineError> {
        self.operator_event(saga_id, Event::OperatorRetry, by).await
    }

    /// The participant of `step` in `saga_id`'s flow, if the saga and the
    /// step exist (for checking who may answer for it).
    pub async fn step_participant(
        &self,
        saga_id: Uuid,
        step: &str,
    ) -> Result<Option<String>, EngineError> {
        let (cached, _) = self.after_commit.cache().get_many(&[saga_id]);
        let flow_of = match cached.get(&saga_id) {
            Some(state) => Some((state.saga_type.clone(), state.version)),
            None => {
                let found = self
                    .store
                    .within(saga_rows::flow_of(self.store.pool(), saga_id))
                    .await
                    .map_err(EngineError::from);
                self.observe(found)?
            }
        };
        let Some((saga_type, version)) = flow_of else {
            return Ok(None);
        };
        let Ok(flow) = self.catalog.get(&saga_type, version) else {
            return Ok(None);
        };
        Ok(flow
            .steps()
            .iter()
            .find(|s| s.name.as_str() == step)
            .map(|s| s.participant.to_string()))
    }

    /// One saga as stored.
    pub async fn get(&self, saga_id: Uuid) -> Result<SagaRecord, EngineError> {
        let found = self
            .store
            .within(saga_rows::get(self.store.pool(), saga_id))
            .await
            .map_err(EngineError::from);
        self.observe(found)?
            .ok_or(EngineError::SagaNotFound(saga_id))
    }

    async fn operator_event(
        &self,
        saga_id: Uuid,
        event: Event,
        by: &str,
    ) -> Result<SagaRecord, EngineError> {
        let now = Utc::now();
        let result = self
            .store
            .within(async {
                let mut tx = self.store.pool().begin().await?;
                let mut states = saga_rows::lock(&mut tx, &[saga_id]).await?;
                let state = states.pop().ok_or(EngineError::SagaNotFound(saga_id))?;
                let flow = self.catalog.get(&state.saga_type, state.version)?;
                let span = spans::transition(&state, &event, Cause::Saga);
                let entered = span.enter();
                // Refusals are checked before anything is written.
                let (next, transition) = sagas::apply(&state, &flow, &event, context(now))?;
                let mut effects = Effects::default();
                self.envelopes.collect(&next, transition, now, &mut effects);
                drop(entered);
                let change = Change {
                    expected: state.seq,
                    state: next,
                    effects,
                };
                let (written, _) = self
                    .write_changes(&mut tx, vec![change], &[], now, Some(by))
                    .await?;
                tx.commit().await?;
                Ok::<_, EngineError>(written)
            })
            .await;
        for (change, published) in self.observe(result)? {
            self.after_commit
                .act(&change.state, published, &change.effects.measured);
        }
        self.get(saga_id).await
    }

    /// Applies events: the cached sagas with one compare-and-set statement,
    /// the rest (and stale ones) in a transaction under row locks.
    async fn apply_events(&self, events: &[Caused]) -> Result<(), EngineError> {
        let now = Utc::now();
        let mut ids: Vec<Uuid> = events.iter().map(|(id, _, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        let (cached, mut locked_ids) = self.after_commit.cache().get_many(&ids);
        if !cached.is_empty() {
            let mut conn = self.store.pool().acquire().await?;
            let fast: Vec<Caused> = events
                .iter()
                .filter(|(id, _, _)| cached.contains_key(id))
                .cloned()
                .collect();
            let changes = self.apply_all(cached, &fast, now);
            // The statement commits on its own: it also deletes outbox rows
            // confirmed meanwhile, handed back if it fails.
            let confirmed = if changes.is_empty() {
                Vec::new()
            } else {
                self.store.confirmed().take(outbox::MAX_DELETES_PER_WRITE)
            };
            let written = self
                .write_changes(&mut conn, changes, &confirmed, now, None)
                .await;
            if written.is_err() {
                self.store.confirmed().put_back(confirmed);
            }
            let (written, stale) = written?;
            drop(conn);
            for (change, published) in written {
                self.after_commit
                    .act(&change.state, published, &change.effects.measured);
            }
            for id in &stale {
                self.after_commit.cache().forget(id);
            }
            metrics::counter!("saga_stale_cache_writes_total").increment(stale.len() as u64);
            locked_ids.extend(stale);
        }
        if locked_ids.is_empty() {
            return Ok(());
        }
        locked_ids.sort_unstable();
        let slow: Vec<Caused> = events
            .iter()
            .filter(|(id, _, _)| locked_ids.binary_search(id).is_ok())
            .cloned()
            .collect();
        let mut tx = self.store.pool().begin().await?;
        let states = saga_rows::lock(&mut tx, &locked_ids).await?;
        let changes = self.apply_all(states.into_iter().map(|s| (s.id, s)).collect(), &slow, now);
        let (written, _) = self.write_changes(&mut tx, changes, &[], now, None).await?;
        tx.commit().await?;
        for (change, published) in written {
            self.after_commit
                .act(&change.state, published, &change.effects.measured);
        }
        Ok(())
    }

    /// Applies `events` in order to `states`; one [`Change`] per saga that
    /// an event changed.
    fn apply_all(
        &self,
        mut states: HashMap<Uuid, SagaInstance>,
        events: &[Caused],
        now: DateTime<Utc>,
    ) -> Vec<Change> {
        let mut changes: Vec<Change> = Vec::new();
        let mut index: HashMap<Uuid, usize> = HashMap::new();
        for (saga_id, event, cause) in events {
            let state = match index.get(saga_id) {
                Some(&i) => &changes[i].state,
                None => match states.get(saga_id) {
                    Some(state) => state,
                    None => {
                        tracing::warn!(%saga_id, "message for an unknown saga ignored");
                        metrics::counter!("saga_messages_for_unknown_sagas_total").increment(1);
                        continue;
                    }
                },
            };
            let flow = match self.catalog.get(&state.saga_type, state.version) {
                Ok(flow) => flow,
                Err(error) => {
                    tracing::error!(%saga_id, %error, "saga runs a flow version this orchestrator does not have");
                    continue;
                }
            };
            if let Event::Reply(reply) = event
                && let Some(i) = flow.step_index(&reply.step)
            {
                self.backlogs.replied(flow.steps()[i].participant.as_str());
            }
            let cause = match cause {
                Some(span) => Cause::Span(span),
                None => Cause::Saga,
            };
            let span = spans::transition(state, event, cause);
            let _entered = span.enter();
            match sagas::apply(state, &flow, event, context(now)) {
                Ok((next, transition)) => match index.get(saga_id) {
                    Some(&i) => {
                        let change = &mut changes[i];
                        self.envelopes
                            .collect(&next, transition, now, &mut change.effects);
                        change.state = next;
                    }
                    None => {
                        let original = states.remove(saga_id).expect("present above");
                        let mut effects = Effects::default();
                        self.envelopes.collect(&next, transition, now, &mut effects);
                        index.insert(*saga_id, changes.len());
                        changes.push(Change {
                            expected: original.seq,
                            state: next,
                            effects,
                        });
                    }
                },
                Err(refused) => tracing::warn!(%saga_id, %refused, "event refused"),
            }
        }
        changes
    }

    /// Writes changes with compare-and-set, deleting the `confirmed` outbox
    /// rows on the way; returns the written ones with their outbox rows
    /// (ids assigned) and the ids of the stale ones. `actor` is the
    /// principal whose call caused the changes, if any.
    async fn write_changes(
        &self,
        conn: &mut PgConnection,
        mut changes: Vec<Change>,
        confirmed: &[i64],
        now: DateTime<Utc>,
        actor: Option<&str>,
    ) -> Result<(Vec<(Change, Vec<OutboxMessage>)>, Vec<Uuid>), EngineError> {
        if changes.is_empty() {
            debug_assert!(confirmed.is_empty(), "nothing to carry the deletes");
            return Ok((Vec::new(), Vec::new()));
        }
        let history: Vec<(Uuid, HistoryEntry)> = changes
            .iter_mut()
            .flat_map(|c| std::mem::take(&mut c.effects.history))
            .collect();
        let mut outbox: Vec<OutboxMessage> = changes
            .iter_mut()
            .flat_map(|c| std::mem::take(&mut c.effects.outbox))
            .collect();
        let states: Vec<(&SagaInstance, u64)> =
            changes.iter().map(|c| (&c.state, c.expected)).collect();
        let written = transition::write(
            conn,
            &states,
            &history,
            actor,
            &outbox,
            confirmed,
            now,
            now + outbox::PUBLISH_LEASE,
        )
        .await?;
        let ids: HashMap<Uuid, i64> = written.outbox_ids.into_iter().collect();
        for message in &mut outbox {
            message.id = ids.get(&message.message_id).copied().unwrap_or(0);
        }
        let mut by_saga: HashMap<Uuid, Vec<OutboxMessage>> = HashMap::new();
        for message in outbox.into_iter().filter(|m| m.id != 0) {
            by_saga.entry(message.saga_id).or_default().push(message);
        }
        let updated: std::collections::HashSet<Uuid> = written.updated.into_iter().collect();
        let mut done = Vec::new();
        let mut stale = Vec::new();
        for change in changes {
            if updated.contains(&change.state.id) {
                let published = by_saga.remove(&change.state.id).unwrap_or_default();
                done.push((change, published));
            } else {
                stale.push(change.state.id);
            }
        }
        Ok((done, stale))
    }

    /// Mirrors database reachability into health.
    fn observe<T>(&self, result: Result<T, EngineError>) -> Result<T, EngineError> {
        match &result {
            Err(error) if error.is_database_away() => self.health.set_database(false),
            Ok(_) => self.health.set_database(true),
            Err(_) => {}
        }
        result
    }
}

/// Whether a database error means "unreachable" rather than "bad statement".
pub fn is_connection_error(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    ) || matches!(error, sqlx::Error::Database(e) if e.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}

impl TimerSweep for Engine {
    type Error = EngineError;

    async fn fire_due(&self, limit: i64) -> Result<usize, EngineError> {
        self.fire_due_timers(limit).await
    }
}
