//! `proto/AMQP.md` is enough to write a participant: a `payment` service
//! written against that document alone — plain lapin, serde_json and an
//! in-memory inbox, no participant kit and no shared Rust types — takes the
//! demo payment's place next to the demo inventory, orders and notification
//! services, and order placement runs end to end through it.
//!
//! It follows the document section by section: `Ledger` is "What a
//! participant must guarantee" (inbox, compensation barrier, reply
//! meanings; one lock acquisition stands for one local transaction), and
//! `RawPayment` is "Names", "Properties of every message", "Command" and
//! "Reply" (queue arguments, ack after a confirmed `mandatory` reply,
//! undecodable commands rejected without requeue).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
        BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use participants::demo::Service;
use participants::kit::FaultConfig;
use saga_proto::v1::{SagaState, StepState};
use saga_tests::{
    app::TestApp,
    env::{AMQP_URL, TestEnv},
};
use sagas::Catalog;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::e2e::{DemoParticipants, one_line, step_states};

/// Balance of a customer the raw payment service has not seen yet.
const OPENING_BALANCE: i64 = 10_000;

/// The command envelope ("Command" in AMQP.md). No `deny_unknown_fields`:
/// the document asks participants to ignore fields they do not know.
#[derive(Debug, Clone, Deserialize)]
struct Command {
    saga_id: String,
    step: String,
    phase: String,
    attempt: u64,
    command: String,
    idempotency_key: String,
    #[serde(default)]
    compensates: Option<String>,
    #[serde(default)]
    payload: Value,
}

/// A final answer, as the inbox keeps it (transient errors are never kept).
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    /// `success` or `rejected`.
    status: &'static str,
    /// Result on success.
    data: Value,
    /// Why, on rejection.
    reason: Option<String>,
}

fn success(data: Value) -> Answer {
    Answer {
        status: "success",
        data,
        reason: None,
    }
}

fn rejected(reason: impl Into<String>) -> Answer {
    Answer {
        status: "rejected",
        data: Value::Null,
        reason: Some(reason.into()),
    }
}

/// A charge (v1) or an authorization (v2), keyed by its action's key.
#[derive(Debug, Clone, PartialEq)]
struct Hold {
    /// `payment_id` or `authorization_id` handed to the saga.
    id: String,
    /// Who pays.
    customer: String,
    /// How much.
    amount: i64,
    /// `charged` / `refunded`, or `authorized` / `voided` / `captured`.
    status: &'static str,
}

/// The service's whole state; one lock acquisition is one "local
/// transaction" of AMQP.md (inbox check, business change, inbox write).
#[derive(Debug, Default)]
struct Ledger {
    /// The inbox: idempotency key → first final answer (fences included).
    inbox: HashMap<String, Answer>,
    /// The barrier: action key → the compensation key that undid or fenced it.
    compensated: HashMap<String, String>,
    /// Balance per customer.
    balances: HashMap<String, i64>,
    /// Held (authorized, not captured) per customer.
    held: HashMap<String, i64>,
    /// Charges by action key.
    charges: HashMap<String, Hold>,
    /// Authorizations by action key.
    authorizations: HashMap<String, Hold>,
    /// Every effect applied, in order, e.g. `charge o-1 500`.
    effects: Vec<String>,
    /// Deliveries answered from the inbox.
    replays: usize,
}

fn field<'a>(payload: &'a Value, name: &str) -> Result<&'a Value, Answer> {
    payload
        .get(name)
        .filter(|v| !v.is_null())
        .ok_or_else(|| rejected(format!("payload.{name}: missing")))
}

fn text(payload: &Value, name: &str) -> Result<String, Answer> {
    field(payload, name)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| rejected(format!("payload.{name}: must be a string")))
}

fn cents(payload: &Value, name: &str) -> Result<i64, Answer> {
    field(payload, name)?
        .as_i64()
        .filter(|c| *c >= 0)
        .ok_or_else(|| rejected(format!("payload.{name}: must be a whole number >= 0")))
}

impl Ledger {
    fn available(&self, customer: &str) -> i64 {
        self.balances
            .get(customer)
            .copied()
            .unwrap_or(OPENING_BALANCE)
            - self.held.get(customer).copied().unwrap_or(0)
    }

    fn balance(&mut self, customer: &str) -> &mut i64 {
        self.balances
            .entry(customer.to_owned())
            .or_insert(OPENING_BALANCE)
    }

