//! Sandboxes: isolated Linux process trees on namespaces, an overlay root, cgroups and seccomp.
//! Owns creating, destroying and finding sandboxes; knows nothing of sessions, keys or HTTP.
//!
//! The host side is [`Namespaces`], the [`Backend`] the server uses. The sandbox side is
//! [`init`]: what `burrow sandbox-init` runs as the first process of a new sandbox, before it
//! becomes envd.

mod cgroup;
mod error;
mod firewall;
mod idmap;
mod ids;
pub mod init;
mod layer;
mod namespaces;
mod net;
mod ping;
mod resolver;
mod seccomp;
mod spawn;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use burrow_environments::Environment;
pub use error::Error;
pub use layer::available_bytes;
pub use namespaces::{Command, Namespaces};
pub use net::Subnet;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// Relative CPU weight, 1..=10000, 100 is the default share.
    pub cpu_weight: u64,
    /// Size of the writable layer (everything the sandbox writes to its filesystem): a
    /// filesystem of its own on the host's disk (see `layer.rs`), not memory.
    pub disk_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 << 20,
            pids: 256,
            cpu_weight: 100,
            disk_bytes: 1 << 30,
        }
    }
}

impl Limits {
    /// Rejects limits a sandbox cannot start with (envd alone needs some memory and processes).
    pub fn validate(&self) -> Result<(), Error> {
        let problem = if self.memory_bytes < 16 << 20 {
            "memory must be at least 16 MiB"
        } else if self.pids < 8 {
            "pids must be at least 8"
        } else if !(1..=10_000).contains(&self.cpu_weight) {
            "cpu weight must be between 1 and 10000"
        } else if self.disk_bytes < 1 << 20 {
            "disk must be at least 1 MiB"
        } else {
            return Ok(());
        };
        Err(Error::Limits(format!("{problem} (got {self:?})")))
    }
}

/// A running sandbox as the rest of burrow sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// 12 `[a-z0-9]` characters, unique on this node.
    pub id: String,
    /// envd's unix socket on the host (see ARCHITECTURE.md for what it serves).
    pub socket: PathBuf,
    /// Host uid (and gid) of the sandbox's root: its ids 0..65536 map from here, a range no
    /// other live sandbox has.
    pub uid_base: u32,
}

/// What [`Backend::freeze`] gives: a frozen sandbox's writable layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    /// The upper layer of its overlay root, readable until the sandbox is destroyed.
    pub upper: PathBuf,
    /// How the owners of `upper` (host ids of the sandbox's own range) translate to the
    /// storage range the environments' roots are kept in.
    pub owners: burrow_environments::snapshots::IdShift,
}

/// What to start a sandbox from.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub environment: Arc<Environment>,
    pub limits: Limits,
    /// Start the login shell of the sandbox's first command ahead of it, for a sandbox that
    /// will wait (in the warm pool) before its client arrives: that client's first command then
    /// skips the shell's start. A sandbox whose client is already waiting gains nothing by it.
    pub ready_shell: bool,
    /// The environment's network policy (normally `environment.egress`), bounded by the
    /// server's (see [`NetworkConfig`]).
    pub egress: burrow_environments::Egress,
}

/// A way of running sandboxes. [`Namespaces`] is the one there is.
pub trait Backend: Send + Sync + 'static {
    /// Starts a sandbox; returns once its envd answers `GET /ping` on [`Sandbox::socket`].
    fn create<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Sandbox, Error>>;

    /// Kills every process of the sandbox, waits until they are gone, and removes its cgroups and
    /// run directory. Destroying a sandbox that is already gone succeeds.
    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// Ids of the sandboxes present on this node (cgroups or run directories), including those a
    /// previous run of the server left behind.
    fn list(&self) -> Result<Vec<String>, Error>;

    /// Whether the sandbox's envd answers `GET /ping`.
    fn probe<'a>(&'a self, id: &'a str) -> BoxFuture<'a, bool>;

    /// Whether the sandbox's PID 1 (envd) is still running, as this server knows without asking
    /// it (from the pidfd of a sandbox it started); `None` for one it did not start.
    fn running(&self, id: &str) -> Option<bool>;

    /// Resolves once the sandbox has died on its own (or is gone); works for sandboxes a
    /// previous run of the server started.
    fn wait_exit<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;

    /// envd's unix socket of the sandbox on the host.
    fn socket_path(&self, id: &str) -> PathBuf;

    /// Stops every process of the sandbox where it is and returns the directory of everything
    /// it wrote (the upper layer of its overlay root), readable until it is destroyed: how an
    /// edit session's changes are saved. Works for sandboxes a previous run of the server
    /// started.
    fn freeze<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Frozen, Error>>;

    /// [`Sandbox::uid_base`] of a live sandbox, from its PID 1's id map: works for sandboxes a
    /// previous run of the server started.
    fn uid_base(&self, id: &str) -> Result<u32, Error>;
}

