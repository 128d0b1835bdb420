#!/usr/bin/env bash
# Many volumes on one node, in the per-volume process model: every volume is one engine and one
# replica process here (its replica on this node, reached over the unix socket with shared memory;
# a 3-replica volume adds a replica process on two other nodes, and its node hosts other volumes'
# replicas in turn, so a node carries about one engine and three replicas per attached volume).
#
# 1. Starts VOLUMES volumes one after the other and times each: replica start to ready, engine
#    start to its NBD export being ready (the attach as the engine sees it: connect, hello, fence).
# 2. Leaves them idle IDLE_SECONDS: total CPU of all processes, resident (RSS) and proportional
#    (PSS, shared libraries split between processes) memory per engine and per replica.
# 3. Runs fio 4k random writes and reads (QD32 each) on one volume alone, then on LOADED volumes
#    at once (one fio job per volume, one fio process): aggregate IOPS against the single volume,
#    and the CPU of the serving processes per IO. Results: docs/performance.md.
#
#   bench/scale.sh     # VOLUMES=50 LOADED=8 SIZE_MIB=256 RUNTIME=10 IDLE_SECONDS=10 DIR=/var/tmp
set -euo pipefail
. "$(dirname "$0")/lib.sh"
VOLUMES="${VOLUMES:-50}"
LOADED="${LOADED:-8}"
SIZE_MIB="${SIZE_MIB:-256}"
RUNTIME="${RUNTIME:-10}"
IDLE_SECONDS="${IDLE_SECONDS:-10}"
[ "$LOADED" -le "$VOLUMES" ] || { echo "LOADED ($LOADED) must not exceed VOLUMES ($VOLUMES)" >&2; exit 2; }

bench_setup scale barnacle-replica barnacle-engine

now_ms() { date +%s%3N; }

engines=() replicas=() uris=()
: > "$work/attach"
for i in $(seq 1 "$VOLUMES"); do
  d="$work/v$i"
  t0=$(now_ms)
  "$BIN/barnacle-replica" --dir "$d-r" --volume-id "v$i" --token-file "$work/token" --size "${SIZE_MIB}MiB" \
    --listen-unix "$d-r.sock" --ready-file "$d-r.ready" >/dev/null 2>>"$work/log" &
  pids+=($!); replicas+=($!)
  wait_ready "$d-r.ready" 0.01
  t1=$(now_ms)
  mkdir -p "$d-e"
  "$BIN/barnacle-engine" --volume-id "v$i" --token-file "$work/token" --replica "r0=unix:$d-r.sock" \
    --state-dir "$d-e" --nbd-listen 127.0.0.1:0 --ready-file "$d-e/ready" >/dev/null 2>>"$work/log" &
  pids+=($!); engines+=($!)
  wait_ready "$d-e/ready" 0.01
  t2=$(now_ms)
  uris+=("nbd://$(field "$d-e/ready" nbd)/v$i")
  echo "$((t1 - t0)) $((t2 - t1))" >> "$work/attach"
done

