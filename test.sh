#!/usr/bin/env bash
# Runs the whole test suite: builds every binary (integration tests start them), then runs all
# tests with nextest. Needs root (loop devices, mkfs, mount) and the packages .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/barnacle-target}"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo build --workspace --bins
cargo nextest run --workspace --profile "$profile" "$@"
