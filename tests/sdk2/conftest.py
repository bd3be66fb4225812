"""Fixtures of the e2b 2.x suite: the real, unmodified SDK (.venv/e2b-2) pointed at a burrow
server in E2B's `E2B_SANDBOX_URL` mode (wire spec §2.3 mode A): the control plane at
E2B_API_URL and every sandbox request at E2B_SANDBOX_URL, both the server's own address, the
sandbox named by the `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers the SDK sends."""

from __future__ import annotations

import os

import pytest

from burrow_harness import BurrowServer


def pytest_report_header(config):
    import importlib.metadata as m

    return [f"e2b SDK {m.version('e2b')} (E2B_SANDBOX_URL mode)"]


def point_sdk_at(server: BurrowServer, key: str) -> None:
    """Sets the variables the SDK reads at each call (ConnectionConfig) to `server` and `key`."""
    os.environ["E2B_API_KEY"] = key
    os.environ["E2B_API_URL"] = server.url
    os.environ["E2B_SANDBOX_URL"] = server.url
    # A failed call must fail the test, not be retried for long.
    os.environ["E2B_CONNECTION_RETRIES"] = "0"
    os.environ.pop("E2B_DEBUG", None)
    os.environ.pop("E2B_DOMAIN", None)


@pytest.fixture(scope="module", autouse=True)
def _sdk_points_at_module_server(server, team_key):
    point_sdk_at(server, team_key)
    yield


@pytest.fixture
def sandboxes():
    """`sandboxes(Sandbox.create(...))` registers a sandbox to kill at teardown."""
    made = []

    def _keep(sbx):
        made.append(sbx)
        return sbx

    yield _keep
    for sbx in made:
        try:
            sbx.kill()
        except Exception:  # noqa: BLE001 - it may be gone already, which is the point of some tests
            pass
