"""The REST API of a real `burrow serve`, spoken with plain HTTP (no SDK): status codes, exact
bodies, authentication, team separation, error shape, /health, /metrics, /openapi.json.

Contract: docs in /work/shared/spec/e2b-v0-wire.md §3 and /work/shared/design/DECISIONS.md.
"""

from __future__ import annotations

import re

import pytest

from burrow_harness import (
    ENV_PROGRAMS,
    ENVD_PORT,
    REPO,
    SESSION_KEYS,
    assert_error,
    assert_session_body,
    host_available_envs,
    missing_programs,
    sandbox_host,
    ws_upgrade,
)

BURROW_SERVER = {"ttl": "15s"}

# What the async SDK (aiohttp) sends on every request, bodiless ones included.
SDK_HEADERS = {"Accept": "application/json", "Content-Type": "application/json",
               "User-Agent": "OpenAPI-Generator/1.0.0/python"}


def test_health(server):
    r = server.request("GET", "/health")
    assert r.status == 200, r


# ---------------------------------------------------------------------------------------------
# POST /sessions
# ---------------------------------------------------------------------------------------------


def test_create_answers_exactly_201_with_the_four_keys(server, team_key):
    r = server.request("POST", "/sessions", body={"editEnabled": False, "codeSnippetID": "Bash"},
                       api_key=team_key, headers=SDK_HEADERS)
    assert r.status == 201, r
    assert "application/json" in r.headers.get("content-type", ""), r.headers
    doc = r.json()
    assert set(doc) == SESSION_KEYS
    assert_session_body(doc, "Bash")
    assert type(doc["editEnabled"]) is bool


def test_create_accepts_key_in_x_api_key_header(server, team_key):
    r = server.request("POST", "/sessions", body={"codeSnippetID": "Bash", "editEnabled": False},
                       api_key=team_key, key_in="header")
    assert r.status == 201, r
    assert_session_body(r.json(), "Bash")


def test_create_without_edit_enabled_defaults_to_false(server, team_key):
    r = server.request("POST", "/sessions", body={"codeSnippetID": "Bash"}, api_key=team_key)
    assert r.status == 201, r
    assert_session_body(r.json(), "Bash")


def test_session_ids_are_unique_and_client_id_is_stable(server, team_key):
    docs = [server.create_session(team_key) for _ in range(4)]
    ids = [d["sessionID"] for d in docs]
    assert len(set(ids)) == len(ids), ids
    assert len({d["clientID"] for d in docs}) == 1, docs
    # 96+ random bits in [a-z0-9] need at least 19 characters; the contract says >= 20.
    assert all(len(i) >= 20 for i in ids), ids


# A command that only works in the given environment, and what it prints.
ENV_PROBES = {
    "Go": ("go version", lambda out: len(out) == 1 and out[0].startswith("go version go")),
    "Rust": ("rustc --version && cargo --version",
             lambda out: len(out) == 2 and out[0].startswith("rustc ") and out[1].startswith("cargo ")),
    "PHP": ("php -r 'echo 6*7, PHP_EOL;'", lambda out: out == ["42"]),
    "DotNET": ("dotnet --version", lambda out: len(out) == 1 and out[0][:1].isdigit()),
    "Bash": ("echo bash-${BASH_VERSINFO[0]}", lambda out: out[0].startswith("bash-") and out[0][5:].isdigit()),
    "Python3": ("python3 -c 'print(6*7)'", lambda out: out == ["42"]),
    "Nodejs": ("node -e 'console.log(6*7)'", lambda out: out == ["42"]),
    "Java": ("java -version 2>&1 | head -n 1", lambda out: len(out) == 1 and "version" in out[0]),
    "Perl": ("perl -e 'print 6*7, qq(\\n)'", lambda out: out == ["42"]),
}


def test_the_environment_tables_cover_every_definition():
    defined = {p.stem for p in (REPO / "environments").glob("*.toml")}
    assert set(ENV_PROGRAMS) == defined, "burrow_harness.ENV_PROGRAMS must list every environments/*.toml"
    assert set(ENV_PROBES) == defined, "ENV_PROBES must have a probe for every environments/*.toml"


@pytest.mark.parametrize("env", sorted(ENV_PROGRAMS))
def test_builtin_environment_runs_exactly_when_the_host_has_its_programs(server, team_key, env):
    """Available (its programs are in the host's /usr): it starts and has its runtime. Otherwise:
    400 naming the environment and what the host lacks."""
    missing = missing_programs(env)
    r = server.request("POST", "/sessions", body={"codeSnippetID": env, "editEnabled": False},
                       api_key=team_key)
    if missing:
        assert_error(r, 400, env, *(f"`{p}`" for p in missing))
        return
    assert r.status == 201, f"{env} is available on this host (it has {ENV_PROGRAMS[env]}): {r!r}"
    doc = r.json()
    assert_session_body(doc, env)
    cmd, ok = ENV_PROBES[env]
    with server.envd(doc) as envd:
        out, err, code = envd.run(cmd, timeout=30)
    assert ok(out) and code == 0, f"{env}: {cmd!r} gave stdout={out} stderr={err} exit={code}"
    assert server.delete(doc["sessionID"], team_key).status == 204


