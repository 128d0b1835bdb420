#!/usr/bin/env bash
# Runs the whole test suite. On a fresh machine it first sets up what the tests need: the Debian
# packages (deploy/packages.sh, as root), cargo-nextest, the offline chart checkers
# (deploy/tools.sh), Kubernetes 1.20.2 for the real cluster (deploy/k8s-build.sh, cached in
# /var/tmp/barnacle-k8s) and Barnacle's image (deploy/image.sh). Then it builds every binary
# (integration tests start them) and runs all tests with nextest. Needs root (loop devices,
# mkfs, mount, network namespaces, the cluster).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/barnacle-target}"
# shellcheck source=deploy/packages.sh
. deploy/packages.sh
barnacle_need_packages "building Barnacle" $packages_build
barnacle_need_packages "the node plugin (mkfs, mount, loop devices)" $packages_node
barnacle_need_packages "the tests (third-party NBD clients, network namespaces, CPU load)" $packages_test
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
modprobe loop 2>/dev/null || true
bash deploy/tools.sh
bash deploy/k8s-build.sh
profile=default
[ "${CI:-}" = "true" ] && profile=ci
# Tests and binaries in one build: nextest builds the test targets with the dev-dependencies
# features, and a `--bins` build alone would compile many crates a second time with others.
cargo build --locked --workspace --bins --tests
mkdir -p "$CARGO_TARGET_DIR/image"
bash deploy/image.sh "$CARGO_TARGET_DIR/image/barnacle.oci.tar" >"$CARGO_TARGET_DIR/image/barnacle.tag"
cargo nextest run --locked --workspace --profile "$profile" "$@"
