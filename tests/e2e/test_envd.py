"""envd's JSON-RPC over the gateway, spoken directly (no SDK) where the SDK cannot show a property:
JSON-RPC error codes, per-sandbox subscriptions shared by two connections (DECISIONS #13), and long
output lines split instead of dropped (DECISIONS #12)."""

from __future__ import annotations

import secrets

import pytest

from burrow_harness import RpcError

BURROW_SERVER = {"ttl": "15s"}


def test_rpc_errors_have_code_and_message(server, team_key):
    doc = server.create_session(team_key)
    with server.envd(doc) as envd:
        with pytest.raises(RpcError) as e:
            envd.call("process_noSuchMethod", [])
        assert e.value.error["code"] == -32601, e.value.error
        with pytest.raises(RpcError) as e:
            envd.call("filesystem_read", ["/no/such/file"])
        assert isinstance(e.value.error.get("code"), int) and e.value.error.get("message"), e.value.error
        with pytest.raises(RpcError):
            envd.call("filesystem_unsubscribe", ["0xdeadbeef"])
        # The connection is still healthy after errors.
        assert envd.call("filesystem_list", ["/home"]) == [{"isDir": True, "name": "user"}]


def test_subscriptions_are_per_sandbox_not_per_connection(server, team_key):
    doc = server.create_session(team_key)
    pid = "shared" + secrets.token_hex(4)
    with server.envd(doc) as a, server.envd(doc) as b:
        sub_a = a.call("process_subscribe", ["onStdout", pid])
        sub_b = b.call("process_subscribe", ["onStdout", pid])
        exit_b = b.call("process_subscribe", ["onExit", pid])
        assert isinstance(sub_a, str) and isinstance(sub_b, str) and sub_a != exit_b
        b.call("process_start", [pid, "echo to-both", {}, ""])
        assert b.wait_notification(sub_b)["line"] == "to-both"
        assert b.wait_notification(exit_b) == 0
        assert a.wait_notification(sub_a)["line"] == "to-both", \
            "a second connection subscribed to the same process got nothing"


def test_long_output_lines_are_split_not_dropped(server, team_key):
    doc = server.create_session(team_key)
    n = 3_000_000
    with server.envd(doc) as envd:
        out, err, code = envd.run(f"head -c {n} /dev/zero | tr '\\0' x; echo; echo after", timeout=60)
    assert code == 0, (err, code)
    assert out[-1] == "after", out[-1][:100]
    body = out[:-1]
    assert all(len(line) <= 1 << 20 for line in body), [len(x) for x in body]
    assert "".join(body) == "x" * n, f"{sum(map(len, body))} of {n} bytes arrived"


def test_processes_survive_a_dropped_websocket_and_a_new_one_drives_them(server, team_key):
    doc = server.create_session(team_key)
    pid = "survivor" + secrets.token_hex(4)
    first = server.envd(doc)
    first.call("process_start", [pid, "read line; echo got:$line", {}, ""])
    first.close()  # the client goes away without a word, as a crashed SDK would
    with server.envd(doc) as again:
        out = again.call("process_subscribe", ["onStdout", pid])
        done = again.call("process_subscribe", ["onExit", pid])
        again.call("process_stdin", [pid, "hello\n"])
        assert again.wait_notification(out)["line"] == "got:hello"
        assert again.wait_notification(done) == 0
        # The session itself is untouched by the drop.
        assert again.run("echo still-here")[0] == ["still-here"]
