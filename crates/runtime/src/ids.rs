//! Host id ranges: each live sandbox maps its ids 0..65536 to a host range of its own, so that
//! a process escaping one sandbox owns nothing of another, and per-user kernel budgets (pipe
//! buffer pages, epoll watches, fds in flight over unix sockets) are one sandbox's alone.
//!
//! The ranges are slots: slot `i` is host ids `RANGES_FIRST + i * ID_RANGE ..`, and owns the
//! sandbox's user namespace as host uid `uid_base + ID_RANGE + i` (see `spawn::AsOwner`): the
//! band right above the storage range (`uid_base ..`, in which the environments' root
//! filesystems are stored on disk), which `validate_uid_base` keeps free and no sandbox maps.
//! The ranges sit above both, and below 2^32.
//!
//! A slot is taken with an exclusive `flock` on `<data>/ids/<slot>`, whose descriptor goes to
//! the sandbox's PID 1 and stays open for its life: the slot is held exactly as long as the
//! sandbox lives, whichever process started it, and no restarted server or concurrent
//! `burrow sandbox-run` sharing the data dir can take it meanwhile. The file names the sandbox
//! holding it, so that a sweep of leftovers can tell a live sandbox of another process from a
//! dead one (see `Namespaces::list`).

use std::collections::HashSet;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use burrow_environments::ID_RANGE;

use crate::error::{Error, IoContext};

/// How many sandboxes can live at once on a host (over all servers and `sandbox-run`s sharing
/// a data dir): 16384 ranges of 65536 ids, 2^30 host ids in all.
pub(crate) const SLOTS: u32 = 16_384;
/// First host id of slot 0's range. Ranges are aligned to `ID_RANGE`.
pub(crate) const RANGES_FIRST: u32 = 1 << 25;

// The layout, checked at compile time: one owner per slot in the owner band, ranges aligned
// and ending below 2^32 (u32::MAX is no id).
const _: () = {
    assert!(SLOTS <= ID_RANGE);
    assert!(RANGES_FIRST.is_multiple_of(ID_RANGE));
    assert!(RANGES_FIRST as u64 + SLOTS as u64 * ID_RANGE as u64 <= u32::MAX as u64);
};

/// The ids of the slots, in `<data>/ids`.
pub(crate) struct IdSlots {
    dir: PathBuf,
    /// Where the next search for a free slot starts: right after the last slot taken, so that a
    /// host with many live sandboxes does not try each of them on every start.
    next: AtomicU32,
    /// Slots of sandboxes this process destroyed, tried first: their idmapping user namespaces
    /// are made already (see `Namespaces`), which saves a clone per start.
    recycled: Mutex<Vec<u32>>,
}

/// A slot held by this process (until its lock goes to the sandbox's PID 1).
#[derive(Debug)]
pub(crate) struct IdSlot {
    pub index: u32,
    /// The open file description carrying the exclusive `flock`.
    pub lock: OwnedFd,
}

impl IdSlot {
    /// Host id of the sandbox's id 0.
    pub fn base(&self) -> u32 {
        range_base(self.index)
    }

    /// Host uid owning the sandbox's user namespace.
    pub fn owner(&self, uid_base: u32) -> u32 {
        uid_base + ID_RANGE + self.index
    }
}

pub(crate) fn range_base(index: u32) -> u32 {
    RANGES_FIRST + index * ID_RANGE
}

/// Refuses a storage range and owner band (`uid_base .. uid_base + 2 * ID_RANGE`) that
/// overlaps the slots' ranges.
pub(crate) fn check_uid_base(uid_base: u32) -> Result<(), Error> {
    if uid_base
        .checked_add(2 * ID_RANGE)
        .is_none_or(|end| end > RANGES_FIRST)
    {
        return Err(Error::UidBaseOverlaps {
            uid_base,
            first: RANGES_FIRST,
        });
    }
    Ok(())
}

impl IdSlots {
    pub fn new(data_dir: &Path) -> Result<IdSlots, Error> {
        let dir = data_dir.join("ids");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .ctx("create", &dir)?;
        Ok(IdSlots {
            dir,
            next: AtomicU32::new(0),
            recycled: Mutex::new(Vec::new()),
        })
    }