    /// "What a participant must guarantee", rules 1 to 3.
    fn handle(&mut self, command: &Command) -> Answer {
        if let Some(first) = self.inbox.get(&command.idempotency_key) {
            self.replays += 1;
            return first.clone();
        }
        let answer = match command.phase.as_str() {
            "action" => self.act(command).unwrap_or_else(|rejection| rejection),
            "compensation" => self.compensate(command),
            other => rejected(format!("phase: unknown phase {other:?}")),
        };
        self.inbox
            .insert(command.idempotency_key.clone(), answer.clone());
        answer
    }

    fn act(&mut self, command: &Command) -> Result<Answer, Answer> {
        let p = &command.payload;
        let key = command.idempotency_key.clone();
        match command.command.as_str() {
            "charge" | "authorize" => {
                let order = text(p, "order_id")?;
                let customer = text(p, "customer_id")?;
                let amount = cents(p, "amount_cents")?;
                if amount > self.available(&customer) {
                    return Err(rejected(format!(
                        "insufficient funds: {customer} has {} cents available",
                        self.available(&customer)
                    )));
                }
                let id = Uuid::new_v4().to_string();
                if command.command == "charge" {
                    *self.balance(&customer) -= amount;
                    self.charges.insert(
                        key,
                        Hold {
                            id: id.clone(),
                            customer,
                            amount,
                            status: "charged",
                        },
                    );
                    self.effects.push(format!("charge {order} {amount}"));
                    Ok(success(json!({ "payment_id": id })))
                } else {
                    *self.held.entry(customer.clone()).or_default() += amount;
                    self.authorizations.insert(
                        key,
                        Hold {
                            id: id.clone(),
                            customer,
                            amount,
                            status: "authorized",
                        },
                    );
                    self.effects.push(format!("authorize {order} {amount}"));
                    Ok(success(json!({ "authorization_id": id })))
                }
            }
            "capture" => {
                let order = text(p, "order_id")?;
                let amount = cents(p, "amount_cents")?;
                let authorization = text(p, "authorization_id")?;
                let Some(hold) = self
                    .authorizations
                    .values_mut()
                    .find(|h| h.id == authorization)
                else {
                    return Err(rejected(format!("unknown authorization {authorization}")));
                };
                if hold.status != "authorized" || amount > hold.amount {
                    return Err(rejected(format!(
                        "authorization {authorization} is {} for {} cents",
                        hold.status, hold.amount
                    )));
                }
                hold.status = "captured";
                let (customer, held) = (hold.customer.clone(), hold.amount);
                *self.held.entry(customer.clone()).or_default() -= held;
                *self.balance(&customer) -= amount;
                self.effects.push(format!("capture {order} {amount}"));
                Ok(success(json!({ "payment_id": Uuid::new_v4().to_string() })))
            }
            other => Err(rejected(format!("command: unknown command {other:?}"))),
        }
    }

    /// The compensation barrier (rule 2), keyed by `compensates`.
    fn compensate(&mut self, command: &Command) -> Answer {
        let Some(action_key) = command.compensates.clone() else {
            return rejected("compensates: required for a compensation");
        };
        if self.compensated.contains_key(&action_key) {
            return success(json!({ "noop": "already_compensated" }));
        }
        self.compensated
            .insert(action_key.clone(), command.idempotency_key.clone());
        match self.inbox.get(&action_key) {
            None => {
                // Fence: the action, if it ever arrives, replays this rejection.
                self.inbox.insert(
                    action_key,
                    rejected("refused: compensated before it arrived"),
                );
                return success(json!({ "noop": "action_never_arrived" }));
            }
            Some(answer) if answer.status != "success" => {
                return success(json!({ "noop": "action_rejected" }));
            }
            Some(_) => {}
        }
        // Found by the action's key: the payload's ids may be null.
        match command.command.as_str() {
            "refund" => {
                let hold = self.charges.get_mut(&action_key).expect("charged");
                hold.status = "refunded";
                let (customer, amount) = (hold.customer.clone(), hold.amount);
                *self.balance(&customer) += amount;
                self.effects.push(format!("refund {amount}"));
                success(json!({ "refunded": true }))
            }
            "void" => {
                let hold = self.authorizations.get_mut(&action_key).expect("held");
                if hold.status != "authorized" {
                    self.compensated.remove(&action_key);
                    return rejected(format!("authorization is {}", hold.status));
                }
                hold.status = "voided";
                let (customer, amount) = (hold.customer.clone(), hold.amount);
                *self.held.entry(customer).or_default() -= amount;
                self.effects.push(format!("void {amount}"));
                success(json!({ "voided": true }))
            }
            other => {
                self.compensated.remove(&action_key);
                rejected(format!("command: unknown compensation {other:?}"))
            }
        }
    }
}

