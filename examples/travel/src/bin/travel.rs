//! `travel orchestrator`: the saga orchestrator with the shipped
//! order-placement flows and `trip_booking`; `travel participants`: the
//! trip's participants.

use clap::{Parser, Subcommand};
use orchestrator::{Config, Orchestrator, stop_on_signal, telemetry};
use tokio_util::sync::CancellationToken;
use travel_booking::services::{self, ServicesConfig};

#[derive(Parser)]
#[command(about = "Trip booking on saga-orchestrator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the orchestrator (same flags as `orchestrator serve`).
    Orchestrator(Box<Config>),
    /// Run the participants bookings, cards and itinerary.
    Participants {
        /// PostgreSQL server; databases `<namespace>_<participant>`.
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        database_url: String,
        /// RabbitMQ URL.
        #[arg(
            long,
            env = "AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp_url: String,
        /// Namespace shared with the orchestrator.
        #[arg(long, env = "SAGA_NAMESPACE", default_value = "saga")]
        namespace: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match Cli::parse().command {
        Command::Orchestrator(config) => {
            let _telemetry = telemetry::init(config.log_format)?;
            Orchestrator::builder(*config)
                .flows(travel_booking::flows())
                .run(shutdown)
                .await?;
        }
        Command::Participants {
            database_url,
            amqp_url,
            namespace,
        } => {
            let _telemetry = telemetry::init(orchestrator::config::LogFormat::Pretty)?;
            let config = ServicesConfig::new(&amqp_url, &namespace, &database_url)?;
            let handles = services::start(&config, shutdown.clone()).await?;
            tracing::info!("bookings, cards and itinerary are running");
            for handle in handles {
                handle.stopped().await;
            }
        }
    }
    Ok(())
}
