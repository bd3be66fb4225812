//! Filesystem work done for a client (the `filesystem` service, `/file`) with the sandbox user's
//! filesystem credentials, so that envd (the sandbox's root) can do to the sandbox's files
//! exactly what the user could do itself, and nothing more: a user process cannot plant a
//! symlink (`~/x -> /etc/passwd`) or a symlinked directory and have a client write go through it
//! with root's rights.
//!
//! Why credentials rather than `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)`: clients name any
//! path of the sandbox (not paths beneath one directory), and the symlinks the user may follow
//! (its own links, `/tmp` ones, `/usr/bin/python3 -> python3.11`) must keep working; only what
//! the user may not do must fail. With the thread's fsuid, fsgid and groups set to the user's,
//! the kernel checks every lookup, open, mkdir, unlink and rename as the user's own, at the moment
//! it happens, so no check can be raced by a user process swapping a path component between a
//! check and the use. setfsuid/setfsgid and the raw `setgroups` syscall change the calling
//! thread only (glibc's `setgroups()` would change every thread of envd); moving the fsuid away
//! from 0 also clears the thread's filesystem capabilities (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`,
//! `CAP_CHOWN`, ...), and moving it back restores them (capabilities(7)).

use std::io;
use std::sync::Arc;

use crate::{Config, State};

/// `as_user` on a blocking thread, for async handlers (`/file`).
pub(crate) async fn blocking_as_user<T, F>(state: &Arc<State>, work: F) -> io::Result<T>
where
    F: FnOnce(&Config) -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || as_user(&state.config, || work(&state.config))?)
        .await
        .unwrap_or_else(|_| Err(io::Error::other("envd's file operation crashed")))
}

/// An fsuid/fsgid no one has: `setfsuid(INVALID)` changes nothing and returns the current value.
const INVALID: u32 = u32::MAX;

/// Runs `work` on this thread as the sandbox user (its fsuid, fsgid and only group, as processes
/// get them in `child::confine`), then restores the thread's own. Call it on a blocking thread:
/// `work` must not yield to other tasks, which would run with the user's credentials.
///
/// When envd already is the user (an unprivileged envd started by a developer, or a test's envd
/// serving its own uid), `work` runs as is.
pub(crate) fn as_user<T>(config: &Config, work: impl FnOnce() -> T) -> io::Result<T> {
    if nix::unistd::geteuid().as_raw() == config.uid
        && nix::unistd::getegid().as_raw() == config.gid
    {
        return Ok(work());
    }
    let switched = Switched::enter(config).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!(
                "cannot take the sandbox user's credentials (uid {}, gid {}) for file access: {error}; \
                 envd must run as the sandbox's root with CAP_SETUID and CAP_SETGID",
                config.uid, config.gid
            ),
        )
    })?;
    let result = work();
    drop(switched);
    Ok(result)
}

/// The thread's own credentials while it acts as the user; dropping it (after `work`, or while a
/// panic unwinds) restores them.
struct Switched {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<libc::gid_t>,
}

impl Switched {
    fn enter(config: &Config) -> io::Result<Self> {
        let saved = Self {
            fsuid: fsuid_now(),
            fsgid: fsgid_now(),
            groups: thread_groups()?,
        };
        // Groups and fsgid before fsuid, the reverse of `drop`'s order.
        set_thread_groups(&[config.gid])?;
        // SAFETY: plain syscalls on integer ids; success is checked by reading the ids back.
        unsafe {
            libc::setfsgid(config.gid);
            libc::setfsuid(config.uid);
        }
        if (fsuid_now(), fsgid_now()) != (config.uid, config.gid) {
            // Dropping `saved` restores what did change.
            drop(saved);
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(saved)
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        // fsuid first: back at 0, the thread regains the capabilities the rest may need.
        // SAFETY: plain syscalls on integer ids; checked below.
        unsafe {
            libc::setfsuid(self.fsuid);
            libc::setfsgid(self.fsgid);
        }
        let restored = fsuid_now() == self.fsuid
            && fsgid_now() == self.fsgid
            && set_thread_groups(&self.groups).is_ok();
        if !restored {
            // Cannot happen while envd keeps its uid 0 and CAP_SETGID. If it did, this pool
            // thread would do later work with the wrong identity: stop rather than act as
            // someone else. The server sees the sandbox die and reports its session gone.
            std::process::abort();
        }
    }
}

/// The calling thread's fsuid.
fn fsuid_now() -> u32 {
    // SAFETY: an invalid id changes nothing; the call returns the current fsuid.
    unsafe { libc::setfsuid(INVALID) as u32 }
}

/// The calling thread's fsgid.
fn fsgid_now() -> u32 {
    // SAFETY: an invalid id changes nothing; the call returns the current fsgid.
    unsafe { libc::setfsgid(INVALID) as u32 }
}

/// The calling thread's supplementary groups.
fn thread_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a zero-sized query, then a buffer of the size it returned (only this thread
    // changes its groups in between).
    unsafe {
        let count = libc::getgroups(0, std::ptr::null_mut());
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut groups = vec![0; count as usize];
        let count = libc::getgroups(count, groups.as_mut_ptr());
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        groups.truncate(count as usize);
        Ok(groups)
    }
}

/// Sets the calling thread's supplementary groups, and only its own: the raw syscall, not glibc's
/// `setgroups()`, which applies the change to every thread of the process.
fn set_thread_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice the kernel only reads.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What to add to a file error's message when the kernel refused it as the user's: why envd did
/// not do it anyway.
pub(crate) fn denied_hint(config: &Config, error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => format!(
            " (envd accesses files as the sandbox user '{}', who may not do this; \
             write where '{}' may, such as its home or /tmp)",
            config.user, config.user
        ),
        _ => String::new(),
    }
}
