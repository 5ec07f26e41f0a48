//! The travel service end to end, against the real PostgreSQL and
//! RabbitMQ: its own orchestrator (embedding order placement too), its own
//! participants. Each test runs in a namespace and databases of its own,
//! removed at the end.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use orchestrator::{Application, Config, Orchestrator};
use saga_proto::amqp::{CommandMessage, Phase, ReplyMessage, ReplyStatus, Topology};
use saga_proto::v1::saga_service_client::SagaServiceClient;
use saga_proto::v1::{
    GetSagaRequest, ListSagaTypesRequest, SagaState, StartSagaRequest, WatchSagaRequest,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use travel_booking::services::{self, ServicesConfig, bookings};
use uuid::Uuid;

const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Longest a saga may take here (a bound on a condition, not a pause).
const SAGA_BOUND: Duration = Duration::from_secs(60);

/// One test's namespace; its databases and queues go when it is dropped.
struct Env {
    namespace: String,
    /// Stops the participants.
    shutdown: CancellationToken,
}

impl Env {
    fn new() -> Self {
        Self {
            namespace: format!("trip{}", &Uuid::new_v4().simple().to_string()[..10]),
            shutdown: CancellationToken::new(),
        }
    }

    async fn orchestrator(&self, shutdown: CancellationToken) -> Application {
        let config = Config::from_args([
            "--database-url",
            &format!("{POSTGRES}/{}_sagas", self.namespace),
            "--amqp-url",
            AMQP_URL,
            "--grpc-addr",
            "127.0.0.1:0",
            "--namespace",
            &self.namespace,
            "--db-max-connections",
            "4",
        ])
        .expect("valid flags");
        Orchestrator::builder(config)
            .flows(travel_booking::flows())
            .start(shutdown)
            .await
            .expect("the orchestrator starts")
    }

    fn services(&self) -> ServicesConfig {
        ServicesConfig::new(AMQP_URL, &self.namespace, &format!("{POSTGRES}/postgres")).unwrap()
    }

    async fn participants(&self) {
        self.start_participants(self.services()).await;
    }

    async fn start_participants(&self, config: ServicesConfig) {
        services::start(&config, self.shutdown.clone())
            .await
            .expect("the participants start");
    }

    async fn database(&self, name: &str) -> PgPool {
        PgPool::connect(&format!("{POSTGRES}/{}_{name}", self.namespace))
            .await
            .unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let namespace = self.namespace.clone();
        // Drop runs inside the test's runtime; clean up on one of our own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(cleanup(namespace));
        })
        .join();
    }
}

async fn cleanup(namespace: String) {
    if let Ok(pool) = PgPool::connect(&format!("{POSTGRES}/postgres")).await {
        for db in ["sagas", "bookings", "cards", "itinerary"] {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{namespace}_{db}\" WITH (FORCE)"
            ))
            .execute(&pool)
            .await;
        }
    }
    let Ok(connection) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
    else {
        return;
    };
    let topology = Topology::new(&namespace).unwrap();
    saga_proto::amqp::declare::delete_all(
        &connection,
        &topology,
        &["bookings", "cards", "itinerary"],
        &[],
        &[],
    )
    .await;
    let _ = connection.close(200, "bye".into()).await;
}

type Client = SagaServiceClient<tonic::transport::Channel>;

async fn client(app: &Application) -> Client {
    SagaServiceClient::connect(format!("http://{}", app.grpc_addr()))
        .await
        .unwrap()
}

fn trip(trip_id: &str, card: &str) -> String {
    serde_json::json!({
        "trip_id": trip_id, "traveller": "ada", "card": card,
        "flight": "LH123", "seats": 2, "hotel": "ritz", "nights": 3,
        "car": "compact", "days": 4
    })
    .to_string()
}

async fn start(client: &mut Client, version: u32, input: String) -> String {
    client
        .start_saga(StartSagaRequest {
            saga_type: "trip_booking".into(),
            input_json: input,
            idempotency_key: String::new(),
            definition_version: version,
        })
        .await
        .expect("StartSaga succeeds")
        .into_inner()
        .saga_id
}

