//! The sandbox's writable layer (the upper layer of its overlay root): an ext4 filesystem of its
//! own, on a loop device over a sparse file `<data>/layers/<sandbox-id>.img`.
//!
//! Why not a tmpfs, as before (issue #15): tmpfs pages are memory, charged to the sandbox's
//! memory cgroup, so a sandbox writing half its advertised disk was OOM-killed. Why not a
//! directory on the data dir's filesystem: nothing would bound it but a project quota, which
//! needs quota support many kernels are built without. A filesystem per sandbox bounds what it
//! writes on any kernel with loop devices: past its size the sandbox gets ENOSPC, and neither
//! the host nor another sandbox notices.
//!
//! What a start costs: the server keeps one formatted image per disk size
//! (`layers/templates/`), made once with `mkfs.ext4` (10 to 40 ms; no journal, as the layer
//! dies with its sandbox; lazily initialized inode tables, so only a few hundred KiB of it are
//! data, the rest holes). A start copies that image sparsely (a reflink where the filesystem
//! has them, else only its data extents: about 1 ms), attaches a loop device to the copy and
//! mounts it with the new mount API: a detached mount, in no mount table of the host, whose
//! descriptor goes to the sandbox's init (see `init::Dirs`), which puts its overlay's upper and
//! work directories on it.
//!
//! The loop device does direct I/O on the image: otherwise everything a sandbox writes would be
//! cached twice, by its ext4 and by the image file's page cache, and the second copy is charged
//! to the sandbox's memory cgroup as well (loop devices charge their I/O to the issuer's).
//! With it, only the ext4's own page cache is charged, which the memory cgroup reclaims by
//! writing it back to disk rather than killing the sandbox.
//!
//! The loop device is set to clear itself (autoclear) when its last opener closes it: the
//! ext4 superblock, once its last mount (the sandbox's, held by its mount namespace and PID 1's
//! descriptor `init::LAYER_FD`) is gone. [`Layers::remove`] then deletes the image, whose
//! blocks the host gets back once the loop device lets go of it.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use crate::error::{Error, IoContext};
use crate::init::new_mount;
use crate::valid_sandbox_id;

/// Names the templates' format: bumped whenever the `mkfs.ext4` options change, so that no
/// server uses a template another version made.
const TEMPLATE_FORMAT: &str = "ext4-v2";

/// The options every template is made with. 4 KiB blocks whatever the size (mke2fs would pick
/// 1 KiB ones for small filesystems, and the loop device's blocks are 4 KiB); an inode per
/// 16 KiB, as mke2fs's default; no journal and no room to grow (`resize_inode`): the layer
/// dies with its sandbox and never changes size; nothing reserved for root (`-m 0`): the
/// sandbox's root is the only user; lazily initialized inode tables and no discard, so that
/// only metadata is written and the image stays sparse.
const MKFS_ARGS: &[&str] = &[
    "-q",
    "-F",
    "-t",
    "ext4",
    "-b",
    "4096",
    "-i",
    "16384",
    "-I",
    "256",
    "-m",
    "0",
    "-O",
    "^has_journal,^resize_inode",
    "-E",
    "lazy_itable_init=1,nodiscard,root_owner=0:0",
];

/// What a sandbox's start takes of its layer (the overlay's directories, the first entries of
/// its upper layer), on top of what it is promised.
const START_BYTES: u64 = 256 << 10;

/// The loop device's block size, the filesystem's: direct I/O then never needs a partial block.
const BLOCK_SIZE: u32 = 4096;

/// `<linux/loop.h>`, which the libc crate does not carry.
mod sys {
    pub const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    pub const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
    pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
    pub const LO_FLAGS_DIRECT_IO: u32 = 16;
    /// `FICLONE`: `_IOW(0x94, 9, int)`.
    pub const FICLONE: libc::c_ulong = 0x4004_9409;

    #[repr(C)]
    pub struct LoopInfo64 {
        pub lo_device: u64,
        pub lo_inode: u64,
        pub lo_rdevice: u64,
        pub lo_offset: u64,
        pub lo_sizelimit: u64,
        pub lo_number: u32,
        pub lo_encrypt_type: u32,
        pub lo_encrypt_key_size: u32,
        pub lo_flags: u32,
        pub lo_file_name: [u8; 64],
        pub lo_crypt_name: [u8; 64],
        pub lo_encrypt_key: [u8; 32],
        pub lo_init: [u64; 2],
    }

    #[repr(C)]
    pub struct LoopConfig {
        pub fd: u32,
        pub block_size: u32,
        pub info: LoopInfo64,
        pub reserved: [u64; 8],
    }
}

