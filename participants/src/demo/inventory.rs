//! `inventory`: stock per SKU.
//!
//! - `reserve` {order_id, items: [{sku, quantity}]} → `{"reservation_id"}`;
//!   rejected (naming the SKU) when a SKU is unknown or short of stock.
//! - `release` {order_id, reservation_id} (compensation): puts the stock of
//!   the reservation made under the compensated action's key back.
//!
//! The commands are the typed contracts of
//! [`sagas::flows::order_placement::contracts::inventory`].
//!
//! Tables: `inventory_stock` (sku, available), `inventory_reservations`
//! (the ledger: one row per reservation, `reserved` → `released`),
//! `inventory_reservation_items`. SKUs `sku-1` … `sku-100` are seeded with
//! 1,000,000,000 units each when absent.

use std::collections::BTreeMap;

use sagas::flows::order_placement::contracts::inventory::{
    Release, ReleasePayload, Released, Reserve, ReservePayload, Reserved,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::kit::{Command, HandlerError, KitError, Participant, Tx};

/// Participant name.
pub const NAME: &str = "inventory";
/// Seeded SKUs are `sku-1` … `sku-SEEDED_SKUS`.
pub const SEEDED_SKUS: i32 = 100;
/// Units each seeded SKU starts with.
pub const SEEDED_STOCK: i64 = 1_000_000_000;

/// The inventory participant.
pub fn participant() -> Result<Participant, KitError> {
    Participant::builder(NAME)
        .migrations(sqlx::migrate!("migrations/inventory"))
        .setup(seed)
        .action::<Reserve>(reserve)
        .compensation::<Release>(release)
        .build()
}

/// Creates the seeded SKUs that do not exist yet.
pub async fn seed(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO inventory_stock (sku, available)
         SELECT 'sku-' || g, $2 FROM generate_series(1, $1) AS g
         ON CONFLICT (sku) DO NOTHING",
    )
    .bind(SEEDED_SKUS)
    .bind(SEEDED_STOCK)
    .execute(&pool)
    .await?;
    Ok(())
}

async fn reserve(tx: &Tx, command: Command<ReservePayload>) -> Result<Reserved, HandlerError> {
    let payload = &command.payload;
    if payload.items.is_empty() {
        return Err(HandlerError::rejected(
            "a reservation needs at least one item",
        ));
    }
    // Aggregated and sorted, so concurrent reservations lock stock rows
    // in the same order and cannot deadlock.
    let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
    for (i, item) in payload.items.iter().enumerate() {
        if item.quantity == 0 {
            return Err(HandlerError::rejected(format!(
                "items[{i}].quantity: must be greater than 0 (SKU {})",
                item.sku
            )));
        }
        *wanted.entry(item.sku.as_str()).or_default() += i64::from(item.quantity);
    }
    let reservation_id = Uuid::now_v7();
    let (skus, quantities): (Vec<&str>, Vec<i64>) = wanted.iter().map(|(s, q)| (*s, *q)).unzip();
    // One statement: lock the stock rows in SKU order (no deadlock with
    // a concurrent reservation), take every line that has enough, and
    // write the reservation and its lines only if every line was taken.
    let taken: Vec<String> = sqlx::query_scalar(
        "WITH wanted AS (
             SELECT * FROM unnest($5::text[], $6::bigint[]) AS w(sku, quantity)
         ), locked AS (
             SELECT sku FROM inventory_stock WHERE sku = ANY($5) ORDER BY sku FOR UPDATE
         ), taken AS (
             UPDATE inventory_stock s SET available = s.available - w.quantity
             FROM wanted w JOIN locked l USING (sku)
             WHERE s.sku = w.sku AND s.available >= w.quantity
             RETURNING s.sku
         ), reservation AS (
             INSERT INTO inventory_reservations (reservation_id, action_key, saga_id, order_id, status)
             SELECT $1, $2, $3, $4, 'reserved'
             WHERE (SELECT count(*) FROM taken) = cardinality($5::text[])
             RETURNING reservation_id
         ), lines AS (
             INSERT INTO inventory_reservation_items (reservation_id, sku, quantity)
             SELECT r.reservation_id, w.sku, w.quantity FROM reservation r CROSS JOIN wanted w
         )
         SELECT coalesce(array_agg(sku), '{}') FROM taken",
    )
    .bind(reservation_id)
    .bind(command.action_key())
    .bind(command.saga_id())
    .bind(&payload.order_id)
    .bind(&skus)
    .bind(&quantities)
    .fetch_one(tx)
    .await?;
    // A line not taken (the first in SKU order) refuses the whole
    // reservation; the kit rolls back the lines this statement took.
    if let Some((sku, quantity)) = wanted
        .iter()
        .find(|(sku, _)| !taken.iter().any(|t| t == *sku))
    {
        let available: Option<i64> =
            sqlx::query_scalar("SELECT available FROM inventory_stock WHERE sku = $1")
                .bind(sku)
                .fetch_optional(tx)
                .await?;
        return Err(HandlerError::rejected(match available {
            None => format!("unknown SKU {sku}"),
            Some(available) => format!(
                "insufficient stock for SKU {sku}: {quantity} requested, {available} available"
            ),
        }));
    }
    Ok(Reserved {
        reservation_id: Some(reservation_id.to_string()),
    })
}

async fn release(tx: &Tx, command: Command<ReleasePayload>) -> Result<Released, HandlerError> {
    let released: Option<Uuid> = sqlx::query_scalar(
        "UPDATE inventory_reservations SET status = 'released', released_at = now()
         WHERE action_key = $1 AND status = 'reserved'
         RETURNING reservation_id",
    )
    .bind(command.action_key())
    .fetch_optional(tx)
    .await?;
    let Some(reservation_id) = released else {
        // The kit only calls us after a successful reserve, so this is
        // a reservation released by hand; nothing left to give back.
        return Ok(Released {
            reservation_id: None,
            released: false,
        });
    };
    if let Some(claimed) = &command.payload.reservation_id
        && claimed != &reservation_id.to_string()
    {
        tracing::warn!(order_id = %command.payload.order_id, %claimed, actual = %reservation_id, "release names another reservation than its action made; releasing the action's");
    }
    let items: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sku, quantity FROM inventory_reservation_items
         WHERE reservation_id = $1 ORDER BY sku",
    )
    .bind(reservation_id)
    .fetch_all(tx)
    .await?;
    // One row at a time in SKU order: the same lock order as reserve.
    for (sku, quantity) in items {
        sqlx::query("UPDATE inventory_stock SET available = available + $2 WHERE sku = $1")
            .bind(sku)
            .bind(quantity)
            .execute(tx)
            .await?;
    }
    Ok(Released {
        reservation_id: Some(reservation_id.to_string()),
        released: true,
    })
}
