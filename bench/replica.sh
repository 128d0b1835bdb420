#!/usr/bin/env bash
# Replica data path vs raw file, side by side in one run (release build). See docs/replica.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/barnacle-target}"
exec cargo bench -p barnacle-replica --bench replica_bench "$@"
