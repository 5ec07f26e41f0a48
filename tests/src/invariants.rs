//! The invariant checker: after a run, whatever broke during it, the
//! system must be consistent. [`check`] is the one function every
//! failure-injection test and the chaos soak end with; it reads the
//! orchestrator's database, every demo participant's ledgers (through
//! [`DemoDatabases`]) and the broker, and lists every violation:
//!
//! 1. **Every saga is terminal**: COMPLETED or COMPENSATED, or FAILED only
//!    where the run meant it ([`Expectations::allowed_failed`]).
//! 2. **Ledgers agree with the outcome**, per order: completed → stock
//!    reserved, money taken (v1: one charge; v2: one authorization
//!    captured) and the order confirmed, once each; compensated → net zero
//!    everywhere (reservation released or never made, nothing charged or
//!    held, nothing confirmed, no capture).
//! 3. **No effect recorded twice** and every ledger adds up
//!    ([`DemoDatabases::double_effects`], [`DemoDatabases::imbalances`]),
//!    no business row for an order no saga placed, and no saga driven
//!    twice at once (a command of one step, phase and attempt sent twice;
//!    two terminal entries; history numbered without gaps).
//! 4. **Every lifecycle event arrived**: the notification service recorded
//!    each saga's terminal state.
//! 5. **Outboxes are empty** (orchestrator and every participant).
//! 6. **No message is left** in any work queue, ready or unacknowledged
//!    (consumers must be stopped first, so unacknowledged messages are back
//!    in their queue and counted), and the dead-letter queue holds exactly
//!    the poison the run injected — never a valid command, reply or event.
//! 7. **Something completed**: a run in which no saga completed fails, so a
//!    fault that breaks everything cannot pass.
//!
//! [`wait_settled`] waits (bounded) until the running system has nothing
//! left in flight, which is when the processes should be stopped and
//! [`check`] run.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    time::{Duration, Instant},
};

use lapin::{
    Connection,
    options::{BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
};
use saga_proto::amqp::{CommandMessage, LifecycleEvent, ReplyMessage};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    env::TestEnv,
    ledgers::{DemoDatabases, OrderLedger},
};

/// What the run meant to happen, beyond the invariants that always hold.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// Sagas the run drove to FAILED on purpose (and left there).
    pub allowed_failed: HashSet<Uuid>,
    /// Poison messages the run injected, each of which must be in the
    /// dead-letter queue exactly once; `None` skips counting them (valid
    /// messages there are violations either way).
    pub poison_dead_letters: Option<u64>,
    /// Fewest sagas that must have completed (at least 1).
    pub min_completed: usize,
}

impl Default for Expectations {
    /// No FAILED saga, no poison, at least one completion.
    fn default() -> Self {
        Self {
            allowed_failed: HashSet::new(),
            poison_dead_letters: Some(0),
            min_completed: 1,
        }
    }
}

/// What [`check`] found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Sagas in the orchestrator's database.
    pub sagas: usize,
    /// Of which COMPLETED.
    pub completed: usize,
    /// Of which COMPENSATED.
    pub compensated: usize,
    /// Of which FAILED.
    pub failed: usize,
    /// Of which still RUNNING or COMPENSATING.
    pub active: usize,
    /// Poison messages found in the dead-letter queue.
    pub poison_dead_letters: u64,
    /// Everything that is wrong; empty when the run was consistent.
    pub violations: Vec<String>,
}

impl Report {
    /// Panics with every violation (and the counts) unless there is none.
    pub fn assert_ok(&self) {
        assert!(
            self.violations.is_empty(),
            "{} invariant violation(s):\n  - {}\n{self}",
            self.violations.len(),
            self.violations.join("\n  - ")
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sagas: {} completed, {} compensated, {} failed, {} active; {} poison dead letters; {} violations",
            self.sagas,
            self.completed,
            self.compensated,
            self.failed,
            self.active,
            self.poison_dead_letters,
            self.violations.len()
        )
    }
}

/// One saga as the checker needs it.
#[derive(Debug)]
struct SagaRow {
    id: Uuid,
    version: i32,
    status: String,
    input: String,
}

/// The parts of an order_placement input the ledgers are checked against.
#[derive(Debug, Deserialize)]
struct OrderInput {
    order_id: String,
    items: Vec<OrderItem>,
}

#[derive(Debug, Deserialize)]
struct OrderItem {
    quantity: u32,
    unit_price_cents: u64,
}

