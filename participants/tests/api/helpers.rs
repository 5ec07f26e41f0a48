//! A fresh namespace and fresh databases per test, the demo (or custom)
//! participants running in-process, and a test-side AMQP client that sends
//! raw commands and collects replies.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use participants::demo::{self, Demo, DemoConfig, Service};
use participants::kit::{
    FaultConfig, FaultInjector, Participant, ParticipantConfig, ParticipantHandle, PoolSettings,
    topology,
};
use saga_proto::amqp::{
    COMMAND_TYPE, CONTENT_TYPE, CommandMessage, Phase, ReplyMessage, ReplyStatus, Topology,
};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Polls `condition` until it yields `Some`, failing the test after
/// [`DEADLINE`] with `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A reply as received, with its AMQP properties.
#[derive(Debug, Clone)]
pub struct Received {
    pub reply: ReplyMessage,
    pub properties: BasicProperties,
}

/// Replies collected from one queue.
#[derive(Default)]
pub struct ReplyBox {
    received: Mutex<Vec<Received>>,
    arrived: Notify,
}

impl ReplyBox {
    fn push(&self, received: Received) {
        self.received.lock().unwrap().push(received);
        self.arrived.notify_waiters();
    }

    /// Every reply so far matching `pred`.
    pub fn matching(&self, pred: impl Fn(&ReplyMessage) -> bool) -> Vec<Received> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| pred(&r.reply))
            .cloned()
            .collect()
    }

    /// Waits until at least `n` replies match `pred`, returns them all.
    pub async fn wait_for(&self, n: usize, pred: impl Fn(&ReplyMessage) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let arrived = self.arrived.notified();
            let found = self.matching(&pred);
            if found.len() >= n {
                return found;
            }
            let now = tokio::time::Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {n} replies; have {found:?}; all: {:?}",
                self.received.lock().unwrap()
            );
            // Poll too: notify_waiters only wakes waiters already registered.
            tokio::select! {
                () = arrived => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// Consumes `queue` into a [`ReplyBox`] until the connection closes.
pub async fn collect_replies(channel: &Channel, queue: &str) -> Arc<ReplyBox> {
    let replies = Arc::new(ReplyBox::default());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("test-{}", Uuid::new_v4().simple()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume replies");
    let sink = replies.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let reply: ReplyMessage =
                serde_json::from_slice(&delivery.data).expect("replies are ReplyMessages");
            sink.push(Received {
                reply,
                properties: delivery.properties.clone(),
            });
            delivery.ack(BasicAckOptions::default()).await.ok();
        }
    });
    replies
}

/// A command to `participant`, with a fresh saga id and idempotency key.
pub fn command(
    participant: &str,
    name: &str,
    phase: Phase,
    payload: serde_json::Value,
) -> CommandMessage {
    CommandMessage {
        saga_id: Uuid::now_v7(),
        saga_type: "order_placement".into(),
        saga_version: 1,
        step: format!("{participant}_{name}"),
        phase,
        attempt: 1,
        participant: participant.into(),
        command: name.into(),
        idempotency_key: format!("{}:{name}", Uuid::new_v4()),
        compensates: None,
        payload,
    }
}

/// The compensation `name` of `action` (same saga, its own key).
pub fn compensation_of(
    action: &CommandMessage,
    name: &str,
    payload: serde_json::Value,
) -> CommandMessage {
    CommandMessage {
        phase: Phase::Compensation,
        command: name.into(),
        idempotency_key: format!("{}:{name}", Uuid::new_v4()),
        compensates: Some(action.idempotency_key.clone()),
        payload,
        ..action.clone()
    }
}

