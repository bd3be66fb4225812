"""envd acts on files as the sandbox user, and as root only on paths without symlinks (issue #15),
through the API and the gateway: a symlink that user code plants cannot turn a client's write,
upload, mkdir or remove into one as the sandbox's root. The target (the sandbox's /etc/passwd, root's
and not writable by `user`) stays unchanged, the client gets an error that says why, and what `user`
may write keeps working, as does what only root may (`/index.py`, `/root/y`), made `user`'s."""

from __future__ import annotations

import secrets

import pytest

from burrow_harness import ENVD_PORT, RpcError, sandbox_host

BURROW_SERVER = {"ttl": "30s"}

REASON = "envd accesses files as the sandbox user 'user'"


def _sh(envd, cmd: str) -> list:
    out, err, exit_ = envd.run(cmd)
    assert exit_ == 0, f"{cmd!r}: stdout={out} stderr={err} exit={exit_}"
    return out


def _passwd(envd) -> str:
    return envd.call("filesystem_read", ["/etc/passwd"])


def _plant(envd) -> str:
    """As `user`, the links a hostile process would leave in its home; returns /etc/passwd."""
    assert _sh(envd, "id -un") == ["user"]
    _sh(envd, "ln -s /etc/passwd ~/x && ln -s /etc ~/etc && ls -l ~/x ~/etc")
    before = _passwd(envd)
    assert before.startswith("root:"), before
    assert _sh(envd, "stat -c '%U %a' /etc/passwd; test -w /etc/passwd || echo not-writable") == \
        ["root 644", "not-writable"], "the sandbox's /etc/passwd should be root's and not user-writable"
    return before


def _multipart(path: str, content: bytes) -> tuple:
    boundary = "burrow" + secrets.token_hex(8)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize("method,params", [
    ("filesystem_write", ["/home/user/x", "pwned::0:0::/:/bin/sh\n"]),
    ("filesystem_writeBase64", ["/home/user/x", "cHduZWQ="]),
    ("filesystem_write", ["/home/user/etc/passwd", "pwned"]),
    ("filesystem_write", ["/home/user/etc/new-file", "pwned"]),
    ("filesystem_makeDir", ["/home/user/etc/new-dir"]),
    ("filesystem_remove", ["/home/user/etc/passwd"]),
])
def test_rpc_through_a_planted_symlink_is_refused(server, team_key, method, params):
    doc = server.create_session(team_key)
    with server.envd(doc) as envd:
        before = _plant(envd)
        with pytest.raises(RpcError) as refused:
            envd.call(method, params)
        message = refused.value.error.get("message", "")
        assert "permission denied" in message and REASON in message, refused.value.error
        assert _passwd(envd) == before, f"{method} {params[0]} changed /etc/passwd"
        assert _sh(envd, "ls /etc/new-file /etc/new-dir 2>/dev/null; echo done") == ["done"], \
            f"{method} {params[0]} created something in /etc"


def test_upload_through_a_planted_symlink_is_refused(server, team_key):
    doc = server.create_session(team_key)
    host = sandbox_host(ENVD_PORT, doc["sessionID"], doc["clientID"])
    with server.envd(doc) as envd:
        before = _plant(envd)
        body, headers = _multipart("/home/user/etc/passwd", b"pwned::0:0::/:/bin/sh\n")
        r = server.request("POST", "/file", raw=body, headers=headers, host=host)
        assert r.status == 403, r
        assert "permission denied" in r.text and REASON in r.text, r
        assert _passwd(envd) == before, "the upload changed /etc/passwd"
        assert _sh(envd, "ls -A /etc | grep -c burrow-upload || true") == ["0"], \
            "the upload left a staging file in /etc"

        # Onto the link itself: the upload replaces the user's own entry, never its target.
        body, headers = _multipart("/home/user/x", b"mine\n")
        r = server.request("POST", "/file", raw=body, headers=headers, host=host)
        assert r.status == 200, r
        assert _passwd(envd) == before, "the upload onto ~/x changed /etc/passwd"
        assert _sh(envd, "test -L ~/x && echo link || cat ~/x") == ["mine"]


def test_what_user_may_write_keeps_working(server, team_key):
    doc = server.create_session(team_key)
    host = sandbox_host(ENVD_PORT, doc["sessionID"], doc["clientID"])
    with server.envd(doc) as envd:
        envd.call("filesystem_makeDir", ["/home/user/a/b"])
        envd.call("filesystem_write", ["/home/user/a/b/f", "home"])
        envd.call("filesystem_write", ["/tmp/t", "tmp"])
        _sh(envd, "ln -s ~/a/b/f ~/own")
        envd.call("filesystem_write", ["/home/user/own", "through my link"])
        body, headers = _multipart("/tmp/up", b"uploaded")
        assert server.request("POST", "/file", raw=body, headers=headers, host=host).status == 200
        out = _sh(envd, "for f in ~/a/b/f /tmp/t /tmp/up; do cat $f; echo; done; "
                        "stat -c '%U:%G' ~/a ~/a/b ~/a/b/f /tmp/t /tmp/up")
        assert out == ["through my link", "tmp", "uploaded", *["user:user"] * 5], out
        envd.call("filesystem_remove", ["/home/user/a"])
        assert _sh(envd, "ls -A ~") == ["own"]


