//! Built images on disk, their versions, who uses them, and garbage collection.
//!
//! ```text
//! <data>/environments/images/<Name>/
//!     .lock               held (exclusive) by a build or a garbage collection of <Name>
//!     current -> <version>
//!     <version>/          12 hex digits: a hash of the recipe (see Recipe::version)
//!         rootfs/         the image, owned by the sandbox's mapped ids
//!         image.json      what it was built from (Metadata)
//!         definition.toml the definition's text, for people
//!         lock            shared-locked by everything that uses this version
//!     .build-<version>/   a build in progress (or one killed half-way)
//!     .trash-<version>/   a version being deleted
//! ```
//!
//! **In use.** Every user of a version holds a shared `flock` on its `lock` file: the catalog of a
//! running server (for the versions it hands out), and every sandbox started from it (its
//! `sandbox-init`, PID 1 of the sandbox, keeps a descriptor of the file open for its whole life,
//! so the lock outlives server restarts and dies with the sandbox, whatever kills it).
//! Garbage collection deletes a version only if it is not `current` and it can take the lock
//! exclusively, which it keeps while it deletes. A reader that raced with a deletion notices
//! (its lock file is no longer the one at the path) and reads `current` again.
//!
//! **Versions stay put.** A sandbox's root is opened as a directory at its start, so replacing
//! `current` never changes what a running sandbox sees.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::definition::{IMAGE_GENERATOR_VERSION, Recipe, is_version};
use crate::{Error, ID_RANGE, IoContext};

/// Where images live, below the data dir.
pub(crate) const IMAGES_DIR: &str = "environments/images";

const CURRENT: &str = "current";
const ENV_LOCK: &str = ".lock";
const VERSION_LOCK: &str = "lock";
pub(crate) const METADATA: &str = "image.json";
pub(crate) const DEFINITION_COPY: &str = "definition.toml";
pub(crate) const ROOTFS: &str = "rootfs";
pub(crate) const BUILD_PREFIX: &str = ".build-";
const TRASH_PREFIX: &str = ".trash-";

/// What an image was built from, stored beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Metadata {
    pub name: String,
    pub version: String,
    pub generator: u32,
    pub uid_base: u32,
    /// Seconds since the epoch when the build finished.
    pub built_at: u64,
    pub recipe: Recipe,
}

/// The images of one data dir.
#[derive(Debug, Clone)]
pub struct Images {
    root: PathBuf,
}

/// One version of an environment's image, held in use (see the module docs) for as long as this
/// value (or a clone of it) lives.
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub version: String,
    /// `<data>/environments/images/<Name>/<version>`.
    pub dir: PathBuf,
    pub recipe: Recipe,
    pub uid_base: u32,
    /// The shared lock that keeps this version from garbage collection.
    held: Arc<OwnedFd>,
}

impl PartialEq for Image {
    fn eq(&self, other: &Image) -> bool {
        self.dir == other.dir && self.version == other.version
    }
}

impl Eq for Image {}

impl Image {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(ROOTFS)
    }

    /// A new shared lock on this version, for a sandbox to hold for its whole life. The
    /// descriptor is close-on-exec; the lock lasts until every copy of it is closed.
    pub fn pin(&self) -> Result<OwnedFd, Error> {
        pin_version(&self.dir, &self.held)
    }
}

/// A new shared lock on the version at `dir`, which `held` (a shared lock of it) keeps from
/// collection.
pub(crate) fn pin_version(dir: &Path, held: &OwnedFd) -> Result<OwnedFd, Error> {
    let path = dir.join(VERSION_LOCK);
    let file = open_version_lock(&path).ctx("open", &path)?;
    // `held` keeps collectors away, so this cannot meet an exclusive lock, and the file at the
    // path is still the one it locks.
    flock(&file, libc::LOCK_SH | libc::LOCK_NB).ctx("lock", &path)?;
    let held = fs::File::from(held.try_clone().ctx("duplicate", &path)?);
    match (file.metadata(), held.metadata()) {
        (Ok(new), Ok(old)) if (new.dev(), new.ino()) == (old.dev(), old.ino()) => Ok(file.into()),
        _ => Err(Error::Io {
            action: "pin",
            path,
            source: std::io::Error::other("the version's lock file was replaced"),
        }),
    }
}

