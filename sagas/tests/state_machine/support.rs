//! Shared helpers: a step-by-step harness around the machine, the order
//! input, and a tiny synthetic data type ([`Trail`]) for flows written in
//! the tests themselves.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use sagas::{
    Action, Delivery, Event, Flow, HistoryEntry, HistoryKind, InputError, Outcome, Phase, Refused,
    Reply, RetryPolicy, SagaData, SagaInstance, SagaStatus, Step, StepRecord, TimerFired,
    TimerKind, Transition, Wait, flows::order_placement,
};

/// The id of every saga the scenario tests run (keys are built from it).
pub const ID: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
/// The clock when a scenario starts.
pub const T0: i64 = 1_700_000_000_000;

/// A valid order: one line, 2 × 150 cents.
pub const ORDER: &str = r#"{"order_id":"o-1","customer_id":"c-1","items":[{"sku":"sku-1","quantity":2,"unit_price_cents":150}]}"#;

/// The idempotency key the machine must use for `step`/`phase`/`generation`.
pub fn key(step: &str, phase: Phase, generation: u32) -> String {
    format!("{ID}:{step}:{}:{generation}", phase.as_str())
}

/// One `SendCommand`, reduced to what the tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The step.
    pub step: String,
    /// Action or compensation.
    pub phase: Phase,
    /// Delivery number.
    pub attempt: u32,
    /// Idempotency key.
    pub key: String,
    /// For a compensation, the action key it undoes.
    pub compensates: Option<String>,
}

/// The action of `step`, delivery `attempt`, key generation `generation`.
pub fn action(step: &str, attempt: u32, generation: u32) -> Sent {
    Sent {
        step: step.to_owned(),
        phase: Phase::Action,
        attempt,
        key: key(step, Phase::Action, generation),
        compensates: None,
    }
}

/// The compensation of `step` (key generation `generation`) undoing its
/// first-generation action.
pub fn undo(step: &str, attempt: u32, generation: u32) -> Sent {
    Sent {
        step: step.to_owned(),
        phase: Phase::Compensation,
        attempt,
        key: key(step, Phase::Compensation, generation),
        compensates: Some(key(step, Phase::Action, 1)),
    }
}

