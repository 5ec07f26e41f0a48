//! `payment`: one account per customer, opened on first sight with
//! 100,000,000 cents. Available funds = balance − held.
//!
//! - `charge` {order_id, customer_id, amount_cents} → `{"payment_id"}`,
//!   compensated by `refund` (same payload): takes from the balance.
//! - `authorize` {order_id, customer_id, amount_cents} →
//!   `{"authorization_id"}`, compensated by `void` {order_id, customer_id,
//!   authorization_id}: holds funds.
//! - `capture` {order_id, customer_id, amount_cents, authorization_id} →
//!   `{"payment_id"}` (pivot, no compensation): releases the hold and takes
//!   the amount from the balance.
//!
//! The commands are the typed contracts of
//! [`sagas::flows::order_placement::contracts::payment`].
//!
//! Charges and authorizations above the available funds are rejected with
//! a reason containing "insufficient funds". Every movement is written to
//! `payment_movements`.

use sagas::flows::order_placement::contracts::payment::{
    AmountPayload, Authorize, Authorized, Capture, CapturePayload, Charge, Paid, Refund, Refunded,
    Void, VoidPayload, Voided,
};
use uuid::Uuid;

use crate::kit::{Command, HandlerError, KitError, Participant, Tx};

/// Participant name.
pub const NAME: &str = "payment";
/// Balance of an account opened on first sight.
pub const OPENING_BALANCE_CENTS: i64 = 100_000_000;

/// The payment participant.
pub fn participant() -> Result<Participant, KitError> {
    Participant::builder(NAME)
        .migrations(sqlx::migrate!("migrations/payment"))
        .action::<Charge>(charge)
        .compensation::<Refund>(refund)
        .action::<Authorize>(authorize)
        .compensation::<Void>(void)
        .action::<Capture>(capture)
        .build()
}

/// (balance, held) of `customer_id`, opening the account on first sight,
/// locked for the rest of the transaction.
async fn lock_account(tx: &Tx, customer_id: &str) -> Result<(i64, i64), sqlx::Error> {
    let lock =
        "SELECT balance_cents, held_cents FROM payment_accounts WHERE customer_id = $1 FOR UPDATE";
    // Known customers (all but the first command of each) cost one
    // statement; a new one is opened, then locked.
    if let Some(found) = sqlx::query_as(lock)
        .bind(customer_id)
        .fetch_optional(tx)
        .await?
    {
        return Ok(found);
    }
    sqlx::query(
        "INSERT INTO payment_accounts (customer_id, balance_cents) VALUES ($1, $2)
         ON CONFLICT (customer_id) DO NOTHING",
    )
    .bind(customer_id)
    .bind(OPENING_BALANCE_CENTS)
    .execute(tx)
    .await?;
    sqlx::query_as(lock).bind(customer_id).fetch_one(tx).await
}

async fn record_movement(
    tx: &Tx,
    command_saga: Uuid,
    customer_id: &str,
    order_id: &str,
    kind: &str,
    amount: i64,
    reference: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payment_movements (customer_id, saga_id, order_id, kind, amount_cents, reference_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(customer_id)
    .bind(command_saga)
    .bind(order_id)
    .bind(kind)
    .bind(amount)
    .bind(reference)
    .execute(tx)
    .await?;
    Ok(())
}

fn amount(cents: u64) -> Result<i64, HandlerError> {
    i64::try_from(cents)
        .map_err(|_| HandlerError::rejected(format!("amount_cents: {cents} is too large")))
}

/// Checks `amount` against the available funds of a locked account.
fn check_funds(
    customer_id: &str,
    balance: i64,
    held: i64,
    amount: i64,
) -> Result<(), HandlerError> {
    let available = balance - held;
    if amount > available {
        return Err(HandlerError::rejected(format!(
            "insufficient funds: customer {customer_id} has {available} cents available, {amount} requested"
        )));
    }
    Ok(())
}

/// Debits `amount` if the account exists and has it available, writing the
/// charge and its ledger movement in the same statement; `false` when the
/// account is missing or short (nothing written).
async fn charge_if_funded(
    tx: &Tx,
    command: &Command<AmountPayload>,
    payment_id: Uuid,
    amount: i64,
) -> Result<bool, sqlx::Error> {
    let p = &command.payload;
    let debited: i64 = sqlx::query_scalar(
        "WITH debit AS (
             UPDATE payment_accounts SET balance_cents = balance_cents - $6
             WHERE customer_id = $4 AND balance_cents - held_cents >= $6
             RETURNING customer_id
         ), charged AS (
             INSERT INTO payment_charges (payment_id, action_key, saga_id, customer_id, order_id, amount_cents, status)
             SELECT $1, $2, $3, $4, $5, $6, 'charged' FROM debit
         ), moved AS (
             INSERT INTO payment_movements (customer_id, saga_id, order_id, kind, amount_cents, reference_id)
             SELECT $4, $3, $5, 'charge', $6, $1 FROM debit
         )
         SELECT count(*) FROM debit",
    )
    .bind(payment_id)
    .bind(command.action_key())
    .bind(command.saga_id())
    .bind(&p.customer_id)
    .bind(&p.order_id)
    .bind(amount)
    .fetch_one(tx)
    .await?;
    Ok(debited == 1)
}

