//! Order placement end to end: the real orchestrator, the real demo
//! participants (inventory, payment, orders, notification, each on its own
//! database and connections), orders placed over gRPC, and every outcome
//! checked in the participants' own ledgers.

use std::time::Duration;

use participants::demo::{self, Demo, DemoConfig, Service};
use participants::kit::FaultConfig;
use saga_proto::v1::{Saga, SagaState, StepState};
use saga_tests::{
    app::TestApp,
    env::{AMQP_URL, POSTGRES, TestEnv},
    ledgers::{DemoDatabases, OPENING_BALANCE_CENTS, OrderLedger, SEEDED_STOCK},
};
use sagas::Catalog;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Running demo participants of one test env.
pub struct DemoParticipants {
    /// The services.
    demo: Demo,
}

impl DemoParticipants {
    /// Starts every demo service in `env` with `faults`, and waits until
    /// each consumes from its queue.
    pub async fn start(env: &TestEnv, faults: FaultConfig) -> Self {
        Self::start_services(env, &Service::ALL, faults).await
    }

    /// Starts `services` only.
    pub async fn start_services(env: &TestEnv, services: &[Service], faults: FaultConfig) -> Self {
        Self::start_on(env, services, faults, None).await
    }

    /// Starts `services` reaching RabbitMQ through `broker` (default: the
    /// shared one, in plaintext).
    pub async fn start_on(
        env: &TestEnv,
        services: &[Service],
        faults: FaultConfig,
        broker: Option<participants::kit::Broker>,
    ) -> Self {
        let mut config =
            DemoConfig::from_urls(AMQP_URL, &env.namespace, &format!("{POSTGRES}/postgres"))
                .expect("demo config");
        if let Some(broker) = broker {
            config.broker = broker;
        }
        config.database_prefix = Some(format!("{}_", env.namespace));
        // Several tests run at once against one PostgreSQL.
        config.pool.max_connections = 2;
        config.relay_interval = Duration::from_millis(200);
        config.faults = faults;
        for service in services {
            // Registered before they exist, so a failed start cleans up too.
            env.database_url(service.name());
        }
        let mut demo = demo::start(services, config, CancellationToken::new())
            .await
            .expect("demo participants start");
        assert!(demo.ready().await, "demo participants consume");
        Self { demo }
    }

    /// The handle of one service (for its counters).
    pub fn handle(&self, service: Service) -> &participants::kit::ParticipantHandle {
        self.demo.get(service).expect("service started")
    }

    /// Stops every service gracefully.
    pub async fn stop(self) {
        self.demo.shutdown();
        self.demo.stopped().await;
    }
}

/// An order_placement input of one line.
pub fn one_line(
    order_id: &str,
    customer: &str,
    sku: &str,
    quantity: u64,
    unit_price: u64,
) -> Value {
    json!({
        "order_id": order_id,
        "customer_id": customer,
        "items": [{"sku": sku, "quantity": quantity, "unit_price_cents": unit_price}],
    })
}

/// The state of each step by name.
pub fn step_states(saga: &Saga) -> Vec<(String, StepState)> {
    saga.steps
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                StepState::try_from(s.state).expect("known step state"),
            )
        })
        .collect()
}

/// Asserts that no ledger of the demo participants is off.
pub async fn assert_ledgers_consistent(db: &DemoDatabases) {
    assert_eq!(db.double_effects().await, Vec::<String>::new());
    assert_eq!(db.imbalances().await, Vec::<String>::new());
}

/// One test's orchestrator (standard catalog), demo participants and
/// ledger reader.
struct Shop {
    /// The orchestrator.
    app: TestApp,
    /// Inventory, payment, orders and notification.
    participants: DemoParticipants,
    /// Their databases.
    db: DemoDatabases,
}

impl Shop {
    async fn open(env: &TestEnv, faults: FaultConfig) -> Self {
        let app = TestApp::spawn(env, Catalog::standard()).await;
        let participants = DemoParticipants::start(env, faults).await;
        let db = DemoDatabases::connect(env).await;
        Self {
            app,
            participants,
            db,
        }
    }

    async fn close(self) {
        self.participants.stop().await;
        self.app.stop().await;
        self.db.close().await;
    }
}

/// Waits until the notification service recorded exactly `states` (in any
/// order) for `order_id`.
pub async fn wait_for_notifications(db: &DemoDatabases, order_id: &str, states: &[&str]) {
    for state in states {
        db.wait_for_notification(order_id, state).await;
    }
    let mut recorded = db.notifications(order_id).await;
    recorded.sort();
    let mut expected: Vec<String> = states.iter().map(|s| (*s).to_owned()).collect();
    expected.sort();
    assert_eq!(recorded, expected, "notifications of order {order_id}");
}

/// `ledger` without its notifications (checked on their own, since they
/// arrive on their own queue).
pub fn effects(ledger: OrderLedger) -> OrderLedger {
    OrderLedger {
        notifications: vec![],
        ..ledger
    }
}

