//! Integration tests of the participant kit and the demo participants,
//! against the real PostgreSQL and RabbitMQ. Every test uses its own
//! namespace and databases and removes them at the end.

mod barrier;
mod batch;
mod crash;
mod database;
mod helpers;
mod idempotency;
mod inventory;
mod notification;
mod orders;
mod outbox;
mod payment;
mod poison;
mod reconnect;
