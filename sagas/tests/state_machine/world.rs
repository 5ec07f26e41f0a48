//! A simulated world around one saga: a network that loses, duplicates and
//! reorders messages, participants with real idempotency semantics, a clock,
//! and checks of the machine's guarantees on every transition.
//!
//! Participants, per idempotency key:
//! - an action's first delivery decides success, rejection or a transient
//!   error; successes and rejections are remembered and replayed to later
//!   deliveries, transient errors are not (the next delivery decides anew);
//! - a compensation of an action key never applied is a successful no-op
//!   and blocks that action key for good (later deliveries are refused);
//! - a compensation of an applied action decides like an action; its effect
//!   happens once however many compensation keys or deliveries reach it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;
use uuid::Uuid;

use sagas::{
    Action, Command, Context, Delivery, Event, Flow, Outcome, Phase, Refused, Reply, SagaInstance,
    SagaStatus, StepKind, StepStatus, TimerFired, TimerKind, Transition,
};

use crate::support::SuccessData;

/// How often interesting things happened, to check the simulation reaches them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Sagas that completed.
    pub completed: u32,
    /// Sagas that compensated.
    pub compensated: u32,
    /// Times a saga failed going forward.
    pub failed_forward: u32,
    /// Times a saga failed while compensating.
    pub failed_backward: u32,
    /// Cancels accepted.
    pub cancels: u32,
    /// Operator retries accepted.
    pub operator_retries: u32,
    /// Replies that matched nothing.
    pub replies_ignored: u32,
    /// Timers that matched nothing or were not due.
    pub timers_ignored: u32,
    /// Timers held (command unsent or broker away) and released.
    pub timers_held: u32,
    /// Steps compensated.
    pub steps_compensated: u32,
    /// Action keys a participant refused because a compensation came first.
    pub blocked: u32,
    /// Deliveries that reached a participant after the saga was final.
    pub after_the_end: u32,
}

impl Stats {
    /// Adds `other` to `self`.
    pub fn add(&mut self, other: Stats) {
        self.completed += other.completed;
        self.compensated += other.compensated;
        self.failed_forward += other.failed_forward;
        self.failed_backward += other.failed_backward;
        self.cancels += other.cancels;
        self.operator_retries += other.operator_retries;
        self.replies_ignored += other.replies_ignored;
        self.timers_ignored += other.timers_ignored;
        self.timers_held += other.timers_held;
        self.steps_compensated += other.steps_compensated;
        self.blocked += other.blocked;
        self.after_the_end += other.after_the_end;
    }
}

/// A message on the simulated network.
#[derive(Debug, Clone)]
pub enum Msg {
    /// Orchestrator to participant.
    Command(Command),
    /// Participant to orchestrator.
    Reply(Reply),
}

/// What became of an action key at the participant.
#[derive(Debug, Clone)]
enum ActionFate {
    /// Took effect; replayed as this success.
    Applied(Value),
    /// Refused by a business rule; replayed.
    Rejected(String),
    /// Compensated before it ever ran: refused forever.
    Blocked,
}

/// What became of a compensation key at the participant.
#[derive(Debug, Clone)]
enum CompensationFate {
    /// Took effect (or had nothing to undo); replayed as a success.
    Done,
    /// Refused by a business rule; replayed.
    Rejected(String),
}

/// Every participant of the flow, as one ledger keyed by idempotency key.
#[derive(Debug, Default)]
pub struct Participants {
    /// Decided action keys.
    actions: HashMap<String, ActionFate>,
    /// Decided compensation keys.
    compensations: HashMap<String, CompensationFate>,
    /// Action keys that took effect, with their step (each at most once by construction).
    applied: BTreeMap<String, String>,
    /// Action keys whose effect was undone.
    undone: BTreeSet<String>,
    /// Healing: every undecided key succeeds.
    healing: bool,
    /// Deliveries refused because a compensation came first.
    blocked: u32,
}

impl Participants {
    /// Handles one delivery of `command`; `choice` decides a fresh outcome.
    fn handle(&mut self, command: &Command, choice: u8, success: SuccessData) -> Outcome {
        match command.phase {
            Phase::Action => self.act(command, choice, success),
            Phase::Compensation => self.compensate(command, choice),
        }
    }