impl OrderInput {
    fn units(&self) -> i64 {
        self.items.iter().map(|i| i64::from(i.quantity)).sum()
    }

    fn total_cents(&self) -> i64 {
        self.items
            .iter()
            .map(|i| i64::from(i.quantity) * i.unit_price_cents as i64)
            .sum()
    }
}

/// The orchestrator database of `env`.
pub async fn orchestrator_pool(env: &TestEnv) -> Result<PgPool, sqlx::Error> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.database_url("orch"))
        .await
}

/// Checks every invariant of the module documentation over `env` and
/// returns what it found (see [`Report::assert_ok`]). Run it once nothing
/// is in flight any more and every service process is stopped.
pub async fn check(env: &TestEnv, expectations: &Expectations) -> Report {
    let mut report = Report::default();
    let orchestrator = match orchestrator_pool(env).await {
        Ok(pool) => pool,
        Err(e) => {
            report
                .violations
                .push(format!("cannot read the orchestrator database: {e}"));
            return report;
        }
    };
    let demo = DemoDatabases::connect(env).await;
    check_sagas(&orchestrator, &demo, expectations, &mut report).await;
    check_history(&orchestrator, &mut report).await;
    report.violations.extend(
        demo.double_effects()
            .await
            .into_iter()
            .map(|v| format!("double effect: {v}")),
    );
    report.violations.extend(
        demo.imbalances()
            .await
            .into_iter()
            .map(|v| format!("ledger imbalance: {v}")),
    );
    check_outboxes(&orchestrator, &demo, &mut report).await;
    check_broker(env, expectations, &mut report).await;
    if report.completed < expectations.min_completed.max(1) {
        report.violations.push(format!(
            "only {} saga(s) completed, at least {} expected: a run in which nothing completes proves nothing",
            report.completed,
            expectations.min_completed.max(1)
        ));
    }
    orchestrator.close().await;
    demo.close().await;
    report
}

