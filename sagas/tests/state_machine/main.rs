//! Tests of the saga state machine, in one binary (shared helpers, one link).
//!
//! - [`scenarios`]: one test per path, with exact commands, keys and states.
//! - [`properties`]: property tests in a simulated world ([`world`]) of
//!   lossy, duplicating, reordering networks and idempotent participants.
//! - [`support`]: the step-by-step harness and the synthetic data type.

mod properties;
mod scenarios;
mod support;
mod world;
