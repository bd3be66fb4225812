"""Drive the real `burrow` binary from the outside: start/stop/restart/kill it, call its REST API,
its CLI, and a sandbox's envd websocket through the gateway (Host-header routing).

Standard library only, so every test venv (including e2b 0.3.0's) can import it.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "localhost"
ENVD_PORT = 49982
SESSION_KEYS = {"codeSnippetID", "editEnabled", "sessionID", "clientID"}
SESSION_ID_RE = re.compile(r"^[a-z0-9]{20,}$")
CLIENT_ID_RE = re.compile(r"^[a-z0-9]{8}$")
BUILTIN_ENVS = ("Bash", "Python3", "Nodejs", "Java", "Perl")
# The programs each built-in environment needs on the host to run from it (without a built image),
# as crates/environments (BUILTINS) defines them; every environment runs commands through bash.
ENV_PROGRAMS = {
    "Bash": ("bash",),
    "Python3": ("python3",),
    "Nodejs": ("node",),
    "Java": ("java",),
    "Go": ("go",),
    "Rust": ("rustc", "cargo"),
    "PHP": ("php",),
    "Perl": ("perl",),
    "DotNET": ("dotnet",),
}
# Where burrow looks for them (crates/environments, PROGRAM_DIRS); sandboxes see only the host's
# /usr, so a program counts only if its real path is under /usr.
HOST_PROGRAM_DIRS = ("/usr/bin", "/usr/local/bin", "/usr/sbin")
# How long the server lets a connection take to send a request head (or sit idle between
# requests) before it hangs up: burrow_api::HEADER_TIMEOUT.
HEADER_TIMEOUT_S = 30


def burrow_bin() -> Path:
    return Path(os.environ.get("BURROW_BIN", str(REPO / "target" / "debug" / "burrow")))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> Any:
    """Polls `predicate` until it returns something truthy; returns that value or raises."""
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - remembered and reported below
            last_exc = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def missing_programs(env: str) -> list:
    """The programs the built-in environment `env` needs that this host does not have where a
    sandbox can see them (empty: the environment is available)."""
    needed = ("bash",) + tuple(p for p in ENV_PROGRAMS[env] if p != "bash")
    missing = []
    for program in needed:
        found = shutil.which(program, path=os.pathsep.join(HOST_PROGRAM_DIRS))
        if not (found and os.path.realpath(found).startswith("/usr/")):
            missing.append(program)
    return missing


def host_available_envs() -> tuple:
    """The built-in environments this host can run (a fresh data dir has no images)."""
    return tuple(env for env in ENV_PROGRAMS if not missing_programs(env))


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict  # lower-cased names
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise AssertionError(
                f"response body is not JSON (status {self.status}, "
                f"content-type {self.headers.get('content-type')!r}): {self.body[:300]!r}"
            ) from e

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


def http_request(port: int, method: str, path: str, *, body: Any = None, raw: Optional[bytes] = None,
                 headers: Optional[dict] = None, api_key: Optional[str] = None,
                 key_in: str = "query", host: Optional[str] = None, timeout: float = 15.0,
                 chunked: bool = False) -> Response:
    """One request on a fresh connection to 127.0.0.1:port.

    `body` is JSON-encoded; `raw` is sent as is. `api_key` goes into the `api_key` query parameter
    (key_in="query", as the SDK does) or the `X-API-Key` header (key_in="header").
    """
    hdrs = {"Accept": "application/json"}
    if host:
        hdrs["Host"] = host
    if api_key is not None:
        if key_in == "query":
            sep = "&" if "?" in path else "?"
            path = f"{path}{sep}api_key={urllib.parse.quote(api_key)}"
        else:
            hdrs["X-API-Key"] = api_key
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    if headers:
        hdrs.update(headers)

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host="Host" in hdrs, skip_accept_encoding=True)
        for k, v in hdrs.items():
            conn.putheader(k, v)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif data is not None:
            conn.putheader("Content-Length", str(len(data)))
        elif method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", "0")
        conn.endheaders()
        send_error: Optional[BaseException] = None
        if data is not None:
            try:
                if chunked:
                    step = 64 * 1024
                    for i in range(0, len(data), step):
                        piece = data[i:i + step]
                        conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    conn.send(b"0\r\n\r\n")
                else:
                    conn.send(data)
            except (BrokenPipeError, ConnectionResetError) as e:
                # A server may answer (e.g. 413) and close before reading the whole body;
                # the answer can still be read.
                send_error = e
        try:
            resp = conn.getresponse()
            payload = resp.read()
        except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError) as e:
            raise AssertionError(
                f"{method} {path}: connection dropped without an HTTP answer "
                f"(send error: {send_error!r}, read error: {e!r})") from e
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
    finally:
        conn.close()


def assert_error(resp: Response, status: int, *needles: str) -> dict:
    """Every burrow error: the given status and a JSON body {"code": status, "message": str}."""
    assert resp.status == status, f"expected {status}, got {resp!r}"
    ctype = resp.headers.get("content-type", "")
    assert "application/json" in ctype, f"error {status} has content-type {ctype!r}: {resp!r}"
    doc = resp.json()
    assert isinstance(doc, dict) and set(doc) == {"code", "message"}, \
        f"error body must be exactly {{code, message}}: {doc!r}"
    assert doc["code"] == status and type(doc["code"]) is int, f"code != {status}: {doc!r}"
    assert isinstance(doc["message"], str) and doc["message"].strip(), f"empty message: {doc!r}"
    for n in needles:
        assert n in doc["message"], f"message should mention {n!r}: {doc['message']!r}"
    return doc


def assert_session_body(doc: Any, env: str) -> None:
    assert isinstance(doc, dict), doc
    assert set(doc) == SESSION_KEYS, f"session must have exactly {sorted(SESSION_KEYS)}: {doc!r}"
    assert doc["codeSnippetID"] == env, doc
    assert doc["editEnabled"] is False, doc
    assert isinstance(doc["sessionID"], str) and SESSION_ID_RE.match(doc["sessionID"]), doc
    assert isinstance(doc["clientID"], str) and CLIENT_ID_RE.match(doc["clientID"]), doc


def sandbox_host(port: int, session_id: str, client_id: str) -> str:
    return f"{port}-{session_id}-{client_id}.{DOMAIN}"


# --------------------------------------------------------------------------------------------
# Host processes (for leak checks and cleanup)
# --------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> Optional[tuple]:
    """(ppid, starttime) of a host process, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return int(rest[1]), int(rest[19])