/// One test's world: namespace, databases, participants, AMQP client.
pub struct TestApp {
    pub topology: Topology,
    pub config: DemoConfig,
    pub demo: Option<Demo>,
    /// Custom kit participants started by the test.
    pub custom: Vec<ParticipantHandle>,
    pub shutdown: CancellationToken,
    pub connection: Connection,
    /// Confirm-mode channel for publishing and declaring.
    pub channel: Channel,
    /// Replies arriving on `<ns>.replies`.
    pub replies: Arc<ReplyBox>,
    /// Databases to drop at the end.
    databases: Vec<String>,
    /// Queues to delete at the end, beyond the standard ones.
    extra_queues: Vec<String>,
    finished: bool,
}

pub fn new_namespace() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..12])
}

impl TestApp {
    /// A namespace and client only; no participant running yet.
    pub async fn empty(faults: FaultConfig) -> Self {
        let namespace = new_namespace();
        let mut config = DemoConfig::from_urls(&amqp_url(), &namespace, &database_url())
            .expect("valid test configuration");
        config.pool = PoolSettings {
            max_connections: 3,
            ..PoolSettings::default()
        };
        config.relay_interval = Duration::from_millis(100);
        config.faults = faults;
        let topology = config.topology.clone();
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        // Declared like the orchestrator does, so argument mismatches with
        // the participants' declarations would show up here.
        channel
            .queue_declare(
                topology.reply_queue().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                topology::work_queue_arguments(&topology, topology::QueueType::Quorum),
            )
            .await
            .expect("declare the reply queue");
        let consumer_channel = connection.create_channel().await.expect("channel");
        let replies = collect_replies(&consumer_channel, &topology.reply_queue()).await;
        Self {
            topology,
            config,
            demo: None,
            custom: Vec::new(),
            shutdown: CancellationToken::new(),
            connection,
            channel,
            replies,
            databases: Vec::new(),
            extra_queues: Vec::new(),
            finished: false,
        }
    }

    /// Demo `services` running and consuming.
    pub async fn spawn(services: &[Service]) -> Self {
        Self::spawn_with(services, FaultConfig::default()).await
    }

    /// Demo `services` running with `faults`.
    pub async fn spawn_with(services: &[Service], faults: FaultConfig) -> Self {
        let mut app = Self::empty(faults).await;
        app.start_demo(services).await;
        app
    }

    /// Starts demo `services` with `self.config` and waits until they
    /// consume (for tests that queue commands first).
    pub async fn start_demo(&mut self, services: &[Service]) {
        for &service in services {
            self.databases.push(self.config.database_name(service));
        }
        let mut running = tokio::time::timeout(
            DEADLINE,
            demo::start(services, self.config.clone(), self.shutdown.clone()),
        )
        .await
        .expect("demo starts in time")
        .expect("demo starts");
        assert!(
            tokio::time::timeout(DEADLINE, running.ready())
                .await
                .expect("demo consumes in time")
        );
        self.demo = Some(running);
    }

    /// Messages waiting in `queue`, not yet pushed to any consumer.
    pub async fn ready_in(&self, queue: &str) -> u32 {
        self.inspect(queue)
            .await
            .expect("the queue exists")
            .message_count()
    }

    /// The broker's view of `queue` (passive declare), `None` if it is
    /// missing. A passive declare of a missing queue closes its channel, so
    /// each look uses a fresh one.
    async fn inspect(&self, queue: &str) -> Option<lapin::Queue> {
        let channel = self.connection.create_channel().await.ok()?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok();
        channel.close(200, "ok".into()).await.ok();
        declared
    }

    /// Connect options of a custom participant's database.
    pub fn database_of(&mut self, name: &str) -> PgConnectOptions {
        let database = format!("{}_{name}", self.topology.namespace());
        if !self.databases.contains(&database) {
            self.databases.push(database.clone());
        }
        self.config.database.clone().database(&database)
    }

