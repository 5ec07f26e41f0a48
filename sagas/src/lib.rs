//! The saga model of saga-orchestrator: pure, deterministic, no I/O.
//!
//! Layout and data flow:
//! - [`definition`]: the DSL. A [`Flow`] is a named, versioned sequence of
//!   stages (one [`Step`] or a parallel group); a step names its participant
//!   and command, builds its payload from the saga's typed data, folds its
//!   reply back, and declares its kind, compensation, retries and timeout.
//! - [`instance`]: [`SagaInstance`], the state of one saga, persisted as JSON
//!   by the orchestrator between events.
//! - [`machine`]: [`apply`]`(state, flow, event, ctx) -> (state, transition)`.
//!   Events in (started, reply, timer, cancel, operator retry); new state,
//!   [`Action`]s (send command, schedule timer, publish lifecycle event,
//!   finish) and history entries out. Time and jitter come in with [`Context`].
//! - [`contract`](mod@contract): typed contracts (participant, command, payload, reply)
//!   shared by a flow's steps and the participants' handlers.
//! - [`names`]: saga types, steps, participants, commands and namespaces,
//!   each a newtype parsed once by one rule.
//! - [`catalog`]: every flow version the orchestrator can run, and
//!   [`flows`], the flows that ship (order placement v1 and v2).

pub mod catalog;
pub mod contract;
pub mod definition;
pub mod errors;
pub mod flows;
pub mod instance;
pub mod machine;
pub mod names;

pub use catalog::{Catalog, CatalogError};
pub use definition::{
    Call, DefinitionError, Flow, FlowBuilder, InputError, RetryPolicy, SagaData, Step, StepDef,
    StepKind,
};
pub use instance::{
    Delivery, Direction, Phase, SagaInstance, SagaStatus, StepRecord, StepStatus, TimerFired,
    TimerKind, Wait,
};
pub use machine::{
    Action, Command, Context, Event, HOLD_MIN_MS, HistoryEntry, HistoryKind, Observation, Outcome,
    Refused, Reply, StepOutcome, Transition, apply, start,
};
