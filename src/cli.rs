//! The CLI's commands other than `serve`: keys and environments (on the data dir, so they work
//! whether or not a server runs), and sessions (through a running server's public API).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use burrow_client::Client;
use burrow_environments::Catalog;
use burrow_store::Store;

use crate::serve::prepare_data_dir;

#[derive(clap::Args)]
pub struct DataDir {
    /// The server's data dir.
    #[arg(long, env = "BURROW_DATA_DIR", default_value = "burrow-data")]
    data_dir: PathBuf,
}

impl DataDir {
    fn store(&self) -> anyhow::Result<Store> {
        let dir = prepare_data_dir(&self.data_dir)?;
        Ok(Store::open(&dir.join("burrow.db"))?)
    }
}

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Make a new key; it is printed once, as the last line.
    Create {
        /// The team the key acts for (created if new). A team sees only its own sessions.
        #[arg(long, default_value = "default")]
        team: String,
        /// An admin key sees and deletes every team's sessions.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// List keys (their public IDs, never their secrets).
    List {
        #[command(flatten)]
        data: DataDir,
    },
    /// Revoke a key, named by its ID or its full text.
    Revoke {
        key: String,
        #[command(flatten)]
        data: DataDir,
    },
}

pub fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create { team, admin, data } => {
            let key = data.store()?.create_key(&team, admin)?;
            eprintln!(
                "created {}key {} for team {:?}; it is shown only now:",
                if admin { "admin " } else { "" },
                key.id,
                team
            );
            println!("{}", key.key);
        }
        KeysCommand::List { data } => {
            println!("{:<10} {:<24} {:<6} {:<8}", "ID", "TEAM", "ADMIN", "STATE");
            for k in data.store()?.keys()? {
                println!(
                    "{:<10} {:<24} {:<6} {:<8}",
                    k.id,
                    k.team,
                    if k.admin { "yes" } else { "no" },
                    if k.revoked { "revoked" } else { "active" }
                );
            }
        }
        KeysCommand::Revoke { key, data } => {
            if !data.store()?.revoke_key(&key)? {
                anyhow::bail!("no active key {key:?}: see `burrow keys list`");
            }
            println!("revoked");
        }
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum EnvCommand {
    /// List environments, whether this host can run them and why not, and what they run from
    /// (a built image's version, or the host).
    Ls {
        #[command(flatten)]
        data: DataDir,
    },
    /// Build an environment's self-contained Debian image from its definition
    /// (`environments/NAME.toml` in the repository) with mmdebstrap, installed when missing.
    /// An unchanged definition rebuilds nothing. Servers use a new image from their next
    /// start; running sessions keep theirs. Ctrl-C cancels, leaving the previous image in
    /// service.
    Build {
        /// The environment (`Python3`, `Nodejs`, ...).
        #[arg(required_unless_present = "all")]
        name: Option<String>,
        /// Build every built-in environment that can be built.
        #[arg(long, conflicts_with = "name")]
        all: bool,
        /// Build NAME from this definition file instead of its built-in one.
        #[arg(long, requires = "name")]
        file: Option<PathBuf>,
        #[command(flatten)]
        data: DataDir,
    },
}

pub fn env(cmd: EnvCommand) -> anyhow::Result<()> {
    match cmd {
        EnvCommand::Ls { data } => {
            let dir = prepare_data_dir(&data.data_dir)?;
            let catalog = Catalog::load(&dir, burrow_runtime::RuntimeConfig::DEFAULT_UID_BASE)?;
            println!("{:<10} {:<11} {:<18} DETAILS", "NAME", "STATE", "SOURCE");
            for env in catalog.list() {
                let (state, details) = match &env.availability {
                    Ok(()) => ("available", ""),
                    Err(why) => ("unavailable", why.as_str()),
                };
                println!(
                    "{:<10} {state:<11} {:<18} {details}",
                    env.name,
                    env.source()
                );
            }
        }
        EnvCommand::Build {
            name,
            all,
            file,
            data,
        } => crate::env_build::run(crate::env_build::Request {
            name,
            all,
            file,
            data_dir: data.data_dir,
        })?,
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "BURROW_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    /// API key.
    #[arg(long, env = "BURROW_API_KEY")]
    api_key: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum SessionCommand {
    /// Create a session of an environment; prints its ID as the last line.
    Create {
        environment: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List your team's sessions.
    Ls {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a session.
    Rm {
        session_id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

pub fn session(cmd: SessionCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            SessionCommand::Create {
                environment,
                server,
            } => {
                let s = client(&server)?.create_session(&environment).await?;
                eprintln!(
                    "session {} ({}) is running; envd at 49982-{}-{}.<domain>",
                    s.session_id, s.environment, s.session_id, s.client_id
                );
                println!("{}", s.session_id);
            }
            SessionCommand::Ls { server } => {
                println!("{:<22} {:<10} {:<9} EDIT", "SESSION", "ENV", "CLIENT");
                for s in client(&server)?.list_sessions().await? {
                    println!(
                        "{:<22} {:<10} {:<9} {}",
                        s.session_id, s.environment, s.client_id, s.edit_enabled
                    );
                }
            }
            SessionCommand::Rm { session_id, server } => {
                client(&server)?.delete_session(&session_id).await?;
                println!("deleted {session_id}");
            }
        }
        anyhow::Ok(())
    })
}

fn client(server: &ServerArgs) -> anyhow::Result<Client> {
    Client::new(&server.url, server.api_key.clone()).context("bad --url")
}

/// `15s`, `500ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 15s, 500ms, 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    if d.is_zero() {
        return Err("a duration must be positive".into());
    }
    Ok(d)
}

/// `512MiB`, `1GiB`, `64KiB`, `1000000` (bytes); decimal `MB`/`GB` too.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512MiB"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" | "m" => 1 << 20,
        "GiB" | "G" | "g" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use KiB, MiB or GiB")),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err() && parse_duration("x").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert!(parse_bytes("1TiB").is_err() && parse_bytes("0").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
    }
}
