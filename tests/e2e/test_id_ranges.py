"""One host id range per sandbox (issue #10, the first bullet of #15) and bug 5.

Each sandbox maps its ids to a host range of its own, with a user namespace owner of its own:
its processes run as host uids no other sandbox has, what it writes shows as `nobody` to any
other sandbox, and per-user kernel budgets (here: pipe buffer pages) are its alone. And a server
start leaves a concurrent `burrow sandbox-run`'s sandbox alone.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import subprocess
import textwrap
import time

from burrow_harness import burrow_bin, wait_until

BURROW_SERVER = {"ttl": "120s", "pool_size": 0}

# From linux/nsfs.h: _IO(0xb7, 0x4).
NS_GET_OWNER_UID = 0xB704
OVERFLOW_UID = 65534


def run(envd, cmd: str, timeout: float = 30) -> tuple:
    out, err, code = envd.run(cmd, timeout=timeout)
    return "\n".join(out), "\n".join(err), code


def status_ids(pid: int, field: str) -> list:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def uid_map(pid: int) -> tuple:
    with open(f"/proc/{pid}/uid_map") as f:
        inside, outside, count = (int(x) for x in f.read().split()[:3])
    assert inside == 0, f"/proc/{pid}/uid_map does not start at 0"
    return outside, count


def namespace_owner(pid: int) -> int:
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    try:
        owner = bytearray(4)
        fcntl.ioctl(fd, NS_GET_OWNER_UID, owner)
        return int.from_bytes(owner, "little")
    finally:
        os.close(fd)


def uid_seen_from(pid: int, path: str) -> int:
    """The owner of `path` (a host path) as a process in `pid`'s user namespace sees it: a
    forked child opens the file as the host's root, enters that user namespace, and fstat()s."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    ns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(ns, 0x10000000) != 0:  # CLONE_NEWUSER
                os._exit(2)
            os.write(write_end, str(os.fstat(fd).st_uid).encode())
            os._exit(0)
        except BaseException:
            os._exit(3)
    os.close(write_end)
    try:
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"setns/fstat child failed: {status}"
        return int(os.read(read_end, 64))
    finally:
        for d in (read_end, fd, ns):
            os.close(d)


def test_sandboxes_run_as_host_ids_of_their_own(server, team_key):
    a = server.create_session(team_key)
    b = server.create_session(team_key)
    try:
        pid_a, pid_b = server.envd_pid(a), server.envd_pid(b)
        (base_a, count_a), (base_b, count_b) = uid_map(pid_a), uid_map(pid_b)
        assert count_a == count_b == 65536
        assert base_a + count_a <= base_b or base_b + count_b <= base_a, \
            f"the id ranges overlap: {base_a}+{count_a} and {base_b}+{count_b}"
        # envd runs as the sandbox's root: the first id of each range, on the host.
        uid_a, uid_b = status_ids(pid_a, "Uid")[0], status_ids(pid_b, "Uid")[0]
        assert (uid_a, uid_b) == (base_a, base_b)
        assert status_ids(pid_a, "Gid")[0] != status_ids(pid_b, "Gid")[0]
        # And the user's processes, too.
        with server.envd(a) as ea, server.envd(b) as eb:
            assert run(ea, "id -u")[0] == run(eb, "id -u")[0] == "1000"
        owner_a, owner_b = namespace_owner(pid_a), namespace_owner(pid_b)
        assert owner_a != owner_b, f"both user namespaces are owned by host uid {owner_a}"
        for owner in (owner_a, owner_b):
            for base, count in ((base_a, count_a), (base_b, count_b)):
                assert not base <= owner < base + count, \
                    f"namespace owner {owner} is inside a sandbox's range {base}+{count}"
    finally:
        server.delete(a["sessionID"], team_key)
        server.delete(b["sessionID"], team_key)


def test_what_one_sandbox_writes_is_nobodys_in_another(server, team_key):
    a = server.create_session(team_key)
    b = server.create_session(team_key)
    try:
        with server.envd(a) as ea:
            out, err, code = run(ea, "echo secret > /tmp/mine && stat -c %u /tmp/mine")
            assert out == "1000", (out, err, code)
        pid_a, pid_b = server.envd_pid(a), server.envd_pid(b)
        # A's writable layer, as the server reads it to save an edit session.
        path = f"/proc/{pid_a}/fd/100/upper/tmp/mine"
        assert uid_seen_from(pid_a, path) == 1000
        assert uid_seen_from(pid_b, path) == OVERFLOW_UID
    finally:
        server.delete(a["sessionID"], team_key)
        server.delete(b["sessionID"], team_key)