/// Deliberate misbehaviour, to prove the contract's recovery paths.
#[derive(Debug, Clone, Default)]
struct Quirks {
    /// Commit the answer to the first delivery of this command but never
    /// reply (a reply lost in transit); the orchestrator's retry must get
    /// the stored answer back with its own `attempt`.
    lose_first_reply_of: Option<&'static str>,
}

// ------------------------------- RawPayment -------------------------------

/// The raw payment participant.
struct RawPayment {
    /// Business state and inbox.
    ledger: Arc<Mutex<Ledger>>,
    /// Stops the consumer.
    shutdown: CancellationToken,
    /// The consumer task.
    task: tokio::task::JoinHandle<()>,
    /// Kept open while it runs.
    connection: Connection,
}

/// `x-queue-type`, `x-dead-letter-exchange`, `x-delivery-limit`, exactly as
/// "Queue arguments" lists them (long strings and a 64-bit integer).
fn work_queue_arguments(namespace: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(format!("{namespace}.dead-letter").into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(5));
    args
}

async fn declare(channel: &Channel, namespace: &str) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            format!("{namespace}.commands").as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            format!("{namespace}.dead-letter").as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    let mut quorum_only = FieldTable::default();
    quorum_only.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let dead_letters = format!("{namespace}.dead-letters");
    channel
        .queue_declare(dead_letters.as_str().into(), durable_queue, quorum_only)
        .await?;
    channel
        .queue_bind(
            dead_letters.as_str().into(),
            format!("{namespace}.dead-letter").as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let queue = format!("{namespace}.participant.payment");
    channel
        .queue_declare(
            queue.as_str().into(),
            durable_queue,
            work_queue_arguments(namespace),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            format!("{namespace}.commands").as_str().into(),
            "payment".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

impl RawPayment {
    async fn start(env: &TestEnv, quirks: Quirks) -> Self {
        let namespace = env.namespace.clone();
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        declare(&channel, &namespace)
            .await
            .expect("declare topology");
        channel
            .basic_qos(8, BasicQosOptions::default())
            .await
            .expect("qos");
        // Replies are published with confirms on a channel of their own.
        let publisher = connection.create_channel().await.expect("channel");
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let consumer = channel
            .basic_consume(
                format!("{namespace}.participant.payment").as_str().into(),
                "raw-payment".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consume(
            consumer,
            publisher,
            ledger.clone(),
            quirks,
            shutdown.clone(),
        ));
        Self {
            ledger,
            shutdown,
            task,
            connection,
        }
    }

    fn ledger<T>(&self, read: impl FnOnce(&Ledger) -> T) -> T {
        read(&self.ledger.lock().unwrap())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("consumer task");
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

async fn consume(
    mut consumer: lapin::Consumer,
    publisher: Channel,
    ledger: Arc<Mutex<Ledger>>,
    quirks: Quirks,
    shutdown: CancellationToken,
) {
    let mut lost = false;
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => return,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                _ => return,
            },
        };
        // Rule 4: a command that cannot be decoded is rejected, not requeued.
        let Ok(command) = serde_json::from_slice::<Command>(&delivery.data) else {
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            continue;
        };
        let answer = ledger.lock().unwrap().handle(&command);
        if quirks.lose_first_reply_of == Some(command.command.as_str()) && !lost {
            lost = true;
            let _ = delivery.ack(BasicAckOptions::default()).await;
            continue;
        }
        // Rule 4: ack only once the reply is confirmed; if it could not be
        // published, the command comes back and is answered from the inbox.
        if reply(&publisher, &delivery, &command, &answer).await {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        } else {
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
    }
}

/// Publishes the reply ("Reply" in AMQP.md): default exchange, routing key
/// = the command's `reply_to`, `mandatory`, persistent, with the envelope
/// fields copied from *this* delivery of the command (its own `attempt`).
async fn reply(
    publisher: &Channel,
    delivery: &Delivery,
    command: &Command,
    answer: &Answer,
) -> bool {
    let Some(reply_to) = delivery.properties.reply_to().clone() else {
        return false;
    };
    let mut body = json!({
        "saga_id": command.saga_id,
        "step": command.step,
        "phase": command.phase,
        "attempt": command.attempt,
        "idempotency_key": command.idempotency_key,
        "status": answer.status,
        "data": answer.data,
    });
    if let Some(reason) = &answer.reason {
        body["reason"] = json!(reason);
    }
    let saga = command.saga_id.replace('-', "");
    let message_id = Uuid::new_v4();
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(
            format!("00-{saga}-{}-01", &message_id.simple().to_string()[..16]).into(),
        ),
    );
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.to_string().into())
        .with_correlation_id(command.saga_id.as_str().into())
        .with_type("saga.reply".into())
        .with_headers(headers);
    let confirm = publisher
        .basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &serde_json::to_vec(&body).expect("reply encodes"),
            properties,
        )
        .await;
    match confirm {
        Ok(pending) => matches!(pending.await, Ok(Confirmation::Ack(None))),
        Err(_) => false,
    }
}

