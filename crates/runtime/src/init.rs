//! The sandbox's side of the start, run by `burrow sandbox-init` as PID 1 of the new
//! namespaces, as root of its user namespace (the first host id of the sandbox's own range).
//!
//! [`receive`] takes what the server sends on fd 3; [`enter`] builds the sandbox's root (an
//! overlay of the environment's rootfs under the writable layer the server made, read-only binds, fresh `/proc`, minimal
//! `/dev`), binds envd's socket in the run directory (on the host's filesystem,
//! before the host disappears from view), pivots into the new root, brings up `lo`, and locks the
//! process down (capabilities, `no_new_privs`, seccomp). The caller then becomes envd, or runs a
//! single command with [`run_command`].
//!
//! The server hands over the directories it needs as descriptors rather than paths: the sandbox's
//! root is an unprivileged uid on the host and may not be allowed to walk the path to the data
//! directory. The server opens them through `/proc/<pid>/root` after the clone, so that they
//! belong to the sandbox's mount namespace (mounts only accept those), and sends them over the
//! control socket. Every one of them is closed before the pivot.

use std::fs;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};

use burrow_environments::{Bind, User};
use caps::{CapSet, Capability};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use nix::sys::stat::{Mode, umask};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, chdir, pivot_root, sethostname};
use serde::{Deserialize, Serialize};

use crate::error::{Error, SetupContext};

/// The control socket from the server: a go byte (taken before the `execve`), one byte carrying
/// the three directories and the writable layer of [`Dirs`], the sandbox's id range lock and,
/// for an environment built
/// as an image, its version's pin (`SCM_RIGHTS`), then one JSON [`InitConfig`], then EOF.
/// The sandbox closes it once built, which tells the server that envd's socket is listening.
pub const CONTROL_FD: RawFd = 3;

/// PID 1 keeps the sandbox's writable layer open on this descriptor (close-on-exec, so no
/// process it starts inherits it) for its whole life. The layer is mounted nowhere a path leads
/// to, so this is how the host reaches what the sandbox wrote, as
/// `/proc/<pid 1>/fd/100/upper` (see `Namespaces::freeze`): an edit session's changes.
pub const LAYER_FD: RawFd = 100;

/// envd's socket, in the run directory.
pub const SOCKET_NAME: &str = "envd.sock";

/// What the server tells `sandbox-init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    pub hostname: String,
    pub binds: Vec<Bind>,
    pub user: User,
    pub env: Vec<(String, String)>,
    /// Where the user's commands start.
    pub workdir: PathBuf,
    /// envd starts the first command's login shell ahead (see `SandboxSpec::ready_shell`).
    #[serde(default)]
    pub ready_shell: bool,
    /// Run this command instead of envd (`burrow sandbox-run`).
    pub exec: Option<Exec>,
    /// Bind the run directory's `resolv.conf` (burrow's resolver, at the sandbox's gateway) on
    /// `/etc/resolv.conf`: the sandbox has a network.
    #[serde(default)]
    pub resolv_conf: bool,
}

/// A single command to run in the sandbox instead of envd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    pub argv: Vec<String>,
    /// Run as the sandbox's root instead of its user.
    pub as_root: bool,
}

/// Capabilities (within the sandbox's user namespace) envd keeps: enough to run processes as
/// the user (SETUID, SETGID), signal them (KILL), and read, write and hand over any file of the
/// sandbox (CHOWN, DAC_OVERRIDE, FOWNER, FSETID). Everything else goes, from the bounding set
/// too, so not even a process run as root gets more.
const KEPT_CAPABILITIES: [Capability; 7] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
];