# Holds pipes until the user's pipe buffer pages pass `fs.pipe-user-pages-soft`, after which the
# kernel gives new pipes the minimum (one or two pages, by kernel version) instead of 16 pages
# (F_GETPIPE_SZ 65536); then says so and keeps them open. Creating a pipe charges its capacity without allocating it: no memory is used.
HOLD_PIPES = textwrap.dedent("""\
    import fcntl, os, time
    F_GETPIPE_SZ = 1032
    held = []
    for _ in range(4000):
        r, w = os.pipe()
        held.append((r, w))
        if fcntl.fcntl(r, F_GETPIPE_SZ) < 65536:
            break
    else:
        raise SystemExit("the pipe budget never ran out")
    with open("/tmp/exhausted.tmp", "w") as f:
        f.write(str(len(held)))
    os.rename("/tmp/exhausted.tmp", "/tmp/exhausted")
    time.sleep(120)
""")

PIPE_SIZE = "import fcntl, os; r, w = os.pipe(); print(fcntl.fcntl(r, 1032))"


def test_pipe_budget_is_per_sandbox(server, team_key):
    soft = int(open("/proc/sys/fs/pipe-user-pages-soft").read())
    assert soft > 0, "fs.pipe-user-pages-soft is 0 on this host: no per-user pipe budget"
    a = server.create_session(team_key)
    b = server.create_session(team_key)
    try:
        with server.envd(a) as ea, server.envd(b) as eb:
            assert run(eb, f"python3 -c '{PIPE_SIZE}'")[0] == "65536"
            run(ea, f"cat > /tmp/hold.py <<'EOF'\n{HOLD_PIPES}EOF")
            ea.call("process_start", ["hold-pipes", "exec python3 /tmp/hold.py", {}, ""])
            held = wait_until(lambda: run(ea, "cat /tmp/exhausted 2>/dev/null")[0], 30,
                              what="sandbox A to exhaust its pipe budget")
            assert int(held) * 16 >= soft
            # A's user cannot get a full pipe any more; B's user, the same id inside its own
            # sandbox, still can.
            assert int(run(ea, f"python3 -c '{PIPE_SIZE}'")[0]) < 65536
            assert run(eb, f"python3 -c '{PIPE_SIZE}'")[0] == "65536"
    finally:
        server.delete(a["sessionID"], team_key)
        server.delete(b["sessionID"], team_key)


def test_server_start_leaves_a_concurrent_sandbox_run_alone(server, team_key):
    """Bug 5: the restart's sweep of leftover sandboxes took sandbox-run's run directory for an
    orphan and deleted it."""
    marker = f"sandbox-run-{os.getpid()}-{time.monotonic_ns()}"
    before = set(os.listdir(server.data_dir / "run"))
    run_cmd = subprocess.Popen(
        [str(burrow_bin()), "sandbox-run", "--data-dir", str(server.data_dir), "--",
         "sh", "-c", f"sleep 6; echo {marker}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        new = wait_until(lambda: set(os.listdir(server.data_dir / "run")) - before, 10,
                         what="sandbox-run's run directory")
        (run_dir,) = [server.data_dir / "run" / name for name in new]
        server.restart()
        assert run_dir.is_dir(), "the server's start deleted sandbox-run's run directory"
        out, err = run_cmd.communicate(timeout=30)
        assert run_cmd.returncode == 0, (out, err)
        assert out.strip() == marker
        assert not run_dir.exists(), "sandbox-run left its run directory"
        # The server still sweeps a leftover of its own kind: a run directory nothing holds.
        orphan = server.data_dir / "run" / "orphan000001"
        orphan.mkdir()
        server.restart()
        assert not orphan.exists(), "the server's start kept a leftover run directory"
        doc = server.create_session(team_key)
        server.delete(doc["sessionID"], team_key)
    finally:
        if run_cmd.poll() is None:
            run_cmd.kill()
            run_cmd.wait()