/// The ledger of an order that completed: `units` reserved, `cents` taken
/// through `movements`, confirmed once.
fn completed(units: i64, cents: i64, movements: &[&str]) -> OrderLedger {
    OrderLedger {
        reserved_units_net: units,
        reservation_rows: 1,
        charged_cents_net: cents,
        authorized_open_cents: 0,
        payment_movements: movements.len() as i64,
        movement_kinds: movements.iter().map(|m| (*m).to_owned()).collect(),
        confirmed: 1,
        notifications: vec![],
    }
}

/// History entries of `kind` for the saga.
pub async fn history_count(app: &TestApp, saga_id: &str, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM saga_history WHERE saga_id = $1::uuid AND kind = $2")
        .bind(saga_id)
        .bind(kind)
        .fetch_one(&app.pool)
        .await
        .expect("read history")
}

#[tokio::test]
async fn v1_order_completes_and_each_ledger_moves_once() {
    let env = TestEnv::new();
    let shop = Shop::open(&env, FaultConfig::default()).await;

    let input = json!({
        "order_id": "o-v1",
        "customer_id": "alice",
        "items": [
            {"sku": "sku-1", "quantity": 3, "unit_price_cents": 1250},
            {"sku": "sku-2", "quantity": 1, "unit_price_cents": 499},
        ],
    });
    let id = shop.app.start("order_placement", 1, input).await;
    let saga = shop.app.wait_for_state(&id, SagaState::Completed).await;

    assert_eq!(
        step_states(&saga),
        [
            ("reserve_inventory".into(), StepState::Succeeded),
            ("charge_payment".into(), StepState::Succeeded),
            ("confirm_order".into(), StepState::Succeeded),
        ]
    );
    let db = &shop.db;
    assert_eq!(
        effects(db.order("o-v1").await),
        completed(4, 3 * 1250 + 499, &["charge"])
    );
    assert_eq!(db.stock("sku-1").await, SEEDED_STOCK - 3);
    assert_eq!(db.stock("sku-2").await, SEEDED_STOCK - 1);
    assert_eq!(db.balance("alice").await, OPENING_BALANCE_CENTS - 4249);
    assert_eq!(db.held("alice").await, 0);
    // The saga carries what the participants answered.
    let data: Value = serde_json::from_str(&saga.data_json).unwrap();
    let payment_id: String =
        sqlx::query_scalar("SELECT payment_id::text FROM payment_charges WHERE order_id = 'o-v1'")
            .fetch_one(db.payment())
            .await
            .unwrap();
    assert_eq!(data["payment_id"], payment_id);
    let reservation_id: String = sqlx::query_scalar(
        "SELECT reservation_id::text FROM inventory_reservations WHERE order_id = 'o-v1'",
    )
    .fetch_one(db.inventory())
    .await
    .unwrap();
    assert_eq!(data["reservation_id"], reservation_id);
    wait_for_notifications(db, "o-v1", &["running", "completed"]).await;
    assert_ledgers_consistent(db).await;
    shop.close().await;
}

#[tokio::test]
async fn v2_order_authorizes_then_captures_and_completes() {
    let env = TestEnv::new();
    let shop = Shop::open(&env, FaultConfig::default()).await;

    let id = shop
        .app
        .start(
            "order_placement",
            2,
            one_line("o-v2", "bob", "sku-3", 5, 2_000),
        )
        .await;
    let saga = shop.app.wait_for_state(&id, SagaState::Completed).await;

    assert_eq!(
        step_states(&saga),
        [
            ("reserve_inventory".into(), StepState::Succeeded),
            ("authorize_payment".into(), StepState::Succeeded),
            ("capture_payment".into(), StepState::Succeeded),
            ("confirm_order".into(), StepState::Succeeded),
        ]
    );
    let db = &shop.db;
    assert_eq!(
        effects(db.order("o-v2").await),
        completed(5, 10_000, &["authorize", "capture"])
    );
    assert_eq!(db.stock("sku-3").await, SEEDED_STOCK - 5);
    assert_eq!(db.balance("bob").await, OPENING_BALANCE_CENTS - 10_000);
    assert_eq!(db.held("bob").await, 0, "the capture released the hold");
    let status: String =
        sqlx::query_scalar("SELECT status FROM payment_authorizations WHERE order_id = 'o-v2'")
            .fetch_one(db.payment())
            .await
            .unwrap();
    assert_eq!(status, "captured");
    wait_for_notifications(db, "o-v2", &["running", "completed"]).await;
    assert_ledgers_consistent(db).await;
    shop.close().await;
}

