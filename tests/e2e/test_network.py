"""Sandbox networking (`--network internet`, the default): egress through NAT, the fence around
the host, private networks and other sandboxes, DNS through burrow's resolver, and
`--network none`.

The tests' "internet" is a host they create: a network namespace (`burrow-test-inet`) joined to
this host by a veth, with TEST-NET-3 addresses of 203.0.113.0/29 only (the rest of TEST-NET-3
may be in use: this workplace's package mirror answers at 203.0.113.80, and a /24 on the veth
took every package download of the machine into the namespace while the tests ran), an HTTP
server and a DNS server of its own. Addresses of the classes no sandbox may reach (RFC 1918, CGNAT, link-local) live in
that namespace too, routed there by the host. Before anything is sent, `ip route get` checks that
the destination is this host or leads into the namespace; nothing goes anywhere else.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from burrow_harness import wait_until

NETNS = "burrow-test-inet"
HOST_LINK = "tinet-h"  # not "bw*": those are the sandboxes' links
NS_LINK = "tinet-n"
HOST_ADDR = "203.0.113.1"
INET_ADDR = "203.0.113.2"
HTTP_PORT = 8080
# Addresses no sandbox may reach, routed by the host into the test namespace (so that the host
# itself reaches them: only the firewall keeps the sandboxes out).
FENCED = {
    "rfc1918-10": "10.77.0.2",
    "rfc1918-172": "172.16.77.2",
    "rfc1918-192": "192.168.77.2",
    "cgnat": "100.64.77.2",
    "link-local": "169.254.77.2",
}
TEST_NAME = "web.burrow-test.example"
FILE_BYTES = 4 << 20

BURROW_SERVER = {"ttl": "120s", "pool_size": 0, "extra_args": ["--dns-upstream", INET_ADDR]}

DNS_SERVER = textwrap.dedent(f"""
    import socket, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("{INET_ADDR}", 53))
    while True:
        q, peer = s.recvfrom(512)
        i, name = 12, []
        while q[i]:
            name.append(q[i + 1:i + 1 + q[i]].decode()); i += 1 + q[i]
        question = q[12:i + 5]
        qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
        known = ".".join(name).lower() == "{TEST_NAME}"
        answers = b""
        if known and qtype == 1:
            answers = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("{INET_ADDR}")
        flags = 0x8180 if known else 0x8183
        header = q[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
        s.sendto(header + question + answers, peer)
""")


UDP_PORT = 9999
UDP_COLLECTOR = textwrap.dedent(f"""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("{INET_ADDR}", {UDP_PORT}))
    while True:
        data, peer = s.recvfrom(512)
        print(data.decode(errors="replace"), flush=True)