async fn check_sagas(
    orchestrator: &PgPool,
    demo: &DemoDatabases,
    expectations: &Expectations,
    report: &mut Report,
) {
    let rows: Vec<(Uuid, String, i32, String, String)> = match sqlx::query_as(
        "SELECT id, saga_type, version, status, input FROM sagas ORDER BY created_at, id",
    )
    .fetch_all(orchestrator)
    .await
    {
        Ok(rows) => rows,
        Err(e) => {
            report.violations.push(format!("cannot read sagas: {e}"));
            return;
        }
    };
    let mut sagas = Vec::new();
    for (id, saga_type, version, status, input) in rows {
        if saga_type != "order_placement" {
            report.violations.push(format!(
                "saga {id} is a {saga_type}: the checker knows order_placement only"
            ));
            continue;
        }
        sagas.push(SagaRow {
            id,
            version,
            status,
            input,
        });
    }
    report.sagas = sagas.len();
    let ledgers = all_order_ledgers(demo).await;
    let confirmations: HashMap<String, Uuid> =
        sqlx::query_as::<_, (String, Uuid)>("SELECT order_id, saga_id FROM orders")
            .fetch_all(demo.orders())
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
    let mut placed: HashMap<String, usize> = HashMap::new();
    for saga in &sagas {
        let Ok(input) = serde_json::from_str::<OrderInput>(&saga.input) else {
            report.violations.push(format!(
                "saga {} has an input that is not an order: {}",
                saga.id, saga.input
            ));
            continue;
        };
        *placed.entry(input.order_id.clone()).or_default() += 1;
        let empty = OrderLedger::default();
        let ledger = ledgers.get(&input.order_id).unwrap_or(&empty);
        let what = format!(
            "saga {} (v{}, order {}, {})",
            saga.id, saga.version, input.order_id, saga.status
        );
        let mut wrong = Vec::new();
        match saga.status.as_str() {
            "completed" => {
                report.completed += 1;
                if ledger.reservation_rows != 1 || ledger.reserved_units_net != input.units() {
                    wrong.push(format!(
                        "{} reservation row(s) holding {} units, expected 1 holding {}",
                        ledger.reservation_rows,
                        ledger.reserved_units_net,
                        input.units()
                    ));
                }
                let kinds: Vec<&str> = ledger.movement_kinds.iter().map(String::as_str).collect();
                let expected_kinds: &[&str] = if saga.version == 1 {
                    &["charge"]
                } else {
                    &["authorize", "capture"]
                };
                if kinds != expected_kinds || ledger.charged_cents_net != input.total_cents() {
                    wrong.push(format!(
                        "payment movements {kinds:?} taking {} cents, expected {expected_kinds:?} taking {}",
                        ledger.charged_cents_net,
                        input.total_cents()
                    ));
                }
                if ledger.authorized_open_cents != 0 {
                    wrong.push(format!("{} cents still held", ledger.authorized_open_cents));
                }
                match confirmations.get(&input.order_id) {
                    Some(by) if *by == saga.id => {}
                    Some(by) => wrong.push(format!("order confirmed by saga {by}")),
                    None => wrong.push("order not confirmed".into()),
                }
            }
            "compensated" => {
                report.compensated += 1;
                if ledger.reserved_units_net != 0 || ledger.reservation_rows > 1 {
                    wrong.push(format!(
                        "{} reservation row(s) still holding {} units, expected none held",
                        ledger.reservation_rows, ledger.reserved_units_net
                    ));
                }
                let kinds: Vec<&str> = ledger.movement_kinds.iter().map(String::as_str).collect();
                let allowed: &[&[&str]] = if saga.version == 1 {
                    &[&[], &["charge", "refund"]]
                } else {
                    &[&[], &["authorize", "void"]]
                };
                if !allowed.contains(&kinds.as_slice()) || ledger.charged_cents_net != 0 {
                    wrong.push(format!(
                        "payment movements {kinds:?} taking {} cents, expected none or undone",
                        ledger.charged_cents_net
                    ));
                }
                if ledger.authorized_open_cents != 0 {
                    wrong.push(format!("{} cents still held", ledger.authorized_open_cents));
                }
                if ledger.confirmed != 0 {
                    wrong.push("order confirmed".into());
                }
            }
            "failed" => {
                report.failed += 1;
                if !expectations.allowed_failed.contains(&saga.id) {
                    wrong.push("FAILED, which this run did not mean".into());
                }
            }
            _ => {
                report.active += 1;
                wrong.push("not terminal".into());
            }
        }
        if matches!(saga.status.as_str(), "completed" | "compensated" | "failed")
            && !ledger.notifications.iter().any(|s| s == &saga.status)
        {
            wrong.push(format!(
                "no {:?} notification (recorded: {:?})",
                saga.status, ledger.notifications
            ));
        }
        if !wrong.is_empty() {
            report
                .violations
                .push(format!("{what}: {}", wrong.join("; ")));
        }
    }
    for (order_id, count) in &placed {
        if *count > 1 {
            report.violations.push(format!(
                "order {order_id} was placed by {count} sagas: the checker needs one saga per order id"
            ));
        }
    }
    for order_id in ledgers.keys() {
        if !placed.contains_key(order_id) {
            report.violations.push(format!(
                "the ledgers hold effects for order {order_id}, which no saga placed"
            ));
        }
    }
}

/// Every order's ledger in a few grouped queries (what
/// [`DemoDatabases::order`] reads for one order).
async fn all_order_ledgers(demo: &DemoDatabases) -> BTreeMap<String, OrderLedger> {
    let mut ledgers: BTreeMap<String, OrderLedger> = BTreeMap::new();
    let reservations: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT r.order_id, count(DISTINCT r.reservation_id),
                coalesce(sum(i.quantity) FILTER (WHERE r.status = 'reserved'), 0)::bigint
         FROM inventory_reservations r
         LEFT JOIN inventory_reservation_items i USING (reservation_id)
         GROUP BY r.order_id",
    )
    .fetch_all(demo.inventory())
    .await
    .expect("read reservations");
    for (order_id, rows, units) in reservations {
        let ledger = ledgers.entry(order_id).or_default();
        ledger.reservation_rows = rows;
        ledger.reserved_units_net = units;
    }
    let movements: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT order_id, kind, amount_cents FROM payment_movements ORDER BY id")
            .fetch_all(demo.payment())
            .await
            .expect("read payment movements");
    for (order_id, kind, amount) in movements {
        let ledger = ledgers.entry(order_id).or_default();
        ledger.charged_cents_net += match kind.as_str() {
            "charge" | "capture" => amount,
            "refund" => -amount,
            _ => 0,
        };
        ledger.payment_movements += 1;
        ledger.movement_kinds.push(kind);
    }
    let open: Vec<(String, i64)> = sqlx::query_as(
        "SELECT order_id, sum(amount_cents)::bigint FROM payment_authorizations
         WHERE status = 'authorized' GROUP BY order_id",
    )
    .fetch_all(demo.payment())
    .await
    .expect("read authorizations");
    for (order_id, cents) in open {
        ledgers.entry(order_id).or_default().authorized_open_cents = cents;
    }
    let confirmed: Vec<(String,)> = sqlx::query_as("SELECT order_id FROM orders")
        .fetch_all(demo.orders())
        .await
        .expect("read orders");
    for (order_id,) in confirmed {
        ledgers.entry(order_id).or_default().confirmed += 1;
    }
    // Notifications alone are not effects: attach them to known orders only.
    let notifications: Vec<(Option<String>, String)> =
        sqlx::query_as("SELECT order_id, state FROM notifications ORDER BY id")
            .fetch_all(demo.notification())
            .await
            .expect("read notifications");
    let mut by_order: HashMap<String, Vec<String>> = HashMap::new();
    for (order_id, state) in notifications {
        if let Some(order_id) = order_id {
            by_order.entry(order_id).or_default().push(state);
        }
    }
    // Orders with notifications but no effect at all (rejected at once, or
    // compensated before anything applied) still need theirs.
    for (order_id, states) in by_order {
        ledgers.entry(order_id).or_default().notifications = states;
    }
    ledgers.retain(|_, l| *l != OrderLedger::default());
    ledgers
}

