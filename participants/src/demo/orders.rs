//! `orders`: records confirmed orders.
//!
//! - `confirm` {order_id, customer_id, total_cents, items} →
//!   `{"order_id", "status": "confirmed"}`. A retriable step (after the
//!   pivot), so it must always be able to succeed: the order is inserted
//!   once (primary key on `order_id`) and any later confirmation of the
//!   same order, under whatever key, answers the same success.

use serde::Deserialize;
use sqlx::PgConnection;

use crate::kit::{Command, HandlerFuture, KitError, Outcome, Participant};

/// Participant name.
pub const NAME: &str = "orders";

/// `confirm` payload.
#[derive(Debug, Clone, Deserialize)]
pub struct ConfirmPayload {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer_id: String,
    /// Order total.
    pub total_cents: u64,
    /// Order lines as the saga carries them (`[{sku, quantity, unit_price_cents}]`).
    pub items: serde_json::Value,
}

/// The orders participant.
pub fn participant() -> Result<Participant, KitError> {
    Participant::builder(NAME)
        .migrations(sqlx::migrate!("migrations/orders"))
        .action("confirm", confirm)
        .build()
}

fn confirm(conn: &mut PgConnection, command: Command<ConfirmPayload>) -> HandlerFuture<'_> {
    Box::pin(async move {
        let p = &command.payload;
        if !p.items.is_array() {
            return Ok(Outcome::rejected("items: must be an array of order lines"));
        }
        let Ok(total) = i64::try_from(p.total_cents) else {
            return Ok(Outcome::rejected(format!(
                "total_cents: {} is too large",
                p.total_cents
            )));
        };
        let inserted = sqlx::query(
            "INSERT INTO orders (order_id, saga_id, customer_id, total_cents, items, status)
             VALUES ($1, $2, $3, $4, $5, 'confirmed')
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(&p.order_id)
        .bind(command.saga_id())
        .bind(&p.customer_id)
        .bind(total)
        .bind(sqlx::types::Json(&p.items))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 0 {
            tracing::info!(order_id = %p.order_id, saga_id = %command.saga_id(), "order already confirmed");
        }
        Ok(Outcome::success(serde_json::json!({
            "order_id": p.order_id,
            "status": "confirmed",
        })))
    })
}
