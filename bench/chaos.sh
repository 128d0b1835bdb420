#!/usr/bin/env bash
# Runs the chaos test (tests/tests/chaos.rs) for N faults and prints its report: faults by kind,
# writes issued / acknowledged / failed, blocks checked, violations (must be 0).
#   bench/chaos.sh N [SEED]
# About 4 s per fault on two cores. Needs root (network namespaces). The report is also written
# to $CARGO_TARGET_DIR/chaos-report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
faults="${1:?usage: bench/chaos.sh FAULTS [SEED]}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/barnacle-target}"
export BARNACLE_CHAOS_FAULTS="$faults"
[ -n "${2:-}" ] && export BARNACLE_CHAOS_SEED="$2"
export BARNACLE_CHAOS_REPORT="$CARGO_TARGET_DIR/chaos-report.json"
rm -f "$BARNACLE_CHAOS_REPORT"
cargo build --locked --workspace --bins --tests
# cargo test, not nextest: a long run must not meet the suite's per-test time limit.
cargo test --locked -p barnacle-tests --test chaos -- --nocapture 2>&1 | tee "$CARGO_TARGET_DIR/chaos.log" | grep -E '^\[chaos|VIOLATION|test result|panicked' || true
cat "$BARNACLE_CHAOS_REPORT"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(1 if r["violations"] else 0)' "$BARNACLE_CHAOS_REPORT"
