#!/usr/bin/env bash
# Runs the test suite N times in a row (default 3) while another process keeps both cores busy
# (stress-ng, one CPU hog per core): a test that passes only on an idle machine is a bug.
# Arguments after N go to nextest (e.g. -E 'not binary(kubernetes_cluster)').
#   tests/under-load.sh 3
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/barnacle-target}"
runs="${1:-3}"
shift || true
# shellcheck source=deploy/packages.sh
. deploy/packages.sh
barnacle_need_packages "the load" stress-ng
cargo build --locked --workspace --bins --tests
stress-ng --cpu "$(nproc)" --cpu-method matrixprod --quiet &
hog=$!
trap 'kill $hog 2>/dev/null || true' EXIT
for i in $(seq "$runs"); do
  start=$(date +%s)
  echo "under-load.sh: run $i of $runs (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  cargo nextest run --locked --workspace --profile ci "$@"
  echo "under-load.sh: run $i passed in $(( $(date +%s) - start )) s"
done
