//! The sandboxes' cgroups: limits, membership, kill, emptiness.
//!
//! Two layouts. Pure cgroup v2 (memory and pids controllers in `/sys/fs/cgroup`): one cgroup per
//! sandbox at `/sys/fs/cgroup/burrow/<node>/<id>` does everything. Hybrid or v1 (this project's
//! CI machines): the limits live in the v1 `memory`, `pids` and `cpu` hierarchies at
//! `/sys/fs/cgroup/{memory,pids,cpu}/burrow/<node>/<id>`, and a controller-less v2 cgroup at
//! `/sys/fs/cgroup/unified/burrow/<node>/<id>` gives `cgroup.kill` and `cgroup.events`; without
//! one, the v1 pids cgroup's `cgroup.procs` tracks the processes.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::timeout;

use crate::error::{Error, IoContext};
use crate::{Limits, valid_sandbox_id};

pub(crate) const ROOT: &str = "/sys/fs/cgroup";

/// What one hierarchy's cgroup of a sandbox is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// cgroup v1 `memory`.
    Memory,
    /// cgroup v1 `pids`.
    Pids,
    /// cgroup v1 `cpu`.
    Cpu,
    /// A cgroup v2 cgroup: tracking and killing always; the limits too where the controllers
    /// are enabled (`cpu` only if that controller is available).
    Unified { limits: bool, cpu: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    role: Role,
    /// `<mount>/burrow/<node>`: the parent of the node's sandbox cgroups.
    node_dir: PathBuf,
}

/// The cgroups of one node's sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cgroups {
    hierarchies: Vec<Hierarchy>,
}

