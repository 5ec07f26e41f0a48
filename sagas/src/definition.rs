//! The definition DSL: how a flow is written in Rust.
//!
//! A [`Flow`] is a named, versioned list of *stages*; a stage is one step or a
//! parallel group of steps. Each [`Step`] names the participant and command
//! it calls, builds the command's payload from the saga's typed data, folds
//! the reply back into that data, and declares its kind, compensation, retry
//! policy and timeout. Typed closures are erased to JSON-in/JSON-out functions
//! here, so the state machine itself only ever sees `serde_json::Value`.

use std::{collections::HashSet, fmt, sync::Arc, time::Duration};

use serde_json::Map;

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::contract::{Action, Compensation};
use crate::names::{AttributeName, CommandName, InvalidName, ParticipantName, SagaType, StepName};

/// Longest value of a search attribute, in bytes: it is stored in an
/// index, and a longer value is no key anybody types.
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 256;

/// The typed data a flow carries from step to step (persisted as JSON).
///
/// A flow's input is parsed as [`SagaData::Input`] (unknown fields should be
/// refused with `#[serde(deny_unknown_fields)]`), validated, and turned into
/// the initial data by [`SagaData::from_input`]. Steps read the data to build
/// payloads and write reply results into it.
pub trait SagaData: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// What `StartSaga` accepts as `input_json`.
    type Input: DeserializeOwned;
    /// Validates the parsed input and builds the saga's initial data.
    fn from_input(input: Self::Input) -> Result<Self, InputError>;
}

