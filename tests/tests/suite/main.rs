//! Integration suites of saga-orchestrator against real PostgreSQL and
//! RabbitMQ. Every test has its own namespace and databases.

mod api;
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
mod failure_support;
mod flows;
mod instances;
mod raw_participant;
mod support;
