//! Sandboxes: isolated Linux process trees on namespaces, an overlay root, cgroups and seccomp.
//! Owns creating, destroying and finding sandboxes; knows nothing of sessions, keys or HTTP.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// Relative CPU weight, 1..=10000, 100 is the default share.
    pub cpu_weight: u64,
    /// Size of the writable layer (everything the sandbox writes to its filesystem).
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

/// A running sandbox as the rest of burrow sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// 12 `[a-z0-9]` characters, unique on this node.
    pub id: String,
    /// envd's unix socket on the host (see ARCHITECTURE.md for what it serves).
    pub socket: PathBuf,
}
