"""Session lifetime as the SDK lives it, on a server with a 3 s TTL while the SDK refreshes every
second: kept alive by its own refreshes, reaped after close, closed by the SDK itself once a REST
DELETE makes its refresh answer 404."""

from __future__ import annotations

import time

import pytest

from burrow_harness import host_processes_matching, unique_marker, wait_until
from sdk_driver import SessionException

BURROW_SERVER = {"ttl": "3s"}
TTL = 3.0


def _mark(s) -> str:
    marker = unique_marker()
    s.start(f"sleep {marker}")
    wait_until(lambda: host_processes_matching(f"sleep {marker}"), 10, 0.1, f"sleep {marker} to run")
    return marker


def test_sdk_refreshes_keep_the_session_alive_past_several_ttls(open_session, server, team_key):
    s = open_session("Bash")
    time.sleep(3.5 * TTL)
    assert s.is_open, "the SDK closed the session: a refresh must have failed"
    assert s.session_id in server.session_ids(team_key)
    assert s.run("echo alive").stdout == "alive"


def test_closed_session_is_reaped_within_ttl(open_session, server, team_key):
    s = open_session("Bash")
    sid = s.session_id
    marker = _mark(s)
    time.sleep(1.5 * TTL)
    assert sid in server.session_ids(team_key), "session expired although the SDK refreshed it"

    s.close()
    assert not s.is_open
    with pytest.raises(SessionException):
        s.list("/home/user")
    wait_until(lambda: sid not in server.session_ids(team_key), TTL + 2.0, 0.2,
               "the closed session to be reaped (GET /sessions)")
    wait_until(lambda: not host_processes_matching(f"sleep {marker}"), 5, 0.2,
               "the reaped sandbox's processes to be gone")


def test_rest_delete_makes_the_sdk_close_the_session(open_session, server, team_key):
    s = open_session("Bash")
    sid = s.session_id
    marker = _mark(s)
    r = server.delete(sid, team_key)
    assert r.status == 204, r
    wait_until(lambda: not host_processes_matching(f"sleep {marker}"), 5, 0.2,
               "the deleted sandbox's processes to be gone")
    # The SDK refreshes every second; the 404 closes the session.
    wait_until(lambda: not s.is_open, 8, 0.1, "the SDK to close the session after its refresh got 404")
    with pytest.raises(SessionException) as e:
        s.list("/home/user")
    assert "not open" in str(e.value), e.value