    /// Takes a free slot for sandbox `id`.
    pub fn allocate(&self, id: &str) -> Result<IdSlot, Error> {
        loop {
            let recycled = self.recycled().pop();
            let Some(index) = recycled else { break };
            if let Some(slot) = self.take(index, id)? {
                return Ok(slot);
            }
        }
        let start = self.next.load(Ordering::Relaxed);
        for step in 0..SLOTS {
            let index = (start + step) % SLOTS;
            if let Some(slot) = self.take(index, id)? {
                self.next.store((index + 1) % SLOTS, Ordering::Relaxed);
                return Ok(slot);
            }
        }
        Err(Error::NoIdSlot {
            dir: self.dir.clone(),
            slots: SLOTS,
        })
    }

    /// Says that the sandbox holding slot `index` is dead, so the slot is likely free.
    pub fn recycle(&self, index: u32) {
        self.recycled().push(index);
    }

    fn recycled(&self) -> MutexGuard<'_, Vec<u32>> {
        self.recycled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Slot `index` for sandbox `id`, unless someone holds it.
    fn take(&self, index: u32, id: &str) -> Result<Option<IdSlot>, Error> {
        let path = self.dir.join(index.to_string());
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .ctx("open", &path)?;
        if !try_lock(&file, libc::LOCK_EX).ctx("lock", &path)? {
            return Ok(None);
        }
        // Under the lock: the name of the sandbox holding it, for `held`.
        file.set_len(0).ctx("truncate", &path)?;
        (&file).write_all(id.as_bytes()).ctx("write", &path)?;
        Ok(Some(IdSlot {
            index,
            lock: file.into(),
        }))
    }

    /// Ids of the sandboxes whose slot is held (by a live sandbox's PID 1, or by a process
    /// starting one), as far as the slot files tell.
    pub fn held(&self) -> Result<HashSet<String>, Error> {
        let mut held = HashSet::new();
        let entries = fs::read_dir(&self.dir).ctx("list", &self.dir)?;
        for entry in entries {
            let path = entry.ctx("list", &self.dir)?.path();
            let mut file = match fs::File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e).ctx("open", &path),
            };
            // A shared lock is granted only if no one holds the exclusive one; dropping the
            // file releases it right away.
            if try_lock(&file, libc::LOCK_SH | libc::LOCK_NB).ctx("lock", &path)? {
                continue;
            }
            let mut id = String::new();
            file.read_to_string(&mut id).ctx("read", &path)?;
            held.insert(id);
        }
        Ok(held)
    }
}

/// `flock` without waiting; false if another open file description holds a conflicting lock.
fn try_lock(file: &fs::File, operation: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor `file` keeps open; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        e => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_range_stays_below_the_slots() {
        assert!(check_uid_base(100_000).is_ok());
        assert!(check_uid_base(RANGES_FIRST - 2 * ID_RANGE).is_ok());
        assert!(check_uid_base(RANGES_FIRST - 2 * ID_RANGE + 1).is_err());
    }

    #[test]
    fn slots_are_exclusive_until_released_and_name_their_sandbox() {
        let dir = std::env::temp_dir().join(format!("burrow-ids-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let slots = IdSlots::new(&dir).unwrap();
        let a = slots.allocate("aaaaaaaaaaaa").unwrap();
        // Another process (or a restarted server) knows nothing of `a` but its lock.
        let other = IdSlots::new(&dir).unwrap();
        let b = other.allocate("bbbbbbbbbbbb").unwrap();
        assert_ne!(a.index, b.index);
        assert_ne!(a.base(), b.base());
        assert_ne!(a.owner(100_000), b.owner(100_000));
        let held = slots.held().unwrap();
        assert!(held.contains("aaaaaaaaaaaa") && held.contains("bbbbbbbbbbbb"));
        let freed = a.index;
        drop(a);
        assert!(!slots.held().unwrap().contains("aaaaaaaaaaaa"));
        let third = IdSlots::new(&dir).unwrap();
        assert_eq!(third.allocate("cccccccccccc").unwrap().index, freed);
        drop(b);
        fs::remove_dir_all(&dir).unwrap();
    }
}
