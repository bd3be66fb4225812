"""Schema fuzzing of the REST API from its own `/openapi.json` with schemathesis: every operation,
every check (no 5xx, status codes, content types, bodies and headers as documented, invalid
input rejected, valid input accepted, auth not ignored, deleted sessions gone, 405 with `Allow`
for undocumented methods), through the examples, coverage, fuzzing and stateful phases.

POST /sessions starts real sandboxes, so the server runs with a 1-sandbox pool per environment
and a 5 s TTL: every session the fuzzer creates and does not delete itself expires within
seconds. After the run the test checks that they did, and that nothing was left behind.

Runs in its own venv (.venv/fuzz, scripts/python-env.sh). Knobs:
  BURROW_FUZZ_EXAMPLES  examples per operation and phase (default 100: about 30 s)
  BURROW_FUZZ_SEED      pin the seed (default: random, printed, so a failure can be replayed)
The long version (see docs/reliability.md):
  BURROW_FUZZ_EXAMPLES=1000 .venv/fuzz/bin/python -m pytest -c tests/pytest.ini --rootdir tests \
      tests/fuzz -o timeout=1800
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from burrow_harness import wait_until

EXAMPLES = int(os.environ.get("BURROW_FUZZ_EXAMPLES", "100"))
TTL_SECONDS = 5
MAX_LIVE_SANDBOXES = 250


def _schemathesis() -> Path:
    exe = Path(sys.executable).with_name("schemathesis")
    assert exe.exists(), f"schemathesis is not installed next to {sys.executable}: run scripts/python-env.sh"
    return exe


def _sandboxes(data_dir: Path) -> set:
    run = data_dir / "run"
    return {p.name for p in run.iterdir()} if run.is_dir() else set()


def _run_schemathesis(srv, key: str, seed: int, report_dir: Path, security_parameters: str,
                      workdir: Path) -> None:
    cmd = [str(_schemathesis()), "run", f"{srv.url}/openapi.json",
           "--checks", "all",
           "--max-examples", str(EXAMPLES),
           "--seed", str(seed),
           "--header", f"X-API-Key: {key}",
           "--generation-with-security-parameters", security_parameters,
           "--request-timeout", "30",
           "--report", "junit", "--report-dir", str(report_dir / f"security-parameters-{security_parameters}"),
           "--generation-database", "none",
           "--no-color"]
    # In a scratch directory: schemathesis keeps a cache (.schemathesis/) in its working directory.
    run = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=1800, env=dict(os.environ, NO_COLOR="1"), cwd=workdir)
    out = run.stdout + run.stderr
    print(out[-4000:])
    assert run.returncode == 0, (
        f"schemathesis found failures (exit {run.returncode}, seed {seed}, "
        f"security parameters {security_parameters}):\n{out[-6000:]}\n{srv.log_tail()}")
    # A run that tested nothing would also exit 0: every documented operation must be selected.
    with urllib.request.urlopen(f"{srv.url}/openapi.json", timeout=10) as resp:
        doc = json.load(resp)
    operations = sum(len(methods) for methods in doc["paths"].values())
    assert operations >= 13, f"only {operations} operations documented"
    assert f"{operations} selected / {operations} total" in out, out[:2000]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅  {phase}" in out, f"phase {phase} did not pass:\n{out[-3000:]}"


def test_rest_api_conforms_to_its_openapi_document(new_server, tmp_path):
    srv = new_server(ttl=f"{TTL_SECONDS}s", pool_size=1)
    key = srv.create_key("fuzz")
    doc = srv.request("GET", "/openapi.json").json()
    environments = doc["components"]["schemas"]["NewSession"]["properties"]["codeSnippetID"]["enum"]
    assert "Bash" in environments, environments
    # The pool holds one sandbox per available environment once filled.
    wait_until(lambda: len(_sandboxes(srv.data_dir)) == len(environments), 30,
               what=f"the warm pool to fill with {len(environments)} sandboxes")
    seed = int(os.environ.get("BURROW_FUZZ_SEED") or random.randrange(1 << 31))
    report_dir = Path(os.environ.get("BURROW_TEST_LOG_DIR") or tmp_path) / "schemathesis"
    print(f"schemathesis seed {seed}, {EXAMPLES} examples per operation "
          f"(replay: BURROW_FUZZ_SEED={seed} BURROW_FUZZ_EXAMPLES={EXAMPLES})")
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], len(_sandboxes(srv.data_dir)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    # Twice: with the key fixed (so generated requests get past auth and reach the handlers),
    # then with the fuzzer also generating the `api_key` query parameter (garbage keys).
    for security_parameters in ("false", "true"):
        _run_schemathesis(srv, key, seed, report_dir, security_parameters, tmp_path)
    elapsed = time.monotonic() - t0
    done.set()
    sampler.join()

    created = srv.log_path.read_text(errors="replace").count("session created")
    assert created > 0, "the fuzzer never got a session created: POST /sessions was not exercised"
    print(f"{created} sessions created by the fuzzer in {elapsed:.1f} s, "
          f"at most {peak[0]} sandboxes at once")
    # The short TTL is what bounds the live sandboxes: far fewer than were created.
    assert peak[0] < MAX_LIVE_SANDBOXES, f"{peak[0]} sandboxes alive at once"

    # Sandboxes of the E2B API live as long as the fuzzer asked (up to a day): kill them, as
    # their clients would; each must go, and answer 404 after.
    for sandbox in srv.request("GET", "/sandboxes", api_key=srv.admin_key).json():
        gone = srv.request("DELETE", f"/sandboxes/{sandbox['sandboxID']}", api_key=srv.admin_key)
        assert gone.status in (204, 404), gone

    # Every session the fuzzer left behind expires; only the warm pool remains.
    wait_until(lambda: srv.list_sessions(srv.admin_key) == [], TTL_SECONDS + 15,
               what="the fuzzer's sessions to expire")
    wait_until(lambda: len(_sandboxes(srv.data_dir)) == len(environments), 20,
               what=f"only the {len(environments)} pooled sandboxes to remain "
                    f"(now {len(_sandboxes(srv.data_dir))})")
    assert srv.request("GET", "/health").status == 200
    log = srv.log_path.read_text(errors="replace")
    assert "panicked" not in log, srv.log_tail()
