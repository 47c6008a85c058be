//! `cargo xtask bench`: see issue 5. Filled in by the benchmark work.

#[derive(clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("the benchmark suite is not written yet")
}
