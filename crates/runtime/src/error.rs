use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

/// What went wrong with a sandbox, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the namespace backend must run as root: it creates cgroups and maps uids for every \
         sandbox; run burrow as root"
    )]
    NotRoot,

    #[error(
        "the data directory {dir} is too long: envd's socket {socket} would be {len} bytes, over \
         the 107-byte limit of unix socket paths; use a data directory of at most 80 bytes"
    )]
    DataDirTooLong {
        dir: PathBuf,
        socket: PathBuf,
        len: usize,
    },

    #[error("invalid node id {0:?}: node ids are 1 to 32 characters of [a-z0-9]")]
    NodeId(String),

    #[error("invalid sandbox id {0:?}: sandbox ids are 12 characters of [a-z0-9]")]
    SandboxId(String),

    #[error("invalid limits: {0}")]
    Limits(String),

    #[error("environment {name} is unavailable on this host: {reason}")]
    Unavailable { name: String, reason: String },

    #[error(
        "no usable cgroups: {0}. burrow needs either cgroup v2 at /sys/fs/cgroup with the memory \
         and pids controllers, or cgroup v1 memory and pids hierarchies at /sys/fs/cgroup/memory \
         and /sys/fs/cgroup/pids"
    )]
    Cgroups(String),

    #[error(
        "cannot create the sandbox's namespaces: {0}. burrow needs user, mount, pid, network, ipc \
         and uts namespaces (kernel 5.19 or later; user namespaces enabled: check \
         /proc/sys/user/max_user_namespaces and, on Ubuntu, \
         kernel.apparmor_restrict_unprivileged_userns)"
    )]
    Clone(std::io::Error),

    #[error("sandbox {id} exited while starting ({status}); the end of its log:\n{log}")]
    DiedDuringStart {
        id: String,
        status: ExitStatus,
        log: String,
    },

    #[error(
        "sandbox {id} did not answer GET /ping on {socket} within {timeout:?}; the end of its \
         log:\n{log}"
    )]
    StartTimeout {
        id: String,
        socket: PathBuf,
        timeout: Duration,
        log: String,
    },

    #[error(
        "sandbox {id} still has processes {timeout:?} after it was killed; its cgroup is {cgroup}"
    )]
    KillTimeout {
        id: String,
        cgroup: PathBuf,
        timeout: Duration,
    },

    #[error(
        "uid base {uid_base} is too high: its 65536 ids and the 65536 user namespace owners \
         after them must end at or below {first}, where the sandboxes' own id ranges begin; use a lower uid base (the default is 100000)"
    )]
    UidBaseOverlaps { uid_base: u32, first: u32 },

    #[error(
        "no free host id range: all {slots} ranges are held by live sandboxes (their locks are \
         in {dir}); destroy sandboxes before starting more"
    )]
    NoIdSlot { dir: PathBuf, slots: u32 },

    #[error(
        "this kernel or the data dir's filesystem cannot give sandboxes their own id ranges: \
         {reason} (probed in {dir}). burrow needs idmapped mounts of the data dir's filesystem \
         (Linux 5.12 or later; ext4, xfs, btrfs or tmpfs) and overlayfs accepting an idmapped \
         lower layer in a user namespace (Linux 5.19 or later); move the data dir to such a \
         filesystem or upgrade the kernel. burrow does not fall back to one id range shared by \
         every sandbox"
    )]
    IdMappedMounts { dir: PathBuf, reason: String },

    #[error(
        "cannot make the sandboxes' writable layers: {reason}. burrow keeps what each sandbox \
         writes on an ext4 filesystem of its own, on a loop device over a sparse file in the data \
         dir: it needs mkfs.ext4 (e2fsprogs), loop devices and ext4"
    )]
    Layer { reason: String },

    #[error(
        "the writable layer of sandbox {id} is still attached to {device} after its processes \
         are gone: something on the host holds its filesystem or device open (see `lsof` or \
         `fuser -m`); the destroy is retried"
    )]
    LayerBusy { id: String, device: PathBuf },

    #[error("sandbox {id} is not running: its PID 1 is gone")]
    Gone { id: String },

    #[error("cannot save what sandbox {id} wrote: {reason}")]
    Freeze { id: String, reason: String },

    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("sandbox setup failed: cannot {step}: {source}")]
    Setup {
        step: String,
        #[source]
        source: std::io::Error,
    },

    #[error("sandbox setup failed: bad configuration on fd 3: {0}")]
    Config(#[source] serde_json::Error),

    #[error("sandbox setup failed: seccomp filter: {0}")]
    Seccomp(String),

    #[error("sandbox networking: cannot {step}: {source}")]
    Network {
        step: String,
        #[source]
        source: std::io::Error,
    },

    #[error("sandbox networking: {reason}")]
    NetworkSetup { reason: String },

    #[error(
        "sandbox networking needs nftables, which is not installed: install it with \
         `apt-get install nftables`, or pass --network none for sandboxes without a network"
    )]
    NftMissing,

    #[error(
        "the sandbox subnet {subnet} holds {capacity} sandboxes (a /30 each) and all are taken; \
         pass a larger --sandbox-subnet (a /16 holds 16384)"
    )]
    SubnetFull { subnet: String, capacity: u64 },

    #[error(
        "the sandbox subnet {subnet} overlaps the host's route to {route}; pass a \
         --sandbox-subnet the host does not route"
    )]
    SubnetRouted { subnet: String, route: String },

    #[error(
        "no /16 of 10.0.0.0/8 is free for sandboxes (the host routes or other burrow servers \
         claim them all, see /run/burrow/subnets); pass --sandbox-subnet"
    )]
    NoFreeSubnet,

    #[error(transparent)]
    Environment(#[from] burrow_environments::Error),
}

/// Adds what was being done, and to which path, to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T, Error>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T, Error> {
        self.map_err(|source| Error::Io {
            action,
            path: path.to_owned(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T, Error> {
        self.map_err(std::io::Error::from).ctx(action, path)
    }
}

/// Adds the setup step to an error of the in-sandbox setup.
pub(crate) trait SetupContext<T> {
    fn step(self, step: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> SetupContext<T> for std::io::Result<T> {
    fn step(self, step: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::Setup {
            step: step(),
            source,
        })
    }
}

impl<T> SetupContext<T> for nix::Result<T> {
    fn step(self, step: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(std::io::Error::from).step(step)
    }
}
