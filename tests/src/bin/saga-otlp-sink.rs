//! `saga-otlp-sink [ADDR]`: an OTLP/gRPC trace endpoint that counts the
//! spans it receives and drops them, printing the count every 5 s; what
//! `saga-bench` runs export to when measuring the cost of tracing
//! (BENCHMARKS.md). Default address 127.0.0.1:4317.

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".to_owned())
        .parse()?;
    let sink = saga_tests::otlp::Collector::listen(addr, true).await?;
    eprintln!("counting spans sent to {}", sink.endpoint());
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ticks.tick() => eprintln!("spans received: {}", sink.counted()),
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("spans received: {}", sink.counted());
    Ok(())
}
