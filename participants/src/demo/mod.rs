//! The demo participants of the order-placement flow, and a runner that
//! starts any of them in one process, each on its own database and its own
//! connections.
//!
//! ```no_run
//! # async fn demo() -> Result<(), participants::demo::DemoError> {
//! use participants::demo::{self, DemoConfig, Service};
//! use tokio_util::sync::CancellationToken;
//!
//! let config = DemoConfig::from_urls(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     "saga",
//!     "postgres://postgres@127.0.0.1:5432/postgres",
//! )?;
//! let shutdown = CancellationToken::new();
//! demo::run(&Service::ALL, config, shutdown).await
//! # }
//! ```
//!
//! Databases: service `<name>` uses database `<prefix><name>` on the server
//! of the base URL, with the prefix defaulting to `<namespace>_` (so
//! `saga_inventory`, `saga_payment`, `saga_orders`, `saga_notification`).

pub mod inventory;
pub mod notification;
pub mod orders;
pub mod payment;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use saga_proto::amqp::{InvalidName, Topology};
use saga_proto::connect::broker::Broker;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::kit::{
    FaultConfig, FaultConfigError, FaultInjector, KitError, ParticipantConfig, ParticipantHandle,
    PoolSettings,
};

/// PostgreSQL truncates longer identifiers, which could merge two databases.
const MAX_DATABASE_NAME: usize = 63;

/// One of the demo services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// Stock reservations.
    Inventory,
    /// Charges, authorizations and captures.
    Payment,
    /// Order confirmation.
    Orders,
    /// Lifecycle-event subscriber.
    Notification,
}

impl Service {
    /// Every demo service.
    pub const ALL: [Service; 4] = [
        Service::Inventory,
        Service::Payment,
        Service::Orders,
        Service::Notification,
    ];

    /// The name: participant name, queue suffix and database suffix.
    pub fn name(self) -> &'static str {
        match self {
            Service::Inventory => inventory::NAME,
            Service::Payment => payment::NAME,
            Service::Orders => orders::NAME,
            Service::Notification => notification::NAME,
        }
    }

    /// Parses a list of names where `all` means every service; duplicates
    /// are ignored and the order is stable.
    pub fn parse_list<S: AsRef<str>>(names: &[S]) -> Result<Vec<Service>, UnknownService> {
        let mut services = Vec::new();
        for name in names {
            let name = name.as_ref();
            if name == "all" {
                services.extend(Service::ALL);
            } else {
                services.push(name.parse()?);
            }
        }
        services.sort();
        services.dedup();
        Ok(services)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a demo service.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("unknown participant {0:?}: expected inventory, payment, orders, notification or all")]
pub struct UnknownService(pub String);

impl FromStr for Service {
    type Err = UnknownService;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Service::ALL
            .into_iter()
            .find(|service| service.name() == s)
            .ok_or_else(|| UnknownService(s.to_owned()))
    }
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The namespace is not valid.
    #[error(transparent)]
    Namespace(#[from] InvalidName),
    /// The database URL could not be parsed.
    #[error(transparent)]
    DatabaseUrl(#[from] saga_proto::connect::postgres::PostgresUrlError),
    /// The broker settings cannot be used.
    #[error(transparent)]
    Broker(#[from] saga_proto::connect::broker::BrokerError),
    /// A derived database name is too long for PostgreSQL.
    #[error(
        "database name {0:?} is longer than {MAX_DATABASE_NAME} bytes; use a shorter namespace or prefix"
    )]
    DatabaseNameTooLong(String),
    /// The fault knobs are out of range.
    #[error(transparent)]
    Faults(#[from] FaultConfigError),
    /// A service failed to start.
    #[error("starting {service}")]
    Start {
        /// The service.
        service: Service,
        /// Why.
        #[source]
        source: KitError,
    },
}

/// Configuration shared by the demo services.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// RabbitMQ, with its TLS settings.
    pub broker: Broker,
    /// Namespace of every exchange and queue.
    pub topology: Topology,
    /// Server and credentials; the database name is replaced per service.
    pub database: PgConnectOptions,
    /// Prefix of each service's database name; `None` means `<namespace>_`.
    pub database_prefix: Option<String>,
    /// Pool of each service (default 5 connections).
    pub pool: PoolSettings,
    /// Prefetch per service.
    pub prefetch: u16,
    /// Batches handled at once per service.
    pub concurrency: usize,
    /// Most deliveries one batch (one transaction) takes, per service.
    pub max_batch: usize,
    /// How often each relay looks at its outbox.
    pub relay_interval: Duration,
    /// Fault injection, shared by every command participant of the process
    /// (the notification service has none).
    pub faults: FaultConfig,
}

impl DemoConfig {
    /// Defaults for everything but the addresses.
    pub fn new(broker: Broker, topology: Topology, database: PgConnectOptions) -> Self {
        Self {
            broker,
            topology,
            database,
            database_prefix: None,
            pool: PoolSettings::default(),
            prefetch: 16,
            concurrency: 4,
            max_batch: 16,
            relay_interval: Duration::from_secs(1),
            faults: FaultConfig::default(),
        }
    }

    /// Parses the namespace and the base database URL.
    pub fn from_urls(
        amqp_url: &str,
        namespace: &str,
        database_url: &str,
    ) -> Result<Self, DemoError> {
        let topology = Topology::new(namespace)?;
        let database = saga_proto::connect::postgres::connect_options(database_url)?;
        Ok(Self::new(Broker::new(amqp_url)?, topology, database))
    }

