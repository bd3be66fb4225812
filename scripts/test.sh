#!/usr/bin/env bash
# The single test command (README; CI runs exactly this, as root, on a fresh clone):
#
#   0. nftables and iproute2 (apt-get), if missing: sandbox networking and its tests
#   1. Python venvs for the end-to-end tests (scripts/python-env.sh)
#   2. cargo fmt --check, clippy -D warnings, build, test
#   3. crates/runtime/tests/isolation.sh (if present)
#   4. pytest tests/e2e (REST/CLI/restarts, escape attempts, abuse; e2b 0.9.7 venv)
#   5. pytest tests/fuzz (schemathesis against /openapi.json, fuzz venv)
#   6. pytest tests/sdk once per SDK venv (0.3.0, 0.8.0, 0.9.7), concurrently
#   7. pytest tests/sdk2 (the current e2b 2.x SDK, e2b-2 venv)
#
# Every step runs even if an earlier one failed (except when there is nothing to test: no venvs,
# no binary); a summary follows and the exit status is non-zero if any step failed.
#
# Knobs: BURROW_SDK_JOBS (parallel SDK suites, 1..3, default 3), BURROW_PYTEST_TIMEOUT (per-test
# seconds, default 180), BURROW_SUITE_TIMEOUT (per pytest run seconds, default 900),
# PYTEST_ARGS (extra pytest arguments, e.g. "-x -k terminal"), BURROW_TEST_POOL_SIZE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SDK_VERSIONS=(0.3.0 0.8.0 0.9.7)
SDK_JOBS="${BURROW_SDK_JOBS:-3}"
((SDK_JOBS >= 1 && SDK_JOBS <= 3)) || SDK_JOBS=3
PYTEST_TIMEOUT="${BURROW_PYTEST_TIMEOUT:-180}"
SUITE_TIMEOUT="${BURROW_SUITE_TIMEOUT:-900}"
LOG_DIR="$ROOT/target/test-logs"
export BURROW_BIN="${BURROW_BIN:-$ROOT/target/debug/burrow}"
export NO_PROXY="${NO_PROXY:+$NO_PROXY,}127.0.0.1,localhost,.localhost"
export no_proxy="$NO_PROXY"
export PYTHONDONTWRITEBYTECODE=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

rm -rf "$LOG_DIR"
mkdir -p "$LOG_DIR"

STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
FAILED=0
T_START=$SECONDS

record() { # name status seconds
    STEP_NAMES+=("$1")
    STEP_RESULTS+=("$2")
    STEP_TIMES+=("$3")
    if [[ "$2" != ok ]]; then FAILED=1; fi
}

banner() { printf '\n==> %s\n' "$*"; }

# step NAME COMMAND...: runs the command, records ok/FAILED(rc) and its duration.
step() {
    local name="$1" t0=$SECONDS rc=0
    shift
    banner "$name: $*"
    "$@" || rc=$?
    if ((rc == 0)); then
        record "$name" ok $((SECONDS - t0))
    else
        record "$name" "FAILED (exit $rc)" $((SECONDS - t0))
    fi
    return 0
}

last_ok() { [[ "${STEP_RESULTS[-1]}" == ok ]]; }

summary() {
    banner "summary ($((SECONDS - T_START)) s)"
    local i
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-28s %-18s %5ss\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_TIMES[$i]}"
    done
    printf '  logs: %s\n' "$LOG_DIR"
    if ((FAILED)); then
        echo "RESULT: FAILED"
    else
        echo "RESULT: all steps passed"
    fi
}

# pytest_run NAME VENV LOG ARGS...: one pytest process, bounded in time, output to LOG.
pytest_run() {
    local name="$1" venv="$2" log="$3"
    shift 3
    local logdir="$LOG_DIR/$name"
    mkdir -p "$logdir"
    # shellcheck disable=SC2086 # PYTEST_ARGS is a list of words by design
    BURROW_TEST_LOG_DIR="$logdir" timeout --signal=TERM --kill-after=30 "$SUITE_TIMEOUT" \
        "$ROOT/.venv/$venv/bin/python" -m pytest -c tests/pytest.ini --rootdir tests \
        -o timeout="$PYTEST_TIMEOUT" --junitxml="$logdir/junit.xml" \
        ${PYTEST_ARGS:-} "$@" >"$log" 2>&1
}

