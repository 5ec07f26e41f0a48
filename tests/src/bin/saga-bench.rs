//! `saga-bench`: see `saga_tests::bench`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    saga_tests::bench::main_with(saga_tests::bench::Args::parse()).await
}