// ------------------------------- the tests --------------------------------

/// The demo services other than payment, and pools on their ledgers.
struct Neighbours {
    /// Inventory, orders and notification.
    participants: DemoParticipants,
    /// `<ns>_inventory`.
    inventory: PgPool,
    /// `<ns>_orders`.
    orders: PgPool,
    /// `<ns>_notification`.
    notification: PgPool,
}

impl Neighbours {
    async fn start(env: &TestEnv) -> Self {
        let participants = DemoParticipants::start_services(
            env,
            &[Service::Inventory, Service::Orders, Service::Notification],
            FaultConfig::default(),
        )
        .await;
        let pool = |name: &str| {
            let url = env.database_url(name);
            async move {
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .expect("demo database")
            }
        };
        Self {
            participants,
            inventory: pool("inventory").await,
            orders: pool("orders").await,
            notification: pool("notification").await,
        }
    }

    async fn stock(&self, sku: &str) -> i64 {
        sqlx::query_scalar("SELECT available FROM inventory_stock WHERE sku = $1")
            .bind(sku)
            .fetch_one(&self.inventory)
            .await
            .unwrap()
    }

    /// Statuses of the order's reservations.
    async fn reservations(&self, order_id: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT status FROM inventory_reservations WHERE order_id = $1")
            .bind(order_id)
            .fetch_all(&self.inventory)
            .await
            .unwrap()
    }

    async fn confirmed(&self, order_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&self.orders)
            .await
            .unwrap()
    }

    /// Waits until the notification service recorded `state` for the order.
    async fn wait_for_notification(&self, order_id: &str, state: &str) {
        saga_tests::eventually(
            &format!("a {state} notification for {order_id}"),
            saga_tests::app::WAIT,
            || async {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM notifications WHERE order_id = $1 AND state = $2",
                )
                .bind(order_id)
                .bind(state)
                .fetch_one(&self.notification)
                .await
                .unwrap();
                (n == 1).then_some(())
            },
        )
        .await;
    }

    async fn stop(self) {
        self.participants.stop().await;
        self.inventory.close().await;
        self.orders.close().await;
        self.notification.close().await;
    }
}

const SEEDED_STOCK: i64 = saga_tests::ledgers::SEEDED_STOCK;