/// The writable layers of this node's sandboxes.
pub(crate) struct Layers {
    /// `<data>/layers`: one image per sandbox.
    dir: PathBuf,
    /// `<data>/layers/templates`: one formatted image per disk size.
    templates: PathBuf,
    /// The templates made or found by this process, by disk size. Held while one is made, so
    /// that concurrent first starts of a size make it once.
    made: Mutex<HashMap<u64, PathBuf>>,
    /// Held while a loop device is found and bound: every start asking at once would be given
    /// the same free device, and all but one would have to ask again, over and over (a burst
    /// of 100 creates ran out of retries).
    binding: Mutex<()>,
}

impl Layers {
    /// Prepares `<data>/layers` and checks that this host can make layers at all, so that a
    /// server that cannot says so when it starts rather than at its first create.
    pub(crate) fn new(data_dir: &Path) -> Result<Layers, Error> {
        let dir = data_dir.join("layers");
        let templates = dir.join("templates");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&templates)
            .ctx("create", &templates)?;
        let layers = Layers {
            dir,
            templates,
            made: Mutex::new(HashMap::new()),
            binding: Mutex::new(()),
        };
        match Command::new("mkfs.ext4").arg("-V").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Err(unusable(format!(
                    "`mkfs.ext4 -V` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Err(e) => {
                return Err(unusable(format!(
                    "cannot run mkfs.ext4 ({e}); install e2fsprogs"
                )));
            }
        }
        File::options()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(|e| {
                unusable(format!(
                    "cannot open /dev/loop-control ({e}); load the loop module (modprobe loop)"
                ))
            })?;
        Ok(layers)
    }

    /// The image of sandbox `id`.
    fn image(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.img"))
    }

    /// Whether sandbox `id` has an image (a new sandbox id must not).
    pub(crate) fn exists(&self, id: &str) -> bool {
        self.image(id).exists()
    }

    /// A fresh writable layer of `disk_bytes` usable bytes for sandbox `id`, its root directory
    /// owned by `owner` (the sandbox's root on the host): a detached mount, which the sandbox's
    /// init attaches in its own mount namespace. Whatever fails, no image or loop device is
    /// left behind.
    pub(crate) fn make(&self, id: &str, disk_bytes: u64, owner: u32) -> Result<OwnedFd, Error> {
        let template = self.template(disk_bytes)?;
        let image = self.image(id);
        let made =
            copy_sparse(&template, &image).and_then(|()| mount(&image, owner, &self.binding));
        if made.is_err() {
            let _ = fs::remove_file(&image);
        }
        made
    }

    /// Deletes the image of sandbox `id` (a sandbox that has none is fine). Its loop device
    /// goes by itself once the sandbox's mounts are gone; see [`Layers::attached`].
    pub(crate) fn remove(&self, id: &str) -> Result<(), Error> {
        let image = self.image(id);
        match fs::remove_file(&image) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e).ctx("remove", &image),
            _ => Ok(()),
        }
    }

    /// The loop devices still backed by the image of sandbox `id`, deleted or not, as
    /// `/sys/block/loopN`.
    pub(crate) fn attached(&self, id: &str) -> Vec<PathBuf> {
        let image = self.image(id);
        let image = image.as_os_str().as_bytes();
        let Ok(entries) = fs::read_dir("/sys/block") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_name().as_bytes().starts_with(b"loop"))
            .map(|e| e.path())
            .filter(|dev| {
                fs::read(dev.join("loop/backing_file")).is_ok_and(|name| {
                    let name = name.strip_suffix(b"\n").unwrap_or(&name);
                    let name = name.strip_suffix(b" (deleted)").unwrap_or(name);
                    name == image
                })
            })
            .collect()
    }

    /// The sandbox ids that have an image.
    pub(crate) fn ids(&self) -> Result<Vec<String>, Error> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx("list", &self.dir),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.ctx("list", &self.dir)?;
            let name = entry.file_name();
            let id = name.to_str().and_then(|n| n.strip_suffix(".img"));
            if let Some(id) = id.filter(|id| valid_sandbox_id(id)) {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }

    /// The template of `disk_bytes`, made if this data dir has none yet.
    fn template(&self, disk_bytes: u64) -> Result<PathBuf, Error> {
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(path) = made.get(&disk_bytes) {
            return Ok(path.clone());
        }
        let path = self
            .templates
            .join(format!("{TEMPLATE_FORMAT}-{disk_bytes}.img"));
        if !path.is_file() {
            // Made aside and renamed into place: another server on this data dir (a `burrow
            // sandbox-run`) never sees half a template.
            let scratch = self.templates.join(format!(
                ".{TEMPLATE_FORMAT}-{disk_bytes}.{}.tmp",
                std::process::id()
            ));
            let formatted = format_template(&scratch, disk_bytes)
                .and_then(|()| fs::rename(&scratch, &path).ctx("rename", &scratch));
            if formatted.is_err() {
                let _ = fs::remove_file(&scratch);
            }
            formatted?;
        }
        made.insert(disk_bytes, path.clone());
        Ok(path)
    }
}