#[tokio::test]
async fn v1_quantity_above_stock_compensates_and_never_charges() {
    let env = TestEnv::new();
    let shop = Shop::open(&env, FaultConfig::default()).await;

    let too_many = SEEDED_STOCK as u64 + 1;
    let id = shop
        .app
        .start(
            "order_placement",
            1,
            json!({
                "order_id": "o-short",
                "customer_id": "carol",
                "items": [
                    {"sku": "sku-3", "quantity": 2, "unit_price_cents": 2_500},
                    {"sku": "sku-4", "quantity": too_many, "unit_price_cents": 0},
                ],
            }),
        )
        .await;
    let saga = shop.app.wait_for_state(&id, SagaState::Compensated).await;

    assert!(
        saga.error.contains("insufficient stock for SKU sku-4"),
        "{}",
        saga.error
    );
    assert_eq!(
        step_states(&saga),
        [
            ("reserve_inventory".into(), StepState::Failed),
            ("charge_payment".into(), StepState::Skipped),
            ("confirm_order".into(), StepState::Skipped),
        ]
    );
    let db = &shop.db;
    assert_eq!(effects(db.order("o-short").await), OrderLedger::default());
    // sku-3 was taken before sku-4 came up short: rolled back with it.
    assert_eq!(db.stock("sku-3").await, SEEDED_STOCK);
    assert_eq!(db.stock("sku-4").await, SEEDED_STOCK);
    assert!(
        !db.account_opened("carol").await,
        "the charge was never issued"
    );
    assert_eq!(db.balance("carol").await, OPENING_BALANCE_CENTS);
    wait_for_notifications(db, "o-short", &["running", "compensating", "compensated"]).await;
    assert_ledgers_consistent(db).await;
    shop.close().await;
}

/// v2, parallel branches: the reservation is rejected while the
/// authorization succeeds, so the authorization is voided.
#[tokio::test]
async fn v2_quantity_above_stock_voids_the_parallel_authorization() {
    let env = TestEnv::new();
    let shop = Shop::open(&env, FaultConfig::default()).await;

    let too_many = SEEDED_STOCK as u64 + 1;
    let id = shop
        .app
        .start(
            "order_placement",
            2,
            json!({
                "order_id": "o-short-v2",
                "customer_id": "dave",
                "items": [
                    {"sku": "sku-14", "quantity": 2, "unit_price_cents": 2_500},
                    {"sku": "sku-15", "quantity": too_many, "unit_price_cents": 0},
                ],
            }),
        )
        .await;
    let saga = shop.app.wait_for_state(&id, SagaState::Compensated).await;

    assert!(
        saga.error.contains("insufficient stock for SKU sku-15"),
        "{}",
        saga.error
    );
    assert_eq!(
        step_states(&saga),
        [
            ("reserve_inventory".into(), StepState::Failed),
            ("authorize_payment".into(), StepState::Compensated),
            ("capture_payment".into(), StepState::Skipped),
            ("confirm_order".into(), StepState::Skipped),
        ]
    );
    let db = &shop.db;
    let amount = 5_000;
    assert_eq!(
        effects(db.order("o-short-v2").await),
        OrderLedger {
            payment_movements: 2,
            movement_kinds: vec!["authorize".into(), "void".into()],
            ..OrderLedger::default()
        }
    );
    let (authorized, status): (i64, String) = sqlx::query_as(
        "SELECT amount_cents, status FROM payment_authorizations WHERE order_id = 'o-short-v2'",
    )
    .fetch_one(db.payment())
    .await
    .unwrap();
    assert_eq!((authorized, status.as_str()), (amount, "voided"));
    assert_eq!(db.stock("sku-14").await, SEEDED_STOCK);
    assert_eq!(db.stock("sku-15").await, SEEDED_STOCK);
    assert_eq!(db.balance("dave").await, OPENING_BALANCE_CENTS);
    assert_eq!(db.held("dave").await, 0);
    wait_for_notifications(
        db,
        "o-short-v2",
        &["running", "compensating", "compensated"],
    )
    .await;
    assert_ledgers_consistent(db).await;
    shop.close().await;
}

/// A total one cent above the opening balance: 2 × 50,000,000.5 cents
/// cannot be written, so 2 units of 50,000,001 cents (100,000,002).
const ABOVE_BALANCE_UNIT_PRICE: u64 = 50_000_001;

#[tokio::test]
async fn v1_amount_above_balance_releases_the_reservation() {
    let env = TestEnv::new();
    let shop = Shop::open(&env, FaultConfig::default()).await;

    let id = shop
        .app
        .start(
            "order_placement",
            1,
            one_line("o-broke", "erin", "sku-6", 2, ABOVE_BALANCE_UNIT_PRICE),
        )
        .await;
    let saga = shop.app.wait_for_state(&id, SagaState::Compensated).await;

    assert!(saga.error.contains("insufficient funds"), "{}", saga.error);
    assert_eq!(
        step_states(&saga),
        [
            ("reserve_inventory".into(), StepState::Compensated),
            ("charge_payment".into(), StepState::Failed),
            ("confirm_order".into(), StepState::Skipped),
        ]
    );
    let db = &shop.db;
    assert_eq!(
        effects(db.order("o-broke").await),
        OrderLedger {
            reservation_rows: 1,
            ..OrderLedger::default()
        },
        "reserved once, then released; nothing charged"
    );
    assert_eq!(db.stock("sku-6").await, SEEDED_STOCK);
    assert_eq!(db.balance("erin").await, OPENING_BALANCE_CENTS);
    wait_for_notifications(db, "o-broke", &["running", "compensating", "compensated"]).await;
    assert_ledgers_consistent(db).await;
    shop.close().await;
}

