"""One synchronous facade over the real e2b SDK releases the suite runs under:

- 0.3.0 (async, pydantic 1): no session cwd/env_vars, no exit codes, no upload/download,
  process cwd is the `rootdir` argument, watcher events are raw dicts;
- 0.8.0 (async): everything, exit codes, `upload_file`/`download_file`;
- 0.9.7 (sync: `e2b.Session(...)` opens in the constructor).

The async releases run on one event loop in a background thread (so the SDK's own background tasks,
like the refresh loop's close-on-404, keep running between test steps). Every SDK call is bounded by
an explicit deadline, so a broken server fails a test in seconds instead of hanging on the SDK's
60 s defaults (or forever: 0.9.x waits for its first websocket without a timeout).

How the SDK is pointed at a local server (spec: /work/shared/spec/e2b-sdk-harness.md, "Mode A"):
`socket.getaddrinfo` maps every `*.localhost` name, and the implied port 80, to the server's
listener, so the SDK dials `ws://49982-{sessionID}-{clientID}.localhost/ws` for real and the
server routes it by the Host header.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

E2B_VERSION_STR = importlib.metadata.version("e2b")
E2B_VERSION = tuple(int(p) for p in E2B_VERSION_STR.split(".")[:3])

IS_SYNC = E2B_VERSION >= (0, 9, 0)
HAS_EXIT_CODE = E2B_VERSION >= (0, 7, 4)
HAS_SESSION_OPTIONS = E2B_VERSION >= (0, 5, 0)  # session-level cwd / env_vars
HAS_FILE_TRANSFER = E2B_VERSION >= (0, 7, 4)  # upload_file / download_file over HTTP /file
PROCESS_CWD_ARG = "cwd" if E2B_VERSION >= (0, 4, 1) else "rootdir"

import e2b  # noqa: E402
from e2b import SessionException  # noqa: E402

DOMAIN = "localhost"

# ---------------------------------------------------------------------------------------------
# Pointing the SDK at a local server
# ---------------------------------------------------------------------------------------------

_ORIG_GETADDRINFO = socket.getaddrinfo
_TARGET = {"port": None}


def _getaddrinfo(host, port, *args, **kwargs):
    h = host.decode() if isinstance(host, (bytes, bytearray)) else host
    if _TARGET["port"] and h and (h == DOMAIN or h.endswith("." + DOMAIN)):
        if port in (None, 80, 443, "80", "443", "http", "https"):
            port = _TARGET["port"]
        return _ORIG_GETADDRINFO("127.0.0.1", port, *args, **kwargs)
    return _ORIG_GETADDRINFO(host, port, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo


def point_at(api_url: str, port: int, refresh_period: float = 1.0) -> None:
    """REST base URL, sandbox hostnames and refresh period for every session opened afterwards."""
    _TARGET["port"] = port
    import e2b.session.session_connection as sc

    sc.SESSION_DOMAIN = DOMAIN  # the module copied the constant at import: patch it there
    sc.SESSION_REFRESH_PERIOD = refresh_period  # read at every iteration of the refresh loop
    try:
        from e2b.api import configuration  # e2b >= 0.5.1
    except ImportError:
        from e2b.api.main import configuration  # e2b <= 0.5.0
    configuration.host = api_url.rstrip("/")  # mutate: session_connection holds the same object


# ---------------------------------------------------------------------------------------------
# Deadlines
# ---------------------------------------------------------------------------------------------


class SdkTimeout(AssertionError):
    pass


def _in_thread(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Runs a blocking call in a daemon thread and gives up after `timeout` seconds (the call is
    abandoned, which is fine for a test that is failing anyway)."""
    box: dict = {}
    done = threading.Event()

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"sdk-call:{what[:40]}", daemon=True).start()
    if not done.wait(timeout):
        raise SdkTimeout(f"SDK call {what} did not finish within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class _LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="sdk-event-loop", daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, make_coro: Callable[[], Any], timeout: float, what: str) -> Any:
        async def wrapper():
            # Called on the loop's thread: the SDK creates futures/queues bound to the running loop.
            result = make_coro()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future) or hasattr(result, "__await__"):
                return await result
            return result

        fut = asyncio.run_coroutine_threadsafe(wrapper(), self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise SdkTimeout(f"SDK call {what} did not finish within {timeout}s") from None


async def _await(x):
    return await x


# ---------------------------------------------------------------------------------------------
# The facade
# ---------------------------------------------------------------------------------------------


@dataclass
class Output:
    stdout: str
    stderr: str
    exit_code: Optional[int]  # None where the SDK does not report it (< 0.7.4)


@dataclass
class Event:
    operation: str
    name: str
    path: str
    is_dir: bool
    timestamp: int


@dataclass
class Port:
    ip: str
    port: int
    state: str


class Driver:
    version = E2B_VERSION
    version_str = E2B_VERSION_STR

    def __init__(self):
        self._loop = None if IS_SYNC else _LoopThread()

    def call(self, fn: Callable[[], Any], timeout: float, what: str) -> Any:
        """For async releases `fn` returns an awaitable (it runs on the SDK loop); for sync ones it
        is the blocking call itself."""
        if IS_SYNC:
            return _in_thread(fn, timeout, what)
        return self._loop.run(fn, timeout, what)

    def open(self, env: str, api_key: str, *, on_scan_ports: Optional[Callable[[List[Port]], Any]] = None,
             cwd: Optional[str] = None, env_vars: Optional[dict] = None, timeout: float = 30.0) -> "SdkSession":
        kwargs: dict = {"api_key": api_key, "_debug_dev_env": "local", "timeout": timeout}
        if on_scan_ports is not None:
            kwargs["on_scan_ports"] = lambda ports: on_scan_ports(
                [Port(p.ip, p.port, p.state) for p in ports])
        if cwd is not None or env_vars is not None:
            assert HAS_SESSION_OPTIONS, f"e2b {E2B_VERSION_STR} has no session cwd/env_vars"
            kwargs["cwd"] = cwd
            kwargs["env_vars"] = env_vars
        if IS_SYNC:
            raw = self.call(lambda: e2b.Session(env, **kwargs), timeout + 5, f"Session({env!r})")
        else:
            raw = self.call(lambda: e2b.Session.create(env, **kwargs), timeout + 5, f"Session.create({env!r})")
        return SdkSession(self, raw)


class SdkSession:
    def __init__(self, driver: Driver, raw: Any):
        self.driver = driver
        self.raw = raw

    def _call(self, fn, timeout, what):
        return self.driver.call(fn, timeout, what)

    # -- identity / lifecycle ------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self.raw._session.session_id

    @property
    def client_id(self) -> str:
        return self.raw._session.client_id

    def hostname(self, port: int) -> str:
        return f"{port}-{self.session_id}-{self.client_id}.{DOMAIN}"

    @property
    def is_open(self) -> bool:
        return bool(self.raw.is_open)

    def close(self, timeout: float = 15.0) -> None:
        self._call(lambda: self.raw.close(), timeout, "close()")

    def close_quietly(self) -> None:
        try:
            self.close(timeout=10.0)
        except Exception:  # noqa: BLE001 - teardown of a possibly broken session
            pass

    # -- processes -----------------------------------------------------------------------

    def start(self, cmd: str, *, env_vars: Optional[dict] = None, cwd: Optional[str] = None,
              on_stdout: Optional[Callable[[str], Any]] = None,
              on_stderr: Optional[Callable[[str], Any]] = None, timeout: float = 20.0) -> "SdkProcess":
        kw: dict = {"timeout": timeout}
        if env_vars:
            kw["env_vars"] = env_vars
        if cwd:
            kw[PROCESS_CWD_ARG] = cwd
        if on_stdout:
            kw["on_stdout"] = lambda m: on_stdout(m.line)
        if on_stderr:
            kw["on_stderr"] = lambda m: on_stderr(m.line)
        proc = self._call(lambda: self.raw.process.start(cmd, **kw), timeout + 5,
                          f"process.start({cmd[:60]!r})")
        return SdkProcess(self, proc, cmd)

    def run(self, cmd: str, *, env_vars: Optional[dict] = None, cwd: Optional[str] = None,
            timeout: float = 30.0) -> Output:
        return self.start(cmd, env_vars=env_vars, cwd=cwd, timeout=timeout).wait(timeout)

    # -- terminal ------------------------------------------------------------------------

    def terminal(self, cols: int = 80, rows: int = 24, timeout: float = 20.0) -> "SdkTerminal":
        chunks: list = []
        term = self._call(lambda: self.raw.terminal.start(on_data=chunks.append, cols=cols, rows=rows,
                                                          timeout=timeout),
                          timeout + 5, "terminal.start()")
        return SdkTerminal(self, term, chunks)

    # -- filesystem ----------------------------------------------------------------------

    def write(self, path: str, content: str, timeout: float = 10.0) -> None:
        self._call(lambda: self.raw.filesystem.write(path, content, timeout=timeout), timeout + 5,
                   f"filesystem.write({path!r})")

    def read(self, path: str, timeout: float = 10.0) -> str:
        return self._call(lambda: self.raw.filesystem.read(path, timeout=timeout), timeout + 5,
                          f"filesystem.read({path!r})")

    def list(self, path: str, timeout: float = 10.0) -> list:
        infos = self._call(lambda: self.raw.filesystem.list(path, timeout=timeout), timeout + 5,
                           f"filesystem.list({path!r})")
        return sorted((i.name, i.is_dir) for i in infos)

    def make_dir(self, path: str, timeout: float = 10.0) -> None:
        self._call(lambda: self.raw.filesystem.make_dir(path, timeout=timeout), timeout + 5,
                   f"filesystem.make_dir({path!r})")

    def remove(self, path: str, timeout: float = 10.0) -> None:
        self._call(lambda: self.raw.filesystem.remove(path, timeout=timeout), timeout + 5,
                   f"filesystem.remove({path!r})")

    def write_bytes(self, path: str, data: bytes, timeout: float = 15.0) -> None:
        # Only 0.9.x takes a timeout here; the deadline covers the others.
        if IS_SYNC:
            fn = lambda: self.raw.filesystem.write_bytes(path, data, timeout=timeout)  # noqa: E731
        else:
            fn = lambda: self.raw.filesystem.write_bytes(path, data)  # noqa: E731
        self._call(fn, timeout + 5, f"filesystem.write_bytes({path!r})")

    def read_bytes(self, path: str, timeout: float = 15.0) -> bytes:
        if IS_SYNC:
            fn = lambda: self.raw.filesystem.read_bytes(path, timeout=timeout)  # noqa: E731
        else:
            fn = lambda: self.raw.filesystem.read_bytes(path)  # noqa: E731
        return bytes(self._call(fn, timeout + 5, f"filesystem.read_bytes({path!r})"))

    def watch(self, path: str, timeout: float = 10.0) -> "SdkWatcher":
        watcher = self._call(lambda: self.raw.filesystem.watch_dir(path), timeout, f"watch_dir({path!r})")
        events: list = []
        watcher.add_event_listener(lambda e: events.append(_event(e)))
        self._call(lambda: watcher.start(timeout=timeout), timeout + 5, f"watcher.start({path!r})")
        return SdkWatcher(self, watcher, events)

    # -- HTTP /file ----------------------------------------------------------------------

    def upload(self, fileobj, timeout: float = 20.0) -> str:
        assert HAS_FILE_TRANSFER
        if IS_SYNC:
            fn = lambda: self.raw.upload_file(fileobj, timeout=timeout)  # noqa: E731
        else:
            fn = lambda: self.raw.upload_file(fileobj)  # noqa: E731
        return _in_thread(fn, timeout + 5, "upload_file()")  # plain blocking `requests` in all releases

    def download(self, remote_path: str, timeout: float = 20.0) -> bytes:
        assert HAS_FILE_TRANSFER
        if IS_SYNC:
            fn = lambda: self.raw.download_file(remote_path, timeout=timeout)  # noqa: E731
        else:
            fn = lambda: self.raw.download_file(remote_path)  # noqa: E731
        return _in_thread(fn, timeout + 5, f"download_file({remote_path!r})")


def _event(e: Any) -> Event:
    if isinstance(e, dict):  # < 0.7.4: the raw notification payload
        return Event(str(e["operation"]), e["name"], e["path"], bool(e["isDir"]), int(e["timestamp"]))
    op = e.operation.value if hasattr(e.operation, "value") else str(e.operation)
    return Event(op, e.name, e.path, bool(e.is_dir), int(e.timestamp))


class SdkProcess:
    def __init__(self, session: SdkSession, raw: Any, cmd: str):
        self.session = session
        self.raw = raw
        self.cmd = cmd

    def wait(self, timeout: float = 30.0) -> Output:
        what = f"wait for {self.cmd[:60]!r}"
        if IS_SYNC:
            try:
                out = self.raw.finished.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                raise SdkTimeout(f"{what}: no exit within {timeout}s") from None
        else:
            out = self.session._call(lambda: _await(self.raw.finished), timeout, what)
        return Output(out.stdout, out.stderr, getattr(out, "exit_code", None))

    @property
    def finished(self) -> bool:
        f = self.raw.finished
        return f.done() if hasattr(f, "done") else f._future.done()

    def send_stdin(self, data: str, timeout: float = 10.0) -> None:
        self.session._call(lambda: self.raw.send_stdin(data, timeout=timeout), timeout + 5, "send_stdin()")

    def kill(self, timeout: float = 10.0) -> None:
        self.session._call(lambda: self.raw.kill(timeout=timeout), timeout + 5, f"kill {self.cmd[:40]!r}")


class SdkTerminal:
    def __init__(self, session: SdkSession, raw: Any, chunks: list):
        self.session = session
        self.raw = raw
        self.chunks = chunks

    @property
    def data(self) -> str:
        return "".join(self.chunks)

    def send(self, data: str, timeout: float = 10.0) -> None:
        self.session._call(lambda: self.raw.send_data(data, timeout=timeout), timeout + 5, "send_data()")

    def resize(self, cols: int, rows: int, timeout: float = 10.0) -> None:
        self.session._call(lambda: self.raw.resize(cols, rows, timeout=timeout), timeout + 5, "resize()")

    def kill(self, timeout: float = 10.0) -> None:
        self.session._call(lambda: self.raw.kill(timeout=timeout), timeout + 5, "terminal kill()")

    def wait_for(self, needle: str, timeout: float = 10.0, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.data[start:]:
                return self.data
            time.sleep(0.05)
        raise AssertionError(f"terminal never showed {needle!r}; got {self.data[-800:]!r}")


class SdkWatcher:
    def __init__(self, session: SdkSession, raw: Any, events: list):
        self.session = session
        self.raw = raw
        self.events = events

    def find(self, operation: str, name: str) -> List[Event]:
        return [e for e in list(self.events) if e.operation == operation and e.name == name]

    def wait_for(self, operation: str, name: str, timeout: float = 10.0) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(operation, name)
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {operation} event for {name!r}; events: {self.events!r}")

    def stop(self, timeout: float = 10.0) -> None:
        self.session._call(lambda: self.raw.stop(), timeout, "watcher.stop()")


__all__ = [
    "Driver", "SdkSession", "SdkProcess", "SdkTerminal", "SdkWatcher", "SdkTimeout", "Output",
    "Event", "Port", "SessionException", "point_at", "E2B_VERSION", "E2B_VERSION_STR", "IS_SYNC",
    "HAS_EXIT_CODE", "HAS_SESSION_OPTIONS", "HAS_FILE_TRANSFER",
]