@pytest.mark.parametrize("env", ["NoSuchEnvironment", "bash", "YI58BPyX5KrK"])
def test_unknown_environment_is_400_naming_it_and_the_available_ones(server, team_key, env):
    r = server.request("POST", "/sessions", body={"codeSnippetID": env, "editEnabled": False},
                       api_key=team_key)
    doc = assert_error(r, 400, env)
    listed = doc["message"].rsplit("available environments:", 1)[-1]
    assert {e.strip() for e in listed.split(",")} == set(host_available_envs()), \
        f"message should list exactly this host's available environments: {doc['message']!r}"


def test_create_without_key_is_401(server):
    r = server.request("POST", "/sessions", body={"codeSnippetID": "Bash", "editEnabled": False})
    assert_error(r, 401)


@pytest.mark.parametrize("key_in", ["query", "header"])
def test_create_with_invalid_key_is_401(server, key_in):
    r = server.request("POST", "/sessions", body={"codeSnippetID": "Bash", "editEnabled": False},
                       api_key="e2b_not_a_real_key_0123456789", key_in=key_in)
    assert_error(r, 401)


@pytest.mark.parametrize("raw", [
    pytest.param(b'{"codeSnippetID": "Bash", ', id="truncated-json"),
    pytest.param(b"not json at all", id="not-json"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'"Bash"', id="string"),
    pytest.param(b"{}", id="missing-codeSnippetID"),
    pytest.param(b'{"editEnabled": false}', id="only-editEnabled"),
    pytest.param(b'{"codeSnippetID": 42, "editEnabled": false}', id="codeSnippetID-number"),
    pytest.param(b'{"codeSnippetID": null, "editEnabled": false}', id="codeSnippetID-null"),
    pytest.param(b'{"codeSnippetID": ["Bash"]}', id="codeSnippetID-array"),
    pytest.param(b'{"codeSnippetID": "Bash", "editEnabled": "false"}', id="editEnabled-string"),
    pytest.param(b'{"codeSnippetID": "Bash", "editEnabled": 0}', id="editEnabled-number"),
])
def test_create_with_bad_body_is_400(server, team_key, raw):
    r = server.request("POST", "/sessions", raw=raw, api_key=team_key,
                       headers={"Content-Type": "application/json"})
    assert_error(r, 400)


def test_oversized_body_is_413(server, team_key):
    big = b'{"codeSnippetID": "Bash", "pad": "' + b"x" * (2 << 20) + b'"}'
    r = server.request("POST", "/sessions", raw=big, api_key=team_key,
                       headers={"Content-Type": "application/json"})
    assert_error(r, 413)


def test_oversized_chunked_body_is_413(server, team_key):
    big = b'{"codeSnippetID": "Bash", "pad": "' + b"x" * (2 << 20) + b'"}'
    r = server.request("POST", "/sessions", raw=big, api_key=team_key, chunked=True,
                       headers={"Content-Type": "application/json"})
    assert_error(r, 413)


def test_server_still_serves_after_oversized_body(server, team_key):
    big = b"x" * (2 << 20)
    server.request("POST", "/sessions", raw=big, api_key=team_key)
    server.create_session(team_key)


# ---------------------------------------------------------------------------------------------
# refresh
# ---------------------------------------------------------------------------------------------


def test_refresh_without_key_is_204_like_the_sdk_sends_it(server, team_key):
    sid = server.create_session(team_key)["sessionID"]
    # Exactly what the async SDK sends: no api_key, Content-Type json, Content-Length 0.
    r = server.request("POST", f"/sessions/{sid}/refresh", headers=SDK_HEADERS)
    assert r.status == 204, r
    assert r.body == b"", r
    # And what the sync (urllib3) SDK sends: no Content-Type at all.
    r = server.request("POST", f"/sessions/{sid}/refresh")
    assert r.status == 204, r


def test_refresh_with_owner_key_is_204(server, team_key):
    sid = server.create_session(team_key)["sessionID"]
    assert server.refresh(sid, team_key).status == 204