/// v2, parallel branches: the authorization is rejected while the
/// reservation succeeds, so the reservation is released.
#[tokio::test]
async fn v2_amount_above_balance_releases_the_parallel_reservation() {
    let env = TestEnv::new();
    let shop = Shop::open(&env, FaultConfig::default()).await;

    let id = shop
        .app
        .start(
            "order_placement",
            2,
            one_line("o-broke-v2", "frank", "sku-7", 2, ABOVE_BALANCE_UNIT_PRICE),
        )
        .await;
    let saga = shop.app.wait_for_state(&id, SagaState::Compensated).await;

    assert!(saga.error.contains("insufficient funds"), "{}", saga.error);
    assert_eq!(
        step_states(&saga),
        [
            ("reserve_inventory".into(), StepState::Compensated),
            ("authorize_payment".into(), StepState::Failed),
            ("capture_payment".into(), StepState::Skipped),
            ("confirm_order".into(), StepState::Skipped),
        ]
    );
    let db = &shop.db;
    assert_eq!(
        effects(db.order("o-broke-v2").await),
        OrderLedger {
            reservation_rows: 1,
            ..OrderLedger::default()
        }
    );
    let status: String = sqlx::query_scalar(
        "SELECT status FROM inventory_reservations WHERE order_id = 'o-broke-v2'",
    )
    .fetch_one(db.inventory())
    .await
    .unwrap();
    assert_eq!(status, "released");
    assert_eq!(db.stock("sku-7").await, SEEDED_STOCK);
    assert_eq!(db.balance("frank").await, OPENING_BALANCE_CENTS);
    assert_eq!(db.held("frank").await, 0);
    wait_for_notifications(
        db,
        "o-broke-v2",
        &["running", "compensating", "compensated"],
    )
    .await;
    assert_ledgers_consistent(db).await;
    shop.close().await;
}

/// One order of a batch.
struct Order {
    /// Order id.
    id: String,
    /// Flow version.
    version: u32,
    /// Who pays.
    customer: String,
    /// What.
    sku: String,
    /// How many.
    quantity: i64,
    /// Price of one.
    unit_price: i64,
}

impl Order {
    fn total(&self) -> i64 {
        self.quantity * self.unit_price
    }

    fn input(&self) -> Value {
        one_line(
            &self.id,
            &self.customer,
            &self.sku,
            self.quantity as u64,
            self.unit_price as u64,
        )
    }

    /// What the ledgers hold once it completed.
    fn completed(&self) -> OrderLedger {
        let movements: &[&str] = if self.version == 1 {
            &["charge"]
        } else {
            &["authorize", "capture"]
        };
        completed(self.quantity, self.total(), movements)
    }
}

/// `n` orders alternating v1 and v2, over two SKUs and three customers, so
/// sums per SKU and per customer are checked too.
fn batch(prefix: &str, n: usize) -> Vec<Order> {
    (0..n)
        .map(|i| Order {
            id: format!("{prefix}-{i}"),
            version: if i % 2 == 0 { 1 } else { 2 },
            customer: format!("{prefix}-customer-{}", i % 3),
            sku: format!("sku-{}", 40 + i % 2),
            quantity: i as i64 + 1,
            unit_price: 100 * (i as i64 + 1),
        })
        .collect()
}

/// Checks every order of `orders` completed exactly once in every ledger,
/// and the stock and balances they add up to.
async fn assert_batch_completed(db: &DemoDatabases, orders: &[Order]) {
    let mut per_sku = std::collections::BTreeMap::<&str, i64>::new();
    let mut per_customer = std::collections::BTreeMap::<&str, i64>::new();
    for order in orders {
        assert_eq!(
            effects(db.order(&order.id).await),
            order.completed(),
            "ledger of order {}",
            order.id
        );
        *per_sku.entry(&order.sku).or_default() += order.quantity;
        *per_customer.entry(&order.customer).or_default() += order.total();
    }
    for (sku, units) in per_sku {
        assert_eq!(db.stock(sku).await, SEEDED_STOCK - units, "stock of {sku}");
    }
    for (customer, cents) in per_customer {
        assert_eq!(
            db.balance(customer).await,
            OPENING_BALANCE_CENTS - cents,
            "balance of {customer}"
        );
        assert_eq!(db.held(customer).await, 0, "held for {customer}");
    }
    assert_ledgers_consistent(db).await;
}

/// Outbox rows of `message_type` (`saga.command` or `saga.lifecycle`)
/// matching `extra` (an SQL condition).
async fn outbox_count(app: &TestApp, message_type: &str, extra: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM outbox WHERE message_type = $1 AND {extra}"
    ))
    .bind(message_type)
    .fetch_one(&app.pool)
    .await
    .expect("read outbox")
}

