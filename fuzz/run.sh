#!/usr/bin/env bash
# Builds the AFL++ targets and fuzzes each for a bounded time, one after another (one fuzzer at a
# time: the machine has two cores and other work), then prints what each run did.
#
#   fuzz/run.sh                         # every target, 300 s each
#   FUZZ_SECONDS=60 fuzz/run.sh         # shorter (or: fuzz/run.sh -s 60)
#   fuzz/run.sh -s 600 envd_ws api_request
#
# Needs: root (the envd targets chroot themselves into a scratch directory, the API target's
# environment catalog chowns a root filesystem to the sandbox id range) and cargo-afl
# (`cargo install cargo-afl`; it builds AFL++ on its first use, `cargo afl config --build`).
#
# Each run starts from the seeds in corpus/<target>/ with the dictionary in dict/ and writes to
# out/<target>/default/ (replaced on every run): queue/ (the corpus it grew), crashes/ and hangs/.
# Replay a crash:       fuzz/target/release/<target> < out/<target>/default/crashes/id:...
# Minimize it:          cargo afl tmin -i <crash> -o min.bin -- fuzz/target/release/<target>
# Exit status: 0 if no target crashed or hung, 1 otherwise, 2 on a usage or setup error.
set -euo pipefail

cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-300}"
while getopts "s:h" opt; do
    case "$opt" in
    s) seconds="$OPTARG" ;;
    *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

# target, dictionary, per-input timeout in ms (a first input also builds the target's state; a
# `+` lets AFL skip seeds that time out instead of stopping)
specs=(
    "rpc_parse json_rpc 1000+"
    "gateway_route host 1000+"
    "store_keys keys 1000+"
    "envd_upload multipart 2000+"
    "envd_ws json_rpc 10000+"
    "api_request http 5000+"
)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for spec in "${specs[@]}"; do targets+=("${spec%% *}"); done
fi
spec_of() {
    for spec in "${specs[@]}"; do
        [ "${spec%% *}" = "$1" ] && { echo "$spec"; return; }
    done
    echo "unknown target $1 (one of: ${specs[*]%% *})" >&2
    exit 2
}
for target in "${targets[@]}"; do spec_of "$target" >/dev/null; done

cargo afl build --release
mkdir -p out

# Non-interactive, and tolerant of a shared machine: no UI, no CPU pinning (other work holds
# the cores), no complaints about the frequency governor or where core dumps go.
export AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1

stat_of() { # file, then names of the field in AFL++ versions newest first
    local file="$1" name value
    shift
    for name in "$@"; do
        value="$(sed -n "s/^$name *: *//p" "$file")"
        [ -n "$value" ] && { echo "$value"; return; }
    done
    echo "?"
}

summary=()
failed=0
for target in "${targets[@]}"; do
    read -r _ dict timeout <<<"$(spec_of "$target")"
    out="out/$target"
    rm -rf "$out"
    echo "== $target: ${seconds} s"
    # AFL writes its own log to stdout; keep it, show only its end.
    if ! cargo afl fuzz -i "corpus/$target" -o "$out" -x "dict/$dict.dict" -t "$timeout" -m none \
        -V "$seconds" -- "target/release/$target" >"out/$target.log" 2>&1; then
        tail -n 30 "out/$target.log"
        echo "afl-fuzz failed on $target (log: fuzz/out/$target.log)" >&2
        failed=1
    fi
    # Scratch directories of the target's processes (those killed on a hang cannot clean up).
    rm -rf /tmp/burrow-fuzz-*
    stats="$out/default/fuzzer_stats"
    [ -f "$stats" ] || { summary+=("$target: no fuzzer_stats"); failed=1; continue; }
    crashes="$(stat_of "$stats" saved_crashes unique_crashes)"
    hangs="$(stat_of "$stats" saved_hangs unique_hangs)"
    [ "$crashes" = 0 ] && [ "$hangs" = 0 ] || failed=1
    summary+=("$(printf '%-14s %12s %10s %8s %8s %6s %9s %8s' "$target" \
        "$(stat_of "$stats" execs_done)" "$(stat_of "$stats" execs_per_sec)" \
        "$(stat_of "$stats" corpus_count paths_total)" "$crashes" "$hangs" \
        "$(stat_of "$stats" run_time)" "$(stat_of "$stats" stability)")")
done

echo
printf '%-14s %12s %10s %8s %8s %6s %9s %8s\n' target execs execs/s corpus crashes hangs "time (s)" stability
printf '%s\n' "${summary[@]}"
exit "$failed"
