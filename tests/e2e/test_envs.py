"""The /envs API: a team's custom environments (spec §3.6; semantics in the README's API section).
A custom environment's ID is a codeSnippetID for its own team only."""

from __future__ import annotations

from burrow_harness import assert_error

BURROW_SERVER = {"pool_size": 0}


def envs(server, key, method="GET", path="/envs", body=None):
    return server.request(method, path, body=body, api_key=key)


def test_custom_environment_round_trip(server, team_key, other_team_key):
    r = envs(server, team_key, "POST", body={"template": "Python3", "title": "Data science"})
    assert r.status == 200, r
    env = r.json()
    assert set(env) == {"id", "template", "title"}
    assert (env["template"], env["title"]) == ("Python3", "Data science")
    assert env in envs(server, team_key).json()

    session = server.create_session(team_key, env["id"])
    assert session["codeSnippetID"] == env["id"]
    with server.envd(session) as envd:
        assert envd.run("python3 -c 'print(6*7)'")[0] == ["42"]

    # Another team can neither see nor use nor change it.
    assert envs(server, other_team_key).json() == []
    r = server.request("POST", "/sessions", body={"codeSnippetID": env["id"]}, api_key=other_team_key)
    assert_error(r, 400, "unknown environment")
    assert_error(envs(server, other_team_key, "DELETE", f"/envs/{env['id']}"), 404)
    assert_error(envs(server, other_team_key, "PATCH", f"/envs/{env['id']}", {"title": "x"}), 404)

    assert envs(server, team_key, "PUT", f"/envs/{env['id']}/title", {"title": "Renamed"}).status == 204
    assert envs(server, team_key, "PATCH", f"/envs/{env['id']}", {"template": "Bash"}).status == 204
    [now] = [e for e in envs(server, team_key).json() if e["id"] == env["id"]]
    assert now == {"id": env["id"], "template": "Bash", "title": "Renamed"}

    assert envs(server, team_key, "DELETE", f"/envs/{env['id']}").status == 204
    assert_error(envs(server, team_key, "DELETE", f"/envs/{env['id']}"), 404)
    r = server.request("POST", "/sessions", body={"codeSnippetID": env["id"]}, api_key=team_key)
    assert_error(r, 400, env["id"])
    # A session already running from it keeps running.
    with server.envd(session) as envd:
        assert envd.run("echo alive")[0] == ["alive"]


def test_caller_chosen_ids_and_their_rules(server, team_key, other_team_key):
    assert envs(server, team_key, "POST", "/envs/my-env_1", {"template": "Bash"}).status == 204
    [env] = [e for e in envs(server, team_key).json() if e["id"] == "my-env_1"]
    assert env == {"id": "my-env_1", "template": "Bash", "title": "Bash"}
    # Replacing one's own is fine; taking another team's ID or a built-in name is a conflict.
    assert envs(server, team_key, "POST", "/envs/my-env_1", {"template": "Perl"}).status == 204
    assert_error(envs(server, other_team_key, "POST", "/envs/my-env_1", {"template": "Bash"}), 409)
    assert_error(envs(server, team_key, "POST", "/envs/Python3", {"template": "Bash"}), 409)
    assert_error(envs(server, team_key, "POST", "/envs/bad.id", {"template": "Bash"}), 400)
    assert_error(envs(server, team_key, "POST", "/envs", {"template": "Cobol"}), 400, "Cobol")
    assert_error(envs(server, team_key, "POST", "/envs", {"title": "no template"}), 400)
    assert_error(envs(server, None, "GET"), 401)


def test_only_done_environments_start_sessions(server, team_key):
    env = envs(server, team_key, "POST", body={"template": "Bash"}).json()
    state = f"/envs/{env['id']}/state"
    assert envs(server, team_key, "PUT", state, {"state": "Building"}).status == 204
    r = server.request("POST", "/sessions", body={"codeSnippetID": env["id"]}, api_key=team_key)
    assert_error(r, 400, "Building")
    assert_error(envs(server, team_key, "PUT", state, {"state": "Sleeping"}), 400, "Done")
    assert envs(server, team_key, "PUT", state, {"state": "Done"}).status == 204
    server.create_session(team_key, env["id"])