/// No participant exists while the orders start: their first commands are
/// unroutable and wait in the orchestrator's outbox; once the participants
/// come up every saga completes, each effect applied once.
#[tokio::test]
async fn orders_placed_while_the_participants_are_down_complete_once_they_start() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, Catalog::standard()).await;
    let orders = batch("o-down", 6);
    let mut ids = Vec::new();
    for order in &orders {
        ids.push(
            app.start("order_placement", order.version, order.input())
                .await,
        );
    }

    // Three v1 sagas send one first command, three v2 sagas two.
    saga_tests::eventually(
        "every first command to come back unroutable",
        Duration::from_secs(15),
        || async {
            let returned = outbox_count(&app, "saga.command", "attempts >= 1").await;
            let events = outbox_count(&app, "saga.lifecycle", "true").await;
            (returned == 9 && events == 0).then_some(())
        },
    )
    .await;
    for id in &ids {
        assert_eq!(app.get(id).await.state, SagaState::Running as i32);
    }

    let participants = DemoParticipants::start(&env, FaultConfig::default()).await;
    let db = DemoDatabases::connect(&env).await;
    for id in &ids {
        app.wait_for_state_within(id, SagaState::Completed, Duration::from_secs(60))
            .await;
    }
    app.wait_for_empty_outbox().await;
    assert_batch_completed(&db, &orders).await;
    for order in &orders {
        db.wait_for_notification(&order.id, "completed").await;
        // `running` was published while no notification queue was bound:
        // lifecycle events are not kept for subscribers that do not exist yet.
        let states = db.notifications(&order.id).await;
        assert_eq!(states, ["completed"], "notifications of {}", order.id);
    }
    participants.stop().await;
    app.stop().await;
    db.close().await;
}

/// Passive declare: messages ready in `queue`.
async fn ready_messages(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue exists")
        .message_count()
}

/// Payment stops while inventory keeps working: the charges wait in
/// payment's queue with the stock already reserved, and every order
/// completes once payment is back.
#[tokio::test]
async fn orders_wait_for_a_stopped_payment_service_and_complete_when_it_returns() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, Catalog::standard()).await;
    let others = DemoParticipants::start_services(
        &env,
        &[Service::Inventory, Service::Orders, Service::Notification],
        FaultConfig::default(),
    )
    .await;
    let payment =
        DemoParticipants::start_services(&env, &[Service::Payment], FaultConfig::default()).await;
    let db = DemoDatabases::connect(&env).await;
    payment.stop().await;

    let orders: Vec<Order> = batch("o-nopay", 4)
        .into_iter()
        .map(|o| Order { version: 1, ..o })
        .collect();
    let mut ids = Vec::new();
    for order in &orders {
        ids.push(app.start("order_placement", 1, order.input()).await);
    }
    let connection = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let payment_queue = env.topology().participant_queue("payment");
    saga_tests::eventually(
        "every charge waiting in payment's queue",
        Duration::from_secs(15),
        || async { (ready_messages(&channel, &payment_queue).await == 4).then_some(()) },
    )
    .await;
    for id in &ids {
        let saga = app.get(id).await;
        assert_eq!(
            step_states(&saga),
            [
                ("reserve_inventory".into(), StepState::Succeeded),
                ("charge_payment".into(), StepState::Running),
                ("confirm_order".into(), StepState::Pending),
            ]
        );
    }
    for order in &orders {
        let ledger = db.order(&order.id).await;
        assert_eq!(
            (ledger.reserved_units_net, ledger.payment_movements),
            (order.quantity, 0)
        );
    }

    let payment =
        DemoParticipants::start_services(&env, &[Service::Payment], FaultConfig::default()).await;
    for id in &ids {
        app.wait_for_state_within(id, SagaState::Completed, Duration::from_secs(60))
            .await;
    }
    assert_batch_completed(&db, &orders).await;
    for order in &orders {
        wait_for_notifications(&db, &order.id, &["running", "completed"]).await;
    }
    let _ = connection.close(200, "bye".into()).await;
    payment.stop().await;
    others.stop().await;
    app.stop().await;
    db.close().await;
}

/// One order of [`four_outcomes`] and how it must end.
struct Expected {
    /// The order.
    order: &'static str,
    /// Flow version.
    version: u32,
    /// Its input.
    input: Value,
    /// Where it ends.
    state: SagaState,
    /// Step phases it runs to get there: one idempotency key, and one
    /// command unless a reply timed out, each.
    commands: i64,
}

/// The four shapes of order: v1 and v2 completed, v1 refused by payment
/// (reserve, charge rejected, release) and v2 refused by inventory
/// (reserve rejected, authorize, void).
fn four_outcomes(prefix: &'static [&'static str; 4]) -> Vec<Expected> {
    vec![
        Expected {
            order: prefix[0],
            version: 1,
            input: one_line(prefix[0], "dup-a", "sku-50", 2, 300),
            state: SagaState::Completed,
            commands: 3,
        },
        Expected {
            order: prefix[1],
            version: 2,
            input: one_line(prefix[1], "dup-b", "sku-51", 3, 400),
            state: SagaState::Completed,
            commands: 4,
        },
        Expected {
            order: prefix[2],
            version: 1,
            input: one_line(prefix[2], "dup-c", "sku-52", 2, ABOVE_BALANCE_UNIT_PRICE),
            state: SagaState::Compensated,
            commands: 3,
        },
        Expected {
            order: prefix[3],
            version: 2,
            input: one_line(prefix[3], "dup-d", "sku-53", SEEDED_STOCK as u64 + 1, 0),
            state: SagaState::Compensated,
            commands: 3,
        },
    ]
}

