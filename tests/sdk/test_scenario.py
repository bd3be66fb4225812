"""The envd protocol end to end with the real, unmodified e2b SDK (whichever release this venv
holds): processes, stdin, kill, terminals, filesystem, base64, directory watching, HTTP file
transfer, port scanning and the sandbox's ports through the gateway.

Checks that depend on the release are guarded by what the SDK can express (e.g. exit codes exist
from 0.7.4); nothing is skipped at run time.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import urllib.error
import urllib.request

import pytest

from burrow_harness import host_processes_matching, unique_marker, wait_until
from sdk_driver import HAS_EXIT_CODE, HAS_FILE_TRANSFER, HAS_SESSION_OPTIONS, SessionException

BURROW_SERVER = {"ttl": "15s"}

# Lists "PID cmdline" for every process the sandbox can see (no dependency on procps).
PS = r"""for p in /proc/[0-9]*; do printf '%s ' "${p#/proc/}"; tr '\0' ' ' < "$p/cmdline" 2>/dev/null; echo; done"""


def _rand() -> str:
    return secrets.token_hex(4)


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ["Bash", "Python3"])
def test_process_stdout_stderr_env_vars_cwd_and_exit_code(open_session, env):
    s = open_session(env)
    s.make_dir("/home/user/workdir")
    out = s.run('echo "out:$FOO"; echo "err:$BAR" >&2; pwd; exit 3',
                env_vars={"FOO": "foo-1", "BAR": "bar 2"}, cwd="/home/user/workdir", timeout=20)
    assert out.stdout == "out:foo-1\n/home/user/workdir", out
    assert out.stderr == "err:bar 2", out
    if HAS_EXIT_CODE:
        assert out.exit_code == 3, out

    out = s.run('pwd; echo "$HOME $USER"; id -un')
    assert out.stdout == "/home/user\n/home/user user\nuser", out
    if HAS_EXIT_CODE:
        assert out.exit_code == 0, out

    if env == "Python3":
        out = s.run("python3 -c 'import sys; print(sys.version_info[0]); sys.exit(4)'")
        assert out.stdout == "3", out
        if HAS_EXIT_CODE:
            assert out.exit_code == 4, out
    else:
        out = s.run('echo "bash-${BASH_VERSINFO[0]}"')
        assert out.stdout.startswith("bash-") and out.stdout[5:].isdigit(), out


def test_process_output_order_and_long_lines(open_session):
    s = open_session("Bash")
    out = s.run("seq 1 2000", timeout=30)
    assert out.stdout.split("\n") == [str(i) for i in range(1, 2001)]
    out = s.run("head -c 100000 /dev/zero | tr '\\0' x; echo; echo tail", timeout=30)
    assert out.stdout == "x" * 100000 + "\ntail", (len(out.stdout), out.stdout[-50:])


def test_process_stdin(open_session):
    s = open_session("Bash")
    p = s.start("read x; echo got $x")
    p.send_stdin("hello\n")
    out = p.wait(15)
    assert out.stdout == "got hello", out

    p = s.start("head -n 2")
    p.send_stdin("line1\n")
    p.send_stdin("line2\nline3\n")
    assert p.wait(15).stdout == "line1\nline2"

    with pytest.raises(SessionException):
        p.send_stdin("too late\n")


def test_kill_long_running_process_and_its_children(open_session):
    s = open_session("Bash")
    marker = unique_marker()
    p = s.start(f"sleep {marker} & sleep {marker}; echo never")
    wait_until(lambda: len(host_processes_matching(f"sleep {marker}")) >= 2, 10, 0.1,
               "both sleeps to run")
    assert not p.finished
    p.kill()
    assert p.finished
    # Process-group kill: the background child dies too.
    wait_until(lambda: not host_processes_matching(f"sleep {marker}"), 5, 0.1,
               f"every 'sleep {marker}' to be gone after kill")
    assert marker not in s.run(PS).stdout
    assert "never" not in p.wait(1).stdout


# ---------------------------------------------------------------------------------------------
# Terminal
# ---------------------------------------------------------------------------------------------


def test_terminal_type_read_resize_kill(open_session):
    s = open_session("Bash")
    t = s.terminal(cols=80, rows=24)
    t.send("echo hi$((40+2))\n")
    t.wait_for("hi42")
    t.send("tty\n")
    t.wait_for("/dev/pts/")
    t.send("pwd\n")
    t.wait_for("/home/user\r\n")
    t.send("stty size\n")
    t.wait_for("24 80")
    t.resize(100, 30)
    mark = len(t.data)
    t.send("stty size\n")
    t.wait_for("30 100", start=mark)

    t.send("echo $$ > /tmp/term.pid\n")
    pid = wait_until(lambda: s.read("/tmp/term.pid").strip(), 10, 0.2, "the terminal's shell pid")
    assert pid.isdigit(), pid
    t.kill()
    wait_until(lambda: s.run(f"kill -0 {pid} 2>/dev/null && echo alive || echo gone").stdout == "gone",
               5, 0.3, f"the terminal's shell (pid {pid}) to exit after kill")


# ---------------------------------------------------------------------------------------------
# Filesystem
# ---------------------------------------------------------------------------------------------


def test_filesystem_write_read_list_make_dir_remove(open_session):
    s = open_session("Bash")
    base = f"/home/user/fs-{_rand()}"
    s.make_dir(f"{base}/sub/deep")
    s.make_dir(f"{base}/sub")  # exists already: no error
    text = "h\u00e9llo\nw\u00f6rld \u2713"
    s.write(f"{base}/a.txt", text)
    assert s.read(f"{base}/a.txt") == text
    assert s.list(base) == [("a.txt", False), ("sub", True)]
    assert s.list(f"{base}/sub/deep") == []

    s.write(f"{base}/a.txt", "short")  # truncates
    assert s.read(f"{base}/a.txt") == "short"

    # Processes see what the RPC wrote, may change it (owned by the user), and vice versa.
    out = s.run(f"cat {base}/a.txt; echo; stat -c %U {base}/a.txt; echo more >> {base}/a.txt && echo appended")
    assert out.stdout == "short\nuser\nappended", out
    assert s.read(f"{base}/a.txt") == "shortmore\n"
    s.run(f"printf from-proc > {base}/p.txt")
    assert s.read(f"{base}/p.txt") == "from-proc"

    s.remove(f"{base}/a.txt")
    assert s.list(base) == [("p.txt", False), ("sub", True)]
    s.remove(f"{base}/sub")  # recursive
    assert s.list(base) == [("p.txt", False)]
    s.remove(f"{base}/missing")  # rm -rf semantics: no error

    with pytest.raises(SessionException):
        s.read(f"{base}/missing")
    with pytest.raises(SessionException):
        s.list(f"{base}/missing")
    with pytest.raises(SessionException):
        s.write(f"{base}/no/such/dir/f.txt", "x")


def test_binary_base64_round_trip(open_session):
    s = open_session("Bash")
    data = bytes(range(256)) * 3 + b"\x00\xff\xfe\r\n\x80"
    path = f"/home/user/bin-{_rand()}.dat"
    s.write_bytes(path, data)
    assert s.read_bytes(path) == data
    out = s.run(f"sha256sum {path}")
    assert out.stdout.split()[0] == hashlib.sha256(data).hexdigest(), out
    s.run(f"printf '\\000\\001\\377' > {path}.2")
    assert s.read_bytes(f"{path}.2") == b"\x00\x01\xff"
    s.write_bytes(f"{path}.empty", b"")
    assert s.read_bytes(f"{path}.empty") == b""


def test_watch_directory_events(open_session):
    s = open_session("Bash")
    d = f"/home/user/watched-{_rand()}"
    s.make_dir(d)
    w = s.watch(d)
    t0 = time.time_ns()

    s.write(f"{d}/new.txt", "1")
    ev = w.wait_for("Create", "new.txt")
    assert ev.path == f"{d}/new.txt" and ev.is_dir is False, ev
    assert abs(ev.timestamp - t0) < 300 * 10**9, f"timestamp is not Unix nanoseconds: {ev}"

    s.write(f"{d}/new.txt", "22")
    w.wait_for("Write", "new.txt")
    s.make_dir(f"{d}/sub")
    assert w.wait_for("Create", "sub").is_dir is True
    s.run(f"echo x > {d}/from-process.txt")
    w.wait_for("Create", "from-process.txt")
    s.remove(f"{d}/new.txt")
    ev = w.wait_for("Remove", "new.txt")
    assert ev.path == f"{d}/new.txt", ev
    assert all(e.path.rsplit("/", 1)[0] == d for e in w.events), w.events
    w.stop()

    with pytest.raises(SessionException):
        s.watch(f"/home/user/no-such-dir-{_rand()}")


if HAS_FILE_TRANSFER:

    def test_upload_and_download_files(open_session, tmp_path):
        s = open_session("Bash")
        data = secrets.token_bytes(200_000) + b"\x00end"
        local = tmp_path / f"up-{_rand()}.bin"
        local.write_bytes(data)
        with open(local, "rb") as f:
            remote = s.upload(f)
        assert remote == f"/home/user/{local.name}"
        assert s.read_bytes(remote) == data
        assert s.download(remote) == data
        assert s.run(f"stat -c %U {remote}").stdout == "user"

        empty = tmp_path / f"empty-{_rand()}.txt"
        empty.write_bytes(b"")
        with open(empty, "rb") as f:
            remote_empty = s.upload(f)
        assert s.download(remote_empty) == b""
        assert s.run(f"wc -c < {remote_empty}").stdout.strip() == "0"

        spaced = tmp_path / f"my file {_rand()}.txt"
        spaced.write_text("spaces ok")
        with open(spaced, "rb") as f:
            remote_spaced = s.upload(f)
        assert s.download(remote_spaced) == b"spaces ok"

        s.run("printf abc > /home/user/from-proc.txt")
        assert s.download("/home/user/from-proc.txt") == b"abc"
        with pytest.raises(Exception):
            s.download(f"/home/user/does-not-exist-{_rand()}")


if HAS_SESSION_OPTIONS:

    def test_session_cwd_and_env_vars(open_session):
        cwd = f"/home/user/project-{_rand()}"
        s = open_session("Bash", cwd=cwd, env_vars={"SESSION_VAR": "sv-1", "OTHER": "o"})
        out = s.run('pwd; echo "$SESSION_VAR $OTHER"')
        assert out.stdout == f"{cwd}\nsv-1 o", out
        out = s.run('echo "$SESSION_VAR $OTHER"', env_vars={"SESSION_VAR": "call"})
        assert out.stdout == "call o", out
        s.write("rel.txt", "relative")  # resolved against the session cwd by the SDK
        assert s.run(f"cat {cwd}/rel.txt").stdout == "relative"


# ---------------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------------


def test_scan_ports_and_reach_a_sandbox_port_through_the_gateway(open_session):
    scans: list = []
    s = open_session("Python3", on_scan_ports=scans.append)
    wait_until(lambda: len(scans) >= 1, 5, 0.1, "a first port scan (about one per second)")

    www = f"/home/user/www-{_rand()}"
    body = f"hello from the sandbox {_rand()}"
    s.make_dir(www)
    s.write(f"{www}/hello.txt", body)
    server = s.start(f"python3 -m http.server 8123 --bind 127.0.0.1 --directory {www}")

    def listening():
        return scans and any(p.port == 8123 and p.state == "LISTEN" for p in scans[-1])

    wait_until(listening, 15, 0.1, "on_scan_ports to report 8123 LISTEN")
    first = [p for p in scans[-1] if p.port == 8123][0]
    assert first.ip in ("127.0.0.1", "0.0.0.0"), first

    url = f"http://{s.hostname(8123)}/hello.txt"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.read().decode() == body

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{s.hostname(8124)}/", timeout=10)
    assert e.value.code == 502, e.value

    server.kill()
    wait_until(lambda: scans and not any(p.port == 8123 and p.state == "LISTEN" for p in scans[-1]),
               10, 0.2, "8123 to disappear from the scans after the kill")
    n = len(scans)
    assert s.run("echo still-ok").stdout == "still-ok"
    wait_until(lambda: len(scans) > n, 5, 0.1, "scans to keep coming")
