#!/usr/bin/env bash
# Engine benchmark: the same fio jobs against a raw file (io_uring, direct), qemu-nbd serving a
# file on the same disk, Barnacle with 1 replica and Barnacle with 3 replicas, all in one run, with
# each figure's ratio to the raw file and to qemu-nbd on the same transport (TCP, or a unix socket
# as a cluster attaches), each measurement after a sync. Then the idle cost of an engine with three
# replicas (CPU and resident memory). For every measurement it also counts the CPU time (user +
# system, from /proc/PID/stat) of the processes serving the target: qemu-nbd, or the engine and its
# replicas, and reports it per IO. qemu-nbd-x3 is the floor for three copies on this machine: every
# block written (or read) through three qemu-nbd servers at once, no coordination (see below).
# Results: docs/performance.md.
#
#   bench/engine.sh            # RUNTIME=5 seconds per run, REPEAT=3 rounds, SIZE_MIB=1024, DIR=/var/tmp
#   TARGETS="qemu-nbd barnacle-1 barnacle-3" bench/engine.sh   # a subset (raw and qemu-nbd are always run)
#   TARGETS="barnacle-1 barnacle-1-nosum" bench/engine.sh   # barnacle-1-nosum: only when named
#   BASE_BIN=/path/to/older/release bench/engine.sh   # adds barnacle-1-base and barnacle-3-base, run
#                                                       # from those binaries: before/after in one run
set -euo pipefail
. "$(dirname "$0")/lib.sh"
RUNTIME="${RUNTIME:-5}"
REPEAT="${REPEAT:-3}"
SIZE_MIB="${SIZE_MIB:-1024}"
IDLE_SECONDS="${IDLE_SECONDS:-10}"

bench_setup bench barnacle-replica barnacle-engine

start_replica() { # dir [replica option...]; sets $addr to its TCP data address and $local to its unix socket
  local dir=$1; shift
  "${bin:-$BIN}/barnacle-replica" "$@" --dir "$dir" --volume-id bench --token-file "$work/token" \
    --size "${SIZE_MIB}MiB" --listen-unix "$dir.sock" --ready-file "$dir.ready" >/dev/null 2>>"$work/log" &
  pids+=($!); last=$!
  wait_ready "$dir.ready"
  addr=$(field "$dir.ready" data)
  local="unix:$dir.sock"
}

start_engine() { # name replica-addr...; sets $uri to its NBD URI
  local name=$1; shift
  local args=() i=0
  for a in "$@"; do args+=(--replica "r$i=$a"); i=$((i + 1)); done
  mkdir -p "$work/$name"
  "${bin:-$BIN}/barnacle-engine" --volume-id bench --token-file "$work/token" "${args[@]}" \
    --state-dir "$work/$name" --nbd-listen 127.0.0.1:0 --nbd-socket "$work/$name.sock" \
    --ready-file "$work/$name/ready" >/dev/null 2>>"$work/log" &
  pids+=($!); last=$!
  wait_ready "$work/$name/ready"
  uri="nbd://$(field "$work/$name/ready" nbd)/bench"
}

# Targets.
truncate -s "${SIZE_MIB}M" "$work/raw.img"
truncate -s "${SIZE_MIB}M" "$work/qemu.img"
declare -A procs=()
qemu-nbd -f raw -x bench -b 127.0.0.1 -p 10899 -t --aio=threads "$work/qemu.img" >/dev/null 2>>"$work/log" &
pids+=($!); procs[qemu-nbd]=$!
truncate -s "${SIZE_MIB}M" "$work/qemu-unix.img"
qemu-nbd -f raw -x bench -k "$work/qemu.sock" -t --aio=threads "$work/qemu-unix.img" >/dev/null 2>>"$work/log" &
pids+=($!); procs[qemu-nbd-unix]=$!
# qemu-nbd-x3: the floor for any design keeping three copies on this machine. fio writes (or reads)
# every block through three qemu-nbd servers over TCP, one job each at the job's queue depth, and
# the figure is what the three jobs did together divided by three: the rate at which each block got
# three copies with no coordination at all (for the QD1 job: the slowest job's median).
x3=()
for i in 1 2 3; do
  truncate -s "${SIZE_MIB}M" "$work/qemu-x3-$i.img"
  qemu-nbd -f raw -x bench -b 127.0.0.1 -p $((10900 + i)) -t --aio=threads "$work/qemu-x3-$i.img" >/dev/null 2>>"$work/log" &
  pids+=($!); procs[qemu-nbd-x3]="${procs[qemu-nbd-x3]:-} $!"
  # (The first job is the one the command line names.)
  [ "$i" = 1 ] || x3+=("--name=x3-$i")
  x3+=("--ioengine=nbd --uri=nbd://127.0.0.1:$((10900 + i))/bench")
