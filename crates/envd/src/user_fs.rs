//! Filesystem work done for a client (the `filesystem` service, `/file`): first with the sandbox
//! user's filesystem credentials, and, only where the user may not, as the sandbox's root on a
//! path without symlinks. A user process therefore cannot plant a symlink (`~/x -> /etc/passwd`,
//! `~/etc -> /etc`) and have a client's write, mkdir, remove, rename or read go through it with
//! root's rights (issue #15), while clients keep root's reach over the sandbox that the original
//! daemon gave them and the SDKs rely on (e2b ≥ 0.5.0's `run_code` writes `/index.py`; a session
//! `cwd` is made with `makeDir` at open), and what envd creates is the user's (DECISIONS #9).
//!
//! 1. As the user. With the thread's fsuid, fsgid and groups set to the user's, the kernel checks
//!    every lookup, open, mkdir, unlink and rename as the user's own, at the moment it happens:
//!    no check to race, and the symlinks the user may follow (its own, `/usr/bin/python3 ->
//!    python3.11`) work as for the user. Files made this way are the user's by construction.
//!    setfsuid/setfsgid and the raw `setgroups` syscall change the calling thread only (glibc's
//!    `setgroups()` would change every thread of envd); moving the fsuid away from 0 also clears
//!    the thread's filesystem capabilities (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`, `CAP_CHOWN`, ...),
//!    and moving it back restores them (capabilities(7)).
//! 2. If the kernel refused that (EACCES, EPERM), as root, resolving with
//!    `openat2(RESOLVE_NO_SYMLINKS)`: the lookup fails with ELOOP at the first symlink of the path,
//!    final component included (and magic links: it implies `RESOLVE_NO_MAGICLINKS`). mkdir,
//!    unlink and rename act on a name inside a parent directory opened that way, with the *at
//!    calls, which never follow a final symlink (`unlinkat`, `renameat` act on the link itself;
//!    `mkdirat` fails with EEXIST). As the kernel resolves each open and each parent in one call,
//!    a user process swapping a component for a symlink meanwhile gets the call refused, never
//!    redirected. What root creates is then given to the user through its file descriptor
//!    (`fchown`), so a swap between creation and chown cannot redirect that either. A regular
//!    file with more than one hard link is refused too: where `fs.protected_hardlinks` is off, the
//!    user could link a root file into its home, and the link is no symlink.
//!
//! A refusal of step 2 (a symlink or hard link on the path) answers with step 1's error,
//! "permission denied", and `denied_hint` says why. Any other failure of step 2 (no such file, a
//! full disk) is the answer, as it is root's view of the path. Symlinks root may not follow
//! include system ones (`/bin -> usr/bin` on merged-/usr images): a client names the real path.
//! Where envd already is the user (an unprivileged envd started by a developer, or a test's envd
//! serving its own uid), there is no step 2.

use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, OpenHow, ResolveFlag, openat2, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, ftruncate, unlinkat};

use crate::{Config, State};

/// `work` on a blocking thread, for async handlers; the functions below act as described above.
pub(crate) async fn blocking<T, F>(state: &Arc<State>, work: F) -> io::Result<T>
where
    F: FnOnce(&Config) -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || work(&state.config))
        .await
        .unwrap_or_else(|_| Err(io::Error::other("envd's file operation crashed")))
}

/// Opens `path` for reading.
pub(crate) fn open_read(config: &Config, path: &Path) -> io::Result<File> {
    user_then_root(
        config,
        || File::open(path),
        || {
            let file = open_no_symlinks(AT_FDCWD, path, OFlag::O_RDONLY, Mode::empty())?;
            refuse_hard_links(&file)?;
            Ok(File::from(file))
        },
    )
}