def test_what_only_root_may_write_works_and_is_users(server, team_key):
    """e2b >= 0.5.0's run_code writes /index.py, /index.js, /main.sh, and a session `cwd` is made
    with makeDir at open: paths in directories only root may write. envd writes them as root (no
    symlink on the way) and gives them to `user`."""
    doc = server.create_session(team_key)
    host = sandbox_host(ENVD_PORT, doc["sessionID"], doc["clientID"])
    with server.envd(doc) as envd:
        assert _sh(envd, "stat -c '%U %a' / /root; test -w / || echo not-writable") == \
            ["root 755", "root 700", "not-writable"]
        envd.call("filesystem_write", ["/index.py", "print('py ran')\n"])
        envd.call("filesystem_writeBase64", ["/main.sh", "ZWNobyAic2ggcmFuIgo="])  # echo "sh ran"
        envd.call("filesystem_makeDir", ["/newdir/sub"])
        envd.call("filesystem_write", ["/root/y", "in root's home"])
        assert _sh(envd, "python3 /index.py; bash /main.sh; stat -c '%U:%G' /index.py /main.sh "
                         "/newdir /newdir/sub") == ["py ran", "sh ran", *["user:user"] * 4]
        # /root stays root's and closed to `user`; the client reads back what it wrote there.
        assert envd.call("filesystem_read", ["/root/y"]) == "in root's home"
        assert envd.call("filesystem_list", ["/root"]) == [{"isDir": False, "name": "y"}]
        assert _sh(envd, "cat /root/y 2>/dev/null || echo denied") == ["denied"]

        for path in ["/index.py", "/main.sh"]:
            envd.call("filesystem_remove", [path])
        assert _sh(envd, "ls /index.py /main.sh 2>/dev/null; echo done") == ["done"]
        for path, content in [("/index.py", b"print('uploaded py')\n"), ("/main.sh", b"echo uploaded sh\n")]:
            body, headers = _multipart(path, content)
            r = server.request("POST", "/file", raw=body, headers=headers, host=host)
            assert r.status == 200, r
        assert _sh(envd, "python3 /index.py; bash /main.sh; stat -c '%U:%G' /index.py /main.sh; "
                         "ls -A / | grep -c burrow-upload || true") == \
            ["uploaded py", "uploaded sh", "user:user", "user:user", "0"]
        r = server.request("GET", "/file?path=/root/y", host=host)
        assert r.status == 200 and r.text == "in root's home", r
        envd.call("filesystem_remove", ["/newdir"])
        assert _sh(envd, "test -e /newdir || echo gone") == ["gone"]


def test_planted_links_into_root_only_places_are_refused(server, team_key):
    """The links `user` plants toward root's own places (/root, 0700) or root's files redirect
    nothing, although envd may write there by the real path."""
    doc = server.create_session(team_key)
    host = sandbox_host(ENVD_PORT, doc["sessionID"], doc["clientID"])
    with server.envd(doc) as envd:
        envd.call("filesystem_write", ["/root/y", "root's"])
        before = _plant(envd)
        _sh(envd, "ln -s /root/y ~/ry && ln -s /root ~/rd && ln -s /root/new ~/rn")
        for method, params in [
            ("filesystem_write", ["/home/user/ry", "pwned"]),
            ("filesystem_write", ["/home/user/rn", "pwned"]),
            ("filesystem_write", ["/home/user/rd/z", "pwned"]),
            ("filesystem_makeDir", ["/home/user/rd/sub"]),
            ("filesystem_remove", ["/home/user/rd/y"]),
            ("filesystem_read", ["/home/user/ry"]),
            ("filesystem_list", ["/home/user/rd"]),
        ]:
            with pytest.raises(RpcError) as refused:
                envd.call(method, params)
            message = refused.value.error.get("message", "")
            assert "permission denied" in message and REASON in message, (method, params, refused.value.error)
        body, headers = _multipart("/home/user/rd/u", b"pwned")
        r = server.request("POST", "/file", raw=body, headers=headers, host=host)
        assert r.status == 403 and REASON in r.text, r
        r = server.request("GET", "/file?path=/home/user/ry", host=host)
        assert r.status == 404 and REASON in r.text, r
        assert envd.call("filesystem_read", ["/root/y"]) == "root's"
        assert envd.call("filesystem_list", ["/root"]) == [{"isDir": False, "name": "y"}]
        assert _passwd(envd) == before
