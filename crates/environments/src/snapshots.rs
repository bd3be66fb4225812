//! Saved edits of custom environments. When an edit session ends, what it wrote (the upper layer
//! of its overlay root) is applied to a copy of the root it started from, and that copy becomes
//! the environment's new version.
//!
//! ```text
//! <data>/environments/snapshots/<team-id>/<environment-id>/
//!     (the layout of an image's directory, see images.rs: .lock, current, <version>/lock)
//!     <version>/rootfs/   the environment's whole root, owned by the storage range's ids
//! ```
//!
//! Each sandbox runs in a host id range of its own, while roots are stored in one range
//! (`uid_base + x` for the sandbox's id `x`) that every sandbox sees through an idmapped mount:
//! the owners of the upper layer are translated back into the storage range ([`IdShift`]), so
//! the saved version works for the next sandbox, whatever its range.
//!
//! A new version starts as the previous root hard-linked file by file (cheap: the data is
//! shared), then the upper layer is applied the way overlayfs reads it: a whiteout (a 0/0
//! character device) deletes, an opaque directory (`user.overlay.opaque`) hides what was below
//! it, and every other entry replaces what was there. Changed files get fresh inodes, never
//! writes through a link, so older versions, which running sandboxes may use, stay as they were.
//! Versions are used, pinned and collected exactly like image versions.
//!
//! The upper layer was written by untrusted code: nothing here follows a symbolic link, and
//! every directory descended into on the new root was checked to be a real directory.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{
    DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt, lchown, symlink,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::images::{BUILD_PREFIX, Images, ROOTFS, create_version_lock, pin_version, remove_path};
use crate::{Error, ID_RANGE, IoContext};

/// How the owners of a sandbox's upper layer translate to the storage range: host id
/// `sandbox + x` becomes `storage + x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdShift {
    /// Host id of the sandbox's id 0 (its range's first id).
    pub sandbox: u32,
    /// Host id the stored roots give the sandbox's id 0 (`uid_base`).
    pub storage: u32,
}

impl IdShift {
    /// The stored owner of a file the sandbox owns as host id `id`. The sandbox can only create
    /// files owned by its own range; anything else (which would take a kernel bug) is stored as
    /// the storage range's `nobody`, never as a host id outside the range.
    pub fn stored(&self, id: u32) -> u32 {
        match id.checked_sub(self.sandbox) {
            Some(x) if x < ID_RANGE => self.storage + x,
            _ => self.storage + NOBODY,
        }
    }

    fn owner(&self, meta: &fs::Metadata) -> Owner {
        Owner {
            uid: self.stored(meta.uid()),
            gid: self.stored(meta.gid()),
        }
    }
}

/// The overflow id (`nobody`) of a sandbox.
const NOBODY: u32 = 65_534;

/// The owner an entry gets in the new version.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    /// As it is: an entry of the base root, already in the storage range.
    fn kept(meta: &fs::Metadata) -> Owner {
        Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }
}

/// Where snapshots live, below the data dir.
const SNAPSHOTS_DIR: &str = "environments/snapshots";

/// The overlay xattr that marks a directory as hiding the layers below it (`userxattr` mounts).
const OPAQUE: &std::ffi::CStr = c"user.overlay.opaque";

/// The saved versions of one team's custom environments.
#[derive(Debug, Clone)]
pub struct Snapshots {
    versions: Images,
}

/// One version of a custom environment, held in use for as long as this value (or a clone)
/// lives.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub version: String,
    /// `<data>/environments/snapshots/<team>/<environment>/<version>`.
    pub dir: PathBuf,
    held: Arc<OwnedFd>,
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Snapshot) -> bool {
        self.dir == other.dir
    }
}

impl Eq for Snapshot {}

impl Snapshot {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(ROOTFS)
    }

    /// A new shared lock on this version, for a sandbox to hold for its whole life.
    pub fn pin(&self) -> Result<OwnedFd, Error> {
        pin_version(&self.dir, &self.held)
    }
}

impl Snapshots {
    pub fn new(data_dir: &Path, team_id: i64) -> Snapshots {
        Snapshots {
            versions: Images::at(data_dir.join(SNAPSHOTS_DIR).join(team_id.to_string())),
        }
    }

    /// The current version of the team's environment `id`, taken into use; `None` until an
    /// edit session of it has ended.
    pub fn current(&self, id: &str) -> Result<Option<Snapshot>, Error> {
        Ok(self.versions.take_current(id)?.map(|held| Snapshot {
            version: held.version,
            dir: held.dir,
            held: Arc::new(held.lock),
        }))
    }

