"""Errors the API answers (issue #10, hardening): flags that name unknown environments refuse to
start, 500s tell the client an error id rather than host paths and the sandbox's log, and a
request body that cannot be read is answered for what really happened to it (413 over the limit,
408 too slow, 400 malformed or cut off), checked with raw sockets."""

from __future__ import annotations

import re
import shutil
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
