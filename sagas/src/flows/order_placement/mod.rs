//! Order placement: reserve inventory, take payment, confirm the order, or
//! compensate in reverse.
//!
//! - v1: `reserve_inventory` (inventory.reserve / release) →
//!   `charge_payment` (payment.charge / refund) → `confirm_order`
//!   (orders.confirm, retriable).
//! - v2: { `reserve_inventory` ‖ `authorize_payment` (payment.authorize /
//!   void) } → `capture_payment` (payment.capture, pivot) → `confirm_order`
//!   (retriable).
//!
//! Every command is a typed contract of [`contracts`], shared with the
//! demo participants that serve it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::definition::{
    DefinitionError, Flow, FlowBuilder, InputError, RetryPolicy, SagaData, Step,
};

pub mod contracts;

use contracts::{inventory, orders, payment};

/// Flow name.
pub const NAME: &str = "order_placement";
/// Longest accepted order, customer or SKU id.
pub const MAX_ID_LEN: usize = 128;
/// Most line items in one order.
pub const MAX_ITEMS: usize = 100;

/// The input of `StartSaga` for an order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderInput {
    /// The client's order id.
    pub order_id: String,
    /// Who pays.
    pub customer_id: String,
    /// What is ordered; at least one line.
    pub items: Vec<OrderItem>,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderItem {
    /// Stock keeping unit, e.g. `sku-1`.
    pub sku: String,
    /// Units ordered, > 0.
    pub quantity: u32,
    /// Price of one unit in cents, >= 0.
    pub unit_price_cents: u64,
}

/// What the saga carries between steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderData {
    /// The client's order id.
    pub order_id: String,
    /// Who pays.
    pub customer_id: String,
    /// What is ordered.
    pub items: Vec<OrderItem>,
    /// Sum of quantity × unit price.
    pub total_cents: u64,
    /// Set by `reserve_inventory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    /// Set by `charge_payment` (v1) or `capture_payment` (v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// Set by `authorize_payment` (v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_id: Option<String>,
}

