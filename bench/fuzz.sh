#!/usr/bin/env bash
# Fuzzes the harnesses of fuzz/src/lib.rs with libFuzzer (cargo-fuzz) for SECONDS each and
# prints the executions per target. New inputs go to a scratch corpus; the committed corpora
# (fuzz/corpus/, run by the test suite) are only read. An input that crashes is saved under
# fuzz/artifacts/<target>/: add it to fuzz/corpus/<target>/ once fixed.
#
#   bench/fuzz.sh [SECONDS] [TARGET...]      (default 60 s; targets: nbd_server replica_frames store_requests)
#
# The toolchain here is stable, so no sanitizer (-s none): Rust's own checks (bounds, overflow in
# debug assertions) and the harnesses' assertions are the oracle. Builds into its own target
# directory: the instrumented build must not mix with the ordinary one.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(nbd_server replica_frames store_requests)
tools="${BARNACLE_TOOLS:-/var/tmp/barnacle-tools}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/tmp/barnacle-fuzz-target}"
export PATH="$tools/cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked --root "$tools/cargo" cargo-fuzz
fi
scratch="${FUZZ_WORK:-/var/tmp/barnacle-fuzz-work}"
mkdir -p "$scratch"
printf '%-16s %14s %10s %12s\n' target executions seconds "execs/s"
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
    log="$scratch/$t.log"
    cargo fuzz run --fuzz-dir fuzz/targets -s none -O --debug-assertions "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || {
        echo "$t: FAILED, see $log and fuzz/artifacts/$t/" >&2
        tail -30 "$log" >&2
        exit 1
    }
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    printf '%-16s %14s %10s %12s\n' "$t" "$runs" "$secs" "$((runs / secs))"
done