def test_refresh_with_another_teams_key_is_404_as_for_delete(server, team_key, other_team_key):
    sid = server.create_session(team_key)["sessionID"]
    unknown = server.refresh(sid, other_team_key)
    assert_error(unknown, 404)
    # The same answer as for a session that does not exist, so IDs cannot be probed.
    assert unknown.json()["message"] == server.refresh("a" * 20, other_team_key).json()["message"] \
        .replace("a" * 20, sid)
    assert server.refresh(sid).status == 204, "a rejected refresh must not harm the session"


def test_refresh_with_invalid_key_is_401(server, team_key):
    sid = server.create_session(team_key)["sessionID"]
    assert_error(server.refresh(sid, "e2b_bogus_key_for_refresh"), 401)


def test_refresh_of_unknown_session_is_404(server):
    assert_error(server.refresh("a" * 24), 404)
    assert_error(server.refresh("nonexistent"), 404)


# ---------------------------------------------------------------------------------------------
# GET /sessions, DELETE /sessions/{id}: teams
# ---------------------------------------------------------------------------------------------


def test_list_requires_a_valid_key(server):
    assert_error(server.request("GET", "/sessions"), 401)
    assert_error(server.request("GET", "/sessions", api_key="e2b_bogus"), 401)


def test_list_entries_have_exactly_the_four_keys(server, team_key):
    mine = server.create_session(team_key, "Python3")
    listed = server.list_sessions(team_key)
    assert listed, "GET /sessions is empty right after a create"
    for s in listed:
        assert set(s) == SESSION_KEYS, s
        assert isinstance(s["editEnabled"], bool) and isinstance(s["sessionID"], str), s
    entry = [s for s in listed if s["sessionID"] == mine["sessionID"]]
    assert entry == [mine], f"the listed entry should equal the created one: {entry} vs {mine}"


def test_teams_cannot_see_refresh_or_delete_each_others_sessions(server, team_key, other_team_key,
                                                                 admin_key):
    a = server.create_session(team_key)["sessionID"]
    b = server.create_session(other_team_key)["sessionID"]

    seen_by_a = server.session_ids(team_key)
    seen_by_b = server.session_ids(other_team_key)
    assert a in seen_by_a and b not in seen_by_a, seen_by_a
    assert b in seen_by_b and a not in seen_by_b, seen_by_b

    seen_by_admin = server.session_ids(admin_key)
    assert {a, b} <= seen_by_admin, seen_by_admin

    assert_error(server.refresh(a, other_team_key), 404)
    assert_error(server.refresh(b, team_key), 404)

    assert_error(server.delete(a, other_team_key), 404)
    assert_error(server.delete(b, team_key), 404)
    # Both survived the foreign deletes.
    assert a in server.session_ids(team_key)
    assert b in server.session_ids(other_team_key)
    assert server.refresh(a).status == 204 and server.refresh(b).status == 204


def test_delete_own_session(server, team_key):
    doc = server.create_session(team_key)
    sid = doc["sessionID"]
    host = sandbox_host(ENVD_PORT, sid, doc["clientID"])
    assert ws_upgrade(server.port, host).status == 101, "sandbox of a fresh session must answer"

    r = server.delete(sid, team_key)
    assert r.status == 204, r
    assert r.body == b""
    assert sid not in server.session_ids(team_key)
    assert_error(server.refresh(sid), 404)
    assert_error(server.delete(sid, team_key), 404)
    up = ws_upgrade(server.port, host)
    assert up.status != 101 and up.status >= 400, f"deleted session's sandbox still answers: {up.status}"


def test_delete_requires_a_valid_key(server, team_key):
    sid = server.create_session(team_key)["sessionID"]
    assert_error(server.request("DELETE", f"/sessions/{sid}"), 401)
    assert_error(server.delete(sid, "e2b_bogus"), 401)
    assert sid in server.session_ids(team_key)


def test_delete_unknown_session_is_404(server, team_key):
    assert_error(server.delete("z" * 24, team_key), 404)


# ---------------------------------------------------------------------------------------------
# Routing errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [
    ("PUT", "/sessions"),
    ("PATCH", "/sessions"),
    ("DELETE", "/sessions"),
    ("GET", "/sessions/{sid}/refresh"),
    ("PUT", "/sessions/{sid}/refresh"),
    ("POST", "/sessions/{sid}"),
    ("POST", "/health"),
])
def test_wrong_method_is_405(server, team_key, method, path):
    sid = server.create_session(team_key)["sessionID"]
    r = server.request(method, path.format(sid=sid), api_key=team_key,
                       body={} if method in ("PUT", "PATCH", "POST") else None)
    assert_error(r, 405)


@pytest.mark.parametrize("path", ["/nope", "/sessions/x/y/z", "/v1/sessions", "/sessionsx"])
def test_unknown_path_is_404(server, team_key, path):
    assert_error(server.request("GET", path, api_key=team_key), 404)


