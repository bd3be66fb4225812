"""The real e2b 2.x SDK against burrow: create, commands (foreground, failing, background, kill),
timeouts, info, list and kill, exactly as a user calls them."""

from __future__ import annotations

import datetime
import time

import pytest
from e2b import CommandExitException, Sandbox, SandboxQuery
from e2b.exceptions import SandboxException

from burrow_harness import wait_until
from conftest import point_sdk_at


def test_create_run_and_kill(sandboxes):
    sbx = sandboxes(Sandbox.create())
    assert sbx.is_running()

    result = sbx.commands.run("echo hi")
    assert (result.stdout, result.stderr, result.exit_code) == ("hi\n", "", 0)

    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo oops >&2; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stderr == "oops\n"

    # Commands run as the sandbox user in its home, with a login shell's environment.
    who = sbx.commands.run("whoami; pwd; echo $HOME").stdout.split()
    assert who == ["user", "/home/user", "/home/user"]

    assert sbx.kill() is True
    assert not sbx.is_running()
    with pytest.raises(SandboxException):
        sbx.commands.run("echo after kill")
    # A second kill finds nothing: the SDK reports False, not an error.
    assert Sandbox.kill(sbx.sandbox_id) is False


def test_background_command_and_kill(sandboxes):
    sbx = sandboxes(Sandbox.create())
    handle = sbx.commands.run("echo started; sleep 300", background=True)
    assert handle.pid > 0
    wait_until(lambda: any(p.pid == handle.pid for p in sbx.commands.list()), 10, 0.1,
               "the background command to be listed")
    assert handle.kill() is True
    with pytest.raises(CommandExitException) as ended:
        handle.wait()
    assert ended.value.exit_code != 0
    assert "started" in ended.value.stdout
    assert not any(p.pid == handle.pid for p in sbx.commands.list())
    # Killing a process that is gone: False, as E2B's envd answers not_found.
    assert sbx.commands.kill(handle.pid) is False


def test_info_metadata_and_set_timeout(sandboxes):
    sbx = sandboxes(Sandbox.create(timeout=120, metadata={"suite": "sdk2", "who": "ana"}))
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base"
    assert info.metadata == {"suite": "sdk2", "who": "ana"}
    assert info.state.value == "running"
    lifetime = (info.end_at - info.started_at).total_seconds()
    assert 119 <= lifetime <= 121, (info.started_at, info.end_at)

    sbx.set_timeout(3)
    end_at = Sandbox.get_info(sbx.sandbox_id).end_at
    now = datetime.datetime.now(datetime.timezone.utc)
    assert 1 <= (end_at - now).total_seconds() <= 3.5, (now, end_at)
    wait_until(lambda: not sbx.is_running(), 10, 0.25, "the sandbox to end at its new timeout")
    assert sbx.sandbox_id not in {s.sandbox_id for s in Sandbox.list().next_items()}


def test_list_filters_by_metadata_and_team(server, other_team_key, team_key, sandboxes):
    mine = sandboxes(Sandbox.create(metadata={"run": "one"}))
    other = sandboxes(Sandbox.create(metadata={"run": "two"}))
    listed = {s.sandbox_id: s for s in Sandbox.list().next_items()}
    assert {mine.sandbox_id, other.sandbox_id} <= set(listed)
    assert listed[mine.sandbox_id].metadata == {"run": "one"}

    only = Sandbox.list(query=SandboxQuery(metadata={"run": "one"})).next_items()
    assert [s.sandbox_id for s in only] == [mine.sandbox_id]

    # Another team sees none of them, and cannot reach them through the API.
    point_sdk_at(server, other_team_key)
    try:
        assert Sandbox.list().next_items() == []
        assert Sandbox.kill(mine.sandbox_id) is False
    finally:
        point_sdk_at(server, team_key)
    assert mine.is_running()


def test_a_long_command_outlives_the_gateway_s_deadlines(server, team_key, new_server, sandboxes):
    """A foreground command streams its output for longer than envd's answer deadline and the
    body idle timeout: neither may cut a Connect stream."""
    srv = new_server(extra_args=["--envd-timeout", "1s", "--body-idle-timeout", "1s"])
    point_sdk_at(srv, srv.create_key("slow"))
    try:
        sbx = sandboxes(Sandbox.create())
        started = time.monotonic()
        result = sbx.commands.run("sleep 2.5; echo done", timeout=30)
        assert result.stdout == "done\n"
        assert time.monotonic() - started >= 2.5
        assert sbx.kill() is True
    finally:
        point_sdk_at(server, team_key)
