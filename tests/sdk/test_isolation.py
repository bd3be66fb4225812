"""Isolation, checked through the SDK from inside sandboxes and from the host: processes, files,
network, privileges, resource limits, and sandboxes against each other."""

from __future__ import annotations

import os
import re
import secrets
import socket
import struct
import subprocess
import time

import pytest

from burrow_harness import (
    REPO,
    host_cmdline,
    host_pids,
    host_processes_matching,
    namespace_init,
    proc_status,
    unique_marker,
    wait_until,
)

BURROW_SERVER = {"ttl": "15s"}

# Every process /proc shows, one per line: "<pid> <command line>", then "self <pid of this shell>".
# Shell builtins only, so the listing starts no process of its own that could end before the host
# looks at the sandbox's processes.
PS = (r"""for p in /proc/[0-9]*; do a=(); while IFS= read -r -d '' x; do a+=("$x"); done """
      r"""< "$p/cmdline"; echo "${p#/proc/} ${a[*]}"; done 2>/dev/null; echo "self $$" """)


def _listing(out: str) -> tuple:
    """({pid: command line}, pid of the listing shell) from the output of PS."""
    procs = {}
    me = None
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        if pid == "self":
            me = int(cmd)
        elif pid.isdigit():
            procs[int(pid)] = cmd
    assert me is not None and procs, f"not a process listing:\n{out}"
    return procs, me


def _pid_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def _namespace_pids(ns: str) -> set:
    """The pids, as that namespace numbers them, of every host process in the PID namespace `ns`."""
    out = set()
    for pid in host_pids():
        try:
            if _pid_namespace(pid) != ns:
                continue
        except OSError:
            continue
        nspid = proc_status(pid).get("NSpid", "").split()
        if nspid:
            out.add(int(nspid[-1]))
    return out


def _assert_only_own_processes(out: str, own: set, server_pid: int, host_sleeper: str) -> None:
    """The listing `out` (PS, run in a sandbox) holds only the sandbox's own processes: `own` (its
    PID namespace's pids, as the host sees them) and the listing shell; PID 1 is envd; neither the
    server nor another host process shows."""
    procs, me = _listing(out)
    strangers = {pid: cmd for pid, cmd in procs.items() if pid != me and pid not in own}
    assert not strangers, f"processes outside the sandbox's PID namespace are visible: {strangers}"
    assert "sandbox-init" in procs.get(1, ""), f"PID 1 is not envd (burrow sandbox-init): {procs.get(1)!r}"
    server_cmd = host_cmdline(server_pid)
    assert server_cmd, f"the server (host pid {server_pid}) is not running"
    assert not [c for c in procs.values() if c == server_cmd], f"the server's command line is visible: {server_cmd}"
    assert host_sleeper not in out, f"the host process 'sleep {host_sleeper}' is visible"


@pytest.fixture
def host_sleeper():
    """A process of the test on the host, which no sandbox may see."""
    marker = unique_marker()
    p = subprocess.Popen(["sleep", marker])
    yield marker
    p.kill()
    p.wait()


def test_only_the_sandboxs_own_processes_are_visible(open_session, server, host_sleeper):
    s = open_session("Bash")
    marker = unique_marker()
    s.start(f"sleep {marker}")
    inside = wait_until(lambda: host_processes_matching(f"sleep {marker}"), 10,
                        what="the sandbox's sleep on the host")
    assert len(inside) == 1, inside
    ns = _pid_namespace(inside[0])
    assert ns != _pid_namespace(os.getpid()), "the sandbox shares the host's PID namespace"
    envd = namespace_init(inside[0])
    assert envd and envd != server.proc.pid and _pid_namespace(envd) == ns, envd

    before = _namespace_pids(ns)
    out = s.run(PS).stdout
    own = before | _namespace_pids(ns)
    procs, _ = _listing(out)
    sleeper = int(proc_status(inside[0])["NSpid"].split()[-1])
    assert {1, sleeper} <= set(procs), f"the listing misses envd or the sandbox's sleep:\n{out}"
    _assert_only_own_processes(out, own, server.proc.pid, host_sleeper)
    # The server's host pid names, inside, nothing or one of the sandbox's own processes.
    if server.proc.pid in procs:
        assert server.proc.pid in own, f"pid {server.proc.pid} inside is not the sandbox's: {procs}"


def test_the_process_check_rejects_the_hosts_view(server, host_sleeper):
    """_assert_only_own_processes can fail: the host's own process list, seen from a shell that is
    not in a sandbox, holds processes of other namespaces, the server and the host sleeper."""
    out = subprocess.run(["bash", "-c", PS], capture_output=True, text=True, check=True).stdout
    procs, me = _listing(out)
    assert server.proc.pid in procs, "the host listing misses the server"
    with pytest.raises(AssertionError):
        _assert_only_own_processes(out, {me}, server.proc.pid, host_sleeper)
    # Even granting every other pid as "own", the server's command line and the sleeper are seen.
    with pytest.raises(AssertionError, match="server's command line|PID 1|sleep"):
        _assert_only_own_processes(out, set(procs), server.proc.pid, host_sleeper)


