//! `burrow`: the server, the CLI, and (as `burrow sandbox-init`) the agent inside each sandbox.

mod bench;
mod child_server;
mod cli;
mod env_build;
mod sandbox_cmd;
mod serve;
mod soak;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "burrow",
    version,
    about = "Self-hosted, E2B-compatible sandboxes on Linux namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: the REST API and the sandboxes' hostnames on one listener.
    Serve(Box<serve::ServeArgs>),
    /// Create, list and revoke API keys (works while the server runs).
    #[command(subcommand)]
    Keys(cli::KeysCommand),
    /// List environments and whether this host can run them; build their images.
    #[command(subcommand)]
    Env(cli::EnvCommand),
    /// Create, list and delete sessions through a running server's API.
    #[command(subcommand)]
    Session(cli::SessionCommand),
    /// Measure sandbox and session latencies and memory against a raw `unshare` baseline.
    Bench(bench::BenchArgs),
    /// Drive hundreds of SDK-like sessions for a long time; fail on any error or server drift.
    Soak(soak::SoakArgs),
    /// Run a command in a fresh sandbox of an environment and print its output (debugging aid).
    SandboxRun(sandbox_cmd::RunArgs),
    /// The first process inside a sandbox; started by the server, never by hand.
    #[command(hide = true)]
    SandboxInit,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        // Must stay first and runtime-free: it runs single-threaded inside a new sandbox.
        Command::SandboxInit => sandbox_cmd::init(),
        Command::SandboxRun(args) => sandbox_cmd::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Keys(cmd) => cli::keys(cmd),
        Command::Env(cmd) => cli::env(cmd),
        Command::Session(cmd) => cli::session(cmd),
        Command::Bench(args) => bench::run(args),
        Command::Soak(args) => soak::run(args),
    }
}