/// The current version of one environment, taken into use: its name, directory and lock.
pub(crate) struct Held {
    pub version: String,
    pub dir: PathBuf,
    pub lock: OwnedFd,
}

/// What a garbage collection of one environment did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Versions deleted.
    pub removed: Vec<String>,
    /// Versions kept because a server or a sandbox uses them.
    pub in_use: Vec<String>,
    /// Leftovers of interrupted builds and deletions that were removed.
    pub leftovers: usize,
}

impl Images {
    pub fn new(data_dir: &Path) -> Images {
        Images::at(data_dir.join(IMAGES_DIR))
    }

    /// Versioned environments under `root`, in the layout of the module docs.
    pub(crate) fn at(root: PathBuf) -> Images {
        Images { root }
    }

    pub(crate) fn env_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The version `current` names, without taking it into use.
    pub fn current_version(&self, name: &str) -> Result<Option<String>, Error> {
        let link = self.env_dir(name).join(CURRENT);
        match fs::read_link(&link) {
            Ok(target) => Ok(target.to_str().filter(|v| is_version(v)).map(str::to_owned)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("read", &link),
        }
    }

    /// The current image of `name`, taken into use; `None` if it was never built.
    pub fn current(&self, name: &str) -> Result<Option<Image>, Error> {
        let Some(held) = self.take_current(name)? else {
            return Ok(None);
        };
        let metadata = read_metadata(&held.dir)?;
        Ok(Some(Image {
            name: name.to_owned(),
            version: held.version,
            dir: held.dir,
            recipe: metadata.recipe,
            uid_base: metadata.uid_base,
            held: Arc::new(held.lock),
        }))
    }

    /// The version `current` names, taken into use (a shared lock on it); `None` if there is
    /// none.
    pub(crate) fn take_current(&self, name: &str) -> Result<Option<Held>, Error> {
        let env_dir = self.env_dir(name);
        // A garbage collection may delete the version between reading `current` and locking it;
        // it never deletes the one `current` names, so the next round finds a stable one.
        for _ in 0..10 {
            let Some(version) = self.current_version(name)? else {
                return Ok(None);
            };
            let dir = env_dir.join(&version);
            let lock_path = dir.join(VERSION_LOCK);
            let file = match open_version_lock(&lock_path) {
                Ok(file) => file,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e).ctx("open", &lock_path),
            };
            match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e).ctx("lock", &lock_path),
            }
            if !same_file(&file, &lock_path) {
                continue;
            }
            return Ok(Some(Held {
                version,
                dir,
                lock: file.into(),
            }));
        }
        Err(Error::Io {
            action: "take into use the current version of",
            path: env_dir,
            source: std::io::Error::other("it kept changing under concurrent builds"),
        })
    }

    /// Garbage-collects every environment whose lock is free (an environment being built is
    /// collected by its build when it ends). Returns what each collection did.
    pub fn collect_all(&self) -> Result<Vec<(String, Collected)>, Error> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx("read", &self.root),
        };
        let mut done = Vec::new();
        for entry in entries {
            let entry = entry.ctx("read", &self.root)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !entry.file_type().ctx("stat", &entry.path())?.is_dir() {
                continue;
            }
            if let Some(lock) = self.try_lock(&name)? {
                done.push((name.clone(), self.collect(&name, &lock)?));
            }
        }
        Ok(done)
    }

    /// The environment's exclusive lock, if no build or collection holds it.
    pub(crate) fn try_lock(&self, name: &str) -> Result<Option<EnvLock>, Error> {
        self.env_lock(name, libc::LOCK_EX | libc::LOCK_NB)
    }

    /// The environment's exclusive lock, waiting for a build or collection that holds it.
    pub(crate) fn lock(&self, name: &str) -> Result<EnvLock, Error> {
        Ok(self
            .env_lock(name, libc::LOCK_EX)?
            .expect("a blocking flock either locks or fails"))
    }

    fn env_lock(&self, name: &str, operation: libc::c_int) -> Result<Option<EnvLock>, Error> {
        let dir = self.env_dir(name);
        fs::create_dir_all(&dir).ctx("create", &dir)?;
        let path = dir.join(ENV_LOCK);
        let file = open_env_lock(&path).ctx("open", &path)?;
        match flock(&file, operation) {
            Ok(()) => Ok(Some(EnvLock { file })),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e).ctx("lock", &path),
        }
    }

    /// Makes `name` have no current version (the next collection removes its unused ones).
    pub(crate) fn clear_current(&self, name: &str, _lock: &EnvLock) -> Result<(), Error> {
        remove_path(&self.env_dir(name).join(CURRENT))
    }

    /// Deletes the versions of `name` that are neither current nor in use, and leftovers of
    /// interrupted builds. The caller holds the environment's lock.
    pub(crate) fn collect(&self, name: &str, _lock: &EnvLock) -> Result<Collected, Error> {
        let env_dir = self.env_dir(name);
        let current = self.current_version(name)?;
        let mut collected = Collected::default();
        let mut names: Vec<String> = fs::read_dir(&env_dir)
            .ctx("read", &env_dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        for entry in names {
            let path = env_dir.join(&entry);
            if entry.starts_with(BUILD_PREFIX)
                || entry.starts_with(TRASH_PREFIX)
                || entry == ".current.new"
            {
                // Nobody builds (we hold the lock), so these are dead builds' and deletions'.
                remove_path(&path)?;
                collected.leftovers += 1;
                continue;
            }
            if !is_version(&entry) || current.as_deref() == Some(entry.as_str()) {
                continue;
            }
            let lock_path = path.join(VERSION_LOCK);
            let lock = match open_version_lock(&lock_path) {
                Ok(file) => file,
                // Not a complete version (every version gets its lock file before it is named).
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    remove_path(&path)?;
                    collected.leftovers += 1;
                    continue;
                }
                Err(e) => return Err(e).ctx("open", &lock_path),
            };
            match flock(&lock, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    collected.in_use.push(entry);
                    continue;
                }
                Err(e) => return Err(e).ctx("lock", &lock_path),
            }
            // Renamed first, so that a half-deleted version is never mistaken for a whole one.
            let trash = env_dir.join(format!("{TRASH_PREFIX}{entry}"));
            fs::rename(&path, &trash).ctx("move aside", &path)?;
            remove_path(&trash)?;
            drop(lock);
            tracing::info!(environment = name, version = %entry, "removed an unused image version");
            collected.removed.push(entry);
        }
        Ok(collected)
    }

    /// Makes `version` (a complete version directory) the current one, atomically.
    pub(crate) fn set_current(
        &self,
        name: &str,
        version: &str,
        _lock: &EnvLock,
    ) -> Result<(), Error> {
        let env_dir = self.env_dir(name);
        let temporary = env_dir.join(".current.new");
        remove_path(&temporary)?;
        symlink(version, &temporary).ctx("create symlink", &temporary)?;
        let link = env_dir.join(CURRENT);
        fs::rename(&temporary, &link).ctx("replace", &link)
    }
}