# --------------------------------------------------------------------------------------------

# Sandbox networking (the default `--network internet`) needs nft; tests/e2e/test_network.py
# builds its test internet with ip (iproute2).
install_network_tools() {
    local missing=()
    command -v nft >/dev/null || missing+=(nftables)
    command -v ip >/dev/null || missing+=(iproute2)
    ((${#missing[@]} == 0)) || DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}
step "network tools" install_network_tools

step python-env scripts/python-env.sh
PY_OK=0
last_ok && PY_OK=1

step "cargo fmt" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets -j 2 -- -D warnings
step "cargo build" cargo build --workspace -j 2
BUILD_OK=0
last_ok && BUILD_OK=1
step "cargo test" cargo test --workspace -j 2

if [[ -f crates/runtime/tests/isolation.sh ]]; then
    if ((BUILD_OK)); then
        step "isolation.sh" bash crates/runtime/tests/isolation.sh target/debug/burrow
    else
        record "isolation.sh" "FAILED (no build)" 0
    fi
fi

if ((PY_OK && BUILD_OK)); then
    e2e_log="$LOG_DIR/e2e.log"
    t0=$SECONDS
    banner "pytest tests/e2e (e2b-0.9.7 venv) > $e2e_log"
    rc=0
    pytest_run e2e e2b-0.9.7 "$e2e_log" tests/e2e || rc=$?
    cat "$e2e_log"
    if ((rc == 0)); then record "pytest e2e" ok $((SECONDS - t0)); else
        record "pytest e2e" "FAILED (exit $rc)" $((SECONDS - t0)); fi

    fuzz_log="$LOG_DIR/fuzz.log"
    t0=$SECONDS
    banner "pytest tests/fuzz (schemathesis, fuzz venv) > $fuzz_log"
    rc=0
    pytest_run fuzz fuzz "$fuzz_log" tests/fuzz || rc=$?
    cat "$fuzz_log"
    if ((rc == 0)); then record "pytest fuzz" ok $((SECONDS - t0)); else
        record "pytest fuzz" "FAILED (exit $rc)" $((SECONDS - t0)); fi

    banner "pytest tests/sdk with e2b ${SDK_VERSIONS[*]} ($SDK_JOBS at a time)"
    declare -A PIDS=() STARTS=()
    collect_one() { # version
        local v="$1" rc=0
        wait "${PIDS[$v]}" || rc=$?
        banner "pytest tests/sdk, e2b $v (log $LOG_DIR/sdk-$v.log)"
        cat "$LOG_DIR/sdk-$v.log"
        if ((rc == 0)); then record "pytest sdk e2b-$v" ok $((SECONDS - STARTS[$v])); else
            record "pytest sdk e2b-$v" "FAILED (exit $rc)" $((SECONDS - STARTS[$v])); fi
        unset "PIDS[$v]"
    }
    queue=("${SDK_VERSIONS[@]}")
    running=()
    for v in "${queue[@]}"; do
        if ((${#running[@]} >= SDK_JOBS)); then
            collect_one "${running[0]}"
            running=("${running[@]:1}")
        fi
        STARTS[$v]=$SECONDS
        pytest_run "sdk-$v" "e2b-$v" "$LOG_DIR/sdk-$v.log" tests/sdk &
        PIDS[$v]=$!
        running+=("$v")
    done
    for v in "${running[@]}"; do
        collect_one "$v"
    done

    sdk2_log="$LOG_DIR/sdk2.log"
    t0=$SECONDS
    banner "pytest tests/sdk2 (e2b-2 venv) > $sdk2_log"
    rc=0
    pytest_run sdk2 e2b-2 "$sdk2_log" tests/sdk2 || rc=$?
    cat "$sdk2_log"
    if ((rc == 0)); then record "pytest sdk2 e2b-2" ok $((SECONDS - t0)); else
        record "pytest sdk2 e2b-2" "FAILED (exit $rc)" $((SECONDS - t0)); fi
else
    record "pytest e2e + fuzz + sdk + sdk2" "FAILED (not run: $( ((PY_OK)) || printf 'no venvs ')$( ((BUILD_OK)) || printf 'no build'))" 0
fi

summary
exit "$FAILED"
