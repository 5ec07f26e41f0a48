//! The participant kit: what any Rust service needs to take part in a saga
//! safely.
//!
//! ```text
//!  <ns>.commands ──(routing key = name)──▶ <ns>.participant.<name>   (quorum, DLX, delivery limit)
//!        │ consumer (basic.qos prefetch; a batch = every delivery already pushed,
//!        │           up to max_batch; at most `concurrency` batches in their transaction)
//!        ▼
//!  decode envelope ── undecodable ──▶ reject, no requeue ──▶ <ns>.dead-letter ──▶ <ns>.dead-letters
//!        ▼
//!  BEGIN
//!    inbox claim of every key (one statement) ── taken ──▶ stored outcome ─┐
//!    per command: compensation? barrier on the action key                  │
//!                 handler(tx, command) (a compensation: inside a SAVEPOINT)│
//!    inbox outcomes + outbox replies (one statement)                       │
//!  COMMIT                                                                  │
//!    a batch that cannot finish (an action rejected after writing, an      │
//!    error, a deadlock): ROLLBACK, then each command alone as above; an    │
//!    action rejected alone: ROLLBACK, BEGIN, claim again (no effect)       │
//!        ▼  ◀──────────────────────────────────────────────────────────────┘
//!  publish each reply to reply_to via "" (persistent, mandatory, confirmed)
//!  queue the outbox rows for a grouped delete ─▶ ack the deliveries
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
//! - **Batching never changes an outcome.** Commands that arrive together
//!   share one transaction (one commit for many); a command that repeats a
//!   key of its batch, and an action with its compensation in the same
//!   batch, are decided alone after the batch commits, in arrival order;
//!   a batch that cannot commit cleanly is rolled back whole and its
//!   commands are decided one by one. A batch holds more
//!   locks than one command, so it can deadlock with a command handled
//!   alone; a command that loses a deadlock is decided again (nothing of
//!   it was applied) instead of being answered `transient_error`.
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
//! Layout — deciding apart from delivering (no module uses both the
//! database and the broker):
//! - [`handler`]: what a handler sees ([`Tx`], [`Command`]) and returns.
//! - `participant`: the builder ([`Participant::builder`]), configuration,
//!   start-up and the running [`ParticipantHandle`].
//! - `decide` (SQL only): the inbox, the compensation barrier, the outbox
//!   rows and their cleaner, batching with its split and deadlock retry,
//!   and the event recorder; returns decisions as data.
//! - `deliver` (AMQP only): the consumer loop, publishing replies with
//!   confirms, the relay's publishing, acks, and the two services on the
//!   loop (commands, event subscriptions).
//! - [`database`] (own database, migrations), [`topology`] (the shared
//!   declarations), [`faults`] (fault injection at the seams between the
//!   two halves), [`stats`] (counters).

pub mod database;
mod decide;
mod deliver;
pub mod faults;
pub mod handler;
mod participant;
mod spans;
pub mod stats;
pub mod topology;

pub use database::{DatabaseError, PoolSettings};
pub use decide::events::EventHandler;
pub use deliver::consumer::TimedOut;
pub use deliver::replies::PublishError;
pub use faults::{FaultConfig, FaultConfigError, FaultInjector};
pub use handler::{Command, Handler, HandlerError, HandlerWith, Outcome, Tx};
pub use participant::{
    KitError, Participant, ParticipantBuilder, ParticipantConfig, ParticipantHandle, SetupHook,
};
/// How the kit reaches RabbitMQ (URL, TLS files): the one broker connection
/// of every service.
pub use saga_proto::connect::broker::{Broker, BrokerError};
pub use stats::{Stats, StatsSnapshot};
