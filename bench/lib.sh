# Shared by the benchmark scripts (sourced, not run): builds the release binaries, makes a work
# directory and a token file, and on exit unmounts, detaches and kills everything the script
# registered in `mounts`, `fuse_mounts`, `loops` and `pids` before removing the work directory.
#
#   . "$(dirname "$0")/lib.sh"
#   bench_setup NAME PACKAGE...   # sets $work; builds the PACKAGEs' binaries into $BIN

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/barnacle-target}"
BIN="${BIN:-$CARGO_TARGET_DIR/release}"
pids=() loops=() mounts=() fuse_mounts=()

bench_cleanup() {
  local m l p
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  for m in "${fuse_mounts[@]}"; do fusermount3 -u "$m" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

bench_setup() { # name package...
  local name=$1 args=() p
  shift
  for p in "$@"; do args+=(-p "$p"); done
  cargo build --release --bins "${args[@]}" >&2
  work=$(mktemp -d "${DIR:-/var/tmp}/barnacle-$name.XXXXXX")
  trap bench_cleanup EXIT
  printf 'bench-token' > "$work/token"
}

wait_ready() { # file [poll interval in seconds, 0.1 by default]: until it exists with content, 30 s at most
  local every=${2:-0.1} tries
  tries=$(awk -v e="$every" 'BEGIN { print int(30 / e) }')
  for _ in $(seq 1 "$tries"); do [ -s "$1" ] && return 0; sleep "$every"; done
  echo "not ready: $1" >&2
  exit 1
}

field() { # ready-file key
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}
