//! Admission control: what the sandboxes of this node were promised (their memory, process
//! and disk limits, summed) stays within what the host has, and one team's part within its
//! share, so that no team can take the memory, processes or disk the other teams' sessions
//! need without ever escaping its sandboxes. Limits are ceilings that idle sandboxes are far
//! below, so memory may be promised a documented number of times over; processes may not, and
//! neither may disk by default: a sandbox's writable layer is a sparse file that grows as it
//! writes, and a data dir filled up would fail every sandbox's writes at once, not just the
//! one that wrote too much.

use std::fmt;
use std::path::Path;

use burrow_runtime::Limits;

/// How much of a resource the host can promise its sandboxes in all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Memory limits summed: the host's memory times the overcommit ratio.
    pub memory_bytes: u64,
    /// Process limits summed: three quarters of `kernel.pid_max` (the rest is the host's).
    pub pids: u64,
    /// Disk limits summed: what the data dir's filesystem has free when the server starts,
    /// less a reserve for everything else it holds (see [`Budget::of_host`]), times the disk
    /// overcommit ratio (1 by default).
    pub disk_bytes: u64,
}

/// Of the data dir's free space, the part the sandboxes may not be promised: for images,
/// saved edit sessions, the databases and the host. The larger of the two.
const DISK_RESERVE_FRACTION: f64 = 0.1;
const DISK_RESERVE_MIN: u64 = 64 << 20;

impl Budget {
    /// This host's budget with memory promised `overcommit` times over and disk
    /// `disk_overcommit` times over, the sandboxes' writable layers being kept in `data_dir`.
    /// The free space is read once, at start: sandboxes adopted from an earlier run count
    /// again in full, though what they wrote is already taken from it (an error on the safe
    /// side).
    pub fn of_host(
        overcommit: f64,
        data_dir: &Path,
        disk_overcommit: f64,
    ) -> std::io::Result<Budget> {
        let memory = read_first_number("/proc/meminfo", "MemTotal:").map_or(0, |kib| kib << 10);
        let pid_max = read_first_number("/proc/sys/kernel/pid_max", "").unwrap_or(32_768);
        let free = burrow_runtime::available_bytes(data_dir)?;
        let reserve = ((free as f64 * DISK_RESERVE_FRACTION) as u64).max(DISK_RESERVE_MIN);
        Ok(Budget {
            memory_bytes: (memory as f64 * overcommit) as u64,
            pids: pid_max / 4 * 3,
            disk_bytes: (free.saturating_sub(reserve) as f64 * disk_overcommit) as u64,
        })
    }

    fn share(&self, fraction: f64) -> Budget {
        Budget {
            memory_bytes: (self.memory_bytes as f64 * fraction) as u64,
            pids: (self.pids as f64 * fraction) as u64,
            disk_bytes: (self.disk_bytes as f64 * fraction) as u64,
        }
    }
}

/// The number after `prefix` on the first line of `path` that has it.
fn read_first_number(path: &str, prefix: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Limits promised to a set of sandboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Promised {
    pub sessions: usize,
    pub memory_bytes: u64,
    pub pids: u64,
    pub disk_bytes: u64,
}

impl Promised {
    pub(crate) fn add(&mut self, limits: &Limits) {
        self.sessions += 1;
        self.memory_bytes += limits.memory_bytes;
        self.pids += limits.pids;
        self.disk_bytes += limits.disk_bytes;
    }

    pub(crate) fn remove(&mut self, limits: &Limits) {
        self.sessions -= 1;
        self.memory_bytes -= limits.memory_bytes;
        self.pids -= limits.pids;
        self.disk_bytes -= limits.disk_bytes;
    }

    /// Both sets of promises together.
    pub(crate) fn plus(&self, other: &Promised) -> Promised {
        Promised {
            sessions: self.sessions + other.sessions,
            memory_bytes: self.memory_bytes + other.memory_bytes,
            pids: self.pids + other.pids,
            disk_bytes: self.disk_bytes + other.disk_bytes,
        }
    }

    /// The first resource `limits` more would take past `budget`.
    fn exceeds(&self, limits: &Limits, budget: &Budget) -> Option<Refusal> {
        let over = |resource, used, need, limit| {
            (used + need > limit).then_some(Refusal {
                resource,
                used,
                need,
                limit,
            })
        };
        over(
            Resource::Memory,
            self.memory_bytes,
            limits.memory_bytes,
            budget.memory_bytes,
        )
        .or_else(|| over(Resource::Pids, self.pids, limits.pids, budget.pids))
        .or_else(|| {
            over(
                Resource::Disk,
                self.disk_bytes,
                limits.disk_bytes,
                budget.disk_bytes,
            )
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Memory,
    Pids,
    /// The sandboxes' writable layers, on the data dir's filesystem.
    Disk,
}

/// A resource a create would take past a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub resource: Resource,
    pub used: u64,
    pub need: u64,
    pub limit: u64,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, unit, shift) = match self.resource {
            Resource::Memory => ("memory", " MiB", 20),
            Resource::Pids => ("processes", "", 0),
            Resource::Disk => ("disk", " MiB", 20),
        };
        write!(
            f,
            "{name}: {}{unit} of {}{unit} promised to running sessions, and this one needs {}{unit}",
            self.used >> shift,
            self.limit >> shift,
            self.need >> shift
        )
    }
}

/// Whose budget a create would exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exceeded {
    Team(Refusal),
    Host(Refusal),
}