/// The names in directory `path`, each with whether it is a directory (a symlink is not).
pub(crate) fn list_dir(config: &Config, path: &Path) -> io::Result<Vec<(OsString, bool)>> {
    user_then_root(
        config,
        || {
            fs::read_dir(path)?
                .map(|entry| {
                    let entry = entry?;
                    let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
                    Ok((entry.file_name(), is_dir))
                })
                .collect()
        },
        || {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
            let mut dir = Dir::from_fd(open_no_symlinks(AT_FDCWD, path, flags, Mode::empty())?)?;
            let mut entries = Vec::new();
            for entry in dir.iter() {
                let entry = entry?;
                let name = OsStr::from_bytes(entry.file_name().to_bytes());
                if name == "." || name == ".." {
                    continue;
                }
                entries.push((name.to_owned(), entry.file_type()));
            }
            entries
                .into_iter()
                .map(|(name, kind)| {
                    let is_dir = match kind {
                        Some(kind) => kind == Type::Directory,
                        // The filesystem does not say in its entries: ask it, without following.
                        None => fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                            .is_ok_and(|stat| file_type(&stat) == SFlag::S_IFDIR),
                    };
                    Ok((name, is_dir))
                })
                .collect()
        },
    )
}

/// Creates `path` with `mode` (before the umask), the user's; or truncates the existing file,
/// which keeps its owner.
pub(crate) fn create_file(config: &Config, path: &Path, mode: u32) -> io::Result<File> {
    user_then_root(
        config,
        || match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
        {
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                OpenOptions::new().write(true).truncate(true).open(path)
            }
            opened => opened,
        },
        || {
            let create = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
            match open_no_symlinks(AT_FDCWD, path, create, Mode::from_bits_truncate(mode)) {
                Ok(file) => {
                    give_to_user(config, &file)?;
                    Ok(File::from(file))
                }
                Err(error) if error.raw_os_error() == Some(libc::EEXIST) => {
                    // Truncated only once known to be no other file's hard link.
                    let file = open_no_symlinks(AT_FDCWD, path, OFlag::O_WRONLY, Mode::empty())?;
                    refuse_hard_links(&file)?;
                    ftruncate(&file, 0)?;
                    Ok(File::from(file))
                }
                Err(error) => Err(error),
            }
        },
    )
}

/// Creates directory `path` with `mode` (before the umask), the user's; a directory already
/// there is fine (`mkdir -p`). A missing parent is NotFound.
pub(crate) fn make_dir(config: &Config, path: &Path, mode: u32) -> io::Result<()> {
    user_then_root(
        config,
        || match DirBuilder::new().mode(mode).create(path) {
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                match fs::metadata(path) {
                    Ok(meta) if meta.is_dir() => Ok(()),
                    Ok(_) => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                    Err(error) => Err(error),
                }
            }
            made => made,
        },
        || {
            let (parent, name) = parent_and_name(path)?;
            match mkdirat(&parent, name, Mode::from_bits_truncate(mode)) {
                Ok(()) => {
                    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
                    give_to_user(
                        config,
                        &open_no_symlinks(&parent, name, flags, Mode::empty())?,
                    )
                }
                Err(Errno::EEXIST) => {
                    match file_type(&fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)?) {
                        SFlag::S_IFDIR => Ok(()),
                        SFlag::S_IFLNK => Err(Errno::ELOOP.into()),
                        _ => Err(Errno::ENOTDIR.into()),
                    }
                }
                Err(error) => Err(error.into()),
            }
        },
    )
}

/// `rm -rf path`, without following a symlink at `path` or below it. A missing path is NotFound.
pub(crate) fn remove(config: &Config, path: &Path) -> io::Result<()> {
    user_then_root(
        config,
        || match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(error) => Err(error),
        },
        || {
            let (parent, name) = parent_and_name(path)?;
            remove_at(&parent, name)
        },
    )
}

/// Renames `from` to `to`, replacing what `to` names (a symlink itself, never its target).
/// Across filesystems this is EXDEV, as `rename(2)`.
pub(crate) fn rename(config: &Config, from: &Path, to: &Path) -> io::Result<()> {
    user_then_root(
        config,
        || fs::rename(from, to),
        || {
            let (from_parent, from_name) = parent_and_name(from)?;
            let (to_parent, to_name) = parent_and_name(to)?;
            Ok(renameat(&from_parent, from_name, &to_parent, to_name)?)
        },
    )
}

