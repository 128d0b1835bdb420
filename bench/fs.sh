#!/usr/bin/env bash
# The path applications see: fio on ext4 and xfs mounted on a loop device, three ways, in one run:
#   barnacle  the node plugin's userspace attach: barnacle-nbd-fuse serving the engine's export as a
#             FUSE file, a loop device on it (4 KiB sectors, direct IO, as `barnacle-node` sets up);
#   nbdfuse   libnbd's nbdfuse serving the same kind of export (its own volume: one engine, one
#             replica, same settings), the same loop device set-up on its file;
#   plain     a loop device on a plain file on the same disk (no Barnacle, no NBD, no FUSE).
# Each figure is the median of REPEAT rounds, each round visiting every target in turn, with its
# ratio to nbdfuse and to the plain file measured in the same round. Results: docs/performance.md.
#
#   bench/fs.sh     # RUNTIME=5 REPEAT=3 SIZE_MIB=1024 (the volume; fio's file is half) REPLICAS=1 DIR=/var/tmp
#   JOBS="randwrite4k-qd1 randwrite4k" FILESYSTEMS=ext4 bench/fs.sh   # a subset
#   FUSE_ARGS="--worker-threads 1" bench/fs.sh   # options for the barnacle target's helper
#   BASE_BIN=/path/to/older/release bench/fs.sh   # adds barnacle-base: that build's barnacle-nbd-fuse
#                                                  # on its own volume, before/after in one run
set -euo pipefail
. "$(dirname "$0")/lib.sh"
RUNTIME="${RUNTIME:-5}"
REPEAT="${REPEAT:-3}"
SIZE_MIB="${SIZE_MIB:-1024}"
REPLICAS="${REPLICAS:-1}"
FILESYSTEMS="${FILESYSTEMS:-ext4 xfs}"
FILE_MIB=$((SIZE_MIB / 2))
[ "$SIZE_MIB" -ge 512 ] || { echo "SIZE_MIB must be at least 512 (xfs needs 300 MB)" >&2; exit 2; }

bench_setup fs barnacle-replica barnacle-engine barnacle-node

volume() { # name : starts REPLICAS replicas (the first local over a unix socket) and an engine
  local name=$1 args=() i d
  for i in $(seq 0 $((REPLICAS - 1))); do
    d="$work/$name-r$i"
    "$BIN/barnacle-replica" --dir "$d" --volume-id "$name" --token-file "$work/token" --size "${SIZE_MIB}MiB" \
      --listen-unix "$d.sock" --ready-file "$d.ready" >/dev/null 2>>"$work/log" &
    pids+=($!)
    wait_ready "$d.ready"
    if [ "$i" = 0 ]; then args+=(--replica "r$i=unix:$d.sock"); else args+=(--replica "r$i=$(field "$d.ready" data)"); fi
  done
  mkdir -p "$work/$name-e"
  "$BIN/barnacle-engine" --volume-id "$name" --token-file "$work/token" "${args[@]}" --state-dir "$work/$name-e" \
    --nbd-listen 127.0.0.1:0 --nbd-socket "$work/$name.sock" --ready-file "$work/$name-e/ready" >/dev/null 2>>"$work/log" &
  pids+=($!)
  wait_ready "$work/$name-e/ready"
}

loop_on() { # target file : a loop device as the node plugin sets it up, in dev[target]
  dev[$1]=$(losetup --find --show --sector-size 4096 --direct-io=on "$2")
  loops+=("${dev[$1]}")
}

declare -A dev
volume barnacle
mkdir -p "$work/fuse-barnacle"
fuse_mounts+=("$work/fuse-barnacle")
# shellcheck disable=SC2086
"$BIN/barnacle-nbd-fuse" --volume-id barnacle --socket "$work/barnacle.sock" --export barnacle \
  --mountpoint "$work/fuse-barnacle" ${FUSE_ARGS:-} 2>>"$work/log" &
pids+=($!)
wait_ready "$work/fuse-barnacle/disk"
loop_on barnacle "$work/fuse-barnacle/disk"

volume nbdfuse
mkdir -p "$work/fuse-nbdfuse"
fuse_mounts+=("$work/fuse-nbdfuse")
nbdfuse "$work/fuse-nbdfuse" "nbd+unix:///nbdfuse?socket=$work/nbdfuse.sock" 2>>"$work/log" &
pids+=($!)
wait_ready "$work/fuse-nbdfuse/nbd"
loop_on nbdfuse "$work/fuse-nbdfuse/nbd"

truncate -s "${SIZE_MIB}M" "$work/plain.img"
loop_on plain "$work/plain.img"
order=(barnacle nbdfuse plain)
if [ -n "${BASE_BIN:-}" ]; then
  volume barnacle-base
  mkdir -p "$work/fuse-barnacle-base"
  fuse_mounts+=("$work/fuse-barnacle-base")
  "$BASE_BIN/barnacle-nbd-fuse" --volume-id barnacle-base --socket "$work/barnacle-base.sock" \
    --export barnacle-base --mountpoint "$work/fuse-barnacle-base" 2>>"$work/log" &
  pids+=($!)
  wait_ready "$work/fuse-barnacle-base/disk"
  loop_on barnacle-base "$work/fuse-barnacle-base/disk"
  order+=(barnacle-base)