/// Host devices the sandbox gets, bound into a fresh tmpfs `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// `/proc` files that tell about or act on the host: covered with `/dev/null`. `cmdline` and
/// `config.gz` describe the host's kernel build and boot; `/proc/loadavg`, `stat` and `meminfo`
/// stay, host-wide as they are, since everyday tools (`uptime`, `top`, `free`) parse them.
const PROC_MASKED_FILES: &[&str] = &[
    "cmdline",
    "config.gz",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "sched_debug",
    "sysrq-trigger",
];
/// `/proc` directories of host hardware, and the host-wide pressure stall figures (which tell
/// what other tenants are doing): covered with an empty read-only tmpfs.
const PROC_MASKED_DIRS: &[&str] = &["acpi", "pressure", "scsi"];
/// Caps on the kernel objects the user namespace's users may hold (`/proc/sys/user`), written
/// while `/proc/sys` is still writable. They count per user of the sandbox, and every one of
/// them is also charged to the host user owning the namespace (one per sandbox), whose own
/// limits are the host's: without these caps one sandbox could take the host's whole budget. Namespaces are
/// refused by the seccomp filter too; the zeros say so to the kernel as well. Files a kernel
/// lacks are skipped.
const USER_NAMESPACE_CAPS: &[(&str, u32)] = &[
    ("max_inotify_instances", 32),
    ("max_inotify_watches", 16384),
    ("max_fanotify_groups", 0),
    ("max_fanotify_marks", 0),
    ("max_user_namespaces", 0),
    ("max_mnt_namespaces", 0),
    ("max_pid_namespaces", 0),
    ("max_net_namespaces", 0),
    ("max_ipc_namespaces", 0),
    ("max_uts_namespaces", 0),
    ("max_cgroup_namespaces", 0),
    ("max_time_namespaces", 0),
];

/// Resource limits (soft = hard) of every process in the sandbox, set by PID 1 before the
/// capabilities go (raising them back takes CAP_SYS_RESOURCE, which nothing keeps).
/// Pending signals and message-queue bytes are counted per user and charged up to the host user
/// owning the namespace, like the caps above. Open files: envd serves every websocket, process
/// pipe and tunnel of the sandbox from one process, and is the only holder of many at once; it
/// shares the limit with user processes (its spawn path cannot set one of their own), and 8192
/// covers it while keeping `pids` x `nofile` in bounds.
const RESOURCE_LIMITS: [(&str, Resource, libc::rlim_t); 3] = [
    ("RLIMIT_SIGPENDING", libc::RLIMIT_SIGPENDING, 1024),
    ("RLIMIT_MSGQUEUE", libc::RLIMIT_MSGQUEUE, 1 << 20),
    ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, 8192),
];

/// setrlimit's resource argument (`u32` on glibc, `c_int` on musl).
#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

/// `/proc` trees made read-only.
const PROC_READ_ONLY: &[&str] = &["sys", "bus", "fs", "irq"];

/// Directories of the host the setup needs, open in the sandbox's mount namespace, and the
/// control socket, closed once the sandbox is built.
#[derive(Debug)]
pub struct Dirs {
    /// The environment's root filesystem (the overlay's lower layer): a detached, read-only
    /// mount of it, idmapped by the server so that its owners (stored from `uid_base`) show as
    /// this sandbox's ids (see `crate::idmap`).
    rootfs: OwnedFd,
    /// An empty directory to attach the sandbox's writable layer on, in its own mount namespace.
    stage: OwnedFd,
    /// The sandbox's run directory, where envd's socket goes.
    run: OwnedFd,
    /// The writable layer: a detached mount of the filesystem the server made for this sandbox
    /// (see `crate::layer`), its root owned by the sandbox's root.
    layer: OwnedFd,
    /// The exclusive lock on the sandbox's host id range (see `crate::ids`): held until this
    /// process, PID 1, exits, so the range is in use exactly as long as the sandbox lives.
    ids: OwnedFd,
    /// A shared lock on the image version the rootfs belongs to (see
    /// `burrow_environments::images`): held until this process, PID 1, exits, so the version is
    /// in use exactly as long as the sandbox lives.
    pin: Option<OwnedFd>,
    control: UnixStream,
}

