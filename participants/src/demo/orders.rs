//! `orders`: records confirmed orders.
//!
//! - `confirm` {order_id, customer_id, total_cents, items} →
//!   `{"order_id", "status": "confirmed"}`. A retriable step (after the
//!   pivot), so it must always be able to succeed: the order is inserted
//!   once (primary key on `order_id`) and any later confirmation of the
//!   same order, under whatever key, answers the same success.

use sagas::flows::order_placement::contracts::orders::{Confirm, ConfirmPayload, Confirmed};

use crate::kit::{Command, HandlerError, KitError, Participant, Tx};

/// Participant name.
pub const NAME: &str = "orders";

/// The orders participant.
pub fn participant() -> Result<Participant, KitError> {
    Participant::builder(NAME)
        .migrations(sqlx::migrate!("migrations/orders"))
        .action::<Confirm>(confirm)
        .build()
}

async fn confirm(tx: &Tx, command: Command<ConfirmPayload>) -> Result<Confirmed, HandlerError> {
    let p = &command.payload;
    let Ok(total) = i64::try_from(p.total_cents) else {
        return Err(HandlerError::rejected(format!(
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
    .execute(tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tracing::info!(order_id = %p.order_id, saga_id = %command.saga_id(), "order already confirmed");
    }
    Ok(Confirmed {
        order_id: p.order_id.clone(),
        status: "confirmed".to_owned(),
    })
}
