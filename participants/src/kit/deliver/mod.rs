//! Delivering: everything that talks to RabbitMQ and nothing else. The
//! consumer loop (connect, declare, consume in batches, reconnect, stop),
//! publishing replies with confirms, and the two kinds of service on it:
//! a command participant and an event subscriber. Each hands what it
//! decoded to its deciding half ([`super::decide`]) and carries out what
//! that decided.

pub(crate) mod commands;
pub(crate) mod consumer;
pub(crate) mod events;
pub(crate) mod replies;
