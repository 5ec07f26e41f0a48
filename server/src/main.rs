//! `orchestrator serve` runs the saga orchestrator with the shipped flows;
//! `orchestrator dev` runs it together with every demo participant in one
//! process (each on its own connections and database, exactly as if
//! separate). Both are built on the embedding API
//! ([`orchestrator::Orchestrator::builder`]) that a service of one's own
//! uses with its own flows; this crate exists so that the orchestrator
//! library does not depend on the demo participants.

use clap::{Parser, Subcommand};
use orchestrator::{Config, Orchestrator, stop_on_signal, telemetry};
use participants::demo::{self, DemoConfig, Service};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Durable saga orchestrator on PostgreSQL and RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the orchestrator service.
    Serve(Config),
    /// Run the orchestrator and the demo participants (inventory, payment,
    /// orders, notification) in one process, for trying things out.
    Dev(Config),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Reads FAILPOINTS (only with the `failpoints` feature; see `crash_point!`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let shutdown = CancellationToken::new();
    match cli.command {
        Command::Serve(config) => {
            let _telemetry = telemetry::init(config.log_format)?;
            let flows = config.shipped_flows();
            let app = Orchestrator::builder(config)
                .flows(flows)
                .start(shutdown.clone())
                .await?;
            tokio::spawn(stop_on_signal(shutdown));
            app.run_until_stopped().await;
        }
        Command::Dev(mut config) => {
            let _telemetry = telemetry::init(config.log_format)?;
            // The console is part of trying things out.
            config
                .http_addr
                .get_or_insert(std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
            let mut demo_config = DemoConfig::from_urls(
                &config.broker.amqp_url,
                &config.namespace,
                &config.database_url()?,
            )?;
            demo_config.broker = config.broker.broker()?;
            let default_addr = config.grpc_addr.port() == 50051;
            let flows = config.shipped_flows();
            let app = Orchestrator::builder(config)
                .flows(flows)
                .start(shutdown.clone())
                .await?;
            let mut participants =
                demo::start(&Service::ALL, demo_config, shutdown.clone()).await?;
            participants.ready().await;
            print_instructions(app.grpc_addr(), app.http_addr(), default_addr);
            tokio::spawn(stop_on_signal(shutdown));
            tokio::join!(app.run_until_stopped(), participants.stopped());
        }
    }
    Ok(())
}

fn print_instructions(
    addr: std::net::SocketAddr,
    console: Option<std::net::SocketAddr>,
    default_addr: bool,
) {
    let sagactl = if default_addr {
        "cargo run --release --bin sagactl --".to_owned()
    } else {
        format!("cargo run --release --bin sagactl -- --addr http://{addr}")
    };
    let console = console
        .map(|a| format!("\nOpen the console: http://{a}/\n"))
        .unwrap_or_default();
    println!(
        r#"
saga-orchestrator is running on {addr} with the demo participants inventory, payment, orders and notification.
{console}
Place an order (completes):
  {sagactl} start order_placement --wait --input '{{"order_id":"o-1","customer_id":"alice","items":[{{"sku":"sku-1","quantity":2,"unit_price_cents":1999}}]}}'

Place an order that cannot be served (more than the stock: compensates):
  {sagactl} start order_placement --wait --input '{{"order_id":"o-2","customer_id":"alice","items":[{{"sku":"sku-2","quantity":2000000000,"unit_price_cents":1}}]}}'

Then: {sagactl} list [--order-id o-1] | get <saga-id> | watch <saga-id> | types | dead-letters list
Stop with Ctrl-C.
"#
    );
}
