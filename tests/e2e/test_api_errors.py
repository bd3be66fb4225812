"""Errors the API answers (issue #10, hardening): flags that name unknown environments refuse to
start, 500s tell the client an error id rather than host paths and the sandbox's log, and a
request body that cannot be read is answered for what really happened to it (413 over the limit,
408 too slow, 400 malformed or cut off), checked with raw sockets."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time

from burrow_harness import assert_error, burrow_bin

# Every server of this module creates its sessions on demand: nothing waits on a warm pool.
BURROW_SERVER = {"pool_size": 0}
# burrow_api::BODY_TIMEOUT.
BODY_TIMEOUT_S = 30


def test_unknown_environment_in_environment_limits_refuses_to_start(tmp_path):
    p = subprocess.run(
        [str(burrow_bin()), "serve", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
         "--environment-limits", "NoSuchEnv:memory=1GiB"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, p.stderr
    assert '--environment-limits: unknown environment "NoSuchEnv"; see `burrow env ls`' in p.stderr, \
        p.stderr


def test_a_500_names_an_error_id_and_no_host_path(server, team_key):
    """A create that fails on the host (its sandbox's run dir cannot be made): the client learns
    that it failed and an error id; the host path and the reason are in the server log, under
    that id."""
    run = server.data_dir / "run"
    moved = server.data_dir / "run.moved"
    run.rename(moved)
    run.write_text("not a directory")
    try:
        r = server.request("POST", "/sessions", body={"codeSnippetID": "Bash"}, api_key=team_key)
    finally:
        run.unlink()
        moved.rename(run)
    message = assert_error(r, 500, "error id ")["message"]
    assert str(server.data_dir) not in message and "/" not in message, message
    error_id = re.fullmatch(r".+; error id ([0-9a-f]{8}) in the server log", message)
    assert error_id, message
    log = [ln for ln in server.log_path.read_text(errors="replace").splitlines()
           if error_id.group(1) in ln]
    assert log and str(run) in log[0], f"no log line names {error_id.group(1)} and {run}:\n" \
                                       f"{server.log_tail()}"
    # The failure was the host's, not the server's: creates work again.
    server.create_session(team_key)


def raw_answer(port: int, head: bytes, body: bytes = b"", *, end_body: bool = False,
               timeout: float = BODY_TIMEOUT_S + 15) -> tuple:
    """Sends `head` and `body` on a fresh connection (then half-closes it if `end_body`) and
    returns (status, JSON body, seconds until the answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t0 = time.monotonic()
        s.sendall(head + body)
        if end_body:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
            head_part, sep, rest = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head_part)
            if sep and length and len(rest) >= int(length.group(1)):
                break
        took = time.monotonic() - t0
    head_part, _, rest = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 "), answer[:300]
    return int(head_part.split(b" ", 2)[1]), json.loads(rest), took


def create_head(key: str, framing: str) -> bytes:
    return (f"POST /sessions?api_key={key} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode()


def test_a_body_cut_off_before_its_end_is_400(server, team_key):
    status, doc, _ = raw_answer(server.port, create_head(team_key, "Content-Length: 100"),
                                b'{"codeSnippetID": "Ba', end_body=True)
    assert (status, doc["code"]) == (400, 400), doc
    assert "ended before all of it arrived" in doc["message"], doc


def test_malformed_chunked_framing_is_400(server, team_key):
    status, doc, _ = raw_answer(server.port, create_head(team_key, "Transfer-Encoding: chunked"),
                                b"zz\r\n{}\r\n0\r\n\r\n")
    assert (status, doc["code"]) == (400, 400), doc
    assert "malformed" in doc["message"], doc


def test_a_chunked_body_over_the_limit_is_413(server, team_key):
    piece = b"x" * (1 << 16)
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(17)) + b"0\r\n\r\n"
    status, doc, _ = raw_answer(server.port, create_head(team_key, "Transfer-Encoding: chunked"),
                                body)
    assert (status, doc["code"]) == (413, 413), doc
    assert "larger than 1048576 bytes" in doc["message"], doc


def test_a_body_that_does_not_arrive_in_time_is_408(server, team_key):
    status, doc, took = raw_answer(server.port, create_head(team_key, "Content-Length: 100"),
                                   b'{"codeSnippetID": ')
    assert (status, doc["code"]) == (408, 408), doc
    assert f"did not arrive within {BODY_TIMEOUT_S} s" in doc["message"], doc
    assert BODY_TIMEOUT_S - 1 <= took < BODY_TIMEOUT_S + 10, took


def test_openapi_documents_what_every_route_can_answer(server):
    r = server.request("GET", "/openapi.json")
    assert r.status == 200, r
    doc = r.json()
    create = doc["paths"]["/sessions"]["post"]["responses"]
    assert "--min-available-memory" in create["503"]["description"], create.get("503")
    assert "--max-connections" in create["503"]["description"], create["503"]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            answers = operation["responses"]
            where = f"{method.upper()} {path}"
            # The connection caps answer any route.
            assert "503" in answers, where
            if operation.get("security"):
                assert {"400", "500"} <= set(answers), (where, sorted(answers))
            if "requestBody" in operation:
                assert {"400", "408", "413"} <= set(answers), (where, sorted(answers))
            for status, answer in answers.items():
                if int(status) >= 400:
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (where, status)