def host_pids() -> list:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def host_cmdline(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def host_processes_matching(needle: str) -> list:
    """Host pids whose command line contains `needle` (never this test process)."""
    me = os.getpid()
    out = []
    for pid in host_pids():
        if pid == me:
            continue
        cmd = host_cmdline(pid)
        if cmd and needle in cmd:
            out.append(pid)
    return out


CGROUP_ROOT = Path("/sys/fs/cgroup")


def host_cgroup_dirs(pid: int) -> list:
    """The cgroup directories (v1 hierarchies and the v2 tree) of a host process that lie under a
    `burrow` cgroup, i.e. the sandbox's own cgroups."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "/burrow/" not in path + "/":
            continue
        if controllers == "":
            bases = [CGROUP_ROOT / "unified", CGROUP_ROOT]
        else:
            bases = [CGROUP_ROOT / c for c in controllers.split(",")] + [CGROUP_ROOT / controllers]
        for base in bases:
            d = base / path.lstrip("/")
            if base.is_dir() and d.is_dir():
                out.append(d)
                break
    return out


def remove_cgroup_tree(d: Path) -> None:
    """rmdir a cgroup and its (empty) children, deepest first; ignores what cannot be removed."""
    if not d.is_dir():
        return
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        d.rmdir()
    except OSError:
        pass


def descendants(root: int) -> set:
    """(pid, starttime) of every live host process below `root`."""
    children: dict = {}
    info: dict = {}
    for pid in host_pids():
        st = _proc_stat(pid)
        if st:
            info[pid] = st
            children.setdefault(st[0], []).append(pid)
    out = set()
    stack = [root]
    while stack:
        for c in children.get(stack.pop(), []):
            out.add((c, info[c][1]))
            stack.append(c)
    return out


def unique_marker() -> str:
    """A number usable as a `sleep` argument that no other process on the host uses."""
    return f"{secrets.randbelow(9000) + 1000}.{secrets.randbelow(10**6):06d}"


def proc_status(pid: int) -> dict:
    """The fields of a host process's /proc/<pid>/status ({} if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def vm_rss_kib(pid: int) -> int:
    """Resident memory of a host process in KiB (0 if it is gone)."""
    value = proc_status(pid).get("VmRSS", "0 kB").split()
    return int(value[0]) if value else 0


def namespace_init(pid: int) -> Optional[int]:
    """The host pid of PID 1 of the PID namespace `pid` lives in (for a sandbox process: that
    sandbox's envd), found by walking up its parents."""
    while pid > 1:
        status = proc_status(pid)
        if not status:
            return None
        if status.get("NSpid", "").split()[-1:] == ["1"]:
            return pid
        pid = int(status["PPid"])
    return None


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def new_env(server, key: str, template: str = "Bash") -> str:
    """A new custom environment (`POST /envs`) of the key's team; its ID."""
    r = server.request("POST", "/envs", body={"template": template}, api_key=key)
    assert r.status == 200, r
    return r.json()["id"]


def edit_session(server, key: str, env: str) -> dict:
    """The key's team's edit session of `env` (`editEnabled: true`)."""
    r = server.request("POST", "/sessions", body={"codeSnippetID": env, "editEnabled": True},
                       api_key=key)
    assert r.status == 201, r
    doc = r.json()
    assert doc["editEnabled"] is True, doc
    return doc


class BurrowServer:
    """One `burrow serve` on a free port with its own data dir."""

    def __init__(self, data_dir: Path, *, ttl: str = "15s", pool_size: Optional[int] = None,
                 auth: bool = True, extra_args: Iterable[str] = (), log_dir: Optional[Path] = None):
        self.data_dir = Path(data_dir)
        self.ttl = ttl
        self.pool_size = pool_size if pool_size is not None else _env_pool_size()
        self.auth = auth
        self.extra_args = list(extra_args)
        self.log_dir = Path(log_dir) if log_dir else self.data_dir.parent
        self.log_path = self.log_dir / f"{self.data_dir.name}.server.log"
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.admin_key: Optional[str] = None
        self.stdout_lines: list = []
        self.starts = 0
        self.node_id: Optional[str] = None  # the clientID, once a session showed it
        self._nodes: set = set()  # node IDs seen in the cgroup paths of the server's sandboxes
        self._seen: set = set()  # (pid, starttime) of every process the server ever had below it
        self._reader: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list:
        cmd = [str(burrow_bin()), "serve", "--listen", f"127.0.0.1:{self.port}",
               "--data-dir", str(self.data_dir), "--domain", DOMAIN, "--session-ttl", self.ttl]
        if self.pool_size is not None:
            cmd += ["--pool-size", str(self.pool_size)]
        if not self.auth:
            cmd += ["--auth", "off"]
        if "--disk-overcommit" not in self.extra_args:
            # The suites hold hundreds of 1 GiB sandboxes at once that write next to nothing,
            # more than a CI machine's free disk would let admission promise; disk admission
            # itself is tested in test_disk.py and test_fairness.py, with their own values.
            cmd += ["--disk-overcommit", "100"]
        return cmd + self.extra_args

    def start(self, port: Optional[int] = None, ready_timeout: float = 30.0) -> "BurrowServer":
        assert not self.running, "server already running"
        binary = burrow_bin()
        if not binary.exists():
            raise AssertionError(f"burrow binary not found at {binary} (build it or set BURROW_BIN)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        first_start = not any(self.data_dir.iterdir())
        self.port = port or free_port()
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts}: {' '.join(self.command())}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=log, cwd=str(self.data_dir.parent),
                                     env=_server_env(), preexec_fn=_die_with_parent)
        log.close()
        lines: list = []
        self.stdout_lines = lines
        self._reader = threading.Thread(target=self._read_stdout, args=(self.proc, lines), daemon=True)
        self._reader.start()

        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"burrow serve exited with {self.proc.returncode} before /health answered\n"
                    f"{self.log_tail()}")
            try:
                if http_request(self.port, "GET", "/health", timeout=2).status == 200:
                    break
            except (OSError, AssertionError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                self.kill9()
                raise AssertionError(f"/health not 200 within {ready_timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

        if first_start and self.auth:
            key = wait_until(self._admin_key_from_stdout, 5.0, 0.05,
                             "an 'admin key: <KEY>' line on stdout at the first start")
            self.admin_key = key
        self._remember_children()
        return self

    def _admin_key_from_stdout(self) -> Optional[str]:
        for line in list(self.stdout_lines):
            m = re.match(r"^admin key:\s*(\S+)\s*$", line)
            if m:
                return m.group(1)
        return None

    def _read_stdout(self, proc: subprocess.Popen, lines: list) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in proc.stdout:
                log.write(b"[stdout] " + raw)
                log.flush()
                lines.append(raw.decode(errors="replace").rstrip("\n"))

    def _remember_children(self) -> None:
        if self.running:
            found = descendants(self.proc.pid)
            self._seen |= found
            for pid, _ in found:
                for d in host_cgroup_dirs(pid):
                    parts = d.parts
                    if "burrow" in parts and parts.index("burrow") + 1 < len(parts):
                        self._nodes.add(parts[parts.index("burrow") + 1])

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM; asserts the server exits (with status 0) within `timeout` seconds."""
        assert self.proc is not None, "server was never started"
        if self.proc.poll() is not None:
            raise AssertionError(f"burrow serve had already exited with {self.proc.returncode}\n"
                                 f"{self.log_tail()}")
        self._remember_children()
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"burrow serve did not exit within {timeout}s of SIGTERM\n"
                                 f"{self.log_tail()}")
        self._join_reader()
        assert rc == 0, (f"burrow serve exited with {rc} after SIGTERM "
                         f"({time.monotonic() - t0:.1f}s)\n{self.log_tail()}")
        return rc

    def kill9(self) -> None:
        if self.running:
            self._remember_children()
            self.proc.kill()
            self.proc.wait(10)
            self._join_reader()

    def restart(self, graceful: bool = True, same_port: bool = False) -> "BurrowServer":
        old_port = self.port
        if graceful:
            self.stop()
        else:
            self.kill9()
        return self.start(port=old_port if same_port else None)

    def _join_reader(self) -> None:
        if self._reader:
            self._reader.join(5)

    def cleanup(self) -> list:
        """Hard stop and SIGKILL every leftover process that this server started. Returns the
        (pid, cmdline) of leftovers that were still alive."""
        self.kill9()
        leftovers = []
        for pid, start in sorted(self._seen):
            st = _proc_stat(pid)
            if st and st[1] == start:
                leftovers.append((pid, host_cmdline(pid)))
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        # A stopped server leaves live sandboxes (and their cgroups) for adoption at its next start;
        # this data dir has no next start, so kill whatever is left in its node's cgroups and
        # remove them.
        nodes = self._nodes | ({self.node_id} if self.node_id else set())
        for node in nodes:
            for base in (CGROUP_ROOT / "unified", CGROUP_ROOT):
                tree = base / "burrow" / node
                if tree.is_dir():
                    for kill in tree.rglob("cgroup.kill"):
                        try:
                            kill.write_text("1")
                        except OSError:
                            pass
            deadline = time.monotonic() + 3
            for base in [CGROUP_ROOT / c for c in ("memory", "pids", "cpu", "unified")] + [CGROUP_ROOT]:
                tree = base / "burrow" / node
                while tree.is_dir():
                    remove_cgroup_tree(tree)
                    if not tree.is_dir() or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
        return leftovers

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(lines[-n:])

    # -- HTTP -----------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw) -> Response:
        return http_request(self.port, method, path, **kw)

    def create_session(self, api_key: str, env: str = "Bash", **kw) -> dict:
        r = self.request("POST", "/sessions", body={"codeSnippetID": env, "editEnabled": False},
                         api_key=api_key, **kw)
        assert r.status == 201, f"POST /sessions {env}: {r!r}"
        doc = r.json()
        assert_session_body(doc, env)
        self.node_id = doc["clientID"]
        return doc

    def list_sessions(self, api_key: str) -> list:
        r = self.request("GET", "/sessions", api_key=api_key)
        assert r.status == 200, f"GET /sessions: {r!r}"
        doc = r.json()
        assert isinstance(doc, list), doc
        return doc

    def session_ids(self, api_key: str) -> set:
        return {s["sessionID"] for s in self.list_sessions(api_key)}

    def refresh(self, session_id: str, api_key: Optional[str] = None) -> Response:
        return self.request("POST", f"/sessions/{session_id}/refresh", api_key=api_key)

    def delete(self, session_id: str, api_key: str) -> Response:
        return self.request("DELETE", f"/sessions/{session_id}", api_key=api_key)

    def envd(self, session: dict, **kw) -> "EnvdClient":
        return EnvdClient(self.port, sandbox_host(ENVD_PORT, session["sessionID"], session["clientID"]), **kw)

    def envd_pid(self, session: dict) -> int:
        """The host pid of the session's envd (PID 1 of its sandbox): found through a process
        started in the session for the purpose, then stopped."""
        marker = unique_marker()
        with self.envd(session) as envd:
            pid = "find-envd-" + secrets.token_hex(4)
            envd.call("process_start", [pid, f"exec sleep {marker}", {}, ""])
            try:
                child = wait_until(lambda: host_processes_matching(f"sleep {marker}"), 10,
                                   what="the marker process to show up on the host")[0]
                init = namespace_init(child)
            finally:
                envd.call("process_kill", [pid])
        assert init, f"no PID 1 above host process {child}"
        return init

    # -- CLI ------------------------------------------------------------------------------

    def cli(self, *args: str, env: Optional[dict] = None, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess:
        full_env = _server_env()
        if env:
            full_env.update(env)
        p = subprocess.run([str(burrow_bin()), *args], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout, env=full_env)
        if check and p.returncode != 0:
            raise AssertionError(f"burrow {' '.join(args)} exited with {p.returncode}\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def create_key(self, team: str, admin: bool = False) -> str:
        args = ["keys", "create", "--team", team, "--data-dir", str(self.data_dir)]
        if admin:
            args.append("--admin")
        out = self.cli(*args).stdout
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        assert lines, "burrow keys create printed nothing on stdout"
        return lines[-1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM the server if the test process dies (e.g. killed by a
    suite timeout), so no server outlives its tests."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _env_pool_size() -> Optional[int]:
    v = os.environ.get("BURROW_TEST_POOL_SIZE")
    return int(v) if v else None


def _server_env() -> dict:
    env = dict(os.environ)
    env.setdefault("RUST_BACKTRACE", "1")
    for k in ("BURROW_URL", "BURROW_API_KEY"):
        env.pop(k, None)
    return env


# --------------------------------------------------------------------------------------------
# A minimal websocket + JSON-RPC client for envd (through the gateway, routed by Host)
# --------------------------------------------------------------------------------------------

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class UpgradeResult:
    status: int
    headers: dict
    body: bytes = b""
    sock: Optional[socket.socket] = None
    leftover: bytes = b""


def ws_upgrade(port: int, host: str, path: str = "/ws", timeout: float = 10.0,
               keep: bool = False) -> UpgradeResult:
    """Sends a websocket upgrade for `path` with the given Host header; returns the status (and
    the open socket if keep=True and the status is 101). Checks Sec-WebSocket-Accept on 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    req = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    sock.sendall(req.encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()
            raise AssertionError(f"connection closed during websocket upgrade (Host {host}): {buf!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if status == 101:
        want = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        assert headers.get("sec-websocket-accept") == want, f"bad Sec-WebSocket-Accept: {headers}"
        if keep:
            return UpgradeResult(status, headers, sock=sock, leftover=rest)
        sock.close()
        return UpgradeResult(status, headers)
    # Read a little of the error body for diagnostics.
    body = rest
    try:
        sock.settimeout(1.0)
        while len(body) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            body += chunk
    except OSError:
        pass
    sock.close()
    return UpgradeResult(status, headers, body=body)


class RpcError(Exception):
    def __init__(self, error: dict):
        super().__init__(f"JSON-RPC error {error.get('code')}: {error.get('message')}")
        self.error = error


class EnvdClient:
    """Synchronous JSON-RPC over the sandbox websocket, enough for e2e checks."""

    def __init__(self, port: int, host: str, timeout: float = 15.0):
        up = ws_upgrade(port, host, timeout=timeout, keep=True)
        if up.status != 101:
            raise AssertionError(f"websocket upgrade via Host {host} answered {up.status}: {up.body[:300]!r}")
        self.sock = up.sock
        self.buf = up.leftover
        self.next_id = 1
        self.notifications: list = []

    def close(self) -> None:
        try:
            self._send_frame(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed by the server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read_message(self) -> Optional[bytes]:
        """Next text/binary message; answers pings; None on close."""
        parts = b""
        while True:
            b1, b2 = self._read_exact(2)
            fin, opcode = b1 & 0x80, b1 & 0x0F
            n = b2 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read_exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read_exact(8))[0]
            if b2 & 0x80:
                mask = self._read_exact(4)
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self._read_exact(n)))
            else:
                payload = self._read_exact(n)
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                return None
            parts += payload
            if fin:
                return parts

    def call(self, method: str, params: list, timeout: float = 15.0) -> Any:
        rid = self.next_id
        self.next_id += 1
        msg = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": rid})
        self._send_frame(0x1, msg.encode())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no JSON-RPC answer to {method} within {timeout}s")
            self.sock.settimeout(left)
            data = self._read_message()
            if data is None:
                raise ConnectionError(f"websocket closed while waiting for {method}")
            doc = json.loads(data)
            if "id" in doc and doc.get("id") == rid:
                if "error" in doc:
                    raise RpcError(doc["error"])
                assert "result" in doc, f"response without result: {doc!r}"
                return doc["result"]
            self.notifications.append(doc)

    def wait_notification(self, subscription: str, timeout: float = 10.0) -> Any:
        """The `result` of the first notification (already received or arriving within `timeout`)
        of the given subscription ID; it is consumed."""
        deadline = time.monotonic() + timeout
        while True:
            for i, n in enumerate(self.notifications):
                if (n.get("params") or {}).get("subscription") == subscription:
                    del self.notifications[i]
                    return n["params"]["result"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no notification for subscription {subscription} within {timeout}s")
            self.sock.settimeout(left)
            data = self._read_message()
            if data is None:
                raise ConnectionError("websocket closed while waiting for a notification")
            self.notifications.append(json.loads(data))

    def run(self, cmd: str, timeout: float = 20.0) -> tuple:
        """Starts `cmd` with subscriptions; returns (stdout lines, stderr lines, exit payload)."""
        pid = "e2e" + secrets.token_hex(5)
        subs = {}
        for name in ("onExit", "onStdout", "onStderr"):
            subs[self.call("process_subscribe", [name, pid])] = name
        self.call("process_start", [pid, cmd, {}, ""])
        out: dict = {"onStdout": [], "onStderr": []}
        deadline = time.monotonic() + timeout
        i = 0
        while True:
            while i < len(self.notifications):
                n = self.notifications[i]
                i += 1
                sub = subs.get((n.get("params") or {}).get("subscription"))
                if sub == "onExit":
                    return out["onStdout"], out["onStderr"], n["params"]["result"]
                if sub:
                    out[sub].append(n["params"]["result"]["line"])
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"process {cmd!r} did not exit within {timeout}s")
            self.sock.settimeout(left)
            data = self._read_message()
            if data is None:
                raise ConnectionError("websocket closed while a process was running")
            self.notifications.append(json.loads(data))
