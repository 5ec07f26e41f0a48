//! The pure saga state machine: `(state, event) -> (state, actions)`.
//!
//! No I/O, no clock, no randomness: the current time and a jitter sample come
//! in with every event through [`Context`], so the same inputs always give
//! the same outputs. The orchestrator persists the returned state, the
//! [`HistoryEntry`]s and the outgoing commands in one database transaction and
//! only then carries out the [`Action`]s.
//!
//! Semantics worth knowing:
//! - A reply timeout means *outcome unknown*: the action is retried with the
//!   same idempotency key; when retries run out a compensatable step is
//!   compensated too (participants treat a compensation for an action they
//!   never saw as a successful no-op).
//! - A business rejection is final for the step: no retry.
//! - A transient error means "this delivery did not apply, try again":
//!   retried with backoff. It does not prove the action never applies: a
//!   duplicate of the same command may still be delivered, so only a
//!   rejection (which participants remember per key) clears the suspicion
//!   that an issued action took effect. A pivot answered with transient
//!   errors is retried past its budget (at the longest backoff): it can be
//!   neither undone nor assumed done, and nothing applied yet.
//! - A step's timer counts only while its command can be on its way: one
//!   that comes due while the command still waits in the outbox, or while
//!   the broker is out of reach ([`Delivery`]), is held (re-armed, no
//!   attempt counted); the first clear firing after a hold gives the
//!   participant a whole reply timeout again. An outage spends no retry
//!   budget.
//! - Replies and timers that do not match what a step waits for (older
//!   attempts, duplicates, anything after the saga ended) change nothing but
//!   a history entry.
//! - In a parallel group, a failing branch waits for the branches in flight
//!   to settle, then every branch that took effect (or may have) is
//!   compensated, then the earlier stages in reverse order.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{
    definition::{Flow, StepKind},
    instance::{
        Delivery, Direction, Phase, SagaInstance, SagaStatus, StepStatus, TimerFired, TimerKind,
        Wait,
    },
};

/// The shortest delay a held timer is re-armed for: an outage costs each
/// waiting saga at most one transition a second.
pub const HOLD_MIN_MS: i64 = 1_000;

/// The outside world's contribution to a transition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Context {
    /// Now, in milliseconds since the Unix epoch.
    pub now_ms: i64,
    /// A uniform sample in `[0, 1)` for retry jitter.
    pub jitter: f64,
}

/// What a participant answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done, with result data.
    Success(Value),
    /// Refused by a business rule; final, nothing applied.
    Rejected(String),
    /// Passing fault, nothing applied; retry.
    TransientError(String),
}

/// A reply to a command, as the machine sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The step the command belonged to.
    pub step: String,
    /// Action or compensation.
    pub phase: Phase,
    /// The command's attempt number.
    pub attempt: u32,
    /// What happened.
    pub outcome: Outcome,
}

/// Everything that can happen to a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// The saga was created: run the first stage.
    Started,
    /// A participant replied.
    Reply(Reply),
    /// A step's timer came due.
    TimerFired(TimerFired),
    /// Someone asked to stop the saga and undo what it did.
    CancelRequested {
        /// Free text for the history.
        reason: String,
    },
    /// An operator resumes a FAILED saga.
    OperatorRetry,
}

/// A command to send to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// The step.
    pub step: String,
    /// Action or compensation.
    pub phase: Phase,
    /// 1-based delivery number for this step and phase.
    pub attempt: u32,
    /// Participant (routing key).
    pub participant: String,
    /// Command name.
    pub command: String,
    /// Stable across retries of this logical command.
    pub idempotency_key: String,
    /// For a compensation, the key of the action it undoes.
    pub compensates: Option<String>,
    /// Arguments built from the saga's data.
    pub payload: Value,
}

/// Side effects for the orchestrator to carry out after it commits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Publish a command to a participant.
    SendCommand(Command),
    /// Wake the saga at `due_at_ms` (the timer itself is in the saga's state).
    ScheduleTimer {
        /// The step.
        step: String,
        /// Action or compensation.
        phase: Phase,
        /// See [`Wait::attempt`].
        attempt: u32,
        /// Reply timeout or retry backoff.
        kind: TimerKind,
        /// When, in milliseconds since the Unix epoch.
        due_at_ms: i64,
    },
    /// Announce that the saga entered `status`.
    PublishLifecycle {
        /// The new status.
        status: SagaStatus,
    },
    /// The saga stopped being driven (completed, compensated or failed).
    Finish {
        /// The terminal status.
        status: SagaStatus,
    },
}

