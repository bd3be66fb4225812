"""Persistent edit sessions (issue "Environments", DECISIONS #6): what an `editEnabled` session of a
custom environment changes in its filesystem becomes the environment's new version when it ends,
by DELETE or by expiry. Sessions created afterwards see it; sessions already running keep theirs;
another team cannot use it; an edit session of a built-in environment saves nothing."""

from __future__ import annotations

import time

from burrow_harness import assert_error, edit_session, new_env, wait_until

BURROW_SERVER = {"pool_size": 0}


def sh(server, session, cmd: str) -> list:
    with server.envd(session) as envd:
        out, err, exit_ = envd.run(cmd)
    assert exit_ == 0, (cmd, out, err, exit_)
    return out


def delete(server, key, session) -> None:
    r = server.delete(session["sessionID"], key)
    assert r.status == 204, r


def test_edits_become_the_next_version(server, team_key, other_team_key):
    env = new_env(server, team_key)
    before = server.create_session(team_key, env)

    edit = edit_session(server, team_key, env)
    # A second edit create joins the same session.
    assert edit_session(server, team_key, env)["sessionID"] == edit["sessionID"]
    sh(server, edit, "mkdir -p ~/project/src && echo 'print(42)' > ~/project/src/main.py"
                     " && echo keep > ~/keep.txt && echo drop > ~/drop.txt"
                     " && chmod 750 ~/project && ln -s project/src ~/src-link")
    with server.envd(edit) as envd:
        envd.call("filesystem_write", ["/home/user/written-over-rpc.txt", "from rpc\n"])
    delete(server, team_key, edit)

    after = server.create_session(team_key, env)
    assert sh(server, after, "cat ~/project/src/main.py ~/keep.txt ~/drop.txt ~/written-over-rpc.txt"
                             " ~/src-link/main.py") == [
        "print(42)", "keep", "drop", "from rpc", "print(42)"]
    # Owners and modes are kept (envd writes files 0755, as the original did).
    assert sh(server, after, "stat -c '%U %a' ~/project ~/keep.txt ~/written-over-rpc.txt") == [
        "user 750", "user 644", "user 755"]
    # The session that was running before the edit ended keeps its own filesystem.
    assert sh(server, before, "ls ~/project 2>&1 || echo absent")[-1] == "absent"

    # The next edit builds on the last: delete, change, rename.
    edit = edit_session(server, team_key, env)
    sh(server, edit, "rm ~/drop.txt && echo changed > ~/keep.txt && mv ~/project ~/renamed")
    delete(server, team_key, edit)
    latest = server.create_session(team_key, env)
    assert sh(server, latest, "cat ~/keep.txt ~/renamed/src/main.py; ls ~/drop.txt ~/project 2>&1"
                              " | sed 's/.*cannot access .\\(.*\\).: No such.*/missing \\1/'") == [
        "changed", "print(42)", "missing /home/user/drop.txt", "missing /home/user/project"]
    # The session of the previous version is unchanged.
    assert sh(server, after, "cat ~/keep.txt") == ["keep"]

    # Another team cannot start it, and its own template is untouched.
    r = server.request("POST", "/sessions", body={"codeSnippetID": env}, api_key=other_team_key)
    assert_error(r, 400, "unknown environment")
    plain = server.create_session(team_key, "Bash")
    assert sh(server, plain, "ls ~/keep.txt 2>&1 || echo absent")[-1] == "absent"

    metrics = server.request("GET", "/metrics").text
    assert "burrow_edit_saves_total 2" in metrics, metrics


def test_built_in_edit_sessions_save_nothing(server, team_key):
    edit = edit_session(server, team_key, "Bash")
    sh(server, edit, "echo mine > ~/builtin-edit.txt")
    delete(server, team_key, edit)
    fresh = server.create_session(team_key, "Bash")
    assert sh(server, fresh, "ls ~/builtin-edit.txt 2>&1 || echo absent")[-1] == "absent"


def test_changing_the_template_or_deleting_forgets_the_edits(server, team_key):
    env = new_env(server, team_key)
    edit = edit_session(server, team_key, env)
    sh(server, edit, "echo saved > ~/saved.txt")
    delete(server, team_key, edit)
    assert sh(server, server.create_session(team_key, env), "cat ~/saved.txt") == ["saved"]

    r = server.request("PATCH", f"/envs/{env}", body={"template": "Perl"}, api_key=team_key)
    assert r.status == 204, r
    fresh = server.create_session(team_key, env)
    assert sh(server, fresh, "ls ~/saved.txt 2>&1 || echo absent")[-1] == "absent"

    edit = edit_session(server, team_key, env)
    sh(server, edit, "echo again > ~/saved.txt")
    delete(server, team_key, edit)
    assert server.request("DELETE", f"/envs/{env}", api_key=team_key).status == 204
    # Recreated under the same ID, it starts from its template again.
    assert server.request("POST", f"/envs/{env}", body={"template": "Bash"},
                          api_key=team_key).status == 204
    fresh = server.create_session(team_key, env)
    assert sh(server, fresh, "ls ~/saved.txt 2>&1 || echo absent")[-1] == "absent"


def test_expiry_saves_too(new_server):
    server = new_server(ttl="3s", pool_size=0)
    key = server.create_key("expiring")
    env = new_env(server, key)
    edit = edit_session(server, key, env)
    sh(server, edit, "echo expired-but-kept > ~/kept.txt")
    started = time.monotonic()
    wait_until(lambda: edit["sessionID"] not in server.session_ids(key), timeout=20,
               what="the edit session to expire")
    assert time.monotonic() - started < 15
    # A create right after the expiry waits for the save and sees it.
    assert sh(server, server.create_session(key, env), "cat ~/kept.txt") == ["expired-but-kept"]


def test_an_edit_session_survives_a_restart_and_still_saves(new_server):
    server = new_server(pool_size=0)
    key = server.create_key("restarting")
    env = new_env(server, key)
    edit = edit_session(server, key, env)
    sh(server, edit, "echo across-restart > ~/restart.txt")
    server.restart(graceful=False, same_port=True)
    assert edit["sessionID"] in server.session_ids(key)
    delete(server, key, edit)
    assert sh(server, server.create_session(key, env), "cat ~/restart.txt") == ["across-restart"]