/// Bad saga input: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", if field.is_empty() { "input" } else { field.as_str() })]
pub struct InputError {
    /// Path of the offending field, e.g. `items[0].quantity`; empty for the whole input.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl InputError {
    /// An error about `field` (a path such as `items[1].sku`).
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A flow definition that cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    /// A flow, step, participant or command name breaks the naming rule
    /// ([`crate::names`]).
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// Versions start at 1.
    #[error("flow {0}: versions start at 1")]
    ZeroVersion(String),
    /// A flow needs at least one step.
    #[error("flow {0} has no steps")]
    NoSteps(String),
    /// Step names identify replies and timers; they must be unique.
    #[error("flow {flow}: step {step} is defined twice")]
    DuplicateStep {
        /// The flow.
        flow: String,
        /// The repeated step name.
        step: String,
    },
    /// A search attribute declared twice.
    #[error("flow {flow}: search attribute {attribute} is declared twice")]
    DuplicateAttribute {
        /// The flow.
        flow: String,
        /// The repeated attribute.
        attribute: String,
    },
    /// A parallel group of fewer than two steps is just a step.
    #[error("flow {0}: a parallel group needs at least two steps")]
    TinyGroup(String),
    /// Compensatable steps must say how they are undone.
    #[error("flow {flow}: compensatable step {step} has no compensation")]
    MissingCompensation {
        /// The flow.
        flow: String,
        /// The step.
        step: String,
    },
    /// Pivot and retriable steps are never compensated.
    #[error("flow {flow}: {kind} step {step} cannot have a compensation")]
    UnexpectedCompensation {
        /// The flow.
        flow: String,
        /// The step.
        step: String,
        /// Its kind.
        kind: StepKind,
    },
    /// A step's compensation must be served by the participant that ran
    /// the action: only it knows what to undo.
    #[error(
        "flow {flow}: step {step} is compensated on participant {compensation_participant}, not on {participant} that runs it"
    )]
    CompensationElsewhere {
        /// The flow.
        flow: String,
        /// The step.
        step: String,
        /// Who runs the action.
        participant: String,
        /// Who the compensation was addressed to.
        compensation_participant: String,
    },
    /// Classic saga ordering: compensatable steps, then at most one pivot,
    /// then retriable steps; pivot and retriable steps run alone.
    #[error("flow {flow}: step {step}: {reason}")]
    BadOrder {
        /// The flow.
        flow: String,
        /// The step that breaks the order.
        step: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The classic saga step taxonomy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepKind {
    /// Can be undone by its compensation if a later step fails.
    Compensatable,
    /// The point of no return: once it succeeds the saga can only go forward.
    Pivot,
    /// Comes after the pivot; retried until it succeeds, never compensated.
    Retriable,
}

impl StepKind {
    /// Lowercase name, as shown by `ListSagaTypes`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Compensatable => "compensatable",
            Self::Pivot => "pivot",
            Self::Retriable => "retriable",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exponential backoff with jitter and an attempt budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Deliveries allowed in one round (first try included); `None` = unlimited.
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any delay.
    pub max_backoff: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
    /// Fraction of each delay that is randomised: the delay is drawn from
    /// `[d * (1 - jitter), d]`, so retries of many sagas do not stampede.
    pub jitter: f64,
}

impl RetryPolicy {
    /// `max_attempts` deliveries, doubling from `initial` up to 30 s, 50% jitter.
    pub fn exponential(initial: Duration, max_attempts: u32) -> Self {
        Self {
            max_attempts: Some(max_attempts.max(1)),
            initial_backoff: initial,
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }

    /// Retries without limit (for retriable steps), doubling from `initial` up to `max`.
    pub fn forever(initial: Duration, max: Duration) -> Self {
        Self {
            max_attempts: None,
            initial_backoff: initial,
            max_backoff: max,
            multiplier: 2.0,
            jitter: 0.5,
        }
    }

    /// Sets the upper bound of any delay.
    pub fn with_max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// Whether another delivery is allowed after `attempts_so_far` in this round.
    pub fn allows_another(&self, attempts_so_far: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempts_so_far < max)
    }

    /// Delay before retrying after `failed_attempt` (1-based), with
    /// `sample` in `[0, 1)` supplied by the caller (the machine stays pure).
    pub fn backoff_ms(&self, failed_attempt: u32, sample: f64) -> u64 {
        let exp = self
            .multiplier
            .powi(failed_attempt.saturating_sub(1).min(64) as i32);
        let base = (self.initial_backoff.as_millis() as f64 * exp)
            .min(self.max_backoff.as_millis() as f64);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let sample = sample.clamp(0.0, 1.0);
        (base * (1.0 - jitter * sample)).round().max(0.0) as u64
    }
}

/// A JSON-in, JSON-out function derived from a typed closure.
type PayloadFn = Arc<dyn Fn(&Value) -> Result<Value, String> + Send + Sync>;
/// Folds a success reply's data into the saga's data.
type FoldFn = Arc<dyn Fn(&mut Value, &Value) -> Result<(), String> + Send + Sync>;
/// Parses and validates a flow's input.
type ParseFn = Arc<dyn Fn(&str) -> Result<Value, InputError> + Send + Sync>;

/// One step of a flow, as the state machine sees it.
#[derive(Clone)]
pub struct StepDef {
    /// Unique within the flow, e.g. `reserve_inventory`.
    pub name: StepName,
    /// Compensatable, pivot or retriable.
    pub kind: StepKind,
    /// Participant that runs it (the command routing key).
    pub participant: ParticipantName,
    /// Command name of the action, e.g. `reserve`.
    pub command: CommandName,
    /// Command name of the compensation, e.g. `release`.
    pub compensation: Option<CommandName>,
    /// Index of the stage (sequential position) the step belongs to.
    pub stage: usize,
    /// How long to wait for a reply before the outcome counts as unknown.
    pub timeout: Duration,
    /// Retries of the action.
    pub retry: RetryPolicy,
    /// Retries of the compensation; when exhausted the saga is FAILED.
    pub compensation_retry: RetryPolicy,
    /// Builds the action's payload.
    payload: PayloadFn,
    /// Builds the compensation's payload.
    compensation_payload: Option<PayloadFn>,
    /// Folds the action's success data into the saga data.
    fold: FoldFn,
}

impl fmt::Debug for StepDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepDef")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("participant", &self.participant)
            .field("command", &self.command)
            .field("compensation", &self.compensation)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl StepDef {
    /// The action's payload for the saga's current data.
    pub fn action_payload(&self, data: &Value) -> Result<Value, String> {
        (self.payload)(data)
    }

    /// The compensation's payload for the saga's current data.
    pub fn compensation_payload(&self, data: &Value) -> Result<Value, String> {
        match &self.compensation_payload {
            Some(build) => build(data),
            None => Err(format!("step {} has no compensation", self.name)),
        }
    }

    /// Folds the action's success reply data into the saga's data.
    pub fn fold_reply(&self, data: &mut Value, reply: &Value) -> Result<(), String> {
        (self.fold)(data, reply)
    }
}

/// Default time to wait for a reply.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default retries of a compensatable or pivot step's action.
fn default_retry() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(200), 5)
}

/// Default retries of a retriable step: forever, since it must succeed.
fn default_retriable_retry() -> RetryPolicy {
    RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(30))
}

/// Default retries of a compensation.
fn default_compensation_retry() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(200), 8)
}

/// What a step sets for itself; anything left `None` takes the flow's
/// default ([`FlowBuilder::default_timeout`] ...), then the built-in one.
#[derive(Debug, Clone, Copy, Default)]
struct Overrides {
    /// Reply timeout.
    timeout: Option<Duration>,
    /// Retries of the action.
    retry: Option<RetryPolicy>,
    /// Retries of the compensation.
    compensation_retry: Option<RetryPolicy>,
}

