"""The `burrow` CLI against a running server: `keys create/list/revoke` (work while the server
runs) and `session create/ls/rm` (a client of the public API), plus `serve --auth off`."""

from __future__ import annotations

import re

from burrow_harness import BUILTIN_ENVS, SESSION_ID_RE, assert_error

BURROW_SERVER = {"ttl": "15s"}


def _ids_in(text: str) -> set:
    return set(re.findall(r"\b[a-z0-9]{20,}\b", text))


def test_admin_key_printed_once_on_first_start(server, admin_key):
    lines = [ln for ln in server.stdout_lines if ln.startswith("admin key:")]
    assert len(lines) == 1, server.stdout_lines
    assert server.request("GET", "/sessions", api_key=admin_key).status == 200


def test_keys_create_list_and_keys_are_stored_hashed(server):
    key = server.create_key("cli-team")
    assert len(key) >= 20 and " " not in key, f"implausible key {key!r}"
    doc = server.create_session(key)
    assert doc["sessionID"] in server.session_ids(key)

    listing = server.cli("keys", "list", "--data-dir", str(server.data_dir)).stdout
    assert "cli-team" in listing, listing
    assert key not in listing, "keys list shows a full secret key"
    # Keys are stored hashed: the secret appears in no file of the data dir.
    for f in server.data_dir.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f"plaintext key found in {f}"


def test_keys_create_admin_sees_every_team(server, team_key):
    sid = server.create_session(team_key)["sessionID"]
    admin2 = server.create_key("ops", admin=True)
    assert sid in server.session_ids(admin2)
    plain = server.create_key("plain")
    assert sid not in server.session_ids(plain)


def test_keys_revoke_makes_the_key_401_while_the_server_runs(server):
    key = server.create_key("to-revoke")
    keep = server.create_key("to-keep")
    server.create_session(key)
    server.cli("keys", "revoke", key, "--data-dir", str(server.data_dir))
    r = server.request("POST", "/sessions", body={"codeSnippetID": "Bash", "editEnabled": False},
                       api_key=key)
    assert_error(r, 401)
    assert_error(server.request("GET", "/sessions", api_key=key), 401)
    server.create_session(keep)


def test_session_create_ls_rm_round_trip(server):
    key = server.create_key("cli-sessions")
    before = server.session_ids(key)
    created = server.cli("session", "create", "Bash", "--url", server.url, "--api-key", key)
    new = server.session_ids(key) - before
    assert len(new) == 1, f"session create made {len(new)} sessions: {created.stdout}"
    sid = new.pop()
    assert sid in created.stdout, f"session create should print the new session ID:\n{created.stdout}"

    # ls through the environment variables instead of flags.
    ls = server.cli("session", "ls", env={"BURROW_URL": server.url, "BURROW_API_KEY": key})
    assert sid in ls.stdout, ls.stdout

    server.cli("session", "rm", sid, "--url", server.url, "--api-key", key)
    assert sid not in server.session_ids(key)
    assert_error(server.refresh(sid), 404)
    ls = server.cli("session", "ls", "--url", server.url, "--api-key", key)
    assert sid not in _ids_in(ls.stdout), ls.stdout


def test_session_cli_errors_are_reported(server):
    key = server.create_key("cli-errors")
    p = server.cli("session", "create", "NoSuchEnvironment", "--url", server.url, "--api-key", key,
                   check=False)
    assert p.returncode != 0
    assert "NoSuchEnvironment" in p.stdout + p.stderr, (p.stdout, p.stderr)
    p = server.cli("session", "ls", "--url", server.url, "--api-key", "e2b_bogus", check=False)
    assert p.returncode != 0
    p = server.cli("session", "rm", "x" * 24, "--url", server.url, "--api-key", key, check=False)
    assert p.returncode != 0


def test_auth_off_accepts_keyless_creates_and_says_so(new_server):
    srv = new_server(auth=False)
    r = srv.request("POST", "/sessions", body={"codeSnippetID": "Bash", "editEnabled": False})
    assert r.status == 201, r
    assert SESSION_ID_RE.match(r.json()["sessionID"])
    log = srv.log_path.read_text(errors="replace")
    assert re.search(r"auth", log, re.I), f"--auth off should be announced loudly:\n{log[-2000:]}"


def test_cli_session_create_uses_the_given_environment(server):
    key = server.create_key("cli-envs")
    for env in BUILTIN_ENVS[:2]:
        before = server.session_ids(key)
        server.cli("session", "create", env, "--url", server.url, "--api-key", key)
        new = server.session_ids(key) - before
        assert len(new) == 1
        doc = [s for s in server.list_sessions(key) if s["sessionID"] in new][0]
        assert doc["codeSnippetID"] == env, doc