# ---------------------------------------------------------------------------------------------
# The sandbox hostname (gateway) on the same listener
# ---------------------------------------------------------------------------------------------


def test_sandbox_websocket_is_routed_by_host_header(server, team_key):
    doc = server.create_session(team_key)
    host = sandbox_host(ENVD_PORT, doc["sessionID"], doc["clientID"])
    assert ws_upgrade(server.port, host).status == 101
    # With an explicit :port, as JS clients send it on a non-default port.
    assert ws_upgrade(server.port, f"{host}:{server.port}").status == 101
    with server.envd(doc) as envd:
        out, err, code = envd.run("echo hello-from-$(id -un)")
        assert out == ["hello-from-user"], (out, err, code)


def test_unknown_session_hostname_is_not_upgraded(server, team_key):
    doc = server.create_session(team_key)
    for host in (sandbox_host(ENVD_PORT, "q" * 24, doc["clientID"]),
                 sandbox_host(ENVD_PORT, doc["sessionID"], "zzzzzzzz"),
                 f"{ENVD_PORT}-garbage.{'localhost'}"):
        up = ws_upgrade(server.port, host)
        assert up.status >= 400, f"Host {host} answered {up.status}"


def test_api_answers_on_plain_hosts(server):
    for host in ("127.0.0.1", f"127.0.0.1:{server.port}", "localhost"):
        assert server.request("GET", "/health", host=host).status == 200, host


# ---------------------------------------------------------------------------------------------
# /metrics, /openapi.json
# ---------------------------------------------------------------------------------------------


def _session_gauges(text: str) -> dict:
    gauges = [m.group(1) for m in re.finditer(r"^# TYPE (\S+) gauge\s*$", text, re.M)]
    out = {}
    for g in gauges:
        if "session" not in g:
            continue
        total = 0.0
        for m in re.finditer(rf"^{re.escape(g)}(?:\{{[^}}]*\}})?\s+(\S+)", text, re.M):
            total += float(m.group(1))
        out[g] = total
    return out


def test_metrics_has_a_sessions_gauge_that_counts(server, team_key):
    for _ in range(2):
        server.create_session(team_key)
    live = 2  # at least these two, created just now, are live (TTL 15 s)
    r = server.request("GET", "/metrics")
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/plain"), r.headers
    gauges = _session_gauges(r.text)
    assert gauges, f"no gauge with 'session' in its name:\n{r.text[:2000]}"
    assert any(v >= live for v in gauges.values()), (
        f"no sessions gauge reaches the {live} live sessions: {gauges}")


def test_openapi_document(server):
    r = server.request("GET", "/openapi.json")
    assert r.status == 200, r
    doc = r.json()
    assert str(doc.get("openapi", "")).startswith("3"), doc.get("openapi")
    paths = doc.get("paths", {})
    for p in ("/sessions", "/sessions/{sessionID}", "/sessions/{sessionID}/refresh"):
        assert p in paths, f"{p} missing from openapi paths: {sorted(paths)}"
    assert "post" in paths["/sessions"] and "get" in paths["/sessions"]
    assert "delete" in paths["/sessions/{sessionID}"]
    assert "post" in paths["/sessions/{sessionID}/refresh"]


def test_metrics_sessions_gauge_tracks_live_sessions_exactly(new_server):
    srv = new_server(ttl="30s")
    key = srv.create_key("metrics")

    def live() -> float:
        gauges = _session_gauges(srv.request("GET", "/metrics").text)
        assert gauges, "no sessions gauge"
        return max(gauges.values())

    assert live() == 0
    a = srv.create_session(key)["sessionID"]
    srv.create_session(key, "Python3")
    assert live() == 2
    assert srv.delete(a, key).status == 204
    assert live() == 1


# ---------------------------------------------------------------------------------------------
# editEnabled (DECISIONS #6: one shared edit session per team and environment)
# ---------------------------------------------------------------------------------------------


def test_edit_sessions_are_shared_per_team_and_environment(server, team_key, other_team_key):
    def create(key, env="Bash", edit=True):
        r = server.request("POST", "/sessions", body={"codeSnippetID": env, "editEnabled": edit},
                           api_key=key)
        assert r.status == 201, r
        doc = r.json()
        assert set(doc) == SESSION_KEYS and doc["editEnabled"] is edit and doc["codeSnippetID"] == env, doc
        return doc["sessionID"]

    first = create(team_key)
    assert create(team_key) == first, "a second edit create must return the same session"
    assert create(other_team_key) != first, "another team must not share the edit session"
    assert create(team_key, "Python3") != first, "another environment must not share it"
    assert create(team_key, edit=False) != first, "a normal session must not be the edit session"