impl Cgroups {
    /// Finds out which layout this host has.
    pub fn detect(node: &str) -> Result<Cgroups, Error> {
        let root = Path::new(ROOT);
        let is_v2 =
            |path: &Path| statfs(path).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC);
        if is_v2(root) {
            let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| available.split_whitespace().any(|a| a == c);
            let missing: Vec<&str> = ["memory", "pids"].into_iter().filter(|c| !has(c)).collect();
            if !missing.is_empty() {
                return Err(Error::Cgroups(format!(
                    "cgroup v2 at {ROOT} lacks the {} controller (it offers: {})",
                    missing.join(" and "),
                    available.trim()
                )));
            }
            return Ok(Cgroups::unified(root, node, has("cpu")));
        }
        for (controller, file) in [
            ("memory", "memory.limit_in_bytes"),
            ("pids", "cgroup.procs"),
        ] {
            if !root.join(controller).join(file).exists() {
                return Err(Error::Cgroups(format!(
                    "the cgroup v1 {controller} controller is not mounted at {ROOT}/{controller}"
                )));
            }
        }
        let cpu = root.join("cpu/cpu.shares").exists();
        if !cpu {
            tracing::warn!(
                "no cgroup v1 cpu controller at {ROOT}/cpu: sandboxes get no cpu weight"
            );
        }
        let tracking = is_v2(&root.join("unified"));
        Ok(Cgroups::hybrid(root, node, cpu, tracking))
    }

    fn unified(root: &Path, node: &str, cpu: bool) -> Cgroups {
        Cgroups {
            hierarchies: vec![Hierarchy {
                role: Role::Unified { limits: true, cpu },
                node_dir: root.join("burrow").join(node),
            }],
        }
    }

    fn hybrid(root: &Path, node: &str, cpu: bool, tracking: bool) -> Cgroups {
        let mut hierarchies = vec![
            Hierarchy {
                role: Role::Memory,
                node_dir: root.join("memory/burrow").join(node),
            },
            Hierarchy {
                role: Role::Pids,
                node_dir: root.join("pids/burrow").join(node),
            },
        ];
        if cpu {
            hierarchies.push(Hierarchy {
                role: Role::Cpu,
                node_dir: root.join("cpu/burrow").join(node),
            });
        }
        if tracking {
            hierarchies.push(Hierarchy {
                role: Role::Unified {
                    limits: false,
                    cpu: false,
                },
                node_dir: root.join("unified/burrow").join(node),
            });
        }
        Cgroups { hierarchies }
    }

    /// Creates the node's parent cgroups; in pure v2 also enables the controllers down to them.
    pub fn prepare_node(&self) -> Result<(), Error> {
        for h in &self.hierarchies {
            fs::create_dir_all(&h.node_dir).ctx("create cgroup", &h.node_dir)?;
            if let Role::Unified { limits: true, cpu } = h.role {
                let controllers = if cpu {
                    "+memory +pids +cpu"
                } else {
                    "+memory +pids"
                };
                // The mount root, burrow/ and burrow/<node>/ must all pass the controllers down.
                let mut dirs: Vec<&Path> = h.node_dir.ancestors().take(3).collect();
                dirs.reverse();
                for dir in dirs {
                    let file = dir.join("cgroup.subtree_control");
                    fs::write(&file, controllers).ctx("enable controllers in", &file)?;
                }
            }
        }
        let host = HostSize::read()?;
        for h in &self.hierarchies {
            for (name, value) in node_limit_files(h.role, &host) {
                let file = h.node_dir.join(name);
                fs::write(&file, value).ctx("write", &file)?;
            }
        }
        Ok(())
    }

    /// Removes the node's parent cgroups if no sandbox cgroup is left in them.
    pub fn remove_node(&self) {
        for h in &self.hierarchies {
            let _ = fs::remove_dir(&h.node_dir);
        }
    }

    /// Creates the sandbox's cgroups with their limits set, before any process joins them.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<(), Error> {
        for h in &self.hierarchies {
            let dir = h.node_dir.join(id);
            fs::create_dir(&dir).ctx("create cgroup", &dir)?;
            for (file, value) in limit_files(h.role, limits) {
                let path = dir.join(file);
                let optional =
                    file.contains("swap") || file.contains("memsw") || file.contains("kmem");
                match fs::write(&path, &value) {
                    Err(e) if optional && e.kind() == ErrorKind::NotFound => {}
                    result => result.ctx("set cgroup limit", &path)?,
                }
            }
        }
        Ok(())
    }

    /// The sandbox's cgroup v2 cgroup, if this layout has one: the sandbox's first process is
    /// cloned straight into it (`CLONE_INTO_CGROUP`), which spares a migration. Migrations are
    /// slow when cold: each waits for an RCU grace period (~10 ms here).
    pub fn clone_target(&self, id: &str) -> Option<PathBuf> {
        self.hierarchies
            .iter()
            .find(|h| matches!(h.role, Role::Unified { .. }))
            .map(|h| h.node_dir.join(id))
    }

    /// Moves a process into every cgroup of the sandbox but the [`Cgroups::clone_target`].
    pub fn add(&self, id: &str, pid: i32) -> Result<(), Error> {
        for h in self
            .hierarchies
            .iter()
            .filter(|h| !matches!(h.role, Role::Unified { .. }))
        {
            let path = h.node_dir.join(id).join("cgroup.procs");
            fs::write(&path, pid.to_string()).ctx("join cgroup", &path)?;
        }
        Ok(())
    }

    /// The cgroup that tells whether the sandbox has processes, and kills them.
    pub fn tracking_dir(&self, id: &str) -> PathBuf {
        let h = self
            .hierarchies
            .iter()
            .find(|h| matches!(h.role, Role::Unified { .. }))
            .or_else(|| self.hierarchies.iter().find(|h| h.role == Role::Pids))
            .expect("every layout has a unified or a pids hierarchy");
        h.node_dir.join(id)
    }

    /// Sends SIGKILL to every process of the sandbox: at once through `cgroup.kill`, else to each
    /// listed process (call again until [`Cgroups::populated`] is false: a process may fork
    /// between the listing and the kill).
    pub fn kill(&self, id: &str) -> Result<(), Error> {
        let kill_file = self.tracking_dir(id).join("cgroup.kill");
        if kill_file.exists() {
            return fs::write(&kill_file, "1").ctx("write", &kill_file);
        }
        for pid in self.pids(id)? {
            // ESRCH: it died meanwhile, which is the goal.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        Ok(())
    }

    /// Freezes every process of the sandbox (cgroup v2 `cgroup.freeze`) and waits until the
    /// kernel reports it frozen.
    pub async fn freeze(&self, id: &str, timeout: Duration) -> Result<(), Error> {
        let dir = self.tracking_dir(id);
        let freeze = dir.join("cgroup.freeze");
        if !freeze.exists() {
            return Err(Error::Freeze {
                id: id.to_owned(),
                reason: format!("this host has no cgroup v2 freezer ({})", freeze.display()),
            });
        }
        fs::write(&freeze, "1").ctx("write", &freeze)?;
        let events = dir.join("cgroup.events");
        let deadline = Instant::now() + timeout;
        loop {
            let text = fs::read_to_string(&events).ctx("read", &events)?;
            if text.lines().any(|l| l.trim() == "frozen 1") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Freeze {
                    id: id.to_owned(),
                    reason: format!("it did not freeze within {timeout:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The host pid of the sandbox's PID 1, if it is alive.
    pub fn init_pid(&self, id: &str) -> Result<Option<i32>, Error> {
        Ok(self.pids(id)?.into_iter().find(|pid| {
            fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .and_then(|ids| ids.split_whitespace().last())
                    == Some("1")
            })
        }))
    }

    fn pids(&self, id: &str) -> Result<Vec<i32>, Error> {
        let path = self.tracking_dir(id).join("cgroup.procs");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).ctx("read", &path),
        }
    }

    /// Whether any process of the sandbox is alive (false once its cgroups are gone).
    pub fn populated(&self, id: &str) -> Result<bool, Error> {
        let dir = self.tracking_dir(id);
        let events = dir.join("cgroup.events");
        match fs::read_to_string(&events) {
            Ok(text) => Ok(says_populated(&text)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(!self.pids(id)?.is_empty()),
            Err(e) => Err(e).ctx("read", &events),
        }
    }

    /// Resolves once no process of the sandbox is left (true), or at `deadline` (false). With
    /// cgroup v2 this sleeps until `cgroup.events` changes (the kernel signals every change as
    /// POLLPRI); without it, it looks again every `poll`.
    pub async fn until_empty(
        &self,
        id: &str,
        poll: Duration,
        deadline: Option<Instant>,
    ) -> Result<bool, Error> {
        let events = fs::File::open(self.tracking_dir(id).join("cgroup.events"))
            .ok()
            // SAFETY: the AsyncFd owns the File, so the descriptor stays open and the same for
            // the AsyncFd's whole life.
            .and_then(|file| {
                unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) }.ok()
            });
        loop {
            // Reading through the watched descriptor also re-arms its POLLPRI.
            let mut text = [0u8; 128];
            let populated = match events.as_ref().map(|fd| fd.get_ref().read_at(&mut text, 0)) {
                Some(Ok(n)) => says_populated(&String::from_utf8_lossy(&text[..n])),
                // ENODEV: the cgroup was removed.
                _ => self.populated(id)?,
            };
            if !populated {
                return Ok(true);
            }
            let pause = match deadline {
                Some(deadline) if Instant::now() >= deadline => return Ok(false),
                Some(deadline) => poll.min(deadline - Instant::now()),
                None => poll,
            };
            match &events {
                Some(fd) => {
                    if let Ok(Ok(mut ready)) = timeout(pause, fd.ready(Interest::PRIORITY)).await {
                        ready.clear_ready();
                    }
                }
                None => tokio::time::sleep(pause).await,
            }
        }
    }

    /// Whether any cgroup of the sandbox exists.
    pub fn exists(&self, id: &str) -> bool {
        self.hierarchies
            .iter()
            .any(|h| h.node_dir.join(id).exists())
    }

    /// Removes the sandbox's (empty) cgroups; a missing one is fine.
    pub fn remove(&self, id: &str) -> Result<(), Error> {
        for h in &self.hierarchies {
            let dir = h.node_dir.join(id);
            match fs::remove_dir(&dir) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(e).ctx("remove cgroup", &dir);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Ids of the sandbox cgroups of this node, in any hierarchy.
    pub fn ids(&self) -> Result<Vec<String>, Error> {
        let mut ids = Vec::new();
        for h in &self.hierarchies {
            ids.extend(sandbox_dirs(&h.node_dir)?);
        }
        Ok(ids)
    }
}

fn says_populated(events: &str) -> bool {
    events.lines().any(|line| line.trim() == "populated 1")
}

/// Names of the subdirectories of `dir` that are sandbox ids (none if `dir` is missing).
pub(crate) fn sandbox_dirs(dir: &Path) -> Result<Vec<String>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).ctx("list", dir),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.ctx("list", dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if valid_sandbox_id(&name) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            ids.push(name);
        }
    }
    Ok(ids)
}

