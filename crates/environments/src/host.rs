//! The generated root filesystem the built-in environments share: a minimal `/etc` of burrow's
//! own (never the host's accounts or secrets), a home for `user`, and mount points for the
//! host's `/usr` and the few harmless host files listed in [`HOST_ETC`].

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::{Bind, Error, HOSTNAME, IoContext, PATH};

/// Bump when the generated tree changes, so existing data dirs regenerate it at the next start.
const GENERATOR_VERSION: u32 = 1;

/// Host files and directories under `/etc` the sandbox sees read-only, when the host has them:
/// what programs under `/usr` read at run time (alternatives' symlinks, CA certificates, the
/// dynamic linker's cache, language runtimes' configuration). Nothing with secrets: no
/// shadow, ssh, ssl/private, or accounts.
const HOST_ETC: &[&str] = &[
    "alternatives",
    "ssl/certs",
    "ssl/openssl.cnf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "protocols",
    "services",
    "mime.types",
    "inputrc",
    "perl",
    "php",
    "dotnet",
];

/// Families of `/etc` entries named after a runtime's version (`java-17-openjdk`,
/// `python3.11`): (prefix, suffix).
const HOST_ETC_FAMILIES: &[(&str, &str)] = &[("java-", "-openjdk"), ("python3", "")];

/// Top-level directories that merged-/usr hosts make symlinks into `/usr`.
const USR_ALIASES: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// What the generated root filesystem needs to know about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// `bin -> usr/bin` and the like, copied from the host.
    pub links: Vec<(PathBuf, PathBuf)>,
    /// Read-only binds of host paths, each also a mount point in the rootfs.
    pub binds: Vec<Bind>,
}

impl Layout {
    /// Reads the host's layout; `root` is `/` except in tests.
    pub fn of_host(root: &Path) -> Layout {
        let mut links = Vec::new();
        let mut binds = vec![bind(root, "usr")];
        for alias in USR_ALIASES {
            let host = root.join(alias);
            match fs::read_link(&host) {
                Ok(target) => links.push((PathBuf::from(alias), target)),
                // Not merged: bind the real directory, it holds programs and libraries.
                Err(_) if host.is_dir() => binds.push(bind(root, alias)),
                Err(_) => {}
            }
        }
        let etc = root.join("etc");
        let mut etc_binds: Vec<String> = HOST_ETC
            .iter()
            .filter(|name| fs::symlink_metadata(etc.join(name)).is_ok())
            .map(|name| (*name).to_owned())
            .collect();
        if let Ok(entries) = fs::read_dir(&etc) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let in_family = HOST_ETC_FAMILIES
                    .iter()
                    .any(|(prefix, suffix)| name.starts_with(prefix) && name.ends_with(suffix));
                if in_family && entry.path().is_dir() {
                    etc_binds.push(name);
                }
            }
        }
        etc_binds.sort();
        binds.extend(
            etc_binds
                .iter()
                .map(|name| bind(root, &format!("etc/{name}"))),
        );
        Layout { links, binds }
    }
}

fn bind(root: &Path, relative: &str) -> Bind {
    Bind {
        host: root.join(relative),
        inside: Path::new("/").join(relative),
    }
}

/// Returns `<dir>/rootfs`, generating it first when missing or stale. Generation happens in a
/// scratch directory and is renamed into place, under a lock, so a reader never sees half a tree.
pub(crate) fn ensure_rootfs(dir: &Path, uid_base: u32, layout: &Layout) -> Result<PathBuf, Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx("create", dir)?;
    let lock_path = dir.join(".lock");
    let lock_file = fs::File::create(&lock_path).ctx("create", &lock_path)?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| std::io::Error::from(errno))
        .ctx("lock", &lock_path)?;

    let rootfs = dir.join("rootfs");
    let stamp_path = dir.join("rootfs.stamp");
    let stamp = format!("generator {GENERATOR_VERSION}\nuid_base {uid_base}\n{layout:#?}\n");
    if rootfs.is_dir() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(rootfs);
    }

    remove_leftovers(dir)?;
    let fresh = dir.join("rootfs.new");
    generate(&fresh, uid_base, layout)?;
    let old = dir.join("rootfs.old");
    if rootfs.exists() {
        fs::rename(&rootfs, &old).ctx("move aside", &rootfs)?;
    }
    fs::rename(&fresh, &rootfs).ctx("move into place", &fresh)?;
    let stamp_tmp = dir.join("rootfs.stamp.new");
    fs::write(&stamp_tmp, stamp).ctx("write", &stamp_tmp)?;
    fs::rename(&stamp_tmp, &stamp_path).ctx("move into place", &stamp_tmp)?;
    remove_leftovers(dir)?;
    tracing::info!(rootfs = %rootfs.display(), "generated the host environments' root filesystem");
    Ok(rootfs)
}

