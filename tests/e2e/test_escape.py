"""Escape attempts from inside a sandbox, each of which must fail: host files through symlinks,
`..` and `/proc/*/root`; envd's file RPCs and /file pointed at host paths; mounts and new
namespaces; raising capabilities and setuid; ptrace of envd; the host's and another sandbox's
ports; filling the disk; a fork bomb; a memory bomb; a process printing gigabytes while the
server's and envd's memory are watched.

tests/sdk/test_isolation.py already covers (through the SDK): process and /etc/shadow visibility,
the loopback-only network and the server port, uid/CapEff/NoNewPrivs, a tmpfs mount, a 2 GiB
allocation and a bounded fork tree. What is here goes further and is spoken over the raw envd
JSON-RPC websocket (tests/burrow_harness.py).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import socket
import threading
import time
from pathlib import Path

import pytest

from burrow_harness import (
    ENVD_PORT,
    REPO,
    RpcError,
    host_cgroup_dirs,
    http_request,
    sandbox_host,
    vm_rss_kib,
    wait_until,
    ws_upgrade,
)

DISK_MIB = 64
BURROW_SERVER = {"ttl": "60s", "pool_size": 1, "extra_args": ["--disk", f"{DISK_MIB}MiB"]}


def run(envd, cmd: str, timeout: float = 30) -> tuple:
    out, err, code = envd.run(cmd, timeout=timeout)
    return "\n".join(out), "\n".join(err), code


@pytest.fixture
def session(server, team_key):
    """A fresh Bash session and an open envd client for it; deleted afterwards."""
    doc = server.create_session(team_key)
    with server.envd(doc) as envd:
        yield doc, envd
    server.delete(doc["sessionID"], team_key)


@pytest.fixture
def host_secret(server, tmp_path_factory):
    """A token in a file in a host directory, and the same in the server's data dir: what no
    path from inside a sandbox may reach."""
    token = "burrow-secret-" + secrets.token_hex(12)
    host_dir = Path(tmp_path_factory.mktemp("escape-target"))
    os.chmod(host_dir, 0o755)
    (host_dir / "secret").write_text(token)
    (host_dir / "secret").chmod(0o644)
    (server.data_dir / "escape-secret").write_text(token)
    yield token, host_dir
    (server.data_dir / "escape-secret").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Host files
# ---------------------------------------------------------------------------------------------


def test_host_files_are_out_of_reach_through_symlinks_dotdot_and_proc_root(session, server, host_secret):
    doc, envd = session
    token, host_dir = host_secret
    targets = [str(host_dir / "secret"), str(server.data_dir / "escape-secret")]
    script = "for t in " + " ".join(shlex.quote(t) for t in targets) + """; do
  d=$(dirname "$t")
  for p in "$t" "/../../..$t" "/proc/1/root$t" "/proc/self/root$t" "/proc/1/cwd/../..$t" \\
           "/proc/self/cwd/../../../..$t" /proc/[0-9]*/root"$t"; do
    cat "$p" 2>/dev/null
  done
  ln -sf "$t" /tmp/file-link; cat /tmp/file-link 2>/dev/null
  ln -sfn "$d" /tmp/dir-link; cat /tmp/dir-link/* 2>/dev/null; ls -a /tmp/dir-link/ 2>/dev/null
  ln -sfn "/proc/1/root$d" /tmp/proc-link; cat /tmp/proc-link/* 2>/dev/null
  cd /tmp && ln -sfn "../../../../../..$d" rel-link && cat rel-link/* 2>/dev/null
done
echo probed"""
    out, err, code = run(envd, script)
    assert out.endswith("probed"), (out, err, code)
    assert token not in out + err, f"a host file was read from inside the sandbox:\n{out}"
    # /proc/*/root of every process the sandbox can see is the sandbox's own root.
    out, _, _ = run(envd, "ls -A / | sort | tr '\\n' ' '; echo; "
                          "for p in /proc/[0-9]*; do ls -A $p/root/ 2>/dev/null | sort | tr '\\n' ' '; echo; done")
    lines = out.splitlines()
    own = lines[0]
    visible = [ln for ln in lines[1:] if ln.strip()]
    assert visible, "no /proc/<pid>/root was listable (not even the shell's own)"
    assert all(ln == own for ln in visible), f"a /proc/<pid>/root that is not the sandbox's root:\n{out}"