async fn charge(tx: &Tx, command: Command<AmountPayload>) -> Result<Paid, HandlerError> {
    let p = &command.payload;
    let amount = amount(p.amount_cents)?;
    let payment_id = Uuid::now_v7();
    let paid = || Paid {
        payment_id: Some(payment_id.to_string()),
    };
    // A known customer with the funds: one statement.
    if charge_if_funded(tx, &command, payment_id, amount).await? {
        return Ok(paid());
    }
    // Otherwise open the account if it is new, and say why not if short.
    let (balance, held) = lock_account(tx, &p.customer_id).await?;
    check_funds(&p.customer_id, balance, held, amount)?;
    // The account is locked and has the funds, so this debits.
    if charge_if_funded(tx, &command, payment_id, amount).await? {
        Ok(paid())
    } else {
        Err(HandlerError::Transient(
            "the locked account could not be debited".into(),
        ))
    }
}

async fn refund(tx: &Tx, command: Command<AmountPayload>) -> Result<Refunded, HandlerError> {
    // The amount refunded is what was charged, whatever the payload says.
    let charged: Option<(Uuid, String, String, i64)> = sqlx::query_as(
        "SELECT payment_id, customer_id, order_id, amount_cents FROM payment_charges
         WHERE action_key = $1 AND status = 'charged' FOR UPDATE",
    )
    .bind(command.action_key())
    .fetch_optional(tx)
    .await?;
    let Some((payment_id, customer_id, order_id, amount)) = charged else {
        return Ok(Refunded {
            payment_id: None,
            refunded: false,
        });
    };
    lock_account(tx, &customer_id).await?;
    sqlx::query(
        "UPDATE payment_accounts SET balance_cents = balance_cents + $2 WHERE customer_id = $1",
    )
    .bind(&customer_id)
    .bind(amount)
    .execute(tx)
    .await?;
    sqlx::query(
        "UPDATE payment_charges SET status = 'refunded', refunded_at = now() WHERE payment_id = $1",
    )
    .bind(payment_id)
    .execute(tx)
    .await?;
    record_movement(
        tx,
        command.saga_id(),
        &customer_id,
        &order_id,
        "refund",
        amount,
        payment_id,
    )
    .await?;
    Ok(Refunded {
        payment_id: Some(payment_id.to_string()),
        refunded: true,
    })
}

async fn authorize(tx: &Tx, command: Command<AmountPayload>) -> Result<Authorized, HandlerError> {
    let p = &command.payload;
    let amount = amount(p.amount_cents)?;
    let (balance, held) = lock_account(tx, &p.customer_id).await?;
    check_funds(&p.customer_id, balance, held, amount)?;
    let authorization_id = Uuid::now_v7();
    sqlx::query("UPDATE payment_accounts SET held_cents = held_cents + $2 WHERE customer_id = $1")
        .bind(&p.customer_id)
        .bind(amount)
        .execute(tx)
        .await?;
    sqlx::query(
        "INSERT INTO payment_authorizations
             (authorization_id, action_key, saga_id, customer_id, order_id, amount_cents, status)
         VALUES ($1, $2, $3, $4, $5, $6, 'authorized')",
    )
    .bind(authorization_id)
    .bind(command.action_key())
    .bind(command.saga_id())
    .bind(&p.customer_id)
    .bind(&p.order_id)
    .bind(amount)
    .execute(tx)
    .await?;
    record_movement(
        tx,
        command.saga_id(),
        &p.customer_id,
        &p.order_id,
        "authorize",
        amount,
        authorization_id,
    )
    .await?;
    Ok(Authorized {
        authorization_id: Some(authorization_id.to_string()),
    })
}

