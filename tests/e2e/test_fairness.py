"""Tenant fairness: what one team does stays within its share of the host, so that another team's
sessions keep working. Each test runs two teams (and sometimes a third) against one server with
small shares, drives team A up to its share, and checks that team B is unaffected and that A's
refusals say which limit it hit."""

from __future__ import annotations

import socket
import threading
import time

from burrow_harness import ENVD_PORT, assert_error, sandbox_host, ws_upgrade

MIB = 1 << 20


def mem_total() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_memory_promises_stop_at_the_team_share_and_the_host_budget(new_server):
    per_session = 256 * MIB
    # A host budget of exactly eight sandboxes, half of it per team.
    overcommit = 8 * per_session / mem_total()
    server = new_server(pool_size=0, extra_args=[
        "--memory", "256MiB", "--memory-overcommit", repr(overcommit), "--team-share", "0.5"])
    a, b, c = (server.create_key(t) for t in ("team-a", "team-b", "team-c"))

    mine = [server.create_session(a)["sessionID"] for _ in range(4)]
    refused = server.request("POST", "/sessions", body={"codeSnippetID": "Bash"}, api_key=a)
    assert_error(refused, 429, "your team has used its share", "memory", "--team-share")

    # Team B has its own share, untouched by A's.
    theirs = [server.create_session(b) for _ in range(4)]
    with server.envd(theirs[0]) as envd:
        out, _, code = envd.run("echo fine")
    assert (out, code) == (["fine"], 0)

    # Now the host has promised everything: a third team is told so, with a 503.
    full = server.request("POST", "/sessions", body={"codeSnippetID": "Bash"}, api_key=c)
    assert_error(full, 503, "this server has promised all it has", "memory")

    # What an ended session held is given back.
    assert server.delete(mine[0], a).status == 204
    assert server.create_session(c)["sessionID"]


def test_custom_environments_and_saved_edits_have_per_team_quotas(new_server):
    server = new_server(pool_size=0, extra_args=[
        "--max-environments-per-team", "2", "--edit-quota-per-team", "8MiB"])
    a, b = server.create_key("team-a"), server.create_key("team-b")

    def new_env(key):
        return server.request("POST", "/envs", body={"template": "Bash"}, api_key=key)

    first, second = (new_env(a).json()["id"] for _ in range(2))
    assert_error(new_env(a), 429, "2 custom environments, its limit", "--max-environments-per-team")
    # Replacing one of them is not a new one; another team has its own count.
    assert server.request("POST", f"/envs/{first}", body={"template": "Bash"},
                          api_key=a).status == 204
    assert new_env(b).status == 200

    def edit(env, mib):
        r = server.request("POST", "/sessions", body={"codeSnippetID": env, "editEnabled": True},
                           api_key=a)
        assert r.status == 201, r
        doc = r.json()
        with server.envd(doc) as envd:
            out, err, code = envd.run(f"head -c {mib}M /dev/urandom > ~/blob && echo ok")
        assert (out, code) == (["ok"], 0), err
        return server.delete(doc["sessionID"], a)

    assert edit(first, 5).status == 204
    # 5 MiB saved plus up to 5 more would pass the 8 MiB quota: refused, and nothing saved.
    assert_error(edit(second, 5), 507, "quota", "--edit-quota-per-team")
    fresh = server.create_session(a, second)
    with server.envd(fresh) as envd:
        out, _, _ = envd.run("ls ~/blob 2>&1 || true")
    assert "No such file" in out[0], out
    # Deleting an environment gives its space back.
    assert server.request("DELETE", f"/envs/{first}", api_key=a).status == 204
    assert edit(second, 5).status == 204


def test_user_processes_come_before_envd_for_the_oom_killer(server, team_key):
    doc = server.create_session(team_key)
    envd_pid = server.envd_pid(doc)
    assert open(f"/proc/{envd_pid}/oom_score_adj").read().strip() == "0"
    with server.envd(doc) as envd:
        out, _, code = envd.run("cat /proc/self/oom_score_adj;"
                                " echo -1 > /proc/self/oom_score_adj 2>/dev/null && echo shielded"
                                " || echo refused")
    # Never below envd: that would take CAP_SYS_RESOURCE, which nothing in a sandbox has.
    assert (out, code) == (["1000", "refused"], 0)


def test_a_sandbox_out_of_memory_loses_a_process_not_its_session(new_server):
    server = new_server(ttl="120s", pool_size=0, extra_args=["--memory", "64MiB"])
    key = server.create_key("hungry")
    doc = server.create_session(key)
    with server.envd(doc) as envd:
        # Twelve processes of about 7 MiB each (tail keeps the last 6 MiB of what it reads until
        # its input ends): each is smaller than envd (about 11 MiB, mostly its mapped binary), so
        # by size alone the kernel would pick envd, and the session would end with it.
        out, _, code = envd.run(
            "for i in $(seq 12); do (head -c 6M /dev/zero; sleep 3) | tail -c 6M > /dev/null &"
            " done; wait; echo done",
            timeout=60)
    assert code == 0 and out[-1] == "done", out
    with server.envd(doc) as envd:
        out, _, code = envd.run("echo still here")
    assert (out, code) == (["still here"], 0)