    fn act(&mut self, command: &Command, choice: u8, success: SuccessData) -> Outcome {
        let key = &command.idempotency_key;
        match self.actions.get(key) {
            Some(ActionFate::Applied(data)) => return Outcome::Success(data.clone()),
            Some(ActionFate::Rejected(reason)) => return Outcome::Rejected(reason.clone()),
            Some(ActionFate::Blocked) => {
                self.blocked += 1;
                return Outcome::Rejected("compensated before it ran".into());
            }
            None => {}
        }
        match decide(self.healing, choice, 150, 210) {
            Decision::Success => {
                let data = success(&command.step);
                self.actions
                    .insert(key.clone(), ActionFate::Applied(data.clone()));
                let again = self.applied.insert(key.clone(), command.step.clone());
                assert!(again.is_none(), "a participant applied {key} twice");
                Outcome::Success(data)
            }
            Decision::Transient => Outcome::TransientError("participant busy".into()),
            Decision::Rejected => {
                let reason = format!("refused ({choice})");
                self.actions
                    .insert(key.clone(), ActionFate::Rejected(reason.clone()));
                Outcome::Rejected(reason)
            }
        }
    }

    fn compensate(&mut self, command: &Command, choice: u8) -> Outcome {
        let key = &command.idempotency_key;
        let target = command
            .compensates
            .clone()
            .expect("a compensation names the action it undoes");
        match self.compensations.get(key) {
            Some(CompensationFate::Done) => return Outcome::Success(Value::Null),
            Some(CompensationFate::Rejected(reason)) => return Outcome::Rejected(reason.clone()),
            None => {}
        }
        let applied = matches!(self.actions.get(&target), Some(ActionFate::Applied(_)));
        if !applied || self.undone.contains(&target) {
            // Nothing to undo (never ran, refused, or undone already): a
            // successful no-op that also bars the action from running later.
            self.actions.entry(target).or_insert(ActionFate::Blocked);
            self.compensations
                .insert(key.clone(), CompensationFate::Done);
            return Outcome::Success(Value::Null);
        }
        match decide(self.healing, choice, 170, 230) {
            Decision::Success => {
                self.undone.insert(target);
                self.compensations
                    .insert(key.clone(), CompensationFate::Done);
                Outcome::Success(Value::Null)
            }
            Decision::Transient => Outcome::TransientError("participant busy".into()),
            Decision::Rejected => {
                let reason = format!("cannot undo ({choice})");
                self.compensations
                    .insert(key.clone(), CompensationFate::Rejected(reason.clone()));
                Outcome::Rejected(reason)
            }
        }
    }
}

enum Decision {
    Success,
    Transient,
    Rejected,
}

/// `choice < success` succeeds, `< transient` is a transient error, the rest a rejection.
fn decide(healing: bool, choice: u8, success: u8, transient: u8) -> Decision {
    if healing || choice < success {
        Decision::Success
    } else if choice < transient {
        Decision::Transient
    } else {
        Decision::Rejected
    }
}

/// One random move of the world.
#[derive(Debug, Clone)]
pub enum Op {
    /// Deliver the in-flight message at `pick` (modulo the network size),
    /// leaving a copy in the network when `keep_copy`; `choice` decides the
    /// participant's answer if the key is undecided.
    Deliver {
        /// Which message.
        pick: usize,
        /// Whether the network duplicates it.
        keep_copy: bool,
        /// The participant's dice.
        choice: u8,
    },
    /// Lose the in-flight message at `pick`.
    Drop {
        /// Which message.
        pick: usize,
    },
    /// Advance the clock by `ms` and fire every due timer.
    Advance {
        /// How far.
        ms: u32,
    },
    /// Advance the clock by `ms` and fire every due timer as held: its
    /// command still in the outbox (`unsent`) or the broker out of reach.
    AdvanceHeld {
        /// How far.
        ms: u32,
        /// Which reason.
        unsent: bool,
    },
    /// Fire some timer the saga ever scheduled, due or not, stale or not.
    FireScheduled {
        /// Which one.
        pick: usize,
    },
    /// Ask to cancel.
    Cancel,
    /// An operator retries.
    OperatorRetry,
}

