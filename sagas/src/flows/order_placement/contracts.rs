//! The commands order placement sends, one typed contract each, shared
//! with the demo participants that serve them (`participants::demo`). The
//! types serialize to exactly the payloads and replies `proto/AMQP.md`
//! documents for participants in other languages.

use serde::{Deserialize, Serialize};

use super::{OrderData, OrderItem};

/// `inventory`: stock per SKU.
pub mod inventory {
    use super::*;

    crate::contract!(
        /// `inventory.reserve`: takes the stock of every line, or none.
        Reserve: "inventory"."reserve", ReservePayload => Reserved, action
    );
    crate::contract!(
        /// `inventory.release`: gives back what the reservation under the
        /// compensated action's key took.
        Release: "inventory"."release", ReleasePayload => Released, compensation of Reserve
    );

    /// `reserve` payload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ReservePayload {
        /// The order the stock is for.
        pub order_id: String,
        /// Lines to reserve; a SKU may appear several times.
        pub items: Vec<ReserveItem>,
    }

    impl ReservePayload {
        /// Every line of the order.
        pub fn for_order(order: &OrderData) -> Self {
            Self {
                order_id: order.order_id.clone(),
                items: order
                    .items
                    .iter()
                    .map(|item| ReserveItem {
                        sku: item.sku.clone(),
                        quantity: item.quantity,
                    })
                    .collect(),
            }
        }
    }

    /// One line of a reservation.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ReserveItem {
        /// Stock keeping unit.
        pub sku: String,
        /// Units, > 0.
        pub quantity: u32,
    }

    /// `reserve` success data.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Reserved {
        /// The reservation made (absent from a participant that does not
        /// name its reservations).
        #[serde(default)]
        pub reservation_id: Option<String>,
    }

    /// `release` payload. The reservation is found by the compensated
    /// action's key, so `reservation_id` may be null (the saga never
    /// learnt it).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ReleasePayload {
        /// The order.
        pub order_id: String,
        /// The reservation, if the saga knows it.
        #[serde(default)]
        pub reservation_id: Option<String>,
    }

    /// `release` success data.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Released {
        /// The reservation released, when there was one left to release.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reservation_id: Option<String>,
        /// Whether stock went back (false: released before, by hand).
        pub released: bool,
    }
}

/// `payment`: one account per customer.
pub mod payment {
    use super::*;

    crate::contract!(
        /// `payment.charge`: takes the amount from the balance.
        Charge: "payment"."charge", AmountPayload => Paid, action
    );
    crate::contract!(
        /// `payment.refund`: gives back what the compensated charge took.
        Refund: "payment"."refund", AmountPayload => Refunded, compensation of Charge
    );
    crate::contract!(
        /// `payment.authorize`: holds the amount.
        Authorize: "payment"."authorize", AmountPayload => Authorized, action
    );
    crate::contract!(
        /// `payment.void`: releases the compensated authorization's hold.
        Void: "payment"."void", VoidPayload => Voided, compensation of Authorize
    );
    crate::contract!(
        /// `payment.capture`: takes an authorized amount (a pivot: never
        /// compensated).
        Capture: "payment"."capture", CapturePayload => Paid, action
    );

    /// `charge`, `refund` and `authorize` payload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct AmountPayload {
        /// The order paid for.
        pub order_id: String,
        /// Who pays.
        pub customer_id: String,
        /// How much.
        pub amount_cents: u64,
    }

    impl AmountPayload {
        /// The order's total, paid by its customer.
        pub fn for_order(order: &OrderData) -> Self {
            Self {
                order_id: order.order_id.clone(),
                customer_id: order.customer_id.clone(),
                amount_cents: order.total_cents,
            }
        }
    }

    /// `void` payload. The authorization is found by the compensated
    /// action's key, so `authorization_id` may be null.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct VoidPayload {
        /// The order.
        pub order_id: String,
        /// Who pays.
        pub customer_id: String,
        /// The authorization, if the saga knows it.
        #[serde(default)]
        pub authorization_id: Option<String>,
    }

    /// `capture` payload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CapturePayload {
        /// The order.
        pub order_id: String,
        /// Who pays; must own the authorization.
        pub customer_id: String,
        /// Amount to take; at most the authorized amount.
        pub amount_cents: u64,
        /// The authorization to capture (required; null is refused).
        #[serde(default)]
        pub authorization_id: Option<String>,
    }

    /// `charge` and `capture` success data.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Paid {
        /// The payment made.
        #[serde(default)]
        pub payment_id: Option<String>,
    }

    /// `refund` success data.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Refunded {
        /// The payment refunded, when there was one left to refund.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub payment_id: Option<String>,
        /// Whether money went back.
        pub refunded: bool,
    }

    /// `authorize` success data.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Authorized {
        /// The hold made.
        #[serde(default)]
        pub authorization_id: Option<String>,
    }

    /// `void` success data.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Voided {
        /// The authorization looked at, when there was one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub authorization_id: Option<String>,
        /// Whether the hold was released now (false: voided before).
        pub voided: bool,
    }
}

/// `orders`: confirmed orders.
pub mod orders {
    use super::*;

    crate::contract!(
        /// `orders.confirm`: records the order once; always succeeds again.
        Confirm: "orders"."confirm", ConfirmPayload => Confirmed, action
    );

    /// `confirm` payload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ConfirmPayload {
        /// The order.
        pub order_id: String,
        /// Who ordered.
        pub customer_id: String,
        /// Order total.
        pub total_cents: u64,
        /// Order lines as the saga carries them.
        pub items: Vec<OrderItem>,
    }

    impl ConfirmPayload {
        /// The whole order.
        pub fn for_order(order: &OrderData) -> Self {
            Self {
                order_id: order.order_id.clone(),
                customer_id: order.customer_id.clone(),
                total_cents: order.total_cents,
                items: order.items.clone(),
            }
        }
    }

    /// `confirm` success data.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Confirmed {
        /// The order.
        pub order_id: String,
        /// Always `confirmed`.
        pub status: String,
    }
}
