"""Paths only root may write, through the real, unmodified e2b SDK: `run_code` (e2b >= 0.5.0)
writes `/index.js`, `/index.py` or `/main.sh` and runs it; a session `cwd` is made with makeDir
when the session opens (e2b >= 0.5.0). envd does these as root, on paths without symlinks, and
gives what it made to `user` (DECISIONS #9), whose processes then run and own them.

Where this venv's SDK lacks a feature, that test is skipped, and the reason says which release
added it.
"""

from __future__ import annotations

import importlib

import pytest

import sdk_driver
from sdk_driver import HAS_SESSION_OPTIONS

BURROW_SERVER = {"ttl": "15s"}

HAS_RUN_CODE = sdk_driver.E2B_VERSION >= (0, 5, 0)
NO_RUN_CODE = f"e2b {sdk_driver.E2B_VERSION_STR} has no run_code (added in 0.5.0)"
NO_SESSION_CWD = f"e2b {sdk_driver.E2B_VERSION_STR} has no session cwd (added in 0.5.0)"


def test_sdk_writes_and_runs_files_in_root_directory(open_session):
    """run_code's own steps, which every release can express: filesystem.write to `/`, then a
    process running it."""
    s = open_session("Python3")
    s.write("/index.py", "import os\nprint(os.stat('/index.py').st_uid == os.getuid())\n")
    s.write("/main.sh", "stat -c '%U:%G %a' /main.sh; id -un\n")
    assert s.run("python3 /index.py").stdout == "True"
    assert s.run("bash /main.sh").stdout == "user:user 755\nuser"
    # Written again, and removed, by the client: what the SDK leaves behind it can clean up.
    s.write("/index.py", "print('again')\n")
    assert s.run("python3 /index.py").stdout == "again"
    s.remove("/index.py")
    assert s.run("test -e /index.py || echo gone").stdout == "gone"


@pytest.mark.skipif(not HAS_RUN_CODE, reason=NO_RUN_CODE)
@pytest.mark.parametrize("runtime,code,expected", [
    ("Python3", "import os\nst = os.stat('/index.py')\nprint(st.st_uid == os.getuid(), 6 * 7)",
     "True 42"),
    ("Bash", "stat -c '%U:%G' /main.sh; id -un", "user:user\nuser"),
    ("Node16", "const fs = require('fs');\n"
               "console.log(fs.statSync('/index.js').uid === process.getuid(), 6 * 7);",
     "true 42"),
])
def test_run_code(driver, team_key, monkeypatch, runtime, code, expected):
    """`e2b.run_code` itself. It opens its session with the SDK's defaults, which dial
    `wss://`/`https://`; the one change is the SDK's own `_debug_dev_env="local"` (plain
    `ws://`/`http://`), as every session of this suite is opened, so that it reaches the local
    server. The write, the process and the close are run_code's."""
    module = importlib.import_module("e2b.session.run_code")

    class LocalSession(module.Session):
        def __init__(self, *args, **kwargs):
            if kwargs.get("_debug_dev_env") is None:
                kwargs["_debug_dev_env"] = "local"
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(module, "Session", LocalSession)
    # Async releases return a coroutine, which the driver runs on the SDK's loop.
    stdout, stderr = driver.call(lambda: module.run_code(runtime, code, api_key=team_key), 60,
                                 f"run_code({runtime!r})")
    assert (stdout, stderr) == (expected, ""), (stdout, stderr)


@pytest.mark.skipif(not HAS_SESSION_OPTIONS, reason=NO_SESSION_CWD)
def test_session_cwd_in_root_directory_is_made_at_open(open_session):
    s = open_session("Bash", cwd="/opt/app/src")
    out = s.run("pwd; stat -c '%U:%G' /opt/app /opt/app/src /opt; touch mine && echo wrote")
    assert out.stdout == "/opt/app/src\nuser:user\nuser:user\nroot:root\nwrote", out