impl Dirs {
    /// Sends rootfs, stage and run directory and the writable layer, in this order, the id
    /// range's lock, then the image's pin if there is one, as [`receive`] takes them.
    pub(crate) fn send(
        socket: &impl AsRawFd,
        dirs: &[OwnedFd; 4],
        ids: &OwnedFd,
        pin: Option<&OwnedFd>,
    ) -> nix::Result<()> {
        let fds: Vec<RawFd> = dirs
            .iter()
            .chain([ids])
            .chain(pin)
            .map(AsRawFd::as_raw_fd)
            .collect();
        let data = [std::io::IoSlice::new(b"d")];
        let rights = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(socket.as_raw_fd(), &data, &rights, MsgFlags::empty(), None).map(drop)
    }
}

/// Reads the directories and the configuration from fd 3, to EOF.
pub fn receive() -> Result<(InitConfig, Dirs), Error> {
    // SAFETY: fd 3 was placed by the runtime's clone child just for this process (see
    // `spawn::clone_init`), and nothing else here opens or owns it.
    let socket = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    let step = || "receive the directories from the server".to_owned();
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 6]);
    let mut data = [std::io::IoSliceMut::new(&mut byte)];
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut data,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .step(step)?;
    let mut received = Vec::new();
    for cmsg in message.cmsgs().step(step)? {
        let ControlMessageOwned::ScmRights(fds) = cmsg else {
            continue;
        };
        for fd in fds {
            // SAFETY: SCM_RIGHTS just installed this descriptor in this process; nothing else
            // owns it.
            received.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    let pin = if received.len() == 6 {
        received.pop()
    } else {
        None
    };
    let [rootfs, stage, run, layer, ids]: [OwnedFd; 5] = received
        .try_into()
        .map_err(|_| {
            std::io::Error::other(
                "expected three directories, a writable layer, an id range lock (and a pin, for \
                 an image)",
            )
        })
        .step(step)?;
    let config =
        serde_json::from_reader(std::io::BufReader::new(&socket)).map_err(Error::Config)?;
    let dirs = Dirs {
        rootfs,
        stage,
        run,
        layer,
        ids,
        pin,
        control: socket,
    };
    Ok((config, dirs))
}

/// What `sandbox-init` becomes once the sandbox is built.
#[derive(Debug)]
pub enum Role {
    /// envd, serving on this listener (envd's socket, as the host sees it in the run directory).
    Envd(UnixListener),
    /// PID 1 of a single command: see [`run_command`].
    Command(Exec),
}

/// Builds the sandbox around this process and locks it down; says what to become next.
pub fn enter(config: &InitConfig, dirs: Dirs) -> Result<Role, Error> {
    let Dirs {
        rootfs,
        stage,
        run,
        layer,
        ids,
        pin,
        control,
    } = dirs;
    // Never closed: the locks go when this process (PID 1) exits, and with it the sandbox.
    // The descriptors are close-on-exec, so no process the sandbox runs inherits them.
    std::mem::forget(pin);
    std::mem::forget(ids);
    // Executed as /proc/self/exe, the process would be called "exe" in `ps`.
    nix::sys::prctl::set_name(c"burrow-init").step(|| "name the process".into())?;

    // Now that the server has put this process in its cgroups, they become its cgroup root.
    unshare(CloneFlags::CLONE_NEWCGROUP).step(|| "enter a new cgroup namespace".into())?;
    // No mount event may cross between the host and the sandbox (on systemd hosts "/" is
    // shared; a new user namespace only turns that into receiving the host's mounts).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .step(|| "make the mount tree private".into())?;

    writable_layer(&layer, &stage)?;
    mount_overlay(&rootfs, &layer)?;
    keep_layer(layer)?;
    drop((rootfs, stage));
    mount_binds(&config.binds)?;
    if config.resolv_conf {
        bind_resolv_conf(&run)?;
    }
    mount_proc()?;
    mount_dev()?;
    let role = match &config.exec {
        None => Role::Envd(listen(&run)?),
        Some(exec) => Role::Command(exec.clone()),
    };
    drop(run);
    sethostname(&config.hostname).step(|| "set the hostname".into())?;
    loopback_up()?;
    pivot()?;
    lock_down()?;
    if let Role::Envd(_) = role {
        quiet_stdio()?;
    }
    drop(control);
    Ok(role)
}

/// Points stdout and stderr at `/dev/null`. They are the init log, a file in the host's data
/// directory that no disk limit covers: once the sandbox is built, envd would write there for
/// its whole life (and a root process could write through `/proc/1/fd`). The log keeps what
/// matters, the setup's errors, which the server quotes when a start fails; envd reports through
/// its API. A size limit (RLIMIT_FSIZE) would not do: envd's children would inherit it.
fn quiet_stdio() -> Result<(), Error> {
    let step = || "point stdout and stderr at /dev/null".to_owned();
    let null = fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .step(step)?;
    nix::unistd::dup2_stdout(&null).step(step)?;
    nix::unistd::dup2_stderr(&null).step(step)
}

/// Moves the writable layer's descriptor to [`LAYER_FD`] and keeps it open for good.
fn keep_layer(layer: OwnedFd) -> Result<(), Error> {
    // SAFETY: dup3 onto a descriptor number this process does not otherwise use (its received
    // descriptors are the lowest free ones); the new descriptor is owned by nothing and stays
    // open until the process exits.
    let kept = unsafe { libc::dup3(layer.as_raw_fd(), LAYER_FD, libc::O_CLOEXEC) };
    if kept != LAYER_FD {
        return Err(std::io::Error::last_os_error()).step(|| "keep the writable layer open".into());
    }
    Ok(())
}

fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Attaches the writable layer on the stage directory (overlayfs takes layers from this mount
/// namespace only) and makes `upper`, `work` and `root` in it. The layer's descriptor is the
/// only way to reach it: the stage is known only as a descriptor, and a path through that one
/// leads under the mount.
fn writable_layer(layer: &OwnedFd, stage: &OwnedFd) -> Result<(), Error> {
    new_mount::attach(layer, stage).step(|| "attach the sandbox's writable layer".into())?;
    for dir in ["upper", "work", "root"] {
        let path = fd_path(layer).join(dir);
        fs::create_dir(&path).step(|| format!("create {}", path.display()))?;
    }
    Ok(())
}

/// Mounts the overlay (environment rootfs below, writable layer above) and moves into it: from here on,
/// relative paths are inside the sandbox's root, absolute ones still on the host.
///
/// The rootfs is a detached mount made by the host's root; overlayfs takes a lower layer from
/// this mount namespace only, so it is attached on `lower` in the tmpfs first, and detached
/// again once the overlay holds its own reference: nothing then reaches the shared root but
/// the overlay (not even `/proc/1/fd/100`, the writable layer kept open).
fn mount_overlay(rootfs: &OwnedFd, layer: &OwnedFd) -> Result<(), Error> {
    let layer_path = fd_path(layer);
    let target = layer_path.join("root");
    let lower = layer_path.join("lower");
    fs::create_dir(&lower).step(|| format!("create {}", lower.display()))?;
    let lower_dir = fs::File::open(&lower).step(|| format!("open {}", lower.display()))?;
    new_mount::attach(rootfs, &OwnedFd::from(lower_dir))
        .step(|| "attach the environment's idmapped root".into())?;
    // userxattr: overlay's own xattrs go to the user.* namespace, as required in a user namespace.
    let options = format!(
        "lowerdir={},upperdir={},workdir={},userxattr",
        lower.display(),
        layer_path.join("upper").display(),
        layer_path.join("work").display()
    );
    mount(
        Some("overlay"),
        &target,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .step(|| format!("mount the overlay root ({options})"))?;
    umount2(&lower, MntFlags::MNT_DETACH)
        .step(|| "detach the environment's root from the writable layer".into())?;
    chdir(&target).step(|| "enter the new root".into())
}

/// The read-only binds of host paths the environment asks for.
fn mount_binds(binds: &[Bind]) -> Result<(), Error> {
    for bind in binds {
        let inside = relative(&bind.inside)?;
        let is_dir = match fs::metadata(&bind.host) {
            Ok(meta) => meta.is_dir(),
            // The host lost it since the server started; the sandbox can do without.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                eprintln!(
                    "burrow sandbox-init: {} is gone from the host; not bound",
                    bind.host.display()
                );
                continue;
            }
            Err(e) => return Err(e).step(|| format!("stat {}", bind.host.display())),
        };
        mount_point(&inside, is_dir)?;
        mount(
            Some(&bind.host),
            &inside,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .step(|| format!("bind {} on {}", bind.host.display(), bind.inside.display()))?;
        let attrs = libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
        new_mount::set_attributes(&inside, attrs)
            .step(|| format!("make {} read-only", bind.inside.display()))?;
    }
    Ok(())
}

/// Binds the server's `resolv.conf` for this sandbox (in the run directory, owned by the host's
/// root) read-only on `/etc/resolv.conf`, over the rootfs's loopback-only one. A copy in the
/// writable layer would end up in a saved edit session; a bind of the run directory's file
/// would name its host path in the sandbox's `/proc/self/mountinfo`. So its text is copied into
/// a tiny tmpfs of its own, mounted nowhere, whose file alone is attached there: `mountinfo`
/// shows `/resolv.conf` of a tmpfs.
fn bind_resolv_conf(run: &OwnedFd) -> Result<(), Error> {
    let inside = Path::new("etc/resolv.conf");
    // Not through a symlink: this still resolves against the host's root.
    if !fs::symlink_metadata(inside).is_ok_and(|meta| meta.is_file()) {
        eprintln!("burrow sandbox-init: /etc/resolv.conf is not a regular file; not replaced");
        return Ok(());
    }
    let text = fs::read(fd_path(run).join("resolv.conf"))
        .step(|| "read the sandbox's resolv.conf".into())?;
    let step = || "bind the sandbox's /etc/resolv.conf".to_string();
    let fs = new_mount::open(c"tmpfs").step(step)?;
    new_mount::set(&fs, c"size", c"64k").step(step)?;
    let tmpfs = new_mount::create(&fs, 0).step(step)?;
    let dir = fd_path(&tmpfs);
    fs::write(dir.join("resolv.conf"), &text).step(step)?;
    let file = new_mount::clone_tree(&tmpfs, c"resolv.conf").step(step)?;
    let target = fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(inside)
        .step(step)?;
    new_mount::attach(&file, &target.into()).step(step)?;
    let attrs = libc::MOUNT_ATTR_RDONLY
        | libc::MOUNT_ATTR_NOSUID
        | libc::MOUNT_ATTR_NODEV
        | libc::MOUNT_ATTR_NOEXEC;
    new_mount::set_attributes(inside, attrs).step(|| "make /etc/resolv.conf read-only".into())
}

/// A fresh `/proc` of the sandbox's pid namespace, with the host-revealing parts covered.
fn mount_proc() -> Result<(), Error> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "proc", Some("proc"), flags, None::<&str>).step(|| "mount /proc".into())?;
    // Ports below 1024 protect nothing in a network namespace of one's own, and sandboxed web
    // servers expect to listen on 80.
    let sysctl = "proc/sys/net/ipv4/ip_unprivileged_port_start";
    fs::write(sysctl, "0").step(|| format!("write /{sysctl}"))?;
    for (name, value) in USER_NAMESPACE_CAPS {
        let path = Path::new("proc/sys/user").join(name);
        match fs::write(&path, value.to_string()) {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            written => written.step(|| format!("write /{}", path.display()))?,
        }
    }
    for name in PROC_MASKED_FILES {
        let path = Path::new("proc").join(name);
        if path.exists() {
            mount(
                Some("/dev/null"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .step(|| format!("mask /{}", path.display()))?;
        }
    }
    for name in PROC_MASKED_DIRS {
        let path = Path::new("proc").join(name);
        if path.is_dir() {
            mount(
                Some("tmpfs"),
                &path,
                Some("tmpfs"),
                flags | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .step(|| format!("mask /{}", path.display()))?;
        }
    }
    for name in PROC_READ_ONLY {
        let path = Path::new("proc").join(name);
        if path.exists() {
            mount(
                Some(&path),
                &path,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .step(|| format!("bind /{}", path.display()))?;
            let attrs = libc::MOUNT_ATTR_RDONLY
                | libc::MOUNT_ATTR_NOSUID
                | libc::MOUNT_ATTR_NODEV
                | libc::MOUNT_ATTR_NOEXEC;
            new_mount::set_attributes(&path, attrs)
                .step(|| format!("make /{} read-only", path.display()))?;
        }
    }
    Ok(())
}

/// A minimal `/dev`: a few host devices, a private devpts, a `/dev/shm`.
fn mount_dev() -> Result<(), Error> {
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        "dev",
        Some("tmpfs"),
        nosuid_noexec,
        Some("mode=755,size=64k"),
    )
    .step(|| "mount /dev".into())?;
    for name in DEVICES {
        let inside = Path::new("dev").join(name);
        let host = Path::new("/dev").join(name);
        fs::File::create(&inside).step(|| format!("create /{}", inside.display()))?;
        mount(
            Some(&host),
            &inside,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .step(|| format!("bind {}", host.display()))?;
    }
    fs::create_dir("dev/pts").step(|| "create /dev/pts".into())?;
    // A devpts of its own: the sandbox sees its terminals, not the host's. gid 5 is `tty`.
    mount(
        Some("devpts"),
        "dev/pts",
        Some("devpts"),
        nosuid_noexec,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .step(|| "mount /dev/pts".into())?;
    fs::create_dir("dev/shm").step(|| "create /dev/shm".into())?;
    mount(
        Some("tmpfs"),
        "dev/shm",
        Some("tmpfs"),
        nosuid_noexec | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )
    .step(|| "mount /dev/shm".into())?;
    let links = [
        ("dev/ptmx", "pts/ptmx"),
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ];
    for (link, target) in links {
        symlink(target, link).step(|| format!("create /{link}"))?;
    }
    Ok(())
}

/// envd's listening socket, created in the run directory on the host's filesystem: the host
/// reaches it by path, while the sandbox (after the pivot) cannot see the directory at all.
fn listen(run: &OwnedFd) -> Result<UnixListener, Error> {
    let path = fd_path(run).join(SOCKET_NAME);
    // Only the host's root (and the sandbox's, before the pivot) may connect.
    let old = umask(Mode::from_bits_truncate(0o077));
    let listener = UnixListener::bind(&path).step(|| "bind envd's socket".into());
    umask(old);
    listener
}

/// Sets `IFF_UP` on `lo`, the only interface of the new network namespace.
fn loopback_up() -> Result<(), Error> {
    let step = || "bring up the loopback interface".to_owned();
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(std::io::Error::last_os_error()).step(step);
    }
    // SAFETY: `socket` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(socket) };
    // SAFETY: ifreq is plain data; all-zero is a valid empty request.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write `ifr_flags` of the ifreq they are
    // given, which outlives both calls; the union member used is the one these requests define.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error()).step(step);
        }
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error()).step(step);
        }
    }
    Ok(())
}

