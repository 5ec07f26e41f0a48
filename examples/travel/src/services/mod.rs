//! The trip's participants, each built with the kit on a database of its
//! own: [`bookings`], [`cards`], [`itinerary`].

pub mod bookings;
pub mod cards;
pub mod itinerary;

use std::str::FromStr;

use participants::kit::{KitError, ParticipantConfig, ParticipantHandle, PoolSettings};
use saga_proto::amqp::Topology;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

/// Where the participants run.
#[derive(Debug, Clone)]
pub struct ServicesConfig {
    /// RabbitMQ, with its TLS settings.
    pub broker: participants::kit::Broker,
    /// Namespace shared with the orchestrator.
    pub topology: Topology,
    /// PostgreSQL server and credentials; each participant uses database
    /// `<database_prefix><name>`.
    pub postgres: PgConnectOptions,
    /// Prefix of the participants' database names.
    pub database_prefix: String,
    /// Most connections of each participant's pool.
    pub max_connections: u32,
    /// What the card gateway accepts.
    pub card_policy: cards::CardPolicy,
}

/// Why the participants could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    /// The PostgreSQL URL does not parse.
    #[error("invalid PostgreSQL URL")]
    Url(#[source] sqlx::Error),
    /// The RabbitMQ URL does not parse.
    #[error(transparent)]
    Broker(#[from] participants::kit::BrokerError),
    /// The namespace is not a valid name.
    #[error(transparent)]
    Namespace(#[from] saga_proto::amqp::InvalidName),
    /// A participant could not be built or started.
    #[error("participant {name} could not start")]
    Start {
        /// Which one.
        name: &'static str,
        /// Why.
        #[source]
        source: KitError,
    },
}

impl ServicesConfig {
    /// Participants in `namespace` on the server of `postgres_url`, with
    /// databases `<namespace>_bookings`, `<namespace>_cards` and
    /// `<namespace>_itinerary`.
    pub fn new(amqp_url: &str, namespace: &str, postgres_url: &str) -> Result<Self, ServicesError> {
        Ok(Self {
            broker: participants::kit::Broker::new(amqp_url)?,
            topology: Topology::new(namespace)?,
            postgres: PgConnectOptions::from_str(postgres_url).map_err(ServicesError::Url)?,
            database_prefix: format!("{namespace}_"),
            max_connections: 3,
            card_policy: cards::CardPolicy::default(),
        })
    }

    fn participant(&self, name: &str) -> ParticipantConfig {
        let database = self
            .postgres
            .clone()
            .database(&format!("{}{name}", self.database_prefix));
        let mut config =
            ParticipantConfig::new(self.broker.clone(), self.topology.clone(), database);
        config.pool = PoolSettings {
            max_connections: self.max_connections,
            ..PoolSettings::default()
        };
        config
    }
}

/// Starts every participant of the trip and waits until each consumes.
pub async fn start(
    config: &ServicesConfig,
    shutdown: CancellationToken,
) -> Result<Vec<ParticipantHandle>, ServicesError> {
    let mut handles = Vec::new();
    for (name, built) in [
        (bookings::NAME, bookings::participant()),
        (cards::NAME, cards::participant(config.card_policy.clone())),
        (itinerary::NAME, itinerary::participant()),
    ] {
        let started = match built {
            Ok(participant) => {
                participant
                    .start(config.participant(name), shutdown.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        let mut handle = started.map_err(|source| ServicesError::Start { name, source })?;
        handle.ready().await;
        handles.push(handle);
    }
    Ok(handles)
}