/// A step as written, its names still unparsed (they are parsed, and any
/// error reported, when the flow is built).
struct Draft {
    /// The step's name.
    name: String,
    /// Compensatable, pivot or retriable.
    kind: StepKind,
    /// The participant's name.
    participant: String,
    /// The action's command.
    command: String,
    /// The compensation's command.
    compensation: Option<String>,
    /// Builds the action's payload.
    payload: PayloadFn,
    /// Builds the compensation's payload.
    compensation_payload: Option<PayloadFn>,
    /// Folds the action's success data into the saga data.
    fold: FoldFn,
}

/// Typed builder of one step over the saga data `D`.
///
/// Steps are written against typed contracts with [`Step::call`], or with
/// plain participant and command names and JSON-producing closures
/// ([`Step::compensatable`], [`Step::pivot`], [`Step::retriable`]) when the
/// commands are only known at run time.
pub struct Step<D: SagaData> {
    /// The step being built (names parsed, timeout and retries resolved by
    /// the flow).
    def: Draft,
    /// What the step set itself.
    overrides: Overrides,
    /// A typed compensation served by another participant than the action
    /// (refused when the flow is built).
    compensation_elsewhere: Option<&'static str>,
    /// Ties the builder to the flow's data type.
    _data: std::marker::PhantomData<fn(D)>,
}

impl<D: SagaData> Step<D> {
    fn new(kind: StepKind, name: &str, participant: &str, command: &str) -> Self {
        Self {
            def: Draft {
                name: name.to_owned(),
                kind,
                participant: participant.to_owned(),
                command: command.to_owned(),
                compensation: None,
                payload: Arc::new(|_| Ok(Value::Object(Default::default()))),
                compensation_payload: None,
                fold: Arc::new(|_, _| Ok(())),
            },
            overrides: Overrides::default(),
            compensation_elsewhere: None,
            _data: std::marker::PhantomData,
        }
    }

    /// A step that sends the typed action `A`, its payload built from the
    /// saga data; say what kind of step it is with
    /// [`Call::compensate_with`], [`Call::pivot`] or [`Call::retriable`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sagas::{Flow, InputError, SagaData, Step};
    /// use sagas::flows::order_placement::{OrderData, contracts::{inventory, payment}};
    ///
    /// let reserve = Step::call::<inventory::Reserve>("reserve_inventory", |d: &OrderData| {
    ///     inventory::ReservePayload::for_order(d)
    /// })
    /// .on_reply(|d: &mut OrderData, r: inventory::Reserved| d.reservation_id = r.reservation_id)
    /// .compensate_with::<inventory::Release>(|d: &OrderData| inventory::ReleasePayload {
    ///     order_id: d.order_id.clone(),
    ///     reservation_id: d.reservation_id.clone(),
    /// })
    /// .timeout(Duration::from_secs(5));
    /// ```
    ///
    /// A payload of another type than the contract's does not compile:
    ///
    /// ```compile_fail,E0308
    /// use sagas::Step;
    /// use sagas::flows::order_placement::{OrderData, contracts::{inventory, payment}};
    ///
    /// // payment's payload sent as an inventory reservation
    /// let wrong = Step::call::<inventory::Reserve>("reserve_inventory", |d: &OrderData| {
    ///     payment::AmountPayload::for_order(d)
    /// });
    /// ```
    ///
    /// and neither does compensating a step with another action's undo:
    ///
    /// ```compile_fail,E0271
    /// use sagas::Step;
    /// use sagas::flows::order_placement::{OrderData, contracts::{inventory, payment}};
    ///
    /// let wrong = Step::call::<inventory::Reserve>("reserve_inventory", |d: &OrderData| {
    ///     inventory::ReservePayload::for_order(d)
    /// })
    /// .compensate_with::<payment::Refund>(|d: &OrderData| payment::AmountPayload::for_order(d));
    /// ```
    pub fn call<A: Action>(
        name: &str,
        payload: impl Fn(&D) -> A::Payload + Send + Sync + 'static,
    ) -> Call<D, A> {
        let mut step = Self::new(StepKind::Compensatable, name, A::PARTICIPANT, A::COMMAND);
        step.def.payload = erase_payload(payload);
        Call {
            step,
            _action: std::marker::PhantomData,
        }
    }

    /// A step that a later failure undoes with its compensation.
    pub fn compensatable(name: &str, participant: &str, command: &str) -> Self {
        Self::new(StepKind::Compensatable, name, participant, command)
    }

    /// The point of no return: after it succeeds the saga only goes forward.
    pub fn pivot(name: &str, participant: &str, command: &str) -> Self {
        Self::new(StepKind::Pivot, name, participant, command)
    }

    /// A step after the pivot, retried until it succeeds and never compensated.
    pub fn retriable(name: &str, participant: &str, command: &str) -> Self {
        Self::new(StepKind::Retriable, name, participant, command)
    }

    /// Builds the action's payload from the saga data (default: `{}`).
    pub fn payload<P: Serialize>(
        mut self,
        build: impl Fn(&D) -> P + Send + Sync + 'static,
    ) -> Self {
        self.def.payload = erase_payload(build);
        self
    }

