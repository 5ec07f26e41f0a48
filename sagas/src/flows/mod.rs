//! The flows that ship with saga-orchestrator: order placement (with the
//! typed contracts of the commands it sends) and the synthetic bench
//! chains.
//!
//! A service's own flows live in its own crate and are handed to
//! `orchestrator::Orchestrator::builder(..).flows(..)` beside (or instead
//! of) these; `examples/travel` shows one.

use crate::definition::Flow;

pub mod bench;
pub mod order_placement;

/// Every shipped flow version.
pub fn all() -> Vec<Flow> {
    order_placement::definitions()
}
