//! `orchestrator serve`: runs the saga orchestrator.

use clap::{Parser, Subcommand};
use orchestrator::{Application, Config, telemetry};
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            telemetry::init(config.log_format);
            let shutdown = CancellationToken::new();
            let app =
                Application::build(config, sagas::Catalog::standard(), shutdown.clone()).await?;
            tokio::spawn(stop_on_signal(shutdown));
            app.run_until_stopped().await;
        }
    }
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can install a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}
