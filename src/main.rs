//! `burrow`: the server, the CLI, and (as `burrow sandbox-init`) the agent inside each sandbox.

mod sandbox_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "burrow", version, about = "Self-hosted, E2B-compatible sandboxes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a fresh sandbox of an environment and print its output (debugging aid).
    SandboxRun(sandbox_cmd::RunArgs),
    /// The first process inside a sandbox; started by the server, never by hand.
    #[command(hide = true)]
    SandboxInit,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::SandboxInit => sandbox_cmd::init(),
        Command::SandboxRun(args) => sandbox_cmd::run(args),
    }
}
