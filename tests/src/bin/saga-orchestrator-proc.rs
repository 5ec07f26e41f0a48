//! `saga-orchestrator-proc`: `orchestrator serve` with the crash points of
//! `FAILPOINTS` armed, run as a child process by the failure-injection
//! suites (see `saga_tests::processes`).

fn main() -> anyhow::Result<()> {
    saga_tests::processes::entry::orchestrator(std::env::args())?;
    Ok(())
}