def test_mountinfo_does_not_reveal_host_paths(session, server):
    _, envd = session
    out, _, _ = run(envd, "cat /proc/self/mountinfo /proc/1/mountinfo 2>/dev/null")
    assert " / / " in out, out
    for host_path in (str(server.data_dir), str(REPO), str(server.data_dir.parent), "/root/"):
        assert host_path not in out, f"mountinfo names the host path {host_path}:\n{out}"


def test_file_rpcs_act_inside_the_sandbox_never_on_the_host(session, server, team_key, host_secret):
    doc, envd = session
    token, host_dir = host_secret
    secret = str(host_dir / "secret")
    for path in (secret, f"/proc/1/root{secret}", f"/proc/self/root{secret}", f"/../../..{secret}",
                 f"/proc/1/cwd/../..{secret}", f"/proc/1/root{server.data_dir}/escape-secret"):
        for method in ("filesystem_read", "filesystem_readBase64"):
            try:
                got = envd.call(method, [path])
            except RpcError:
                continue
            assert token not in str(got), f"{method}({path!r}) read a host file"
    # A symlink the user made to a host path does not lead out either.
    run(envd, f"ln -sfn {shlex.quote(str(host_dir))} /home/user/to-host; "
              f"ln -sfn {shlex.quote(secret)} /home/user/to-secret")
    for path in ("/home/user/to-secret", "/home/user/to-host/secret"):
        with pytest.raises(RpcError):
            envd.call("filesystem_read", [path])
    # /proc/1/root is the sandbox's own root, as envd sees it.
    assert envd.call("filesystem_list", ["/proc/1/root/"]) == envd.call("filesystem_list", ["/"])
    # Writes through the same paths land inside the sandbox, or nowhere.
    for path in (f"/proc/1/root{host_dir}/written-by-rpc", f"/../..{host_dir}/written-by-rpc"):
        try:
            envd.call("filesystem_write", [path, token])
        except RpcError:
            pass
        try:
            envd.call("filesystem_makeDir", [path + "-dir"])
        except RpcError:
            pass
    assert sorted(os.listdir(host_dir)) == ["secret"], os.listdir(host_dir)
    # /file: download and upload through the gateway, with the same paths.
    host = sandbox_host(ENVD_PORT, doc["sessionID"], doc["clientID"])
    r = http_request(server.port, "GET", f"/file?path=/proc/1/root{secret}", host=host)
    assert r.status == 404 and token.encode() not in r.body, r
    boundary = "escapeboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n"
            f"/proc/1/root{host_dir}/uploaded\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
            f"{token}\r\n--{boundary}--\r\n").encode()
    r = http_request(server.port, "POST", "/file", raw=body, host=host,
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status in (200, 500), r
    assert sorted(os.listdir(host_dir)) == ["secret"], os.listdir(host_dir)


def test_envd_holds_no_directory_of_the_host_open(session):
    """The server hands the sandbox its rootfs, stage and run directories as descriptors; none
    may survive into envd, or `/proc/1/fd/N/..` would lead out (envd's file RPCs run as root of
    the sandbox, so they can open its own descriptors)."""
    _, envd = session
    fds = [e["name"] for e in envd.call("filesystem_list", ["/proc/1/fd"])]
    assert fds, "envd has no descriptors?"
    for fd in fds:
        try:
            entries = envd.call("filesystem_list", [f"/proc/1/fd/{fd}"])
        except RpcError:
            continue  # not a directory (sockets, pipes, /dev/null, inotify, epoll)
        names = {e["name"] for e in entries}
        assert not names & {"burrow.db", "envd.sock", "stage", "run", "environments"}, \
            f"envd's fd {fd} is a host directory: {sorted(names)}"


# ---------------------------------------------------------------------------------------------
# Privileges
# ---------------------------------------------------------------------------------------------


def test_mounts_and_new_namespaces_are_refused(session):
    _, envd = session
    attempts = {
        "unshare-mount": "unshare -m true",
        "unshare-user": "unshare -U true",
        "unshare-root": "unshare -r id",
        "unshare-net": "unshare -n true",
        "unshare-pid": "unshare -p -f true",
        "unshare-ipc": "unshare -i true",
        "unshare-uts": "unshare -u true",
        "unshare-cgroup": "unshare -C true",
        "mount-tmpfs": "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m",
        "mount-proc": "mkdir -p /tmp/m && mount -t proc proc /tmp/m",
        "mount-bind": "mkdir -p /tmp/m && mount --bind / /tmp/m",
        "remount-usr-rw": "mount -o remount,rw /usr",
        "write-usr": "touch /usr/escape-probe",
        "chroot": "chroot /tmp true",
        "nsenter-host": "nsenter -t 1 -m -u -i -n -p true",
        "py-unshare-user": "python3 -c 'import ctypes,sys; sys.exit(ctypes.CDLL(None).unshare(0x10000000) != 0)'",
        "py-unshare-mount": "python3 -c 'import ctypes,sys; sys.exit(ctypes.CDLL(None).unshare(0x00020000) != 0)'",
    }
    before, _, _ = run(envd, "cat /proc/self/mountinfo")
    script = "\n".join(f"( {cmd} ) >/dev/null 2>&1; echo {name}=$?" for name, cmd in attempts.items())
    out, err, _ = run(envd, script)
    results = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert set(results) == set(attempts), (out, err)
    succeeded = [name for name, rc in results.items() if rc == "0"]
    assert not succeeded, f"allowed inside the sandbox: {succeeded}"
    after, _, _ = run(envd, "cat /proc/self/mountinfo")
    assert after == before, "the mount table changed"


# Capabilities no sandbox process may ever hold, even as the sandbox's root (bounding set).
FORBIDDEN_CAPS = {"dac_read_search": 2, "setpcap": 8, "net_admin": 12, "net_raw": 13, "sys_module": 16,
                  "sys_rawio": 17, "sys_chroot": 18, "sys_ptrace": 19, "sys_admin": 21, "sys_boot": 22,
                  "mknod": 27, "setfcap": 31, "mac_admin": 33, "syslog": 34, "perfmon": 38, "bpf": 39}


def test_capabilities_cannot_be_raised(session):
    _, envd = session
    out, _, _ = run(envd, "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status /proc/1/status")
    caps = {}
    for line in out.splitlines():
        path, field, value = re.match(r"(\S+?):(\w+):\s*(\w+)", line).groups()
        caps[(path, field)] = int(value, 16)
    for path in ("/proc/self/status", "/proc/1/status"):
        bounding = caps[(path, "CapBnd")]
        held = [name for name, bit in FORBIDDEN_CAPS.items() if bounding >> bit & 1]
        assert not held, f"{path}: bounding set keeps {held}"
    for field in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert caps[("/proc/self/status", field)] == 0, f"the user's {field} is not empty: {out}"

    attempts = {
        "setpriv-root": "setpriv --reuid=0 --regid=0 --clear-groups true",
        "setpriv-ambient": "setpriv --inh-caps=+sys_admin --ambient-caps=+sys_admin true",
        "capsh": "capsh --caps=cap_sys_admin+eip --",
        "py-setuid": "python3 -c 'import os; os.setuid(0)'",
        "py-setgid": "python3 -c 'import os; os.setgid(0)'",
        "su": "su root -c true </dev/null",
    }
    script = "\n".join(f"( {cmd} ) >/dev/null 2>&1; echo {name}=$?" for name, cmd in attempts.items())
    out, err, _ = run(envd, script)
    results = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert set(results) == set(attempts), (out, err)
    assert not [n for n, rc in results.items() if rc == "0"], f"privilege raised: {results}"
    # A setuid binary runs, but as the user: no_new_privs ignores the bit. su (setuid) is run on a
    # terminal; once it has said something (a prompt, or an error) its ids are read, from the live
    # process or, unreaped, its zombie: they are the ids it ran with.
    probe = r"""
import os, pty, signal
pid, fd = pty.fork()
if pid == 0:
    os.execv("/usr/bin/su", ["su", "root", "-c", "true"])
os.read(fd, 100)
status = open(f"/proc/{pid}/status").read()
os.kill(pid, signal.SIGKILL)
print(os.stat("/usr/bin/su").st_mode & 0o4000 != 0)
print(*[line.split()[1:] for line in status.splitlines() if line.startswith(("Uid:", "Gid:"))])
"""
    out, err, _ = run(envd, f"python3 -c {shlex.quote(probe)}")
    ids = str(["1000"] * 4)
    assert out.splitlines() == ["True", f"{ids} {ids}"], f"su (setuid) ran with other ids: {out} {err}"


def test_envd_cannot_be_traced_signalled_or_read(session):
    _, envd = session
    script = r"""
import ctypes, errno, os, signal
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, f):
    ctypes.set_errno(0)
    try:
        r = f()
        print(name, "OK" if r in (0, None) or (isinstance(r, int) and r > 0) else errno.errorcode.get(ctypes.get_errno(), r))
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
attempt("ptrace-attach", lambda: libc.ptrace(16, 1, 0, 0))
attempt("ptrace-seize", lambda: libc.ptrace(0x4206, 1, 0, 0))
for path in ("/proc/1/mem", "/proc/1/environ", "/proc/1/maps", "/proc/1/stack", "/proc/1/fd/0"):
    attempt("read " + path, lambda: len(open(path, "rb").read(1)))
attempt("list /proc/1/fd", lambda: len(os.listdir("/proc/1/fd")) >= 0 and 0)
attempt("readlink /proc/1/root", lambda: os.readlink("/proc/1/root") and 0)
attempt("kill-TERM", lambda: os.kill(1, signal.SIGTERM))
attempt("kill-KILL", lambda: os.kill(1, signal.SIGKILL))
"""
    out, err, code = run(envd, f"python3 -c {shlex.quote(script)}")
    results = dict(line.rsplit(" ", 1) for line in out.splitlines())
    assert len(results) == 11, (out, err, code)
    allowed = {k: v for k, v in results.items() if v == "OK"}
    assert not allowed, f"the user reached envd: {allowed}"
    out, _, _ = run(envd, "timeout 5 strace -p 1 -o /dev/null 2>/dev/null; echo strace=$?; "
                          "timeout 20 gdb -p 1 -batch -ex 'info registers rip' 2>&1 | grep -c '^rip' || true",
                    timeout=40)
    assert out.splitlines() == ["strace=1", "0"], f"a debugger attached to envd:\n{out}"
    # envd is still there and answering.
    assert run(envd, "echo alive")[0] == "alive"


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


def host_listening_ports() -> set:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


CONNECT_ALL = r"""
import socket, sys, json
reached = []
for port in json.loads(sys.argv[1]):
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect((addr, port))
            reached.append([addr, port])
        except OSError:
            pass
        finally:
            s.close()
print(json.dumps(reached))
"""


def test_host_ports_are_unreachable(session, server):
    _, envd = session
    ports = sorted(host_listening_ports())[:200]
    assert server.port in ports, f"the test cannot see the server's own listener in {ports}"
    out, err, code = run(envd, f"python3 -c {shlex.quote(CONNECT_ALL)} {shlex.quote(json.dumps(ports))}",
                         timeout=240)
    assert code == 0, (out, err)
    assert json.loads(out) == [], f"host ports reachable from the sandbox: {out}"


def test_another_sandboxs_ports_and_sockets_are_unreachable(server, team_key):
    a, b = server.create_session(team_key), server.create_session(team_key)
    port = 8765
    abstract = "burrow-escape-" + secrets.token_hex(4)
    listen_abstract = (f"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind('\\0{abstract}'); "
                       "s.listen(); time.sleep(120)")
    try:
        with server.envd(a) as ea, server.envd(b) as eb:
            run(ea, f"nohup python3 -m http.server {port} --bind 0.0.0.0 >/dev/null 2>&1 & "
                    f"nohup python3 -c {shlex.quote(listen_abstract)} >/dev/null 2>&1 &")
            # A's server really listens: reachable through the gateway, and from inside A.
            host_a = sandbox_host(port, a["sessionID"], a["clientID"])
            wait_until(lambda: http_request(server.port, "GET", "/", host=host_a).status == 200, 15,
                       what="A's http.server to answer through the gateway")
            probe = ("import socket,sys\n"
                     "def tcp():\n"
                     "    s=socket.socket(); s.settimeout(2)\n"
                     f"    try: s.connect(('127.0.0.1',{port})); return 'open'\n"
                     "    except OSError as e: return 'closed'\n"
                     "def unix():\n"
                     "    s=socket.socket(socket.AF_UNIX)\n"
                     f"    try: s.connect('\\0{abstract}'); return 'open'\n"
                     "    except OSError as e: return 'closed'\n"
                     "print(tcp(), unix())")
            wait_until(lambda: run(ea, f"python3 -c {shlex.quote(probe)}")[0] == "open open", 15,
                       what="A to reach its own port and abstract socket")
            assert run(eb, f"python3 -c {shlex.quote(probe)}")[0] == "closed closed", \
                "sandbox B reached sandbox A's port or abstract socket"
    finally:
        server.delete(a["sessionID"], team_key)
        server.delete(b["sessionID"], team_key)


# ---------------------------------------------------------------------------------------------
# Resources: disk, processes, memory, output
# ---------------------------------------------------------------------------------------------


def assert_answers_quickly(server, envd, what: str, limit: float = 5.0) -> None:
    t0 = time.monotonic()
    assert http_request(server.port, "GET", "/health", timeout=limit).status == 200
    assert run(envd, "echo ok", timeout=limit * 3)[0] == "ok"
    took = time.monotonic() - t0
    assert took < limit, f"another session took {took:.1f} s to answer during {what}"


def test_filling_the_disk_stops_at_the_limit(server, team_key):
    a, b = server.create_session(team_key), server.create_session(team_key)
    try:
        with server.envd(a) as ea, server.envd(b) as eb:
            out, err, _ = run(ea, f"head -c {4 * DISK_MIB}M /dev/zero > /home/user/fill; echo rc=$?; "
                                  "du -k /home/user/fill | cut -f1", timeout=60)
            rc, size = out.splitlines()
            assert rc != "rc=0", f"wrote {4 * DISK_MIB} MiB into a {DISK_MIB} MiB sandbox"
            assert "No space left on device" in err, err
            # The layer holds the whole limit plus 256 KiB for what a start itself writes.
            assert int(size) <= (DISK_MIB << 10) + 256, f"{size} KiB written past the {DISK_MIB} MiB limit"
            # The same through envd's own writers: a clear error, not a crash.
            with pytest.raises(RpcError) as e:
                ea.call("filesystem_write", ["/home/user/more", "x" * (1 << 20)])
            assert "no space left on device" in e.value.error["message"], e.value.error
            # An upload past the limit: refused with the reason, its staging file removed.
            boundary = "fillboundary"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"up.bin\"\r\n\r\n"
                    ).encode() + b"u" * (2 * DISK_MIB << 20) + f"\r\n--{boundary}--\r\n".encode()
            r = http_request(server.port, "POST", "/file", raw=body, timeout=60,
                             host=sandbox_host(ENVD_PORT, a["sessionID"], a["clientID"]),
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            assert r.status == 500 and b"no space left on device" in r.body, r
            assert run(ea, "ls -A /home/user | grep -c burrow-upload || true")[0] == "0"
            assert_answers_quickly(server, eb, "a full disk in another sandbox")
            assert run(eb, "echo data > /home/user/x && cat /home/user/x")[0] == "data"
            # The full sandbox itself recovers once it frees space.
            assert run(ea, "rm /home/user/fill && echo data > /home/user/x && cat /home/user/x")[0] == "data"
    finally:
        server.delete(a["sessionID"], team_key)
        server.delete(b["sessionID"], team_key)


def pids_current(envd_pid: int) -> int:
    for d in host_cgroup_dirs(envd_pid):
        f = d / "pids.current"
        if f.exists():
            return int(f.read_text())
    raise AssertionError(f"no pids cgroup for host pid {envd_pid}")


def test_fork_bomb_is_capped_by_the_pids_limit(server, team_key):
    bomb, other = server.create_session(team_key), server.create_session(team_key)
    envd_pid = server.envd_pid(bomb)
    try:
        with server.envd(bomb) as eb, server.envd(other) as eo:
            # The classic, unbounded: only the sandbox's pids limit (256) stops it.
            eb.call("process_start", ["bomb", "timeout -s KILL 20 bash -c ':(){ :|:& };:'", {}, ""])
            peak = 0
            end = time.monotonic() + 6
            while time.monotonic() < end:
                peak = max(peak, pids_current(envd_pid))
                assert_answers_quickly(server, eo, "a fork bomb")
                time.sleep(0.2)
            print(f"fork bomb: peak {peak} tasks in the sandbox's pids cgroup")
            assert peak >= 100, f"the bomb never got going (peak {peak} tasks)"
            assert peak <= 256, f"{peak} tasks in a sandbox limited to 256"
    finally:
        assert server.delete(bomb["sessionID"], team_key).status == 204
        server.delete(other["sessionID"], team_key)
    wait_until(lambda: not Path(f"/proc/{envd_pid}").exists(), 10, what="the bombed sandbox to be gone")


def test_memory_bomb_in_many_processes_is_contained(server, team_key):
    bomb, other = server.create_session(team_key, "Python3"), server.create_session(team_key)
    server_rss0 = vm_rss_kib(server.proc.pid)
    grow = "python3 -c 'a=[]\nwhile True: a.append(bytearray(32 << 20)); a[-1][::4096] = b\"x\" * (32 << 8)'"
    try:
        with server.envd(bomb) as eb, server.envd(other) as eo:
            for i in range(6):
                eb.call("process_start", [f"hog{i}", f"timeout -s KILL 20 {grow}", {}, ""])
            end = time.monotonic() + 8
            while time.monotonic() < end:
                assert_answers_quickly(server, eo, "a memory bomb")
                time.sleep(0.3)
            # The OOM killer took the hogs, not envd: the bombed session still works.
            # `[b]`: the pattern must not match the command line of the shell running pgrep.
            wait_until(lambda: run(eb, "pgrep -c -f '[b]ytearray' || true", timeout=20)[0] == "0", 30,
                       what="every memory hog to be killed")
            assert run(eb, "echo survived", timeout=20)[0] == "survived"
    finally:
        server.delete(bomb["sessionID"], team_key)
        server.delete(other["sessionID"], team_key)
    growth = vm_rss_kib(server.proc.pid) - server_rss0
    print(f"memory bomb: server RSS {server_rss0} KiB, then {server_rss0 + growth} KiB")
    assert growth < 32 * 1024, f"the server grew by {growth} KiB during a sandbox's memory bomb"


class Flood:
    """Subscribes to a process's stdout on a raw websocket and then either reads everything as
    fast as it can (counting bytes, not parsing) or reads nothing at all."""

    def __init__(self, server, doc, pid: str, read: bool):
        self.envd = server.envd(doc, timeout=30)
        self.envd.call("process_subscribe", ["onStdout", pid])
        self.envd.call("process_subscribe", ["onExit", pid])
        self.received = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True) if read else None

    def start(self):
        if self.thread:
            self.thread.start()

    def _drain(self):
        self.envd.sock.settimeout(1)
        while not self.stop.is_set():
            try:
                data = self.envd.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            self.received += len(data)

    def close(self):
        self.stop.set()
        if self.thread:
            self.thread.join(5)
        self.envd.sock.close()


