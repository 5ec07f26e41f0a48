//! The flows that ship with saga-orchestrator.
//!
//! To add a flow, write one file here (see `order_placement.rs`): a data type
//! implementing [`crate::SagaData`], and a function returning its
//! [`Flow`] versions built with the DSL; then list it in [`all`].

use crate::definition::Flow;

pub mod bench;
pub mod order_placement;

/// Every shipped flow version.
pub fn all() -> Vec<Flow> {
    order_placement::definitions()
}