/// The saga, its world, and what the checks remember between transitions.
pub struct World<'f> {
    /// The flow the saga runs.
    flow: &'f Flow,
    /// The saga now.
    pub saga: SagaInstance,
    /// The simulated clock.
    now: i64,
    /// In-flight commands and replies.
    network: Vec<Msg>,
    /// The participants' ledger.
    parts: Participants,
    /// What successful actions answer.
    success: SuccessData,
    /// Every timer ever scheduled (for stale firings).
    scheduled: Vec<TimerFired>,
    /// Jitter source (a small LCG, deterministic per case).
    rng: u64,
    /// Action keys issued, per step.
    issued: HashMap<String, BTreeSet<String>>,
    /// Stage of the last compensation sent.
    last_compensation_stage: Option<usize>,
    /// Events applied (accepted or refused), for diagnostics.
    pub trace: Vec<String>,
    /// What happened, in numbers.
    pub stats: Stats,
}

impl<'f> World<'f> {
    /// Starts a saga of `flow` with `data`.
    pub fn new(flow: &'f Flow, data: Value, success: SuccessData, seed: u64) -> Self {
        let now = 1_700_000_000_000;
        let saga = SagaInstance::new(flow, Uuid::from_u128(u128::from(seed) + 1), data);
        let mut world = Self {
            flow,
            saga,
            now,
            network: Vec::new(),
            parts: Participants::default(),
            success,
            scheduled: Vec::new(),
            rng: seed,
            issued: HashMap::new(),
            last_compensation_stage: None,
            trace: Vec::new(),
            stats: Stats::default(),
        };
        world
            .apply(Event::Started)
            .expect("Started is never refused");
        world
    }