done
sleep 1
# Barnacle as in a cluster: the engine on the attaching node reaches the replica on its own node
# over a unix socket and the others over TCP. barnacle-1-tcp shows the single replica over TCP.
start_replica "$work/r1-0"; p=$last; start_engine e1 "$local"; one=$uri; procs[barnacle-1]="$p $last"
start_replica "$work/r1u-0"; p=$last; start_engine e1u "$local"; procs[barnacle-1-unix]="$p $last"
oneunix="nbd+unix:///bench?socket=$work/e1u.sock"
start_replica "$work/r1t-0"; p=$last; start_engine e1t "$addr"; onetcp=$uri; procs[barnacle-1-tcp]="$p $last"
start_replica "$work/r3-0"; a0=$local; p="$last"
start_replica "$work/r3-1"; a1=$addr; p="$p $last"
start_replica "$work/r3-2"; a2=$addr; p="$p $last"
start_engine e3 "$a0" "$a1" "$a2"; three=$uri; procs[barnacle-3]="$p $last"
# Only when named in TARGETS: barnacle-1 with a replica keeping no block checksums (what the
# checksum on every write and the verification on every read cost).
case " ${TARGETS:-} " in *" barnacle-1-nosum "*)
  start_replica "$work/r1n-0" --no-checksums; p=$last; start_engine e1n "$local"; onenosum=$uri
  procs[barnacle-1-nosum]="$p $last" ;;
esac
if [ -n "${BASE_BIN:-}" ]; then
  bin=$BASE_BIN
  start_replica "$work/b1-0"; p=$last; start_engine b1 "$local"; onebase=$uri; procs[barnacle-1-base]="$p $last"
  start_replica "$work/b3-0"; a0=$local; p="$last"
  start_replica "$work/b3-1"; a1=$addr; p="$p $last"
  start_replica "$work/b3-2"; a2=$addr; p="$p $last"
  start_engine b3 "$a0" "$a1" "$a2"; threebase=$uri; procs[barnacle-3-base]="$p $last"
  bin=
fi
declare -A target=(
  [raw]="--ioengine=io_uring --direct=1 --filename=$work/raw.img"
  [qemu-nbd]="--ioengine=nbd --uri=nbd://127.0.0.1:10899/bench"
  [barnacle-1]="--ioengine=nbd --uri=$one"
  [barnacle-1-tcp]="--ioengine=nbd --uri=$onetcp"
  [barnacle-3]="--ioengine=nbd --uri=$three"
  [qemu-nbd-unix]="--ioengine=nbd --uri=nbd+unix:///bench?socket=$work/qemu.sock"
  [barnacle-1-unix]="--ioengine=nbd --uri=$oneunix"
  [qemu-nbd-x3]="${x3[*]}"
  [barnacle-1-nosum]="--ioengine=nbd --uri=${onenosum:-}"
)
order=(raw qemu-nbd barnacle-1 barnacle-1-tcp barnacle-3 qemu-nbd-x3 qemu-nbd-unix barnacle-1-unix)
if [ -n "${BASE_BIN:-}" ]; then
  target[barnacle-1-base]="--ioengine=nbd --uri=$onebase"
  target[barnacle-3-base]="--ioengine=nbd --uri=$threebase"
fi
if [ -n "${TARGETS:-}" ]; then
  order=(raw qemu-nbd)
  for t in $TARGETS; do
    [ -n "${target[$t]:-}" ] || { echo "unknown target $t" >&2; exit 2; }
    case " ${order[*]} " in *" $t "*) ;; *) order+=("$t") ;; esac
  done
  case " ${order[*]} " in *-unix*) case " ${order[*]} " in *" qemu-nbd-unix "*) ;; *) order+=(qemu-nbd-unix) ;; esac ;; esac