    /// Config for a custom participant `name` (its own database).
    pub fn participant_config(&mut self, name: &str, faults: FaultConfig) -> ParticipantConfig {
        let database = self.database_of(name);
        let queue = self.topology.participant_queue(name);
        if !self.extra_queues.contains(&queue) {
            self.extra_queues.push(queue);
        }
        let mut config = ParticipantConfig::new(
            saga_proto::connect::broker::Broker::new(&amqp_url()).unwrap(),
            self.topology.clone(),
            database,
        );
        config.pool = self.config.pool.clone();
        config.relay_interval = self.config.relay_interval;
        config.faults = FaultInjector::new(faults);
        config
    }

    /// Starts a custom participant and waits until it consumes; returns its
    /// index in `custom`.
    pub async fn start_custom(
        &mut self,
        participant: Participant,
        config: ParticipantConfig,
        shutdown: CancellationToken,
    ) -> usize {
        let mut handle = tokio::time::timeout(DEADLINE, participant.start(config, shutdown))
            .await
            .expect("participant starts in time")
            .expect("participant starts");
        assert!(
            tokio::time::timeout(DEADLINE, handle.ready())
                .await
                .expect("participant consumes in time")
        );
        self.custom.push(handle);
        self.custom.len() - 1
    }

    /// The pool of a running demo service.
    pub fn pool(&self, service: Service) -> &PgPool {
        self.demo
            .as_ref()
            .and_then(|d| d.get(service))
            .expect("service is running")
            .pool()
    }

    /// The handle of a running demo service.
    pub fn handle(&self, service: Service) -> &ParticipantHandle {
        self.demo
            .as_ref()
            .and_then(|d| d.get(service))
            .expect("service is running")
    }

    /// Deletes `queue` at the end of the test.
    pub fn forget_queue_later(&mut self, queue: &str) {
        self.extra_queues.push(queue.to_owned());
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirmation = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        match confirmation {
            Confirmation::Ack(None) => {}
            other => panic!("publish to {exchange}/{routing_key} not routed: {other:?}"),
        }
    }

    /// Publishes `command` to the commands exchange, replies to `reply_to`.
    pub async fn send_to(&self, command: &CommandMessage, reply_to: &str) {
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_correlation_id(command.saga_id.to_string().into())
            .with_type(COMMAND_TYPE.into())
            .with_reply_to(reply_to.into());
        let body = serde_json::to_vec(command).unwrap();
        self.publish(
            &self.topology.commands_exchange(),
            &command.participant,
            &body,
            properties,
        )
        .await;
    }

    /// Publishes `command`, replies to `<ns>.replies`.
    pub async fn send(&self, command: &CommandMessage) {
        self.send_to(command, &self.topology.reply_queue()).await;
    }

    /// Publishes raw bytes to participant `participant`'s routing key.
    pub async fn send_raw(&self, participant: &str, body: &[u8]) {
        self.publish(
            &self.topology.commands_exchange(),
            participant,
            body,
            BasicProperties::default().with_reply_to(self.topology.reply_queue().into()),
        )
        .await;
    }

    /// Publishes a lifecycle event body to the events exchange.
    pub async fn publish_event(&self, routing_key: &str, body: &[u8]) {
        self.publish(
            &self.topology.events_exchange(),
            routing_key,
            body,
            BasicProperties::default().with_content_type(CONTENT_TYPE.into()),
        )
        .await;
    }

    /// Sends `command` and waits for the reply to this very attempt.
    pub async fn call(&self, command: &CommandMessage) -> ReplyMessage {
        let before = self.replies_to(command).len();
        self.send(command).await;
        let replies = self
            .replies
            .wait_for(before + 1, |r| {
                r.idempotency_key == command.idempotency_key && r.attempt == command.attempt
            })
            .await;
        replies[before].reply.clone()
    }

    /// Replies received so far for `command`'s key and attempt.
    pub fn replies_to(&self, command: &CommandMessage) -> Vec<Received> {
        self.replies.matching(|r| {
            r.idempotency_key == command.idempotency_key && r.attempt == command.attempt
        })
    }