/// (seq, kind, step, detail) of one history row.
type HistoryEntry = (i64, String, Option<String>, String);

async fn check_history(orchestrator: &PgPool, report: &mut Report) {
    let rows: Vec<(Uuid, i64, String, Option<String>, String)> = match sqlx::query_as(
        "SELECT saga_id, seq, kind, step, detail FROM saga_history ORDER BY saga_id, seq",
    )
    .fetch_all(orchestrator)
    .await
    {
        Ok(rows) => rows,
        Err(e) => {
            report.violations.push(format!("cannot read history: {e}"));
            return;
        }
    };
    let statuses: HashMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT id, status FROM sagas")
            .fetch_all(orchestrator)
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
    let mut per_saga: BTreeMap<Uuid, Vec<HistoryEntry>> = BTreeMap::new();
    for (saga_id, seq, kind, step, detail) in rows {
        per_saga
            .entry(saga_id)
            .or_default()
            .push((seq, kind, step, detail));
    }
    for (saga_id, entries) in per_saga {
        let mut wrong = Vec::new();
        if entries
            .iter()
            .enumerate()
            .any(|(i, (seq, ..))| *seq != i as i64 + 1)
        {
            wrong.push("history is not numbered 1, 2, 3 ... without gaps".to_owned());
        }
        let count = |kind: &str| entries.iter().filter(|e| e.1 == kind).count();
        if count("saga_started") != 1 {
            wrong.push(format!("{} saga_started entries", count("saga_started")));
        }
        for terminal in ["saga_completed", "saga_compensated"] {
            if count(terminal) > 1 {
                wrong.push(format!("{} {terminal} entries", count(terminal)));
            }
        }
        if count("saga_completed") + count("saga_compensated") > 1 {
            wrong.push("both completed and compensated".into());
        }
        let mut sent = HashSet::new();
        for (_, kind, step, detail) in &entries {
            if kind == "command_sent" && !sent.insert((step.clone(), detail.clone())) {
                wrong.push(format!(
                    "command {detail} of step {} sent twice: driven twice at once",
                    step.as_deref().unwrap_or("?")
                ));
            }
        }
        let last_terminal = entries
            .iter()
            .rev()
            .find_map(|(_, kind, ..)| match kind.as_str() {
                "saga_completed" => Some("completed"),
                "saga_compensated" => Some("compensated"),
                "saga_failed" => Some("failed"),
                _ => None,
            });
        if let (Some(last), Some(status)) = (last_terminal, statuses.get(&saga_id))
            && last != status
            && matches!(status.as_str(), "completed" | "compensated" | "failed")
        {
            wrong.push(format!("history ends {last} but the saga is {status}"));
        }
        if !wrong.is_empty() {
            report
                .violations
                .push(format!("saga {saga_id} history: {}", wrong.join("; ")));
        }
    }
}