def test_host_files_are_not_visible(open_session, server):
    s = open_session("Bash")
    assert s.run("cat /etc/shadow 2>/dev/null | wc -c").stdout.strip() == "0", \
        "/etc/shadow is readable and not empty"

    host_root = set(os.listdir("/root"))
    out = s.run("ls -A /root 2>/dev/null; echo rc=$?").stdout
    listed = set(out.splitlines()[:-1])
    assert not (listed & host_root - {".bashrc", ".profile"}), f"host /root is visible: {listed & host_root}"

    home = set(s.run("ls -A /home").stdout.split())
    assert "user" in home, home
    host_home = set(os.listdir("/home")) - {"user"}
    assert not (home & host_home), f"host /home entries visible: {home & host_home}"

    for path in (REPO / "Cargo.toml", server.data_dir, "/work", "/root/.cargo"):
        assert s.run(f"test -e '{path}' && echo visible || echo absent").stdout == "absent", path


def test_network_is_the_sandboxs_own_and_reaches_nothing_of_the_host(open_session, server):
    s = open_session("Bash")
    out = s.run("cat /proc/net/dev").stdout
    ifaces = {ln.split(":")[0].strip() for ln in out.splitlines()[2:] if ":" in ln}
    # Its loopback and its own veth (tests/e2e/test_network.py covers what lies beyond it).
    assert ifaces == {"lo", "eth0"}, out
    routes = s.run("cat /proc/net/route").stdout.splitlines()[1:]
    gateway_hex = next(ln.split()[2] for ln in routes if ln.split()[1] == "00000000")
    gateway = socket.inet_ntoa(struct.pack("<I", int(gateway_hex, 16)))
    # Neither the sandbox's loopback nor its gateway (the host) leads to the server's port.
    for address in ("127.0.0.1", gateway):
        probe = (f"(timeout 3 bash -c 'echo > /dev/tcp/{address}/{server.port}') 2>/dev/null"
                 " && echo open || echo closed")
        assert s.run(probe, timeout=20).stdout == "closed", f"the sandbox reaches {address}:{server.port}"


def test_processes_run_unprivileged(open_session):
    s = open_session("Bash")
    out = s.run("id -u; id -g; id -un; grep -E '^(CapEff|NoNewPrivs):' /proc/self/status").stdout
    lines = out.splitlines()
    assert lines[0] == "1000", out
    assert lines[2] == "user", out
    status = dict(re.split(r":\s*", ln, 1) for ln in lines[3:])
    assert int(status["CapEff"], 16) == 0, out
    assert status.get("NoNewPrivs") == "1", out


def test_cannot_mount(open_session):
    s = open_session("Bash")
    out = s.run("mkdir -p /tmp/m; mount -t tmpfs x /tmp/m 2>/dev/null; echo rc=$?; "
                "grep -c ' /tmp/m ' /proc/self/mountinfo").stdout.splitlines()
    assert out[0] != "rc=0", "mount succeeded inside the sandbox"
    assert out[1] == "0", "a tmpfs got mounted at /tmp/m"


def test_memory_hog_dies_and_other_sessions_keep_answering(heavy_lock, open_session):
    hog = open_session("Python3")
    other = open_session("Bash")
    p = hog.start('python3 -c "b = bytearray(2 << 30); print(len(b))"; echo "rc=$?"', timeout=20)
    time.sleep(0.5)
    t0 = time.monotonic()
    assert other.run("echo ok", timeout=20).stdout == "ok"
    assert time.monotonic() - t0 < 5, "another session answered slowly while a sandbox hogged memory"
    out = p.wait(90).stdout
    m = re.search(r"rc=(\d+)", out)
    assert m, out
    assert int(m.group(1)) != 0, f"a 2 GiB allocation succeeded: no memory limit ({out!r})"
    # The hog's own sandbox survives the OOM kill of its process (envd was not the victim).
    assert hog.run("echo alive", timeout=20).stdout == "alive"


def test_fork_bomb_is_contained(heavy_lock, open_session, server, team_key):
    bomb = open_session("Bash")
    other = open_session("Bash")
    marker = f"6.{secrets.randbelow(10**6):06d}"  # the bomb's sleep: short, and unique on the host
    # A binary tree of 2^10 shells, each sleeping: ~2000 processes if nothing stops it (bounded so
    # a broken server cannot exhaust the host), far more than any sane per-sandbox pids limit.
    script = f"f(){{ if [ $1 -gt 0 ]; then f $(($1-1)) & f $(($1-1)) & fi; sleep {marker}; wait; }}; f 9"
    p = bomb.start(f"timeout -s KILL 40 bash -c '{script}' 2>/dev/null; echo bomb-over", timeout=20)

    peak = 0
    slow = []
    end = time.monotonic() + 8
    while time.monotonic() < end:
        peak = max(peak, len(host_processes_matching(marker)))
        t0 = time.monotonic()
        assert other.run("echo ok", timeout=20).stdout == "ok"
        slow.append(time.monotonic() - t0)
        time.sleep(0.3)
    assert peak >= 50, f"the bomb never got going ({peak} processes)"
    assert peak < 512, f"{peak} bomb processes: no pids limit on the sandbox"
    assert max(slow) < 5, f"another session was slow during the bomb: {slow}"

    assert server.delete(bomb.session_id, team_key).status == 204
    wait_until(lambda: not host_processes_matching(marker), 10, 0.3,
               "every bomb process to be killed after DELETE")
    del p