/// An environment's exclusive lock (see the module docs), released on drop.
#[derive(Debug)]
pub(crate) struct EnvLock {
    /// Inherited by the build's child processes (see `build`), so that a build killed abruptly
    /// keeps its environment locked until the last of its processes is gone.
    pub(crate) file: fs::File,
}

pub(crate) fn read_metadata(dir: &Path) -> Result<Metadata, Error> {
    let path = dir.join(METADATA);
    let text = fs::read_to_string(&path).ctx("read", &path)?;
    serde_json::from_str(&text).map_err(|e| Error::Io {
        action: "parse",
        path,
        source: std::io::Error::other(e),
    })
}

impl Metadata {
    pub(crate) fn new(name: &str, version: &str, uid_base: u32, recipe: &Recipe) -> Metadata {
        let built_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Metadata {
            name: name.to_owned(),
            version: version.to_owned(),
            generator: IMAGE_GENERATOR_VERSION,
            uid_base,
            built_at,
            recipe: recipe.clone(),
        }
    }
}

/// Creates a version's lock file (root-only: a sandbox's root must not open it through
/// `/proc/1/fd`).
pub(crate) fn create_version_lock(dir: &Path) -> Result<(), Error> {
    let path = dir.join(VERSION_LOCK);
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map(drop)
        .ctx("create", &path)
}