def test_host_facts_stay_out_of_the_sandbox(server, team_key):
    doc = server.create_session(team_key)
    with server.envd(doc) as envd:
        out, _, code = envd.run(
            "wc -c < /proc/cmdline; ls /proc/pressure | wc -l;"
            " [ -e /proc/config.gz ] && wc -c < /proc/config.gz || echo 0;"
            " readlink /proc/1/exe || echo no-exe; head -c1 /proc/1/maps 2>/dev/null || echo no-maps")
    # The host's boot line, kernel configuration, pressure figures, and envd's host binary path
    # (its executable and mappings): none of them is readable.
    assert (out, code) == (["0", "0", "0", "no-exe", "no-maps"], 0), out


# Team B's round: a pipe carrying 1 MiB, an epoll instance waiting on it, and a descriptor passed
# over a unix socket, in one process of its sandbox.
B_WORKLOAD = r"""python3 -c '
import os, select, socket, array
r, w = os.pipe()
ep = select.epoll(); ep.register(r, select.EPOLLIN)
data = os.urandom(1 << 20)
if os.fork() == 0:
    os.write(w, data); os._exit(0)
got = b""
while len(got) < len(data):
    assert ep.poll(5), "epoll timed out"
    got += os.read(r, 1 << 16)
os.wait()
a, b = socket.socketpair()
a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
msg, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4))
assert got == data and anc, "pipe or fd passing failed"
print("ok")
'"""

# What team A runs in its sandboxes, each up to its own limits: processes, memory, pipes, files.
A_EXHAUSTIONS = [
    "for i in $(seq 200); do sleep 20 & done 2>/dev/null; echo forked",
    "for i in $(seq 12); do (head -c 6M /dev/zero; sleep 3) | tail -c 6M > /dev/null & done; wait;"
    " echo hogged",
    "python3 -c 'import os\nps = []\ntry:\n    while True: ps.append(os.pipe())\n"
    "except OSError as e: print(len(ps), e.strerror)'",
    "python3 -c 'import os\nn = 0\ntry:\n    while True: os.open(\"/dev/null\", 0); n += 1\n"
    "except OSError as e: print(n, e.strerror)'",
]


def test_team_b_is_unaffected_while_team_a_exhausts_every_share(new_server):
    per_session = 64 << 20
    overcommit = 8 * per_session / mem_total()
    server = new_server(ttl="300s", pool_size=0, extra_args=[
        "--memory", "64MiB", "--pids", "64", "--memory-overcommit", repr(overcommit),
        "--team-share", "0.5", "--max-connections", "64", "--max-connections-per-team", "16",
        "--max-pending-heads", "16"])
    a, b = server.create_key("team-a"), server.create_key("team-b")
    b_home = server.create_session(b)
    failures, rounds, stop = [], [], threading.Event()

    def one_round():
        t0 = time.monotonic()
        try:
            fresh = server.create_session(b)
            for doc in (b_home, fresh):
                with server.envd(doc) as envd:
                    out, err, code = envd.run(B_WORKLOAD, timeout=30)
                if (out, code) != (["ok"], 0):
                    failures.append(f"workload: {out} {err} {code}")
            if server.delete(fresh["sessionID"], b).status != 204:
                failures.append("delete")
        except Exception as e:  # noqa: BLE001 -- every failure of B's is the finding
            failures.append(f"{type(e).__name__}: {e}")
        rounds.append(time.monotonic() - t0)

    def team_b():
        while not stop.is_set():
            one_round()

    # B's pace alone first: the margin below is stated against it.
    for _ in range(3):
        one_round()
    assert not failures, failures
    baseline = sorted(rounds)[len(rounds) // 2]
    rounds.clear()
    worker = threading.Thread(target=team_b)
    worker.start()
    held = []
    try:
        # Sessions: A takes its whole share of memory and is told so.
        mine = [server.create_session(a) for _ in range(4)]
        assert_error(server.request("POST", "/sessions", body={"codeSnippetID": "Bash"}, api_key=a),
                     429, "share", "memory")
        # Inside its sandboxes, A runs into its own limits (how each command ends is A's
        # business: bash gives up when it cannot fork, the OOM killer takes a tail).
        for doc, command in zip(mine, A_EXHAUSTIONS):
            with server.envd(doc) as envd:
                envd.run(command, timeout=60)
        # Connections: A holds its team's whole share of websockets, then asks for one more.
        host = sandbox_host(ENVD_PORT, mine[0]["sessionID"], mine[0]["clientID"])
        while True:
            up = ws_upgrade(server.port, host, keep=True)
            if up.status != 101:
                assert up.status == 429, up
                break
            held.append(up.sock)
            assert len(held) <= 16, "the team cap did not hold"
        # And half-sent request heads, as many as the pending-head cap takes.
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(s)
        time.sleep(5)
    finally:
        stop.set()
        worker.join(120)
        for s in held:
            s.close()
    assert len(rounds) >= 3, f"team B got only {len(rounds)} rounds done"
    assert not failures, failures
    # The stated margin: while A exhausts everything it may, none of B's rounds takes more than
    # five times as long as alone, plus 2 s (A's processes get the same CPU weight as B's).
    slowest = max(rounds)
    print(f"team B: {baseline:.2f} s a round alone, slowest {slowest:.2f} s of {len(rounds)} "
          f"rounds while team A exhausted its shares")
    assert slowest <= 5 * baseline + 2, (baseline, rounds)
