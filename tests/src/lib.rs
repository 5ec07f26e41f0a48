//! Test harness of saga-orchestrator's integration and failure-injection
//! suites (the suites themselves are in `tests/suite`).
//!
//! - [`certs`]: a test CA and certificates signed by it, as PEM files.
//! - [`env`](mod@env): a private namespace and databases per test, removed afterwards.
//! - [`app`]: an in-process orchestrator on port 0 with a gRPC client and
//!   helpers such as [`app::TestApp::wait_for_state`].
//! - [`ledgers`]: typed reads of the demo participants' databases (stock,
//!   money, confirmations, notifications) and whole-ledger checks.
//! - [`scripted`]: a participant that answers commands as the test scripts
//!   it, speaking the raw AMQP contract (no kit), and records what it saw.
//! - [`proxy`]: a TCP fault proxy (cut, refuse, black-hole, latency, commit
//!   cuts) between services and RabbitMQ / PostgreSQL.
//! - [`tls_proxy`]: a TLS-terminating proxy in front of the shared
//!   RabbitMQ, for `amqps://` tests.
//! - [`processes`]: real service processes to kill -9 and restart, with
//!   their entry points.
//! - [`cluster`]: the real system as processes behind proxies.
//! - [`rabbit_cluster`]: a private three-node RabbitMQ cluster on loopback.
//! - [`invariants`]: the checker every failure-injection run ends with.
//! - [`orders`]: orders with a known fate and a steady load of them that
//!   survives orchestrator crashes.
//! - [`outage`]: what an outage cost: sagas ended as meant, operator
//!   retries, the longest pause.
//! - [`chaos`]: the chaos soak behind `saga-chaos`.
//! - [`inject`]: duplicates, stale replies, early compensations and poison
//!   put on the broker behind the services' backs.
//!
//! Waiting is always on a condition with a deadline, never a bare sleep.

pub mod app;
pub mod bench;
pub mod certs;
pub mod chaos;
pub mod cluster;
pub mod env;
pub mod inject;
pub mod invariants;
pub mod ledgers;
pub mod orders;
pub mod otlp;
pub mod outage;
pub mod processes;
pub mod proxy;
pub mod rabbit_cluster;
pub mod scripted;
pub mod tls_proxy;

use std::{future::Future, time::Duration};

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout`
/// with `what` in the message.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
