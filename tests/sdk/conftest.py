"""Fixtures of the SDK suite: the installed e2b release (one venv per release runs this suite), a
per-module burrow server the SDK is pointed at, and sessions that are closed after each test."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sdk_driver  # noqa: E402  (patches socket.getaddrinfo for *.localhost on import)

REFRESH_PERIOD = 1.0  # seconds between the SDK's own refreshes (default 5)


def pytest_report_header(config):
    api = "sync" if sdk_driver.IS_SYNC else "async"
    return [f"e2b SDK {sdk_driver.E2B_VERSION_STR} ({api} API)"]


@pytest.fixture(scope="session")
def driver() -> sdk_driver.Driver:
    return sdk_driver.Driver()


@pytest.fixture(scope="module", autouse=True)
def _sdk_points_at_module_server(server, driver):
    sdk_driver.point_at(server.url, server.port, refresh_period=REFRESH_PERIOD)
    yield


@pytest.fixture
def open_session(driver, team_key):
    """`open_session("Bash", on_scan_ports=..., cwd=..., env_vars=...)`; closed at teardown."""
    opened = []

    def _open(env: str = "Bash", api_key: str = None, **kw) -> sdk_driver.SdkSession:
        s = driver.open(env, api_key or team_key, **kw)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close_quietly()


@pytest.fixture
def heavy_lock():
    """Serialises the resource-hungry isolation tests (memory hog, fork bomb) across the SDK suites
    that scripts/test.sh runs in parallel, so their timing checks measure burrow's isolation rather
    than three bombs at once on a 2-core machine."""
    import fcntl
    import tempfile
    import time

    path = os.environ.get("BURROW_HEAVY_LOCK", os.path.join(tempfile.gettempdir(), "burrow-heavy-tests.lock"))
    with open(path, "a") as f:
        deadline = time.monotonic() + 150
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not take {path} within 150 s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# The SDK leaves non-daemon threads behind whenever a session did not close cleanly (0.9.x retries
# its first websocket connect forever). Once pytest has reported, leave without joining them.
_exit_status = {}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["value"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    lingering = [t for t in threading.enumerate()
                 if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if lingering and "value" in _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["value"])