/// What a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    /// The saga started.
    SagaStarted,
    /// A command was issued.
    CommandSent,
    /// An action succeeded.
    StepSucceeded,
    /// An action was rejected.
    StepRejected,
    /// An action or compensation answered with a transient error.
    TransientError,
    /// No reply in time: outcome unknown.
    StepTimedOut,
    /// A retry was scheduled after a backoff.
    RetryScheduled,
    /// A step failed for good.
    StepFailed,
    /// A step in flight was dropped without effect while compensating.
    StepAbandoned,
    /// Compensation of the saga began.
    CompensationStarted,
    /// A step's compensation took effect.
    StepCompensated,
    /// A step's compensation failed for good.
    CompensationFailed,
    /// The saga completed.
    SagaCompleted,
    /// The saga rolled back.
    SagaCompensated,
    /// The saga needs an operator.
    SagaFailed,
    /// A cancel was accepted.
    CancelRequested,
    /// An operator retry was accepted.
    OperatorRetry,
    /// A reply that matched nothing the saga waits for.
    ReplyIgnored,
    /// A timer that matched nothing the saga waits for.
    TimerIgnored,
    /// A timer came due while its command could not be on its way (see
    /// [`Delivery`]): re-armed, no attempt counted.
    TimerHeld,
    /// A held reply timeout came due with a clear path: the participant
    /// gets a whole timeout from now.
    TimerReleased,
    /// A second `Started`.
    StartIgnored,
}

impl HistoryKind {
    /// The snake_case name (as in `SagaEvent.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SagaStarted => "saga_started",
            Self::CommandSent => "command_sent",
            Self::StepSucceeded => "step_succeeded",
            Self::StepRejected => "step_rejected",
            Self::TransientError => "transient_error",
            Self::StepTimedOut => "step_timed_out",
            Self::RetryScheduled => "retry_scheduled",
            Self::StepFailed => "step_failed",
            Self::StepAbandoned => "step_abandoned",
            Self::CompensationStarted => "compensation_started",
            Self::StepCompensated => "step_compensated",
            Self::CompensationFailed => "compensation_failed",
            Self::SagaCompleted => "saga_completed",
            Self::SagaCompensated => "saga_compensated",
            Self::SagaFailed => "saga_failed",
            Self::CancelRequested => "cancel_requested",
            Self::OperatorRetry => "operator_retry",
            Self::ReplyIgnored => "reply_ignored",
            Self::TimerIgnored => "timer_ignored",
            Self::TimerHeld => "timer_held",
            Self::TimerReleased => "timer_released",
            Self::StartIgnored => "start_ignored",
        }
    }
}

/// One append-only history row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// 1, 2, 3 ... per saga.
    pub seq: u64,
    /// What happened.
    pub kind: HistoryKind,
    /// The step concerned, if any.
    pub step: Option<String>,
    /// The saga's status right after it happened.
    pub status: SagaStatus,
    /// Human-readable detail.
    pub detail: String,
}

/// The output of one event besides the new state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transition {
    /// Side effects to carry out after commit, in order.
    pub actions: Vec<Action>,
    /// History rows to append.
    pub history: Vec<HistoryEntry>,
    /// What the transition measured, for metrics and traces (nothing to
    /// carry out: dropping them changes no saga).
    pub observations: Vec<Observation>,
}

/// How a step's command ended, as measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepOutcome {
    /// The participant answered success.
    Success,
    /// The participant refused.
    Rejected,
    /// The participant answered a transient error.
    TransientError,
    /// No answer before the reply timeout.
    TimedOut,
}

impl StepOutcome {
    /// Lowercase name (a metric label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Rejected => "rejected",
            Self::TransientError => "transient_error",
            Self::TimedOut => "timeout",
        }
    }
}

/// A measurement a transition made with the clock it was given.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A command was answered, or its reply timeout fired.
    StepSettled {
        /// The step.
        step: String,
        /// Its participant.
        participant: String,
        /// Action or compensation.
        phase: Phase,
        /// The attempt settled.
        attempt: u32,
        /// How it ended.
        outcome: StepOutcome,
        /// Milliseconds from the command's commit to now; `None` when the
        /// state did not record when it was sent.
        elapsed_ms: Option<i64>,
    },
    /// The saga reached a terminal state.
    SagaEnded {
        /// Completed, compensated or failed.
        status: SagaStatus,
        /// Milliseconds since it started; `None` when the state did not
        /// record its start.
        elapsed_ms: Option<i64>,
    },
}

/// An operator request the saga's state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Cancel only applies to a running saga before its point of no return.
    #[error("saga cannot be cancelled: {0}")]
    NotCancellable(String),
    /// Retry only applies to a FAILED saga.
    #[error("saga cannot be retried: it is {} (only failed sagas can be retried)", .0.as_str())]
    NotRetryable(SagaStatus),
}

/// Creates a saga and applies `Started` to it.
pub fn start(flow: &Flow, id: Uuid, data: Value, ctx: Context) -> (SagaInstance, Transition) {
    let state = SagaInstance::new(flow, id, data);
    apply(&state, flow, &Event::Started, ctx).expect("Started is never refused")
}

