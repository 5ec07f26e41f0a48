//! Synthetic flows for measuring how cost grows with the number of steps:
//! `bench_chain_<n>` runs `n` compensatable steps in sequence on the
//! participant `echo` (command `step`, compensation `undo`). They are not in
//! the standard catalog; `orchestrator serve --bench-flows` adds them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::definition::{Flow, InputError, RetryPolicy, SagaData, Step};

/// Step counts that get a flow.
pub const CHAIN_LENGTHS: [usize; 4] = [1, 3, 6, 12];

/// Participant every bench step calls.
pub const PARTICIPANT: &str = "echo";

/// Input and data of a bench flow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainData {
    /// Free-form correlation id.
    pub id: String,
}

impl SagaData for ChainData {
    type Input = ChainData;
    fn from_input(input: ChainData) -> Result<Self, InputError> {
        Ok(input)
    }
}

/// Name of the `n`-step flow.
pub fn chain_name(n: usize) -> String {
    format!("bench_chain_{n}")
}

/// The `n`-step flow.
pub fn chain(n: usize) -> Flow {
    let mut builder =
        Flow::builder::<ChainData>(&chain_name(n), 1).input_description(r#"{"id": str}"#);
    for i in 1..=n {
        builder = builder.step(
            Step::compensatable(&format!("step_{i}"), PARTICIPANT, "step")
                .payload(|d: &ChainData| serde_json::json!({"id": d.id}))
                .compensate_with("undo", |d: &ChainData| serde_json::json!({"id": d.id}))
                .timeout(Duration::from_secs(10))
                .retry(RetryPolicy::exponential(Duration::from_millis(200), 5)),
        );
    }
    builder.build().expect("bench chains are valid flows")
}

/// Every bench flow.
pub fn definitions() -> Vec<Flow> {
    CHAIN_LENGTHS.iter().map(|&n| chain(n)).collect()
}
