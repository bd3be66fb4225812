"""Connections and fairness between tenants (issue #15), against the real server with small caps:
one team's websockets cannot take another team's share (--max-connections-per-team), an upload
that stops sending is cut off (--body-idle-timeout) while the server and the sandbox stay
healthy, and connections that never finish their request head cannot take the connections of
those that do (--max-pending-heads)."""

from __future__ import annotations

import re
import socket
import time

from burrow_harness import (
    ENVD_PORT,
    assert_error,
    sandbox_host,
    wait_until,
    ws_upgrade,
)

# burrow_api's HEAD_GRACE: how long a connection over --max-pending-heads has for its head.
HEAD_GRACE_S = 1
# burrow_api's REFUSAL_TIMEOUT: how long a connection over --max-connections has for its head.
REFUSAL_TIMEOUT_S = 5


def read_answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    answer = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return answer


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:300]
    return int(answer.split(b" ", 2)[1])


def test_a_team_at_its_connection_cap_gets_429_while_another_team_connects(new_server):
    srv = new_server(pool_size=1, extra_args=["--pool-environments", "Bash",
                                              "--max-connections-per-team", "3"])
    a, b = srv.create_key("team-a"), srv.create_key("team-b")
    session_a, session_b = srv.create_session(a), srv.create_session(b)
    host_a = sandbox_host(ENVD_PORT, session_a["sessionID"], session_a["clientID"])
    host_b = sandbox_host(ENVD_PORT, session_b["sessionID"], session_b["clientID"])
    held = []
    try:
        for _ in range(3):
            up = ws_upgrade(srv.port, host_a, keep=True)
            assert up.status == 101, up
            held.append(up.sock)
        over = ws_upgrade(srv.port, host_a)
        assert over.status == 429, over
        doc = assert_error(srv.request("GET", "/ws", host=host_a), 429,
                           "your team already has 3 connections", "--max-connections-per-team")
        assert "code" in doc
        # Team B is not held back by team A's websockets.
        other = ws_upgrade(srv.port, host_b, keep=True)
        assert other.status == 101, other
        held.append(other.sock)
        # A websocket that closes gives its team's connection back.
        held.pop(0).close()
        wait_until(lambda: ws_upgrade(srv.port, host_a).status == 101, 10,
                   what="team A to connect again after closing a websocket")
    finally:
        for sock in held:
            sock.close()


def test_a_stalled_upload_is_cut_off_and_the_server_stays_healthy(new_server):
    srv = new_server(pool_size=1, extra_args=["--pool-environments", "Bash",
                                              "--body-idle-timeout", "2s"])
    key = srv.create_key("team-upload")
    session = srv.create_session(key)
    host = sandbox_host(ENVD_PORT, session["sessionID"], session["clientID"])
    boundary = "stallboundary"
    start = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
             f"filename=\"stalled.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    head = (f"POST /file HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(start) + (1 << 20)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        t0 = time.monotonic()
        s.sendall(head + start + b"x" * 1000)
        # Then nothing, with the connection open.
        answer = read_answer(s, 20)
        took = time.monotonic() - t0
    assert status_of(answer) == 408, answer[:300]
    assert b"--body-idle-timeout" in answer, answer[:500]
    assert re.search(rb"(?im)^connection:\s*close", answer), answer[:300]
    assert 2 <= took < 8, f"cut off after {took:.1f} s for a 2 s idle timeout"
    assert srv.request("GET", "/health").status == 200
    with srv.envd(session) as envd:
        # The sandbox saw the upload aborted: no file, and no staging file left behind.
        wait_until(lambda: envd.run("ls -A /home/user")[0] == [], 10,
                   what="the aborted upload's staging file to be removed")
        assert envd.run("echo ok")[0] == ["ok"]
    # Uploads that do not stall still work.
    body = start + b"data" + f"\r\n--{boundary}--\r\n".encode()
    r = srv.request("POST", "/file", raw=body, host=host,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status == 200, r
    with srv.envd(session) as envd:
        assert envd.run("cat /home/user/stalled.bin")[0] == ["data"]


def test_half_sent_heads_do_not_stop_whole_requests(new_server):
    max_connections, max_pending = 24, 4
    srv = new_server(pool_size=1, extra_args=["--pool-environments", "Bash",
                                              "--max-connections", str(max_connections),
                                              "--max-pending-heads", str(max_pending)])
    key = srv.create_key("team-heads")
    halves = []
    try:
        # More half-sent heads than the server takes connections, from a client with no key.
        opened = time.monotonic()
        for _ in range(max_connections + 6):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"POST /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
            halves.append(s)
        # Past the grace, those over the pending cap are answered 503 and closed.
        time.sleep(HEAD_GRACE_S + 0.5)
        created = srv.create_session(key)
        assert created["sessionID"] in srv.session_ids(key)
        # The ones over --max-connections have their own, longer refusal (5 s to send a head).
        time.sleep(max(0.0, opened + REFUSAL_TIMEOUT_S + 1 - time.monotonic()))
        refused = waiting = closed = 0
        for s in halves:
            s.setblocking(False)
            try:
                got = s.recv(65536)
            except BlockingIOError:
                waiting += 1
                continue
            finally:
                s.setblocking(True)
            if got:
                assert status_of(got) == 503, got[:300]
                refused += 1
            else:
                closed += 1
        # Over --max-pending-heads: 503; over --max-connections: closed unanswered, since they
        # did not send a head to answer (unchanged behaviour of that cap).
        assert (waiting, refused, closed) == (max_pending, max_connections - max_pending,
                                              len(halves) - max_connections), \
            f"{waiting} half-sent heads still wait, {refused} refused with 503, {closed} closed"
    finally:
        for s in halves:
            s.close()
    assert srv.request("GET", "/health").status == 200