/// Follows the saga's history until `done` holds for one of its events.
async fn watch_until(
    client: &mut Client,
    saga_id: &str,
    done: impl Fn(&saga_proto::v1::SagaEvent) -> bool,
) {
    let mut events = client
        .watch_saga(WatchSagaRequest {
            saga_id: saga_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(SAGA_BOUND, async {
        while let Some(event) = events.next().await {
            if done(&event.expect("the watch stream stays healthy")) {
                return;
            }
        }
        panic!("the watch stream ended before the condition held");
    })
    .await
    .expect("the saga got there in time");
}

async fn finished(client: &mut Client, saga_id: &str) -> saga_proto::v1::Saga {
    watch_until(client, saga_id, |event| {
        matches!(
            event.state(),
            SagaState::Completed | SagaState::Compensated | SagaState::Failed
        )
    })
    .await;
    client
        .get_saga(GetSagaRequest {
            saga_id: saga_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// (kind, status, price) of every booking of `trip_id`.
async fn bookings_of(pool: &PgPool, trip_id: &str) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT kind, status, price_cents FROM bookings WHERE trip_id = $1 ORDER BY kind",
    )
    .bind(trip_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn available(pool: &PgPool, kind: &str, item: &str) -> i32 {
    sqlx::query_scalar("SELECT available FROM booking_capacity WHERE kind = $1 AND item = $2")
        .bind(kind)
        .bind(item)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn charges(pool: &PgPool, trip_id: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT amount_cents FROM card_charges WHERE trip_id = $1")
        .bind(trip_id)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_books_flight_hotel_and_car_charges_their_sum_once_and_sends_the_itinerary() {
    let env = Env::new();
    let app = env.orchestrator(env.shutdown.clone()).await;
    env.participants().await;
    let mut client = client(&app).await;

    let types = client
        .list_saga_types(ListSagaTypesRequest {})
        .await
        .unwrap()
        .into_inner()
        .saga_types;
    let mut names: Vec<(String, u32)> = types.into_iter().map(|t| (t.name, t.version)).collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("order_placement".to_owned(), 1),
            ("order_placement".to_owned(), 2),
            ("trip_booking".to_owned(), 1),
            ("trip_booking".to_owned(), 2),
        ],
        "the travel orchestrator embeds the shipped flows beside its own"
    );

    let saga_id = start(&mut client, 0, trip("t-1", "visa-1")).await;
    let saga = finished(&mut client, &saga_id).await;
    assert_eq!(saga.state(), SagaState::Completed, "{saga:?}");
    assert_eq!(saga.definition_version, 2, "the latest version ran");

    let flight = 2 * bookings::SEAT_CENTS as i64;
    let hotel = 3 * bookings::NIGHT_CENTS as i64;
    let car = 4 * bookings::CAR_DAY_CENTS as i64;
    let booked = env.database("bookings").await;
    assert_eq!(
        bookings_of(&booked, "t-1").await,
        [
            ("car".to_owned(), "reserved".to_owned(), car),
            ("flight".to_owned(), "reserved".to_owned(), flight),
            ("hotel".to_owned(), "reserved".to_owned(), hotel),
        ]
    );
    assert_eq!(available(&booked, "flight", "LH123").await, 100 - 2);
    assert_eq!(
        charges(&env.database("cards").await, "t-1").await,
        [flight + hotel + car],
        "one charge of the three prices"
    );
    let body: String = sqlx::query_scalar("SELECT body FROM itineraries WHERE trip_id = 't-1'")
        .fetch_one(&env.database("itinerary").await)
        .await
        .unwrap();
    assert_eq!(
        body.lines().count(),
        4,
        "three reservations and the charge: {body}"
    );
    let data: serde_json::Value = serde_json::from_str(&saga.data_json).unwrap();
    assert!(data["itinerary_id"].is_string(), "{data}");
    env.shutdown.cancel();
    app.run_until_stopped().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_cancels_every_reservation_and_charges_nothing() {
    let env = Env::new();
    let app = env.orchestrator(env.shutdown.clone()).await;
    env.participants().await;
    let mut client = client(&app).await;

    let saga_id = start(&mut client, 2, trip("t-2", "declined-7")).await;
    let saga = finished(&mut client, &saga_id).await;
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:?}");
    assert!(saga.error.contains("declined"), "{}", saga.error);

    let booked = env.database("bookings").await;
    let rows = bookings_of(&booked, "t-2").await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter().all(|(_, status, _)| status == "cancelled"),
        "{rows:?}"
    );
    for (kind, item) in [("flight", "LH123"), ("hotel", "ritz"), ("car", "compact")] {
        assert_eq!(
            available(&booked, kind, item).await,
            100,
            "{kind} given back"
        );
    }
    assert!(
        charges(&env.database("cards").await, "t-2")
            .await
            .is_empty()
    );
    let itineraries: i64 = sqlx::query_scalar("SELECT count(*) FROM itineraries")
        .fetch_one(&env.database("itinerary").await)
        .await
        .unwrap();
    assert_eq!(itineraries, 0);
    env.shutdown.cancel();
    app.run_until_stopped().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_above_the_configured_card_limit_is_refused_and_the_trip_compensates() {
    let env = Env::new();
    let app = env.orchestrator(env.shutdown.clone()).await;
    // The limit is the cards handler's state: one below this trip's total.
    let flight = 2 * bookings::SEAT_CENTS;
    let hotel = 3 * bookings::NIGHT_CENTS;
    let car = 4 * bookings::CAR_DAY_CENTS;
    let mut config = env.services();
    config.card_policy.limit_cents = flight + hotel + car - 1;
    env.start_participants(config).await;
    let mut client = client(&app).await;

    let saga_id = start(&mut client, 2, trip("t-5", "visa-5")).await;
    let saga = finished(&mut client, &saga_id).await;
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:?}");
    assert!(
        saga.error
            .contains(&format!("outside 1..={}", flight + hotel + car - 1)),
        "{}",
        saga.error
    );
    let booked = env.database("bookings").await;
    assert!(
        bookings_of(&booked, "t-5")
            .await
            .iter()
            .all(|(_, status, _)| status == "cancelled")
    );
    assert!(
        charges(&env.database("cards").await, "t-5")
            .await
            .is_empty()
    );
    env.shutdown.cancel();
    app.run_until_stopped().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_books_once_and_gets_the_same_reply() {
    let env = Env::new();
    let app = env.orchestrator(env.shutdown.clone()).await;
    env.participants().await;
    let topology = Topology::new(&env.namespace).unwrap();

    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let replies = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let command = CommandMessage {
        saga_id: Uuid::now_v7(),
        saga_type: "trip_booking".into(),
        saga_version: 2,
        step: "reserve_flight".into(),
        phase: Phase::Action,
        attempt: 1,
        participant: "bookings".into(),
        command: "reserve_flight".into(),
        idempotency_key: format!("dup-{}", Uuid::new_v4()),
        compensates: None,
        payload: serde_json::json!({"trip_id": "t-3", "flight": "BA9", "seats": 3}),
    };
    for attempt in [1, 2] {
        let body = serde_json::to_vec(&CommandMessage {
            attempt,
            ..command.clone()
        })
        .unwrap();
        channel
            .basic_publish(
                topology.commands_exchange().into(),
                "bookings".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_reply_to(replies.name().clone()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut consumer = channel
        .basic_consume(
            replies.name().clone(),
            "test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut answers = Vec::new();
    tokio::time::timeout(SAGA_BOUND, async {
        while answers.len() < 2 {
            let delivery = consumer.next().await.unwrap().unwrap();
            answers.push(serde_json::from_slice::<ReplyMessage>(&delivery.data).unwrap());
        }
    })
    .await
    .expect("both commands are answered");
    answers.sort_by_key(|reply| reply.attempt);
    assert_eq!(answers[0].status, ReplyStatus::Success, "{answers:?}");
    assert_eq!(answers[1].status, ReplyStatus::Success, "{answers:?}");
    assert_eq!(
        answers[0].data, answers[1].data,
        "the duplicate is answered with the first booking"
    );
    assert_eq!(
        (answers[0].attempt, answers[1].attempt),
        (1, 2),
        "each reply echoes its own attempt"
    );
    let booked = env.database("bookings").await;
    assert_eq!(bookings_of(&booked, "t-3").await.len(), 1, "one booking");
    assert_eq!(
        available(&booked, "flight", "BA9").await,
        100 - 3,
        "seats taken once"
    );
    let _ = connection.close(200, "bye".into()).await;
    env.shutdown.cancel();
    app.run_until_stopped().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_orchestrator_finishes_the_trip_the_stopped_one_started() {
    let env = Env::new();
    let first_stop = CancellationToken::new();
    let first = env.orchestrator(first_stop.clone()).await;
    let mut client = client(&first).await;
    // No participant runs yet: the first command waits in the outbox.
    let saga_id = start(&mut client, 1, trip("t-4", "visa-4")).await;
    watch_until(&mut client, &saga_id, |event| {
        event.kind == "command_sent" && event.step == "reserve_flight"
    })
    .await;
    first_stop.cancel();
    first.run_until_stopped().await;

    let second = env.orchestrator(env.shutdown.clone()).await;
    env.participants().await;
    let mut client = self::client(&second).await;
    let saga = finished(&mut client, &saga_id).await;
    assert_eq!(saga.state(), SagaState::Completed, "{saga:?}");
    assert_eq!(saga.definition_version, 1);
    let booked = env.database("bookings").await;
    let rows = bookings_of(&booked, "t-4").await;
    assert_eq!(
        rows.iter()
            .map(|(kind, _, _)| kind.as_str())
            .collect::<Vec<_>>(),
        ["flight", "hotel"],
        "v1 books no car"
    );
    let flight = 2 * bookings::SEAT_CENTS as i64;
    let hotel = 3 * bookings::NIGHT_CENTS as i64;
    assert_eq!(
        charges(&env.database("cards").await, "t-4").await,
        [flight + hotel]
    );
    env.shutdown.cancel();
    second.run_until_stopped().await;
}