/// Scratch and replaced trees of an earlier (possibly interrupted) generation.
fn remove_leftovers(dir: &Path) -> Result<(), Error> {
    for name in ["rootfs.new", "rootfs.old"] {
        let path = dir.join(name);
        match fs::remove_dir_all(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).ctx("remove", &path);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Builds the tree at `root` (which must not exist), owned by the mapped ids: inside root is
/// host `uid_base`, inside `user` (1000) is `uid_base + 1000`.
fn generate(root: &Path, uid_base: u32, layout: &Layout) -> Result<(), Error> {
    const DIRS: &[(&str, u32)] = &[
        ("", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("home/user", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("run", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("mnt", 0o755),
        ("opt", 0o755),
    ];
    for (dir, mode) in DIRS {
        let path = root.join(dir);
        fs::create_dir(&path).ctx("create", &path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).ctx("chmod", &path)?;
    }
    for (name, content) in etc_files() {
        let path = root.join("etc").join(name);
        fs::write(&path, content).ctx("write", &path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).ctx("chmod", &path)?;
    }
    let etc_links = [
        ("etc/localtime", "/usr/share/zoneinfo/Etc/UTC"),
        ("etc/os-release", "../usr/lib/os-release"),
        ("etc/mtab", "../proc/self/mounts"),
    ];
    let links = etc_links
        .iter()
        .map(|(link, target)| (PathBuf::from(link), PathBuf::from(target)))
        .chain(layout.links.iter().cloned());
    for (link, target) in links {
        let path = root.join(link);
        symlink(&target, &path).ctx("create symlink", &path)?;
    }
    for bind in &layout.binds {
        let path = root.join(bind.inside.strip_prefix("/").unwrap_or(&bind.inside));
        if bind.host.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&path)
                .ctx("create mount point", &path)?;
        } else {
            if let Some(parent) = path.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .ctx("create", parent)?;
            }
            fs::write(&path, "").ctx("create mount point", &path)?;
        }
    }
    chown_tree(root, uid_base)?;
    let home = root.join("home/user");
    lchown(&home, Some(uid_base + 1000), Some(uid_base + 1000)).ctx("chown", &home)
}

/// Everything in the tree to the sandbox's root (host `uid_base`), symlinks included.
fn chown_tree(path: &Path, uid_base: u32) -> Result<(), Error> {
    lchown(path, Some(uid_base), Some(uid_base)).ctx("chown", path)?;
    let meta = fs::symlink_metadata(path).ctx("stat", path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).ctx("read", path)? {
            chown_tree(&entry.ctx("read", path)?.path(), uid_base)?;
        }
    }
    Ok(())
}

/// The generated `/etc`: accounts of the sandbox only, localhost networking, a login profile.
fn etc_files() -> Vec<(&'static str, String)> {
    let mut files = vec![
        (
            "passwd",
            "root:x:0:0:root:/root:/bin/bash\n\
             user:x:1000:1000::/home/user:/bin/bash\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                .into(),
        ),
        (
            "group",
            "root:x:0:\ntty:x:5:\nusers:x:100:user\nuser:x:1000:\nnogroup:x:65534:\n".into(),
        ),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
             networks: files\nprotocols: files\nservices: files\n"
                .into(),
        ),
        (
            "profile",
            format!(
                "# Generated by burrow: login shells of the sandbox.\n\
                 export PATH=\"{PATH}\"\n\
                 umask 022\n\
                 if [ -n \"${{BASH_VERSION-}}\" ] && [ -n \"${{PS1-}}\" ] && [ -r /etc/bash.bashrc ]; then\n\
                 \t. /etc/bash.bashrc\n\
                 fi\n"
            ),
        ),
        (
            "bash.bashrc",
            "# Generated by burrow: interactive bash shells of the sandbox.\n\
             [ -z \"${PS1-}\" ] && return\n\
             PS1='\\u@\\h:\\w\\$ '\n"
                .into(),
        ),
        (
            "shells",
            "/bin/sh\n/bin/bash\n/usr/bin/sh\n/usr/bin/bash\n".into(),
        ),
        ("timezone", "Etc/UTC\n".into()),
    ];
    files.extend(network_files());
    files
}