/// The files (and values) that set a sandbox's limits in one hierarchy.
/// What the node's limits are computed from.
#[derive(Debug, Clone, Copy)]
struct HostSize {
    /// `/proc/sys/kernel/pid_max`.
    pid_max: u64,
    /// `MemTotal` of `/proc/meminfo`, in bytes.
    memory_bytes: u64,
}

impl HostSize {
    fn read() -> Result<HostSize, Error> {
        let pid_max_path = Path::new("/proc/sys/kernel/pid_max");
        let meminfo_path = Path::new("/proc/meminfo");
        let invalid = |path: &Path| {
            let e = std::io::Error::new(ErrorKind::InvalidData, "unexpected content");
            Err(e).ctx("parse", path)
        };
        let pid_max = fs::read_to_string(pid_max_path).ctx("read", pid_max_path)?;
        let Ok(pid_max) = pid_max.trim().parse() else {
            return invalid(pid_max_path);
        };
        let meminfo = fs::read_to_string(meminfo_path).ctx("read", meminfo_path)?;
        let kib = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok());
        let Some(kib) = kib else {
            return invalid(meminfo_path);
        };
        Ok(HostSize {
            pid_max,
            memory_bytes: kib << 10,
        })
    }
}

/// The limits of the node's cgroup, over all its sandboxes together, so that they never take
/// every pid of the host nor make the host (and the server) run out of memory: an OOM stays in
/// the node and kills a sandbox process. A quarter of the pids stays for the host; of the
/// memory, 10% and at least 1 GiB (half of it on a host smaller than 2 GiB).
fn node_limit_files(role: Role, host: &HostSize) -> Vec<(&'static str, String)> {
    let pids = (host.pid_max / 4 * 3).to_string();
    let reserve = (host.memory_bytes / 10)
        .max(1 << 30)
        .min(host.memory_bytes / 2);
    let memory = (host.memory_bytes - reserve).to_string();
    match role {
        Role::Memory => vec![("memory.limit_in_bytes", memory)],
        Role::Pids => vec![("pids.max", pids)],
        Role::Unified { limits: true, .. } => vec![("memory.max", memory), ("pids.max", pids)],
        Role::Cpu | Role::Unified { limits: false, .. } => Vec::new(),
    }
}

