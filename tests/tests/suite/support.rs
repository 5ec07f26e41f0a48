//! Flows and behaviours shared by the suites.

use std::time::Duration;

use saga_proto::amqp::{CommandMessage, Phase};
use sagas::{Catalog, Flow, InputError, RetryPolicy, SagaData, Step};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Name of the test flow: four compensatable steps on participants
/// alpha → beta → gamma → delta.
pub const FOUR_STEPS: &str = "four_steps";

/// Input of the test flow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestInput {
    pub order: String,
}

/// Data of the test flow.
#[derive(Debug, Serialize, Deserialize)]
pub struct TestData {
    pub order: String,
    #[serde(default)]
    pub results: Vec<String>,
}

impl SagaData for TestData {
    type Input = TestInput;
    fn from_input(input: TestInput) -> Result<Self, InputError> {
        if input.order.is_empty() {
            return Err(InputError::new("order", "must not be empty"));
        }
        Ok(Self {
            order: input.order,
            results: vec![],
        })
    }
}

#[derive(Debug, Deserialize)]
struct StepResult {
    #[serde(default)]
    id: Option<String>,
}

fn step(name: &str, participant: &str, timeout: Duration) -> Step<TestData> {
    Step::compensatable(name, participant, "apply")
        .payload(|d: &TestData| json!({"order": d.order}))
        .on_success(|d: &mut TestData, r: StepResult| d.results.extend(r.id))
        .compensate_with("undo", |d: &TestData| json!({"order": d.order}))
        .timeout(timeout)
        .retry(
            RetryPolicy::exponential(Duration::from_millis(50), 3)
                .with_max_backoff(Duration::from_millis(200)),
        )
        .compensation_retry(
            RetryPolicy::exponential(Duration::from_millis(50), 3)
                .with_max_backoff(Duration::from_millis(200)),
        )
}

/// The four-step test flow with reply timeouts of `timeout`.
pub fn four_steps(timeout: Duration) -> Flow {
    Flow::builder::<TestData>(FOUR_STEPS, 1)
        .input_description(r#"{"order": str}"#)
        .searchable(["order"])
        .step(step("step_a", "alpha", timeout))
        .step(step("step_b", "beta", timeout))
        .step(step("step_c", "gamma", timeout))
        .step(step("step_d", "delta", timeout))
        .build()
        .unwrap()
}

/// The standard catalog plus the four-step flow.
pub fn catalog(timeout: Duration) -> Catalog {
    let mut catalog = Catalog::standard();
    catalog.register(four_steps(timeout)).unwrap();
    catalog
}

/// Input for the four-step flow.
pub fn order(id: &str) -> serde_json::Value {
    json!({"order": id})
}

/// A valid order_placement input.
pub fn order_input(order_id: &str) -> serde_json::Value {
    json!({"order_id": order_id, "customer_id": "c-1", "items": [{"sku": "sku-1", "quantity": 2, "unit_price_cents": 150}]})
}

/// Whether `c` is the action of `step`.
pub fn is_action(c: &CommandMessage, step: &str) -> bool {
    c.step == step && c.phase == Phase::Action
}

/// Names of the steps whose compensation was received, in order.
pub fn compensations(commands: &[CommandMessage]) -> Vec<String> {
    commands
        .iter()
        .filter(|c| c.phase == Phase::Compensation)
        .map(|c| c.step.clone())
        .collect()
}
