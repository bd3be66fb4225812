//! `burrow sandbox-init` (the sandbox's PID 1, which becomes envd) and `burrow sandbox-run`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitStatus;

use anyhow::Context;
use burrow_environments::Catalog;
use burrow_runtime::init::{self, InitConfig, Role};
use burrow_runtime::{Backend, Command, Limits, Namespaces, RuntimeConfig, SandboxSpec};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The data dir: environments' root filesystems and sandboxes' run directories.
    #[arg(long, env = "BURROW_DATA_DIR", default_value = "burrow-data")]
    data_dir: PathBuf,
    /// The environment to run in (`burrow env ls` lists them).
    #[arg(long = "env", default_value = "Bash")]
    environment: String,
    /// Memory limit in bytes, or with a K, M, G suffix [default: 512M].
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Most processes (and threads) alive at once [default: 256].
    #[arg(long)]
    pids: Option<u64>,
    /// Size of the writable layer, in bytes or with a K, M, G suffix [default: 1G].
    #[arg(long, value_parser = parse_size)]
    disk: Option<u64>,
    /// Relative CPU weight, 1 to 10000 [default: 100].
    #[arg(long)]
    cpu_weight: Option<u64>,
    /// Run the command as the sandbox's root instead of `user`.
    #[arg(long)]
    root: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// The first process of a sandbox: reads its configuration from fd 3, builds the sandbox
/// around itself, then serves envd (or runs `sandbox-run`'s command) as PID 1.
pub fn init() -> anyhow::Result<()> {
    let (config, dirs) = init::receive()?;
    match init::enter(&config, dirs)? {
        Role::Envd(listener) => {
            burrow_envd::run(listener, envd_config(config)).context("envd stopped")
        }
        Role::Command(exec) => std::process::exit(init::run_command(&config, &exec)?),
    }
}

fn envd_config(config: InitConfig) -> burrow_envd::Config {
    burrow_envd::Config {
        uid: config.user.uid,
        gid: config.user.gid,
        user: config.user.name,
        home: config.user.home,
        workdir: config.workdir,
        ready_shell: config.ready_shell,
        shell: config.user.shell,
        env: config.env,
    }
}

/// Runs one command in a fresh sandbox, passes its output through, reports how it ended,
/// destroys the sandbox, and exits with the command's code.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = runtime.block_on(run_in_sandbox(args))?;
    std::process::exit(code)
}

async fn run_in_sandbox(args: RunArgs) -> anyhow::Result<i32> {
    let catalog = Catalog::load(&args.data_dir, RuntimeConfig::DEFAULT_UID_BASE)?;
    let Some(environment) = catalog.get(&args.environment) else {
        let names: Vec<String> = catalog.list().iter().map(|e| e.name.clone()).collect();
        anyhow::bail!(
            "unknown environment {:?}; the environments are {}",
            args.environment,
            names.join(", ")
        );
    };
    let defaults = Limits::default();
    let spec = SandboxSpec {
        environment: environment.clone(),
        limits: Limits {
            memory_bytes: args.memory.unwrap_or(defaults.memory_bytes),
            pids: args.pids.unwrap_or(defaults.pids),
            cpu_weight: args.cpu_weight.unwrap_or(defaults.cpu_weight),
            disk_bytes: args.disk.unwrap_or(defaults.disk_bytes),
        },
        ready_shell: false,
        egress: environment.egress.clone(),
    };
    // A node id of its own, so a server sharing the data dir never adopts or sweeps it.
    let node_id = format!("run{}", std::process::id());
    let backend = Namespaces::new(RuntimeConfig::new(&args.data_dir, node_id))?;
    let result = run_command(&backend, &spec, args.command, args.root).await;
    backend.remove_node_cgroups();
    result
}

async fn run_command(
    backend: &Namespaces,
    spec: &SandboxSpec,
    argv: Vec<String>,
    as_root: bool,
) -> anyhow::Result<i32> {
    // The command writes into sockets, not onto this terminal: a terminal would let it inject
    // input into the shell that ran sandbox-run.
    let (stdout, stdout_writer) = UnixStream::pair()?;
    let (stderr, stderr_writer) = UnixStream::pair()?;
    let command = Command {
        argv,
        as_root,
        stdout: stdout_writer.into(),
        stderr: stderr_writer.into(),
    };
    let copiers = [
        pass_through(stdout, std::io::stdout),
        pass_through(stderr, std::io::stderr),
    ];
    let sandbox = backend.spawn_command(spec, command).await?;
    let status = tokio::select! {
        status = backend.wait_status(&sandbox.id) => status,
        _ = tokio::signal::ctrl_c() => None,
    };
    backend.destroy(&sandbox.id).await?;
    // Every writer is dead now, so the copies end.
    for copier in copiers {
        let _ = copier.join();
    }
    eprintln!(
        "burrow sandbox-run: sandbox {} {}",
        sandbox.id,
        describe(status)
    );
    Ok(status.map_or(130, init::shell_code))
}

/// Copies the command's output to ours on a thread of its own, until every writer is gone.
fn pass_through<W: Write + 'static>(
    mut from: UnixStream,
    output: fn() -> W,
) -> std::thread::JoinHandle<std::io::Result<u64>> {
    std::thread::spawn(move || std::io::copy(&mut from, &mut output()))
}

fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "interrupted; destroyed".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            _ => format!("ended with {s}"),
        },
    }
}

/// `1024`, `64K`, `512M`, `2G`: bytes, in powers of 1024.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        Some((i, 't' | 'T')) => (&text[..i], 40),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a size: use bytes or a K, M, G or T suffix"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
