//! Idmapped mounts of the environments' root filesystems, so that sandboxes with host id ranges
//! of their own (see `ids`) still share one copy of each root.
//!
//! The roots are stored shifted by `uid_base` (on disk, `uid_base + x` is the sandbox's id `x`).
//! An idmapped mount shows a file owned on disk by `k` as owned by `k` mapped through a user
//! namespace's map, so a user namespace mapping `uid_base ..` to the slot's range makes the
//! sandbox (whose own map takes 0 to the slot's first id) see its ids `x` again. Only the host's
//! root may idmap a mount of a host filesystem, so the server builds it, detached
//! (`open_tree(OPEN_TREE_CLONE)`), and hands it to the sandbox's init, which attaches it in its
//! mount namespace as its overlay's lower layer.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use burrow_environments::ID_RANGE;

use crate::error::{Error, IoContext};
use crate::spawn;

/// A user namespace whose map takes host ids `from ..` to `to ..` (`ID_RANGE` of them), as the
/// descriptor `mount_setattr(MOUNT_ATTR_IDMAP)` wants. Made by a child that does nothing but
/// wait: a multi-threaded process cannot `unshare` a user namespace.
pub(crate) fn user_namespace(from: u32, to: u32) -> Result<OwnedFd, Error> {
    let child = spawn::clone_waiting(libc::CLONE_NEWUSER)?;
    let result = (|| {
        let map = format!("{from} {to} {ID_RANGE}\n");
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{}/{file}", child.pid);
            std::fs::write(&path, &map).ctx("write", Path::new(&path))?;
        }
        let path = format!("/proc/{}/ns/user", child.pid);
        std::fs::File::open(&path)
            .map(OwnedFd::from)
            .ctx("open", Path::new(&path))
    })();
    spawn::kill(child.pid);
    result
}

/// A detached, read-only mount of `root` that shows its owners through `userns`'s map.
pub(crate) fn idmapped_tree(root: &Path, userns: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let path = CString::new(root.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `path` is NUL-terminated and outlives the call; the result is a new descriptor.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    if tree < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as RawFd) };
    // Read-only as well: the sandbox's overlay only reads it, and nothing of the sandbox may
    // write the root every other sandbox shares.
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP
            | libc::MOUNT_ATTR_RDONLY
            | libc::MOUNT_ATTR_NOSUID
            | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: the empty path is NUL-terminated and `attr` outlives the call; the size passed is
    // attr's.
    let set = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tree)
}

/// Checks, once at startup, that this kernel and the data dir's filesystem do what every start
/// needs: an idmapped mount of `probe_dir` (owned by `uid_base`, on the filesystem of the
/// environments' roots) under an overlay in a user namespace mapping `base ..`, where it must
/// show as owned by the namespace's root. Without this, sandboxes would have to share one id
/// range again, which burrow never does silently.
pub(crate) fn check_support(probe_dir: &Path, uid_base: u32, base: u32) -> Result<(), Error> {
    let refused = |step: &str, e: std::io::Error| Error::IdMappedMounts {
        dir: probe_dir.to_owned(),
        reason: format!("{step}: {e}"),
    };
    // `t` is where the probe mounts (in its own mount namespace); `src` stands for a root
    // filesystem, owned by the storage range's root.
    let source = probe_dir.join("src");
    for dir in [probe_dir.to_owned(), probe_dir.join("t"), source.clone()] {
        match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).ctx("create", &dir);
            }
            _ => {}
        }
    }
    std::os::unix::fs::chown(&source, Some(uid_base), Some(uid_base)).ctx("chown", &source)?;
    let userns = user_namespace(uid_base, base)?;
    let tree = idmapped_tree(&source, userns.as_fd())
        .map_err(|e| refused("idmapped mount (open_tree, mount_setattr)", e))?;
    let (mut parent, child_end) = UnixStream::pair().ctx("create a socket pair for", probe_dir)?;
    let child = spawn::clone_overlay_probe(probe_dir, tree.as_fd(), child_end.as_fd())?;
    drop(child_end);
    let result = (|| {
        let map = format!("0 {base} {ID_RANGE}\n");
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{}/{file}", child.pid);
            std::fs::write(&path, &map).ctx("write", Path::new(&path))?;
        }
        parent
            .write_all(&[1])
            .ctx("start the probe of", probe_dir)?;
        let mut report = Vec::new();
        parent
            .read_to_end(&mut report)
            .ctx("read the probe of", probe_dir)?;
        match spawn::parse_probe_report(&report) {
            None => Ok(()),
            Some((step, e)) => Err(refused(step, e)),
        }
    })();
    spawn::kill(child.pid);
    result
}
