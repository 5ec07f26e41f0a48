//! `cards`: charges a card. A card token starting with `declined` is
//! refused, and so is a charge above the configured limit (the handler's
//! state, [`CardPolicy`]).

use std::sync::Arc;

use participants::kit::{Command, HandlerError, KitError, Participant, Tx};
use uuid::Uuid;

use crate::contracts::cards::{Charge, ChargeRequest, Charged};

/// Participant name.
pub const NAME: &str = "cards";
/// Largest charge a card takes unless configured otherwise.
pub const DEFAULT_LIMIT_CENTS: u64 = 5_000_000;

/// What the card gateway accepts: settings every charge reads.
#[derive(Debug, Clone)]
pub struct CardPolicy {
    /// Largest charge.
    pub limit_cents: u64,
}

impl Default for CardPolicy {
    fn default() -> Self {
        Self {
            limit_cents: DEFAULT_LIMIT_CENTS,
        }
    }
}

/// The cards participant, charging under `policy`.
pub fn participant(policy: CardPolicy) -> Result<Participant, KitError> {
    Participant::builder(NAME)
        .migrations(sqlx::migrate!("migrations/cards"))
        .action_with::<Charge, _>(Arc::new(policy), charge)
        .build()
}

async fn charge(
    policy: &CardPolicy,
    tx: &Tx,
    command: Command<ChargeRequest>,
) -> Result<Charged, HandlerError> {
    let p = &command.payload;
    if p.card.starts_with("declined") {
        return Err(HandlerError::rejected(format!(
            "card {} was declined",
            p.card
        )));
    }
    if p.amount_cents == 0 || p.amount_cents > policy.limit_cents {
        return Err(HandlerError::rejected(format!(
            "amount_cents: {} is outside 1..={}",
            p.amount_cents, policy.limit_cents
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
    .bind(i64::try_from(p.amount_cents).unwrap_or(i64::MAX))
    .execute(tx)
    .await?;
    Ok(Charged {
        charge_id: charge_id.to_string(),
    })
}
