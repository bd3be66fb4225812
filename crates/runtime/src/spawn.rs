//! Starting a sandbox's first process: `clone3` into new namespaces, then `execve` of
//! `burrow sandbox-init`. The server is multi-threaded, so the child runs only async-signal-safe
//! system calls on data prepared before the clone: no allocation, no locks, no libc wrappers that
//! assume they know the process's threads.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use libc::c_char;

use crate::error::Error;
use crate::init::CONTROL_FD;

/// The namespaces every sandbox gets at birth. The cgroup namespace comes later, from
/// `sandbox-init`, once the process sits in its own cgroups (so they become its root).
const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// From linux/sched.h (libc's constant is an `i32`, too narrow for it).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// A started `sandbox-init`, held before its `execve` until the control socket says go.
pub(crate) struct Child {
    pub pid: i32,
    /// Readable once the process has exited; never reused for another process.
    pub pidfd: OwnedFd,
}

/// What the child needs, prepared before the clone because the child cannot allocate.
struct Prepared<'a> {
    program: CString,
    argv: [*const c_char; 3],
    envp: [*const c_char; 1],
    /// The descriptor that becomes fd 0, 1, 2, ... in the child.
    fds: [BorrowedFd<'a>; CHILD_FDS],
}

/// stdin, stdout, stderr and the control socket (fd 3, see [`crate::init`]).
const CHILD_FDS: usize = 4;

const ARGV0: &CStr = c"burrow";
const ARGV1: &CStr = c"sandbox-init";

/// Clones `program` as `burrow sandbox-init` into new namespaces, and into the cgroup v2
/// directory `cgroup` if given. `fds[n]` becomes its fd `n`: stdin, stdout, stderr, and the
/// control socket; every other descriptor is closed. The child waits for one byte on fd 3, then
/// becomes uid/gid 0 of its user namespace (the parent must have written the id maps by then)
/// and executes `program` with an empty environment. The new user namespace is owned by host
/// uid `owner` (see [`AsOwner`]).
pub(crate) fn clone_init(
    program: &Path,
    fds: [BorrowedFd<'_>; CHILD_FDS],
    cgroup: Option<BorrowedFd<'_>>,
    owner: u32,
) -> Result<Child, Error> {
    let program = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| Error::Clone(std::io::Error::other("init program path contains NUL")))?;
    let prepared = Prepared {
        argv: [ARGV0.as_ptr(), ARGV1.as_ptr(), std::ptr::null()],
        envp: [std::ptr::null()],
        program,
        fds,
    };
    let mut pidfd: RawFd = -1;
    // SAFETY: clone_args is plain data; all-zero is its documented "nothing requested" value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = (NAMESPACES | libc::CLONE_PIDFD) as u64;
    args.pidfd = &mut pidfd as *mut RawFd as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    if let Some(cgroup) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = cgroup.as_raw_fd() as u64;
    }
    let as_owner = AsOwner::enter(owner).map_err(Error::Clone)?;
    // SAFETY: clone3 without CLONE_VM or a stack behaves like fork: the child gets a copy of this
    // thread's memory and only ever runs `child`, which never returns. `args` and `pidfd` live
    // across the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if ret != 0 {
        // The parent (or a failed clone): back to host root before anything else.
        drop(as_owner);
    }
    match ret {
        -1 => Err(Error::Clone(std::io::Error::last_os_error())),
        // SAFETY: this is the freshly cloned, single-threaded child.
        0 => unsafe { child(&prepared) },
        pid => Ok(Child {
            pid: pid as i32,
            // SAFETY: CLONE_PIDFD stored a new descriptor, which nothing else owns.
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        }),
    }
}