fi

jobs=(
  "randread4k|--rw=randread --bs=4k --iodepth=32"
  "randwrite4k|--rw=randwrite --bs=4k --iodepth=32"
  "read128k|--rw=read --bs=128k --iodepth=8"
  "write128k|--rw=write --bs=128k --iodepth=8"
  "randwrite4k-qd1|--rw=randwrite --bs=4k --iodepth=1"
  "randwrite4k-fsync|--rw=randwrite --bs=4k --iodepth=1 --fsync=1"
)
if [ -n "${JOBS:-}" ]; then
  all=("${jobs[@]}"); jobs=()
  for want in $JOBS; do
    for j in "${all[@]}"; do [ "${j%%|*}" = "$want" ] && jobs+=("$j"); done
  done
  [ "${#jobs[@]}" -gt 0 ] || { echo "no such job in JOBS=$JOBS" >&2; exit 2; }
fi
for fs in $FILESYSTEMS; do
  for t in "${order[@]}"; do
    m="$work/mnt-$fs-$t"
    mkdir -p "$m"
    case $fs in
      ext4) mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "${dev[$t]}" ;;
      xfs) mkfs.xfs -q -f -K "${dev[$t]}" ;;
      *) echo "unknown filesystem $fs" >&2; exit 2 ;;
    esac
    mount "${dev[$t]}" "$m"
    mounts+=("$m")
    # Written once whole, so the measurements overwrite and read allocated blocks.
    fio --name=fill --filename="$m/fio" --ioengine=libaio --direct=1 --rw=write --bs=1m --iodepth=8 \
      --size="${FILE_MIB}m" --output=/dev/null
  done
  for j in "${jobs[@]}"; do
    name=${j%%|*}; opts=${j#*|}
    for round in $(seq 1 "$REPEAT"); do
      for t in "${order[@]}"; do
        sync
        # shellcheck disable=SC2086
        fio --name="$name" --filename="$work/mnt-$fs-$t/fio" --ioengine=libaio --direct=1 $opts \
          --size="${FILE_MIB}m" --time_based --runtime="$RUNTIME" --randrepeat=0 --norandommap \
          --output-format=json --output="$work/$fs.$name.$t.$round.json"
      done
    done
  done
  for t in "${order[@]}"; do umount "$work/mnt-$fs-$t"; done
  mounts=()
done

python3 - "$work" "$REPEAT" "$RUNTIME" "$REPLICAS" "$FILESYSTEMS" "${order[*]}" "${jobs[*]%%|*}" <<'PY'
import json, statistics, sys
work, repeat, runtime, replicas, filesystems = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5].split()
order, ran = sys.argv[6].split(), sys.argv[7].split()
jobs = [("randread4k", "read", "iops"), ("randwrite4k", "write", "iops"), ("read128k", "read", "bw"),
        ("write128k", "write", "bw"), ("randwrite4k-qd1", "write", "lat"), ("randwrite4k-fsync", "write", "lat")]
jobs = [j for j in jobs if j[0] in ran]
def fig(fs, job, t, side, kind, rnd):
    d = json.load(open(f"{work}/{fs}.{job}.{t}.{rnd}.json"))["jobs"][0]
    if kind == "iops":
        return d[side]["iops"]
    if kind == "bw":
        return d[side]["bw_bytes"] / 2**20
    # Latency of the write plus, with fsync, of its sync: the time per operation.
    return 1e6 * runtime_s / max(d[side]["total_ios"], 1)
runtime_s = float(runtime)
med = statistics.median
print(f"fio (libaio, direct) on a file in the filesystem, {repeat} rounds of {runtime} s, medians; volumes of {replicas} replica(s)")
print("in brackets: ratio to nbdfuse / to the plain file in the same round; QD1 rows are µs per write")
print("(with fsync: per write and its fsync), lower is better\n")
for fs in filesystems:
    print(f"**{fs}**\n")
    print("| job | " + " | ".join(order) + " |")
    print("|---|" + "---|" * len(order))
    for job, side, kind in jobs:
        rounds = [{t: fig(fs, job, t, side, kind, r) for t in order} for r in range(1, repeat + 1)]
        cells = []
        for t in order:
            v = med(x[t] for x in rounds)
            a = med(x[t] / x["nbdfuse"] for x in rounds)
            b = med(x[t] / x["plain"] for x in rounds)
            unit = {"iops": " IOPS", "bw": " MiB/s", "lat": " µs"}[kind]
            cells.append(f"{v:,.0f}{unit} ({a:.2f} / {b:.2f})")
        print(f"| {job} | " + " | ".join(cells) + " |")
    print()
PY
