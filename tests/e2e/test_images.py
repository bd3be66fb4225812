"""Environment images: `burrow env build` makes a self-contained Debian root filesystem from an
environment's definition (installing mmdebstrap first when it is missing), sessions run from it,
an unchanged definition rebuilds nothing, a changed one makes a new version that new sessions get
while sessions started before keep theirs, and unused versions are collected. Also: a failed build
names its step and quotes its output, and Ctrl-C cancels a build; either way the previous version
stays current.

Builds the small `Bash` image (Debian minbase plus procps: ~20 s through the host's apt mirror),
twice, into one data dir. Needs root and the host's Debian mirror, as CI has.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from burrow_harness import BurrowServer, burrow_bin, wait_until

BUILD_TIMEOUT = 600
VERSION_RE = re.compile(r"built version ([0-9a-f]{12}) in ([0-9.]+) s")
BASH_DEFINITION = (Path(__file__).resolve().parents[2] / "environments" / "Bash.toml").read_text()


class Images:
    """One data dir with a built Bash image and a server on it (TTL long enough to span builds)."""

    def __init__(self, data_dir: Path, log_dir: Path):
        self.data_dir = data_dir
        self.env_dir = data_dir / "environments" / "images" / "Bash"
        self.server = BurrowServer(data_dir, ttl="10m", pool_size=0, log_dir=log_dir)
        self.first_build: subprocess.CompletedProcess = None  # type: ignore[assignment]
        self.first_version = ""
        self.first_seconds = 0.0
        self.key = ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = self.server.cli(*args, timeout=BUILD_TIMEOUT, check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"burrow {' '.join(args)} exited with {p.returncode}\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr[-4000:]}")
        return p

    def build(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.cli("env", "build", "Bash", "--data-dir", str(self.data_dir), *extra, check=check)

    def current(self) -> str:
        return (self.env_dir / "current").readlink().name

    def versions(self) -> list:
        return sorted(p.name for p in self.env_dir.iterdir() if re.fullmatch(r"[0-9a-f]{12}", p.name))

    def leftovers(self) -> list:
        return sorted(p.name for p in self.env_dir.iterdir() if p.name.startswith((".build-", ".trash-")))

    def run(self, session: dict, cmd: str) -> tuple:
        with self.server.envd(session) as envd:
            out, err, code = envd.run(cmd, timeout=30)
        return out, err, code

    def definition(self, name: str, text: str) -> str:
        path = self.data_dir.parent / name
        path.write_text(text)
        return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory, server_log_dir):
    state = Images(tmp_path_factory.mktemp("burrow-data"), server_log_dir)
    t0 = time.monotonic()
    state.first_build = state.build()
    m = VERSION_RE.search(state.first_build.stdout)
    assert m, f"no 'built version' line:\n{state.first_build.stdout}\n{state.first_build.stderr[-3000:]}"
    state.first_version, state.first_seconds = m.group(1), float(m.group(2))
    print(f"\nBash image {state.first_version} built in {state.first_seconds:.1f} s "
          f"({time.monotonic() - t0:.1f} s with tool checks)")
    state.server.start()
    # The data dir was not empty at the first start (the image was in it), so no admin key was
    # printed: make one.
    state.key = state.server.create_key("images", admin=True)
    yield state
    try:
        if state.server.running:
            state.server.stop()
    finally:
        state.server.cleanup()


def test_the_build_streams_its_steps_and_sets_current(images):
    err = images.first_build.stderr
    for step in ("[1/5] bootstrap Debian bookworm (minbase) with procps", "[2/5] create user user",
                 "[3/5] write the sandbox's /etc files", "[4/5] move owners into the sandbox's id range",
                 f"[5/5] publish version {images.first_version}", "I: success in"):
        assert step in err, f"missing {step!r} in the build's output:\n{err[-3000:]}"
    assert images.current() == images.first_version
    assert images.versions() == [images.first_version]
    assert images.leftovers() == []
    rootfs = images.env_dir / images.first_version / "rootfs"
    # Owned by the sandbox's mapped ids: its root is host uid 100000, its user 101000.
    assert rootfs.stat().st_uid == 100000
    assert (rootfs / "home" / "user").stat().st_uid == 101000
    assert (rootfs / "usr" / "bin" / "bash").stat().st_uid == 100000
    assert (rootfs / "etc" / "hostname").read_text() == "sandbox\n"
    assert not list((rootfs / "dev").iterdir()), "device nodes belong to the sandbox's own /dev"


def test_env_ls_shows_the_image(images):
    out = images.cli("env", "ls", "--data-dir", str(images.data_dir)).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("Bash "))
    assert f"image {images.first_version}" in line, out
    assert "available" in line, out
    python = next(ln for ln in out.splitlines() if ln.startswith("Python3 "))
    assert " host " in python, out


def test_a_session_runs_from_the_image(images):
    key = images.key
    doc = images.server.create_session(key, "Bash")
    out, err, code = images.run(doc, "cat /etc/debian_version; id -un; pwd; cat /etc/hostname; ps -o comm= -p $$")
    assert code == 0, (out, err)
    assert re.fullmatch(r"\d+(\.\d+)?", out[0]), out
    assert out[1:4] == ["user", "/home/user", "sandbox"], out
    # The image's own /usr, not the host's: the host has python3 (burrow's tests run on it), the
    # minimal Bash image does not.
    out, err, code = images.run(doc, "command -v python3 || echo none")
    assert out == ["none"], (out, err)
    host = images.server.create_session(key, "Python3")
    out, err, code = images.run(host, "python3 -c 'print(1+1)'")
    assert out == ["2"], (out, err, code)
    for session in (doc, host):
        assert images.server.delete(session["sessionID"], key).status == 204


def test_an_unchanged_definition_rebuilds_nothing(images):
    rootfs = images.env_dir / images.first_version / "rootfs"
    before = rootfs.stat().st_ino
    t0 = time.monotonic()
    p = images.build()
    took = time.monotonic() - t0
    assert f"Bash: up to date (version {images.first_version}); nothing to build" in p.stdout, p.stdout
    assert "[1/" not in p.stderr, p.stderr
    assert took < 10, f"a no-op build took {took:.1f} s"
    assert rootfs.stat().st_ino == before
    assert images.versions() == [images.first_version]
    # Spelled differently, same content: still nothing to build.
    same = images.definition("Bash-same.toml", "# same packages, other formatting\n"
                                               "packages = [ 'procps' ]\nsuite = 'bookworm'\n")
    p = images.build("--file", same)
    assert "up to date" in p.stdout, p.stdout


def test_a_failed_build_names_its_step_and_keeps_the_current_version(images):
    bad = images.definition("Bash-bad.toml", BASH_DEFINITION.replace(
        '"procps"', '"procps", "no-such-package-for-burrow"'))
    p = images.build("--file", bad, check=False)
    assert p.returncode != 0
    assert "build failed, the previous version stays current" in p.stderr, p.stderr[-3000:]
    assert "step 1/5 (bootstrap Debian bookworm" in p.stderr, p.stderr[-3000:]
    assert "no-such-package-for-burrow" in p.stderr.split("build failed")[-1], p.stderr[-3000:]
    assert images.current() == images.first_version
    assert images.versions() == [images.first_version]
    assert images.leftovers() == []


def test_ctrl_c_cancels_a_build_and_keeps_the_current_version(images):
    other = images.definition("Bash-cancel.toml", BASH_DEFINITION.replace('"procps"', '"procps", "less"'))
    proc = subprocess.Popen([str(burrow_bin()), "env", "build", "Bash", "--file", other,
                             "--data-dir", str(images.data_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    try:
        wait_until(lambda: any(p.name.startswith(".build-") for p in images.env_dir.iterdir()), 60, 0.1,
                   "the build to start")
        time.sleep(1.5)  # mmdebstrap is busy by now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - t0 < 15
    assert proc.returncode != 0, (out, err)
    assert "cancelling the build" in err and "cancelled during step" in err, err[-3000:]
    assert images.current() == images.first_version
    assert images.versions() == [images.first_version]
    assert images.leftovers() == []
    assert not [p for p in _mountpoints() if str(images.env_dir) in p], "a mount outlived the build"


def test_a_changed_definition_makes_a_new_version_running_sessions_keep_theirs(images):
    key = images.key
    old_session = images.server.create_session(key, "Bash")
    marker = "cat /etc/burrow-image-test 2>/dev/null || echo absent"
    assert images.run(old_session, marker)[0] == ["absent"]

    changed = images.definition("Bash-v2.toml", BASH_DEFINITION + '\nrun = ["echo v2 > /etc/burrow-image-test"]\n')
    p = images.build("--file", changed)
    m = VERSION_RE.search(p.stdout)
    assert m, p.stdout
    second = m.group(1)
    assert second != images.first_version
    assert "[3/6] run: echo v2 > /etc/burrow-image-test" in p.stderr, p.stderr[-3000:]
    assert images.current() == second
    # The old version is in use (the running server's catalog and the old session): kept.
    assert images.versions() == sorted([images.first_version, second])
    assert images.run(old_session, marker)[0] == ["absent"]

    # The running server serves the new version to new sessions, without a restart.
    out = images.cli("env", "ls", "--data-dir", str(images.data_dir)).stdout
    assert f"image {second}" in out, out
    new_session = images.server.create_session(key, "Bash")
    assert images.run(new_session, marker)[0] == ["v2"]
    assert images.run(old_session, marker)[0] == ["absent"], "a running session changed version"
    assert images.versions() == sorted([images.first_version, second]), "collected while in use"

    # Once nothing uses the old version, the next build (a no-op here) collects it.
    assert images.server.delete(old_session["sessionID"], key).status == 204
    p = images.build("--file", changed)
    assert "up to date" in p.stdout, p.stdout
    assert images.versions() == [second]
    assert images.run(new_session, marker)[0] == ["v2"]
    assert images.server.delete(new_session["sessionID"], key).status == 204


def test_an_edit_session_saves_onto_the_image(images):
    """A custom environment on an image template: the saved version is the whole image plus the
    edit, shared by hard links, so saving takes well under a second."""
    key = images.key
    r = images.server.request("POST", "/envs", body={"template": "Bash"}, api_key=key)
    assert r.status == 200, r
    env = r.json()["id"]
    r = images.server.request("POST", "/sessions", body={"codeSnippetID": env, "editEnabled": True},
                              api_key=key)
    assert r.status == 201, r
    edit = r.json()
    assert images.run(edit, "echo tool > ~/tool.txt && cat /etc/debian_version >/dev/null")[2] == 0
    t0 = time.monotonic()
    assert images.server.delete(edit["sessionID"], key).status == 204
    took = time.monotonic() - t0
    print(f"\nedit session of the Bash image saved and deleted in {took:.2f} s")
    session = images.server.create_session(key, env)
    out, err, code = images.run(session, "cat ~/tool.txt; command -v python3 || echo none")
    assert out == ["tool", "none"], (out, err, code)
    assert images.server.delete(session["sessionID"], key).status == 204


def test_dotnet_cannot_be_built_and_says_why(images):
    p = images.cli("env", "build", "DotNET", "--data-dir", str(images.data_dir), check=False)
    assert p.returncode != 0
    assert "DotNET: not built: Debian has no .NET SDK package" in p.stderr, p.stderr


def _mountpoints() -> list:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