/// This thread, and only this thread, acting with effective uid `owner` (its capabilities kept):
/// the kernel makes the effective uid of the thread that creates a user namespace its owner,
/// and charges per-user counts made inside it (inotify instances and watches, pending signals,
/// message queues) to the owner too. Owned by root, every sandbox would share those budgets with
/// host root and with each other; owned by a uid of its own, it cannot exhaust anyone else's.
///
/// Credentials are per thread in Linux; glibc's `setresuid` would change every thread of the
/// server, so this uses the raw system calls, and `SECBIT_NO_SETUID_FIXUP` so that the thread
/// keeps its capabilities (to clone into the cgroup and create namespaces) while its effective
/// uid is not 0. The child's securebits are reset by the kernel in its new user namespace.
struct AsOwner {
    securebits: libc::c_int,
}

impl AsOwner {
    fn enter(owner: u32) -> std::io::Result<AsOwner> {
        // SAFETY: prctl and setresuid change this thread's credentials only; no memory is
        // passed.
        unsafe {
            let securebits = libc::prctl(libc::PR_GET_SECUREBITS);
            if securebits < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let keep = securebits | SECBIT_NO_SETUID_FIXUP;
            if libc::prctl(libc::PR_SET_SECUREBITS, keep as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let guard = AsOwner { securebits };
            if libc::syscall(libc::SYS_setresuid, u32::MAX, owner, u32::MAX) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(guard)
        }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // SAFETY: as in `enter`. The real and saved uids stayed 0, so returning to an effective
        // uid of 0 is always allowed; a failure would leave this thread unable to start
        // sandboxes, which is worse than stopping.
        unsafe {
            if libc::syscall(libc::SYS_setresuid, u32::MAX, 0, u32::MAX) != 0
                || libc::prctl(libc::PR_SET_SECUREBITS, self.securebits as libc::c_ulong) != 0
            {
                std::process::abort();
            }
        }
    }
}

/// From linux/securebits.h.
const SECBIT_NO_SETUID_FIXUP: libc::c_int = 1 << 2;

/// Reaps the cloned child `pid` if it has exited; with `block`, waits until it has.
pub(crate) fn reap(pid: i32, block: bool) -> std::io::Result<Option<ExitStatus>> {
    let mut status = 0;
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: waitpid writes the status to a local int. The pid is this process's unreaped
    // child, so it cannot have been reused.
    match unsafe { libc::waitpid(pid, &mut status, flags) } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(None),
        _ => Ok(Some(ExitStatus::from_raw(status))),
    }
}

/// Whether the cloned child `pid` has exited (without reaping it: its watcher does that).
pub(crate) fn has_exited(pid: i32) -> bool {
    // SAFETY: waitid writes into a zeroed local siginfo_t. WNOWAIT leaves the child to be reaped
    // by its watcher, so the pid stays this process's child, never reused.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let done = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        // Reaped already (ECHILD) counts as exited; a live child leaves si_pid 0.
        done != 0 || info.si_pid() != 0
    }
}

/// Kills and reaps a cloned child given up on; returns how it ended.
pub(crate) fn kill(pid: i32) -> Option<ExitStatus> {
    // SAFETY: plain kill(2) of this process's unreaped child (so the pid is still its).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    reap(pid, true).ok().flatten()
}