/// The bytes the filesystem holding `dir` has free for files (`statvfs` `f_bavail`): where
/// the writable layers' images grow as their sandboxes write.
pub fn available_bytes(dir: &Path) -> std::io::Result<u64> {
    let fs = nix::sys::statvfs::statvfs(dir)?;
    Ok(fs.blocks_available() * fs.fragment_size())
}

fn unusable(reason: String) -> Error {
    Error::Layer { reason }
}

/// Formats `path` as an ext4 filesystem with at least `disk_bytes` usable: the sandbox is
/// promised that much, and ext4 keeps some of its size for itself (inode tables, bitmaps and
/// group descriptors: about 1.6%; and 2% of its blocks, at most 4096, held back from files
/// for the metadata of delayed allocations), so the image is that much larger.
fn format_template(path: &Path, disk_bytes: u64) -> Result<(), Error> {
    let block = u64::from(BLOCK_SIZE);
    let mut size = disk_bytes.div_ceil(block) * block;
    // The overhead grows with the size; two rounds settle it, a few more are for safety.
    for _ in 0..5 {
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .ctx("create", path)?;
        file.set_len(size).ctx("size", path)?;
        drop(file);
        let out = Command::new("mkfs.ext4")
            .args(MKFS_ARGS)
            .arg(path)
            .output()
            .map_err(|e| unusable(format!("cannot run mkfs.ext4 ({e}); install e2fsprogs")))?;
        if !out.status.success() {
            return Err(unusable(format!(
                "mkfs.ext4 failed on {} ({}): {}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let usable = usable_bytes(path)?;
        let wanted = disk_bytes + START_BYTES;
        if usable >= wanted {
            return Ok(());
        }
        size += (wanted - usable).div_ceil(block) * block;
    }
    Err(unusable(format!(
        "mkfs.ext4 keeps making {} too small for {disk_bytes} free bytes",
        path.display()
    )))
}

/// The bytes files may take in the ext4 at `path`, as `statfs` will count them once mounted:
/// the free blocks its superblock counts (no block is reserved for root in a template), less
/// the clusters the kernel keeps back for delayed allocations (`ext4_calculate_resv_clusters`:
/// 2% of the blocks, at most 4096; a cluster is a block here).
fn usable_bytes(path: &Path) -> Result<u64, Error> {
    let mut sb = [0u8; 1024];
    File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(1024))?;
            f.read_exact(&mut sb)
        })
        .ctx("read the superblock of", path)?;
    let u32_at = |at: usize| u64::from(u32::from_le_bytes(sb[at..at + 4].try_into().unwrap()));
    let magic = u16::from_le_bytes([sb[0x38], sb[0x39]]);
    if magic != 0xEF53 {
        return Err(unusable(format!(
            "mkfs.ext4 left no ext4 superblock in {}",
            path.display()
        )));
    }
    const INCOMPAT_64BIT: u64 = 0x80;
    let (mut blocks, mut free) = (u32_at(0x04), u32_at(0x0C));
    if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u32_at(0x150) << 32;
        free |= u32_at(0x158) << 32;
    }
    let held_back = (blocks / 50).min(4096);
    Ok(free.saturating_sub(held_back) << (10 + u32_at(0x18)))
}

/// Copies `template` to a new file `image` without filling its holes: a reflink where the
/// filesystem has them, else its data extents alone (`SEEK_DATA`/`SEEK_HOLE`,
/// `copy_file_range`).
fn copy_sparse(template: &Path, image: &Path) -> Result<(), Error> {
    let from = File::open(template).ctx("open", template)?;
    let to = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .ctx("create", image)?;
    // SAFETY: FICLONE reads the source descriptor from its int argument; both are open.
    if unsafe { libc::ioctl(to.as_raw_fd(), sys::FICLONE, from.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let len = from.metadata().ctx("stat", template)?.len();
    let mut at: i64 = 0;
    let len_i = i64::try_from(len).expect("a template is far below 2^63 bytes");
    while at < len_i {
        // SAFETY: lseek takes only integers.
        let data = unsafe { libc::lseek(from.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // No data after `at`: the rest is a hole.
            }
            return Err(e).ctx("find the data of", template);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error()).ctx("find the holes of", template);
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX);
            // SAFETY: both offsets are this function's own variables, live across the call.
            let copied = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if copied <= 0 {
                let e = if copied == 0 {
                    std::io::Error::from(ErrorKind::UnexpectedEof)
                } else {
                    std::io::Error::last_os_error()
                };
                return Err(e).ctx("copy the layer template to", image);
            }
        }
        at = hole;
    }
    to.set_len(len).ctx("size", image)
}