/// Makes the current directory (the new root) the root, and drops the host's tree.
fn pivot() -> Result<(), Error> {
    // pivot_root(".", ".") stacks the old root on the new one; detaching "." then removes it.
    pivot_root(".", ".").step(|| "pivot_root into the new root".into())?;
    umount2(".", MntFlags::MNT_DETACH).step(|| "detach the host's root".into())?;
    chdir("/").step(|| "enter /".into())
}

/// Capabilities down to [`KEPT_CAPABILITIES`], `no_new_privs`, then the seccomp filter. Every
/// process the sandbox starts from here on inherits all three.
fn lock_down() -> Result<(), Error> {
    let caps_step = |what: &str, e: caps::errors::CapsError| Error::Setup {
        step: format!("drop capabilities ({what})"),
        source: std::io::Error::other(e.to_string()),
    };
    for (name, resource, limit) in RESOURCE_LIMITS {
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the rlimit it is given, which outlives the call; setrlimit
        // only reads it.
        let set = unsafe {
            libc::getrlimit(resource, &mut current) == 0 && {
                // Lower only: raising a hard limit would take CAP_SYS_RESOURCE on the host.
                let limit = limit.min(current.rlim_max);
                let lowered = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                libc::setrlimit(resource, &lowered) == 0
            }
        };
        if !set {
            return Err(std::io::Error::last_os_error()).step(|| format!("set {name}"));
        }
    }
    let kept: caps::CapsHashSet = KEPT_CAPABILITIES.into_iter().collect();
    // The bounding set needs CAP_SETPCAP to shrink, so it goes first.
    let bounding = caps::read(None, CapSet::Bounding).map_err(|e| caps_step("read", e))?;
    for cap in bounding.difference(&kept) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(|e| caps_step("bounding", e))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| caps_step("ambient", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| caps_step("inheritable", e))?;
    // Effective must stay within permitted at every step.
    caps::set(None, CapSet::Effective, &kept).map_err(|e| caps_step("effective", e))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| caps_step("permitted", e))?;
    nix::sys::prctl::set_no_new_privs().step(|| "set no_new_privs".into())?;
    // Not dumpable: a process of the sandbox running as its root (same uid, same capabilities)
    // could otherwise ptrace PID 1 or take its descriptors with pidfd_getfd, envd's listening
    // socket among them. Programs PID 1 executes are dumpable again, as execve makes them.
    nix::sys::prctl::set_dumpable(false).step(|| "make PID 1 non-dumpable".into())?;
    crate::seccomp::install()
}

