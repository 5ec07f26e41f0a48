//! `saga-chaos`: see `saga_tests::chaos`.

fn main() -> anyhow::Result<()> {
    Ok(())
}
