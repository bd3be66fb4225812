#!/usr/bin/env bash
# Creates the Python venvs the end-to-end tests run in, one per pinned e2b SDK release (the
# session-era 0.x ones for tests/sdk, a current 2.x one for tests/sdk2), and one for the schema
# fuzzer:
#
#   .venv/e2b-0.3.0   .venv/e2b-0.8.0   .venv/e2b-0.9.7   .venv/e2b-2   .venv/fuzz
#
# each holding exactly the set in tests/constraints/<name>.txt (the SDK or schemathesis, their
# dependencies, pytest and pytest-timeout). Idempotent: a venv whose stamp (hash of its constraints
# file, of this script's layout version and of the interpreter) still matches is left alone, so a
# second run takes well under a second. Needs Python 3.11 (the 0.8.0 SDK breaks on newer asyncio)
# and PyPI.
#
# Environment: BURROW_VENV_DIR (default <repo>/.venv), BURROW_PYTHON (force an interpreter).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${BURROW_VENV_DIR:-$ROOT/.venv}"
CONSTRAINTS_DIR="$ROOT/tests/constraints"
SDK_VERSIONS=(0.3.0 0.8.0 0.9.7)
# The e2b 2.x release of .venv/e2b-2 (tests/sdk2): the current SDKs' API and envd protocol.
SDK2_VERSION=2.63.0
LAYOUT_VERSION=1 # bump to force every venv to be rebuilt
# Cheap "is it installed" probe: finds the packages without importing them.
PROBE='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("e2b", "pytest", "pytest_timeout")))'

log() { printf 'python-env: %s\n' "$*" >&2; }

is_py311() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' >/dev/null 2>&1
}

has_venv_module() {
    "$1" -c 'import venv, ensurepip' >/dev/null 2>&1
}

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get is not available; install $* by hand"
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
        log "apt-get install $* failed; running apt-get update and retrying"
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends "$@" >/dev/null
    fi
}

# Prints the absolute path of a Python 3.11 interpreter that can create venvs.
pick_python() {
    local candidates=() c resolved
    if [[ -n "${BURROW_PYTHON:-}" ]]; then
        candidates+=("$BURROW_PYTHON")
    fi
    for c in python3 python3.11; do
        if command -v "$c" >/dev/null 2>&1; then
            candidates+=("$(command -v "$c")")
        fi
    done
    candidates+=(/usr/bin/python3.11)

    for c in "${candidates[@]}"; do
        [[ -x "$c" ]] || continue
        is_py311 "$c" || continue
        # Resolve pyenv shims to the real interpreter so the stamp is stable.
        resolved="$("$c" -c 'import sys; print(sys.executable)')"
        if has_venv_module "$resolved"; then
            printf '%s\n' "$resolved"
            return 0
        fi
    done

    # No usable 3.11 with venv support: fall back to Debian's, installing what is missing.
    if [[ ! -x /usr/bin/python3.11 ]]; then
        log "installing Debian's python3.11"
        apt_install python3.11 python3.11-venv || return 1
    elif ! has_venv_module /usr/bin/python3.11; then
        log "installing Debian's python3.11-venv (the venv/ensurepip modules are missing)"
        apt_install python3.11-venv || return 1
    fi
    if is_py311 /usr/bin/python3.11 && has_venv_module /usr/bin/python3.11; then
        printf '%s\n' /usr/bin/python3.11
        return 0
    fi
    log "no Python 3.11 with a working venv module found (tried: ${candidates[*]})"
    return 1
}

stamp_of() {
    local constraints="$1" python="$2"
    {
        printf 'layout=%s\n' "$LAYOUT_VERSION"
        printf 'python=%s ' "$python"
        "$python" -c 'import sys; print(sys.version)'
        cat "$constraints"
    } | sha256sum | cut -d' ' -f1
}

build_venv() {
    local version="$1" python="$2"
    local venv="$VENV_DIR/e2b-$version"
    local constraints="$CONSTRAINTS_DIR/e2b-$version.txt"
    local stamp_file="$venv/.burrow-stamp"
    local want
    [[ -f "$constraints" ]] || { log "missing $constraints"; return 1; }
    want="$(stamp_of "$constraints" "$python")"

    if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$want" ]] &&
        "$venv/bin/python" -c "$PROBE" >/dev/null 2>&1; then
        log "e2b-$version: up to date"
        return 0
    fi

    log "e2b-$version: building $venv with $python"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    # e2b 0.x releases are yanked on PyPI: the exact == pin still installs them (with a warning).
    "$venv/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
        --constraint "$constraints" "e2b==$version" pytest pytest-timeout
    local got
    got="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("e2b"))')"
    if [[ "$got" != "$version" ]]; then
        log "e2b-$version: installed e2b is $got"
        return 1
    fi
    printf '%s\n' "$want" >"$stamp_file"
    log "e2b-$version: ready"
}

# The e2b 2.x venv (tests/sdk2): same stamp scheme, named by major version so that moving the pin
# to a newer 2.x release changes only its constraints file.
build_sdk2_venv() {
    local python="$1"
    local venv="$VENV_DIR/e2b-2"
    local constraints="$CONSTRAINTS_DIR/e2b-2.txt"
    local stamp_file="$venv/.burrow-stamp"
    local want got
    [[ -f "$constraints" ]] || { log "missing $constraints"; return 1; }
    want="$(stamp_of "$constraints" "$python")"

    if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$want" ]] &&
        "$venv/bin/python" -c "$PROBE" >/dev/null 2>&1; then
        log "e2b-2: up to date"
        return 0
    fi

    log "e2b-2: building $venv with $python (e2b $SDK2_VERSION)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
        --constraint "$constraints" "e2b==$SDK2_VERSION" pytest pytest-timeout
    got="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("e2b"))')"
    if [[ "$got" != "$SDK2_VERSION" ]]; then
        log "e2b-2: installed e2b is $got"
        return 1
    fi
    printf '%s\n' "$want" >"$stamp_file"
    log "e2b-2: ready"
}

# The schemathesis venv (tests/fuzz): same stamp scheme as the SDK venvs.
build_fuzz_venv() {
    local python="$1"
    local venv="$VENV_DIR/fuzz"
    local constraints="$CONSTRAINTS_DIR/fuzz.txt"
    local stamp_file="$venv/.burrow-stamp"
    local probe='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("schemathesis", "pytest", "pytest_timeout")))'
    local want version
    [[ -f "$constraints" ]] || { log "missing $constraints"; return 1; }
    want="$(stamp_of "$constraints" "$python")"

    if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$want" ]] &&
        "$venv/bin/python" -c "$probe" >/dev/null 2>&1; then
        log "fuzz: up to date"
        return 0
    fi

    version="$(sed -n 's/^schemathesis==//p' "$constraints")"
    log "fuzz: building $venv with $python (schemathesis $version)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
        --constraint "$constraints" "schemathesis==$version" pytest pytest-timeout
    printf '%s\n' "$want" >"$stamp_file"
    log "fuzz: ready"
}

main() {
    local python
    python="$(pick_python)"
    mkdir -p "$VENV_DIR"
    for v in "${SDK_VERSIONS[@]}"; do
        build_venv "$v" "$python"
    done
    build_sdk2_venv "$python"
    build_fuzz_venv "$python"
}

main "$@"