/// The child between clone and execve.
///
/// # Safety
/// Must only run in a child cloned by [`clone_init`]: it shares a copy of a multi-threaded
/// process's memory, so it may only use async-signal-safe system calls.
unsafe fn child(p: &Prepared) -> ! {
    // SAFETY: plain system calls on descriptors and pointers prepared by the parent; nothing
    // here allocates or takes a lock.
    unsafe {
        // Copy every source above the targets first, since a source may sit on a target number.
        let mut moved = [0; CHILD_FDS];
        for (slot, fd) in moved.iter_mut().zip(&p.fds) {
            *slot = libc::fcntl(
                fd.as_raw_fd(),
                libc::F_DUPFD_CLOEXEC,
                CHILD_FDS as libc::c_int,
            );
            if *slot < 0 {
                fail(b"burrow: sandbox start: cannot duplicate a descriptor\n");
            }
        }
        for (target, fd) in moved.iter().enumerate() {
            // dup2 leaves the target without FD_CLOEXEC, so it survives the execve.
            if libc::dup2(*fd, target as libc::c_int) < 0 {
                fail(b"burrow: sandbox start: cannot place a descriptor\n");
            }
        }
        // Nothing of the server may reach the sandbox. On kernels before 5.9 this fails, and
        // FD_CLOEXEC (which Rust sets on every descriptor it opens) is what is left.
        libc::syscall(libc::SYS_close_range, CHILD_FDS, libc::c_uint::MAX, 0);
        // A session of its own: no controlling terminal of the server's.
        libc::setsid();
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        let mut go = 0u8;
        loop {
            match libc::read(CONTROL_FD, (&mut go as *mut u8).cast(), 1) {
                1 => break,
                -1 if *libc::__errno_location() == libc::EINTR => continue,
                // The parent gave up on this sandbox.
                _ => libc::_exit(1),
            }
        }
        // Raw system calls, not libc's wrappers: those signal every thread the parent had.
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
        {
            fail(b"burrow: sandbox start: cannot become root of the user namespace\n");
        }
        libc::execve(p.program.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
        fail(b"burrow: sandbox start: cannot execute the init program\n")
    }
}

/// Reports on stderr (the sandbox's log) and exits; for the child only.
unsafe fn fail(message: &[u8]) -> ! {
    // SAFETY: write and _exit are async-signal-safe; `message` is valid for its length.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(127)
    }
}

/// Clones a child into the new namespaces `flags` (a user namespace, for `idmap`) that closes
/// every descriptor and waits for its SIGKILL (see [`kill`]), so that the parent can give the
/// namespaces maps and open them.
pub(crate) fn clone_waiting(flags: libc::c_int) -> Result<Child, Error> {
    // SAFETY: as in `clone_init`; the child only closes descriptors and pauses, both
    // async-signal-safe, and never returns.
    unsafe {
        clone_plain(flags, || {
            libc::syscall(libc::SYS_close_range, 0, libc::c_uint::MAX, 0);
            loop {
                libc::pause();
            }
        })
    }
}

/// `clone3` into new namespaces `flags` with a pidfd; the child runs `child`, then exits.
///
/// # Safety
/// `child` runs in a copy of a multi-threaded process: it may only make async-signal-safe
/// system calls.
unsafe fn clone_plain(flags: libc::c_int, child: impl FnOnce()) -> Result<Child, Error> {
    let mut pidfd: RawFd = -1;
    // SAFETY: clone_args is plain data; all-zero is its documented "nothing requested" value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = (flags | libc::CLONE_PIDFD) as u64;
    args.pidfd = &mut pidfd as *mut RawFd as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    // SAFETY: clone3 without CLONE_VM or a stack behaves like fork; the child runs `child` (only
    // async-signal-safe calls, the caller's promise) and exits, never returning into the
    // parent's code. `args` and `pidfd` live across the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match ret {
        -1 => Err(Error::Clone(std::io::Error::last_os_error())),
        0 => {
            child();
            // SAFETY: _exit is async-signal-safe and ends only this child.
            unsafe { libc::_exit(127) }
        }
        pid => Ok(Child {
            pid: pid as i32,
            // SAFETY: CLONE_PIDFD stored a new descriptor, which nothing else owns.
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        }),
    }
}

/// The steps of the overlay probe, as the child reports the one that failed.
const PROBE_STEPS: [&str; 7] = [
    "become root of a new user namespace",
    "enter the probe directory",
    "mount a tmpfs for the overlay's upper layer",
    "create the overlay's directories",
    "attach the idmapped mount in the sandbox's mount namespace",
    "mount an overlay on the idmapped mount (overlayfs must accept idmapped lower layers)",
    "see the idmapped root owned by the sandbox's root",
];