    /// Declares the compensation command and builds its payload.
    pub fn compensate_with<P: Serialize>(
        mut self,
        command: &str,
        build: impl Fn(&D) -> P + Send + Sync + 'static,
    ) -> Self {
        self.def.compensation = Some(command.to_owned());
        self.def.compensation_payload = Some(erase_payload(build));
        self
    }

    /// Folds the success reply (parsed as `R`) into the saga data. A reply
    /// that does not parse counts as a participant fault: the step took
    /// effect but cannot be used, so the saga compensates it.
    pub fn on_success<R: DeserializeOwned>(
        mut self,
        fold: impl Fn(&mut D, R) + Send + Sync + 'static,
    ) -> Self {
        self.def.fold = erase_fold(fold);
        self
    }

    /// How long to wait for a reply before the outcome counts as unknown
    /// (default: the flow's [`FlowBuilder::default_timeout`], else 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.overrides.timeout = Some(timeout);
        self
    }

    /// Retries of the action (default: the flow's
    /// [`FlowBuilder::default_retry`], else 5 attempts from 200 ms; a
    /// retriable step: forever).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.overrides.retry = Some(policy);
        self
    }

    /// Retries of the compensation (default: the flow's
    /// [`FlowBuilder::default_compensation_retry`], else 8 attempts from
    /// 200 ms).
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.overrides.compensation_retry = Some(policy);
        self
    }
}

/// A step calling the typed action `A`, before its kind is known: what
/// [`Step::call`] returns.
pub struct Call<D: SagaData, A: Action> {
    /// The step, compensatable until said otherwise.
    step: Step<D>,
    /// Ties the reply and compensation types to the action.
    _action: std::marker::PhantomData<fn(A)>,
}

impl<D: SagaData, A: Action> Call<D, A> {
    /// Folds the action's success reply into the saga data. A reply that
    /// does not parse as `A::Reply` counts as a participant fault: the step
    /// took effect but cannot be used, so the saga compensates it.
    pub fn on_reply(mut self, fold: impl Fn(&mut D, A::Reply) + Send + Sync + 'static) -> Self {
        self.step.def.fold = erase_fold(fold);
        self
    }

    /// A compensatable step, undone by `C` (a compensation of `A`, served
    /// by the same participant) with a payload built from the saga data.
    pub fn compensate_with<C: Compensation<Undoes = A>>(
        self,
        payload: impl Fn(&D) -> C::Payload + Send + Sync + 'static,
    ) -> Step<D> {
        let mut step = self.step;
        step.def.compensation = Some(C::COMMAND.to_owned());
        step.def.compensation_payload = Some(erase_payload(payload));
        if C::PARTICIPANT != A::PARTICIPANT {
            // Refused by FlowBuilder::build: a step has one participant,
            // which must also hold what its compensation undoes.
            step.compensation_elsewhere = Some(C::PARTICIPANT);
        }
        step
    }

    /// The flow's pivot: after it succeeds the saga only goes forward.
    pub fn pivot(self) -> Step<D> {
        let mut step = self.step;
        step.def.kind = StepKind::Pivot;
        step
    }

    /// A step after the pivot, retried until it succeeds, never compensated.
    pub fn retriable(self) -> Step<D> {
        let mut step = self.step;
        step.def.kind = StepKind::Retriable;
        step
    }
}

fn erase_fold<D: SagaData, R: DeserializeOwned>(
    fold: impl Fn(&mut D, R) + Send + Sync + 'static,
) -> FoldFn {
    Arc::new(move |data: &mut Value, reply: &Value| {
        let mut typed: D = serde_json::from_value(data.clone())
            .map_err(|e| format!("saga data does not match the flow: {e}"))?;
        let reply: R = serde_json::from_value(reply.clone())
            .map_err(|e| format!("malformed reply data: {e}"))?;
        fold(&mut typed, reply);
        *data = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
        Ok(())
    })
}

fn erase_payload<D: SagaData, P: Serialize>(
    build: impl Fn(&D) -> P + Send + Sync + 'static,
) -> PayloadFn {
    Arc::new(move |data: &Value| {
        let typed: D = serde_json::from_value(data.clone())
            .map_err(|e| format!("saga data does not match the flow: {e}"))?;
        serde_json::to_value(build(&typed)).map_err(|e| e.to_string())
    })
}

/// One flow, one version: what the state machine runs.
#[derive(Clone)]
pub struct Flow {
    /// Flow name, e.g. `order_placement`.
    name: SagaType,
    /// Version, from 1.
    version: u32,
    /// Human description of the input's JSON shape.
    input_description: String,
    /// Every step, in stage order.
    steps: Vec<StepDef>,
    /// Indices into `steps` for each stage.
    stages: Vec<Vec<usize>>,
    /// Input fields stored in indexed form at start, so that sagas can be
    /// found by them (`ListSagas`' `attributes`).
    search_attributes: Vec<AttributeName>,
    /// Parses and validates the input into initial saga data.
    parse_input: ParseFn,
}