    fn jitter(&mut self) -> f64 {
        self.rng = self
            .rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Plays one random move.
    pub fn play(&mut self, op: &Op) {
        match *op {
            Op::Deliver {
                pick,
                keep_copy,
                choice,
            } => {
                if self.network.is_empty() {
                    return;
                }
                let index = pick % self.network.len();
                let msg = if keep_copy {
                    self.network[index].clone()
                } else {
                    self.network.swap_remove(index)
                };
                self.deliver(msg, choice);
            }
            Op::Drop { pick } => {
                if !self.network.is_empty() {
                    let index = pick % self.network.len();
                    self.network.swap_remove(index);
                }
            }
            Op::Advance { ms } => {
                self.now += i64::from(ms);
                self.fire_due();
            }
            Op::AdvanceHeld { ms, unsent } => {
                self.now += i64::from(ms);
                let delivery = if unsent {
                    Delivery::Unsent
                } else {
                    Delivery::BrokerAway
                };
                for timer in self.saga.due_timers(self.now) {
                    self.apply(Event::TimerFired(TimerFired { delivery, ..timer }))
                        .expect("timers are never refused");
                }
            }
            Op::FireScheduled { pick } => {
                if !self.scheduled.is_empty() {
                    let timer = self.scheduled[pick % self.scheduled.len()].clone();
                    let _ = self.apply(Event::TimerFired(timer));
                }
            }
            Op::Cancel => {
                let _ = self.apply(Event::CancelRequested {
                    reason: "simulated cancel".into(),
                });
            }
            Op::OperatorRetry => {
                let _ = self.apply(Event::OperatorRetry);
            }
        }
    }

    fn deliver(&mut self, msg: Msg, choice: u8) {
        match msg {
            Msg::Command(command) => {
                if self.saga.status.is_final() {
                    self.stats.after_the_end += 1;
                }
                let outcome = self.parts.handle(&command, choice, self.success);
                self.network.push(Msg::Reply(Reply {
                    step: command.step,
                    phase: command.phase,
                    attempt: command.attempt,
                    outcome,
                }));
            }
            Msg::Reply(reply) => {
                self.apply(Event::Reply(reply))
                    .expect("replies are never refused");
            }
        }
    }

    /// Fires every timer due now, earliest first (as listed before firing).
    fn fire_due(&mut self) {
        for timer in self.saga.due_timers(self.now) {
            self.apply(Event::TimerFired(timer))
                .expect("timers are never refused");
        }
    }

    /// Heals the world (participants succeed on undecided keys, nothing is
    /// lost) and drives the saga until it is final, then drains the network.
    pub fn heal(&mut self) {
        self.parts.healing = true;
        for _ in 0..5_000 {
            if self.saga.status.is_final() {
                break;
            }
            if !self.network.is_empty() {
                let msg = self.network.remove(0);
                self.deliver(msg, 0);
            } else if self.saga.status == SagaStatus::Failed {
                self.apply(Event::OperatorRetry)
                    .expect("a failed saga can be retried");
            } else if let Some(due) = self.saga.next_due_at_ms() {
                self.now = self.now.max(due);
                self.fire_due();
            } else {
                panic!(
                    "saga stuck: {:?} with nothing in flight and no timer\n{}",
                    self.saga.status,
                    self.describe()
                );
            }
        }
        assert!(
            self.saga.status.is_final(),
            "saga did not finish while healing\n{}",
            self.describe()
        );
        // Whatever is still in flight reaches its destination.
        while !self.network.is_empty() {
            let msg = self.network.remove(0);
            self.deliver(msg, 0);
        }
        self.stats.blocked = self.parts.blocked;
        self.check_outcome();
    }

    /// Applies `event` and checks every per-transition guarantee.
    fn apply(&mut self, event: Event) -> Result<(), Refused> {
        let jitter = self.jitter();
        let ctx = Context {
            now_ms: self.now,
            jitter,
        };
        let before = self.saga.clone();
        let result = sagas::apply(&before, self.flow, &event, ctx);
        let (after, t) = match result {
            Err(refused) => {
                self.trace.push(format!("{event:?} -> refused: {refused}"));
                match (&event, &refused) {
                    (Event::CancelRequested { .. }, Refused::NotCancellable(_)) => {
                        assert!(
                            before.status != SagaStatus::Running
                                || self.point_of_no_return_passed(&before),
                            "cancel refused while running before the pivot: {refused}"
                        );
                    }
                    (Event::OperatorRetry, Refused::NotRetryable(status)) => {
                        assert_eq!(*status, before.status);
                        assert_ne!(before.status, SagaStatus::Failed);
                    }
                    _ => panic!("{event:?} refused with {refused:?}"),
                }
                return Err(refused);
            }
            Ok(ok) => ok,
        };
        self.trace
            .push(format!("{event:?} -> {:?} {:?}", after.status, t.actions));
        self.check_transition(&before, &event, &after, &t);
        self.count(&after, &t);

        // The same event again right away changes nothing.
        if let Ok((again, t2)) = sagas::apply(&after, self.flow, &event, ctx) {
            assert_eq!(
                t2.actions,
                vec![],
                "{event:?} applied twice acted again\n{}",
                self.describe()
            );
            assert_eq!(again.status, after.status);
            assert_eq!(again.stage, after.stage);
            assert_eq!(again.data, after.data);
            assert_eq!(again.steps, after.steps, "{event:?} applied twice");
            assert_eq!(again.seq, after.seq + t2.history.len() as u64);
        }

        for action in &t.actions {
            match action {
                Action::SendCommand(command) => self.network.push(Msg::Command(command.clone())),
                Action::ScheduleTimer {
                    step,
                    phase,
                    attempt,
                    kind,
                    ..
                } => self.scheduled.push(TimerFired {
                    step: step.clone(),
                    phase: *phase,
                    attempt: *attempt,
                    kind: *kind,
                    delivery: Delivery::Clear,
                }),
                Action::PublishLifecycle { .. } | Action::Finish { .. } => {}
            }
        }
        self.saga = after;
        Ok(())
    }

    fn count(&mut self, after: &SagaInstance, t: &Transition) {
        use sagas::{Direction, HistoryKind};
        for entry in &t.history {
            let stats = &mut self.stats;
            match entry.kind {
                HistoryKind::SagaFailed if after.direction == Direction::Forward => {
                    stats.failed_forward += 1
                }
                HistoryKind::SagaFailed => stats.failed_backward += 1,
                HistoryKind::CancelRequested => stats.cancels += 1,
                HistoryKind::OperatorRetry => stats.operator_retries += 1,
                HistoryKind::ReplyIgnored => stats.replies_ignored += 1,
                HistoryKind::TimerIgnored => stats.timers_ignored += 1,
                HistoryKind::TimerHeld => stats.timers_held += 1,
                HistoryKind::StepCompensated => stats.steps_compensated += 1,
                HistoryKind::SagaCompleted => stats.completed += 1,
                HistoryKind::SagaCompensated => stats.compensated += 1,
                _ => {}
            }
        }
    }

    fn point_of_no_return_passed(&self, saga: &SagaInstance) -> bool {
        self.flow
            .steps()
            .iter()
            .zip(&saga.steps)
            .any(|(def, rec)| def.kind != StepKind::Compensatable && rec.attempts > 0)
    }

    fn check_transition(
        &mut self,
        before: &SagaInstance,
        event: &Event,
        after: &SagaInstance,
        t: &Transition,
    ) {
        crate::support::check_seq(before.seq, after, t);
        assert_eq!(
            (&after.id, &after.saga_type, after.version),
            (&before.id, &before.saga_type, before.version),
            "a saga keeps its identity and version"
        );

        // Terminal states are absorbing.
        if before.status.is_final() {
            assert_eq!(t.actions, vec![], "{event:?} acted after the end");
            let mut same = after.clone();
            same.seq = before.seq;
            assert_eq!(&same, before, "{event:?} changed a finished saga");
        }
        // A FAILED saga only moves on an operator's word.
        if before.status == SagaStatus::Failed && *event != Event::OperatorRetry {
            assert_eq!(t.actions, vec![], "{event:?} acted on a failed saga");
            assert_eq!(after.status, SagaStatus::Failed);
        }
        // A timer that is not due yet is ignored.
        if let Event::TimerFired(timer) = event {
            let index = self.flow.step_index(&timer.step).unwrap();
            if let Some(wait) = before.steps[index].wait
                && wait.due_at_ms > self.now
            {
                let mut same = after.clone();
                same.seq = before.seq;
                assert_eq!(&same, before, "premature {timer:?} changed the saga");
            }
        }

        // Lifecycle announcements agree with the state.
        let published: Vec<SagaStatus> = t
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::PublishLifecycle { status } => Some(*status),
                _ => None,
            })
            .collect();
        if after.status != before.status {
            assert_eq!(published.last(), Some(&after.status));
        }
        if let Some(last) = published.last() {
            assert_eq!(*last, after.status);
        }
        let finishes: Vec<SagaStatus> = t
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Finish { status } => Some(*status),
                _ => None,
            })
            .collect();
        let entered_terminal = after.status.is_terminal()
            && (after.status != before.status || *event == Event::OperatorRetry);
        if entered_terminal {
            assert_eq!(finishes, vec![after.status]);
        } else {
            assert_eq!(finishes, vec![], "Finish without reaching a terminal state");
        }

        // Commands.
        let mut sent_after_finish = false;
        for action in &t.actions {
            match action {
                Action::Finish { .. } => sent_after_finish = true,
                Action::SendCommand(command) => {
                    assert!(!sent_after_finish, "command sent after Finish: {t:#?}");
                    self.check_command(after, command);
                }
                _ => {}
            }
        }

        if after.status.is_terminal() {
            check_settled(self.flow, after);
        }
        for (def, rec) in self.flow.steps().iter().zip(&after.steps) {
            if let Some(wait) = rec.wait {
                assert!(
                    !after.status.is_terminal(),
                    "{} waits on a timer in a terminal saga",
                    def.name
                );
                assert!(wait.attempt >= 1);
                if wait.kind == TimerKind::ReplyTimeout {
                    let count = match wait.phase {
                        Phase::Action => rec.attempts,
                        Phase::Compensation => rec.compensation_attempts,
                    };
                    assert_eq!(wait.attempt, count, "{} waits for an old attempt", def.name);
                }
            }
        }
    }

    fn check_command(&mut self, after: &SagaInstance, command: &Command) {
        let index = self
            .flow
            .step_index(&command.step)
            .expect("commands name steps of the flow");
        let def = &self.flow.steps()[index];
        assert_eq!(command.participant, def.participant);
        assert_eq!(
            command.idempotency_key,
            after.idempotency_key(index, command.phase)
        );
        match command.phase {
            Phase::Action => {
                assert_eq!(command.command, def.command);
                assert_eq!(command.compensates, None);
                assert!(
                    matches!(after.status, SagaStatus::Running),
                    "action of {} sent while {:?}",
                    def.name,
                    after.status
                );
                self.issued
                    .entry(command.step.clone())
                    .or_default()
                    .insert(command.idempotency_key.clone());
            }
            Phase::Compensation => {
                assert_eq!(def.kind, StepKind::Compensatable);
                assert_eq!(Some(command.command.as_str()), def.compensation.as_deref());
                let undoes = command.compensates.as_ref().expect("compensates is set");
                assert!(
                    self.issued
                        .get(&command.step)
                        .is_some_and(|keys| keys.contains(undoes)),
                    "compensation of {} for action key {undoes} that was never issued",
                    def.name
                );
                if let Some(last) = self.last_compensation_stage {
                    assert!(
                        def.stage <= last,
                        "compensation of {} (stage {}) after one of stage {last}\n{}",
                        def.name,
                        def.stage,
                        self.describe()
                    );
                }
                self.last_compensation_stage = Some(def.stage);
            }
        }
    }

    /// After healing and draining: the participants' ledger agrees with the outcome.
    fn check_outcome(&self) {
        let mut applied_per_step: HashMap<&str, usize> = HashMap::new();
        for (key, step) in &self.parts.applied {
            let issued = self.issued.get(step).is_some_and(|keys| keys.contains(key));
            assert!(issued, "{key} applied but never issued");
            *applied_per_step.entry(step.as_str()).or_default() += 1;
        }
        match self.saga.status {
            SagaStatus::Completed => {
                for def in self.flow.steps() {
                    assert_eq!(
                        applied_per_step.get(def.name.as_str()),
                        Some(&1),
                        "completed, but {} was not applied exactly once\n{}",
                        def.name,
                        self.describe()
                    );
                }
                assert!(
                    self.parts.undone.is_empty(),
                    "completed, but undid {:?}",
                    self.parts.undone
                );
            }
            SagaStatus::Compensated => {
                for (key, step) in &self.parts.applied {
                    let index = self.flow.step_index(step).unwrap();
                    assert_eq!(
                        self.flow.steps()[index].kind,
                        StepKind::Compensatable,
                        "compensated, but {} ({key}) took effect and cannot be undone\n{}",
                        step,
                        self.describe()
                    );
                    assert!(
                        self.parts.undone.contains(key),
                        "compensated, but {step} ({key}) is still applied\n{}",
                        self.describe()
                    );
                }
            }
            other => panic!("not final after healing: {other:?}"),
        }
    }

    /// Whether the participants applied an action of `step`, and whether
    /// they undid it.
    pub fn ledger(&self, step: &str) -> (bool, bool) {
        let keys: Vec<&String> = self
            .parts
            .applied
            .iter()
            .filter(|(_, s)| s.as_str() == step)
            .map(|(key, _)| key)
            .collect();
        let undone = !keys.is_empty() && keys.iter().all(|k| self.parts.undone.contains(*k));
        (!keys.is_empty(), undone)
    }

    /// The saga and the tail of what happened to it, for failure messages.
    pub fn describe(&self) -> String {
        let tail: Vec<&String> = self.trace.iter().rev().take(30).collect();
        let tail: Vec<&&String> = tail.iter().rev().collect();
        format!(
            "saga: {:#?}\nledger applied: {:?}\nundone: {:?}\nlast events:\n{}",
            self.saga,
            self.parts.applied,
            self.parts.undone,
            tail.iter()
                .map(|s| format!("  {s}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// In a terminal saga every issued action ended succeeded, compensated or
/// definitively rejected, unless the saga is FAILED (an operator's problem).
pub fn check_settled(flow: &Flow, saga: &SagaInstance) {
    for (def, rec) in flow.steps().iter().zip(&saga.steps) {
        assert!(
            rec.wait.is_none(),
            "{} still waits in a terminal saga",
            def.name
        );
        match saga.status {
            SagaStatus::Completed => assert_eq!(rec.status, StepStatus::Succeeded, "{}", def.name),
            SagaStatus::Compensated => {
                if rec.attempts == 0 {
                    assert_eq!(rec.status, StepStatus::Skipped, "{}", def.name);
                } else {
                    let rejected = rec.status == StepStatus::Failed && !rec.maybe_applied;
                    assert!(
                        rec.status == StepStatus::Compensated || rejected,
                        "compensated saga, but issued step {} ended {:?}\n{saga:#?}",
                        def.name,
                        rec.status
                    );
                }
            }
            _ => {}
        }
    }
}