fn check_id(field: &str, value: &str) -> Result<(), InputError> {
    if value.trim().is_empty() {
        return Err(InputError::new(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(InputError::new(
            field,
            format!("must be at most {MAX_ID_LEN} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(InputError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

impl SagaData for OrderData {
    type Input = OrderInput;

    fn from_input(input: OrderInput) -> Result<Self, InputError> {
        check_id("order_id", &input.order_id)?;
        check_id("customer_id", &input.customer_id)?;
        if input.items.is_empty() {
            return Err(InputError::new("items", "must hold at least one item"));
        }
        if input.items.len() > MAX_ITEMS {
            return Err(InputError::new(
                "items",
                format!("must hold at most {MAX_ITEMS} items"),
            ));
        }
        let mut total: u64 = 0;
        for (i, item) in input.items.iter().enumerate() {
            check_id(&format!("items[{i}].sku"), &item.sku)?;
            if item.quantity == 0 {
                return Err(InputError::new(
                    format!("items[{i}].quantity"),
                    "must be greater than 0",
                ));
            }
            total = u64::from(item.quantity)
                .checked_mul(item.unit_price_cents)
                .and_then(|line| total.checked_add(line))
                .filter(|t| *t <= i64::MAX as u64)
                .ok_or_else(|| {
                    InputError::new(
                        format!("items[{i}].unit_price_cents"),
                        "order total is too large",
                    )
                })?;
        }
        Ok(Self {
            order_id: input.order_id,
            customer_id: input.customer_id,
            items: input.items,
            total_cents: total,
            reservation_id: None,
            payment_id: None,
            authorization_id: None,
        })
    }
}

const INPUT_DESCRIPTION: &str = r#"{"order_id": str, "customer_id": str, "items": [{"sku": str, "quantity": int > 0, "unit_price_cents": int >= 0}, ...at least one]}"#;

/// What every step of both versions waits for a reply and how it retries,
/// unless it says otherwise.
fn with_defaults(flow: FlowBuilder<OrderData>) -> FlowBuilder<OrderData> {
    flow.input_description(INPUT_DESCRIPTION)
        // Operators look an order up by its id or its customer.
        .searchable(["order_id", "customer_id"])
        .default_timeout(Duration::from_secs(5))
        .default_retry(
            RetryPolicy::exponential(Duration::from_millis(200), 5)
                .with_max_backoff(Duration::from_secs(5)),
        )
}

fn reserve_inventory() -> Step<OrderData> {
    Step::call::<inventory::Reserve>("reserve_inventory", inventory::ReservePayload::for_order)
        .on_reply(|d: &mut OrderData, r: inventory::Reserved| d.reservation_id = r.reservation_id)
        .compensate_with::<inventory::Release>(|d: &OrderData| inventory::ReleasePayload {
            order_id: d.order_id.clone(),
            reservation_id: d.reservation_id.clone(),
        })
}

fn confirm_order() -> Step<OrderData> {
    // Retried forever (the default of a retriable step): it comes after
    // the money moved and must eventually succeed.
    Step::call::<orders::Confirm>("confirm_order", orders::ConfirmPayload::for_order).retriable()
}

/// v1: reserve → charge → confirm.
pub fn v1() -> Result<Flow, DefinitionError> {
    with_defaults(Flow::builder::<OrderData>(NAME, 1))
        .step(reserve_inventory())
        .step(
            Step::call::<payment::Charge>("charge_payment", payment::AmountPayload::for_order)
                .on_reply(|d: &mut OrderData, r: payment::Paid| d.payment_id = r.payment_id)
                .compensate_with::<payment::Refund>(payment::AmountPayload::for_order),
        )
        .step(confirm_order())
        .build()
}

/// v2: { reserve ‖ authorize } → capture (pivot) → confirm.
pub fn v2() -> Result<Flow, DefinitionError> {
    with_defaults(Flow::builder::<OrderData>(NAME, 2))
        .parallel([
            reserve_inventory(),
            Step::call::<payment::Authorize>(
                "authorize_payment",
                payment::AmountPayload::for_order,
            )
            .on_reply(|d: &mut OrderData, r: payment::Authorized| {
                d.authorization_id = r.authorization_id
            })
            .compensate_with::<payment::Void>(|d: &OrderData| payment::VoidPayload {
                order_id: d.order_id.clone(),
                customer_id: d.customer_id.clone(),
                authorization_id: d.authorization_id.clone(),
            }),
        ])
        .step(
            Step::call::<payment::Capture>("capture_payment", |d: &OrderData| {
                payment::CapturePayload {
                    order_id: d.order_id.clone(),
                    customer_id: d.customer_id.clone(),
                    amount_cents: d.total_cents,
                    authorization_id: d.authorization_id.clone(),
                }
            })
            .on_reply(|d: &mut OrderData, r: payment::Paid| d.payment_id = r.payment_id)
            .pivot(),
        )
        .step(confirm_order())
        .build()
}

/// Both versions.
pub fn definitions() -> Vec<Flow> {
    vec![
        v1().expect("order_placement v1 is a valid flow"),
        v2().expect("order_placement v2 is a valid flow"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<serde_json::Value, InputError> {
        v1().unwrap().parse_input(json)
    }

    #[test]
    fn valid_input_computes_the_total() {
        let data = parse(r#"{"order_id":"o1","customer_id":"c1","items":[{"sku":"sku-1","quantity":2,"unit_price_cents":150},{"sku":"sku-2","quantity":1,"unit_price_cents":0}]}"#).unwrap();
        assert_eq!(data["total_cents"], 300);
        assert!(data.get("reservation_id").is_none());
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                r#"{"order_id":"o1","customer_id":"c1","items":[]}"#,
                "items",
            ),
            (
                r#"{"order_id":"","customer_id":"c1","items":[{"sku":"a","quantity":1,"unit_price_cents":1}]}"#,
                "order_id",
            ),
            (
                r#"{"order_id":"o","customer_id":"c1","items":[{"sku":"a","quantity":0,"unit_price_cents":1}]}"#,
                "items[0].quantity",
            ),
            (
                r#"{"order_id":"o","customer_id":"c1","items":[{"sku":"a","quantity":-1,"unit_price_cents":1}]}"#,
                "items[0].quantity",
            ),
            (
                r#"{"order_id":"o","customer_id":"c1","items":[{"sku":"a","quantity":1,"unit_price_cents":-5}]}"#,
                "items[0].unit_price_cents",
            ),
            (
                r#"{"order_id":"o","customer_id":"c1","items":[{"sku":"a","quantity":"2","unit_price_cents":1}]}"#,
                "items[0].quantity",
            ),
            (
                r#"{"order_id":"o","customer_id":"c1","items":[{"sku":"a","quantity":1,"unit_price_cents":1,"color":"red"}]}"#,
                "items[0].color",
            ),
            (
                r#"{"order_id":"o","customer_id":"c1","items":[{"sku":"a","quantity":1,"unit_price_cents":1}],"extra":1}"#,
                "extra",
            ),
            (
                r#"{"customer_id":"c1","items":[{"sku":"a","quantity":1,"unit_price_cents":1}]}"#,
                "",
            ),
            (
                r#"{"order_id":"o","customer_id":"c1","items":[{"sku":"a","quantity":4000000000,"unit_price_cents":18446744073709551615}]}"#,
                "items[0].unit_price_cents",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
        let err = parse(r#"{"customer_id":"c1","items":[]}"#).unwrap_err();
        assert!(err.message.contains("order_id"), "{err}");
        let err = parse(r#"{"order_id":"o","customer_id":"c1","items":[{"sku":"a","quantity":1,"unit_price_cents":1}],"extra":1}"#).unwrap_err();
        assert!(err.message.contains("extra"), "{err}");
    }

    /// The typed contracts send exactly the bodies `proto/AMQP.md`
    /// documents (and the untyped flow sent before them), and every step
    /// gets the flow's defaults.
    #[test]
    fn payloads_and_settings_are_those_of_the_wire_contract() {
        use serde_json::json;
        let data = parse(r#"{"order_id":"o1","customer_id":"c1","items":[{"sku":"sku-1","quantity":2,"unit_price_cents":150}]}"#).unwrap();
        let items = json!([{"sku": "sku-1", "quantity": 2, "unit_price_cents": 150}]);
        let amount = json!({"order_id": "o1", "customer_id": "c1", "amount_cents": 300});
        let (v1, v2) = (v1().unwrap(), v2().unwrap());
        let step = |flow: &Flow, name: &str| flow.steps()[flow.step_index(name).unwrap()].clone();
        let reserve = step(&v1, "reserve_inventory");
        assert_eq!(
            reserve.action_payload(&data).unwrap(),
            json!({"order_id": "o1", "items": [{"sku": "sku-1", "quantity": 2}]})
        );
        assert_eq!(
            reserve.compensation_payload(&data).unwrap(),
            json!({"order_id": "o1", "reservation_id": null})
        );
        assert_eq!(
            (reserve.participant.as_str(), reserve.command.as_str()),
            ("inventory", "reserve")
        );
        assert_eq!(reserve.compensation.as_deref(), Some("release"));
        let charge = step(&v1, "charge_payment");
        assert_eq!(charge.action_payload(&data).unwrap(), amount);
        assert_eq!(charge.compensation_payload(&data).unwrap(), amount);
        assert_eq!(charge.compensation.as_deref(), Some("refund"));
        let confirm = step(&v1, "confirm_order");
        assert_eq!(
            confirm.action_payload(&data).unwrap(),
            json!({"order_id": "o1", "customer_id": "c1", "total_cents": 300, "items": items})
        );
        let authorize = step(&v2, "authorize_payment");
        assert_eq!(authorize.action_payload(&data).unwrap(), amount);
        assert_eq!(
            authorize.compensation_payload(&data).unwrap(),
            json!({"order_id": "o1", "customer_id": "c1", "authorization_id": null})
        );
        let capture = step(&v2, "capture_payment");
        assert_eq!(
            capture.action_payload(&data).unwrap(),
            json!({"order_id": "o1", "customer_id": "c1", "amount_cents": 300, "authorization_id": null})
        );
        let mut folded = data.clone();
        reserve
            .fold_reply(&mut folded, &json!({"reservation_id": "r-1"}))
            .unwrap();
        capture
            .fold_reply(&mut folded, &json!({"payment_id": "p-1"}))
            .unwrap();
        assert_eq!(
            (
                folded["reservation_id"].as_str(),
                folded["payment_id"].as_str()
            ),
            (Some("r-1"), Some("p-1"))
        );

        let five = RetryPolicy::exponential(Duration::from_millis(200), 5)
            .with_max_backoff(Duration::from_secs(5));
        for s in v1.steps().iter().chain(v2.steps()) {
            assert_eq!(s.timeout, Duration::from_secs(5), "{}", s.name);
            assert_eq!(
                s.compensation_retry,
                RetryPolicy::exponential(Duration::from_millis(200), 8),
                "{}",
                s.name
            );
            let retry = if s.kind == crate::StepKind::Retriable {
                RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(30))
            } else {
                five
            };
            assert_eq!(s.retry, retry, "{}", s.name);
        }
    }

    #[test]
    fn shapes_of_both_versions() {
        let v1 = v1().unwrap();
        let names: Vec<_> = v1.steps().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["reserve_inventory", "charge_payment", "confirm_order"]
        );
        assert_eq!(v1.stages().len(), 3);
        let v2 = v2().unwrap();
        assert_eq!(v2.stages()[0].len(), 2);
        assert_eq!(v2.steps()[2].kind, crate::StepKind::Pivot);
        assert_eq!(v2.steps()[3].kind, crate::StepKind::Retriable);
    }
}
