"""Fixtures shared by tests/e2e and tests/sdk: real `burrow serve` processes, one per test module
(or per test when a test needs its own configuration), each on a free port with its own data dir.

A module configures its default server with a module-level dict, e.g.

    BURROW_SERVER = {"ttl": "2s"}

(keys: ttl, pool_size, auth, extra_args — see burrow_harness.BurrowServer).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from burrow_harness import BurrowServer, burrow_bin  # noqa: E402

# Sandbox hostnames (*.localhost) are resolved by the tests themselves; never send them, or the
# loopback API, through a proxy the CI machine might configure.
for _var in ("NO_PROXY", "no_proxy"):
    _have = os.environ.get(_var, "")
    os.environ[_var] = ",".join(x for x in (_have, "127.0.0.1,localhost,.localhost") if x)


def pytest_report_header(config):
    b = burrow_bin()
    state = "present" if b.exists() else "MISSING"
    return [f"burrow binary: {b} ({state})"]


class _Servers:
    """Starts servers on demand and, at teardown, stops each with SIGTERM (asserting a prompt,
    clean exit) and kills anything it left behind."""

    def __init__(self, tmp_path_factory, log_dir: Path):
        self._tmp = tmp_path_factory
        self._log_dir = log_dir
        self.servers: list = []

    def __call__(self, **kw) -> BurrowServer:
        data_dir = self._tmp.mktemp("burrow-data")
        s = BurrowServer(data_dir, log_dir=self._log_dir, **kw)
        self.servers.append(s)
        s.start()
        return s

    def teardown(self) -> None:
        errors = []
        for s in self.servers:
            try:
                if s.running:
                    s.stop()
            except AssertionError as e:
                errors.append(str(e))
            finally:
                leftovers = s.cleanup()
                if leftovers:
                    sys.stderr.write(f"\n[harness] killed {len(leftovers)} leftover process(es) of "
                                     f"{s.data_dir}: {leftovers[:5]}\n")
        if errors:
            pytest.fail("server shutdown check failed:\n" + "\n\n".join(errors), pytrace=False)


@pytest.fixture(scope="session")
def server_log_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("BURROW_TEST_LOG_DIR") or tmp_path_factory.mktemp("server-logs"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory, server_log_dir):
    servers = _Servers(tmp_path_factory, server_log_dir)
    yield servers
    servers.teardown()


@pytest.fixture
def new_server(tmp_path_factory, server_log_dir):
    """Factory for servers private to one test: `srv = new_server(ttl="2s")`."""
    servers = _Servers(tmp_path_factory, server_log_dir)
    yield servers
    servers.teardown()


@pytest.fixture(scope="module")
def server(module_servers, request) -> BurrowServer:
    """The module's server, configured by the module's BURROW_SERVER dict."""
    return module_servers(**getattr(request.module, "BURROW_SERVER", {}))


@pytest.fixture(scope="module")
def admin_key(server) -> str:
    assert server.admin_key, "the first start did not print 'admin key: <KEY>'"
    return server.admin_key


@pytest.fixture(scope="module")
def team_key(server) -> str:
    return server.create_key("team-a")


@pytest.fixture(scope="module")
def other_team_key(server) -> str:
    return server.create_key("team-b")