""")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


def routed_to_test_host(address: str) -> bool:
    """Whether the host sends `address` into the test namespace (or keeps it: its own)."""
    out = sh("ip", "route", "get", address).stdout
    return out.startswith("local ") or f" dev {HOST_LINK} " in out


def host_addresses() -> list:
    out = sh("ip", "-4", "-o", "addr", "show").stdout
    addrs = []
    for line in out.splitlines():
        fields = line.split()
        if fields[1].startswith("bw"):
            continue
        addrs.append(fields[3].split("/")[0])
    return addrs


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    """The test's internet: namespace, veth, routes, HTTP and DNS servers."""
    sh("ip", "netns", "del", NETNS, check=False)
    sh("ip", "link", "del", HOST_LINK, check=False)
    root = tmp_path_factory.mktemp("inet")
    (root / "big").write_bytes(os.urandom(FILE_BYTES))
    (root / "hello").write_text("hello from the test internet\n")
    sh("ip", "netns", "add", NETNS)
    procs = []
    try:
        sh("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", NS_LINK, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_ADDR}/29", "dev", HOST_LINK)
        sh("ip", "link", "set", HOST_LINK, "up")
        ns = ("ip", "netns", "exec", NETNS)
        sh(*ns, "ip", "addr", "add", f"{INET_ADDR}/29", "dev", NS_LINK)
        sh(*ns, "ip", "link", "set", NS_LINK, "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        for address in FENCED.values():
            sh(*ns, "ip", "addr", "add", f"{address}/32", "dev", "lo")
            sh("ip", "route", "add", f"{address}/32", "via", INET_ADDR)
        log = open(root / "http.log", "w")
        procs.append(subprocess.Popen([*ns, sys.executable, "-m", "http.server", "--bind", "0.0.0.0",
                                       str(HTTP_PORT)], cwd=root, stdout=log, stderr=log))
        procs.append(subprocess.Popen([*ns, sys.executable, "-c", DNS_SERVER],
                                      stdout=subprocess.DEVNULL, stderr=open(root / "dns.log", "w")))
        procs.append(subprocess.Popen([*ns, sys.executable, "-c", UDP_COLLECTOR],
                                      stdout=open(root / "udp.log", "w"), stderr=subprocess.STDOUT))
        for address in [INET_ADDR, *FENCED.values()]:
            assert routed_to_test_host(address), sh("ip", "route", "get", address).stdout
        wait_until(lambda: sh("curl", "-sf", "-o", "/dev/null", f"http://{INET_ADDR}:{HTTP_PORT}/hello",
                              check=False).returncode == 0, 10, what="the test HTTP server")
        yield root
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for address in FENCED.values():
            sh("ip", "route", "del", f"{address}/32", check=False)
        sh("ip", "link", "del", HOST_LINK, check=False)
        sh("ip", "netns", "del", NETNS, check=False)


@pytest.fixture
def sandbox(server, team_key, inet):
    """A fresh Python3 session's envd client; the session is deleted afterwards."""
    doc = server.create_session(team_key, env="Python3")
    with server.envd(doc) as envd:
        envd.session = doc
        yield envd
    server.delete(doc["sessionID"], team_key)


def py(envd, code: str, timeout: float = 30) -> tuple:
    """Runs Python `code` in the sandbox; returns (stdout, exit code)."""
    quoted = code.replace("'", "'\"'\"'")
    out, err, result = envd.run(f"python3 -c '{quoted}'", timeout=timeout)
    return "\n".join(out + err), result


def connect_code(address: str, port: int, timeout: float = 2.0, source: str = "") -> str:
    bind = f"s.bind(({source!r}, 0)); " if source else ""
    return (f"import socket; s = socket.socket(); s.settimeout({timeout}); {bind}"
            f"s.connect(({address!r}, {port})); print('open')")


def fetch_code(url: str) -> str:
    return ("import urllib.request, hashlib; "
            f"b = urllib.request.urlopen({url!r}, timeout=10).read(); "
            "print(len(b), hashlib.sha256(b).hexdigest())")


def sandbox_address(envd) -> str:
    out, code = py(envd, "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                         "s.connect(('203.0.113.2', 9)); print(s.getsockname()[0])")
    assert code == 0, out
    return out.strip()


def test_egress_through_nat_by_ip_and_by_name(sandbox, inet):
    import hashlib
    want = f"{FILE_BYTES} {hashlib.sha256((inet / 'big').read_bytes()).hexdigest()}"
    assert routed_to_test_host(INET_ADDR)
    out, code = py(sandbox, fetch_code(f"http://{INET_ADDR}:{HTTP_PORT}/big"))
    assert code == 0 and out.strip() == want, out
    # The test host sees the host's address, not the sandbox's.
    log = (inet / "http.log").read_text()
    clients = set(re.findall(r"^(\S+) - - .*GET /big", log, re.M))
    assert clients == {HOST_ADDR}, log
    # By name, through burrow's resolver forwarding to the test's DNS server.
    out, code = py(sandbox, fetch_code(f"http://{TEST_NAME}:{HTTP_PORT}/big"))
    assert code == 0 and out.strip() == want, out
    resolv, _, _ = sandbox.run("cat /etc/resolv.conf")
    gateway = ipaddress.ip_address(sandbox_address(sandbox)) - 1
    assert f"nameserver {gateway}" in resolv, resolv


def test_dns_goes_only_to_burrows_resolver(sandbox, inet):
    assert routed_to_test_host(INET_ADDR)
    # A query sent straight to the test's DNS server is dropped; through the gateway it works.
    query = ("import socket, struct; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
             "s.settimeout(2); "
             "q = b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00' + b''.join("
             f"bytes([len(p)]) + p.encode() for p in {TEST_NAME!r}.split('.')) + b'\\x00\\x00\\x01\\x00\\x01'; "
             "s.sendto(q, (ADDR, 53)); r = s.recv(512); print('answered', r[:2].hex())")
    out, code = py(sandbox, query.replace("ADDR", repr(INET_ADDR)))
    assert code != 0 and "answered" not in out, out
    gateway = str(ipaddress.ip_address(sandbox_address(sandbox)) - 1)
    out, code = py(sandbox, query.replace("ADDR", repr(gateway)))
    assert code == 0 and "answered 1234" in out, out


def test_fenced_destinations_are_unreachable(sandbox, inet, server):
    # The host reaches each of them (so the route is there), the sandbox does not.
    for name, address in FENCED.items():
        assert routed_to_test_host(address), address
        assert sh("curl", "-sf", "-o", "/dev/null", "-m", "5",
                  f"http://{address}:{HTTP_PORT}/hello", check=False).returncode == 0, name
        started = time.monotonic()
        out, code = py(sandbox, connect_code(address, HTTP_PORT))
        assert code != 0 and "open" not in out, (name, out)
        assert time.monotonic() - started < 15, name


def test_the_host_is_unreachable(sandbox, server, inet):
    # A listener on every host address: the host reaches it, the sandbox does not, on any of
    # the host's addresses (its gateway included), nor burrow's API port through the gateway.
    import socket
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    try:
        gateway = str(ipaddress.ip_address(sandbox_address(sandbox)) - 1)
        targets = [(a, port) for a in host_addresses() + [gateway]] + [(gateway, server.port)]
        for address, p in targets:
            assert routed_to_test_host(address), address
            out, code = py(sandbox, connect_code(address, p))
            assert code != 0 and "open" not in out, (address, p, out)
        with socket.create_connection((HOST_ADDR, port), timeout=2):
            pass
    finally:
        listener.close()


def test_other_sandboxes_are_unreachable(server, team_key, inet):
    a = server.create_session(team_key, env="Python3")
    b = server.create_session(team_key, env="Python3")
    try:
        with server.envd(a) as ea, server.envd(b) as eb:
            address_b = sandbox_address(eb)
            eb.call("process_start", ["listener", "python3 -m http.server --bind 0.0.0.0 8000", {}, ""])
            wait_until(lambda: py(eb, connect_code("127.0.0.1", 8000))[1] == 0, 10,
                       what="the listener in sandbox b")
            out, code = py(ea, connect_code(address_b, 8000))
            assert code != 0 and "open" not in out, out
    finally:
        server.delete(a["sessionID"], team_key)
        server.delete(b["sessionID"], team_key)


def test_spoofed_sources_are_dropped(server, sandbox, inet):
    """With CAP_NET_ADMIN in its namespace (which no sandbox process keeps), a sandbox could add
    another address to eth0; the host drops what it sends from there. UDP, so that NAT would
    carry a spoofed datagram to the test host if the firewall let it through."""
    own = sandbox_address(sandbox)
    pid = server.envd_pid(sandbox.session)
    enter = ("nsenter", f"--net=/proc/{pid}/ns/net")
    spoofed = str(ipaddress.ip_address(own) + 4)  # the next slot's sandbox address
    sh(*enter, "ip", "addr", "add", f"{spoofed}/32", "dev", "eth0")
    assert routed_to_test_host(INET_ADDR)
    marks = {src: "from-" + secrets.token_hex(4) for src in (own, spoofed)}
    for src, mark in marks.items():
        code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                f"s.bind(({src!r}, 0)); s.sendto({mark!r}.encode(), ({INET_ADDR!r}, {UDP_PORT}))")
        sent = sh(*enter, sys.executable, "-c", code, check=False)
        assert sent.returncode == 0, sent
    wait_until(lambda: marks[own] in (inet / "udp.log").read_text(), 5,
               what="the datagram from the sandbox's own address")
    time.sleep(0.5)
    assert marks[spoofed] not in (inet / "udp.log").read_text()


def link_of(address: str):
    """The host link holding `address`, if any."""
    for line in sh("ip", "-4", "-o", "addr", "show").stdout.splitlines():
        fields = line.split()
        if fields[3].split("/")[0] == address:
            return fields[1]
    return None


def test_deleting_a_session_removes_its_link(server, team_key, inet):
    doc = server.create_session(team_key, env="Python3")
    with server.envd(doc) as envd:
        gateway = str(ipaddress.ip_address(sandbox_address(envd)) - 1)
    link = link_of(gateway)
    assert link and link.startswith("bw"), link
    assert server.delete(doc["sessionID"], team_key).status == 204
    assert link_of(gateway) is None
    assert sh("ip", "link", "show", link, check=False).returncode != 0


def test_network_none_keeps_only_loopback(new_server, inet):
    srv = new_server(ttl="60s", pool_size=0, extra_args=["--network", "none"])
    key = srv.admin_key
    doc = srv.create_session(key, env="Bash")
    with srv.envd(doc) as envd:
        out, _, _ = envd.run("cat /proc/net/dev")
        ifaces = {ln.split(":")[0].strip() for ln in out[2:] if ":" in ln}
        assert ifaces == {"lo"}, out
        assert routed_to_test_host(INET_ADDR)
        out, _, _ = envd.run(f"(echo > /dev/tcp/{INET_ADDR}/{HTTP_PORT}) 2>/dev/null && echo open || echo closed",
                             timeout=20)
        assert out == ["closed"], out
    srv.delete(doc["sessionID"], key)


def test_adopted_sandboxes_keep_their_network_after_kill9(new_server, inet):
    srv = new_server(ttl="120s", pool_size=0, extra_args=["--dns-upstream", INET_ADDR])
    key = srv.admin_key
    doc = srv.create_session(key, env="Python3")
    with srv.envd(doc) as envd:
        address = sandbox_address(envd)
    srv.restart(graceful=False)
    assert routed_to_test_host(INET_ADDR)
    with srv.envd(doc) as envd:
        assert sandbox_address(envd) == address
        out, code = py(envd, fetch_code(f"http://{TEST_NAME}:{HTTP_PORT}/hello"))
        assert code == 0 and out.startswith("29 "), out
    assert srv.delete(doc["sessionID"], key).status == 204
    assert link_of(str(ipaddress.ip_address(address) - 1)) is None


# A second test host behind the same link, outside the allow lists below.
OTHER_ADDR = "203.0.113.3"


@pytest.fixture(scope="module")
def other_host(inet):
    ns = ("ip", "netns", "exec", NETNS)
    sh(*ns, "ip", "addr", "add", f"{OTHER_ADDR}/32", "dev", "lo")
    try:
        assert routed_to_test_host(OTHER_ADDR)
        wait_until(lambda: sh("curl", "-sf", "-o", "/dev/null", "-m", "5",
                              f"http://{OTHER_ADDR}:{HTTP_PORT}/hello", check=False).returncode == 0,
                   10, what="the test HTTP server on the second address")
        yield OTHER_ADDR
    finally:
        sh(*ns, "ip", "addr", "del", f"{OTHER_ADDR}/32", "dev", "lo", check=False)


def policy_elements(srv) -> str:
    """The elements of the egress sets of `srv`'s table."""
    subnet = (srv.data_dir / "network" / "subnet").read_text().strip()
    table = "burrow_" + subnet.replace(".", "_").replace("/", "_")
    return "".join(sh("nft", "list", "set", "inet", table, s).stdout
                   for s in ("egress_restricted", "egress_allow", "egress_deny"))


def reaches(envd, address: str) -> bool:
    """Whether a TCP connect from the sandbox to `address` succeeds within 5 s (a loaded
    2-core host can take seconds to answer a fresh sandbox's first packets)."""
    assert routed_to_test_host(address), address
    out, code = py(envd, connect_code(address, HTTP_PORT, timeout=5.0))
    return code == 0 and out.strip() == "open"


def test_an_allow_list_limits_egress_within_the_fence(new_server, inet, other_host):
    fenced = FENCED["rfc1918-10"]
    srv = new_server(ttl="120s", pool_size=0, extra_args=[
        "--dns-upstream", INET_ADDR, "--egress-allow", f"{INET_ADDR}/32,{fenced}/32"])
    key = srv.admin_key
    doc = srv.create_session(key, env="Python3")
    with srv.envd(doc) as envd:
        address = sandbox_address(envd)
        assert reaches(envd, INET_ADDR)
        out, code = py(envd, fetch_code(f"http://{TEST_NAME}:{HTTP_PORT}/hello"))
        assert code == 0 and out.startswith("29 "), out
        assert not reaches(envd, other_host)
        # Allowing a fenced address does not open it.
        assert not reaches(envd, fenced)
    assert f"{address} . {INET_ADDR}" in policy_elements(srv)
    assert srv.delete(doc["sessionID"], key).status == 204
    assert address not in policy_elements(srv)


def test_a_deny_list_wins_over_the_allow_list_and_survives_kill9(new_server, inet, other_host):
    srv = new_server(ttl="120s", pool_size=0, extra_args=[
        "--dns-upstream", INET_ADDR, "--egress-allow", "203.0.113.0/24",
        "--egress-deny", f"{INET_ADDR}/32"])
    key = srv.admin_key
    doc = srv.create_session(key, env="Python3")
    with srv.envd(doc) as envd:
        address = sandbox_address(envd)
        assert reaches(envd, other_host)
        assert not reaches(envd, INET_ADDR)
    # A restart replaces the table; the adopted sandbox gets its policy back.
    srv.restart(graceful=False)
    with srv.envd(doc) as envd:
        assert reaches(envd, other_host)
        assert not reaches(envd, INET_ADDR)
    assert address in policy_elements(srv)
    assert srv.delete(doc["sessionID"], key).status == 204
    assert address not in policy_elements(srv)


def test_a_deny_list_alone_blocks_by_ip_and_by_name(new_server, inet, other_host):
    srv = new_server(ttl="120s", pool_size=0, extra_args=[
        "--dns-upstream", INET_ADDR, "--egress-deny", "203.0.113.0/24"])
    key = srv.admin_key
    doc = srv.create_session(key, env="Python3")
    with srv.envd(doc) as envd:
        assert not reaches(envd, INET_ADDR)
        assert not reaches(envd, other_host)
        # The name still resolves (the resolver runs on the host); the connection is dropped.
        resolve = f"import socket; print(socket.gethostbyname({TEST_NAME!r}))"

        def resolved() -> bool:
            out, code = py(envd, resolve)
            return code == 0 and out.strip() == INET_ADDR

        wait_until(resolved, 20, what=f"{TEST_NAME} to resolve")
        out, code = py(envd, fetch_code(f"http://{TEST_NAME}:{HTTP_PORT}/hello").replace(
            "timeout=10", "timeout=3"))
        assert code != 0, out
    assert srv.delete(doc["sessionID"], key).status == 204


def test_env_build_refuses_a_file_whose_network_policy_would_be_ignored(tmp_path):
    # `--file` builds an image; the network policy comes from the definition compiled in.
    from burrow_harness import burrow_bin
    definition = tmp_path / "Bash.toml"
    definition.write_text('suite = "bookworm"\npackages = ["procps"]\nnetwork = "none"\n')
    p = subprocess.run([str(burrow_bin()), "env", "build", "Bash", "--file", str(definition),
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "sandboxes follow the network policy compiled into burrow" in p.stderr, p.stderr
    assert not (tmp_path / "data" / "environments" / "images").exists()
