//! `burrow sandbox-init` (the sandbox's PID 1, which becomes envd) and `burrow sandbox-run`.

#[derive(clap::Args)]
pub struct RunArgs {}

pub fn init() -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}

pub fn run(_args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
