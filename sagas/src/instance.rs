//! The state of one running saga: what the machine reads and returns, and
//! what the orchestrator persists (as JSON) between events.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::definition::Flow;

/// A timer came due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerFired {
    /// The step that set it.
    pub step: String,
    /// Action or compensation.
    pub phase: Phase,
    /// The attempt it belongs to (see [`Wait::attempt`]).
    pub attempt: u32,
    /// Reply timeout or retry backoff.
    pub kind: TimerKind,
    /// What stood between the step and its participant when the timer came
    /// due, as the instance firing it saw (the machine cannot look).
    #[serde(default)]
    pub delivery: Delivery,
}

/// Whether a step's command could be on its way when its timer came due.
///
/// A reply timeout is meant to measure the participant: how long it takes
/// to answer a command it has. While the command still waits in the
/// outbox, or the broker is out of reach, the participant has nothing to
/// answer (or cannot be heard), and a timeout would spend the step's retry
/// budget on an outage; while it waits in the queue of a participant that
/// is busy answering the commands ahead of it, a timeout would retry into
/// the very queue that is behind. Such a timer is held instead: re-armed,
/// no attempt counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Nothing known to be in the way: the timer counts.
    #[default]
    Clear,
    /// The attempt's command is still in the outbox: the broker has not
    /// confirmed it yet.
    Unsent,
    /// The instance firing the timer has no broker connection: a command
    /// sent now would wait in the outbox, and replies cannot arrive.
    BrokerAway,
    /// The participant is busy: commands wait in its queue behind others
    /// while it answers them (after an outage, or under a burst). The
    /// time in its queue is not the participant's time.
    Queued,
}

/// Whether a command performs a step's action or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step's forward action.
    Action,
    /// The step's compensation.
    Compensation,
}

impl Phase {
    /// Lowercase name, as used in idempotency keys and history.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Compensation => "compensation",
        }
    }
}

/// Where a saga is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Moving forward through its steps.
    Running,
    /// Undoing the steps that took effect.
    Compensating,
    /// Every step succeeded. Final.
    Completed,
    /// Rolled back: everything that took effect was compensated. Final.
    Compensated,
    /// Compensation (or forward recovery) could not finish; an operator must
    /// look, and `OperatorRetry` resumes it exactly where it stopped.
    Failed,
}

impl SagaStatus {
    /// Lowercase name (`running`, `compensating`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
        }
    }

    /// Parses [`Self::as_str`]'s output.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Compensating,
            Self::Completed,
            Self::Compensated,
            Self::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Completed or compensated: nothing will ever happen to the saga again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated)
    }

    /// Not driven any more (final, or FAILED awaiting an operator).
    pub fn is_terminal(self) -> bool {
        self.is_final() || self == Self::Failed
    }
}

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// The action is in flight or waiting to be retried.
    Running,
    /// The action took effect.
    Succeeded,
    /// The action definitively did not take effect (rejected, retries
    /// exhausted), or forward recovery of this step needs an operator.
    Failed,
    /// The compensation is in flight or waiting to be retried.
    Compensating,
    /// The compensation took effect (or the action never had).
    Compensated,
    /// The compensation exhausted its retries; the saga is FAILED.
    CompensationFailed,
    /// Never ran, or was abandoned without effect.
    Skipped,
}

impl StepStatus {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Compensating => "compensating",
            Self::Compensated => "compensated",
            Self::CompensationFailed => "compensation_failed",
            Self::Skipped => "skipped",
        }
    }
}

/// Which way the saga was going; kept so an operator retry of a FAILED saga
/// resumes in the same direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Running the flow's steps.
    Forward,
    /// Compensating.
    Backward,
}

/// What a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// No reply came in time: the outcome of the attempt is unknown.
    ReplyTimeout,
    /// Backoff before the next attempt is over.
    RetryBackoff,
}

/// What a step is waiting for; at most one per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    /// Action or compensation.
    pub phase: Phase,
    /// For a reply timeout, the attempt in flight; for a backoff, the
    /// attempt that will be sent when it fires.
    pub attempt: u32,
    /// Reply timeout or retry backoff.
    pub kind: TimerKind,
    /// When the timer fires, in milliseconds since the Unix epoch.
    pub due_at_ms: i64,
    /// When the wait began (for a reply timeout: when the command was
    /// committed), so the step's latency can be measured when it settles.
    /// 0 in states written before it was recorded.
    #[serde(default)]
    pub since_ms: i64,
    /// The reply timeout was held at least once (see [`Delivery`]): the
    /// command went out, or the broker came back, at some moment since the
    /// last hold, unknown to the machine. When the timer next fires with a
    /// clear path the participant is given a whole timeout again instead of
    /// being timed out: its time is counted from after the hold, never
    /// from before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