#[tokio::test]
async fn a_participant_written_from_the_amqp_document_completes_v1_and_v2_orders() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, Catalog::standard()).await;
    let neighbours = Neighbours::start(&env).await;
    let payment = RawPayment::start(&env, Quirks::default()).await;

    let v1 = app
        .start(
            "order_placement",
            1,
            one_line("o-raw-1", "gina", "sku-8", 2, 1_500),
        )
        .await;
    let saga = app.wait_for_state(&v1, SagaState::Completed).await;
    let data: Value = serde_json::from_str(&saga.data_json).unwrap();
    let charge = payment.ledger(|l| l.charges.values().next().cloned().expect("one charge"));
    assert_eq!(data["payment_id"], charge.id);

    let v2 = app
        .start(
            "order_placement",
            2,
            one_line("o-raw-2", "gina", "sku-9", 1, 2_500),
        )
        .await;
    let saga = app.wait_for_state(&v2, SagaState::Completed).await;
    assert!(
        saga.steps
            .iter()
            .all(|s| s.state == StepState::Succeeded as i32)
    );

    payment.ledger(|l| {
        assert_eq!(
            l.effects,
            [
                "charge o-raw-1 3000",
                "authorize o-raw-2 2500",
                "capture o-raw-2 2500"
            ]
        );
        assert_eq!(l.balances["gina"], OPENING_BALANCE - 5_500);
        assert_eq!(l.held["gina"], 0);
    });
    assert_eq!(neighbours.stock("sku-8").await, SEEDED_STOCK - 2);
    assert_eq!(neighbours.stock("sku-9").await, SEEDED_STOCK - 1);
    assert_eq!(neighbours.confirmed("o-raw-1").await, 1);
    assert_eq!(neighbours.confirmed("o-raw-2").await, 1);
    neighbours
        .wait_for_notification("o-raw-1", "completed")
        .await;
    neighbours
        .wait_for_notification("o-raw-2", "completed")
        .await;

    payment.stop().await;
    neighbours.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_raw_participant_rejects_and_compensates_per_the_amqp_document() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, Catalog::standard()).await;
    let neighbours = Neighbours::start(&env).await;
    let payment = RawPayment::start(&env, Quirks::default()).await;

    // v1, more than the raw service's opening balance: its rejection makes
    // the demo inventory release the reservation.
    let broke = app
        .start(
            "order_placement",
            1,
            one_line("o-raw-3", "hank", "sku-10", 1, 10_001),
        )
        .await;
    let saga = app.wait_for_state(&broke, SagaState::Compensated).await;
    assert!(saga.error.contains("insufficient funds"), "{}", saga.error);
    assert_eq!(neighbours.reservations("o-raw-3").await, ["released"]);
    assert_eq!(neighbours.stock("sku-10").await, SEEDED_STOCK);

    // v2, more than the stock: the raw service's authorization (the
    // parallel branch) is voided through `compensates`.
    let short = app
        .start(
            "order_placement",
            2,
            one_line("o-raw-4", "hank", "sku-11", SEEDED_STOCK as u64 + 1, 0),
        )
        .await;
    let saga = app.wait_for_state(&short, SagaState::Compensated).await;
    assert_eq!(
        step_states(&saga)[..2],
        [
            ("reserve_inventory".to_owned(), StepState::Failed),
            ("authorize_payment".to_owned(), StepState::Compensated),
        ]
    );
    payment.ledger(|l| {
        assert_eq!(l.effects, ["authorize o-raw-4 0", "void 0"]);
        assert_eq!(l.authorizations.values().next().unwrap().status, "voided");
        assert_eq!(l.balances.get("hank"), None, "never charged");
        assert_eq!(l.held["hank"], 0);
        assert_eq!(l.compensated.len(), 1);
        let rejected = l.inbox.values().filter(|a| a.status == "rejected").count();
        assert_eq!(rejected, 1, "the charge above the balance");
    });
    assert_eq!(neighbours.confirmed("o-raw-3").await, 0);
    assert_eq!(neighbours.confirmed("o-raw-4").await, 0);
    neighbours
        .wait_for_notification("o-raw-4", "compensated")
        .await;

    payment.stop().await;
    neighbours.stop().await;
    app.stop().await;
}

/// The reply to the first delivery of `charge` is lost after the answer was
/// stored; the orchestrator's retry (same key, attempt 2) is answered from
/// the inbox with attempt 2, and the charge applies once.
#[tokio::test]
async fn a_lost_reply_is_recovered_from_the_raw_inbox_by_the_retry() {
    let env = TestEnv::new();
    let app = TestApp::spawn(&env, Catalog::standard()).await;
    let neighbours = Neighbours::start(&env).await;
    let payment = RawPayment::start(
        &env,
        Quirks {
            lose_first_reply_of: Some("charge"),
        },
    )
    .await;

    let id = app
        .start(
            "order_placement",
            1,
            one_line("o-raw-5", "ivy", "sku-12", 1, 700),
        )
        .await;
    let saga = app
        .wait_for_state_within(&id, SagaState::Completed, Duration::from_secs(45))
        .await;

    let charge = saga
        .steps
        .iter()
        .find(|s| s.name == "charge_payment")
        .unwrap();
    assert_eq!(charge.attempts, 2, "the first reply was lost");
    payment.ledger(|l| {
        assert_eq!(l.effects, ["charge o-raw-5 700"]);
        assert_eq!(l.replays, 1);
        assert_eq!(l.balances["ivy"], OPENING_BALANCE - 700);
    });
    assert_eq!(neighbours.stock("sku-12").await, SEEDED_STOCK - 1);
    assert_eq!(neighbours.confirmed("o-raw-5").await, 1);

    payment.stop().await;
    neighbours.stop().await;
    app.stop().await;
}