/// Applies `event` to `state`: the new state and what to do about it.
/// `flow` must be the definition the saga runs (same name and version).
pub fn apply(
    state: &SagaInstance,
    flow: &Flow,
    event: &Event,
    ctx: Context,
) -> Result<(SagaInstance, Transition), Refused> {
    debug_assert_eq!(
        (flow.name(), flow.version()),
        (state.saga_type.as_str(), state.version)
    );
    let mut run = Run {
        saga: state.clone(),
        flow,
        ctx,
        out: Transition::default(),
    };
    run.handle(event)?;
    Ok((run.saga, run.out))
}

/// A step's action settled one way or another.
enum ActionResult {
    Success(Value),
    Rejected(String),
    Transient(String),
    TimedOut,
}

/// One application of the machine: a working copy plus collected output.
struct Run<'a> {
    saga: SagaInstance,
    flow: &'a Flow,
    ctx: Context,
    out: Transition,
}

impl Run<'_> {
    fn note(&mut self, kind: HistoryKind, step: Option<usize>, detail: impl Into<String>) {
        self.saga.seq += 1;
        self.out.history.push(HistoryEntry {
            seq: self.saga.seq,
            kind,
            step: step.map(|i| self.saga.steps[i].name.clone()),
            status: self.saga.status,
            detail: detail.into(),
        });
    }

    fn handle(&mut self, event: &Event) -> Result<(), Refused> {
        match event {
            Event::Started => self.on_started(),
            Event::Reply(reply) => self.on_reply(reply),
            Event::TimerFired(timer) => self.on_timer(timer),
            Event::CancelRequested { reason } => self.on_cancel(reason)?,
            Event::OperatorRetry => self.on_operator_retry()?,
        }
        Ok(())
    }

    fn on_started(&mut self) {
        if self.saga.started {
            self.note(HistoryKind::StartIgnored, None, "saga already started");
            return;
        }
        self.saga.started = true;
        self.saga.started_at_ms = self.ctx.now_ms;
        self.note(
            HistoryKind::SagaStarted,
            None,
            format!("{} v{}", self.saga.saga_type, self.saga.version),
        );
        self.out.actions.push(Action::PublishLifecycle {
            status: SagaStatus::Running,
        });
        self.enter_stage(0);
    }

    fn on_reply(&mut self, reply: &Reply) {
        let Some(index) = self.waiting_step(
            &reply.step,
            reply.phase,
            reply.attempt,
            TimerKind::ReplyTimeout,
        ) else {
            let detail = format!(
                "{} attempt {} ({}) matches nothing the saga waits for",
                reply.phase.as_str(),
                reply.attempt,
                outcome_name(&reply.outcome)
            );
            self.note_ignored(HistoryKind::ReplyIgnored, &reply.step, detail);
            return;
        };
        let since = self.saga.steps[index].wait.map(|w| w.since_ms);
        self.saga.steps[index].wait = None;
        let outcome = match &reply.outcome {
            Outcome::Success(_) => StepOutcome::Success,
            Outcome::Rejected(_) => StepOutcome::Rejected,
            Outcome::TransientError(_) => StepOutcome::TransientError,
        };
        self.observe_step(index, reply.phase, reply.attempt, outcome, since);
        let result = match &reply.outcome {
            Outcome::Success(data) => ActionResult::Success(data.clone()),
            Outcome::Rejected(reason) => ActionResult::Rejected(reason.clone()),
            Outcome::TransientError(reason) => ActionResult::Transient(reason.clone()),
        };
        match reply.phase {
            Phase::Action => self.action_settled(index, result),
            Phase::Compensation => self.compensation_settled(index, result),
        }
    }

    fn on_timer(&mut self, timer: &TimerFired) {
        let Some(index) = self.waiting_step(&timer.step, timer.phase, timer.attempt, timer.kind)
        else {
            let detail = format!(
                "{:?} timer of {} attempt {}",
                timer.kind,
                timer.phase.as_str(),
                timer.attempt
            );
            self.note_ignored(HistoryKind::TimerIgnored, &timer.step, detail);
            return;
        };
        let due = self.saga.steps[index]
            .wait
            .map(|w| w.due_at_ms)
            .unwrap_or_default();
        if due > self.ctx.now_ms {
            self.note_ignored(
                HistoryKind::TimerIgnored,
                &timer.step,
                "timer is not due yet".to_owned(),
            );
            return;
        }
        let wait = self.saga.steps[index]
            .wait
            .expect("a waiting step has a wait");
        if timer.delivery != Delivery::Clear {
            return self.hold(index, wait, timer.delivery);
        }
        if wait.held && wait.kind == TimerKind::ReplyTimeout {
            return self.release(index, wait);
        }
        let since = Some(wait.since_ms);
        self.saga.steps[index].wait = None;
        if timer.kind == TimerKind::ReplyTimeout {
            self.observe_step(
                index,
                timer.phase,
                timer.attempt,
                StepOutcome::TimedOut,
                since,
            );
        }
        match (timer.kind, timer.phase) {
            (TimerKind::ReplyTimeout, Phase::Action) => {
                self.action_settled(index, ActionResult::TimedOut)
            }
            (TimerKind::ReplyTimeout, Phase::Compensation) => {
                self.compensation_settled(index, ActionResult::TimedOut)
            }
            (TimerKind::RetryBackoff, Phase::Action) => self.issue(index, Phase::Action),
            (TimerKind::RetryBackoff, Phase::Compensation) => {
                self.issue(index, Phase::Compensation);
                self.advance_backward();
            }
        }
    }

    fn on_cancel(&mut self, reason: &str) -> Result<(), Refused> {
        if self.saga.status != SagaStatus::Running {
            return Err(Refused::NotCancellable(format!(
                "it is {}",
                self.saga.status.as_str()
            )));
        }
        if let Some(step) = self
            .flow
            .steps()
            .iter()
            .zip(&self.saga.steps)
            .find_map(|(def, rec)| {
                (def.kind != StepKind::Compensatable && rec.attempts > 0).then_some(&def.name)
            })
        {
            return Err(Refused::NotCancellable(format!(
                "it passed its point of no return ({step}) and can only complete"
            )));
        }
        let reason = if reason.is_empty() {
            "no reason given"
        } else {
            reason
        };
        self.note(HistoryKind::CancelRequested, None, reason);
        self.begin_backward(format!("cancelled: {reason}"));
        Ok(())
    }

    fn on_operator_retry(&mut self) -> Result<(), Refused> {
        if self.saga.status != SagaStatus::Failed {
            return Err(Refused::NotRetryable(self.saga.status));
        }
        let stage = self.flow.stages()[self.saga.stage].clone();
        match self.saga.direction {
            Direction::Forward => {
                self.saga.status = SagaStatus::Running;
                self.saga.error = None;
                self.note(HistoryKind::OperatorRetry, None, "resuming forward");
                self.out.actions.push(Action::PublishLifecycle {
                    status: SagaStatus::Running,
                });
                for index in stage {
                    if self.saga.steps[index].status == StepStatus::Failed {
                        let record = &mut self.saga.steps[index];
                        if std::mem::take(&mut record.last_rejected) {
                            record.action_generation += 1;
                        }
                        record.status = StepStatus::Running;
                        record.round_attempts = 0;
                        self.issue(index, Phase::Action);
                    }
                }
            }
            Direction::Backward => {
                self.saga.status = SagaStatus::Compensating;
                self.saga.error = self.saga.compensation_cause.clone();
                self.note(HistoryKind::OperatorRetry, None, "resuming compensation");
                self.out.actions.push(Action::PublishLifecycle {
                    status: SagaStatus::Compensating,
                });
                for index in stage {
                    if self.saga.steps[index].status == StepStatus::CompensationFailed {
                        let record = &mut self.saga.steps[index];
                        if std::mem::take(&mut record.last_rejected) {
                            record.compensation_generation += 1;
                        }
                        self.start_compensation(index);
                    }
                }
                self.advance_backward();
            }
        }
        Ok(())
    }

    /// The step that waits for exactly this (phase, attempt, kind), if any,
    /// while the saga is being driven.
    fn waiting_step(
        &self,
        step: &str,
        phase: Phase,
        attempt: u32,
        kind: TimerKind,
    ) -> Option<usize> {
        if self.saga.status.is_terminal() {
            return None;
        }
        let index = self.flow.step_index(step)?;
        let wait = self.saga.steps[index].wait?;
        (wait.phase == phase && wait.attempt == attempt && wait.kind == kind).then_some(index)
    }

    fn note_ignored(&mut self, kind: HistoryKind, step: &str, detail: String) {
        let index = self.flow.step_index(step);
        let detail = match index {
            Some(_) => detail,
            None => format!("unknown step {step:?}: {detail}"),
        };
        self.note(kind, index, detail);
    }

    /// Starts every step of stage `stage`.
    fn enter_stage(&mut self, stage: usize) {
        self.saga.stage = stage;
        for index in self.flow.stages()[stage].clone() {
            let record = &mut self.saga.steps[index];
            record.status = StepStatus::Running;
            record.round_attempts = 0;
            self.issue(index, Phase::Action);
            if self.saga.status != SagaStatus::Running {
                // A payload could not be built: the saga turned back; the
                // remaining branches of this stage never start.
                break;
            }
        }
    }

    /// Sends the next attempt of a step's action or compensation and arms
    /// its reply timeout.
    fn issue(&mut self, index: usize, phase: Phase) {
        let def = &self.flow.steps()[index];
        let payload = match phase {
            Phase::Action => def.action_payload(&self.saga.data),
            Phase::Compensation => def.compensation_payload(&self.saga.data),
        };
        let payload = match payload {
            Ok(payload) => payload,
            Err(error) => {
                let reason = format!("cannot build the command payload: {error}");
                return match phase {
                    Phase::Action => self.action_settled(index, ActionResult::Rejected(reason)),
                    // The caller advances the compensation once it is done
                    // with the stage; nothing was sent.
                    Phase::Compensation => self.compensation_failed(index, reason),
                };
            }
        };
        let command = match phase {
            Phase::Action => def.command.to_string(),
            // Every compensatable step has one (checked when the flow is built).
            Phase::Compensation => def
                .compensation
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        };
        let idempotency_key = self.saga.idempotency_key(index, phase);
        let compensates =
            (phase == Phase::Compensation).then(|| self.saga.idempotency_key(index, Phase::Action));
        let record = &mut self.saga.steps[index];
        let attempt = match phase {
            Phase::Action => {
                record.attempts += 1;
                record.attempts
            }
            Phase::Compensation => {
                record.compensation_attempts += 1;
                record.compensation_attempts
            }
        };
        record.round_attempts += 1;
        if phase == Phase::Action {
            // Once sent, the action may take effect (a duplicate of this
            // command can outlive any transient error); only a rejection of
            // the key clears this.
            record.maybe_applied = true;
        }
        let due_at_ms = self
            .ctx
            .now_ms
            .saturating_add(def.timeout.as_millis() as i64);
        record.wait = Some(Wait {
            phase,
            attempt,
            kind: TimerKind::ReplyTimeout,
            due_at_ms,
            since_ms: self.ctx.now_ms,
            held: false,
        });
        let detail = format!(
            "{}.{command} ({} attempt {attempt})",
            def.participant,
            phase.as_str()
        );
        self.out.actions.push(Action::SendCommand(Command {
            step: def.name.to_string(),
            phase,
            attempt,
            participant: def.participant.to_string(),
            command,
            idempotency_key,
            compensates,
            payload,
        }));
        self.out.actions.push(Action::ScheduleTimer {
            step: def.name.to_string(),
            phase,
            attempt,
            kind: TimerKind::ReplyTimeout,
            due_at_ms,
        });
        self.note(HistoryKind::CommandSent, Some(index), detail);
    }

    /// Re-arms a timer that came due while its command could not be on its
    /// way: a reply timeout for a whole timeout, a backoff for its delay
    /// again (at least [`HOLD_MIN_MS`]). No attempt is counted, so an outage
    /// spends no retry budget however long it lasts.
    fn hold(&mut self, index: usize, wait: Wait, delivery: Delivery) {
        let def = &self.flow.steps()[index];
        let delay_ms = match wait.kind {
            TimerKind::ReplyTimeout => def.timeout.as_millis() as i64,
            TimerKind::RetryBackoff => {
                let policy = match wait.phase {
                    Phase::Action => def.retry,
                    Phase::Compensation => def.compensation_retry,
                };
                let round = self.saga.steps[index].round_attempts;
                policy.backoff_ms(round, self.ctx.jitter) as i64
            }
        };
        let due_at_ms = self.ctx.now_ms.saturating_add(delay_ms.max(HOLD_MIN_MS));
        self.rearm(
            index,
            Wait {
                due_at_ms,
                held: true,
                ..wait
            },
        );
        let what = match wait.kind {
            TimerKind::ReplyTimeout => "reply timeout",
            TimerKind::RetryBackoff => "next attempt",
        };
        let why = match delivery {
            Delivery::Unsent => "the command still waits for the broker",
            Delivery::Queued => "the participant's queue is backed up",
            Delivery::BrokerAway | Delivery::Clear => "the broker is out of reach",
        };
        let detail = format!(
            "{} attempt {}: {why}; {what} held for {} ms",
            wait.phase.as_str(),
            wait.attempt,
            due_at_ms - self.ctx.now_ms
        );
        self.note(HistoryKind::TimerHeld, Some(index), detail);
    }

    /// A held reply timeout came due with a clear path: the command went
    /// out (or the broker came back) at some moment since the last hold, so
    /// the participant's time starts now.
    fn release(&mut self, index: usize, wait: Wait) {
        let timeout = self.flow.steps()[index].timeout.as_millis() as i64;
        let due_at_ms = self.ctx.now_ms.saturating_add(timeout);
        self.rearm(
            index,
            Wait {
                due_at_ms,
                held: false,
                ..wait
            },
        );
        let detail = format!(
            "{} attempt {}: on its way; reply timeout in {timeout} ms",
            wait.phase.as_str(),
            wait.attempt
        );
        self.note(HistoryKind::TimerReleased, Some(index), detail);
    }

    /// Replaces a step's wait and schedules its wake-up.
    fn rearm(&mut self, index: usize, wait: Wait) {
        self.saga.steps[index].wait = Some(wait);
        self.out.actions.push(Action::ScheduleTimer {
            step: self.flow.steps()[index].name.to_string(),
            phase: wait.phase,
            attempt: wait.attempt,
            kind: wait.kind,
            due_at_ms: wait.due_at_ms,
        });
    }

    /// Arms a backoff timer before the next attempt.
    fn schedule_retry(&mut self, index: usize, phase: Phase) {
        let def = &self.flow.steps()[index];
        let policy = match phase {
            Phase::Action => def.retry,
            Phase::Compensation => def.compensation_retry,
        };
        let record = &mut self.saga.steps[index];
        let delay = policy.backoff_ms(record.round_attempts, self.ctx.jitter);
        let attempt = match phase {
            Phase::Action => record.attempts + 1,
            Phase::Compensation => record.compensation_attempts + 1,
        };
        let due_at_ms = self.ctx.now_ms.saturating_add(delay as i64);
        record.wait = Some(Wait {
            phase,
            attempt,
            kind: TimerKind::RetryBackoff,
            due_at_ms,
            since_ms: self.ctx.now_ms,
            held: false,
        });
        self.out.actions.push(Action::ScheduleTimer {
            step: def.name.to_string(),
            phase,
            attempt,
            kind: TimerKind::RetryBackoff,
            due_at_ms,
        });
        self.note(
            HistoryKind::RetryScheduled,
            Some(index),
            format!("{} attempt {attempt} in {delay} ms", phase.as_str()),
        );
    }

    fn retry_allowed(&self, index: usize, phase: Phase) -> bool {
        let def = &self.flow.steps()[index];
        let policy = match phase {
            Phase::Action => def.retry,
            Phase::Compensation => def.compensation_retry,
        };
        policy.allows_another(self.saga.steps[index].round_attempts)
    }

    /// An action got its answer (or timed out).
    fn action_settled(&mut self, index: usize, result: ActionResult) {
        if self.saga.status == SagaStatus::Compensating {
            return self.settle_while_compensating(index, result);
        }
        let kind = self.flow.steps()[index].kind;
        let name = self.flow.steps()[index].name.clone();
        match result {
            ActionResult::Success(reply) => {
                let folded = self.flow.steps()[index].fold_reply(&mut self.saga.data, &reply);
                self.saga.steps[index].status = StepStatus::Succeeded;
                self.saga.steps[index].error = None;
                self.note(HistoryKind::StepSucceeded, Some(index), "");
                match folded {
                    Ok(()) => self.advance_forward(),
                    Err(error) => {
                        self.saga.steps[index].error = Some(error.clone());
                        self.turn_back(
                            index,
                            format!("step {name} returned unusable data: {error}"),
                        );
                    }
                }
            }
            ActionResult::Rejected(reason) => {
                let record = &mut self.saga.steps[index];
                record.status = StepStatus::Failed;
                record.maybe_applied = false;
                record.last_rejected = true;
                record.error = Some(reason.clone());
                self.note(HistoryKind::StepRejected, Some(index), reason.clone());
                self.turn_back(index, format!("step {name} rejected: {reason}"));
            }
            ActionResult::Transient(reason) => {
                self.saga.steps[index].error = Some(reason.clone());
                self.note(HistoryKind::TransientError, Some(index), reason.clone());
                // A transient error applied nothing, and the participant
                // answers a later duplicate of the key from its inbox. A
                // pivot can be neither undone nor assumed done, so it is
                // retried (at the longest backoff once its budget is spent)
                // until it succeeds or is refused, instead of stopping the
                // saga for an operator who could do nothing better.
                if self.retry_allowed(index, Phase::Action) || kind == StepKind::Pivot {
                    self.schedule_retry(index, Phase::Action);
                } else {
                    self.action_exhausted(index, kind, reason);
                }
            }
            ActionResult::TimedOut => {
                let record = &mut self.saga.steps[index];
                record.maybe_applied = true;
                record.error = Some("no reply in time: outcome unknown".to_owned());
                self.note(HistoryKind::StepTimedOut, Some(index), "outcome unknown");
                if self.retry_allowed(index, Phase::Action) {
                    self.issue(index, Phase::Action);
                } else {
                    self.action_exhausted(index, kind, "no reply in time".to_owned());
                }
            }
        }
    }

    /// The action's retry budget ran out.
    fn action_exhausted(&mut self, index: usize, kind: StepKind, last_error: String) {
        let record = &mut self.saga.steps[index];
        let attempts = record.round_attempts;
        let unknown = record.maybe_applied;
        let name = record.name.clone();
        record.status = StepStatus::Failed;
        let reason = if unknown {
            format!("step {name}: outcome unknown after {attempts} attempts ({last_error})")
        } else {
            format!("step {name} failed after {attempts} attempts: {last_error}")
        };
        record.error = Some(reason.clone());
        self.note(HistoryKind::StepFailed, Some(index), reason.clone());
        match kind {
            // An unknown outcome of a compensatable step is compensated along
            // with everything else; the participant no-ops it if needed.
            StepKind::Compensatable => self.begin_backward(reason),
            // A pivot whose outcome is unknown cannot be undone and must not
            // be assumed done: only an operator retry (same key) can tell.
            StepKind::Pivot if unknown => self.fail_saga(Direction::Forward, reason),
            StepKind::Pivot => self.begin_backward(reason),
            StepKind::Retriable => self.fail_saga(Direction::Forward, reason),
        }
    }

    /// A step failed going forward: roll back, or (after the point of no
    /// return) stop for an operator.
    fn turn_back(&mut self, index: usize, reason: String) {
        let took_effect = self.saga.steps[index].status == StepStatus::Succeeded;
        match self.flow.steps()[index].kind {
            StepKind::Compensatable => self.begin_backward(reason),
            StepKind::Pivot if !took_effect => self.begin_backward(reason),
            // A pivot that took effect (its reply data was unusable) cannot
            // be undone, so the stages before it must not be rolled back.
            StepKind::Pivot | StepKind::Retriable => {
                self.saga.steps[index].status = StepStatus::Failed;
                self.fail_saga(Direction::Forward, reason)
            }
        }
    }

    /// An action in flight settled after the saga turned back.
    fn settle_while_compensating(&mut self, index: usize, result: ActionResult) {
        let record = &mut self.saga.steps[index];
        match result {
            ActionResult::Success(reply) => {
                // Fold anyway: the compensation payload may need the result.
                let _ = self.flow.steps()[index].fold_reply(&mut self.saga.data, &reply);
                self.saga.steps[index].status = StepStatus::Succeeded;
                self.note(
                    HistoryKind::StepSucceeded,
                    Some(index),
                    "while compensating",
                );
            }
            ActionResult::Rejected(reason) => {
                record.status = StepStatus::Failed;
                record.maybe_applied = false;
                record.last_rejected = true;
                record.error = Some(reason.clone());
                self.note(HistoryKind::StepRejected, Some(index), reason);
            }
            ActionResult::Transient(reason) => {
                record.error = Some(reason.clone());
                self.note(HistoryKind::TransientError, Some(index), reason);
            }
            ActionResult::TimedOut => {
                record.maybe_applied = true;
                self.note(HistoryKind::StepTimedOut, Some(index), "outcome unknown");
            }
        }
        self.advance_backward();
    }

    /// A compensation got its answer (or timed out).
    fn compensation_settled(&mut self, index: usize, result: ActionResult) {
        match result {
            ActionResult::Success(_) => {
                let record = &mut self.saga.steps[index];
                record.status = StepStatus::Compensated;
                record.error = None;
                self.note(HistoryKind::StepCompensated, Some(index), "");
            }
            ActionResult::Rejected(reason) => {
                self.saga.steps[index].last_rejected = true;
                self.compensation_failed(index, format!("compensation rejected: {reason}"));
            }
            ActionResult::Transient(reason) => {
                self.saga.steps[index].error = Some(reason.clone());
                self.note(HistoryKind::TransientError, Some(index), reason.clone());
                self.retry_compensation(index, reason, false);
            }
            ActionResult::TimedOut => {
                self.saga.steps[index].error = Some("no reply in time".to_owned());
                self.note(
                    HistoryKind::StepTimedOut,
                    Some(index),
                    "compensation outcome unknown",
                );
                self.retry_compensation(index, "no reply in time".to_owned(), true);
            }
        }
        self.advance_backward();
    }

    fn retry_compensation(&mut self, index: usize, reason: String, immediately: bool) {
        if !self.retry_allowed(index, Phase::Compensation) {
            let attempts = self.saga.steps[index].round_attempts;
            self.compensation_failed(
                index,
                format!("compensation failed after {attempts} attempts: {reason}"),
            );
        } else if immediately {
            self.issue(index, Phase::Compensation);
        } else {
            self.schedule_retry(index, Phase::Compensation);
        }
    }

    /// Marks a compensation as failed for good (the saga fails once its
    /// stage has settled).
    fn compensation_failed(&mut self, index: usize, reason: String) {
        let record = &mut self.saga.steps[index];
        record.status = StepStatus::CompensationFailed;
        record.wait = None;
        record.error = Some(reason.clone());
        self.note(HistoryKind::CompensationFailed, Some(index), reason);
    }

    fn start_compensation(&mut self, index: usize) {
        let record = &mut self.saga.steps[index];
        record.status = StepStatus::Compensating;
        record.round_attempts = 0;
        self.issue(index, Phase::Compensation);
    }

    /// Moves on while every step of the current stage succeeded.
    fn advance_forward(&mut self) {
        if self.saga.status != SagaStatus::Running {
            return;
        }
        let stage = self.saga.stage;
        let done = self.flow.stages()[stage]
            .iter()
            .all(|&i| self.saga.steps[i].status == StepStatus::Succeeded);
        if !done {
            return;
        }
        if stage + 1 == self.flow.stages().len() {
            self.saga.status = SagaStatus::Completed;
            self.note(HistoryKind::SagaCompleted, None, "");
            self.finish(SagaStatus::Completed);
        } else {
            self.enter_stage(stage + 1);
        }
    }

    /// Turns the saga around: from now on it compensates.
    fn begin_backward(&mut self, reason: String) {
        self.saga.status = SagaStatus::Compensating;
        self.saga.direction = Direction::Backward;
        self.saga.error = Some(reason.clone());
        self.saga.compensation_cause = Some(reason.clone());
        self.note(HistoryKind::CompensationStarted, None, reason);
        self.out.actions.push(Action::PublishLifecycle {
            status: SagaStatus::Compensating,
        });
        self.advance_backward();
    }

    /// Compensates the current stage; when it has settled, moves to the
    /// stage before it, or ends the saga.
    fn advance_backward(&mut self) {
        loop {
            if self.saga.status != SagaStatus::Compensating {
                return;
            }
            let stage = self.saga.stage;
            for index in self.flow.stages()[stage].clone() {
                if self.saga.status != SagaStatus::Compensating {
                    return;
                }
                let compensatable = self.flow.steps()[index].kind == StepKind::Compensatable;
                let record = &mut self.saga.steps[index];
                match record.status {
                    StepStatus::Succeeded if compensatable => self.start_compensation(index),
                    StepStatus::Failed if record.maybe_applied && compensatable => {
                        self.start_compensation(index)
                    }
                    StepStatus::Running
                        if record
                            .wait
                            .is_none_or(|w| w.kind == TimerKind::RetryBackoff) =>
                    {
                        // Waiting to retry: its last attempt did not apply.
                        record.wait = None;
                        if record.maybe_applied && compensatable {
                            self.start_compensation(index);
                        } else {
                            record.status = StepStatus::Skipped;
                            self.note(
                                HistoryKind::StepAbandoned,
                                Some(index),
                                "not retried: the saga is compensating",
                            );
                        }
                    }
                    StepStatus::Pending => record.status = StepStatus::Skipped,
                    _ => {}
                }
            }
            let statuses: Vec<StepStatus> = self.flow.stages()[stage]
                .iter()
                .map(|&i| self.saga.steps[i].status)
                .collect();
            if statuses
                .iter()
                .any(|s| matches!(s, StepStatus::Running | StepStatus::Compensating))
            {
                return;
            }
            if statuses.contains(&StepStatus::CompensationFailed) {
                let failures: Vec<String> = self.flow.stages()[stage]
                    .iter()
                    .filter(|&&i| self.saga.steps[i].status == StepStatus::CompensationFailed)
                    .map(|&i| {
                        let r = &self.saga.steps[i];
                        format!(
                            "{}: {}",
                            r.name,
                            r.error.as_deref().unwrap_or("unknown error")
                        )
                    })
                    .collect();
                let cause = self.saga.compensation_cause.clone().unwrap_or_default();
                let reason = format!(
                    "compensation could not finish ({}); compensating because {cause}",
                    failures.join("; ")
                );
                return self.fail_saga(Direction::Backward, reason);
            }
            if stage == 0 {
                for record in &mut self.saga.steps {
                    if record.status == StepStatus::Pending {
                        record.status = StepStatus::Skipped;
                    }
                }
                self.saga.status = SagaStatus::Compensated;
                self.note(HistoryKind::SagaCompensated, None, "");
                return self.finish(SagaStatus::Compensated);
            }
            self.saga.stage = stage - 1;
        }
    }

    fn fail_saga(&mut self, direction: Direction, reason: String) {
        self.saga.status = SagaStatus::Failed;
        self.saga.direction = direction;
        self.saga.error = Some(reason.clone());
        self.note(HistoryKind::SagaFailed, None, reason);
        self.finish(SagaStatus::Failed);
    }

    fn finish(&mut self, status: SagaStatus) {
        self.out.actions.push(Action::PublishLifecycle { status });
        self.out.actions.push(Action::Finish { status });
        let started = self.saga.started_at_ms;
        self.out.observations.push(Observation::SagaEnded {
            status,
            elapsed_ms: (started > 0).then(|| self.ctx.now_ms.saturating_sub(started)),
        });
    }

    /// Records how long step `index`'s command of `phase` took, from the
    /// wait's start (`since`, 0 when not recorded) to now.
    fn observe_step(
        &mut self,
        index: usize,
        phase: Phase,
        attempt: u32,
        outcome: StepOutcome,
        since: Option<i64>,
    ) {
        let def = &self.flow.steps()[index];
        self.out.observations.push(Observation::StepSettled {
            step: def.name.to_string(),
            participant: def.participant.to_string(),
            phase,
            attempt,
            outcome,
            elapsed_ms: since
                .filter(|&s| s > 0)
                .map(|s| self.ctx.now_ms.saturating_sub(s)),
        });
    }
}

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Success(_) => "success",
        Outcome::Rejected(_) => "rejected",
        Outcome::TransientError(_) => "transient error",
    }
}