/// Runs `exec` as the sandbox's user (or root) with the environment's variables, reaping every
/// process that ends up orphaned on this PID 1 meanwhile. Returns the command's exit code, as a
/// shell reports it (128 + signal when killed); 127 if it cannot be found, 126 if it cannot run.
pub fn run_command(config: &InitConfig, exec: &Exec) -> Result<i32, Error> {
    let Some((program, args)) = exec.argv.split_first() else {
        return Err(Error::Setup {
            step: "run the command".into(),
            source: std::io::Error::other("the command is empty"),
        });
    };
    let (uid, gid, name, home, workdir) = if exec.as_root {
        (0, 0, "root", Path::new("/root"), Path::new("/root"))
    } else {
        (
            config.user.uid,
            config.user.gid,
            config.user.name.as_str(),
            config.user.home.as_path(),
            config.workdir.as_path(),
        )
    };
    let spawned = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(config.env.iter().map(|(k, v)| (k, v)))
        .env("HOME", home)
        .env("USER", name)
        .env("LOGNAME", name)
        .current_dir(workdir)
        .gid(gid)
        .uid(uid)
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            eprintln!("burrow sandbox-init: cannot run {program}: {e}");
            return Ok(if e.kind() == ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return Ok(code),
            Ok(WaitStatus::Signaled(p, signal, _)) if p == pid => return Ok(128 + signal as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).step(|| "wait for the command".into()),
        }
    }
}

