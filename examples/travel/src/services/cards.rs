//! `cards`: charges a card. A card token starting with `declined` is
//! refused, and so is a charge above [`LIMIT_CENTS`].

use participants::kit::{Command, HandlerError, KitError, Participant, Tx};
use uuid::Uuid;

use crate::contracts::cards::{Charge, ChargeRequest, Charged};

/// Participant name.
pub const NAME: &str = "cards";
/// Largest charge a card takes.
pub const LIMIT_CENTS: u64 = 5_000_000;

/// The cards participant.
pub fn participant() -> Result<Participant, KitError> {
    Participant::builder(NAME)
        .migrations(sqlx::migrate!("migrations/cards"))
        .action::<Charge>(charge)
        .build()
}

async fn charge(tx: &Tx, command: Command<ChargeRequest>) -> Result<Charged, HandlerError> {
    let p = &command.payload;
    if p.card.starts_with("declined") {
        return Err(HandlerError::rejected(format!(
            "card {} was declined",
            p.card
        )));
    }
    if p.amount_cents == 0 || p.amount_cents > LIMIT_CENTS {
        return Err(HandlerError::rejected(format!(
            "amount_cents: {} is outside 1..={LIMIT_CENTS}",
            p.amount_cents
        )));
    }
    let charge_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO card_charges (action_key, charge_id, saga_id, trip_id, card, amount_cents)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(command.action_key())
    .bind(charge_id)
    .bind(command.saga_id())
    .bind(&p.trip_id)
    .bind(&p.card)
    .bind(p.amount_cents as i64)
    .execute(tx)
    .await?;
    Ok(Charged {
        charge_id: charge_id.to_string(),
    })
}