    /// Makes `base` (the root the edit session started from) with `upper` (what it wrote, owned
    /// by the sandbox's range, which `owners` translates) applied the current version of `id`,
    /// and removes the versions nothing uses any more.
    pub fn commit(
        &self,
        id: &str,
        base: &Path,
        upper: &Path,
        owners: IdShift,
    ) -> Result<Snapshot, Error> {
        let lock = self.versions.lock(id)?;
        let version = new_version();
        let env_dir = self.versions.env_dir(id);
        let build = env_dir.join(format!("{BUILD_PREFIX}{version}"));
        let result = (|| {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&build)
                .ctx("create", &build)?;
            let rootfs = build.join(ROOTFS);
            link_tree(base, &rootfs)?;
            apply_upper(upper, &rootfs, owners)?;
            create_version_lock(&build)?;
            let dir = env_dir.join(&version);
            fs::rename(&build, &dir).ctx("rename", &build)?;
            self.versions.set_current(id, &version, &lock)
        })();
        if result.is_err() {
            let _ = remove_path(&build);
        }
        result?;
        if let Err(e) = self.versions.collect(id, &lock) {
            tracing::warn!(environment = id, "cannot collect old snapshots: {e}");
        }
        drop(lock);
        self.current(id)?.ok_or_else(|| Error::Io {
            action: "take into use",
            path: env_dir,
            source: std::io::Error::other("the new version vanished"),
        })
    }

    /// Forgets the saved content of `id` (its template changed, or it was deleted): later
    /// sessions start from the template; versions in use stay until their sandboxes end.
    pub fn reset(&self, id: &str) -> Result<(), Error> {
        let lock = self.versions.lock(id)?;
        self.versions.clear_current(id, &lock)?;
        self.versions.collect(id, &lock).map(drop)
    }
}

/// Removes the snapshot versions nothing uses any more, of every team (at server start: a
/// version that was in use at its environment's last commit is collected here once free).
pub(crate) fn collect_all(data_dir: &Path) -> Result<(), Error> {
    let root = data_dir.join(SNAPSHOTS_DIR);
    let teams = match fs::read_dir(&root) {
        Ok(teams) => teams,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("read", &root),
    };
    for team in teams {
        let team = team.ctx("read", &root)?;
        if team.file_type().ctx("stat", &team.path())?.is_dir() {
            Images::at(team.path()).collect_all()?;
        }
    }
    Ok(())
}

/// Twelve hex digits, unique enough for one environment's versions.
fn new_version() -> String {
    let mut hasher = Sha256::new();
    hasher.update(std::process::id().to_le_bytes());
    hasher.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    hasher.update(std::thread::current().name().unwrap_or("").as_bytes());
    let digest = hasher.finalize();
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Recreates the tree at `from` under `to` (which must not exist): new directories with the
/// same owner and mode, every other entry a hard link to the same inode.
fn link_tree(from: &Path, to: &Path) -> Result<(), Error> {
    let mut pending = vec![(from.to_owned(), to.to_owned())];
    while let Some((source, target)) = pending.pop() {
        let meta = fs::symlink_metadata(&source).ctx("stat", &source)?;
        if meta.is_dir() {
            make_dir_like(&target, &meta, Owner::kept(&meta))?;
            for entry in fs::read_dir(&source).ctx("read", &source)? {
                let name = entry.ctx("read", &source)?.file_name();
                pending.push((source.join(&name), target.join(&name)));
            }
        } else {
            fs::hard_link(&source, &target).ctx("link", &target)?;
        }
    }
    Ok(())
}

/// Applies an overlay upper directory to `root` (see the module docs).
fn apply_upper(upper: &Path, root: &Path, owners: IdShift) -> Result<(), Error> {
    let meta = fs::symlink_metadata(upper).ctx("stat", upper)?;
    set_owner_and_mode(root, &meta, owners.owner(&meta))?;
    let mut pending = vec![(upper.to_owned(), root.to_owned())];
    while let Some((source_dir, target_dir)) = pending.pop() {
        for entry in fs::read_dir(&source_dir).ctx("read", &source_dir)? {
            let name = entry.ctx("read", &source_dir)?.file_name();
            let (source, target) = (source_dir.join(&name), target_dir.join(&name));
            let meta = fs::symlink_metadata(&source).ctx("stat", &source)?;
            let kind = meta.file_type();
            if kind.is_char_device() && meta.rdev() == 0 {
                remove_entry(&target)?;
            } else if kind.is_dir() {
                let existing = fs::symlink_metadata(&target);
                match existing {
                    Ok(m) if m.is_dir() && !is_opaque(&source)? => {
                        set_owner_and_mode(&target, &meta, owners.owner(&meta))?;
                    }
                    _ => {
                        remove_entry(&target)?;
                        make_dir_like(&target, &meta, owners.owner(&meta))?;
                    }
                }
                pending.push((source, target));
            } else {
                remove_entry(&target)?;
                copy_entry(&source, &target, &meta, owners.owner(&meta))?;
            }
        }
    }
    Ok(())
}

/// Whether an upper directory hides what is below it.
fn is_opaque(dir: &Path) -> Result<bool, Error> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)
        .ctx("read attributes of", dir)?;
    let mut value = [0u8; 1];
    // SAFETY: both strings are NUL-terminated and outlive the call; the kernel writes at most
    // `value.len()` bytes into `value`.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            OPAQUE.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if n >= 0 {
        return Ok(n == 1 && value[0] == b'y');
    }
    match std::io::Error::last_os_error() {
        e if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::ENOTSUP)) => Ok(false),
        // A longer value is not "y".
        e if e.raw_os_error() == Some(libc::ERANGE) => Ok(false),
        e => Err(e).ctx("read attributes of", dir),
    }
}