/// Step 1, then step 2 where step 1 was refused (see the module's comment).
fn user_then_root<T>(
    config: &Config,
    as_the_user: impl FnOnce() -> io::Result<T>,
    as_root: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let refused = match as_user(config, as_the_user)? {
        Err(error) if is_denied(&error) && !acts_as_itself(config) => error,
        done => return done,
    };
    match as_root() {
        // A symlink or hard link on the path: the user's refusal stands.
        Err(error) if error.raw_os_error() == Some(libc::ELOOP) => Err(refused),
        done => done,
    }
}

fn is_denied(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

/// `openat2(dir, path, flags | O_CLOEXEC, mode)`, failing with ELOOP at any symlink on the way.
fn open_no_symlinks<P: ?Sized + nix::NixPath>(
    dir: impl AsFd,
    path: &P,
    flags: OFlag,
    mode: Mode,
) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    Ok(openat2(dir, path, how)?)
}

/// The directory that holds `path`, opened without symlinks, and `path`'s last name in it. A
/// path without a last name (`/`, `..` at its end) has nothing the *at calls could act on:
/// ELOOP, so the user's refusal stands.
fn parent_and_name(path: &Path) -> io::Result<(OwnedFd, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
            Ok((
                open_no_symlinks(AT_FDCWD, parent, flags, Mode::empty())?,
                name,
            ))
        }
        _ => Err(Errno::ELOOP.into()),
    }
}

/// Refuses (as a link on the path: ELOOP) a regular file with other hard links.
fn refuse_hard_links(file: &OwnedFd) -> io::Result<()> {
    let stat = fstat(file)?;
    if file_type(&stat) == SFlag::S_IFREG && stat.st_nlink > 1 {
        return Err(Errno::ELOOP.into());
    }
    Ok(())
}

fn give_to_user(config: &Config, file: &OwnedFd) -> io::Result<()> {
    let owner = Some(Uid::from_raw(config.uid));
    Ok(fchown(file, owner, Some(Gid::from_raw(config.gid)))?)
}

fn file_type(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

/// Removes `name` in `dir`: a directory with everything in it, anything else (a symlink
/// included) as an entry. Each directory below is opened without symlinks, so a user process
/// swapping one for a symlink meanwhile stops the removal instead of redirecting it.
fn remove_at(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    if file_type(&fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?) != SFlag::S_IFDIR {
        return Ok(unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?);
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    let child = open_no_symlinks(dir, name, flags, Mode::empty())?;
    let names: Vec<OsString> = Dir::from_fd(child.try_clone()?)?
        .iter()
        .map(|entry| entry.map(|entry| OsStr::from_bytes(entry.file_name().to_bytes()).to_owned()))
        .filter(|name| name.as_ref().is_ok_and(|name| name != "." && name != ".."))
        .collect::<Result<_, _>>()?;
    for entry in names {
        match remove_at(&child, &entry) {
            // Removed meanwhile: as `rm -rf`.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            removed => removed?,
        }
    }
    Ok(unlinkat(dir, name, UnlinkatFlags::RemoveDir)?)
}

/// Whether envd already has the user's identity, so that acting "as the user" changes nothing.
fn acts_as_itself(config: &Config) -> bool {
    nix::unistd::geteuid().as_raw() == config.uid && nix::unistd::getegid().as_raw() == config.gid
}

/// Runs `work` on this thread as the sandbox user (its fsuid, fsgid and only group, as processes
/// get them in `child::confine`), then restores the thread's own. Call it on a blocking thread:
/// `work` must not yield to other tasks, which would run with the user's credentials.
fn as_user<T>(config: &Config, work: impl FnOnce() -> T) -> io::Result<T> {
    if acts_as_itself(config) {
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

/// An fsuid/fsgid no one has: `setfsuid(INVALID)` changes nothing and returns the current value.
const INVALID: u32 = u32::MAX;

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
/// not do it as root instead.
pub(crate) fn denied_hint(config: &Config, error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => format!(
            " (envd accesses files as the sandbox user '{}', who may not do this, and as root \
             only on a path without symlinks, or hard links to a file, which the user could have \
             planted; name the real path, or write where '{}' may, such as its home or /tmp)",
            config.user, config.user
        ),
        _ => String::new(),
    }
}