    /// Waits until `queue` holds a message and takes it.
    pub async fn get_one(&self, queue: &str) -> Vec<u8> {
        eventually(&format!("a message on {queue}"), || async {
            self.channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
                .map(|m| m.delivery.data.clone())
        })
        .await
    }

    /// Waits until `queue` has a consumer (the process is up and consuming).
    pub async fn wait_for_consumer(&self, queue: &str) {
        eventually(&format!("a consumer on {queue}"), || async {
            self.inspect(queue)
                .await
                .filter(|q| q.consumer_count() > 0)
                .map(|_| ())
        })
        .await;
    }

    /// Stops every participant, deletes the namespace's queues and
    /// exchanges, drops the databases.
    pub async fn finish(mut self) {
        self.finished = true;
        self.shutdown.cancel();
        if let Some(demo) = self.demo.take() {
            tokio::time::timeout(DEADLINE, demo.stopped())
                .await
                .expect("demo stops in time");
        }
        for handle in self.custom.drain(..) {
            tokio::time::timeout(DEADLINE, handle.stopped())
                .await
                .expect("participant stops in time");
        }
        cleanup(
            &self.connection,
            &self.topology,
            &self.extra_queues,
            &self.databases,
            &self.config.database,
        )
        .await;
        self.connection.close(200, "done".into()).await.ok();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // A failed test: stop the participants and clean up from another
        // thread, since Drop cannot await.
        self.shutdown.cancel();
        let topology = self.topology.clone();
        let queues = self.extra_queues.clone();
        let databases = self.databases.clone();
        let options = self.config.database.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                // Give the cancelled participants a moment to let go.
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(connection) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                {
                    cleanup(&connection, &topology, &queues, &databases, &options).await;
                }
            });
        })
        .join()
        .ok();
    }
}

/// Every standard queue and exchange of a namespace.
pub fn standard_queues(topology: &Topology) -> Vec<String> {
    let mut queues: Vec<String> = ["inventory", "payment", "orders"]
        .iter()
        .map(|p| topology.participant_queue(p))
        .collect();
    queues.push(demo::notification::queue(topology));
    queues.push(topology.reply_queue());
    queues.push(topology.dead_letter_queue());
    queues
}

pub async fn cleanup(
    connection: &Connection,
    topology: &Topology,
    extra_queues: &[String],
    databases: &[String],
    options: &PgConnectOptions,
) {
    if let Ok(channel) = connection.create_channel().await {
        for queue in standard_queues(topology).iter().chain(extra_queues) {
            // A failed delete (e.g. never declared) closes the channel.
            let channel = match channel.status().connected() {
                true => channel.clone(),
                false => match connection.create_channel().await {
                    Ok(c) => c,
                    Err(_) => return,
                },
            };
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .ok();
        }
        for exchange in [
            topology.commands_exchange(),
            topology.events_exchange(),
            topology.dead_letter_exchange(),
        ] {
            if let Ok(channel) = connection.create_channel().await {
                channel
                    .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                    .await
                    .ok();
            }
        }
    }
    for database in databases {
        participants::kit::database::drop_database(&options.clone().database(database))
            .await
            .ok();
    }
}

/// Asserts `reply` succeeded and returns its data.
pub fn success(reply: &ReplyMessage) -> serde_json::Value {
    assert_eq!(reply.status, ReplyStatus::Success, "{reply:?}");
    reply.data.clone()
}

/// Stock available for `sku` in the running inventory service.
pub async fn stock(app: &TestApp, sku: &str) -> i64 {
    sqlx::query_scalar("SELECT available FROM inventory_stock WHERE sku = $1")
        .bind(sku)
        .fetch_one(app.pool(Service::Inventory))
        .await
        .unwrap()
}

/// Asserts `reply` was rejected and returns the reason.
pub fn rejected(reply: &ReplyMessage) -> String {
    assert_eq!(reply.status, ReplyStatus::Rejected, "{reply:?}");
    reply.reason.clone().expect("a rejection has a reason")
}
