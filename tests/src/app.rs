//! An in-process orchestrator for tests, with a gRPC client.

use std::{net::SocketAddr, time::Duration};

use orchestrator::{Application, Config, config::LogFormat};
use saga_proto::v1::{
    GetSagaRequest, Saga, SagaEvent, SagaState, StartSagaRequest, WatchSagaRequest,
    saga_service_client::SagaServiceClient,
};
use sagas::Catalog;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    env::{AMQP_URL, TestEnv},
    eventually,
};

/// Default deadline of the `wait_for_*` helpers.
pub const WAIT: Duration = Duration::from_secs(30);

/// A running orchestrator and a client for it.
#[derive(Debug)]
pub struct TestApp {
    /// Where its gRPC API listens.
    pub addr: SocketAddr,
    /// Where its console listens (with `http_addr` set in the config).
    pub http_addr: Option<SocketAddr>,
    /// A connected client.
    pub client: SagaServiceClient<Channel>,
    /// Its database (for assertions on tables).
    pub pool: sqlx::PgPool,
    /// Cancels it.
    shutdown: CancellationToken,
    /// Resolves when it has stopped.
    stopped: tokio::task::JoinHandle<()>,
    /// SIGHUP reloads finished.
    reloads: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The orchestrator configuration of a test env.
pub fn config(env: &TestEnv) -> Config {
    // From the parser, so that every setting not named here has the
    // default `serve` has (TLS and authentication off).
    let mut config = Config::from_args(["--grpc-addr", "127.0.0.1:0"]).expect("defaults parse");
    config.database_url = env.database_url("orch");
    config.broker = saga_proto::connect::broker::BrokerFlags::plain(AMQP_URL);
    config.namespace = env.namespace.clone();
    config.log_format = LogFormat::Pretty;
    config.db_max_connections = 4;
    config.reply_prefetch = 256;
    config.reply_batch = 64;
    config.reply_workers = 2;
    config.bench_flows = false;
    config.queue_type = orchestrator::bus::QueueType::Quorum;
    config.metrics_addr = None;
    // Off as in the cluster harness (see there); `spike` turns it on.
    config.admission = orchestrator::admission::Mode::Off;
    config
}

impl TestApp {
    /// Starts an orchestrator of `catalog` in `env` and waits until it serves.
    pub async fn spawn(env: &TestEnv, catalog: Catalog) -> Self {
        Self::spawn_with(config(env), catalog).await
    }

    /// Starts an orchestrator with an explicit configuration.
    pub async fn spawn_with(config: Config, catalog: Catalog) -> Self {
        let _ = orchestrator::telemetry::init(LogFormat::Pretty);
        let database_url = config.database_url.clone();
        let shutdown = CancellationToken::new();
        let app = Application::build(config, catalog, shutdown.clone())
            .await
            .expect("orchestrator starts");
        let addr = app.grpc_addr();
        let http_addr = app.http_addr();
        let health = app.health().clone();
        let reloads = app.security_reloads();
        let stopped = tokio::spawn(app.run_until_stopped());
        eventually("the orchestrator to serve", WAIT, || {
            let serving = health.is_serving();
            async move { serving.then_some(()) }
        })
        .await;
        // Lazily: an orchestrator serving TLS or requiring tokens is called
        // by the test's own clients.
        let client = SagaServiceClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("an address")
                .connect_lazy(),
        );
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&database_url)
            .await
            .expect("test pool connects");
        Self {
            addr,
            http_addr,
            client,
            pool,
            shutdown,
            stopped,
            reloads,
        }
    }

    /// Sends SIGHUP to this process (the orchestrator's handler is in place
    /// once it has started) and waits until the orchestrator has reloaded
    /// its access and TLS files. Other orchestrators of the same test
    /// process reload too, which changes nothing for them.
    pub async fn sighup(&self) {
        use std::sync::atomic::Ordering;
        let before = self.reloads.load(Ordering::SeqCst);
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP failed");
        eventually("the orchestrator to reload", WAIT, || {
            let done = self.reloads.load(Ordering::SeqCst) > before;
            async move { done.then_some(()) }
        })
        .await;
    }

    /// Stops it gracefully and waits until it has.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.stopped.await.expect("orchestrator task");
        self.pool.close().await;
    }

    /// Starts a saga and returns its id.
    pub async fn start(&self, saga_type: &str, version: u32, input: serde_json::Value) -> String {
        let response = self
            .client
            .clone()
            .start_saga(StartSagaRequest {
                saga_type: saga_type.to_owned(),
                input_json: input.to_string(),
                idempotency_key: String::new(),
                definition_version: version,
            })
            .await
            .expect("StartSaga succeeds");
        response.into_inner().saga_id
    }

    /// The saga as the API reports it.
    pub async fn get(&self, saga_id: &str) -> Saga {
        self.client
            .clone()
            .get_saga(GetSagaRequest {
                saga_id: saga_id.to_owned(),
            })
            .await
            .expect("GetSaga succeeds")
            .into_inner()
    }

    /// Waits until the saga is in `state` and returns it.
    pub async fn wait_for_state(&self, saga_id: &str, state: SagaState) -> Saga {
        self.wait_for_state_within(saga_id, state, WAIT).await
    }

    /// [`Self::wait_for_state`] with an explicit deadline.
    pub async fn wait_for_state_within(
        &self,
        saga_id: &str,
        state: SagaState,
        timeout: Duration,
    ) -> Saga {
        let mut last = None;
        let found = tokio::time::timeout(timeout, async {
            loop {
                let saga = self.get(saga_id).await;
                if saga.state == state as i32 {
                    return saga;
                }
                last = Some(saga);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        match found {
            Ok(saga) => saga,
            Err(_) => panic!(
                "saga {saga_id} did not reach {state:?} within {timeout:?}; last seen: {last:#?}"
            ),
        }
    }

    /// Every history event of the saga (replayed by WatchSaga up to the
    /// terminal event).
    pub async fn history(&self, saga_id: &str) -> Vec<SagaEvent> {
        use futures::StreamExt;
        let mut stream = self
            .client
            .clone()
            .watch_saga(WatchSagaRequest {
                saga_id: saga_id.to_owned(),
            })
            .await
            .expect("WatchSaga succeeds")
            .into_inner();
        let mut events = Vec::new();
        while let Some(event) = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("watch stream ends")
        {
            events.push(event.expect("event"));
        }
        events
    }

    /// Rows left in the outbox.
    pub async fn outbox_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until the outbox is empty (every message confirmed by the broker).
    pub async fn wait_for_empty_outbox(&self) {
        eventually("an empty outbox", WAIT, || async {
            (self.outbox_rows().await == 0).then_some(())
        })
        .await;
    }
}