impl fmt::Debug for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Flow {
    /// Starts a definition of flow `name`, version `version`, over data `D`.
    pub fn builder<D: SagaData>(name: &str, version: u32) -> FlowBuilder<D> {
        FlowBuilder {
            name: name.to_owned(),
            version,
            input_description: String::new(),
            search_attributes: Vec::new(),
            stages: Vec::new(),
            defaults: Overrides::default(),
            _data: std::marker::PhantomData,
        }
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The flow's version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Human description of the input's JSON shape.
    pub fn input_description(&self) -> &str {
        &self.input_description
    }

    /// The input fields sagas of this flow can be found by.
    pub fn search_attributes(&self) -> &[AttributeName] {
        &self.search_attributes
    }

    /// The search attributes of `input_json` (already accepted by
    /// [`Self::parse_input`]): each declared top-level field present with
    /// a string, number or boolean value, as text. A field that is an
    /// object or an array, or longer than [`MAX_ATTRIBUTE_VALUE_BYTES`],
    /// is refused naming the field: a start must not succeed with a key
    /// nobody can search for.
    pub fn attributes_of(
        &self,
        input_json: &str,
    ) -> Result<Vec<(AttributeName, String)>, InputError> {
        if self.search_attributes.is_empty() {
            return Ok(Vec::new());
        }
        let input: Map<String, Value> = serde_json::from_str(input_json)
            .map_err(|e| InputError::new("", format!("is not a JSON object: {e}")))?;
        let mut found = Vec::new();
        for name in &self.search_attributes {
            let text = match input.get(name.as_str()) {
                None | Some(Value::Null) => continue,
                Some(Value::String(text)) => text.clone(),
                Some(value @ (Value::Number(_) | Value::Bool(_))) => value.to_string(),
                Some(_) => {
                    return Err(InputError::new(
                        name.as_str(),
                        "is a search attribute: it must be a string, number or boolean",
                    ));
                }
            };
            if text.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                return Err(InputError::new(
                    name.as_str(),
                    format!(
                        "is a search attribute: it must be at most {MAX_ATTRIBUTE_VALUE_BYTES} bytes"
                    ),
                ));
            }
            found.push((name.clone(), text));
        }
        Ok(found)
    }

    /// Every step, in stage order.
    pub fn steps(&self) -> &[StepDef] {
        &self.steps
    }

    /// The steps of each stage, as indices into [`Self::steps`].
    pub fn stages(&self) -> &[Vec<usize>] {
        &self.stages
    }

    /// Index of the step called `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// Parses and validates `input_json`, returning the saga's initial data.
    /// Errors name the offending field.
    pub fn parse_input(&self, input_json: &str) -> Result<Value, InputError> {
        (self.parse_input)(input_json)
    }
}

/// Builder returned by [`Flow::builder`].
pub struct FlowBuilder<D: SagaData> {
    /// Flow name.
    name: String,
    /// Flow version.
    version: u32,
    /// Human description of the input.
    input_description: String,
    /// Searchable input fields, as given.
    search_attributes: Vec<String>,
    /// Stages added so far (each one or more steps).
    stages: Vec<Vec<Step<D>>>,
    /// What steps that do not set their own get.
    defaults: Overrides,
    /// Ties the builder to the data type.
    _data: std::marker::PhantomData<fn(D)>,
}

impl<D: SagaData> FlowBuilder<D> {
    /// Describes the input's JSON shape for `ListSagaTypes` and `sagactl types`.
    pub fn input_description(mut self, text: &str) -> Self {
        self.input_description = text.to_owned();
        self
    }