/// The `/etc` files every sandbox's root needs, whatever it is built from: its host name and
/// loopback-only name resolution (a sandbox has no network beyond `lo`). Built images get them
/// too, replacing the build host's copies that `mmdebstrap` leaves.
pub(crate) fn network_files() -> Vec<(&'static str, String)> {
    vec![
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
                 127.0.1.1\t{HOSTNAME}\n"
            ),
        ),
        ("hostname", format!("{HOSTNAME}\n")),
        (
            "resolv.conf",
            "# Sandboxes have no network beyond loopback.\nnameserver 127.0.0.1\n".into(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Scratch;
    use std::os::unix::fs::MetadataExt;

    /// A fake merged-/usr host with a few /etc entries, secrets included.
    fn fake_host(root: &Path) {
        for dir in [
            "usr/bin",
            "usr/lib",
            "etc/alternatives",
            "etc/ssl/certs",
            "etc/ssl/private",
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::create_dir_all(root.join("etc/java-17-openjdk")).unwrap();
        fs::create_dir_all(root.join("etc/python3.11")).unwrap();
        fs::create_dir_all(root.join("root")).unwrap();
        fs::create_dir_all(root.join("home/alice")).unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        fs::write(root.join("etc/ld.so.cache"), "cache").unwrap();
        fs::write(root.join("etc/shadow"), "root:secret").unwrap();
        fs::write(
            root.join("etc/passwd"),
            "alice:x:1000:1000::/home/alice:/bin/sh",
        )
        .unwrap();
    }

    #[test]
    fn layout_binds_usr_and_harmless_etc_only() {
        let scratch = Scratch::new("layout");
        let host = scratch.0.join("host");
        fake_host(&host);
        let layout = Layout::of_host(&host);
        let inside: Vec<&str> = layout
            .binds
            .iter()
            .map(|b| b.inside.to_str().unwrap())
            .collect();
        assert_eq!(
            inside,
            [
                "/usr",
                "/etc/alternatives",
                "/etc/java-17-openjdk",
                "/etc/ld.so.cache",
                "/etc/python3.11",
                "/etc/ssl/certs"
            ]
        );
        for bind in &layout.binds {
            assert_eq!(bind.host, host.join(bind.inside.strip_prefix("/").unwrap()));
        }
        assert_eq!(
            layout.links,
            [
                ("bin".into(), "usr/bin".into()),
                ("lib".into(), "usr/lib".into())
            ]
        );
    }

    #[test]
    fn this_hosts_binds_hold_no_secrets() {
        let layout = Layout::of_host(Path::new("/"));
        assert_eq!(layout.binds[0].host, Path::new("/usr"));
        for bind in &layout.binds {
            assert_eq!(bind.host, bind.inside);
            for secret in [
                "/root",
                "/home",
                "/etc/shadow",
                "/etc/gshadow",
                "/etc/ssh",
                "/etc/ssl/private",
            ] {
                assert!(!bind.host.starts_with(secret), "{bind:?}");
            }
            assert!(
                bind.host != Path::new("/etc") && bind.host != Path::new("/etc/ssl"),
                "{bind:?}"
            );
        }
    }

    #[test]
    fn unmerged_usr_binds_the_top_level_directories() {
        let scratch = Scratch::new("unmerged");
        let host = &scratch.0;
        fs::create_dir_all(host.join("usr")).unwrap();
        fs::create_dir_all(host.join("bin")).unwrap();
        let layout = Layout::of_host(host);
        assert!(layout.links.is_empty());
        let inside: Vec<&Path> = layout.binds.iter().map(|b| b.inside.as_path()).collect();
        assert_eq!(inside, [Path::new("/usr"), Path::new("/bin")]);
    }

    #[test]
    fn rootfs_is_generated_once_and_owned_by_the_mapped_ids() {
        // chown into another id range needs root; the unprivileged case is covered by the layout tests.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let scratch = Scratch::new("rootfs");
        let host = scratch.0.join("host");
        fake_host(&host);
        let layout = Layout::of_host(&host);
        let dir = scratch.0.join("environments/host");
        let rootfs = ensure_rootfs(&dir, 200_000, &layout).unwrap();
        assert_eq!(rootfs, dir.join("rootfs"));

        let passwd = fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
        assert!(passwd.contains("user:x:1000:1000::/home/user:/bin/bash"));
        assert!(!passwd.contains("alice"));
        assert!(!rootfs.join("etc/shadow").exists());
        assert!(fs::read_dir(rootfs.join("root")).unwrap().next().is_none());
        assert_eq!(
            fs::read_link(rootfs.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert!(rootfs.join("etc/ssl/certs").is_dir());
        assert!(rootfs.join("etc/ld.so.cache").is_file());
        assert!(rootfs.join("usr").is_dir());

        let meta = |p: &str| fs::symlink_metadata(rootfs.join(p)).unwrap();
        assert_eq!((meta("").uid(), meta("").gid()), (200_000, 200_000));
        assert_eq!(meta("etc/passwd").uid(), 200_000);
        assert_eq!(meta("bin").uid(), 200_000);
        assert_eq!(meta("home/user").uid(), 201_000);
        assert_eq!(meta("tmp").mode() & 0o7777, 0o1777);
        assert_eq!(meta("root").mode() & 0o7777, 0o700);

        // Unchanged inputs keep the tree; a new uid base regenerates it.
        fs::write(rootfs.join("marker"), "").unwrap();
        ensure_rootfs(&dir, 200_000, &layout).unwrap();
        assert!(rootfs.join("marker").exists());
        ensure_rootfs(&dir, 300_000, &layout).unwrap();
        assert!(!rootfs.join("marker").exists());
        assert_eq!(meta("home/user").uid(), 301_000);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names.len(),
            3,
            "only rootfs, its stamp and the lock remain: {names:?}"
        );
    }
}