async fn check_outboxes(orchestrator: &PgPool, demo: &DemoDatabases, report: &mut Report) {
    let left: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(orchestrator)
        .await;
    match left {
        Ok(0) => {}
        Ok(n) => report
            .violations
            .push(format!("{n} message(s) left in the orchestrator's outbox")),
        Err(e) => report
            .violations
            .push(format!("cannot read the orchestrator's outbox: {e}")),
    }
    for (name, pool) in [
        ("inventory", demo.inventory()),
        ("payment", demo.payment()),
        ("orders", demo.orders()),
        ("notification", demo.notification()),
    ] {
        let left: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM kit_outbox")
            .fetch_one(pool)
            .await;
        match left {
            Ok(0) => {}
            Ok(n) => report
                .violations
                .push(format!("{n} repl(ies) left in {name}'s outbox")),
            Err(e) => report
                .violations
                .push(format!("cannot read {name}'s outbox: {e}")),
        }
    }
}

/// The work queues of `env`: replies, each command participant's, the
/// notification subscription.
pub fn work_queues(env: &TestEnv) -> Vec<String> {
    let topology = env.topology();
    let mut queues = vec![topology.reply_queue()];
    for name in ["inventory", "payment", "orders"] {
        queues.push(topology.participant_queue(name));
    }
    queues.push(participants::demo::notification::queue(&topology));
    queues
}