/// An environment's lock file, created on first use.
fn open_env_lock(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// A version's lock file, which exists as long as the version does.
fn open_version_lock(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// `flock(2)`. Locks belong to the open file description: every descriptor duplicated from
/// `file` (by `dup`, `fork` or `SCM_RIGHTS`) shares it, and it goes when the last one closes.
pub(crate) fn flock(file: &impl AsRawFd, operation: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock takes a descriptor and flags; the descriptor is open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Whether the open `file` is still the one at `path` (and not a deleted or renamed one).
fn same_file(file: &fs::File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Removes a file, symlink or directory tree, refusing a tree that has anything mounted inside
/// it: a build's chroot may have had `/dev` or `/proc` mounted, and deleting through such a
/// mount would delete the host's files. Missing paths are fine.
pub(crate) fn remove_path(path: &Path) -> Result<(), Error> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("stat", path),
    };
    if !meta.is_dir() {
        return fs::remove_file(path).ctx("remove", path);
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .ctx("read", Path::new("/proc/self/mountinfo"))?;
    if let Some(mount) = mounts_below(&mounts, path).first() {
        return Err(Error::MountedInside {
            path: path.to_owned(),
            mount: mount.clone(),
        });
    }
    fs::remove_dir_all(path).ctx("remove", path)
}

/// Mount points (from a `/proc/self/mountinfo` text) at or below `path`.
fn mounts_below(mountinfo: &str, path: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|mount| mount.starts_with(path))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |n, d| n.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Moves every owner of the tree at `root` from the ids it was built with (host root building
/// it: 0..65536) into the sandbox's mapped range (`uid_base + id`), symlinks included, so that
/// inside a sandbox every file belongs to whom the image says.
///
/// `chown` clears set-user-ID and set-group-ID bits and file capabilities; the bits are put
/// back (they do nothing in a sandbox, whose root is mounted `nosuid`, but tools show them and
/// `dpkg --verify` checks them); capabilities stay dropped, as `nosuid` would ignore them too.
/// Returns the number of entries shifted.
pub(crate) fn shift_ownership(root: &Path, uid_base: u32) -> Result<u64, Error> {
    let top = fs::symlink_metadata(root).ctx("stat", root)?;
    let mut seen_links = HashSet::new();
    let mut stack = vec![root.to_owned()];
    let mut count = 0;
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).ctx("stat", &path)?;
        if meta.dev() != top.dev() {
            return Err(Error::Io {
                action: "shift the owners of",
                path,
                source: std::io::Error::other("another filesystem is mounted here"),
            });
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).ctx("read", &path)? {
                stack.push(entry.ctx("read", &path)?.path());
            }
        } else if meta.nlink() > 1 && !seen_links.insert((meta.dev(), meta.ino())) {
            // Another name of a file already shifted.
            continue;
        }
        let (uid, gid) = (meta.uid(), meta.gid());
        if uid >= ID_RANGE || gid >= ID_RANGE {
            return Err(Error::Io {
                action: "shift the owners of",
                path,
                source: std::io::Error::other(format!(
                    "it belongs to {uid}:{gid}, outside the {ID_RANGE} ids a sandbox maps"
                )),
            });
        }
        lchown(&path, Some(uid_base + uid), Some(uid_base + gid)).ctx("chown", &path)?;
        let mode = meta.mode() & 0o7777;
        if meta.is_file() && mode & 0o6000 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).ctx("chmod", &path)?;
        }
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Scratch;

    fn recipe() -> Recipe {
        crate::Definition::parse("Bash", "Bash.toml", "suite = \"bookworm\"")
            .unwrap()
            .recipe
            .unwrap()
    }

    /// A complete version directory, as a build leaves it.
    fn fake_version(images: &Images, name: &str, version: &str) -> PathBuf {
        let dir = images.env_dir(name).join(version);
        fs::create_dir_all(dir.join(ROOTFS)).unwrap();
        create_version_lock(&dir).unwrap();
        let metadata = Metadata::new(name, version, 100_000, &recipe());
        fs::write(
            dir.join(METADATA),
            serde_json::to_string(&metadata).unwrap(),
        )
        .unwrap();
        dir
    }

    #[test]
    fn current_is_taken_into_use_and_survives_collection() {
        let scratch = Scratch::new("images-current");
        let images = Images::new(&scratch.0);
        assert!(images.current("Bash").unwrap().is_none());
        fake_version(&images, "Bash", "aaaaaaaaaaaa");
        fake_version(&images, "Bash", "bbbbbbbbbbbb");
        let lock = images.try_lock("Bash").unwrap().unwrap();
        images.set_current("Bash", "aaaaaaaaaaaa", &lock).unwrap();
        let image = images.current("Bash").unwrap().unwrap();
        assert_eq!(image.version, "aaaaaaaaaaaa");
        assert_eq!(
            image.rootfs(),
            images.env_dir("Bash").join("aaaaaaaaaaaa/rootfs")
        );
        assert_eq!(image.recipe, recipe());

        // A new build becomes current; the old version is still held by `image`.
        images.set_current("Bash", "bbbbbbbbbbbb", &lock).unwrap();
        let collected = images.collect("Bash", &lock).unwrap();
        assert_eq!(collected.in_use, ["aaaaaaaaaaaa"]);
        assert!(collected.removed.is_empty());

        // A sandbox's pin keeps it after the catalog lets go.
        let pin = image.pin().unwrap();
        drop(image);
        assert_eq!(
            images.collect("Bash", &lock).unwrap().in_use,
            ["aaaaaaaaaaaa"]
        );
        drop(pin);
        let collected = images.collect("Bash", &lock).unwrap();
        assert_eq!(collected.removed, ["aaaaaaaaaaaa"]);
        assert!(!images.env_dir("Bash").join("aaaaaaaaaaaa").exists());
        assert!(images.env_dir("Bash").join("bbbbbbbbbbbb/rootfs").is_dir());
    }

    #[test]
    fn collection_selects_unused_versions_and_leftovers() {
        let scratch = Scratch::new("images-gc");
        let images = Images::new(&scratch.0);
        for version in [
            "111111111111",
            "222222222222",
            "333333333333",
            "444444444444",
        ] {
            fake_version(&images, "Python3", version);
        }
        let env_dir = images.env_dir("Python3");
        fs::create_dir_all(env_dir.join(".build-555555555555/rootfs/usr")).unwrap();
        fs::create_dir_all(env_dir.join(".trash-666666666666/rootfs")).unwrap();
        // A version directory without its lock file never completed.
        fs::create_dir_all(env_dir.join("777777777777/rootfs")).unwrap();
        fs::create_dir_all(env_dir.join("not-a-version")).unwrap();
        let lock = images.try_lock("Python3").unwrap().unwrap();
        images
            .set_current("Python3", "222222222222", &lock)
            .unwrap();
        let held = {
            let file = open_version_lock(&env_dir.join("333333333333/lock")).unwrap();
            flock(&file, libc::LOCK_SH).unwrap();
            file
        };

        // While one collection runs, no other can start.
        assert!(images.try_lock("Python3").unwrap().is_none());
        let collected = images.collect("Python3", &lock).unwrap();
        assert_eq!(collected.removed, ["111111111111", "444444444444"]);
        assert_eq!(collected.in_use, ["333333333333"]);
        assert_eq!(collected.leftovers, 3);
        let mut left: Vec<String> = fs::read_dir(&env_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".lock",
                "222222222222",
                "333333333333",
                "current",
                "not-a-version"
            ]
        );
        drop(held);
        drop(lock);

        // The server-start collection skips environments a build holds.
        let build = images.try_lock("Python3").unwrap().unwrap();
        assert!(images.collect_all().unwrap().is_empty());
        drop(build);
        let all = images.collect_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.removed, ["333333333333"]);
    }

    #[test]
    fn a_tree_with_a_mount_inside_is_not_deleted() {
        let mountinfo = "22 1 0:21 / / rw - ext4 /dev/vda rw\n\
                         30 22 0:5 / /data/.build-x/rootfs/dev rw - devtmpfs udev rw\n\
                         31 22 0:6 / /data/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mounts_below(mountinfo, Path::new("/data/.build-x")),
            [PathBuf::from("/data/.build-x/rootfs/dev")]
        );
        assert!(mounts_below(mountinfo, Path::new("/data/.build-y")).is_empty());
        assert_eq!(
            mounts_below(mountinfo, Path::new("/data/with space")),
            [PathBuf::from("/data/with space")]
        );
        assert!(mounts_below(mountinfo, Path::new("/data/.build")).is_empty());
    }

    #[test]
    fn ownership_moves_into_the_mapped_range() {
        // chown to other ids needs root.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let scratch = Scratch::new("images-shift");
        let root = scratch.0.join("rootfs");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("home/user")).unwrap();
        fs::write(root.join("usr/bin/su"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("usr/bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(root.join("usr/bin/wall"), "").unwrap();
        lchown(root.join("usr/bin/wall"), Some(0), Some(5)).unwrap();
        fs::set_permissions(
            root.join("usr/bin/wall"),
            fs::Permissions::from_mode(0o2755),
        )
        .unwrap();
        fs::write(root.join("home/user/notes"), "hi").unwrap();
        fs::hard_link(root.join("home/user/notes"), root.join("home/user/again")).unwrap();
        lchown(root.join("home/user/notes"), Some(1000), Some(1000)).unwrap();
        lchown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        lchown(root.join("bin"), Some(0), Some(0)).unwrap();

        assert_eq!(shift_ownership(&root, 200_000).unwrap(), 9);
        let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!((meta("").uid(), meta("").gid()), (200_000, 200_000));
        assert_eq!((meta("bin").uid(), meta("bin").gid()), (200_000, 200_000));
        assert_eq!(meta("usr/bin").uid(), 200_000);
        assert_eq!(
            (meta("home/user").uid(), meta("home/user").gid()),
            (201_000, 201_000)
        );
        // A hard link is one file: shifted once, not twice.
        assert_eq!(meta("home/user/notes").uid(), 201_000);
        assert_eq!(meta("home/user/again").uid(), 201_000);
        assert_eq!(meta("usr/bin/su").mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(meta("usr/bin/wall").mode() & 0o7777, 0o2755, "setgid kept");
        assert_eq!(meta("usr/bin/wall").gid(), 200_005);

        // An owner outside the sandbox's range cannot be mapped.
        let other = scratch.0.join("other");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("far"), "").unwrap();
        lchown(other.join("far"), Some(70_000), Some(0)).unwrap();
        let error = shift_ownership(&other, 200_000).unwrap_err().to_string();
        assert!(error.contains("outside the 65536 ids"), "{error}");
    }
}