    /// Makes these top-level input fields searchable: their values are
    /// stored in indexed form when a saga starts, shown by `GetSaga`, and
    /// `ListSagas` finds sagas by them (`sagactl list --attr order_id=o-1`).
    /// Names follow the [naming rule](crate::names).
    pub fn searchable<'a>(mut self, fields: impl IntoIterator<Item = &'a str>) -> Self {
        self.search_attributes
            .extend(fields.into_iter().map(str::to_owned));
        self
    }

    /// The reply timeout of every step that does not set its own
    /// (built-in default: 10 s).
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        self.defaults.timeout = Some(timeout);
        self
    }

    /// The action retries of every compensatable and pivot step that does
    /// not set its own (built-in default: 5 attempts from 200 ms).
    /// Retriable steps keep retrying forever unless they say otherwise:
    /// they come after the pivot and must eventually succeed.
    pub fn default_retry(mut self, policy: RetryPolicy) -> Self {
        self.defaults.retry = Some(policy);
        self
    }

    /// The compensation retries of every compensatable step that does not
    /// set its own (built-in default: 8 attempts from 200 ms).
    pub fn default_compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.defaults.compensation_retry = Some(policy);
        self
    }

    /// Appends a step that runs after everything before it.
    pub fn step(mut self, step: Step<D>) -> Self {
        self.stages.push(vec![step]);
        self
    }

    /// Appends a parallel group: its steps start together; the flow goes on
    /// when all succeed, and compensates all that took effect if any fails.
    pub fn parallel(mut self, steps: impl IntoIterator<Item = Step<D>>) -> Self {
        self.stages.push(steps.into_iter().collect());
        self
    }

    /// Checks the definition and returns the runnable flow.
    pub fn build(self) -> Result<Flow, DefinitionError> {
        let name = SagaType::new(self.name.as_str())?;
        let flow = self.name.clone();
        if self.version == 0 {
            return Err(DefinitionError::ZeroVersion(flow));
        }
        if self.stages.is_empty() {
            return Err(DefinitionError::NoSteps(flow));
        }
        let mut names = HashSet::new();
        let mut steps = Vec::new();
        let mut stages = Vec::new();
        let mut past_pivot = false;
        let defaults = self.defaults;
        for (stage_index, stage) in self.stages.into_iter().enumerate() {
            if stage.len() > 1 {
                if let Some(s) = stage.iter().find(|s| s.def.kind != StepKind::Compensatable) {
                    return Err(DefinitionError::BadOrder {
                        flow,
                        step: s.def.name.clone(),
                        reason: "only compensatable steps can run in a parallel group",
                    });
                }
            } else if stage.is_empty() {
                return Err(DefinitionError::TinyGroup(flow));
            }
            let mut indices = Vec::new();
            for Step {
                def: draft,
                overrides,
                compensation_elsewhere,
                ..
            } in stage
            {
                // What the step did not set itself comes from the flow, then
                // from the built-in defaults.
                let retry = overrides.retry.unwrap_or_else(|| match draft.kind {
                    StepKind::Retriable => default_retriable_retry(),
                    _ => defaults.retry.unwrap_or_else(default_retry),
                });
                let step = StepDef {
                    name: StepName::new(draft.name)?,
                    kind: draft.kind,
                    participant: ParticipantName::new(draft.participant)?,
                    command: CommandName::new(draft.command)?,
                    compensation: draft.compensation.map(CommandName::new).transpose()?,
                    stage: stage_index,
                    timeout: overrides
                        .timeout
                        .or(defaults.timeout)
                        .unwrap_or(DEFAULT_TIMEOUT),
                    retry,
                    compensation_retry: overrides
                        .compensation_retry
                        .or(defaults.compensation_retry)
                        .unwrap_or_else(default_compensation_retry),
                    payload: draft.payload,
                    compensation_payload: draft.compensation_payload,
                    fold: draft.fold,
                };
                if let Some(elsewhere) = compensation_elsewhere {
                    return Err(DefinitionError::CompensationElsewhere {
                        flow,
                        step: step.name.into(),
                        participant: step.participant.into(),
                        compensation_participant: elsewhere.to_owned(),
                    });
                }
                if !names.insert(step.name.clone()) {
                    return Err(DefinitionError::DuplicateStep {
                        flow,
                        step: step.name.into(),
                    });
                }
                match (step.kind, &step.compensation) {
                    (StepKind::Compensatable, None) => {
                        return Err(DefinitionError::MissingCompensation {
                            flow,
                            step: step.name.into(),
                        });
                    }
                    (StepKind::Compensatable, Some(_)) => {
                        if past_pivot {
                            return Err(DefinitionError::BadOrder {
                                flow,
                                step: step.name.into(),
                                reason: "a compensatable step cannot follow a pivot or retriable step",
                            });
                        }
                    }
                    (kind, Some(_)) => {
                        return Err(DefinitionError::UnexpectedCompensation {
                            flow,
                            step: step.name.into(),
                            kind,
                        });
                    }
                    (StepKind::Pivot, None) => {
                        if past_pivot {
                            return Err(DefinitionError::BadOrder {
                                flow,
                                step: step.name.into(),
                                reason: "a pivot step must come before every retriable step and be the only pivot",
                            });
                        }
                        past_pivot = true;
                    }
                    (StepKind::Retriable, None) => past_pivot = true,
                }
                indices.push(steps.len());
                steps.push(step);
            }
            stages.push(indices);
        }
        let mut search_attributes: Vec<AttributeName> = Vec::new();
        for text in self.search_attributes {
            let attribute = AttributeName::new(text)?;
            if search_attributes.contains(&attribute) {
                return Err(DefinitionError::DuplicateAttribute {
                    flow,
                    attribute: attribute.into(),
                });
            }
            search_attributes.push(attribute);
        }
        let parse_input: ParseFn = Arc::new(parse_typed_input::<D>);
        Ok(Flow {
            name,
            version: self.version,
            input_description: self.input_description,
            search_attributes,
            steps,
            stages,
            parse_input,
        })
    }
}

