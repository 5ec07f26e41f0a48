//! Integration suites of saga-orchestrator against real PostgreSQL and
//! RabbitMQ. Every test has its own namespace and databases.
//!
//! The failure-injection suite (`failure_*`: real processes, crash points,
//! outages through a fault proxy) is behind the `failure-suite` feature until
//! it is stable on a loaded 2-core machine:
//! `cargo test -p saga-tests --features failure-suite --test suite failure_`.

mod api;
mod e2e;
#[cfg(feature = "failure-suite")]
mod failure_api;
#[cfg(feature = "failure-suite")]
mod failure_checker;
#[cfg(feature = "failure-suite")]
mod failure_commit;
#[cfg(feature = "failure-suite")]
mod failure_compensation;
#[cfg(feature = "failure-suite")]
mod failure_crash;
#[cfg(feature = "failure-suite")]
mod failure_instances;
#[cfg(feature = "failure-suite")]
mod failure_messages;
#[cfg(feature = "failure-suite")]
mod failure_outage;
#[cfg(feature = "failure-suite")]
mod failure_poison;
#[cfg(feature = "failure-suite")]
mod failure_support;
mod flows;
mod instances;
mod raw_participant;
mod support;
