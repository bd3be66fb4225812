"""Session lifetime against a real server: TTL expiry, refresh keep-alive, and restarts (SIGTERM and
kill -9) with live sessions. Sandboxes are checked from the outside: their websocket through the
gateway (Host routing), a JSON-RPC round trip, and their processes as the host sees them.
"""

from __future__ import annotations

import secrets
import time

from burrow_harness import (
    ENVD_PORT,
    assert_error,
    host_cgroup_dirs,
    host_processes_matching,
    namespace_init,
    sandbox_host,
    unique_marker,
    wait_until,
    ws_upgrade,
)

BURROW_SERVER = {"ttl": "2s"}
TTL = 2.0


def _sandbox_cgroups(marker: str) -> list:
    pids = host_processes_matching(f"sleep {marker}")
    assert pids, f"sleep {marker} is not running"
    dirs = host_cgroup_dirs(pids[0])
    assert dirs, f"the sandbox process {pids[0]} is in no burrow cgroup"
    return dirs


def _start_marker(server, doc) -> str:
    """Starts `sleep <marker>` in the session's sandbox and waits until the host sees it."""
    marker = unique_marker()
    with server.envd(doc) as envd:
        envd.call("process_start", ["mark" + secrets.token_hex(4), f"sleep {marker}", {}, ""])
    wait_until(lambda: host_processes_matching(f"sleep {marker}"), 10, what=f"sleep {marker} on the host")
    # Short TTLs: make sure the setup itself did not eat the session's lifetime.
    assert server.refresh(doc["sessionID"]).status == 204, "session expired during test setup"
    return marker


def test_session_expires_without_refresh(server, team_key):
    t0 = time.monotonic()
    doc = server.create_session(team_key)
    sid = doc["sessionID"]
    host = sandbox_host(ENVD_PORT, sid, doc["clientID"])

    time.sleep(max(0.0, t0 + TTL / 2 - time.monotonic()))
    assert sid in server.session_ids(team_key), "session vanished before its TTL"

    # Listing must not count as a refresh; ~3 s after creation (TTL 2 s) the session is gone.
    time.sleep(max(0.0, t0 + 3.0 - time.monotonic()))
    wait_until(lambda: sid not in server.session_ids(team_key), 1.0, 0.1,
               "the unrefreshed session to disappear from GET /sessions ~3 s after creation")
    assert_error(server.refresh(sid), 404)
    assert_error(server.refresh(sid, team_key), 404)
    up = wait_until(lambda: (lambda u: u if u.status != 101 else None)(ws_upgrade(server.port, host)),
                    3, 0.2, "the expired session's sandbox to stop answering")
    assert up.status >= 400


def test_refresh_keeps_session_alive_past_several_ttls(server, team_key):
    doc = server.create_session(team_key)
    sid = doc["sessionID"]
    end = time.monotonic() + 3.5 * TTL
    n = 0
    while time.monotonic() < end:
        r = server.refresh(sid)  # keyless, as the Python SDK does it
        assert r.status == 204, f"refresh #{n}: {r!r}"
        n += 1
        time.sleep(0.5)
    assert n >= 6
    assert sid in server.session_ids(team_key)
    with server.envd(doc) as envd:
        out, _, _ = envd.run("echo still-here")
        assert out == ["still-here"]
    # Without refreshes it then expires.
    wait_until(lambda: sid not in server.session_ids(team_key), TTL + 2.0, 0.2,
               "the session to expire once refreshes stop")


def test_expiry_destroys_the_sandbox_processes_and_cgroups(server, team_key):
    doc = server.create_session(team_key)
    marker = _start_marker(server, doc)
    cgroups = _sandbox_cgroups(marker)
    wait_until(lambda: doc["sessionID"] not in server.session_ids(team_key), TTL + 2.0, 0.2,
               "expiry")
    wait_until(lambda: not host_processes_matching(f"sleep {marker}"), 5.0, 0.2,
               f"the expired sandbox's 'sleep {marker}' to be killed")
    wait_until(lambda: not any(d.exists() for d in cgroups), 5.0, 0.2,
               f"the expired sandbox's cgroups to be removed: {cgroups}")