/// What the four outcomes leave in the ledgers.
async fn assert_four_outcomes(db: &DemoDatabases, orders: &[&str; 4]) {
    assert_eq!(
        effects(db.order(orders[0]).await),
        completed(2, 600, &["charge"])
    );
    assert_eq!(
        effects(db.order(orders[1]).await),
        completed(3, 1_200, &["authorize", "capture"])
    );
    assert_eq!(
        effects(db.order(orders[2]).await),
        OrderLedger {
            reservation_rows: 1,
            ..OrderLedger::default()
        }
    );
    assert_eq!(
        effects(db.order(orders[3]).await),
        OrderLedger {
            payment_movements: 2,
            movement_kinds: vec!["authorize".into(), "void".into()],
            ..OrderLedger::default()
        }
    );
    assert_eq!(db.stock("sku-50").await, SEEDED_STOCK - 2);
    assert_eq!(db.stock("sku-51").await, SEEDED_STOCK - 3);
    assert_eq!(db.stock("sku-52").await, SEEDED_STOCK);
    assert_eq!(db.stock("sku-53").await, SEEDED_STOCK);
    assert_eq!(db.balance("dup-a").await, OPENING_BALANCE_CENTS - 600);
    assert_eq!(db.balance("dup-b").await, OPENING_BALANCE_CENTS - 1_200);
    assert_eq!(db.balance("dup-c").await, OPENING_BALANCE_CENTS);
    assert_eq!(db.balance("dup-d").await, OPENING_BALANCE_CENTS);
    for customer in ["dup-a", "dup-b", "dup-c", "dup-d"] {
        assert_eq!(db.held(customer).await, 0);
    }
    assert_ledgers_consistent(db).await;
}

/// A saga of [`place_four`] once it ended.
struct Placed {
    /// Its id.
    id: String,
    /// Commands the orchestrator delivered for it, retries included (on a
    /// loaded machine a reply may miss its 5 s timeout; the counts below
    /// stay exact either way).
    deliveries: i64,
}

/// Runs the four outcomes at once and waits for each to end.
async fn place_four(app: &TestApp, expected: &[Expected]) -> Vec<Placed> {
    let ids = futures::future::join_all(
        expected
            .iter()
            .map(|e| app.start("order_placement", e.version, e.input.clone())),
    )
    .await;
    let mut placed = Vec::new();
    for (id, e) in ids.into_iter().zip(expected) {
        let saga = app.wait_for_state(&id, e.state).await;
        let phases = |s: &saga_proto::v1::Step| {
            i64::from(s.attempts > 0) + i64::from(s.compensation_attempts > 0)
        };
        assert_eq!(
            saga.steps.iter().map(phases).sum::<i64>(),
            e.commands,
            "step phases run by {}: {saga:#?}",
            e.order
        );
        let deliveries = saga
            .steps
            .iter()
            .map(|s| i64::from(s.attempts + s.compensation_attempts))
            .sum();
        placed.push(Placed { id, deliveries });
    }
    placed
}

/// Every participant publishes every reply twice: each duplicate is
/// ignored by the orchestrator and no ledger moves twice.
#[tokio::test]
async fn duplicated_replies_are_ignored_and_every_effect_applies_once() {
    let env = TestEnv::new();
    let shop = Shop::open(
        &env,
        FaultConfig {
            duplicate_reply_rate: 1.0,
            ..FaultConfig::default()
        },
    )
    .await;
    const ORDERS: [&str; 4] = ["o-dup-1", "o-dup-2", "o-dup-3", "o-dup-4"];
    let expected = four_outcomes(&ORDERS);
    let placed = place_four(&shop.app, &expected).await;

    for (saga, e) in placed.iter().zip(&expected) {
        // Two replies per delivery; one per step phase is taken.
        let ignored = 2 * saga.deliveries - e.commands;
        saga_tests::eventually(
            &format!("{ignored} ignored replies of {}", e.order),
            Duration::from_secs(15),
            || async {
                (history_count(&shop.app, &saga.id, "reply_ignored").await == ignored).then_some(())
            },
        )
        .await;
    }
    assert_four_outcomes(&shop.db, &ORDERS).await;
    for (saga, e) in placed.iter().zip(&expected) {
        assert_eq!(shop.app.get(&saga.id).await.state, e.state as i32);
    }
    shop.close().await;
}

/// A queue of the test's own bound to `<ns>.commands` next to the demo
/// participants' queues, so it receives a copy of every command the
/// orchestrator sends them.
struct CommandTap {
    /// The tap's queue (exclusive: gone with the connection).
    queue: String,
    /// Publishes copies, with confirms.
    publisher: lapin::Channel,
    /// Reads the queue.
    channel: lapin::Channel,
    /// Owns both channels.
    connection: lapin::Connection,
}

