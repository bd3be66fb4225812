"""Per-environment limits: `--environment-limits ENV:KEY=VALUE,...` overrides the server-wide
limits for that environment's sandboxes only (pooled ones included)."""

from __future__ import annotations

import subprocess

from burrow_harness import assert_error, burrow_bin

BURROW_SERVER = {
    "pool_size": 1,
    "extra_args": ["--environment-limits", "Python3:memory=64MiB,pids=32"],
}

ALLOC_100M = "python3 -c 'b = bytearray(100 << 20); b[-1] = 1; print(\"allocated\")'"


def run(server, key, env, cmd):
    session = server.create_session(key, env)
    with server.envd(session) as envd:
        return envd.run(cmd, timeout=60)


def test_environment_memory_limit_applies_only_to_that_environment(server, team_key):
    out, _err, code = run(server, team_key, "Python3", ALLOC_100M)
    assert code != 0 and "allocated" not in out, "100 MiB fit under a 64 MiB limit"
    out, _err, code = run(server, team_key, "Bash", ALLOC_100M)
    assert (out, code) == (["allocated"], 0), "the server-wide 512 MiB limit should allow 100 MiB"


SPAWN_60 = ("python3 -c 'import subprocess\nps = []\ntry:\n    for _ in range(60): "
            "ps.append(subprocess.Popen([\"sleep\", \"5\"]))\nexcept OSError: pass\n"
            "print(len(ps))\nfor p in ps: p.kill()'")


def test_environment_pids_limit(server, team_key):
    cmd = SPAWN_60
    out, _err, _code = run(server, team_key, "Python3", cmd)
    assert int(out[-1]) < 32, f"started {out[-1]} processes under pids=32"
    out, _err, _code = run(server, team_key, "Bash", cmd)
    assert int(out[-1]) == 60


def test_bad_environment_limits_are_refused_at_start(tmp_path):
    for bad in ["Python3", "Python3:colour=red", "Python3:memory=1"]:
        p = subprocess.run(
            [str(burrow_bin()), "serve", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
             "--environment-limits", bad],
            capture_output=True, text=True, timeout=30)
        assert p.returncode != 0, bad
        assert "--environment-limits" in p.stderr or "memory must be" in p.stderr, p.stderr


def test_session_caps_per_team_and_per_server_answer_429(new_server):
    srv = new_server(pool_size=0, extra_args=["--max-sessions-per-team", "2", "--max-sessions", "3"])
    a, b = srv.create_key("cap-a"), srv.create_key("cap-b")
    first = [srv.create_session(a, "Bash") for _ in range(2)]
    resp = srv.request("POST", f"/sessions?api_key={a}", body={"codeSnippetID": "Bash"})
    assert_error(resp, 429, "your team", "max-sessions-per-team")
    srv.create_session(b, "Bash")
    resp = srv.request("POST", f"/sessions?api_key={b}", body={"codeSnippetID": "Bash"})
    assert_error(resp, 429, "this server", "max-sessions")
    # Capacity comes back when a session goes.
    assert srv.delete(first[0]["sessionID"], a).status == 204
    srv.create_session(b, "Bash")


def test_concurrent_creates_cannot_overshoot_the_cap(new_server):
    from concurrent.futures import ThreadPoolExecutor

    srv = new_server(pool_size=0, extra_args=["--max-sessions-per-team", "3"])
    key = srv.create_key("burst")

    def create(_):
        return srv.request("POST", f"/sessions?api_key={key}", body={"codeSnippetID": "Bash"}).status

    with ThreadPoolExecutor(10) as pool:
        statuses = sorted(pool.map(create, range(10)))
    assert statuses == [201] * 3 + [429] * 7, statuses
    assert len(srv.list_sessions(key)) == 3


# Fills 300 loopback TCP connections whose reader never reads; prints the MiB the kernel took.
TCP_QUEUE = """
import socket
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(512)
keep, total, chunk = [], 0, b"x" * 65536
for _ in range(300):
    c = socket.create_connection(srv.getsockname()); keep.append(srv.accept()[0])
    c.setblocking(False); keep.append(c)
    while True:
        try:
            total += c.send(chunk)
        except BlockingIOError:
            break
print(total >> 20)
"""


def test_socket_buffers_count_against_the_memory_limit(server, team_key):
    """Data queued in the sandbox's own TCP connections is kernel memory too: on cgroup v1 it
    has its own counter, which burrow limits (a quarter of the memory limit); on v2 it is part
    of the memory limit. Without that, this sandbox (64 MiB) queued over 1 GiB."""
    out, err, code = run(server, team_key, "Python3", "python3 -c '" + TCP_QUEUE.replace("'", "\"") + "'")
    assert code == 0, (out, err)
    assert int(out[-1]) < 64, f"{out[-1]} MiB queued in TCP buffers under a 64 MiB limit"