/// How a shell would report an exit status: the code, or 128 + the signal.
pub fn shell_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// `/a/b` as `a/b`, refusing `..` and anything else that could leave the new root.
fn relative(inside: &Path) -> Result<PathBuf, Error> {
    let mut components = inside.components();
    let rest: PathBuf = match components.next() {
        Some(Component::RootDir) => components.as_path().to_owned(),
        _ => PathBuf::new(),
    };
    if rest.as_os_str().is_empty() || !rest.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(Error::Setup {
            step: format!("bind on {}", inside.display()),
            source: std::io::Error::other("the path inside must be absolute, below /, without .."),
        });
    }
    Ok(rest)
}

/// Creates the directory or empty file a bind is mounted on, if the rootfs lacks it.
fn mount_point(path: &Path, is_dir: bool) -> Result<(), Error> {
    if fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    let step = || format!("create the mount point /{}", path.display());
    if is_dir {
        return fs::create_dir_all(path).step(step);
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).step(step)?;
    }
    fs::File::create(path).map(drop).step(step)
}

/// The new mount API (fsopen, fsmount, move_mount, mount_setattr), which nix does not wrap.
/// The server uses it too, to mount the writable layers (`crate::layer`).
pub(crate) mod new_mount {
    use std::ffi::CStr;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// A filesystem context for `fstype`.
    pub fn open(fstype: &CStr) -> io::Result<OwnedFd> {
        // SAFETY: fsopen reads a NUL-terminated string; the result is a new descriptor.
        let fd = check(unsafe {
            libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC)
        })?;
        // SAFETY: fsopen returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub fn set(fs: &OwnedFd, key: &CStr, value: &CStr) -> io::Result<()> {
        // SAFETY: fsconfig reads two NUL-terminated strings that outlive the call.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                libc::FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })
        .map(drop)
    }

    /// Creates the filesystem and a detached mount of it.
    pub fn create(fs: &OwnedFd, attributes: u64) -> io::Result<OwnedFd> {
        // SAFETY: fsconfig with FSCONFIG_CMD_CREATE takes no pointers.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                libc::FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_void>(),
                0,
            )
        })?;
        // SAFETY: fsmount takes only integers; the result is a new descriptor.
        let fd = check(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs.as_raw_fd(),
                libc::FSMOUNT_CLOEXEC,
                attributes,
            )
        })?;
        // SAFETY: fsmount returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// A detached mount of `path` below the mount `dir` (which may itself be detached).
    pub fn clone_tree(dir: &OwnedFd, path: &CStr) -> io::Result<OwnedFd> {
        let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC as libc::c_uint;
        // SAFETY: open_tree reads a NUL-terminated string that outlives the call; the result is a
        // new descriptor.
        let fd = check(unsafe {
            libc::syscall(libc::SYS_open_tree, dir.as_raw_fd(), path.as_ptr(), flags)
        })?;
        // SAFETY: open_tree returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Attaches the detached mount `mount` on the directory (or file) `target` refers to.
    pub fn attach(mount: &OwnedFd, target: &OwnedFd) -> io::Result<()> {
        // SAFETY: both paths are empty NUL-terminated strings; the descriptors are open.
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                mount.as_raw_fd(),
                c"".as_ptr(),
                target.as_raw_fd(),
                c"".as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
            )
        })
        .map(drop)
    }

    /// Adds mount attributes (`MOUNT_ATTR_RDONLY`, ...) to the mount at `path` and every
    /// mount below it. Unlike a remount, this keeps the flags a user namespace may not change.
    pub fn set_attributes(path: &Path, attributes: u64) -> io::Result<()> {
        let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let attr = libc::mount_attr {
            attr_set: attributes,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: `path` and `attr` outlive the call; the size passed is attr's.
        check(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::AT_RECURSIVE,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        })
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_json() {
        let config = InitConfig {
            hostname: "sandbox".into(),
            binds: vec![Bind {
                host: "/usr".into(),
                inside: "/usr".into(),
            }],
            user: User {
                name: "user".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/user".into(),
                shell: "/bin/bash".into(),
            },
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            workdir: "/home/user".into(),
            ready_shell: false,
            resolv_conf: true,
            exec: Some(Exec {
                argv: vec!["id".into(), "-u".into()],
                as_root: false,
            }),
        };
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<InitConfig>(&json).unwrap(), config);
        assert!(
            json.contains(r#""exec":{"argv":["id","-u"],"as_root":false}"#),
            "{json}"
        );
    }

    #[test]
    fn bind_targets_stay_inside_the_root() {
        assert_eq!(relative(Path::new("/usr")).unwrap(), Path::new("usr"));
        assert_eq!(
            relative(Path::new("/etc/ssl/certs")).unwrap(),
            Path::new("etc/ssl/certs")
        );
        for bad in ["usr", "/", "/usr/../../etc", "/./usr/.."] {
            assert!(relative(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn shell_codes() {
        use std::process::ExitStatus;
        assert_eq!(shell_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(shell_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    #[test]
    fn kept_capabilities_exclude_the_dangerous_ones() {
        for cap in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SETPCAP,
        ] {
            assert!(!KEPT_CAPABILITIES.contains(&cap), "{cap}");
        }
    }
}