/// Header marking a copy the test published, so the tap never copies a copy.
const COPY_HEADER: &str = "x-e2e-copy";

impl CommandTap {
    /// Binds the tap; call after the orchestrator declared `<ns>.commands`.
    async fn bind(env: &TestEnv) -> Self {
        use lapin::options::{ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions};
        let topology = env.topology();
        let connection = lapin::Connection::connect(AMQP_URL, Default::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        let queue = format!("{}.tap", env.namespace);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        for participant in ["inventory", "payment", "orders"] {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    topology.commands_exchange().into(),
                    participant.into(),
                    QueueBindOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await
                .unwrap();
        }
        let publisher = connection.create_channel().await.unwrap();
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            queue,
            publisher,
            channel,
            connection,
        }
    }

    /// Every command copied so far (the tap's queue is emptied).
    async fn drain(&self) -> Vec<lapin::message::Delivery> {
        let mut commands = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            if !is_copy(&message.delivery) {
                commands.push(message.delivery);
            }
        }
        commands
    }

    /// Sends `command` again to its participant, as the orchestrator did
    /// (same body and properties, a new message id), and waits for the
    /// broker's confirm.
    async fn redeliver(&self, exchange: &str, command: &lapin::message::Delivery) {
        redeliver(&self.publisher, exchange, command).await;
    }

    async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

fn is_copy(delivery: &lapin::message::Delivery) -> bool {
    delivery
        .properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(COPY_HEADER))
}

