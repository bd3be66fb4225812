"""A sandbox's disk (`--disk`, issue #15): its writable layer lives on the host's disk, not in its
memory, the advertised size is usable in full and no more (ENOSPC inside, nobody else notices),
nothing of it outlives the session, and creates are refused past the data dir's free space."""

from __future__ import annotations

import os
from pathlib import Path

from burrow_harness import assert_error, host_cgroup_dirs, wait_until

MIB = 1 << 20

BURROW_SERVER = {
    "pool_size": 0,
    "extra_args": ["--memory", "64MiB", "--disk", "256MiB"],
}


def run(envd, cmd, timeout=120):
    out, err, code = envd.run(cmd, timeout=timeout)
    return out, err, int(code)


def loop_devices_of(data_dir: Path) -> dict:
    """`/sys/block/loopN` → backing file, for the loop devices backed by files of `data_dir`."""
    out = {}
    for dev in Path("/sys/block").glob("loop*"):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(str(data_dir)):
            out[dev.name] = backing
    return out


def memory_cgroup(pid: int) -> Path:
    for d in host_cgroup_dirs(pid):
        if (d / "memory.usage_in_bytes").exists() or (d / "memory.current").exists():
            return d
    raise AssertionError(f"no memory cgroup of pid {pid}: {host_cgroup_dirs(pid)}")


def memory_of(cgroup: Path) -> tuple:
    """(usage, shmem) of a memory cgroup, in bytes: shmem is where a tmpfs's pages go."""
    for name in ("memory.usage_in_bytes", "memory.current"):
        if (cgroup / name).exists():
            usage = int((cgroup / name).read_text())
    stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    return usage, int(stat.get("total_shmem", stat.get("shmem", 0)))


def test_the_disk_is_on_disk_usable_in_full_and_bounded(server, team_key):
    layers = server.data_dir / "layers"
    session = server.create_session(team_key, "Bash")
    other = server.create_session(team_key, "Bash")
    pid = server.envd_pid(session)
    cgroup = memory_cgroup(pid)
    with server.envd(session) as envd:
        # 200 MiB under a 64 MiB memory limit: on a tmpfs layer the sandbox was OOM-killed.
        out, err, code = run(envd, "dd if=/dev/urandom of=$HOME/big bs=1M count=200 status=none "
                                   "&& sync && ls -l $HOME/big")
        assert code == 0, (out, err)
        assert str(200 * MIB) in out[0], out
        usage, shmem = memory_of(cgroup)
        assert shmem < 16 * MIB, f"the sandbox's files are in its memory: shmem {shmem}"
        assert usage < 64 * MIB, f"the sandbox uses {usage} bytes of memory"
        out, err, code = run(envd, "echo alive && cmp -n 1048576 $HOME/big $HOME/big && echo same")
        assert (out, code) == (["alive", "same"], 0), (out, err)

        # The rest of the 256 MiB is there (less what the start took), and no more.
        out, err, code = run(envd, "dd if=/dev/zero of=$HOME/rest bs=1M count=55 status=none "
                                   "&& echo fits")
        assert (out, code) == (["fits"], 0), (out, err)
        out, err, code = run(envd, "dd if=/dev/zero of=$HOME/more bs=1M count=100 2>&1; echo $?")
        assert any("No space left on device" in line for line in out), out
        assert out[-1] != "0", out

    # The other session, its host and its data dir did not notice.
    with server.envd(other) as envd:
        out, err, code = run(envd, "dd if=/dev/zero of=$HOME/f bs=1M count=32 status=none "
                                   "&& echo ok")
        assert (out, code) == (["ok"], 0), (out, err)
    with server.envd(session) as envd:
        out, err, code = run(envd, "rm $HOME/more $HOME/rest && echo x > $HOME/small && cat "
                                   "$HOME/small")
        assert (out, code) == (["x"], 0), (out, err)

    # Each session's layer is a loop device over an image in the data dir; deleting the session
    # leaves none of it behind.
    devices = loop_devices_of(server.data_dir)
    assert len(devices) == 2, devices
    assert sorted(Path(b).parent for b in devices.values()) == [layers, layers], devices
    for s in (session, other):
        assert server.delete(s["sessionID"], team_key).status == 204
    assert loop_devices_of(server.data_dir) == {}
    assert sorted(p.name for p in layers.glob("*.img")) == [], list(layers.iterdir())
    mounts = Path("/proc/self/mountinfo").read_text()
    for dev in devices:
        assert f"/dev/{dev} " not in mounts, mounts


def test_creates_past_the_free_disk_are_refused(new_server):
    probe = new_server(pool_size=0)
    stat = os.statvfs(probe.data_dir)
    free = stat.f_bavail * stat.f_frsize
    probe.stop()
    # The budget is the free space less 10% of it; a team's share is half of that, 45%.
    disk_mib = int(free * 0.35) // MIB
    srv = new_server(pool_size=0, extra_args=["--disk", f"{disk_mib}MiB", "--disk-overcommit", "1"])
    a, b, c = srv.create_key("disk-a"), srv.create_key("disk-b"), srv.create_key("disk-c")
    first = srv.create_session(a, "Bash")
    resp = srv.request("POST", f"/sessions?api_key={a}", body={"codeSnippetID": "Bash"})
    assert_error(resp, 429, "disk", f"this one needs {disk_mib} MiB")
    srv.create_session(b, "Bash")
    resp = srv.request("POST", f"/sessions?api_key={c}", body={"codeSnippetID": "Bash"})
    assert_error(resp, 503, "disk")
    # What a session was promised comes back when it goes, and the sparse images took next to
    # nothing of the disk they were promised.
    assert srv.delete(first["sessionID"], a).status == 204
    srv.create_session(c, "Bash")
    used = sum(p.stat().st_blocks * 512 for p in (srv.data_dir / "layers").rglob("*.img"))
    assert used < 64 * MIB, used
    wait_until(lambda: len(loop_devices_of(srv.data_dir)) == 2, 5, what="two layers")


def test_a_restart_keeps_adopted_layers_and_removes_orphaned_ones(new_server):
    srv = new_server(pool_size=0, ttl="60s", extra_args=["--disk", "64MiB"])
    key = srv.create_key("disk-restart")
    session = srv.create_session(key, "Bash")
    with srv.envd(session) as envd:
        assert run(envd, "echo kept > $HOME/f && echo ok")[0] == ["ok"]
    layers = srv.data_dir / "layers"
    (image,) = layers.glob("*.img")
    # An image no sandbox holds (its server died between making it and starting the sandbox).
    orphan = layers / "orphan0layer.img"
    orphan.write_bytes(b"")
    srv.restart(graceful=False)
    wait_until(lambda: not orphan.exists(), 10, what="the orphaned image to be removed")
    assert image.exists() and len(loop_devices_of(srv.data_dir)) == 1
    with srv.envd(session) as envd:
        assert run(envd, "cat $HOME/f")[0] == ["kept"]
    assert srv.delete(session["sessionID"], key).status == 204
    assert not image.exists() and loop_devices_of(srv.data_dir) == {}