/// Removes whatever is at `path` (a directory with its contents), without following links.
fn remove_entry(path: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).ctx("remove", path),
        Ok(_) => fs::remove_file(path).ctx("remove", path),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx("stat", path),
    }
}

fn make_dir_like(path: &Path, meta: &fs::Metadata, owner: Owner) -> Result<(), Error> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .ctx("create", path)?;
    set_owner_and_mode(path, meta, owner)
}

/// Owner first: a change of owner clears set-id bits, which the mode then restores.
fn set_owner_and_mode(path: &Path, meta: &fs::Metadata, owner: Owner) -> Result<(), Error> {
    lchown(path, Some(owner.uid), Some(owner.gid)).ctx("change the owner of", path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .ctx("change the mode of", path)
}

/// Copies one non-directory entry of the upper layer to `target` (which does not exist).
fn copy_entry(
    source: &Path,
    target: &Path,
    meta: &fs::Metadata,
    owner: Owner,
) -> Result<(), Error> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        let points_to = fs::read_link(source).ctx("read", source)?;
        symlink(&points_to, target).ctx("create", target)?;
        return lchown(target, Some(owner.uid), Some(owner.gid)).ctx("change the owner of", target);
    }
    if kind.is_fifo() {
        nix::unistd::mkfifo(target, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(std::io::Error::from)
            .ctx("create", target)?;
        return set_owner_and_mode(target, meta, owner);
    }
    if !kind.is_file() {
        // Sockets (and devices, which a sandbox cannot make) mean nothing in a saved root.
        return Ok(());
    }
    let mut from = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(source)
        .ctx("open", source)?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .ctx("create", target)?;
    std::io::copy(&mut from, &mut to).ctx("copy to", target)?;
    let times = fs::FileTimes::new()
        .set_accessed(meta.accessed().ctx("stat", source)?)
        .set_modified(meta.modified().ctx("stat", source)?);
    to.set_times(times).ctx("set the times of", target)?;
    set_file_owner_and_mode(&to, target, meta, owner)
}

