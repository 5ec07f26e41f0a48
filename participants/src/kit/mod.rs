//! The participant kit: what any Rust service needs to take part in a saga
//! safely.
//!
//! ```text
//!  <ns>.commands ──(routing key = name)──▶ <ns>.participant.<name>   (quorum, DLX, delivery limit)
//!        │ consumer (basic.qos prefetch, bounded concurrency)
//!        ▼
//!  decode envelope ── undecodable ──▶ reject, no requeue ──▶ <ns>.dead-letter ──▶ <ns>.dead-letters
//!        ▼
//!  BEGIN
//!    inbox claim (idempotency_key) ── taken ──▶ stored outcome ─┐
//!    compensation? barrier on the action key                     │
//!    handler(tx, command) (a compensation: inside a SAVEPOINT)   │
//!    action rejected? ROLLBACK, BEGIN, claim again (no effect)   │
//!    inbox outcome + outbox reply (one statement)                │
//!  COMMIT  (a transient error rolls everything back instead)     │
//!        ▼  ◀────────────────────────────────────────────────────┘
//!  publish reply to reply_to via "" (persistent, mandatory, confirmed)
//!  queue the outbox row for a grouped delete ─▶ ack the delivery
//!
//!  relay: start-up + every relay_interval, outbox rows FOR UPDATE SKIP LOCKED
//! ```
//!
//! Guarantees:
//! - **Effect at most once per idempotency key.** The inbox row, the
//!   business change and the reply's outbox row commit together; a
//!   duplicate (redelivery or orchestrator retry) gets the original outcome
//!   again, with its own `attempt` echoed. Concurrent duplicates serialise on
//!   the inbox key's unique index.
//! - **Rejections are final and remembered**; **transient errors are not**
//!   (nothing was applied, a retry runs the handler again).
//! - **No lost reply** once an outcome is committed: the outbox row stays
//!   until the broker confirmed the reply (a missing reply queue returns the
//!   mandatory message, which counts as a failure); the relay retries with
//!   backoff.
//! - **Compensation barrier** keyed by the action's
//!   key: compensating an action never seen is a remembered no-op that
//!   refuses the late action; compensating twice (even under different
//!   keys) has effect once.
//! - **Poison** deliveries (not a `CommandMessage`) are rejected without
//!   requeue — the quorum queue dead-letters them — and counted
//!   (`participant_poison_messages_total`, [`Stats::poison`]). A well-formed
//!   envelope with an unknown command, a wrong phase or a payload that does
//!   not decode is answered `rejected` (remembered), so the orchestrator
//!   gets a final answer instead of a timeout.
//!
//! Modules: [`handler`] (what handlers see), [`database`] (own database,
//! migrations), [`topology`] (declarations), [`faults`] (fault injection),
//! [`stats`] (counters); inbox, barrier, outbox and the consumer loop are
//! internal.

mod barrier;
mod cleaner;
pub(crate) mod consumer;
pub mod database;
pub mod faults;
pub mod handler;
mod inbox;
pub(crate) mod outbox;
mod participant;
pub mod stats;
pub mod topology;

pub use consumer::TimedOut;
pub use database::{DatabaseError, PoolSettings};
pub use faults::{FaultConfig, FaultConfigError, FaultInjector};
pub use handler::{Command, Handler, HandlerError, HandlerFuture, HandlerResult, Outcome};
pub use outbox::PublishError;
pub use participant::{
    KitError, Participant, ParticipantBuilder, ParticipantConfig, ParticipantHandle, SetupHook,
};
pub use stats::{Stats, StatsSnapshot};
