#!/usr/bin/env bash
# Does a put get slower as the store grows? One 3-member cell `grow` (plaintext,
# on 127.0.0.1 ports of its own that nothing in cells/ uses: members' client,
# peer and HTTP ports 17379-17381, 17389-17391, 17399-17401; its own data in a
# temp dir) with auto-compaction in revision mode, driven by
# scenarios/growing-keyspace.toml (every put a new key) for DURATION; then the
# disk before and after compaction + defrag. It can run beside `cellplane up`
# (not for figures worth quoting: they share the CPU).
#
#   loadgen/bench-growth.sh [DURATION_SECS] [CLIENTS]
#   TARGET=etcd loadgen/bench-growth.sh ...   # the same against etcd 3.4 (3 members,
#                                             # auto-compaction revision 100000)
#
# Needs a release build (cargo build --release --workspace) and etcdctl. Prints
# the p99 and throughput of each tenth of the run, the keys stored, and the
# member's data on disk; the JSON report stays in $OUT (default /tmp). Refuses
# to start, naming what to stop, while one of its ports is taken (with
# TARGET=etcd, etcd's: 42379/42380, 42389/42390, 42399/42400).
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-600}
clients=${2:-64}
bin=${CARGO_TARGET_DIR:-target}/release
out=${OUT:-/tmp}/bench-growth-$(date -u +%Y%m%dT%H%M%SZ).json
# shellcheck source=loadgen/up-lib.sh
. loadgen/up-lib.sh
work=$(mktemp -d /tmp/cellplane-growth.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The cell's file: members N = 1, 2, 3 on 17379 + 10 (N - 1) (client), + 1 (peer),
# + 2 (HTTP), below the kernel's ephemeral range (32768 and up) and clear of every
# port in cells/ and of etcd's.
base=17369
{
  echo 'name = "grow"'
  echo '[maintenance]'
  echo 'auto_compaction_mode = "revision"'
  echo 'auto_compaction_retained_revisions = 100000'
  echo 'auto_compaction_interval_ms = 30000'
  echo 'quota_backend_bytes = 8589934592'
  for id in 1 2 3; do
    p=$((base + 10 * id))
    printf '[[members]]\nid = %d\nclient = "127.0.0.1:%d"\npeer = "127.0.0.1:%d"\nhttp = "127.0.0.1:%d"\n' \
      "$id" "$p" $((p + 1)) $((p + 2))
  done
} > "$work/grow.toml"

if [ "${TARGET:-cellplane}" = etcd ]; then
  refuse_taken_ports etcd
  bench_header "etcd, ${dur}s of puts of new keys, $clients clients"
  trap 'loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
  eps=$(ETCD_EXTRA_FLAGS="--auto-compaction-mode=revision --auto-compaction-retention=100000" \
    loadgen/etcd-cluster.sh start "$work/etcd")
  kind=etcd
  data="$work/etcd/e0"
else
  refuse_taken_ports "$work/grow.toml"
  bench_header "cell grow, ${dur}s of puts of new keys, $clients clients"
  start_cell "$bin" "$work/grow.toml" "$work"   # up-lib.sh: data and logs in $work/grow-N
  eps=$(for id in 1 2 3; do printf '127.0.0.1:%d,' $((base + 10 * id)); done)
  eps=${eps%,}
  kind=cell
  data="$work/grow-1"
fi

cellarg=()
[ "$kind" = cell ] && cellarg=(--cell grow)
"$bin/loadgen" run loadgen/scenarios/growing-keyspace.toml --target "$kind" "${cellarg[@]}" \
  --endpoints "$eps" --set "load.duration=$dur" --set "load.clients=$clients" \
  --json "$out" --no-progress >/dev/null

python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
secs = r["series"][0]["points"]
n = len(secs)
tenth = max(1, n // 10)
print("tenth  keys_at_end  puts/s   p99_ms(max of its seconds)  p99_ms(median of its seconds)")
keys = 0
for i in range(0, n, tenth):
    chunk = secs[i:i + tenth]
    ok = sum(s["ok"] for s in chunk)
    keys += ok
    p99s = sorted(s["p99_us"] for s in chunk if s["ok"])
    if not p99s:
        continue
    print(f"{i // tenth + 1:>5}  {keys:>11}  {ok / len(chunk):>7.0f}  {p99s[-1] / 1000:>26.1f}  {p99s[len(p99s) // 2] / 1000:>29.1f}")
PY

if [ "$kind" = cell ]; then
  echo "snapshots built by member 1 (Raft's, every raft.snapshot_every_entries):"
  grep -c 'built a snapshot' "$work/grow-1.log" || true
fi
du_mib() { du -sm "$data" | cut -f1; }
echo "member 1 on disk after the run: $(du_mib) MiB"
rev=$(etcdctl --endpoints "$eps" endpoint status -w json | grep -o '"revision":[0-9]*' | head -1 | cut -d: -f2)
etcdctl --endpoints "$eps" --command-timeout=600s compact "$rev" --physical >/dev/null
echo "member 1 on disk after compact $rev --physical: $(du_mib) MiB"
etcdctl --endpoints "$eps" --command-timeout=600s defrag >/dev/null
echo "member 1 on disk after defrag: $(du_mib) MiB"