/// Attaches `image` to a free loop device, mounts its ext4 (detached) and gives its root to
/// `owner`.
/// `binding` is held while the loop device is found and bound.
fn mount(image: &Path, owner: u32, binding: &Mutex<()>) -> Result<OwnedFd, Error> {
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
        .ctx("open", image)?;
    let bound = {
        let _one_at_a_time = binding.lock().unwrap_or_else(PoisonError::into_inner);
        attach_loop(&file, image)
    };
    let (device, loop_fd) = bound?;
    let step = |what: &str| format!("mount {} ({what})", device.display());
    let source = CString::new(device.as_os_str().as_bytes()).expect("a device path has no NUL");
    let io = |what: &str, e: std::io::Error| Error::Setup {
        step: step(what),
        source: e,
    };
    let fs = new_mount::open(c"ext4").map_err(|e| io("fsopen", e))?;
    new_mount::set(&fs, c"source", &source).map_err(|e| io("source", e))?;
    let layer = new_mount::create(&fs, libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV)
        .map_err(|e| io("fsmount", e))?;
    // The filesystem holds the loop device open from here: ours may close, and once the
    // filesystem lets go too, the device clears itself.
    drop(loop_fd);
    // SAFETY: fchownat on the mount's root (empty path, AT_EMPTY_PATH); the descriptor is open.
    let chowned = unsafe {
        libc::fchownat(
            layer.as_raw_fd(),
            c"".as_ptr(),
            owner,
            owner,
            libc::AT_EMPTY_PATH,
        )
    };
    if chowned != 0 {
        return Err(io(
            "give its root to the sandbox",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(layer)
}

/// Binds `file` to a free loop device (autoclear, direct I/O); returns the device's path and
/// an open descriptor of it, which keeps it bound until the filesystem opens it too.
fn attach_loop(file: &File, image: &Path) -> Result<(PathBuf, OwnedFd), Error> {
    let control_path = Path::new("/dev/loop-control");
    let control = File::options()
        .read(true)
        .write(true)
        .open(control_path)
        .ctx("open", control_path)?;
    let mut name = [0u8; 64];
    let bytes = image.as_os_str().as_bytes();
    let kept = bytes.len().min(name.len() - 1);
    name[..kept].copy_from_slice(&bytes[..kept]);
    // Another process (a `burrow sandbox-run`, losetup) may take the free device between the
    // two calls (EBUSY): ask again.
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), sys::LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(std::io::Error::last_os_error())
                .ctx("find a free loop device in", control_path);
        }
        let device = PathBuf::from(format!("/dev/loop{number}"));
        let dev = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&device)
            .ctx("open", &device)?;
        let config = sys::LoopConfig {
            fd: u32::try_from(file.as_raw_fd()).expect("descriptors are not negative"),
            block_size: BLOCK_SIZE,
            info: sys::LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: sys::LO_FLAGS_AUTOCLEAR | sys::LO_FLAGS_DIRECT_IO,
                lo_file_name: name,
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a loop_config, which outlives the call.
        if unsafe { libc::ioctl(dev.as_raw_fd(), sys::LOOP_CONFIGURE, &config) } == 0 {
            return Ok((device, OwnedFd::from(dev)));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e).ctx("attach a loop device to", image);
        }
    }
    Err(std::io::Error::other(
        "every free loop device was taken by someone else, 64 times",
    ))
    .ctx("attach a loop device to", image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_leave_the_promised_space_free() {
        let dir = std::env::temp_dir().join(format!("burrow-layer-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for disk in [1 << 20, 256 << 20, 1 << 30] {
            let path = dir.join(format!("{disk}.img"));
            format_template(&path, disk).unwrap();
            let usable = usable_bytes(&path).unwrap();
            let size = fs::metadata(&path).unwrap().len();
            assert!(
                usable >= disk + START_BYTES,
                "{disk}: only {usable} bytes usable"
            );
            // Not much more either: the image is the disk plus ext4's own overhead.
            assert!(
                size < disk + disk / 20 + (1 << 20),
                "{disk}: image of {size} bytes"
            );
            let copy = dir.join(format!("{disk}.copy"));
            copy_sparse(&path, &copy).unwrap();
            assert_eq!(fs::read(&copy).unwrap(), fs::read(&path).unwrap());
            let meta = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&copy).unwrap());
            assert!(
                meta * 512 < 4 << 20,
                "{disk}: the copy allocated {meta} sectors"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