fi
[ -n "${BASE_BIN:-}" ] && order+=(barnacle-1-base barnacle-3-base)
# CPU ticks (user + system) of the processes serving target $1 (none for the raw file).
cpu_ticks() {
  local n=0 p
  for p in ${procs[$1]:-}; do n=$((n + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$n"
}

# Fill every target first, so reads read data rather than holes.
for t in "${order[@]}"; do
  # shellcheck disable=SC2086
  fio --rw=write --bs=1m --iodepth=8 --size="${SIZE_MIB}m" --output=/dev/null --name=fill ${target[$t]}
done

jobs=(
  "randread4k|--rw=randread --bs=4k --iodepth=32"
  "randwrite4k|--rw=randwrite --bs=4k --iodepth=32"
  "read128k|--rw=read --bs=128k --iodepth=16"
  "write128k|--rw=write --bs=128k --iodepth=16"
  "randwrite4k-qd1|--rw=randwrite --bs=4k --iodepth=1"
)
# This machine's speed drifts by up to 1.5x within seconds, so every job runs REPEAT rounds, each
# round visiting every target in turn, and the median round counts.
for j in "${jobs[@]}"; do
  name=${j%%|*}; opts=${j#*|}
  for round in $(seq 1 "$REPEAT"); do
    for t in "${order[@]}"; do
      # Start every measurement with no dirty pages left by the one before: background writeback
      # would otherwise land on whichever target runs next.
      sync
      c0=$(cpu_ticks "$t")
      # shellcheck disable=SC2086
      # (Options before the first --name are fio's global ones: the job's apply to every fio job of
      # a target that has several.)
      fio $opts --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" --randrepeat=0 --norandommap \
        --output-format=json --output="$work/$name.$t.$round.json" --name="$name" ${target[$t]}
      echo $(( $(cpu_ticks "$t") - c0 )) > "$work/$name.$t.$round.cpu"
    done
  done
done

# Idle cost of the 3-replica engine and its replicas.
idle_pids=$(pgrep -f "barnacle-(engine|replica).*$work/(e3|r3-)" | tr '\n' ' ')
ticks() { for p in $idle_pids; do awk '{print $14 + $15}' "/proc/$p/stat"; done | paste -sd+ | bc; }
t0=$(ticks); sleep "$IDLE_SECONDS"; t1=$(ticks)
hz=$(getconf CLK_TCK)
rss=$(for p in $idle_pids; do awk '/VmRSS/ {print $2}' "/proc/$p/status"; done | sort -n | tail -1)
hwm=$(for p in $idle_pids; do awk '/VmHWM/ {print $2}' "/proc/$p/status"; done | sort -n | tail -1)

python3 - "$work" "$RUNTIME" "$(( t1 - t0 ))" "$hz" "$IDLE_SECONDS" "$rss" "$hwm" "$REPEAT" "${order[*]}" <<'PY'
import json, statistics, sys
work, runtime, dticks, hz, idle, rss, hwm, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
order = sys.argv[9].split()
# Targets reached over a unix socket compare with qemu-nbd over a unix socket.
def base(t):
    return "qemu-nbd-unix" if t.endswith("-unix") else "qemu-nbd"
jobs = [("randread4k", "read", "iops"), ("randwrite4k", "write", "iops"), ("read128k", "read", "bw"),
        ("write128k", "write", "bw"), ("randwrite4k-qd1", "write", "lat")]
def sides(job, t, side, rnd):
    return [j[side] for j in json.load(open(f"{work}/{job}.{t}.{rnd}.json"))["jobs"]]
# A target with several fio jobs (qemu-nbd-x3) writes every block once per job: its rate is their
# sum divided by their number, its latency the slowest job's.
def fig(job, t, side, kind, rnd):
    ds = sides(job, t, side, rnd)
    if kind == "iops":
        return sum(d["iops"] for d in ds) / len(ds), None
    if kind == "bw":
        return sum(d["bw_bytes"] for d in ds) / len(ds) / 2**20, None
    pct = [d["clat_ns"]["percentile"] for d in ds]
    return max(p["50.000000"] for p in pct) / 1000, max(p["99.000000"] for p in pct) / 1000
med = statistics.median
print(f"fio, {repeat} rounds of {runtime} s per job, medians; ratios are the median over rounds of the ratio")
print("to the raw file / to qemu-nbd on the same transport, measured in the same round (latency: lower is better)\n")
print("| job | " + " | ".join(order) + " |")
print("|---|" + "---|" * len(order))
for job, side, kind in jobs:
    rounds = [{t: fig(job, t, side, kind, r) for t in order} for r in range(1, repeat + 1)]
    cells = []
    for t in order:
        v = med(x[t][0] for x in rounds)
        to_raw = med(x[t][0] / x["raw"][0] for x in rounds)
        to_base = med(x[t][0] / x[base(t)][0] for x in rounds)
        if kind == "lat":
            p99 = med(x[t][1] for x in rounds)
            cell = f"p50 {v:.0f} µs, p99 {p99:.0f} µs ({to_raw:.2f} / {to_base:.2f})"
        else:
            unit = "IOPS" if kind == "iops" else "MiB/s"
            cell = f"{v:,.0f} {unit} ({to_raw:.2f} / {to_base:.2f})"
        cells.append(cell)
    print(f"| {job} | " + " | ".join(cells) + " |")
def cpu_per_io(job, t, side, rnd):
    ticks = int(open(f"{work}/{job}.{t}.{rnd}.cpu").read())
    ds = sides(job, t, side, rnd)
    ios = sum(d["total_ios"] for d in ds) / len(ds)
    return ticks / hz * 1e6 / max(ios, 1)
served = [t for t in order if t != "raw"]
print("\nCPU time (user + system) of the serving processes per IO: qemu-nbd, or the engine and its")
print("replicas; median over rounds, in µs, and its ratio to qemu-nbd on the same transport (lower is better)\n")
print("| job | " + " | ".join(served) + " |")
print("|---|" + "---|" * len(served))
for job, side, kind in jobs:
    rounds = [{t: cpu_per_io(job, t, side, r) for t in served} for r in range(1, repeat + 1)]
    cells = []
    for t in served:
        v = med(x[t] for x in rounds)
        to_base = med(x[t] / max(x[base(t)], 1e-9) for x in rounds)
        cells.append(f"{v:.1f} ({to_base:.2f})")
    print(f"| {job} | " + " | ".join(cells) + " |")
cpu = dticks / hz / idle * 100
print(f"\nidle, engine + 3 replicas over {idle} s: {cpu:.2f} % of one core in total; largest resident set {rss / 1024:.1f} MiB (peak during the run {hwm / 1024:.1f} MiB)")
PY