    /// The database name of `service`.
    pub fn database_name(&self, service: Service) -> String {
        let prefix = self
            .database_prefix
            .clone()
            .unwrap_or_else(|| format!("{}_", self.topology.namespace()));
        format!("{prefix}{}", service.name())
    }

    /// The connect options of `service`'s database.
    pub fn database_for(&self, service: Service) -> PgConnectOptions {
        self.database
            .clone()
            .database(&self.database_name(service))
            .application_name(&format!("participant-{}", service.name()))
    }

    fn participant_config(
        &self,
        service: Service,
        faults: &std::sync::Arc<FaultInjector>,
    ) -> ParticipantConfig {
        ParticipantConfig {
            broker: self.broker.clone(),
            topology: self.topology.clone(),
            database: self.database_for(service),
            pool: self.pool.clone(),
            prefetch: self.prefetch,
            concurrency: self.concurrency,
            max_batch: self.max_batch,
            relay_interval: self.relay_interval,
            faults: match service {
                Service::Notification => FaultInjector::none(),
                _ => faults.clone(),
            },
        }
    }
}

/// The running demo services.
#[derive(Debug)]
pub struct Demo {
    /// One handle per started service, in [`Service`] order.
    handles: Vec<(Service, ParticipantHandle)>,
    /// Child of the caller's token: stops only the demo services.
    shutdown: CancellationToken,
}

impl Demo {
    /// Asks every demo service to stop (the caller's token is untouched);
    /// await [`Demo::stopped`] to wait for it.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Every started service with its handle.
    pub fn handles(&self) -> impl Iterator<Item = (Service, &ParticipantHandle)> {
        self.handles.iter().map(|(s, h)| (*s, h))
    }

    /// The handle of `service`, if it was started.
    pub fn get(&self, service: Service) -> Option<&ParticipantHandle> {
        self.handles
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, h)| h)
    }

    /// Waits until every service consumes from its queue: `true` then,
    /// `false` if one stopped first (shutdown).
    pub async fn ready(&mut self) -> bool {
        for (_, handle) in &mut self.handles {
            if !handle.ready().await {
                return false;
            }
        }
        true
    }

    /// Waits until every service stopped (after the shutdown token fired).
    pub async fn stopped(self) {
        futures::future::join_all(self.handles.into_iter().map(|(_, h)| h.stopped())).await;
    }
}

/// Starts `services` (databases created and migrated, consumers spawned)
/// and returns once each has its database; call [`Demo::ready`] to wait
/// until they consume. Everything stops when `shutdown` fires.
pub async fn start(
    services: &[Service],
    config: DemoConfig,
    shutdown: CancellationToken,
) -> Result<Demo, DemoError> {
    config.faults.validate()?;
    for &service in services {
        let name = config.database_name(service);
        if name.len() > MAX_DATABASE_NAME {
            return Err(DemoError::DatabaseNameTooLong(name));
        }
    }
    // A failed start must stop the services already started without
    // cancelling the caller's token (it may run an orchestrator too).
    let shutdown = shutdown.child_token();
    let faults = FaultInjector::new(config.faults.clone());
    let starts = services.iter().map(|&service| {
        let participant_config = config.participant_config(service, &faults);
        let shutdown = shutdown.clone();
        async move {
            let participant = match service {
                Service::Inventory => inventory::participant(),
                Service::Payment => payment::participant(),
                Service::Orders => orders::participant(),
                Service::Notification => notification::participant(),
            };
            let started = match participant {
                Ok(participant) => participant.start(participant_config, shutdown).await,
                Err(e) => Err(e),
            };
            started
                .map(|handle| (service, handle))
                .map_err(|source| DemoError::Start { service, source })
        }
    });
    let results = futures::future::join_all(starts).await;
    let mut handles = Vec::new();
    let mut first_error = None;
    for result in results {
        match result {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let demo = Demo { handles, shutdown };
    if let Some(error) = first_error {
        demo.shutdown();
        demo.stopped().await;
        return Err(error);
    }
    Ok(demo)
}

/// Runs `services` until `shutdown` fires, then stops them gracefully
/// (in-hand commands finish, outboxes are flushed). This is what the
/// orchestrator's `dev` command calls.
pub async fn run(
    services: &[Service],
    config: DemoConfig,
    shutdown: CancellationToken,
) -> Result<(), DemoError> {
    let demo = start(services, config, shutdown).await?;
    demo.stopped().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_lists_parse() {
        assert_eq!(
            Service::parse_list(&["all"]).unwrap(),
            Service::ALL.to_vec()
        );
        assert_eq!(
            Service::parse_list(&["payment", "inventory", "payment"]).unwrap(),
            vec![Service::Inventory, Service::Payment]
        );
        assert_eq!(
            Service::parse_list(&["billing"]).unwrap_err(),
            UnknownService("billing".into())
        );
    }

    #[test]
    fn database_names_derive_from_the_namespace() {
        let config = DemoConfig::from_urls(
            "amqp://localhost",
            "saga",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .unwrap();
        assert_eq!(config.database_name(Service::Inventory), "saga_inventory");
        assert_eq!(
            config.database_for(Service::Payment).get_database(),
            Some("saga_payment")
        );
        let prefixed = DemoConfig {
            database_prefix: Some("x_".into()),
            ..config
        };
        assert_eq!(prefixed.database_name(Service::Orders), "x_orders");
    }
}