/// One step's record within a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's name in the flow.
    pub name: String,
    /// Where it is.
    pub status: StepStatus,
    /// Deliveries of the action so far (all rounds).
    pub attempts: u32,
    /// Deliveries of the compensation so far (all rounds).
    pub compensation_attempts: u32,
    /// Deliveries in the current round, counted against the retry budget; an
    /// operator retry starts a new round.
    pub round_attempts: u32,
    /// Bumped when an operator retries after a recorded rejection, so the
    /// participant sees a new logical command instead of its old refusal.
    pub action_generation: u32,
    /// Same as `action_generation`, for the compensation.
    pub compensation_generation: u32,
    /// The action was sent and no rejection has settled its key, so it may
    /// have taken effect (an attempt timed out, or a copy of a command that
    /// met a transient error may still be delivered) and must be
    /// compensated if the saga rolls back.
    pub maybe_applied: bool,
    /// The last answer for the current key was a rejection.
    pub last_rejected: bool,
    /// The last error seen for this step.
    pub error: Option<String>,
    /// The timer the step waits on, if any.
    pub wait: Option<Wait>,
}

impl StepRecord {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            round_attempts: 0,
            action_generation: 1,
            compensation_generation: 1,
            maybe_applied: false,
            last_rejected: false,
            error: None,
            wait: None,
        }
    }
}

/// One saga: its flow, data, per-step records and where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaInstance {
    /// The saga's id (the trace id of all its messages).
    pub id: Uuid,
    /// Flow name.
    pub saga_type: String,
    /// Flow version the saga started with and keeps.
    pub version: u32,
    /// Where the saga is.
    pub status: SagaStatus,
    /// Which way it was going (meaningful when FAILED).
    pub direction: Direction,
    /// Index of the stage being run (forward) or compensated (backward).
    pub stage: usize,
    /// The input plus what steps returned.
    pub data: Value,
    /// One record per step of the flow, in flow order.
    pub steps: Vec<StepRecord>,
    /// Why the saga is compensating, compensated or failed.
    pub error: Option<String>,
    /// Why the saga started compensating; restored by an operator retry.
    pub compensation_cause: Option<String>,
    /// History entries written so far (the last entry's sequence number).
    pub seq: u64,
    /// Whether the `Started` event was applied.
    pub started: bool,
    /// When `Started` was applied, in milliseconds since the Unix epoch
    /// (0 in states written before it was recorded): the start of the
    /// saga's measured duration.
    #[serde(default)]
    pub started_at_ms: i64,
    /// W3C `traceparent` of the span that started the saga, when spans
    /// are exported: the orchestrator hangs the transitions of timers and
    /// operator calls from it, so that a saga is one trace. Opaque here;
    /// the machine never reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

impl SagaInstance {
    /// A saga of `flow` with id `id` and initial `data`, before `Started`.
    pub fn new(flow: &Flow, id: Uuid, data: Value) -> Self {
        Self {
            id,
            saga_type: flow.name().to_owned(),
            version: flow.version(),
            status: SagaStatus::Running,
            direction: Direction::Forward,
            stage: 0,
            data,
            steps: flow
                .steps()
                .iter()
                .map(|s| StepRecord::new(&s.name))
                .collect(),
            error: None,
            compensation_cause: None,
            seq: 0,
            started: false,
            started_at_ms: 0,
            trace: None,
        }
    }

    /// The earliest timer any step waits on.
    pub fn next_due_at_ms(&self) -> Option<i64> {
        self.steps
            .iter()
            .filter_map(|s| s.wait.map(|w| w.due_at_ms))
            .min()
    }

    /// The timer events due at `now_ms`, earliest first.
    pub fn due_timers(&self, now_ms: i64) -> Vec<TimerFired> {
        let mut due: Vec<_> = self
            .steps
            .iter()
            .filter_map(|s| {
                let w = s.wait?;
                (w.due_at_ms <= now_ms).then(|| {
                    (
                        w.due_at_ms,
                        TimerFired {
                            step: s.name.clone(),
                            phase: w.phase,
                            attempt: w.attempt,
                            kind: w.kind,
                            delivery: Delivery::Clear,
                        },
                    )
                })
            })
            .collect();
        due.sort_by_key(|(at, _)| *at);
        due.into_iter().map(|(_, t)| t).collect()
    }

    /// The stable idempotency key of a step's action or compensation.
    pub fn idempotency_key(&self, step: usize, phase: Phase) -> String {
        let record = &self.steps[step];
        let generation = match phase {
            Phase::Action => record.action_generation,
            Phase::Compensation => record.compensation_generation,
        };
        format!(
            "{}:{}:{}:{generation}",
            self.id,
            record.name,
            phase.as_str()
        )
    }
}