ticks() { local n=0 p; for p in "$@"; do n=$((n + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$n"; }
kib() { # field pid... : sum of a /proc/PID/status or smaps_rollup field, KiB
  local f=$1 n=0 p; shift
  for p in "$@"; do
    n=$((n + $(awk -v f="$f:" '$1 == f {print $2}' "/proc/$p/status" "/proc/$p/smaps_rollup" 2>/dev/null | head -1)))
  done
  echo "$n"
}
sleep 2
c0=$(ticks "${pids[@]}"); sleep "$IDLE_SECONDS"; c1=$(ticks "${pids[@]}")
idle_ticks=$((c1 - c0))
mem="$(kib VmRSS "${engines[@]}") $(kib VmRSS "${replicas[@]}") $(kib Pss "${engines[@]}") $(kib Pss "${replicas[@]}")"

# Load: fill the loaded volumes so reads read data, then one volume alone and LOADED at once.
for i in $(seq 0 $((LOADED - 1))); do
  fio --name=fill --ioengine=nbd --uri="${uris[$i]}" --rw=write --bs=1m --iodepth=8 --size="${SIZE_MIB}m" --output=/dev/null
done
run() { # name n rw : fio on the first n volumes at once
  local name=$1 n=$2 rw=$3 args=() i serving=()
  for i in $(seq 0 $((n - 1))); do
    args+=(--name="v$i" --uri="${uris[$i]}")
    serving+=("${engines[$i]}" "${replicas[$i]}")
  done
  sync
  local t0; t0=$(ticks "${serving[@]}")
  fio --ioengine=nbd --rw="$rw" --bs=4k --iodepth=32 --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" \
    --randrepeat=0 --norandommap --group_reporting --output-format=json --output="$work/$name.json" "${args[@]}"
  echo $(( $(ticks "${serving[@]}") - t0 )) > "$work/$name.cpu"
}
run w1 1 randwrite; run wn "$LOADED" randwrite
run r1 1 randread; run rn "$LOADED" randread

python3 - "$work" "$VOLUMES" "$LOADED" "$IDLE_SECONDS" "$idle_ticks" "$(getconf CLK_TCK)" $mem <<'PY'
import json, statistics, sys
work, volumes, loaded, idle, idle_ticks, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rss_e, rss_r, pss_e, pss_r = (int(x) for x in sys.argv[7:11])
attach = [tuple(int(x) for x in l.split()) for l in open(f"{work}/attach")]
rep = [a[0] for a in attach]; eng = [a[1] for a in attach]
q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(len(xs) * p))]
print(f"{volumes} volumes, one engine and one replica process each (replica over a unix socket)\n")
print("| measure | median | p90 | max |")
print("|---|---|---|---|")
print(f"| replica start → ready (ms) | {statistics.median(rep):.0f} | {q(rep, .9)} | {max(rep)} |")
print(f"| engine start → export ready, the attach (ms) | {statistics.median(eng):.0f} | {q(eng, .9)} | {max(eng)} |")
print(f"| first 5 volumes' attach (ms) | {statistics.median(eng[:5]):.0f} | | |")
print(f"| last 5 volumes' attach (ms) | {statistics.median(eng[-5:]):.0f} | | |")
cpu = idle_ticks / hz / idle * 100
print(f"\nidle over {idle} s: all {2 * volumes} processes together {cpu:.2f} % of one core ({cpu / volumes:.3f} % per volume)")
print("memory per process, MiB: RSS (PSS, with shared libraries split between processes)")
print(f"- engine:  {rss_e / volumes / 1024:.1f} ({pss_e / volumes / 1024:.1f})")
print(f"- replica: {rss_r / volumes / 1024:.1f} ({pss_r / volumes / 1024:.1f})")
print(f"- total for {volumes} volumes: {(rss_e + rss_r) / 1024:.0f} MiB RSS, {(pss_e + pss_r) / 1024:.0f} MiB PSS\n")
def fig(name):
    d = json.load(open(f"{work}/{name}.json"))["jobs"][0]
    side = "write" if name.startswith("w") else "read"
    ios = d[side]["total_ios"]
    cpu = int(open(f"{work}/{name}.cpu").read()) / hz * 1e6 / max(ios, 1)
    return d[side]["iops"], cpu
print(f"| fio 4k QD32 per volume | 1 volume | {loaded} volumes at once | ratio | CPU per IO, 1 / {loaded} (µs) |")
print("|---|---|---|---|---|")
for label, a, b in (("random write", "w1", "wn"), ("random read", "r1", "rn")):
    (i1, c1), (i2, c2) = fig(a), fig(b)
    print(f"| {label} | {i1:,.0f} IOPS | {i2:,.0f} IOPS | {i2 / i1:.2f} | {c1:.1f} / {c2:.1f} |")
PY
