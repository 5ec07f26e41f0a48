//! Integration suites of saga-orchestrator against real PostgreSQL and
//! RabbitMQ. Every test has its own namespace and databases.

mod api;
mod failure_crash;
mod failure_support;
mod flows;
mod instances;
mod support;
