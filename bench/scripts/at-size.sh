#!/usr/bin/env bash
# The storage issue's measurements on this machine: one group of 3 at
# KEYS keys of VALUE_BYTES, 64 closed-loop clients; RSS and disk per
# replica; a kill -9 restart of the whole group; a second group joining
# under a 50/50 load. Release binaries from target/release.
#   bench/scripts/at-size.sh KEYS VALUE_BYTES OUT_DIR
# The preload takes minutes at 1,000,000 keys: SAVE_PRELOAD=DIR keeps the
# shardmaster's and group 1's data directories after it, and
# PRELOADED=DIR starts from such a copy instead of preloading (same KEYS
# and VALUE_BYTES, and binaries of the same data format).
# JOIN_LOAD=0 joins with no load running, to see the move's own rate and
# CPU cost.
set -euo pipefail
KEYS=${1:-1000000}
VALUE_BYTES=${2:-1024}
OUT=${3:-target/at-size}
SECONDS_EACH=${SECONDS_EACH:-20}
B=${B:-target/release}
D=$(mktemp -d /tmp/kvbench.XXXX)
mkdir -p "$OUT"
M=127.0.0.1:7200,127.0.0.1:7201,127.0.0.1:7202
G1=127.0.0.1:7210,127.0.0.1:7211,127.0.0.1:7212
G2=127.0.0.1:7220,127.0.0.1:7221,127.0.0.1:7222
PRELOADED=${PRELOADED:-}
SAVE_PRELOAD=${SAVE_PRELOAD:-}
if [ -n "$PRELOADED" ]; then cp -a "$PRELOADED"/. "$D"/; fi
declare -A PIDS
start() { # name args...
  local name=$1; shift
  "$B/shardkv-node" "$@" >>"$D/$name.log" 2>&1 &
  PIDS[$name]=$!
}
# LOGS=DIR keeps every node's log.
cleanup() {
  kill -9 "${PIDS[@]}" 2>/dev/null || true
  if [ -n "${LOGS:-}" ]; then mkdir -p "$LOGS" && cp "$D"/*.log "$LOGS"/; fi
  rm -rf "$D"
}
trap cleanup EXIT
start_masters_and_group_1() {
  for i in 0 1 2; do start m$i master --id $i --peers $M --data-dir "$D/m$i"; done
  for i in 0 1 2; do start g1-$i kv --gid 1 --id $i --peers $G1 --masters $M --data-dir "$D/g1-$i" --metrics-addr 127.0.0.1:821$i; done
}
start_masters_and_group_1
for i in 0 1 2; do start g2-$i kv --gid 2 --id $i --peers $G2 --masters $M --data-dir "$D/g2-$i" --metrics-addr 127.0.0.1:822$i; done
ctl() { "$B/shardkvctl" --masters $M "$@"; }
report() { # label file
  python3 -c "import json; d=json.load(open('$2')); l=d['latency_us']; print('$1: %.0f ops/s, p50 %.1f ms, p99 %.1f ms, max %.1f ms, %d errors' % (d['throughput_ops_per_second'], l['p50']/1e3, l['p99']/1e3, l['max']/1e3, d['errors']))" | tee -a "$OUT/summary.txt"
}
# A run with failed operations still prints its report (and exits 1).
bench() { "$B/shardkv-bench" run --masters $M --key-count "$KEYS" --value-bytes "$VALUE_BYTES" --clients 64 "$@" || true; }
if [ -n "$PRELOADED" ]; then
  until ctl get warm >/dev/null 2>&1; do sleep 0.5; done
  t1=$(date +%s.%N)
  echo "preload: $KEYS keys copied from $PRELOADED" | tee "$OUT/summary.txt"
else
  until ctl join 1 $G1 >/dev/null 2>&1; do sleep 0.5; done
  until ctl put warm up >/dev/null 2>&1; do sleep 0.5; done
  t0=$(date +%s.%N)
  bench --preload --operations 64 --read-ratio 0 --json >/dev/null
  t1=$(date +%s.%N)
  echo "preload: $KEYS keys in $(echo "$t1 - $t0" | bc) s: $(echo "$KEYS / ($t1 - $t0)" | bc) keys/s" | tee "$OUT/summary.txt"
fi
# Followers apply behind the leader during a bulk load: measure once
# every replica of group 1 has applied everything decided.
gauge() { curl -s "http://127.0.0.1:821$1/metrics" | awk -v m="$2" '$1 ~ m"$" || $1 ~ m"[{]" {print $2}' | head -1; }
settled() {
  for i in 0 1 2; do
    [ "$(gauge $i applied_slot)" = "$(gauge $i decided_slot)" ] || return 1
  done
}
until settled; do sleep 0.5; done
t2=$(date +%s.%N)
echo "every replica applied the preload $(echo "$t2 - $t1" | bc) s after it ended" | tee -a "$OUT/summary.txt"
if [ -n "$SAVE_PRELOAD" ]; then
  # Stopped cleanly, so the copy is what a restart would find.
  for n in m0 m1 m2 g1-0 g1-1 g1-2; do kill -TERM "${PIDS[$n]}"; done
  for n in m0 m1 m2 g1-0 g1-1 g1-2; do while kill -0 "${PIDS[$n]}" 2>/dev/null; do sleep 0.1; done; done
  rm -rf "$SAVE_PRELOAD" && mkdir -p "$SAVE_PRELOAD"
  for n in m0 m1 m2 g1-0 g1-1 g1-2; do cp -a "$D/$n" "$SAVE_PRELOAD/"; done
  start_masters_and_group_1
  until ctl get warm >/dev/null 2>&1; do sleep 0.5; done
  echo "saved the preloaded data directories in $SAVE_PRELOAD" | tee -a "$OUT/summary.txt"
fi
for r in 0 1 0.5; do
  bench --read-ratio $r --seconds "$SECONDS_EACH" --json >"$OUT/run-$r.json"
  report "read_ratio $r" "$OUT/run-$r.json"
done
for i in 0 1 2; do
  echo "g1-$i rss $(( $(ps -o rss= -p ${PIDS[g1-$i]}) / 1024 )) MiB, disk $(du -sm "$D/g1-$i" | cut -f1) MiB" | tee -a "$OUT/summary.txt"
done
# Restart of the whole group after kill -9: time to the first served read.
for i in 0 1 2; do kill -9 "${PIDS[g1-$i]}"; done
sleep 1
t0=$(date +%s.%N)
for i in 0 1 2; do start g1-$i kv --gid 1 --id $i --peers $G1 --masters $M --data-dir "$D/g1-$i"; done
until ctl get warm >/dev/null 2>&1; do sleep 0.05; done
t1=$(date +%s.%N)
echo "restart after kill -9 to the first read: $(echo "$t1 - $t0" | bc) s" | tee -a "$OUT/summary.txt"
# A second group joins under a 50/50 load and takes half the shards. Each
# client keeps to one shard, so those on shards that stay are not held up
# by the ones that move (closed-loop clients over every shard all end up
# waiting on a moving one).
bench --read-ratio 0.5 --seconds 10 --shard-per-client --json >"$OUT/before-join.json"
report "50/50 before the join (a shard a client)" "$OUT/before-join.json"
# CPU seconds (user + system) the given processes have used so far.
cpu_s() {
  local ticks=0 pid
  for pid in "$@"; do ticks=$(( ticks + $(awk '{print $14 + $15}' "/proc/$pid/stat") )); done
  echo "scale=2; $ticks / $(getconf CLK_TCK)" | bc
}
g1_pids="${PIDS[g1-0]} ${PIDS[g1-1]} ${PIDS[g1-2]}"
g2_pids="${PIDS[g2-0]} ${PIDS[g2-1]} ${PIDS[g2-2]}"
if [ "${JOIN_LOAD:-1}" = 1 ]; then
  bench --read-ratio 0.5 --seconds 20 --shard-per-client --json >"$OUT/join.json" &
  load=$!
  sleep 5
fi
# MiB the given processes have written to disk so far.
written_mib() {
  local bytes=0 pid
  for pid in "$@"; do bytes=$(( bytes + $(awk '/^write_bytes/ {print $2}' "/proc/$pid/io") )); done
  echo $(( bytes / 1048576 ))
}
g1_cpu0=$(cpu_s $g1_pids); g2_cpu0=$(cpu_s $g2_pids)
g1_written0=$(written_mib $g1_pids); g2_written0=$(written_mib $g2_pids)
t0=$(date +%s.%N)
# PERF=FILE samples every CPU for the join's first 10 s.
if [ -n "${PERF:-}" ]; then perf record -a -F 499 -o "$PERF" -- sleep 10 >/dev/null 2>&1 & fi
echo "join sent at $(date +%s.%N) (epoch seconds)" >>"$OUT/summary.txt"
ctl join 2 $G2 >/dev/null
# Done when every replica of group 2 serves its 32 shards.
moved() {
  for i in 0 1 2; do
    curl -s "http://127.0.0.1:822$i/metrics" | grep -q '^[a-z_]*shards_serving[{ ].* 32$' || return 1
  done
}
until moved; do sleep 0.1; done
t1=$(date +%s.%N)
mib=$(echo "$KEYS * $VALUE_BYTES / 2 / 1048576" | bc)
echo "join: about $mib MiB (half the data) served by every replica of group 2 in $(echo "$t1 - $t0" | bc) s: $(echo "$mib / ($t1 - $t0)" | bc) MiB/s per replica" | tee -a "$OUT/summary.txt"
echo "  CPU during it: group 1 (senders) $(echo "$(cpu_s $g1_pids) - $g1_cpu0" | bc) s, group 2 (receivers) $(echo "$(cpu_s $g2_pids) - $g2_cpu0" | bc) s" | tee -a "$OUT/summary.txt"
echo "  written to disk during it: group 1 $(( $(written_mib $g1_pids) - g1_written0 )) MiB, group 2 $(( $(written_mib $g2_pids) - g2_written0 )) MiB (3 replicas each)" | tee -a "$OUT/summary.txt"
if [ "${JOIN_LOAD:-1}" != 1 ]; then exit 0; fi
wait $load || true
echo "  written to disk by the end of the load: group 1 $(( $(written_mib $g1_pids) - g1_written0 )) MiB, group 2 $(( $(written_mib $g2_pids) - g2_written0 )) MiB" | tee -a "$OUT/summary.txt"
report "50/50 during the join (20 s from 5 s before it)" "$OUT/join.json"
# The target for the shards that did not move: a p99 within 2x of before.
python3 -c "
import json
m = json.load(open('$OUT/join.json'))['by_move']
for name, label in (('moved', 'the %d that moved' % len(m['moved_shards'])), ('unmoved', 'the others')):
    s = m[name]; l = s['latency_us']
    print('  on %s: %d ops, p99 %.1f ms, max %.1f ms, %d errors' % (label, s['operations'], l['p99'] / 1e3, l['max'] / 1e3, s['errors']))
    print('    p99 ms by second (the join begins at about 5): ' + ' '.join('%d:%.0f' % (b['second'], b['p99_us'] / 1e3) for b in s['by_second']))
    print('    ops by second: ' + ' '.join('%d:%d' % (b['second'], b['operations']) for b in s['by_second']))
" | tee -a "$OUT/summary.txt"
for i in 0 1 2; do
  echo "g2-$i rss $(( $(ps -o rss= -p ${PIDS[g2-$i]}) / 1024 )) MiB, peak $(grep VmHWM /proc/${PIDS[g2-$i]}/status | awk '{print int($2/1024)}') MiB, disk $(du -sm "$D/g2-$i" | cut -f1) MiB" | tee -a "$OUT/summary.txt"
done
