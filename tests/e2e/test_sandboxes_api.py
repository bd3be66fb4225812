"""The /sandboxes control plane of the current E2B SDKs over plain HTTP: status codes, exact
wire shapes (e2b v2 wire spec §3), team isolation, lifetimes, and the routing of sandbox traffic
by the E2b-Sandbox-Id/-Port headers and {port}-{sandboxID} hosts (§4.1)."""

from __future__ import annotations

import datetime
import time

import pytest

from burrow_harness import assert_error, http_request, wait_until

SANDBOX_KEYS = {"templateID", "alias", "sandboxID", "clientID", "envdVersion", "domain"}
DETAIL_KEYS = {"templateID", "alias", "sandboxID", "clientID", "startedAt", "endAt", "envdVersion",
               "cpuCount", "memoryMB", "diskSizeMB", "state", "metadata", "domain"}


def call(server, method, path, key, **kw):
    return http_request(server.port, method, path, api_key=key, key_in="header", **kw)


def create(server, key, path="/v2/sandboxes", **body):
    body.setdefault("templateID", "base")
    resp = call(server, "POST", path, key, body=body, timeout=60)
    assert resp.status == 201, resp
    return resp.json()


def when(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
def sandbox(server, team_key):
    made = create(server, team_key, metadata={"k": "v"})
    yield made
    call(server, "DELETE", f"/sandboxes/{made['sandboxID']}", team_key)


def test_create_answers_the_sandbox_shape(server, team_key):
    for path, lifetime in (("/v2/sandboxes", 300), ("/sandboxes", 15)):
        doc = create(server, team_key, path, unknownField={"ignored": True}, envVars={})
        assert set(doc) == SANDBOX_KEYS, doc
        assert (doc["templateID"], doc["alias"], doc["envdVersion"], doc["domain"]) == \
            ("base", "Bash", "0.5.7", None)
        detail = call(server, "GET", f"/sandboxes/{doc['sandboxID']}", team_key).json()
        assert set(detail) == DETAIL_KEYS, detail
        assert detail["clientID"] == doc["clientID"]
        assert detail["state"] == "running" and detail["metadata"] == {}
        assert detail["memoryMB"] > 0 and detail["diskSizeMB"] > 0 and detail["cpuCount"] >= 1
        span = (when(detail["endAt"]) - when(detail["startedAt"])).total_seconds()
        assert abs(span - lifetime) < 1, (path, detail)
        assert call(server, "DELETE", f"/sandboxes/{doc['sandboxID']}", team_key).status == 204
        assert_error(call(server, "GET", f"/sandboxes/{doc['sandboxID']}", team_key), 404,
                     doc["sandboxID"])


def test_bad_creates(server, team_key):
    assert_error(call(server, "POST", "/v2/sandboxes", None, body={"templateID": "base"}), 401)
    assert_error(call(server, "POST", "/v2/sandboxes", "e2b_0000", body={"templateID": "base"}), 401)
    assert_error(call(server, "POST", "/v2/sandboxes", team_key, body={}), 400, "templateID")
    assert_error(call(server, "POST", "/v2/sandboxes", team_key, body={"templateID": "nope"}),
                 404, "template not found")
    for timeout in (0, 9, 86401, 1.5):
        assert_error(call(server, "POST", "/v2/sandboxes", team_key,
                          body={"templateID": "base", "timeout": timeout}), 400, "timeout")
    assert_error(call(server, "POST", "/v2/sandboxes", team_key,
                      body={"templateID": "base", "envVars": {"A": "1"}}), 400, "envVars")
    assert_error(call(server, "POST", "/v2/sandboxes", team_key,
                      body={"templateID": "base", "metadata": {"a": 1}}), 400)


def test_another_team_s_sandbox_is_not_found(server, team_key, other_team_key, sandbox):
    sid = sandbox["sandboxID"]
    assert_error(call(server, "GET", f"/sandboxes/{sid}", other_team_key), 404)
    assert_error(call(server, "DELETE", f"/sandboxes/{sid}", other_team_key), 404)
    assert_error(call(server, "POST", f"/sandboxes/{sid}/timeout", other_team_key,
                      body={"timeout": 1}), 404)
    for path in ("/sandboxes", "/v2/sandboxes"):
        listed = call(server, "GET", path, other_team_key)
        assert listed.status == 200 and sid not in {s["sandboxID"] for s in listed.json()}
    assert call(server, "GET", f"/sandboxes/{sid}", team_key).status == 200
    # The legacy `{sandboxID}-{clientID}` form of the ID names the same sandbox.
    legacy = f"/sandboxes/{sid}-{sandbox['clientID']}"
    assert call(server, "GET", legacy, team_key).json()["sandboxID"] == sid


def test_lists_filter_and_page(server, team_key):
    made = [create(server, team_key, metadata={"batch": "p", "i": str(i)}) for i in range(3)]
    ids = {m["sandboxID"] for m in made}
    try:
        v1 = call(server, "GET", "/sandboxes?metadata=batch%3Dp", team_key)
        assert v1.status == 200 and {s["sandboxID"] for s in v1.json()} == ids
        one = call(server, "GET", "/v2/sandboxes?metadata=batch%3Dp%26i%3D1", team_key).json()
        assert [s["sandboxID"] for s in one] == [made[1]["sandboxID"]]
        assert set(one[0]) == DETAIL_KEYS
        assert call(server, "GET", "/v2/sandboxes?state=paused", team_key).json() == []

        seen, token, pages = [], None, 0
        while True:
            query = "metadata=batch%3Dp&limit=1&order=asc" + (f"&nextToken={token}" if token else "")
            page = call(server, "GET", f"/v2/sandboxes?{query}", team_key)
            assert page.status == 200, page
            seen += [s["sandboxID"] for s in page.json()]
            pages += 1
            token = page.headers.get("x-next-token")
            if not token:
                break
        assert (seen, pages) == ([m["sandboxID"] for m in made], 3)

        for bad in ("state=frozen", "order=up", "limit=0", "limit=101", "nextToken=nope",
                    "startedAfter=2026-01-01T00:00:00Z"):
            assert_error(call(server, "GET", f"/v2/sandboxes?{bad}", team_key), 400)
    finally:
        for m in made:
            call(server, "DELETE", f"/sandboxes/{m['sandboxID']}", team_key)


def test_set_timeout_ends_the_sandbox(server, team_key):
    sid = create(server, team_key, timeout=120)["sandboxID"]
    assert_error(call(server, "POST", f"/sandboxes/{sid}/timeout", team_key, body={}), 400)
    assert call(server, "POST", f"/sandboxes/{sid}/timeout", team_key,
                body={"timeout": 2}).status == 204
    end = when(call(server, "GET", f"/sandboxes/{sid}", team_key).json()["endAt"])
    left = (end - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 0.5 < left <= 2.1, left
    wait_until(lambda: call(server, "GET", f"/sandboxes/{sid}", team_key).status == 404, 10, 0.2,
               "the sandbox to end at its timeout")
    assert_error(call(server, "POST", f"/sandboxes/{sid}/timeout", team_key,
                      body={"timeout": 5}), 404)


def test_a_restart_keeps_a_sandbox_s_end_and_metadata(new_server):
    srv = new_server(ttl="2s")
    key = srv.create_key("restarts")
    sid = create(srv, key, timeout=60, metadata={"keep": "me"})["sandboxID"]
    before = call(srv, "GET", f"/sandboxes/{sid}", key).json()
    srv.restart(graceful=True, same_port=True)
    after = call(srv, "GET", f"/sandboxes/{sid}", key).json()
    assert after["metadata"] == {"keep": "me"}
    assert after["startedAt"] == before["startedAt"]
    # Its end stays where the client put it (not one refresh TTL after the restart).
    assert abs((when(after["endAt"]) - when(before["endAt"])).total_seconds()) < 1
    time.sleep(3)
    assert call(srv, "GET", f"/sandboxes/{sid}", key).status == 200


def test_sandbox_traffic_is_routed_by_headers_and_hosts(server, team_key, sandbox):
    sid = sandbox["sandboxID"]

    def envd(path, headers=None, host=None):
        return http_request(server.port, "GET", path, headers=headers, host=host)

    ok = envd("/health", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})
    assert (ok.status, ok.body) == (204, b"")
    assert envd("/health", host=f"49983-{sid}.localhost:{server.port}").status == 204
    # The API's own /health is still the API's without them.
    assert envd("/health").status == 200

    assert_error(envd("/health", headers={"E2b-Sandbox-Id": sid}), 400, "E2b-Sandbox-Port")
    assert_error(envd("/health", headers={"E2b-Sandbox-Id": "BAD", "E2b-Sandbox-Port": "49983"}),
                 400, "invalid sandbox ID")

    for gone in ({"E2b-Sandbox-Id": "nosuchsandbox", "E2b-Sandbox-Port": "49983"},):
        resp = envd("/health", headers=gone)
        assert resp.status == 502 and resp.headers["content-type"] == "application/json"
        assert resp.json() == {"sandboxId": "nosuchsandbox", "message": "The sandbox was not found",
                               "code": 502}
    closed = envd("/", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "8123"})
    assert closed.status == 502
    assert closed.json() == {"sandboxId": sid, "message": "The sandbox is running but port is not open",
                             "code": 502}