/// Parses `input_json` as `D::Input`, naming the failing field's path.
fn parse_typed_input<D: SagaData>(input_json: &str) -> Result<Value, InputError> {
    let deserializer = &mut serde_json::Deserializer::from_str(input_json);
    let input: D::Input = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { String::new() } else { path };
        InputError::new(field, err.into_inner().to_string())
    })?;
    let data = D::from_input(input)?;
    serde_json::to_value(&data).map_err(|e| InputError::new("", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize)]
    struct Data {
        n: u32,
    }
    impl SagaData for Data {
        type Input = Data;
        fn from_input(input: Data) -> Result<Self, InputError> {
            Ok(input)
        }
    }

    fn comp(name: &str) -> Step<Data> {
        Step::compensatable(name, "p", "do").compensate_with("undo", |_| ())
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = RetryPolicy::exponential(Duration::from_millis(100), 5)
            .with_max_backoff(Duration::from_millis(350));
        assert_eq!(p.backoff_ms(1, 0.0), 100);
        assert_eq!(p.backoff_ms(2, 0.0), 200);
        assert_eq!(p.backoff_ms(3, 0.0), 350);
        assert_eq!(p.backoff_ms(1, 0.999_999), 50);
        assert!(p.allows_another(4));
        assert!(!p.allows_another(5));
        assert!(
            RetryPolicy::forever(Duration::from_millis(1), Duration::from_secs(1))
                .allows_another(u32::MAX)
        );
    }

    #[test]
    fn definitions_are_checked() {
        let no_comp = Flow::builder::<Data>("f", 1)
            .step(Step::compensatable("a", "p", "do"))
            .build();
        assert!(matches!(
            no_comp,
            Err(DefinitionError::MissingCompensation { .. })
        ));
        let dup = Flow::builder::<Data>("f", 1)
            .step(comp("a"))
            .step(comp("a"))
            .build();
        assert!(matches!(dup, Err(DefinitionError::DuplicateStep { .. })));
        let after_pivot = Flow::builder::<Data>("f", 1)
            .step(Step::pivot("p", "p", "do"))
            .step(comp("a"))
            .build();
        assert!(matches!(after_pivot, Err(DefinitionError::BadOrder { .. })));
        let two_pivots = Flow::builder::<Data>("f", 1)
            .step(Step::pivot("p", "p", "do"))
            .step(Step::pivot("q", "p", "do"))
            .build();
        assert!(matches!(two_pivots, Err(DefinitionError::BadOrder { .. })));
        let pivot_in_group = Flow::builder::<Data>("f", 1)
            .parallel([comp("a"), Step::pivot("p", "p", "do")])
            .build();
        assert!(matches!(
            pivot_in_group,
            Err(DefinitionError::BadOrder { .. })
        ));
        let bad_name = Flow::builder::<Data>("Bad Name", 1).step(comp("a")).build();
        assert!(matches!(bad_name, Err(DefinitionError::InvalidName(_))));
        assert!(matches!(
            Flow::builder::<Data>("f", 0).step(comp("a")).build(),
            Err(DefinitionError::ZeroVersion(_))
        ));
        assert!(matches!(
            Flow::builder::<Data>("f", 1).build(),
            Err(DefinitionError::NoSteps(_))
        ));
        let retriable_comp = Flow::builder::<Data>("f", 1)
            .step(Step::retriable("r", "p", "do").compensate_with("undo", |_| ()))
            .build();
        assert!(matches!(
            retriable_comp,
            Err(DefinitionError::UnexpectedCompensation { .. })
        ));
    }

    mod typed {
        use serde::{Deserialize, Serialize};

        #[derive(Serialize, Deserialize)]
        pub struct Nothing {}
        crate::contract!(Book: "hotel"."book", Nothing => Nothing, action);
        crate::contract!(Cancel: "hotel"."cancel", Nothing => Nothing, compensation of Book);
        crate::contract!(Refund: "bank"."refund", Nothing => Nothing, compensation of Book);
    }

    #[test]
    fn flow_defaults_apply_to_steps_that_set_nothing_and_steps_keep_their_own() {
        let slow = RetryPolicy::exponential(Duration::from_secs(1), 3);
        let undo = RetryPolicy::exponential(Duration::from_secs(2), 20);
        let flow = Flow::builder::<Data>("f", 1)
            .default_timeout(Duration::from_secs(3))
            .default_retry(slow)
            .default_compensation_retry(undo)
            .step(comp("plain"))
            .step(
                comp("own")
                    .timeout(Duration::from_secs(9))
                    .retry(RetryPolicy::exponential(Duration::from_millis(1), 2))
                    .compensation_retry(slow),
            )
            .step(Step::retriable("after", "p", "do"))
            .build()
            .unwrap();
        let [plain, own, after] = flow.steps() else {
            panic!("three steps")
        };
        assert_eq!(
            (plain.timeout, plain.retry, plain.compensation_retry),
            (Duration::from_secs(3), slow, undo)
        );
        assert_eq!(
            (own.timeout, own.retry, own.compensation_retry),
            (
                Duration::from_secs(9),
                RetryPolicy::exponential(Duration::from_millis(1), 2),
                slow
            )
        );
        // A retriable step keeps retrying forever: the flow's finite
        // default would let it give up after the pivot.
        assert_eq!(after.timeout, Duration::from_secs(3));
        assert_eq!(after.retry.max_attempts, None);

        let defaults = Flow::builder::<Data>("f", 1)
            .step(comp("a"))
            .build()
            .unwrap();
        assert_eq!(defaults.steps()[0].timeout, DEFAULT_TIMEOUT);
        assert_eq!(defaults.steps()[0].retry, default_retry());
    }

    #[test]
    fn typed_steps_take_names_from_their_contracts_and_compensate_on_the_same_participant() {
        let flow = Flow::builder::<Data>("f", 1)
            .step(
                Step::call::<typed::Book>("book", |_: &Data| typed::Nothing {})
                    .compensate_with::<typed::Cancel>(|_: &Data| typed::Nothing {}),
            )
            .build()
            .unwrap();
        let step = &flow.steps()[0];
        assert_eq!(
            (
                step.participant.as_str(),
                step.command.as_str(),
                step.compensation.as_deref()
            ),
            ("hotel", "book", Some("cancel"))
        );
        assert_eq!(step.kind, StepKind::Compensatable);
        let elsewhere = Flow::builder::<Data>("f", 1)
            .step(
                Step::call::<typed::Book>("book", |_: &Data| typed::Nothing {})
                    .compensate_with::<typed::Refund>(|_: &Data| typed::Nothing {}),
            )
            .build();
        match elsewhere {
            Err(e @ DefinitionError::CompensationElsewhere { .. }) => {
                assert!(e.to_string().contains("bank"), "{e}");
            }
            other => panic!("expected CompensationElsewhere, got {other:?}"),
        }
        let pivot = Flow::builder::<Data>("f", 1)
            .step(Step::call::<typed::Book>("book", |_: &Data| typed::Nothing {}).pivot())
            .build()
            .unwrap();
        assert_eq!(pivot.steps()[0].kind, StepKind::Pivot);
    }

    #[test]
    fn input_errors_name_the_field() {
        let flow = Flow::builder::<Data>("f", 1)
            .step(comp("a"))
            .build()
            .unwrap();
        let err = flow.parse_input(r#"{"n": "x"}"#).unwrap_err();
        assert_eq!(err.field, "n");
        let err = flow.parse_input("[").unwrap_err();
        assert_eq!(err.field, "");
        assert_eq!(
            flow.parse_input(r#"{"n": 3}"#).unwrap(),
            serde_json::json!({"n": 3})
        );
    }

    #[test]
    fn search_attributes_are_checked_and_extracted() {
        let flow = Flow::builder::<Data>("f", 1)
            .searchable(["n", "code", "absent"])
            .step(comp("a"))
            .build()
            .unwrap();
        assert_eq!(flow.search_attributes(), ["n", "code", "absent"]);
        let found = flow
            .attributes_of(r#"{"n": 3, "code": "o-1", "other": "x"}"#)
            .unwrap();
        let found: Vec<(&str, &str)> = found
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // Numbers as text; absent and undeclared fields give nothing.
        assert_eq!(found, [("n", "3"), ("code", "o-1")]);
        let nested = flow.attributes_of(r#"{"code": {"a": 1}}"#).unwrap_err();
        assert_eq!(nested.field, "code");
        let long = format!(
            r#"{{"code": "{}"}}"#,
            "x".repeat(MAX_ATTRIBUTE_VALUE_BYTES + 1)
        );
        assert_eq!(flow.attributes_of(&long).unwrap_err().field, "code");

        let twice = Flow::builder::<Data>("f", 1)
            .searchable(["n", "n"])
            .step(comp("a"))
            .build();
        assert!(
            matches!(twice, Err(DefinitionError::DuplicateAttribute { .. })),
            "{twice:?}"
        );
        let badly_named = Flow::builder::<Data>("f", 1)
            .searchable(["Order Id"])
            .step(comp("a"))
            .build();
        match badly_named {
            Err(DefinitionError::InvalidName(e)) => assert_eq!(e.kind, "search attribute"),
            other => panic!("expected InvalidName, got {other:?}"),
        }
    }
}
