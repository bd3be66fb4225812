"""Isolation, checked through the SDK from inside sandboxes and from the host: processes, files,
network, privileges, resource limits, and sandboxes against each other."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time

import pytest

from burrow_harness import REPO, host_processes_matching, unique_marker, wait_until

BURROW_SERVER = {"ttl": "15s"}

PS = r"""for p in /proc/[0-9]*; do printf '%s ' "${p#/proc/}"; tr '\0' ' ' < "$p/cmdline" 2>/dev/null; echo; done"""


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
    out = s.run(PS).stdout
    lines = [ln for ln in out.splitlines() if ln.strip()]
    pids = {int(ln.split()[0]) for ln in lines}
    assert host_sleeper not in out, f"a host process is visible in the sandbox:\n{out}"
    assert str(server.data_dir) not in out, f"the server's command line is visible:\n{out}"
    assert server.proc.pid not in pids or server.proc.pid == 1, "the server's pid is visible"
    assert 1 in pids, f"the sandbox has no pid 1 of its own:\n{out}"
    assert len(lines) < 25, f"{len(lines)} processes visible, more than one sandbox's worth:\n{out}"
    ps = s.run("ps -e -o pid= -o args= 2>/dev/null || echo NO-PS")
    if ps.stdout != "NO-PS":
        assert host_sleeper not in ps.stdout and str(server.data_dir) not in ps.stdout, ps.stdout


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


def test_network_is_loopback_only(open_session, server):
    s = open_session("Bash")
    out = s.run("cat /proc/net/dev").stdout
    ifaces = {ln.split(":")[0].strip() for ln in out.splitlines()[2:] if ":" in ln}
    assert ifaces == {"lo"}, out
    # The host's loopback (where the server listens) is not the sandbox's loopback.
    probe = f"(echo > /dev/tcp/127.0.0.1/{server.port}) 2>/dev/null && echo open || echo closed"
    assert s.run(probe, timeout=20).stdout == "closed", "the sandbox reaches the host's server port"


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