def test_gigabytes_of_output_keep_server_and_envd_memory_bounded(server, team_key):
    chatty, other = server.create_session(team_key), server.create_session(team_key)
    envd_pid = server.envd_pid(chatty)
    server_pid = server.proc.pid
    samples = {"server": [vm_rss_kib(server_pid)], "envd": [vm_rss_kib(envd_pid)]}
    received = {}
    try:
        with server.envd(other) as eo:
            for name, read, cmd in (
                # Huge lines (no newline: split at 1 MiB), read as fast as the client can.
                ("fast-reader", True, "timeout -s KILL 8 sh -c 'cat /dev/zero | base64 -w 0'"),
                # Tiny lines, one notification each, to a client that reads nothing.
                ("stalled-reader", False, "timeout -s KILL 8 yes"),
            ):
                flood = Flood(server, chatty, name, read)
                try:
                    flood.envd.call("process_start", [name, cmd, {}, ""])
                    flood.start()
                    end = time.monotonic() + 8
                    while time.monotonic() < end:
                        samples["server"].append(vm_rss_kib(server_pid))
                        samples["envd"].append(vm_rss_kib(envd_pid))
                        assert_answers_quickly(server, eo, f"an output flood ({name})")
                        time.sleep(0.25)
                    received[name] = flood.received
                finally:
                    flood.close()
    finally:
        server.delete(chatty["sessionID"], team_key)
        server.delete(other["sessionID"], team_key)
    peak = {k: max(v) for k, v in samples.items()}
    base = {k: v[0] for k, v in samples.items()}
    print(f"output flood: received {received} bytes; RSS KiB base {base} peak {peak}")
    assert received["fast-reader"] > 64 << 20, f"the fast reader got only {received['fast-reader']} bytes"
    assert peak["server"] - base["server"] < 64 * 1024, f"server RSS grew {peak['server'] - base['server']} KiB"
    assert peak["envd"] < 128 * 1024, f"envd RSS reached {peak['envd']} KiB"


