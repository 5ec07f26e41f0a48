//! The saga orchestrator service.
//!
//! Layout (the edges around the pure `sagas` machine):
//! - [`config`], [`telemetry`]: flags/env and logging.
//! - [`store`]: PostgreSQL tables (sagas, history, outbox), migrations.
//! - [`app`]: the embedding API ([`Orchestrator::builder`]): wires
//!   everything and runs it until shutdown.
//! - [`admission`]: bounds the sagas in flight; a start beyond the limit
//!   (which follows measured latency) is refused before it is written.
//! - [`engine`]: load → apply → persist state + history + outbox in one
//!   transaction → commit. The only writer of saga state.
//! - [`messages`]: the machine's actions as wire messages (exchange,
//!   routing key, envelope), and replies as machine events.
//! - [`after_commit`]: what follows a commit: [`cache`] (the states this
//!   instance drives, so a reply costs one statement), the publisher,
//!   watch wake-ups, timer wake-ups.
//! - [`bus`]: RabbitMQ — connection supervision, topology, the confirming
//!   publisher and the batching reply consumer.
//! - [`relay`]: republishes outbox rows whose lease ran out.
//! - [`retention`]: deletes finished sagas past `--retention`, in small batches.
//! - [`timers`]: fires due step timers stored with the sagas.
//! - [`watch`]: cross-instance history notifications for `WatchSaga`.
//! - [`api`]: the gRPC service; [`health`]: what health reports.
//! - [`bulk`]: retries every FAILED saga of a filter at a bounded rate.
//!
//! Crash points (feature `failpoints`): `orchestrator::after_commit_before_publish`,
//! `orchestrator::after_publish_before_outbox_delete`,
//! `orchestrator::after_reply_commit_before_ack`, `orchestrator::timer_before_commit`.
//!
//! Data flow: `StartSaga` → engine transaction (saga row, history, outbox) →
//! publisher → `<ns>.commands` → participant → `<ns>.replies` → consumer →
//! engine transaction → ... until the saga is terminal.

/// Marks a named point where failure-injection tests may crash the process
/// (`FAILPOINTS="<name>=return"`, or `=5%return`, `=3*off->return` ...).
/// Compiled to nothing unless the `failpoints` feature is on.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| {
            tracing::error!(point = $name, "crash point reached: aborting");
            std::process::abort()
        })
    };
}

pub mod admission;
pub mod after_commit;
pub mod api;
pub mod app;
pub mod backlog;
pub mod bulk;
pub mod bus;
pub mod cache;
pub mod config;
pub mod console;
pub mod engine;
pub mod health;
pub mod messages;
pub mod relay;
pub mod retention;
pub mod security;
pub mod starts;
pub mod store;
pub mod telemetry;
pub mod timers;
pub mod watch;

pub use app::{Application, Orchestrator, OrchestratorBuilder, StartupError, stop_on_signal};
pub use config::Config;
