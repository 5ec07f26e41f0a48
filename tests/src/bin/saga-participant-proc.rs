//! `saga-participant-proc`: the demo participants named by `PARTICIPANTS`,
//! with `FAULT_*` knobs and the crash points of `FAILPOINTS` armed, run as a
//! child process by the failure-injection suites (see
//! `saga_tests::processes`).

fn main() -> anyhow::Result<()> {
    saga_tests::processes::entry::participants(std::env::args())?;
    Ok(())
}
