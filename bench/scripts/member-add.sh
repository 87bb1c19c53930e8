#!/usr/bin/env bash
# The membership issue's measurement: a group of 3 holding a preloaded
# data set (bench/scripts/at-size.sh SAVE_PRELOAD=DIR makes one) gains a
# fourth member under a 50/50 load of 64 clients: the time from
# `shardkvctl member add` to the new member voting, and the clients' p99
# during the change against the p99 before it.
#   PRELOADED=DIR bench/scripts/member-add.sh KEYS VALUE_BYTES OUT_DIR
set -euo pipefail
KEYS=${1:-1000000}
VALUE_BYTES=${2:-1024}
OUT=${3:-target/member-add}
B=${B:-target/release}
PRELOADED=${PRELOADED:?set PRELOADED to a directory at-size.sh saved}
D=$(mktemp -d /tmp/kvmember.XXXX)
mkdir -p "$OUT"
M=127.0.0.1:7200,127.0.0.1:7201,127.0.0.1:7202
G1=127.0.0.1:7210,127.0.0.1:7211,127.0.0.1:7212
NEW=127.0.0.1:7213
cp -a "$PRELOADED"/. "$D"/
declare -A PIDS
start() { # name args...
  local name=$1; shift
  "$B/shardkv-node" "$@" >>"$D/$name.log" 2>&1 &
  PIDS[$name]=$!
}
cleanup() {
  kill -9 "${PIDS[@]}" 2>/dev/null || true
  if [ -n "${LOGS:-}" ]; then mkdir -p "$LOGS" && cp "$D"/*.log "$LOGS"/; fi
  rm -rf "$D"
}
trap cleanup EXIT
for i in 0 1 2; do start m$i master --id $i --peers $M --data-dir "$D/m$i"; done
for i in 0 1 2; do start g1-$i kv --gid 1 --id $i --peers $G1 --masters $M --data-dir "$D/g1-$i"; done
ctl() { "$B/shardkvctl" --masters $M "$@"; }
until ctl get warm >/dev/null 2>&1; do sleep 0.5; done
bench() { "$B/shardkv-bench" run --masters $M --key-count "$KEYS" --value-bytes "$VALUE_BYTES" --clients 64 --read-ratio 0.5 "$@" || true; }
report() { # label file
  python3 -c "import json; d=json.load(open('$2')); l=d['latency_us']; print('$1: %.0f ops/s, p50 %.1f ms, p99 %.1f ms, max %.1f ms, %d errors' % (d['throughput_ops_per_second'], l['p50']/1e3, l['p99']/1e3, l['max']/1e3, d['errors']))" | tee -a "$OUT/summary.txt"
}
echo "member add to a group of 3 holding $KEYS keys of $VALUE_BYTES B, 64 clients at 50/50" | tee "$OUT/summary.txt"
bench --seconds 20 --json >"$OUT/before.json"
report "before the change" "$OUT/before.json"
bench --seconds 40 --json >"$OUT/during.json" &
load=$!
sleep 5
start g1-3 kv --gid 1 --id 3 --peers $G1,$NEW --masters $M --data-dir "$D/g1-3" --join
t0=$(date +%s.%N)
ctl --timeout 60 member add 1 $NEW | tee -a "$OUT/summary.txt"
t1=$(date +%s.%N)
echo "member add to voting: $(echo "$t1 - $t0" | bc) s (the new replica's process started at the same moment)" | tee -a "$OUT/summary.txt"
echo "the new replica's data directory: $(du -sm "$D/g1-3" | cut -f1) MiB" | tee -a "$OUT/summary.txt"
wait $load
report "during the change (40 s, the add began 5 s in)" "$OUT/during.json"