/// Checks one more sandbox with `limits` against the team's share and the host's budget;
/// `team` and `all` are what is promised already.
pub(crate) fn admit(
    limits: &Limits,
    team: &Promised,
    all: &Promised,
    host: &Budget,
    team_share: f64,
) -> Result<(), Exceeded> {
    // The host first: a team within its share cannot be blamed for a full host.
    if let Some(refusal) = all.exceeds(limits, host) {
        return Err(Exceeded::Host(refusal));
    }
    if let Some(refusal) = team.exceeds(limits, &host.share(team_share)) {
        return Err(Exceeded::Team(refusal));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn limits(memory_mib: u64, pids: u64) -> Limits {
        Limits {
            memory_bytes: memory_mib * MIB,
            pids,
            ..Limits::default()
        }
    }

    #[test]
    fn a_team_stops_at_its_share_and_the_host_at_its_budget() {
        let host = Budget {
            memory_bytes: 4096 * MIB,
            pids: 1000,
            disk_bytes: u64::MAX / 2,
        };
        let box_ = limits(512, 100);
        let (mut a, mut all) = (Promised::default(), Promised::default());
        // Half of 4 GiB is four sandboxes of 512 MiB.
        for _ in 0..4 {
            admit(&box_, &a, &all, &host, 0.5).unwrap();
            a.add(&box_);
            all.add(&box_);
        }
        let Err(Exceeded::Team(refused)) = admit(&box_, &a, &all, &host, 0.5) else {
            panic!("team a is past its share");
        };
        assert_eq!(refused.resource, Resource::Memory);
        assert_eq!(
            refused.to_string(),
            "memory: 2048 MiB of 2048 MiB promised to running sessions, and this one needs 512 MiB"
        );
        // Another team still gets its own share, until the host has nothing left.
        let mut b = Promised::default();
        for _ in 0..4 {
            admit(&box_, &b, &all, &host, 0.5).unwrap();
            b.add(&box_);
            all.add(&box_);
        }
        let c = Promised::default();
        assert!(matches!(
            admit(&box_, &c, &all, &host, 0.5),
            Err(Exceeded::Host(Refusal {
                resource: Resource::Memory,
                ..
            }))
        ));
        // What an ended session held is given back.
        b.remove(&box_);
        all.remove(&box_);
        admit(&box_, &c, &all, &host, 0.5).unwrap();
    }

    #[test]
    fn processes_are_never_overcommitted() {
        let host = Budget {
            memory_bytes: u64::MAX / 2,
            pids: 1000,
            disk_bytes: u64::MAX / 2,
        };
        let mut all = Promised::default();
        all.add(&limits(1, 900));
        let Err(Exceeded::Host(refused)) =
            admit(&limits(1, 200), &Promised::default(), &all, &host, 1.0)
        else {
            panic!("the host has 1000 processes to promise");
        };
        assert_eq!(refused.resource, Resource::Pids);
        assert!(refused.to_string().starts_with("processes: 900 of 1000"));
    }

    #[test]
    fn disk_is_never_overcommitted_and_shared_like_memory() {
        let host = Budget {
            memory_bytes: u64::MAX / 2,
            pids: 1000,
            disk_bytes: 10 * 1024 * MIB,
        };
        let disk = |gib: u64| Limits {
            disk_bytes: gib * 1024 * MIB,
            ..limits(1, 1)
        };
        let (mut team, mut all) = (Promised::default(), Promised::default());
        admit(&disk(4), &team, &all, &host, 0.5).unwrap();
        team.add(&disk(4));
        all.add(&disk(4));
        let Err(Exceeded::Team(refused)) = admit(&disk(2), &team, &all, &host, 0.5) else {
            panic!("the team has 5 GiB of disk to promise");
        };
        assert_eq!(refused.resource, Resource::Disk);
        assert_eq!(
            refused.to_string(),
            "disk: 4096 MiB of 5120 MiB promised to running sessions, and this one needs 2048 MiB"
        );
        all.add(&disk(5));
        let Err(Exceeded::Host(refused)) = admit(&disk(2), &Promised::default(), &all, &host, 1.0)
        else {
            panic!("the host has 10 GiB of disk to promise");
        };
        assert_eq!(refused.resource, Resource::Disk);
        admit(&disk(1), &Promised::default(), &all, &host, 1.0).unwrap();
    }

    #[test]
    fn the_hosts_budget_is_read() {
        let dir = std::env::temp_dir();
        let budget = Budget::of_host(2.0, &dir, 1.0).unwrap();
        assert!(budget.memory_bytes > 0 && budget.pids > 0, "{budget:?}");
        let free = burrow_runtime::available_bytes(&dir).unwrap();
        // Below what is free, by the reserve (at least 64 MiB, or all of it on a small disk).
        assert!(
            budget.disk_bytes <= free.saturating_sub(DISK_RESERVE_MIN),
            "{budget:?}, {free} free"
        );
        assert!(
            budget.disk_bytes >= free / 10 * 8,
            "{budget:?}, {free} free"
        );
    }
}