async fn void(tx: &Tx, command: Command<VoidPayload>) -> Result<Voided, HandlerError> {
    let held: Option<(Uuid, String, String, i64, String)> = sqlx::query_as(
        "SELECT authorization_id, customer_id, order_id, amount_cents, status
         FROM payment_authorizations WHERE action_key = $1 FOR UPDATE",
    )
    .bind(command.action_key())
    .fetch_optional(tx)
    .await?;
    let Some((authorization_id, customer_id, order_id, amount, status)) = held else {
        return Ok(Voided {
            authorization_id: None,
            voided: false,
        });
    };
    match status.as_str() {
        "authorized" => {}
        "voided" => {
            return Ok(Voided {
                authorization_id: Some(authorization_id.to_string()),
                voided: false,
            });
        }
        // The money already moved: voiding cannot undo a capture.
        _ => {
            return Err(HandlerError::rejected(format!(
                "authorization {authorization_id} was already captured and cannot be voided"
            )));
        }
    }
    lock_account(tx, &customer_id).await?;
    sqlx::query("UPDATE payment_accounts SET held_cents = held_cents - $2 WHERE customer_id = $1")
        .bind(&customer_id)
        .bind(amount)
        .execute(tx)
        .await?;
    sqlx::query(
        "UPDATE payment_authorizations SET status = 'voided', closed_at = now()
         WHERE authorization_id = $1",
    )
    .bind(authorization_id)
    .execute(tx)
    .await?;
    record_movement(
        tx,
        command.saga_id(),
        &customer_id,
        &order_id,
        "void",
        amount,
        authorization_id,
    )
    .await?;
    Ok(Voided {
        authorization_id: Some(authorization_id.to_string()),
        voided: true,
    })
}

async fn capture(tx: &Tx, command: Command<CapturePayload>) -> Result<Paid, HandlerError> {
    let p = &command.payload;
    let amount = amount(p.amount_cents)?;
    let Some(authorization) = p.authorization_id.as_deref() else {
        return Err(HandlerError::rejected(
            "authorization_id: required to capture",
        ));
    };
    let Ok(authorization_id) = Uuid::parse_str(authorization) else {
        return Err(HandlerError::rejected(format!(
            "authorization_id: {authorization:?} is not an authorization id"
        )));
    };
    let found: Option<(String, i64, String)> = sqlx::query_as(
        "SELECT customer_id, amount_cents, status FROM payment_authorizations
         WHERE authorization_id = $1 FOR UPDATE",
    )
    .bind(authorization_id)
    .fetch_optional(tx)
    .await?;
    let Some((owner, authorized, status)) = found else {
        return Err(HandlerError::rejected(format!(
            "unknown authorization {authorization_id}"
        )));
    };
    if owner != p.customer_id {
        return Err(HandlerError::rejected(format!(
            "authorization {authorization_id} belongs to another customer"
        )));
    }
    if status != "authorized" {
        return Err(HandlerError::rejected(format!(
            "authorization {authorization_id} is {status}, not capturable"
        )));
    }
    if amount > authorized {
        return Err(HandlerError::rejected(format!(
            "capture of {amount} cents exceeds the {authorized} cents authorized"
        )));
    }
    let (balance, held) = lock_account(tx, &owner).await?;
    if held < authorized || balance < amount {
        // The CHECK constraints would refuse it anyway; say why instead.
        return Err(HandlerError::Transient(format!(
            "account {owner} is inconsistent: balance {balance}, held {held}, capturing {amount} of {authorized}"
        )));
    }
    let payment_id = Uuid::now_v7();
    sqlx::query(
        "UPDATE payment_accounts
         SET held_cents = held_cents - $2, balance_cents = balance_cents - $3
         WHERE customer_id = $1",
    )
    .bind(&owner)
    .bind(authorized)
    .bind(amount)
    .execute(tx)
    .await?;
    sqlx::query(
        "UPDATE payment_authorizations SET status = 'captured', payment_id = $2, closed_at = now()
         WHERE authorization_id = $1",
    )
    .bind(authorization_id)
    .bind(payment_id)
    .execute(tx)
    .await?;
    record_movement(
        tx,
        command.saga_id(),
        &owner,
        &p.order_id,
        "capture",
        amount,
        payment_id,
    )
    .await?;
    Ok(Paid {
        payment_id: Some(payment_id.to_string()),
    })
}
