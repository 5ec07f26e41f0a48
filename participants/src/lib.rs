//! Saga participants: the kit any participant uses to join a saga safely,
//! and the demo services of the order-placement flow built on it.
//!
//! - [`kit`]: inbox de-duplication, the compensation barrier, the reply
//!   outbox and its relay, the consumer loop (reconnects, bounded
//!   concurrency, graceful shutdown), topology declarations, fault
//!   injection.
//! - [`demo`]: `inventory`, `payment`, `orders` (command participants) and
//!   `notification` (lifecycle-event subscriber), plus [`demo::run`] /
//!   [`demo::start`] to run any of them in one process.
//!
//! Data flows: orchestrator → `<ns>.commands` → `<ns>.participant.<name>`
//! → handler inside a PostgreSQL transaction (inbox + business change +
//! outbox) → reply → `reply_to` (default `<ns>.replies`).

pub mod demo;
pub mod kit;