def test_delete_destroys_the_sandbox_processes_and_cgroups(server, team_key):
    doc = server.create_session(team_key)
    marker = _start_marker(server, doc)
    cgroups = _sandbox_cgroups(marker)
    assert server.delete(doc["sessionID"], team_key).status == 204
    wait_until(lambda: not host_processes_matching(f"sleep {marker}"), 5.0, 0.2,
               f"the deleted sandbox's 'sleep {marker}' to be killed")
    wait_until(lambda: not any(d.exists() for d in cgroups), 5.0, 0.2,
               f"the deleted sandbox's cgroups to be removed: {cgroups}")


# ---------------------------------------------------------------------------------------------
# Restarts
# ---------------------------------------------------------------------------------------------


def _restart_with_live_session(new_server, graceful: bool):
    """The README: "Stopping the server (SIGTERM, Ctrl-C) leaves live sessions running; the next
    start adopts them. A start after a crash does the same". So after either kind of stop the
    session must be listed again, reachable, and be the very same sandbox: the process started
    before the restart still runs in it (same host pid) and the file written before is there."""
    srv = new_server(ttl="15s")
    admin = srv.admin_key
    key = srv.create_key("team-restart")
    doc = srv.create_session(key)
    sid = doc["sessionID"]
    secret = "persist-" + secrets.token_hex(8)
    with srv.envd(doc) as envd:
        envd.call("filesystem_write", ["/home/user/before-restart.txt", secret])
    marker = _start_marker(srv, doc)
    before = host_processes_matching(f"sleep {marker}")
    assert len(before) == 1, f"expected one 'sleep {marker}' on the host, found {before}"
    envd_before = namespace_init(before[0])
    assert envd_before, f"no sandbox PID 1 above host process {before[0]}"

    srv.restart(graceful=graceful)
    how = "SIGTERM" if graceful else "kill -9"

    assert sid in srv.session_ids(key), \
        f"the live session was not adopted after {how}: GET /sessions no longer lists it\n{srv.log_tail()}"
    assert srv.refresh(sid).status == 204, f"adopted after {how} but not refreshable"
    host = sandbox_host(ENVD_PORT, sid, doc["clientID"])
    assert ws_upgrade(srv.port, host).status == 101, f"adopted after {how} but its sandbox is unreachable"
    with srv.envd(doc) as envd:
        assert envd.call("filesystem_read", ["/home/user/before-restart.txt"]) == secret, \
            f"the session after {how} is not the same sandbox (the file written before is gone)"
        out, _, _ = envd.run(f"pgrep -f '[s]leep {marker}'")  # [s]: not this shell itself
        assert len(out) == 1, \
            f"inside the adopted sandbox, 'sleep {marker}' started before the {how} is not running: {out}"
        out, _, _ = envd.run("echo after-restart")
        assert out == ["after-restart"]
    assert host_processes_matching(f"sleep {marker}") == before, \
        f"the process started before the {how} is no longer the same host process"
    assert namespace_init(before[0]) == envd_before, f"the sandbox's envd changed across the {how}"

    # Keys and the node identity survive, and the server is fully usable after the restart.
    fresh = srv.create_session(key)
    assert fresh["clientID"] == doc["clientID"], "clientID changed across a restart of the same data dir"
    assert srv.request("GET", "/sessions", api_key=admin).status == 200, "admin key lost on restart"
    with srv.envd(fresh) as envd:
        out, _, _ = envd.run("echo new-session-ok")
        assert out == ["new-session-ok"]

    # The adopted session is managed as any other: deleting it destroys its sandbox.
    assert srv.delete(sid, key).status == 204
    wait_until(lambda: not host_processes_matching(f"sleep {marker}"), 5.0, 0.2,
               f"the adopted sandbox's 'sleep {marker}' to be killed by its delete")


def test_restart_after_sigterm_with_live_sessions(new_server):
    _restart_with_live_session(new_server, graceful=True)


def test_restart_after_kill9_with_live_sessions(new_server):
    _restart_with_live_session(new_server, graceful=False)


def test_sigterm_with_open_websocket_exits_promptly(new_server):
    srv = new_server(ttl="15s")
    key = srv.create_key("team-ws")
    doc = srv.create_session(key)
    envd = srv.envd(doc)
    try:
        t0 = time.monotonic()
        srv.stop(timeout=10.0)  # asserts exit status 0 within the bound
        assert time.monotonic() - t0 < 10.0
    finally:
        envd.sock.close()
