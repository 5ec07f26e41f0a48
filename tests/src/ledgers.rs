//! Typed reads of the demo participants' own databases, so suites can check
//! what the services *did* (stock, money, confirmations, notifications), not
//! only what the orchestrator says.
//!
//! - [`DemoDatabases::connect`] opens small pools on `<ns>_inventory`,
//!   `<ns>_payment`, `<ns>_orders` and `<ns>_notification`, registering the
//!   databases with the [`TestEnv`] so they are dropped with it.
//! - [`DemoDatabases::order`] sums up one order across every ledger
//!   ([`OrderLedger`]); [`DemoDatabases::stock`], [`DemoDatabases::balance`]
//!   and [`DemoDatabases::held`] read one SKU or account.
//! - [`DemoDatabases::double_effects`] and [`DemoDatabases::imbalances`]
//!   check the whole of every ledger against the guarantees of the
//!   participant kit; both must always return an empty list.
//!
//! Every check that spans several tables of one database reads them in one
//! `REPEATABLE READ` snapshot, so it may run while participants work.

use std::time::Duration;

use participants::demo::{inventory, payment};
use sqlx::{PgPool, Postgres, Transaction, postgres::PgPoolOptions};

use crate::{app::WAIT, env::TestEnv, eventually};

/// Connections per database: reads are short, and PostgreSQL's
/// `max_connections` is shared by every test running in parallel.
const POOL_SIZE: u32 = 2;

/// Units each seeded SKU (`sku-1` … `sku-100`) starts with.
pub const SEEDED_STOCK: i64 = inventory::SEEDED_STOCK;
/// Balance of a payment account when it is opened on first sight.
pub const OPENING_BALANCE_CENTS: i64 = payment::OPENING_BALANCE_CENTS;

/// Pools on the four demo databases of one [`TestEnv`].
#[derive(Debug, Clone)]
pub struct DemoDatabases {
    /// `<ns>_inventory`: stock and reservations.
    inventory: PgPool,
    /// `<ns>_payment`: accounts, charges, authorizations, movements.
    payment: PgPool,
    /// `<ns>_orders`: confirmed orders.
    orders: PgPool,
    /// `<ns>_notification`: one row per (saga, lifecycle state).
    notification: PgPool,
}

/// What the demo ledgers hold about one order id (all sagas for it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OrderLedger {
    /// Units still held by reservations of this order (released ones
    /// excluded): the stock the order keeps out of `inventory_stock`.
    pub reserved_units_net: i64,
    /// Rows in `inventory_reservations` for this order, whatever their status.
    pub reservation_rows: i64,
    /// Money taken from the customer and not given back:
    /// charges + captures − refunds.
    pub charged_cents_net: i64,
    /// Sum of this order's authorizations still holding funds
    /// (neither voided nor captured).
    pub authorized_open_cents: i64,
    /// Rows in `payment_movements` for this order.
    pub payment_movements: i64,
    /// Kinds of those movements in the order they were written
    /// (`charge`, `refund`, `authorize`, `void`, `capture`).
    pub movement_kinds: Vec<String>,
    /// Rows in `orders` for this order id (0 or 1: the primary key).
    pub confirmed: i64,
    /// Lifecycle states the notification service recorded for this order,
    /// in the order they were recorded (`running`, `completed` ...). Events
    /// may be handled out of order, so compare as a set.
    pub notifications: Vec<String>,
}

impl DemoDatabases {
    /// Connects to the demo databases of `env` (registering them for
    /// removal), waiting up to [`WAIT`] for each to exist: call it after
    /// `participants::demo::start`, or while participants start elsewhere.
    pub async fn connect(env: &TestEnv) -> Self {
        Self {
            inventory: open(env, "inventory").await,
            payment: open(env, "payment").await,
            orders: open(env, "orders").await,
            notification: open(env, "notification").await,
        }
    }

    /// The inventory database, for ad-hoc queries.
    pub fn inventory(&self) -> &PgPool {
        &self.inventory
    }

    /// The payment database, for ad-hoc queries.
    pub fn payment(&self) -> &PgPool {
        &self.payment
    }

    /// The orders database, for ad-hoc queries.
    pub fn orders(&self) -> &PgPool {
        &self.orders
    }

    /// The notification database, for ad-hoc queries.
    pub fn notification(&self) -> &PgPool {
        &self.notification
    }