/// How [`Namespaces`] runs sandboxes on this node.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Holds `run/<id>/` (envd's socket, the init log), `stage/` (a mount point every sandbox
    /// uses in its own mount namespace) and `environments/`. At most 80 bytes once absolute.
    pub data_dir: PathBuf,
    /// Names this node's cgroups (`burrow/<node-id>/`); 1 to 32 `[a-z0-9]`.
    pub node_id: String,
    /// Where the environments' root filesystems store a sandbox's ids on disk: id `x` is host id
    /// `uid_base + x`. Each sandbox runs in a host id range of its own (see `ids.rs`), which
    /// sees these files through an idmapped mount.
    pub uid_base: u32,
    /// The burrow binary, re-executed as `burrow sandbox-init` inside every sandbox.
    pub init_program: PathBuf,
    /// How long envd has to answer its first `/ping`.
    pub start_timeout: Duration,
    /// Sandboxes' network beyond `lo`: `None` for none.
    pub network: Option<NetworkConfig>,
}

/// Sandboxes with the internet: a veth each, NAT out, fenced by nftables (`firewall.rs`), DNS
/// through burrow's forwarder (`resolver.rs`).
#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    /// Where the sandboxes' addresses come from; `None` for a /16 of 10.0.0.0/8 the host does
    /// not route (kept in `<data>/network/subnet` for later runs).
    pub subnet: Option<Subnet>,
    /// Where their DNS queries go; empty for the host's name servers (`/etc/resolv.conf`).
    pub dns_upstream: Vec<std::net::SocketAddr>,
    /// When not empty, sandboxes reach only these (and what an environment allows within them).
    pub egress_allow: Vec<burrow_environments::Cidr>,
    /// Sandboxes never reach these, whatever an allow list says.
    pub egress_deny: Vec<burrow_environments::Cidr>,
}

impl RuntimeConfig {
    /// The default [`RuntimeConfig::uid_base`]: above the ids of ordinary host accounts.
    pub const DEFAULT_UID_BASE: u32 = 100_000;

    pub fn new(data_dir: impl Into<PathBuf>, node_id: impl Into<String>) -> RuntimeConfig {
        RuntimeConfig {
            data_dir: data_dir.into(),
            node_id: node_id.into(),
            uid_base: Self::DEFAULT_UID_BASE,
            init_program: "/proc/self/exe".into(),
            start_timeout: Duration::from_secs(10),
            network: None,
        }
    }
}

/// Sandbox ids are 12 `[a-z0-9]` characters: safe as path components and host names.
pub fn valid_sandbox_id(id: &str) -> bool {
    id.len() == 12 && lower_alphanumeric(id)
}

fn lower_alphanumeric(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids() {
        assert!(valid_sandbox_id("abc123def456"));
        assert!(!valid_sandbox_id("abc123def45"));
        assert!(!valid_sandbox_id("ABC123DEF456"));
        assert!(!valid_sandbox_id("../../etc/xx"));
    }

    #[test]
    fn limits() {
        assert!(Limits::default().validate().is_ok());
        let small = Limits {
            memory_bytes: 1 << 20,
            ..Limits::default()
        };
        assert!(
            small
                .validate()
                .unwrap_err()
                .to_string()
                .contains("at least 16 MiB")
        );
        let weight = Limits {
            cpu_weight: 0,
            ..Limits::default()
        };
        assert!(weight.validate().is_err());
    }
}
