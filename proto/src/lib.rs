//! Wire contracts of saga-orchestrator.
//!
//! - [`v1`]: the gRPC API (`saga.v1.SagaService`), generated from
//!   `saga/v1/saga.proto` at build time with a vendored `protoc`.
//! - [`amqp`]: the RabbitMQ contract: exchange and queue names, the command,
//!   reply and lifecycle-event envelopes (JSON bodies), and the AMQP
//!   properties every message carries. `AMQP.md` documents it field by field
//!   for participants written in other languages.
//! - [`connect`]: how every service connects to PostgreSQL (feature `sqlx`)
//!   and RabbitMQ (feature `lapin`): TLS defaults, certificate and secret
//!   files, redacted URLs.

pub mod amqp;
pub mod connect;
#[cfg(feature = "telemetry")]
pub mod telemetry;

/// The generated `saga.v1` gRPC types, client and server.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("saga.v1");

    /// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("saga_descriptor");
}