/// Messages in the work queues of `env` (ready ones: with no consumer
/// left, that is all of them).
pub async fn queued_messages(env: &TestEnv) -> u64 {
    let Ok(connection) = env.amqp_connection().await else {
        return 0;
    };
    let mut total = 0;
    for queue in work_queues(env) {
        if let Some((messages, _)) = queue_counts(&connection, &queue).await {
            total += u64::from(messages);
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    total
}

/// (messages, consumers) of `queue`, if it exists.
async fn queue_counts(connection: &Connection, queue: &str) -> Option<(u32, u32)> {
    // A passive declare of a missing queue closes the channel: one per queue.
    let channel = connection.create_channel().await.ok()?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok();
    let _ = channel.close(200, "bye".into()).await;
    declared.map(|q| (q.message_count(), q.consumer_count()))
}

async fn check_broker(env: &TestEnv, expectations: &Expectations, report: &mut Report) {
    let connection = match env.amqp_connection().await {
        Ok(c) => c,
        Err(e) => {
            report
                .violations
                .push(format!("cannot reach RabbitMQ: {e}"));
            return;
        }
    };
    for queue in work_queues(env) {
        match queue_counts(&connection, &queue).await {
            None => {}
            Some((_, consumers)) if consumers > 0 => report.violations.push(format!(
                "{queue} still has {consumers} consumer(s): stop every service before checking, or unacknowledged messages go unseen"
            )),
            Some((0, _)) => {}
            Some((messages, _)) => report.violations.push(format!(
                "{messages} message(s) left in {queue} (ready or unacknowledged before the consumers stopped)"
            )),
        }
    }
    let (poison, valid) = dead_letters(&connection, &env.topology().dead_letter_queue()).await;
    report.poison_dead_letters = poison;
    for description in valid {
        report
            .violations
            .push(format!("a valid message was dead-lettered: {description}"));
    }
    if let Some(expected) = expectations.poison_dead_letters
        && poison != expected
    {
        report.violations.push(format!(
            "{poison} poison message(s) dead-lettered, {expected} injected"
        ));
    }
    let _ = connection.close(200, "bye".into()).await;
}

/// Reads the dead-letter queue without consuming it (nothing is acked; the
/// channel's close puts everything back): (poison count, descriptions of
/// valid messages found there).
async fn dead_letters(connection: &Connection, queue: &str) -> (u64, Vec<String>) {
    let Ok(channel) = connection.create_channel().await else {
        return (
            0,
            vec!["cannot open a channel to read the dead letters".into()],
        );
    };
    let mut poison = 0;
    let mut valid = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await;
        let Ok(Some(message)) = got else { break };
        let body = &message.delivery.data;
        if let Ok(command) = serde_json::from_slice::<CommandMessage>(body) {
            valid.push(format!(
                "command {} {} attempt {} of saga {}",
                command.step, command.command, command.attempt, command.saga_id
            ));
        } else if let Ok(reply) = serde_json::from_slice::<ReplyMessage>(body) {
            valid.push(format!(
                "reply to {} attempt {} of saga {}",
                reply.step, reply.attempt, reply.saga_id
            ));
        } else if let Ok(event) = serde_json::from_slice::<LifecycleEvent>(body) {
            valid.push(format!(
                "lifecycle event {} of saga {}",
                event.state.as_str(),
                event.saga_id
            ));
        } else {
            poison += 1;
        }
    }
    let _ = channel.close(200, "bye".into()).await;
    (poison, valid)
}

/// Unacknowledged messages in `queues`, from `rabbitmqctl` (AMQP cannot
/// tell: a passive declare counts ready messages only). `None` when
/// `rabbitmqctl` is not usable here (then only ready messages are seen).
pub async fn unacknowledged(queues: &[String]) -> Option<u64> {
    let output = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::process::Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages_unacknowledged",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut total = 0;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(count)) = (fields.next(), fields.next()) else {
            continue;
        };
        if queues.iter().any(|q| q == name) {
            total += count.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// What is still in flight, as [`wait_settled`] sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Sagas running or compensating.
    pub active_sagas: i64,
    /// Rows in the orchestrator's outbox.
    pub orchestrator_outbox: i64,
    /// Rows in the participants' outboxes.
    pub participant_outboxes: i64,
    /// Terminal sagas whose terminal notification is not recorded yet.
    pub missing_notifications: i64,
    /// Ready messages in the work queues.
    pub queued_messages: u64,
    /// Messages delivered but not acknowledged yet in the work queues
    /// (when `rabbitmqctl` can tell).
    pub unacknowledged_messages: u64,
}

impl InFlight {
    /// Nothing left.
    pub fn is_settled(&self) -> bool {
        *self == Self::default()
    }
}

async fn in_flight(
    env: &TestEnv,
    orchestrator: &PgPool,
    demo: &DemoDatabases,
    connection: &Connection,
) -> Result<InFlight, sqlx::Error> {
    let active_sagas = sqlx::query_scalar(
        "SELECT count(*) FROM sagas WHERE status IN ('running', 'compensating')",
    )
    .fetch_one(orchestrator)
    .await?;
    let orchestrator_outbox = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(orchestrator)
        .await?;
    let mut participant_outboxes = 0i64;
    for pool in [
        demo.inventory(),
        demo.payment(),
        demo.orders(),
        demo.notification(),
    ] {
        participant_outboxes += sqlx::query_scalar::<_, i64>("SELECT count(*) FROM kit_outbox")
            .fetch_one(pool)
            .await?;
    }
    let terminal: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, status FROM sagas WHERE status IN ('completed', 'compensated', 'failed')",
    )
    .fetch_all(orchestrator)
    .await?;
    let recorded: HashSet<(Uuid, String)> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT saga_id, state FROM notifications")
            .fetch_all(demo.notification())
            .await?
            .into_iter()
            .collect();
    let missing_notifications = terminal.iter().filter(|t| !recorded.contains(*t)).count() as i64;
    let mut queued_messages = 0;
    for queue in work_queues(env) {
        if let Some((messages, _)) = queue_counts(connection, &queue).await {
            queued_messages += u64::from(messages);
        }
    }
    let mut seen = InFlight {
        active_sagas,
        orchestrator_outbox,
        participant_outboxes,
        missing_notifications,
        queued_messages,
        unacknowledged_messages: 0,
    };
    // Only worth the (slow) look once everything else is settled.
    if seen.is_settled() {
        seen.unacknowledged_messages = unacknowledged(&work_queues(env)).await.unwrap_or(0);
    }
    Ok(seen)
}

/// Waits until nothing is in flight (no active saga, empty outboxes, every
/// terminal notification recorded, no message in a work queue, ready or —
/// when `rabbitmqctl` can tell — unacknowledged),
/// polling every 200 ms for at most `within`; returns what was last seen
/// (settled or not) and how long it took.
pub async fn wait_settled(env: &TestEnv, within: Duration) -> (InFlight, Duration) {
    let started = Instant::now();
    let orchestrator = orchestrator_pool(env).await.ok();
    let demo = DemoDatabases::connect(env).await;
    let connection = env.amqp_connection().await.ok();
    let mut last = InFlight {
        active_sagas: -1,
        ..InFlight::default()
    };
    if let (Some(orchestrator), Some(connection)) = (&orchestrator, &connection) {
        loop {
            if let Ok(seen) = in_flight(env, orchestrator, &demo, connection).await {
                last = seen;
                if last.is_settled() {
                    break;
                }
            }
            if started.elapsed() > within {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if let Some(connection) = connection {
        let _ = connection.close(200, "bye".into()).await;
    }
    if let Some(orchestrator) = orchestrator {
        orchestrator.close().await;
    }
    demo.close().await;
    (last, started.elapsed())
}