fn set_file_owner_and_mode(
    file: &File,
    path: &Path,
    meta: &fs::Metadata,
    owner: Owner,
) -> Result<(), Error> {
    std::os::unix::fs::fchown(file, Some(owner.uid), Some(owner.gid))
        .ctx("change the owner of", path)?;
    file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
        .ctx("change the mode of", path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Scratch;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> Option<String> {
        fs::read_to_string(path).ok()
    }

    /// Needs root, as the tests do anyway (CI runs them as root).
    fn whiteout(path: &Path) {
        nix::sys::stat::mknod(
            path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
    }

    fn set_opaque(dir: &Path) {
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated strings and a one-byte value that outlive the call.
        let r =
            unsafe { libc::lsetxattr(path.as_ptr(), OPAQUE.as_ptr(), c"y".as_ptr().cast(), 1, 0) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }

    /// A base root, an upper layer with every kind of change, and the result.
    #[test]
    fn commit_applies_an_upper_layer_and_keeps_the_base() {
        let scratch = Scratch::new("snapshots");
        let base = scratch.0.join("base");
        write(&base.join("etc/kept"), "kept");
        write(&base.join("etc/changed"), "old");
        write(&base.join("etc/deleted"), "gone");
        write(&base.join("opaque/hidden"), "hidden");
        write(&base.join("dir-to-file/inside"), "x");
        symlink("/etc", base.join("link-to-dir")).unwrap();
        let upper = scratch.0.join("upper");
        write(&upper.join("etc/changed"), "new");
        write(&upper.join("etc/added"), "added");
        whiteout(&upper.join("etc/deleted"));
        write(&upper.join("opaque/shown"), "shown");
        set_opaque(&upper.join("opaque"));
        write(&upper.join("dir-to-file"), "now a file");
        write(&upper.join("link-to-dir/escaped"), "stays inside");
        symlink("etc/added", upper.join("new-link")).unwrap();
        fs::set_permissions(upper.join("etc/added"), fs::Permissions::from_mode(0o751)).unwrap();

        let snapshots = Snapshots::new(&scratch.0.join("data"), 7);
        assert!(snapshots.current("env").unwrap().is_none());
        // The sandbox ran in a range of its own; its files are stored from the storage base.
        let owners = IdShift {
            sandbox: 40 << 16,
            storage: 100_000,
        };
        lchown(
            upper.join("etc/added"),
            Some((40 << 16) + 1000),
            Some((40 << 16) + 7),
        )
        .unwrap();
        lchown(upper.join("new-link"), Some((40 << 16) + 5), Some(40 << 16)).unwrap();
        lchown(upper.join("opaque"), Some(40 << 16), Some(40 << 16)).unwrap();
        let first = snapshots.commit("env", &base, &upper, owners).unwrap();
        let root = first.rootfs();
        assert_eq!(read(&root.join("etc/kept")).as_deref(), Some("kept"));
        assert_eq!(read(&root.join("etc/changed")).as_deref(), Some("new"));
        assert_eq!(read(&root.join("etc/added")).as_deref(), Some("added"));
        let added = fs::metadata(root.join("etc/added")).unwrap();
        assert_eq!(added.mode() & 0o7777, 0o751);
        assert_eq!((added.uid(), added.gid()), (101_000, 100_007));
        let link = fs::symlink_metadata(root.join("new-link")).unwrap();
        assert_eq!((link.uid(), link.gid()), (100_005, 100_000));
        let opaque = fs::metadata(root.join("opaque")).unwrap();
        assert_eq!((opaque.uid(), opaque.gid()), (100_000, 100_000));
        // Written by the test (host root, outside the sandbox's range): stored as `nobody`.
        let shown = fs::metadata(root.join("opaque/shown")).unwrap();
        assert_eq!((shown.uid(), shown.gid()), (165_534, 165_534));
        assert!(!root.join("etc/deleted").exists());
        assert!(!root.join("opaque/hidden").exists());
        assert_eq!(read(&root.join("opaque/shown")).as_deref(), Some("shown"));
        assert_eq!(
            read(&root.join("dir-to-file")).as_deref(),
            Some("now a file")
        );
        assert!(
            fs::symlink_metadata(root.join("link-to-dir"))
                .unwrap()
                .is_dir()
        );
        assert!(!Path::new("/etc/escaped").exists());
        assert_eq!(
            fs::read_link(root.join("new-link")).unwrap(),
            Path::new("etc/added")
        );
        // The base is untouched, and unchanged files share its inodes.
        assert_eq!(read(&base.join("etc/changed")).as_deref(), Some("old"));
        assert_eq!(read(&base.join("etc/deleted")).as_deref(), Some("gone"));
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&base.join("etc/kept")), ino(&root.join("etc/kept")));

        // The next edit builds on the first; the first stays while it is held.
        let upper2 = scratch.0.join("upper2");
        whiteout(&{
            fs::create_dir_all(upper2.join("etc")).unwrap();
            upper2.join("etc/kept")
        });
        let second = snapshots.commit("env", &root, &upper2, owners).unwrap();
        assert!(!second.rootfs().join("etc/kept").exists());
        assert_eq!(
            read(&second.rootfs().join("etc/added")).as_deref(),
            Some("added")
        );
        assert_eq!(read(&root.join("etc/kept")).as_deref(), Some("kept"));
        assert_eq!(snapshots.current("env").unwrap().unwrap(), second);
        let first_dir = first.dir.clone();
        drop(first);
        snapshots.reset("env").unwrap();
        assert!(snapshots.current("env").unwrap().is_none());
        assert!(!first_dir.exists(), "unused versions are collected");
        assert!(second.dir.exists(), "a held version stays");
    }
}
