//! Integration suites of saga-orchestrator against real PostgreSQL and
//! RabbitMQ. Every test has its own namespace and databases.
//!
//! The failure-injection suite (`failure_*`: real processes, crash points,
//! outages through a fault proxy; see docs/RELIABILITY.md) runs with the
//! rest; alone: `cargo test -p saga-tests --test suite failure_`.

mod api;
mod console;
mod deploy;
mod e2e;
mod failure_api;
mod failure_checker;
mod failure_commit;
mod failure_compensation;
mod failure_crash;
mod failure_instances;
mod failure_messages;
mod failure_outage;
mod failure_poison;
mod failure_rabbit_cluster;
mod failure_support;
mod flows;
mod instances;
mod observability;
mod operations;
mod outbox;
mod raw_participant;
mod security;
mod spike;
mod support;
