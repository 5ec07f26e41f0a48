//! Per-test isolation: a random namespace (exchanges and queues) and
//! databases named after it, all removed when the [`TestEnv`] is dropped,
//! even if the test panicked.

use lapin::{Connection, ConnectionProperties};
use uuid::Uuid;

/// PostgreSQL server of the tests (trust auth).
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
/// RabbitMQ of the tests.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One test's private namespace and databases.
#[derive(Debug)]
pub struct TestEnv {
    /// Prefix of every exchange, queue and database of this test.
    pub namespace: String,
    /// Databases created under this env (dropped at the end).
    databases: std::sync::Mutex<Vec<String>>,
    /// Extra queues to delete at the end.
    queues: std::sync::Mutex<Vec<String>>,
    /// The broker's addresses (comma-separated for a private cluster);
    /// [`AMQP_URL`] unless a test runs its own RabbitMQ.
    broker: std::sync::Mutex<String>,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    /// A fresh namespace like `t3f9a1c2d`.
    pub fn new() -> Self {
        let namespace = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
        Self {
            namespace,
            databases: Default::default(),
            queues: Default::default(),
            broker: std::sync::Mutex::new(AMQP_URL.to_owned()),
        }
    }

    /// Uses the broker at `urls` (a private cluster's nodes) instead of the
    /// machine's: checks and clean-up connect there.
    pub fn use_broker(&self, urls: &str) {
        *self.broker.lock().unwrap() = urls.to_owned();
    }

    /// The broker's addresses (see [`Self::use_broker`]).
    pub fn amqp_url(&self) -> String {
        self.broker.lock().unwrap().clone()
    }

    /// A connection to the broker (to any live node of a cluster).
    pub async fn amqp_connection(&self) -> lapin::Result<Connection> {
        let broker = saga_proto::connect::broker::Broker::new(&self.amqp_url())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        broker.connect(ConnectionProperties::default()).await
    }

    /// The URL of database `<namespace>_<suffix>`, registered for removal.
    pub fn database_url(&self, suffix: &str) -> String {
        let name = format!("{}_{suffix}", self.namespace);
        let mut databases = self.databases.lock().unwrap();
        if !databases.contains(&name) {
            databases.push(name.clone());
        }
        format!("{POSTGRES}/{name}")
    }

    /// Registers an extra queue for removal.
    pub fn track_queue(&self, queue: &str) {
        self.queues.lock().unwrap().push(queue.to_owned());
    }

    /// Exchange and queue names of this env.
    pub fn topology(&self) -> saga_proto::amqp::Topology {
        saga_proto::amqp::Topology::new(&self.namespace).unwrap()
    }

    async fn cleanup(namespace: String, databases: Vec<String>, queues: Vec<String>) {
        // For reading a failed run's sagas afterwards.
        if std::env::var_os("SAGA_KEEP_DATABASES").is_some() {
            tracing::info!(?databases, "SAGA_KEEP_DATABASES: databases kept");
            return delete_namespace(AMQP_URL, &namespace, queues).await;
        }
        if let Ok(mut conn) =
            sqlx::PgConnection::connect_with_url(&format!("{POSTGRES}/postgres")).await
        {
            for db in databases {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        }
        delete_namespace(AMQP_URL, &namespace, queues).await;
    }
}

/// Deletes every queue and exchange a deployment in `namespace` may have
/// declared (orchestrator, demo, scripted and echo participants), plus
/// `extra_queues`. Missing ones are skipped.
pub async fn delete_namespace(amqp_url: &str, namespace: &str, extra_queues: Vec<String>) {
    let Ok(connection) = Connection::connect(amqp_url, ConnectionProperties::default()).await
    else {
        return;
    };
    let topology = saga_proto::amqp::Topology::new(namespace).unwrap();
    saga_proto::amqp::declare::delete_all(
        &connection,
        &topology,
        &[
            "inventory",
            "payment",
            "orders",
            "echo",
            "alpha",
            "beta",
            "gamma",
            "delta",
        ],
        &["notification"],
        &extra_queues,
    )
    .await;
    let _ = connection.close(200, "bye".into()).await;
}

trait ConnectWithUrl: Sized {
    async fn connect_with_url(url: &str) -> Result<Self, sqlx::Error>;
}

impl ConnectWithUrl for sqlx::PgConnection {
    async fn connect_with_url(url: &str) -> Result<Self, sqlx::Error> {
        use sqlx::Connection as _;
        sqlx::PgConnection::connect(url).await
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let namespace = self.namespace.clone();
        let databases = std::mem::take(&mut *self.databases.lock().unwrap());
        let mut queues = std::mem::take(&mut *self.queues.lock().unwrap());
        if self.amqp_url() != AMQP_URL {
            // A private broker goes away with its test: nothing to delete
            // on the machine's own.
            queues.clear();
        }
        // Drop runs inside the test's runtime; clean up on a runtime of our own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(Self::cleanup(namespace, databases, queues));
        })
        .join();
    }
}