/// Clones the child of `idmap::check_support`, in new user and mount namespaces: once it reads
/// a byte on `report` (the parent has written its id maps), it enters `dir` (the probe
/// directory, while it still is the host's root as far as permissions go: the data dir is
/// closed to others; a descriptor would not do, as it belongs to the host's mount namespace),
/// becomes root of its namespace, mounts a tmpfs on its `t`, attaches `tree` there as `lower` and mounts an overlay of it at
/// `merged`, as a sandbox's init does, and checks the overlay's root is owned by its root. It
/// writes the index of a failed step and its errno (5 bytes) on `report`, or [`PROBE_PASSED`].
pub(crate) fn clone_overlay_probe(
    dir: &Path,
    tree: BorrowedFd<'_>,
    report: BorrowedFd<'_>,
) -> Result<Child, Error> {
    let dir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::Clone(std::io::Error::other("probe path contains NUL")))?;
    let (tree, report) = (tree.as_raw_fd(), report.as_raw_fd());
    let options = c"lowerdir=t/lower,upperdir=t/upper,workdir=t/work,userxattr";
    // SAFETY: the child only makes raw system calls on the descriptors and static strings above,
    // and ends in _exit.
    unsafe {
        clone_plain(libc::CLONE_NEWUSER | libc::CLONE_NEWNS, move || {
            let fail = |step: u8| -> ! {
                let errno = (*libc::__errno_location()).to_ne_bytes();
                let message = [step, errno[0], errno[1], errno[2], errno[3]];
                libc::write(report, message.as_ptr().cast(), message.len());
                libc::_exit(1)
            };
            let mut go = 0u8;
            if libc::read(report, (&mut go as *mut u8).cast(), 1) != 1 {
                libc::_exit(1);
            }
            if libc::chdir(dir.as_ptr()) != 0 {
                fail(1);
            }
            if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
            {
                fail(0);
            }
            let tmpfs = c"tmpfs".as_ptr();
            if libc::mount(tmpfs, c"t".as_ptr(), tmpfs, 0, std::ptr::null()) != 0 {
                fail(2);
            }
            for path in [c"t/lower", c"t/upper", c"t/work", c"t/merged"] {
                if libc::mkdir(path.as_ptr(), 0o755) != 0 {
                    fail(3);
                }
            }
            let attached = libc::syscall(
                libc::SYS_move_mount,
                tree,
                c"".as_ptr(),
                libc::AT_FDCWD,
                c"t/lower".as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            );
            if attached != 0 {
                fail(4);
            }
            let overlay = c"overlay".as_ptr();
            let merged = c"t/merged".as_ptr();
            if libc::mount(overlay, merged, overlay, 0, options.as_ptr().cast()) != 0 {
                fail(5);
            }
            let mut stat: libc::stat = std::mem::zeroed();
            if libc::stat(merged, &mut stat) != 0 {
                fail(6);
            }
            if stat.st_uid != 0 {
                *libc::__errno_location() = libc::EOVERFLOW;
                fail(6);
            }
            libc::write(report, [PROBE_PASSED].as_ptr().cast(), 1);
            libc::_exit(0)
        })
    }
}

/// What the probe child writes when every step worked.
const PROBE_PASSED: u8 = u8::MAX;

/// The failed step and its error from a probe child's report; `None` for success.
pub(crate) fn parse_probe_report(report: &[u8]) -> Option<(&'static str, std::io::Error)> {
    if report == [PROBE_PASSED] {
        return None;
    }
    let Some((&step, errno)) = report.split_first() else {
        let died = std::io::Error::other("the probe process ended without a report");
        return Some(("probe", died));
    };
    let errno = i32::from_ne_bytes(errno.try_into().unwrap_or([0; 4]));
    let step = PROBE_STEPS
        .get(usize::from(step))
        .copied()
        .unwrap_or("probe");
    Some((step, std::io::Error::from_raw_os_error(errno)))
}
