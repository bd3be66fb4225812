"""Bugs of the hardening issue on paths a client controls, each shown from outside against a real
server: teardown that a vanished client cannot cancel, deletes that never report gone what is not
gone, edit saves that respect a replaced environment, restarts that neither wait on one stuck
sandbox per session nor drop an edit session frozen mid-save, a store that another process's
write transaction cannot stall, and metrics that name no team's environments."""

from __future__ import annotations

import socket
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import pytest

from burrow_harness import assert_error, edit_session, host_cgroup_dirs, new_env, wait_until

BURROW_SERVER = {"pool_size": 0}


def sh(server, session, cmd: str) -> list:
    with server.envd(session) as envd:
        out, err, exit_ = envd.run(cmd, timeout=60)
    assert exit_ == 0, (cmd, out, err, exit_)
    return out


def v2_cgroup(pid: int) -> Path:
    dirs = [d for d in host_cgroup_dirs(pid) if (d / "cgroup.freeze").exists()]
    assert dirs, f"host process {pid} is in no burrow cgroup v2 directory"
    return dirs[0]


def send_and_vanish(port: int, request: bytes, after: float) -> None:
    """Sends a request and resets the connection `after` seconds later, unanswered."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(request)
    time.sleep(after)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def run_dirs(server) -> set:
    run = server.data_dir / "run"
    return {p.name for p in run.iterdir() if p.is_dir() and len(p.name) == 12} if run.is_dir() else set()


def test_a_delete_whose_client_goes_away_still_saves_and_tears_down(server, team_key):
    env = new_env(server, team_key)
    edit = edit_session(server, team_key, env)
    # Enough files that the save is still running when the client goes away.
    sh(server, edit, "mkdir -p ~/many && cd ~/many && seq 1 3000 | xargs touch && echo kept > ~/kept.txt")
    cgroups = host_cgroup_dirs(server.envd_pid(edit))
    assert cgroups
    request = (f"DELETE /sessions/{edit['sessionID']}?api_key={team_key} HTTP/1.1\r\n"
               f"Host: 127.0.0.1\r\nContent-Length: 0\r\n\r\n").encode()
    send_and_vanish(server.port, request, 0.02)

    wait_until(lambda: not any(d.exists() for d in cgroups), 20, 0.1,
               "the edit session's cgroups to be removed although its client went away")
    assert edit["sessionID"] not in server.session_ids(team_key)
    after = server.create_session(team_key, env)
    assert sh(server, after, "cat ~/kept.txt; ls ~/many | wc -l") == ["kept", "3000"]


def test_a_delete_that_cannot_remove_the_sandbox_is_500_and_retried(server, team_key):
    before = run_dirs(server)
    doc = server.create_session(team_key)
    (sandbox,) = run_dirs(server) - before
    run_dir = server.data_dir / "run" / sandbox
    # An immutable run directory makes every removal of what is in it fail at once.
    subprocess.run(["chattr", "+i", str(run_dir)], check=True)
    try:
        r = server.delete(doc["sessionID"], team_key)
        body = assert_error(r, 500, "could not be removed", "keeps trying")
        assert str(server.data_dir) not in body["message"], "a 500 must not show host paths"
        assert doc["sessionID"] not in server.session_ids(team_key)
        assert run_dir.exists()
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], check=True)
    wait_until(lambda: not run_dir.exists(), 20, 0.2,
               "the background retry to remove the sandbox once it can")
    metrics = server.request("GET", "/metrics").text
    assert "burrow_sandbox_destroy_failures_total 1" in metrics, metrics


@pytest.mark.parametrize("method, template", [("PATCH", "Perl"), ("POST", "Bash")],
                         ids=["re-templated", "replaced"])
def test_an_edit_save_does_not_bring_back_what_a_change_dropped(server, team_key, method, template):
    env = new_env(server, team_key)
    edit = edit_session(server, team_key, env)
    sh(server, edit, "echo first > ~/first.txt")
    assert server.delete(edit["sessionID"], team_key).status == 204

    edit = edit_session(server, team_key, env)
    sh(server, edit, "echo second > ~/second.txt")
    r = server.request(method, f"/envs/{env}", body={"template": template}, api_key=team_key)
    assert r.status == 204, r
    assert_error(server.delete(edit["sessionID"], team_key), 409,
                 "replaced or given another template")

    fresh = server.create_session(team_key, env)
    assert sh(server, fresh, "ls ~/first.txt ~/second.txt 2>&1 | grep -c 'No such'") == ["2"]


def test_a_restart_finishes_an_edit_save_the_previous_run_left_frozen(new_server):
    server = new_server(pool_size=0)
    key = server.create_key("frozen")
    env = new_env(server, key)
    edit = edit_session(server, key, env)
    sh(server, edit, "echo survived > ~/mid-save.txt")
    cgroup = v2_cgroup(server.envd_pid(edit))
    server.stop()
    # The state a crash in the middle of the save leaves: the session marked as ending, its
    # sandbox frozen.
    with sqlite3.connect(server.data_dir / "node.db") as db:
        assert db.execute("UPDATE sessions SET ending = 1 WHERE id = ?",
                          (edit["sessionID"],)).rowcount == 1
    (cgroup / "cgroup.freeze").write_text("1")
    server.start()

    wait_until(lambda: not cgroup.exists(), 20, 0.1, "the frozen edit session's sandbox to go")
    assert edit["sessionID"] not in server.session_ids(key)
    fresh = server.create_session(key, env)
    assert sh(server, fresh, "cat ~/mid-save.txt") == ["survived"]


def test_a_restart_does_not_wait_for_stuck_sandboxes_one_by_one(new_server):
    server = new_server(pool_size=0)
    key = server.create_key("stuck")
    sessions = [server.create_session(key) for _ in range(6)]
    pids = [server.envd_pid(s) for s in sessions]
    server.stop()
    for pid in pids:
        subprocess.run(["kill", "-STOP", str(pid)], check=True)
    t0 = time.monotonic()
    server.start()
    took = time.monotonic() - t0
    # Each probe of a stopped envd waits out its 2 s timeout; one after another they took 12 s.
    assert took < 6, f"the restart took {took:.1f}s with 6 unresponsive sandboxes"
    assert not server.session_ids(key), "sessions whose envd does not answer are not adopted"


def test_a_long_write_transaction_elsewhere_stalls_nothing(new_server):
    server = new_server(pool_size=1)
    key = server.create_key("busy")
    running = server.create_session(key)
    wait_until(lambda: 'burrow_pool_ready{environment="Bash"} 1'
               in server.request("GET", "/metrics").text, 30, 0.1, "a pooled Bash sandbox")
    other = sqlite3.connect(server.data_dir / "burrow.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO teams (name, created_at) VALUES ('held-open', 0)")
    try:
        timings = {}

        def timed(name, f):
            t0 = time.monotonic()
            result = f()
            timings[name] = time.monotonic() - t0
            return result

        assert timed("health", lambda: server.request("GET", "/health")).status == 200
        created = timed("create", lambda: server.create_session(key))
        assert timed("refresh", lambda: server.refresh(created["sessionID"], key)).status == 204
        assert timed("list", lambda: server.session_ids(key)) >= {created["sessionID"],
                                                                   running["sessionID"]}
        assert timed("gateway", lambda: sh(server, running, "echo through")) == ["through"]
        assert timed("delete", lambda: server.delete(created["sessionID"], key)).status == 204
    finally:
        other.execute("ROLLBACK")
        other.close()
    # The write lock's busy timeout is 10 s: anything that waited for it took that long.
    slow = {k: round(v, 2) for k, v in timings.items() if v > 3}
    assert not slow, f"held up by another process's write transaction: {slow}"


def test_metrics_name_templates_never_a_teams_environment_ids(server, team_key):
    env = new_env(server, team_key)
    server.create_session(team_key, env)
    metrics = server.request("GET", "/metrics").text
    assert env not in metrics, f"/metrics (no key needed) shows team environment ID {env}"
    assert 'burrow_sessions_live{environment="Bash"}' in metrics, metrics