# ---------------------------------------------------------------------------------------------
# Per-user kernel budgets
# ---------------------------------------------------------------------------------------------

NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4), linux/nsfs.h


def _userns_owner(pid: int) -> int:
    import fcntl
    import struct

    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    try:
        return struct.unpack("I", fcntl.ioctl(fd, NS_GET_OWNER_UID, b"\0" * 4))[0]
    finally:
        os.close(fd)


def test_each_sandbox_has_its_own_user_namespace_owner(server, team_key):
    """The kernel charges per-user counts made in a user namespace (inotify instances and
    watches, pending signals, message queue bytes) to the namespace's owner as well: owned by
    root, every sandbox would share those budgets with host root and with every other sandbox,
    and one could exhaust them for all. Each sandbox's namespace is owned by a host uid of its
    own, outside the sandboxes' mapped ids and not root."""
    a, b = server.create_session(team_key), server.create_session(team_key)
    owners = [_userns_owner(server.envd_pid(s)) for s in (a, b)]
    for owner in owners:
        assert owner != 0, "a sandbox's user namespace is owned by host root"
        # Mapped ids are 100000..165535 (the default uid base); owners come after them.
        assert 165536 <= owner < 231072, owners
    assert owners[0] != owners[1], owners
    # Inside, root is still the sandbox's root, and inotify works.
    with server.envd(a) as envd:
        out, err, code = run(envd, "python3 -c 'import ctypes; l = ctypes.CDLL(None);"
                                   " print(l.inotify_init1(0) >= 0)'; id -u")
        assert (out, code) == ("True\n1000", 0), (out, err)
    for s in (a, b):
        server.delete(s["sessionID"], team_key)
