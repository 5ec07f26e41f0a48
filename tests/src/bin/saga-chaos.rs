//! `saga-chaos --duration 60s --seed N --rate R`: see `saga_tests::chaos`.

fn main() -> anyhow::Result<()> {
    saga_tests::chaos::main()
}
