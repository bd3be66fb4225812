#!/usr/bin/env bash
# Isolation checks of a burrow binary, from the outside: each check runs a command in a fresh
# sandbox with `burrow sandbox-run` and looks at what it saw and how it ended; the last checks
# look at the host for anything a sandbox left behind.
#
#   crates/runtime/tests/isolation.sh target/debug/burrow      (as root)
#
# Uses a data dir of its own under /tmp and removes it. Exits non-zero if any check fails.
set -uo pipefail

if [[ $# -ne 1 || ! -x "$1" ]]; then
    echo "usage: $0 path/to/burrow" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "$0: sandboxes need root; run as root" >&2
    exit 2
fi
BURROW=$(realpath "$1")
DATA=$(mktemp -d /tmp/burrow-isolation.XXXXXX)
CANARY=$(mktemp /tmp/burrow-canary.XXXXXX)
trap 'rm -rf "$DATA" "$CANARY"' EXIT
FAILURES=0

# sandbox-run's node cgroups (burrow/run*) that exist before this script, e.g. of a run that
# was killed elsewhere on this host: only what this script's own runs leave counts as a leak.
run_cgroups() {
    find /sys/fs/cgroup/*/burrow /sys/fs/cgroup/burrow -mindepth 1 -maxdepth 1 -name 'run*' 2>/dev/null | sort
}
RUN_CGROUPS_BEFORE=$(run_cgroups)

# sandbox [sandbox-run options] -- COMMAND...: runs it; sets OUT, ERR and CODE.
sandbox() {
    local out err
    out=$(mktemp) err=$(mktemp)
    timeout 120 "$BURROW" sandbox-run --data-dir "$DATA" "$@" >"$out" 2>"$err"
    CODE=$?
    OUT=$(cat "$out") ERR=$(cat "$err")
    rm -f "$out" "$err"
}

# expect NAME TEST...: one check; TEST is a command (usually `[[ ... ]]` through bash -c).
expect() {
    local name="$1"
    shift
    if "$@"; then
        printf 'ok    %s\n' "$name"
    else
        printf 'FAIL  %s\n      exit %s\n      stdout: %s\n      stderr: %s\n' \
            "$name" "$CODE" "${OUT//$'\n'/$'\n'              }" "${ERR//$'\n'/$'\n'              }"
        FAILURES=$((FAILURES + 1))
    fi
}

has() { [[ "$1" == *"$2"* ]]; }
lacks() { [[ "$1" != *"$2"* ]]; }

sandbox -- sh -c 'exit 3'
expect "the command's exit code comes back" [ "$CODE" -eq 3 ]

sandbox -- sh -c 'echo out; echo err >&2'
expect "stdout and stderr come back apart" bash -c '[[ "$0" == out && "$1" == err* ]]' "$OUT" "$ERR"

sandbox -- id
expect "commands run as user (uid 1000)" has "$OUT" "uid=1000(user) gid=1000(user)"

sandbox -- ps -eo pid=,user=,args=
expect "only the sandbox's own processes are visible" \
    bash -c '[[ $(wc -l <<<"$0") -eq 2 && "$0" == *"1 root"*"sandbox-init"* && "$0" == *"ps -eo"* ]]' "$OUT"

sandbox -- sh -c 'cat /etc/shadow; ls -A /root; ls -A /home; ls '"$DATA"'; ls '"$CANARY"'; cat /etc/passwd'
expect "no /etc/shadow" has "$ERR" "/etc/shadow: No such file"
expect "/root is closed to user" has "$ERR" "cannot open directory '/root': Permission denied"
expect "/home holds only user" bash -c '[[ "$0" == user* ]]' "$OUT"
expect "the data dir is invisible" has "$ERR" "$DATA': No such file"
expect "host files in /tmp are invisible" has "$ERR" "$CANARY': No such file"
expect "/etc/passwd is the sandbox's own" bash -c '[[ $(grep -c : <<<"$0") -eq 3 ]]' "$OUT"

sandbox --root -- sh -c 'ls -A /root; echo secret > /root/x && cat /root/x'
expect "root's home is empty and writable by the sandbox's root" [ "$OUT" = secret ]

sandbox -- sh -c "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"
expect "the only network interface is lo" [ "$OUT" = lo ]

sandbox -- bash -c 'echo > /dev/tcp/1.1.1.1/80'
expect "no route out" has "$ERR" "Network is unreachable"

sandbox -- sh -c 'hostname; python3 -m http.server 80 --bind 127.0.0.1 >/dev/null 2>&1 & sleep 1
    python3 -c "import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:80/\").status)"'
expect "hostname is sandbox, and user may serve on port 80" [ "$OUT" = "$(printf 'sandbox\n200')" ]

sandbox --root -- mount -t tmpfs x /mnt
expect "root cannot mount" bash -c '[[ $0 -ne 0 && "$1" == *"ermission denied"* ]]' "$CODE" "$ERR"

sandbox --root -- unshare -U -r true
expect "root cannot make new namespaces" bash -c '[[ $0 -ne 0 ]]' "$CODE"

sandbox --root -- sh -c 'grep -E "^Cap(Eff|Bnd)" /proc/self/status; echo 1 > /proc/sys/kernel/hostname
    cat /proc/keys /proc/timer_list /proc/kcore 2>/dev/null | wc -c'
expect "root keeps only the capabilities envd needs" \
    [ "$(head -2 <<<"$OUT")" = "$(printf 'CapEff:\t00000000000000fb\nCapBnd:\t00000000000000fb')" ]
expect "/proc/sys is read-only" has "$ERR" "Read-only file system"
expect "/proc/keys, /proc/timer_list, /proc/kcore are masked or absent" bash -c '[[ $(tail -1 <<<"$0") == 0 ]]' "$OUT"

sandbox -- sh -c 'grep -E "^(CapEff|NoNewPrivs|Seccomp):" /proc/self/status'
expect "user has no capabilities, no_new_privs and seccomp" \
    [ "$OUT" = "$(printf 'CapEff:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2')" ]

sandbox --memory 512M -- python3 -c 'b = bytearray(2 << 30); print("allocated")'
expect "2 GiB under a 512 MiB limit is killed (SIGKILL)" \
    bash -c '[[ $0 -eq 137 && "$1" != *allocated* ]]' "$CODE" "$OUT"

# The bomb forks as fast as it can; the shell busy-waits (a sleep could not fork) and counts.
sandbox --pids 64 -- bash -c 'bomb() { bomb | bomb & }; bomb 2>/dev/null
    SECONDS=0; while ((SECONDS < 3)); do true; done; p=(/proc/[0-9]*); echo ${#p[@]}'
expect "a fork bomb stops at the pids limit (64)" \
    bash -c '[[ "$0" =~ ^[0-9]+$ && "$0" -le 64 && "$0" -ge 32 ]]' "$OUT"

# The disk is on the host's disk, not in memory: a sandbox fills its 128 MiB under a 32 MiB
# memory limit, all of it and no more.
sandbox --memory 32M --disk 128M -- sh -c 'dd if=/dev/zero of=/home/user/fill bs=1M count=200 2>&1; stat -c %s /home/user/fill'
expect "the disk fills up at its limit (128 MiB), not in memory" \
    bash -c '[[ "$0" == *"No space left on device"* && $(tail -1 <<<"$0") -ge $((127 << 20)) && $(tail -1 <<<"$0") -le $((129 << 20)) ]]' "$OUT"

sandbox --root -- sh -c 'touch /usr/x; echo > /etc/ld.so.cache; echo changed > /etc/hostname; cat /etc/hostname'
expect "host binds are read-only, the generated rootfs is copy-on-write" \
    bash -c '[[ "$0" == changed && "$1" == *"Read-only file system"* ]]' "$OUT" "$ERR"

sandbox -- sh -c 'cat /etc/hostname'
expect "writes do not outlive their sandbox" [ "$OUT" = sandbox ]

sandbox -- python3 -c 'import socket, errno
for family in (socket.AF_VSOCK, socket.AF_PACKET, 38):
    try: socket.socket(family, socket.SOCK_DGRAM)
    except OSError as e: print(errno.errorcode[e.errno])
try: socket.socketpair(socket.AF_VSOCK)
except OSError as e: print(errno.errorcode[e.errno])
socket.socketpair(); socket.socket(socket.AF_INET6); socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
print("allowed")'
expect "vsock, packet and AF_ALG sockets are refused; unix, inet6, netlink are not" \
    [ "$OUT" = "$(printf 'EAFNOSUPPORT\nEAFNOSUPPORT\nEAFNOSUPPORT\nEAFNOSUPPORT\nallowed')" ]

sandbox -- ip -o addr show lo
expect "netlink reads still work (ip addr)" has "$OUT" "inet 127.0.0.1/8"

# x32 unshare(CLONE_NEWUSER): on kernels with x32 the number bypasses the denylist's rules.
sandbox --root -- python3 -c 'import ctypes; l = ctypes.CDLL(None, use_errno=True)
print(l.syscall(0x40000000 | 272, 0x10000000), ctypes.get_errno())'
expect "x32 system calls are refused (ENOSYS)" [ "$OUT" = "-1 38" ]

# Each sandbox user's inotify instances, pending signals and message-queue bytes are also
# charged to the host's root: one sandbox must not take root's whole budget.
INOTIFY_OUT=$(mktemp)
(sandbox -- python3 -c 'import ctypes, resource
l = ctypes.CDLL(None, use_errno=True); n = 0
while l.inotify_init1(0) >= 0: n += 1
print(n, open("/proc/sys/user/max_user_namespaces").read().strip(),
      *(resource.getrlimit(r)[1] for r in (resource.RLIMIT_SIGPENDING, resource.RLIMIT_NOFILE)))
import time; time.sleep(3)'
    printf '%s' "$OUT" >"$INOTIFY_OUT") &
sleep 1.5
HOST_INOTIFY=$(python3 -c 'import ctypes; print(ctypes.CDLL(None).inotify_init1(0))')
wait
OUT=$(cat "$INOTIFY_OUT") CODE=- ERR=
rm -f "$INOTIFY_OUT"
expect "inotify instances are capped per sandbox user, at 32" [ "$(cut -d' ' -f1-2 <<<"$OUT")" = "32 0" ]
expect "pending signals and open files are capped (1024, 8192)" [ "$(cut -d' ' -f3-4 <<<"$OUT")" = "1024 8192" ]
expect "the host's root can still use inotify meanwhile" [ "$HOST_INOTIFY" -ge 0 ]

# PID 1 is not dumpable: the sandbox's root cannot take its descriptors (pidfd_getfd).
sandbox --root -- python3 -c 'import ctypes, os; l = ctypes.CDLL(None, use_errno=True)
print(l.syscall(438, os.pidfd_open(1), 0, 0), ctypes.get_errno())'
expect "root cannot take PID 1's descriptors" [ "$OUT" = "-1 1" ]

# Nothing is left on the host.
CODE=-
OUT=$(comm -13 <(echo "$RUN_CGROUPS_BEFORE") <(run_cgroups) | grep -v '^$')
ERR=
expect "no cgroup is left" [ -z "$OUT" ]
OUT=$(ls -A "$DATA/run")
expect "no run directory is left" [ -z "$OUT" ]
OUT=$(grep -F "$DATA" /proc/self/mountinfo)
expect "no mount is left on the host" [ -z "$OUT" ]
OUT=$(ls -A "$DATA/layers" | grep -v '^templates$'; grep -lF "$DATA" /sys/block/loop*/loop/backing_file 2>/dev/null)
expect "no writable layer (image, loop device) is left" [ -z "$OUT" ]
OUT=$(grep -l '/burrow/run' /proc/[0-9]*/cgroup 2>/dev/null)
expect "no sandbox process is left" [ -z "$OUT" ]

if ((FAILURES)); then
    echo "isolation: $FAILURES check(s) failed"
    exit 1
fi
echo "isolation: all checks passed"