/// Every command a transition sends, in order.
pub fn sent(t: &Transition) -> Vec<Sent> {
    t.actions
        .iter()
        .filter_map(|a| match a {
            Action::SendCommand(c) => Some(Sent {
                step: c.step.clone(),
                phase: c.phase,
                attempt: c.attempt,
                key: c.idempotency_key.clone(),
                compensates: c.compensates.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// The payload of the only command a transition sends.
pub fn only_payload(t: &Transition) -> Value {
    let payloads: Vec<&Value> = t
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::SendCommand(c) => Some(&c.payload),
            _ => None,
        })
        .collect();
    assert_eq!(payloads.len(), 1, "expected one command in {t:#?}");
    payloads[0].clone()
}

/// Every timer a transition schedules: (step, phase, attempt, kind, due).
pub fn timers(t: &Transition) -> Vec<(String, Phase, u32, TimerKind, i64)> {
    t.actions
        .iter()
        .filter_map(|a| match a {
            Action::ScheduleTimer {
                step,
                phase,
                attempt,
                kind,
                due_at_ms,
            } => Some((step.clone(), *phase, *attempt, *kind, *due_at_ms)),
            _ => None,
        })
        .collect()
}

/// The actions that are neither commands nor timers (lifecycle, finish).
pub fn lifecycle(t: &Transition) -> Vec<Action> {
    t.actions
        .iter()
        .filter(|a| matches!(a, Action::PublishLifecycle { .. } | Action::Finish { .. }))
        .cloned()
        .collect()
}

/// `PublishLifecycle` then `Finish` for a terminal `status`.
pub fn finished(status: SagaStatus) -> Vec<Action> {
    vec![
        Action::PublishLifecycle { status },
        Action::Finish { status },
    ]
}

/// The history kinds a transition appended, in order.
pub fn kinds(t: &Transition) -> Vec<HistoryKind> {
    t.history.iter().map(|h| h.kind).collect()
}

/// The data a flow's participants answer with when a step succeeds.
pub type SuccessData = fn(&str) -> Value;

/// Success data of the order placement participants.
pub fn order_success(step: &str) -> Value {
    match step {
        "reserve_inventory" => json!({"reservation_id": "res-1"}),
        "authorize_payment" => json!({"authorization_id": "auth-1"}),
        "charge_payment" | "capture_payment" => json!({"payment_id": "pay-1"}),
        _ => json!({}),
    }
}

/// Success data of the [`Trail`] participants: the step's own name.
pub fn trail_success(step: &str) -> Value {
    json!({ "step": step })
}

/// Drives one saga event by event, checking on every transition that the
/// history sequence has no gap.
pub struct Harness {
    /// The flow the saga runs.
    pub flow: Flow,
    /// The saga as the last transition left it.
    pub saga: SagaInstance,
    /// The clock handed to the machine.
    pub now: i64,
    /// The jitter sample handed to the machine.
    pub jitter: f64,
    /// Every history entry so far.
    pub history: Vec<HistoryEntry>,
    /// What participants answer on success unless a test says otherwise.
    pub success: SuccessData,
}

impl Harness {
    /// Starts a saga of `flow` with initial `data`; returns the `Started` transition.
    pub fn start(flow: Flow, data: Value, success: SuccessData) -> (Self, Transition) {
        let ctx = sagas::Context {
            now_ms: T0,
            jitter: 0.5,
        };
        let (saga, t) = sagas::start(&flow, ID, data, ctx);
        check_seq(0, &saga, &t);
        let h = Self {
            flow,
            saga,
            now: T0,
            jitter: 0.5,
            history: t.history.clone(),
            success,
        };
        (h, t)
    }

    /// An order placement v1 saga for [`ORDER`].
    pub fn order_v1() -> (Self, Transition) {
        let flow = order_placement::v1().unwrap();
        let data = flow.parse_input(ORDER).unwrap();
        Self::start(flow, data, order_success)
    }

    /// An order placement v2 saga for [`ORDER`].
    pub fn order_v2() -> (Self, Transition) {
        let flow = order_placement::v2().unwrap();
        let data = flow.parse_input(ORDER).unwrap();
        Self::start(flow, data, order_success)
    }

    /// A saga of a [`Trail`] flow.
    pub fn trail(flow: Flow) -> (Self, Transition) {
        Self::start(
            flow,
            serde_json::to_value(Trail::default()).unwrap(),
            trail_success,
        )
    }

    fn ctx(&self) -> sagas::Context {
        sagas::Context {
            now_ms: self.now,
            jitter: self.jitter,
        }
    }

    /// Applies `event`, which must be accepted.
    pub fn apply(&mut self, event: Event) -> Transition {
        let (saga, t) = sagas::apply(&self.saga, &self.flow, &event, self.ctx())
            .unwrap_or_else(|refused| panic!("{event:?} refused: {refused}"));
        check_seq(self.saga.seq, &saga, &t);
        self.saga = saga;
        self.history.extend(t.history.iter().cloned());
        t
    }

    /// Applies `event`, which must be refused; the saga is untouched.
    pub fn refuse(&mut self, event: Event) -> Refused {
        match sagas::apply(&self.saga, &self.flow, &event, self.ctx()) {
            Ok((saga, t)) => panic!("{event:?} accepted: {t:#?}\n{saga:#?}"),
            Err(refused) => refused,
        }
    }

    /// Applies `event` and checks that it changed nothing but appended one
    /// history entry of `kind`; returns that entry's detail.
    pub fn ignored(&mut self, event: Event, kind: HistoryKind) -> String {
        let before = self.saga.clone();
        let t = self.apply(event);
        assert_eq!(t.actions, vec![], "an ignored event must not act");
        assert_eq!(kinds(&t), vec![kind]);
        let mut after = self.saga.clone();
        assert_eq!(after.seq, before.seq + 1);
        after.seq = before.seq;
        assert_eq!(after, before, "an ignored event must not change the saga");
        t.history[0].detail.clone()
    }

    /// The record of `step`.
    pub fn step(&self, step: &str) -> &StepRecord {
        let index = self.flow.step_index(step).expect("no such step");
        &self.saga.steps[index]
    }

    /// What `step` waits for (it must wait for something).
    pub fn wait(&self, step: &str) -> Wait {
        self.step(step)
            .wait
            .unwrap_or_else(|| panic!("{step} waits for nothing: {:#?}", self.saga))
    }

    /// A reply to the attempt `step` waits for.
    pub fn reply_now(&self, step: &str, outcome: Outcome) -> Event {
        let wait = self.wait(step);
        assert_eq!(
            wait.kind,
            TimerKind::ReplyTimeout,
            "{step} waits for a backoff"
        );
        Event::Reply(Reply {
            step: step.to_owned(),
            phase: wait.phase,
            attempt: wait.attempt,
            outcome,
        })
    }

    /// Answers the attempt `step` waits for.
    pub fn reply(&mut self, step: &str, outcome: Outcome) -> Transition {
        let event = self.reply_now(step, outcome);
        self.apply(event)
    }

    /// Answers success with the participants' usual data.
    pub fn ok(&mut self, step: &str) -> Transition {
        let data = (self.success)(step);
        self.reply(step, Outcome::Success(data))
    }

    /// Answers a business rejection.
    pub fn reject(&mut self, step: &str, reason: &str) -> Transition {
        self.reply(step, Outcome::Rejected(reason.to_owned()))
    }

    /// Answers a transient error.
    pub fn transient(&mut self, step: &str, reason: &str) -> Transition {
        self.reply(step, Outcome::TransientError(reason.to_owned()))
    }

    /// The timer event of what `step` waits for.
    pub fn timer_now(&self, step: &str) -> Event {
        let wait = self.wait(step);
        Event::TimerFired(TimerFired {
            step: step.to_owned(),
            phase: wait.phase,
            attempt: wait.attempt,
            kind: wait.kind,
            delivery: Delivery::Clear,
        })
    }

    /// Moves the clock to the due time of what `step` waits for and fires
    /// it as seen through `delivery`.
    pub fn fire_as(&mut self, step: &str, delivery: Delivery) -> Transition {
        let wait = self.wait(step);
        self.now = self.now.max(wait.due_at_ms);
        let Event::TimerFired(timer) = self.timer_now(step) else {
            unreachable!()
        };
        self.apply(Event::TimerFired(TimerFired { delivery, ..timer }))
    }

    /// Moves the clock to the due time of what `step` waits for and fires it.
    pub fn fire(&mut self, step: &str) -> Transition {
        let wait = self.wait(step);
        self.now = self.now.max(wait.due_at_ms);
        let event = self.timer_now(step);
        self.apply(event)
    }

    /// Lets the reply timeout of `step` fire (it must wait for a reply).
    pub fn time_out(&mut self, step: &str) -> Transition {
        assert_eq!(self.wait(step).kind, TimerKind::ReplyTimeout);
        self.fire(step)
    }
}

/// The history of one transition continues `prev_seq` without a gap and
/// ends at the saga's `seq`.
pub fn check_seq(prev_seq: u64, saga: &SagaInstance, t: &Transition) {
    let seqs: Vec<u64> = t.history.iter().map(|h| h.seq).collect();
    let expected: Vec<u64> = (prev_seq + 1..=prev_seq + t.history.len() as u64).collect();
    assert_eq!(seqs, expected, "history sequence numbers must not jump");
    assert_eq!(saga.seq, prev_seq + t.history.len() as u64);
    // Each entry records the status right after it happened, so the last one
    // must agree with the state returned.
    if let Some(last) = t.history.last() {
        assert_eq!(last.status, saga.status, "last history entry: {last:?}");
    }
}

/// Data of the synthetic flows: the steps whose success was folded in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trail {
    /// Names of the steps whose success data was folded, in order.
    pub done: Vec<String>,
}

impl SagaData for Trail {
    type Input = Trail;
    fn from_input(input: Trail) -> Result<Self, InputError> {
        Ok(input)
    }
}

/// What a [`Trail`] participant answers on success; anything else is malformed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Done {
    step: String,
}

/// Knobs of a synthetic step.
#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    /// Reply timeout.
    pub timeout_ms: u64,
    /// First backoff of action and compensation.
    pub backoff_ms: u64,
    /// Action deliveries per round (`None`: unlimited).
    pub attempts: Option<u32>,
    /// Compensation deliveries per round.
    pub compensation_attempts: u32,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            timeout_ms: 1_000,
            backoff_ms: 100,
            attempts: Some(3),
            compensation_attempts: 3,
        }
    }
}

