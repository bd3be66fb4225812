//! The sandbox's seccomp filter: a denylist of system calls that reach kernel surface a sandbox
//! has no business touching (modules, kexec, bpf, keyrings, mounts, namespaces, clocks, ...).
//! Denied calls fail with EPERM, except `clone3`, which fails with ENOSYS so that libc falls
//! back to `clone`, whose namespace flags the filter can see and refuse. Sockets are limited to
//! the families a network namespace isolates (see [`SOCKET_FAMILIES`]), and on x86_64 the x32
//! ABI is refused as a whole.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, sock_filter,
};

use crate::error::Error;

/// Refused outright, on every architecture.
const DENIED: &[libc::c_long] = &[
    // Kernel modules and replacing the kernel.
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    // Kernel programming and introspection.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_lookup_dcookie,
    libc::SYS_syslog,
    libc::SYS_kcmp,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // Keyrings are not namespaced.
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    // The mount tree and namespaces were set up before the filter; they stay as they are.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_setns,
    libc::SYS_unshare,
    // Host-wide state: swap, accounting, quotas, clocks, file handles, the terminal.
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_fanotify_init,
    libc::SYS_vhangup,
    libc::SYS_nfsservctl,
];

/// Refused outright, x86_64 only (legacy calls other architectures never had).
#[cfg(target_arch = "x86_64")]
const DENIED_ARCH: &[libc::c_long] = &[
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_uselib,
    libc::SYS__sysctl,
    libc::SYS_ustat,
    libc::SYS_sysfs,
];
#[cfg(not(target_arch = "x86_64"))]
const DENIED_ARCH: &[libc::c_long] = &[];

/// `clone` flags that would create namespaces (CLONE_NEWTIME is left out: for `clone` its bit
/// is part of the exit signal).
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// Terminal ioctls that inject input into, or drive the console of, a terminal.
/// (`libc::Ioctl` is `c_ulong` on glibc and `c_int` on musl, hence the casts.)
const DENIED_IOCTLS: [u64; 2] = [libc::TIOCSTI as _, libc::TIOCLINUX as _];

/// The only socket families `socket` and `socketpair` accept: the ones a network namespace
/// keeps apart. Others are host-wide (vsock, whose ports collide with the host's and which
/// reaches the hypervisor) or kernel surface no sandbox needs (AF_ALG, AF_KEY, ...); they fail
/// with EAFNOSUPPORT, as on a kernel built without them, so that programs fall back.
const SOCKET_FAMILIES: [libc::c_int; 4] = [
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// The x32 ABI's bit in a system call number. x32 calls pass seccompiler's architecture check
/// (their `arch` is AUDIT_ARCH_X86_64) but their numbers match none of its rules, so every call
/// the denylist refuses would be open through its x32 number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// A filter seccompiler cannot express (it compares numbers for equality only): every system
/// call number from [`X32_SYSCALL_BIT`] up fails with ENOSYS, as on a kernel without x32.
#[cfg(target_arch = "x86_64")]
fn x32_filter() -> BpfProgram {
    const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // seccomp_data.nr, at offset 0.
        op(BPF_LD_W_ABS, 0, 0, 0),
        op(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(
            BPF_RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        op(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// The compiled filters, in installation order.
pub(crate) fn filters() -> Result<Vec<BpfProgram>, Error> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))?;
    let condition = |arg, op, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| Error::Seccomp(e.to_string()))
    };

    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .chain(DENIED_ARCH)
        .map(|nr| (*nr, Vec::new()))
        .collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| condition(0, SeccompCmpOp::MaskedEq(*flag as u64), *flag as u64))
        .collect::<Result<_, _>>()?;
    denied.insert(libc::SYS_clone, clone_rules);
    let ioctl_rules = DENIED_IOCTLS
        .iter()
        .map(|request| condition(1, SeccompCmpOp::Eq, *request))
        .collect::<Result<_, _>>()?;
    denied.insert(libc::SYS_ioctl, ioctl_rules);

    let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);

    // One rule whose conditions all hold (they are ANDed) for any family outside the list.
    let other_family = SOCKET_FAMILIES
        .iter()
        .map(|family| {
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *family as u64)
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(SeccompRule::new)
        .map_err(|e| Error::Seccomp(e.to_string()))?;
    let sockets = BTreeMap::from([
        (libc::SYS_socket, vec![other_family.clone()]),
        (libc::SYS_socketpair, vec![other_family]),
    ]);

    #[cfg(target_arch = "x86_64")]
    let first = vec![x32_filter()];
    #[cfg(not(target_arch = "x86_64"))]
    let first = Vec::new();
    let compiled = [
        (denied, libc::EPERM),
        (clone3, libc::ENOSYS),
        (sockets, libc::EAFNOSUPPORT),
    ]
    .into_iter()
    .map(|(rules, errno)| {
        SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|e| Error::Seccomp(e.to_string()))
    });
    first.into_iter().map(Ok).chain(compiled).collect()
}

/// Installs the filters on the calling thread; threads and processes it starts inherit them.
/// Needs `no_new_privs` (or CAP_SYS_ADMIN).
pub(crate) fn install() -> Result<(), Error> {
    for filter in filters()? {
        seccompiler::apply_filter(&filter).map_err(|e| Error::Seccomp(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let filters = filters().unwrap();
        assert_eq!(
            filters.len(),
            if cfg!(target_arch = "x86_64") { 4 } else { 3 }
        );
        assert!(filters.iter().all(|f| !f.is_empty()));
    }

    #[test]
    fn denylist_has_no_duplicates_and_spares_what_envd_needs() {
        let mut all: Vec<_> = DENIED.iter().chain(DENIED_ARCH).collect();
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count);
        for needed in [
            libc::SYS_setuid,
            libc::SYS_setgid,
            libc::SYS_kill,
            libc::SYS_ptrace,
        ] {
            assert!(!all.contains(&&needed));
        }
    }
}