fn limit_files(role: Role, limits: &Limits) -> Vec<(&'static str, String)> {
    let memory = limits.memory_bytes.to_string();
    let pids = limits.pids.to_string();
    match role {
        // memsw (memory + swap) only exists with swap accounting; setting it equal to the
        // memory limit keeps the sandbox out of swap. v1 charges TCP socket buffers to a
        // counter of their own, unlimited (and unaccounted) until a limit is set: without one,
        // a sandbox queues gigabytes in loopback connections that no memory limit sees. A
        // quarter of the memory limit on top of it is plenty for a sandbox's own traffic.
        Role::Memory => vec![
            ("memory.limit_in_bytes", memory.clone()),
            ("memory.memsw.limit_in_bytes", memory),
            (
                "memory.kmem.tcp.limit_in_bytes",
                (limits.memory_bytes / 4).to_string(),
            ),
        ],
        Role::Pids => vec![("pids.max", pids)],
        // v1 shares: 1024 is the default, as weight 100 is in v2.
        Role::Cpu => vec![(
            "cpu.shares",
            (limits.cpu_weight * 1024 / 100)
                .clamp(2, 262_144)
                .to_string(),
        )],
        Role::Unified { limits: false, .. } => Vec::new(),
        Role::Unified { limits: true, cpu } => {
            let mut files = vec![
                ("memory.max", memory),
                ("memory.swap.max", "0".to_owned()),
                ("pids.max", pids),
            ];
            if cpu {
                files.push(("cpu.weight", limits.cpu_weight.to_string()));
            }
            files
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(cgroups: &Cgroups, id: &str) -> Vec<String> {
        cgroups
            .hierarchies
            .iter()
            .map(|h| h.node_dir.join(id).display().to_string())
            .collect()
    }

    #[test]
    fn hybrid_paths() {
        let cgroups = Cgroups::hybrid(Path::new(ROOT), "node0001", true, true);
        assert_eq!(
            dirs(&cgroups, "abcdef123456"),
            [
                "/sys/fs/cgroup/memory/burrow/node0001/abcdef123456",
                "/sys/fs/cgroup/pids/burrow/node0001/abcdef123456",
                "/sys/fs/cgroup/cpu/burrow/node0001/abcdef123456",
                "/sys/fs/cgroup/unified/burrow/node0001/abcdef123456",
            ]
        );
        assert_eq!(
            cgroups.tracking_dir("abcdef123456"),
            Path::new("/sys/fs/cgroup/unified/burrow/node0001/abcdef123456")
        );
    }

    #[test]
    fn v1_only_tracks_through_pids() {
        let cgroups = Cgroups::hybrid(Path::new(ROOT), "n", false, false);
        assert_eq!(dirs(&cgroups, "x").len(), 2);
        assert_eq!(
            cgroups.tracking_dir("x"),
            Path::new("/sys/fs/cgroup/pids/burrow/n/x")
        );
    }

    #[test]
    fn unified_paths() {
        let cgroups = Cgroups::unified(Path::new(ROOT), "node0001", true);
        assert_eq!(
            dirs(&cgroups, "abc"),
            ["/sys/fs/cgroup/burrow/node0001/abc"]
        );
        assert_eq!(
            cgroups.tracking_dir("abc"),
            Path::new("/sys/fs/cgroup/burrow/node0001/abc")
        );
    }

    #[test]
    fn limits_per_hierarchy() {
        let limits = Limits {
            memory_bytes: 512 << 20,
            pids: 256,
            cpu_weight: 50,
            disk_bytes: 1 << 30,
        };
        let show = |role| {
            limit_files(role, &limits)
                .into_iter()
                .map(|(f, v)| format!("{f}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            show(Role::Memory),
            "memory.limit_in_bytes=536870912 memory.memsw.limit_in_bytes=536870912 \
             memory.kmem.tcp.limit_in_bytes=134217728"
        );
        assert_eq!(show(Role::Pids), "pids.max=256");
        assert_eq!(show(Role::Cpu), "cpu.shares=512");
        assert_eq!(
            show(Role::Unified {
                limits: false,
                cpu: false
            }),
            ""
        );
        assert_eq!(
            show(Role::Unified {
                limits: true,
                cpu: true
            }),
            "memory.max=536870912 memory.swap.max=0 pids.max=256 cpu.weight=50"
        );
    }

    #[test]
    fn node_limits_leave_a_reserve_to_the_host() {
        let show = |role, pid_max, gib: u64| {
            let host = HostSize {
                pid_max,
                memory_bytes: gib << 30,
            };
            node_limit_files(role, &host)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let unified = Role::Unified {
            limits: true,
            cpu: true,
        };
        // 10% of 64 GiB is more than 1 GiB.
        assert_eq!(
            show(unified, 4_194_304, 64),
            format!(
                "memory.max={} pids.max=3145728",
                (64u64 << 30) - (64u64 << 30) / 10
            )
        );
        // 10% of 4 GiB is less than 1 GiB: 1 GiB stays.
        assert_eq!(
            show(Role::Memory, 32768, 4),
            "memory.limit_in_bytes=3221225472"
        );
        // Below 2 GiB, half stays.
        assert_eq!(
            show(Role::Memory, 32768, 1),
            "memory.limit_in_bytes=536870912"
        );
        assert_eq!(show(Role::Pids, 32768, 4), "pids.max=24576");
        assert_eq!(show(Role::Cpu, 32768, 4), "");
        let tracking = Role::Unified {
            limits: false,
            cpu: false,
        };
        assert_eq!(show(tracking, 32768, 4), "");
    }

    #[test]
    fn cpu_shares_stay_in_range() {
        let shares = |cpu_weight| {
            let limits = Limits {
                cpu_weight,
                ..Limits::default()
            };
            limit_files(Role::Cpu, &limits)[0].1.clone()
        };
        assert_eq!(shares(1), "10");
        assert_eq!(shares(100), "1024");
        assert_eq!(shares(10_000), "102400");
    }
}