    /// Everything the ledgers hold about `order_id`.
    pub async fn order(&self, order_id: &str) -> OrderLedger {
        let (reservation_rows, reserved_units_net): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM inventory_reservations WHERE order_id = $1),
                    (SELECT coalesce(sum(i.quantity), 0)::bigint
                     FROM inventory_reservation_items i
                     JOIN inventory_reservations r USING (reservation_id)
                     WHERE r.order_id = $1 AND r.status = 'reserved')",
        )
        .bind(order_id)
        .fetch_one(&self.inventory)
        .await
        .expect("read inventory ledger");

        let mut tx = snapshot(&self.payment).await;
        let movements: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kind, amount_cents FROM payment_movements WHERE order_id = $1 ORDER BY id",
        )
        .bind(order_id)
        .fetch_all(&mut *tx)
        .await
        .expect("read payment movements");
        let authorized_open_cents: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(amount_cents), 0)::bigint FROM payment_authorizations
             WHERE order_id = $1 AND status = 'authorized'",
        )
        .bind(order_id)
        .fetch_one(&mut *tx)
        .await
        .expect("read authorizations");
        tx.rollback().await.expect("end snapshot");
        let charged_cents_net = movements
            .iter()
            .map(|(kind, amount)| match kind.as_str() {
                "charge" | "capture" => *amount,
                "refund" => -*amount,
                _ => 0,
            })
            .sum();

        let confirmed: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&self.orders)
            .await
            .expect("read orders");

        OrderLedger {
            reserved_units_net,
            reservation_rows,
            charged_cents_net,
            authorized_open_cents,
            payment_movements: movements.len() as i64,
            movement_kinds: movements.into_iter().map(|(kind, _)| kind).collect(),
            confirmed,
            notifications: self.notifications(order_id).await,
        }
    }

    /// Lifecycle states recorded for `order_id`, in recording order.
    pub async fn notifications(&self, order_id: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT state FROM notifications WHERE order_id = $1 ORDER BY id")
            .bind(order_id)
            .fetch_all(&self.notification)
            .await
            .expect("read notifications")
    }

    /// Waits (up to [`WAIT`]) until the notification service recorded
    /// `state` for `order_id`; lifecycle events travel on their own queue,
    /// so they may land after the saga's state is visible over gRPC.
    pub async fn wait_for_notification(&self, order_id: &str, state: &str) {
        eventually(
            &format!("a {state:?} notification for order {order_id}"),
            WAIT,
            || async {
                self.notifications(order_id)
                    .await
                    .iter()
                    .any(|s| s == state)
                    .then_some(())
            },
        )
        .await;
    }

    /// Units of `sku` available; panics if the SKU does not exist.
    pub async fn stock(&self, sku: &str) -> i64 {
        sqlx::query_scalar("SELECT available FROM inventory_stock WHERE sku = $1")
            .bind(sku)
            .fetch_optional(&self.inventory)
            .await
            .expect("read stock")
            .unwrap_or_else(|| panic!("SKU {sku} does not exist"))
    }

    /// Balance of `customer_id` in cents; an account not opened yet has the
    /// opening balance ([`OPENING_BALANCE_CENTS`]).
    pub async fn balance(&self, customer_id: &str) -> i64 {
        self.account(customer_id)
            .await
            .map_or(OPENING_BALANCE_CENTS, |(balance, _)| balance)
    }

    /// Cents of `customer_id` held by open authorizations (0 for an
    /// account not opened yet).
    pub async fn held(&self, customer_id: &str) -> i64 {
        self.account(customer_id).await.map_or(0, |(_, held)| held)
    }

    /// Whether the payment service has seen `customer_id` (accounts open on
    /// the first charge or authorization).
    pub async fn account_opened(&self, customer_id: &str) -> bool {
        self.account(customer_id).await.is_some()
    }

    async fn account(&self, customer_id: &str) -> Option<(i64, i64)> {
        sqlx::query_as(
            "SELECT balance_cents, held_cents FROM payment_accounts WHERE customer_id = $1",
        )
        .bind(customer_id)
        .fetch_optional(&self.payment)
        .await
        .expect("read account")
    }

    /// Every effect recorded more than once where the contract allows one,
    /// described for a failure message; always empty when participants
    /// apply each command once:
    ///
    /// - one movement of a kind per payment or authorization (two refunds of
    ///   one charge, two voids or captures of one authorization ...);
    /// - one reservation, one charge, one authorization and one capture per
    ///   saga (each is one step with one action key);
    /// - one inbox success per business row: a reservation, charge or
    ///   authorization whose action key is not remembered as a success was
    ///   applied under a fenced or rejected key (a barrier breach).
    pub async fn double_effects(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut tx = snapshot(&self.inventory).await;
        found.extend(
            describe(
                &mut tx,
                "SELECT format('inventory: saga %s has %s reservations (%s)', saga_id, count(*),
                               string_agg(action_key, ', '))
                 FROM inventory_reservations GROUP BY saga_id HAVING count(*) > 1
                 UNION ALL
                 SELECT format('inventory: reservation %s applied under key %s whose inbox outcome is %s',
                               r.reservation_id, r.action_key, coalesce(k.kind || ' ' || k.status, 'missing'))
                 FROM inventory_reservations r
                 LEFT JOIN kit_inbox k ON k.idempotency_key = r.action_key
                 WHERE k.kind IS DISTINCT FROM 'command' OR k.status IS DISTINCT FROM 'success'",
                &[],
            )
            .await,
        );
        tx.rollback().await.expect("end snapshot");

        let mut tx = snapshot(&self.payment).await;
        found.extend(
            describe(
                &mut tx,
                "SELECT format('payment: %s %s movements for %s (order %s)', count(*), kind,
                               reference_id, min(order_id))
                 FROM payment_movements GROUP BY reference_id, kind HAVING count(*) > 1
                 UNION ALL
                 SELECT format('payment: saga %s has %s charges', saga_id, count(*))
                 FROM payment_charges GROUP BY saga_id HAVING count(*) > 1
                 UNION ALL
                 SELECT format('payment: saga %s has %s authorizations', saga_id, count(*))
                 FROM payment_authorizations GROUP BY saga_id HAVING count(*) > 1
                 UNION ALL
                 SELECT format('payment: saga %s has %s captures', saga_id, count(*))
                 FROM payment_movements WHERE kind = 'capture' GROUP BY saga_id HAVING count(*) > 1
                 UNION ALL
                 SELECT format('payment: charge %s applied under key %s whose inbox outcome is %s',
                               c.payment_id, c.action_key, coalesce(k.kind || ' ' || k.status, 'missing'))
                 FROM payment_charges c
                 LEFT JOIN kit_inbox k ON k.idempotency_key = c.action_key
                 WHERE k.kind IS DISTINCT FROM 'command' OR k.status IS DISTINCT FROM 'success'
                 UNION ALL
                 SELECT format('payment: authorization %s applied under key %s whose inbox outcome is %s',
                               a.authorization_id, a.action_key, coalesce(k.kind || ' ' || k.status, 'missing'))
                 FROM payment_authorizations a
                 LEFT JOIN kit_inbox k ON k.idempotency_key = a.action_key
                 WHERE k.kind IS DISTINCT FROM 'command' OR k.status IS DISTINCT FROM 'success'",
                &[],
            )
            .await,
        );
        tx.rollback().await.expect("end snapshot");
        found
    }

    /// Every ledger that does not add up, described for a failure message;
    /// always empty when every effect and every compensation was applied
    /// exactly once:
    ///
    /// - per seeded SKU: available + units of open reservations = the seeded
    ///   stock (a test that changes stock by hand must expect a line here);
    /// - per account: balance = opening − charges + refunds − captures, and
    ///   held = the open authorizations;
    /// - a compensation remembered by the inbox (`compensated_by`) whose
    ///   business row was not undone (reservation still `reserved`, charge
    ///   still `charged`, authorization still `authorized`), and the
    ///   reverse: a row undone without a remembered compensation.
    pub async fn imbalances(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut tx = snapshot(&self.inventory).await;
        found.extend(
            describe(
                &mut tx,
                "SELECT format('inventory: %s has %s available + %s reserved, expected %s in all',
                               s.sku, s.available, coalesce(h.units, 0), $1::bigint)
                 FROM inventory_stock s
                 LEFT JOIN (SELECT i.sku, sum(i.quantity)::bigint AS units
                            FROM inventory_reservation_items i
                            JOIN inventory_reservations r USING (reservation_id)
                            WHERE r.status = 'reserved' GROUP BY i.sku) h USING (sku)
                 WHERE s.sku IN (SELECT 'sku-' || g FROM generate_series(1, $2::bigint) AS g)
                   AND s.available + coalesce(h.units, 0) <> $1
                 UNION ALL
                 SELECT format('inventory: reservation %s is %s but its inbox says compensated_by %s',
                               r.reservation_id, r.status, coalesce(k.compensated_by, 'nobody'))
                 FROM inventory_reservations r
                 JOIN kit_inbox k ON k.idempotency_key = r.action_key
                 WHERE (r.status = 'reserved') <> (k.compensated_by IS NULL)",
                &[SEEDED_STOCK, i64::from(inventory::SEEDED_SKUS)],
            )
            .await,
        );
        tx.rollback().await.expect("end snapshot");

        let mut tx = snapshot(&self.payment).await;
        found.extend(
            describe(
                &mut tx,
                "SELECT format('payment: %s has balance %s, movements say %s', a.customer_id,
                               a.balance_cents, $1::bigint - coalesce(m.taken, 0))
                 FROM payment_accounts a
                 LEFT JOIN (SELECT customer_id,
                                   sum(CASE kind WHEN 'refund' THEN -amount_cents
                                                 WHEN 'charge' THEN amount_cents
                                                 WHEN 'capture' THEN amount_cents
                                                 ELSE 0 END)::bigint AS taken
                            FROM payment_movements GROUP BY customer_id) m USING (customer_id)
                 WHERE a.balance_cents <> $1 - coalesce(m.taken, 0)
                 UNION ALL
                 SELECT format('payment: %s holds %s, open authorizations sum to %s', a.customer_id,
                               a.held_cents, coalesce(h.open, 0))
                 FROM payment_accounts a
                 LEFT JOIN (SELECT customer_id, sum(amount_cents)::bigint AS open
                            FROM payment_authorizations WHERE status = 'authorized'
                            GROUP BY customer_id) h USING (customer_id)
                 WHERE a.held_cents <> coalesce(h.open, 0)
                 UNION ALL
                 SELECT format('payment: charge %s is %s but its inbox says compensated_by %s',
                               c.payment_id, c.status, coalesce(k.compensated_by, 'nobody'))
                 FROM payment_charges c
                 JOIN kit_inbox k ON k.idempotency_key = c.action_key
                 WHERE (c.status = 'charged') <> (k.compensated_by IS NULL)
                 UNION ALL
                 SELECT format('payment: authorization %s is voided but its inbox says compensated_by %s',
                               a.authorization_id, coalesce(k.compensated_by, 'nobody'))
                 FROM payment_authorizations a
                 JOIN kit_inbox k ON k.idempotency_key = a.action_key
                 WHERE (a.status = 'voided') <> (k.compensated_by IS NOT NULL)",
                &[OPENING_BALANCE_CENTS],
            )
            .await,
        );
        tx.rollback().await.expect("end snapshot");
        found
    }

    /// Closes the pools (they also close when dropped).
    pub async fn close(self) {
        self.inventory.close().await;
        self.payment.close().await;
        self.orders.close().await;
        self.notification.close().await;
    }
}

async fn open(env: &TestEnv, service: &str) -> PgPool {
    let url = env.database_url(service);
    eventually(
        &format!("database {}_{service} to exist", env.namespace),
        WAIT,
        || async {
            PgPoolOptions::new()
                .max_connections(POOL_SIZE)
                .idle_timeout(Duration::from_secs(10))
                .connect(&url)
                .await
                .ok()
        },
    )
    .await
}

/// A read-only transaction seeing one snapshot of the database.
async fn snapshot(pool: &PgPool) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.expect("begin snapshot");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .expect("set snapshot isolation");
    tx
}

/// Runs a check whose rows are descriptions of what is wrong.
async fn describe(
    tx: &mut Transaction<'static, Postgres>,
    query: &str,
    binds: &[i64],
) -> Vec<String> {
    let mut query = sqlx::query_scalar(query);
    for bind in binds {
        query = query.bind(*bind);
    }
    query
        .fetch_all(&mut **tx)
        .await
        .unwrap_or_else(|e| panic!("ledger check failed: {e}"))
}