async fn redeliver(publisher: &lapin::Channel, exchange: &str, command: &lapin::message::Delivery) {
    let mut headers = command.properties.headers().clone().unwrap_or_default();
    headers.insert(COPY_HEADER.into(), lapin::types::AMQPValue::Boolean(true));
    let properties = command
        .properties
        .clone()
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_headers(headers);
    let confirmation = publisher
        .basic_publish(
            exchange.into(),
            command.routing_key.clone(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &command.data,
            properties,
        )
        .await
        .expect("publish a copy")
        .await
        .expect("confirm of a copy");
    assert_eq!(confirmation, lapin::Confirmation::Ack(None), "copy routed");
}

/// Commands the inbox answered without running a handler, over the three
/// command participants.
fn replayed(participants: &DemoParticipants) -> u64 {
    [Service::Inventory, Service::Payment, Service::Orders]
        .into_iter()
        .map(|s| participants.handle(s).stats().replayed)
        .sum()
}

/// Every command is delivered twice while the sagas run (a copy published
/// the moment the tap sees it, so the two are often handled at once): each
/// key applies once, the second delivery is answered from the inbox and
/// its reply ignored by the orchestrator.
#[tokio::test]
async fn every_command_delivered_twice_while_sagas_run_applies_once() {
    use futures::StreamExt;

    let env = TestEnv::new();
    let shop = Shop::open(&env, FaultConfig::default()).await;
    let tap = CommandTap::bind(&env).await;
    let exchange = env.topology().commands_exchange();
    let mut consumer = tap
        .channel
        .basic_consume(
            tap.queue.as_str().into(),
            "doubler".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let publisher = tap.publisher.clone();
    let doubler = tokio::spawn(async move {
        let mut copied = 0usize;
        while let Some(Ok(delivery)) = consumer.next().await {
            if !is_copy(&delivery) {
                redeliver(&publisher, &exchange, &delivery).await;
                copied += 1;
            }
        }
        copied
    });

    const ORDERS: [&str; 4] = ["o-twice-1", "o-twice-2", "o-twice-3", "o-twice-4"];
    let expected = four_outcomes(&ORDERS);
    let placed = place_four(&shop.app, &expected).await;
    // Each key is applied by its first delivery; every other one replays.
    let deliveries: i64 = placed.iter().map(|p| p.deliveries).sum();
    let keys: i64 = expected.iter().map(|e| e.commands).sum();
    let replays = (2 * deliveries - keys) as u64;
    saga_tests::eventually(
        &format!("{replays} deliveries answered from the inbox"),
        Duration::from_secs(20),
        || async { (replayed(&shop.participants) == replays).then_some(()) },
    )
    .await;
    for (saga, e) in placed.iter().zip(&expected) {
        let ignored = 2 * saga.deliveries - e.commands;
        saga_tests::eventually(
            &format!("{ignored} ignored replies of {}", e.order),
            Duration::from_secs(15),
            || async {
                (history_count(&shop.app, &saga.id, "reply_ignored").await == ignored).then_some(())
            },
        )
        .await;
        assert_eq!(shop.app.get(&saga.id).await.state, e.state as i32);
    }
    assert_four_outcomes(&shop.db, &ORDERS).await;
    tap.close().await;
    assert_eq!(
        doubler.await.unwrap() as i64,
        deliveries,
        "one copy per command"
    );
    shop.close().await;
}

/// After the sagas ended, a copy of every command they caused is delivered
/// twice more: each is answered from the inbox, its reply ignored by the
/// orchestrator, and no ledger moves.
#[tokio::test]
async fn redelivered_commands_are_answered_from_the_inbox_and_change_nothing() {
    let env = TestEnv::new();
    let shop = Shop::open(&env, FaultConfig::default()).await;
    let tap = CommandTap::bind(&env).await;
    let exchange = env.topology().commands_exchange();

    const ORDERS: [&str; 4] = ["o-re-1", "o-re-2", "o-re-3", "o-re-4"];
    let expected = four_outcomes(&ORDERS);
    let placed = place_four(&shop.app, &expected).await;
    let db = &shop.db;
    let before: Vec<OrderLedger> =
        futures::future::join_all(ORDERS.iter().map(|o| db.order(o))).await;
    let replayed_before = replayed(&shop.participants);

    let commands = tap.drain().await;
    let deliveries: i64 = placed.iter().map(|p| p.deliveries).sum();
    assert_eq!(commands.len() as i64, deliveries, "one copy per delivery");
    for command in &commands {
        // Twice in a row: the two copies are handled side by side.
        tap.redeliver(&exchange, command).await;
        tap.redeliver(&exchange, command).await;
    }

    let redelivered = 2 * commands.len() as u64;
    saga_tests::eventually(
        "every redelivered command answered from the inbox",
        Duration::from_secs(20),
        || async { (replayed(&shop.participants) == replayed_before + redelivered).then_some(()) },
    )
    .await;
    for (saga, e) in placed.iter().zip(&expected) {
        // Late replies of retried deliveries, then two per redelivery.
        let ignored = (saga.deliveries - e.commands) + 2 * saga.deliveries;
        saga_tests::eventually(
            &format!("{ignored} ignored replies of {}", e.order),
            Duration::from_secs(15),
            || async {
                (history_count(&shop.app, &saga.id, "reply_ignored").await == ignored).then_some(())
            },
        )
        .await;
        assert_eq!(shop.app.get(&saga.id).await.state, e.state as i32);
    }
    let after: Vec<OrderLedger> =
        futures::future::join_all(ORDERS.iter().map(|o| db.order(o))).await;
    assert_eq!(
        after.into_iter().map(effects).collect::<Vec<_>>(),
        before.into_iter().map(effects).collect::<Vec<_>>()
    );
    assert_four_outcomes(db, &ORDERS).await;
    tap.close().await;
    shop.close().await;
}

/// The whole-ledger checks are not vacuous: each kind of damage the
/// failure-injection suites look for is reported.
#[tokio::test]
async fn ledger_checks_report_effects_applied_twice_or_not_undone() {
    let env = TestEnv::new();
    let shop = Shop::open(&env, FaultConfig::default()).await;
    const ORDERS: [&str; 4] = ["o-bad-1", "o-bad-2", "o-bad-3", "o-bad-4"];
    let expected = four_outcomes(&ORDERS);
    place_four(&shop.app, &expected).await;
    let Shop {
        app,
        participants,
        db,
    } = shop;
    participants.stop().await;
    assert_ledgers_consistent(&db).await;

    let exec = |pool: &sqlx::PgPool, sql: &'static str| {
        let pool = pool.clone();
        async move {
            let rows = sqlx::query(sql)
                .execute(&pool)
                .await
                .unwrap()
                .rows_affected();
            assert_eq!(rows, 1, "{sql}");
        }
    };
    // A charge applied twice: a second movement for the same payment.
    exec(
        db.payment(),
        "INSERT INTO payment_movements (customer_id, saga_id, order_id, kind, amount_cents, reference_id)
         SELECT customer_id, saga_id, order_id, kind, amount_cents, reference_id
         FROM payment_movements WHERE order_id = 'o-bad-1'",
    )
    .await;
    // A release the inbox remembers but the ledger does not show.
    exec(
        db.inventory(),
        "UPDATE inventory_reservations SET status = 'reserved' WHERE order_id = 'o-bad-3'",
    )
    .await;
    // An authorization whose key the inbox remembers as fenced.
    exec(
        db.payment(),
        "UPDATE kit_inbox SET kind = 'barrier', status = 'rejected'
         WHERE idempotency_key = (SELECT action_key FROM payment_authorizations
                                  WHERE order_id = 'o-bad-2')",
    )
    .await;

    let found = |lines: &[String], needle: &str| {
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "{needle:?} not in {lines:#?}"
        );
    };
    let doubles = db.double_effects().await;
    assert_eq!(doubles.len(), 2, "{doubles:#?}");
    found(&doubles, "payment: 2 charge movements for ");
    found(&doubles, "whose inbox outcome is barrier rejected");
    let imbalances = db.imbalances().await;
    assert_eq!(imbalances.len(), 3, "{imbalances:#?}");
    found(
        &imbalances,
        "inventory: sku-52 has 1000000000 available + 2 reserved, expected 1000000000 in all",
    );
    found(&imbalances, "is reserved but its inbox says compensated_by");
    found(
        &imbalances,
        "payment: dup-a has balance 99999400, movements say 99998800",
    );
    app.stop().await;
    db.close().await;
}