fn policy(backoff_ms: u64, attempts: Option<u32>) -> RetryPolicy {
    let initial = Duration::from_millis(backoff_ms);
    match attempts {
        Some(n) => RetryPolicy::exponential(initial, n),
        None => RetryPolicy::forever(initial, Duration::from_millis(backoff_ms * 8)),
    }
}

/// A synthetic step of `kind` named `name`, run by participant `p-<name>`.
pub fn trail_step(kind: sagas::StepKind, name: &str, knobs: Knobs) -> Step<Trail> {
    let participant = format!("p-{name}");
    let step = match kind {
        sagas::StepKind::Compensatable => Step::compensatable(name, &participant, "do"),
        sagas::StepKind::Pivot => Step::pivot(name, &participant, "do"),
        sagas::StepKind::Retriable => Step::retriable(name, &participant, "do"),
    };
    let payload_name = name.to_owned();
    let step = step
        .payload(move |d: &Trail| json!({"step": payload_name, "seen": d.done.len()}))
        .on_success(|d: &mut Trail, r: Done| d.done.push(r.step))
        .timeout(Duration::from_millis(knobs.timeout_ms))
        .retry(policy(knobs.backoff_ms, knobs.attempts))
        .compensation_retry(policy(knobs.backoff_ms, Some(knobs.compensation_attempts)));
    if kind == sagas::StepKind::Compensatable {
        let undo_name = name.to_owned();
        step.compensate_with("undo", move |_: &Trail| json!({"undo": undo_name}))
    } else {
        step
    }
}

/// A compensatable synthetic step with default knobs.
pub fn comp(name: &str) -> Step<Trail> {
    trail_step(sagas::StepKind::Compensatable, name, Knobs::default())
}

/// A retriable synthetic step with default knobs (3 attempts per round).
pub fn retriable(name: &str) -> Step<Trail> {
    trail_step(sagas::StepKind::Retriable, name, Knobs::default())
}
