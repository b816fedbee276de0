#!/usr/bin/env bash
# Write outage after kill -9 of a cell's leader, as a client of the router sees it,
# in three shapes: loadgen's writers sharing one connection, loadgen's writers on
# a connection each (both with `loadgen failover`: kills, restarts, spurious
# elections under load), and etcdctl — an independent client — putting in a loop.
#
#   cellplane up --data-dir /tmp/fo --fresh &      # in another terminal
#   loadgen/bench-failover.sh /tmp/fo [kills]      # default 30 (etcdctl: a third)
#   ETCDCTL_ONLY=1 loadgen/bench-failover.sh /tmp/fo   # the etcdctl part alone
#
# It starts nothing: it needs the `cellplane up` of DIR running, started without
# --restart (it restarts what it kills through `up` itself), and it kills alpha's
# leader again and again. Before the first kill it checks that DIR is that:
# `up`'s supervisor alive and without --restart, every process up.json lists
# alive, a cellplane process, holding its ports (when `ss` can tell) and
# answering /readyz; otherwise it refuses, saying what to stop and start.
# Needs a release build (cargo build --release) and etcdctl.
set -euo pipefail
# shellcheck source=loadgen/up-lib.sh
. "$(dirname "$0")/up-lib.sh"
if [ $# -lt 1 ]; then
  {
    echo "usage: $(basename "$0") DIR [KILLS]"
    echo "It runs against a \`cellplane up\` you start first, without --restart, e.g.:"
    echo "  cellplane up --fresh --data-dir /tmp/lg-up &"
    echo "  $0 /tmp/lg-up 30"
  } >&2
  exit 2
fi
dir=$1
kills=${2:-30}
cell=alpha
bin=${CARGO_TARGET_DIR:-target}/release
up_json="$dir/up.json"
check_up_env "$dir"
if [ -n "${ETCDCTL_ONLY:-}" ]; then shape="etcdctl only, $(( (kills + 2) / 3 )) kills"; else shape="$kills kills per loadgen shape, $(( (kills + 2) / 3 )) with etcdctl"; fi
bench_header "the \`cellplane up\` of $dir, kill -9 of $cell's leader: $shape"

if [ -z "${ETCDCTL_ONLY:-}" ]; then
  echo "== loadgen, 16 writers on one connection"
  "$bin/loadgen" failover --up "$dir" --cell $cell --kills "$kills" --writers 16 --connections 1 --quiet 30 | tail -1
  echo "== loadgen, 64 writers on a connection each"
  "$bin/loadgen" failover --up "$dir" --cell $cell --kills "$kills" --writers 64 --connections 64 --quiet 30 | tail -1
fi

q() { python3 -c "import json,sys; $1" "$up_json" "${@:2}"; }
router=$(q 'print(next(p["client"] for p in json.load(open(sys.argv[1]))["processes"] if p["kind"]=="router"))')
members=$(q 'print(",".join(p["client"] for p in json.load(open(sys.argv[1]))["processes"] if p["cell"]==sys.argv[2]))' $cell)
leader_id() {
  etcdctl --endpoints="$members" endpoint status -w json 2>/dev/null | python3 -c '
import json, sys
rows = json.load(sys.stdin)
top = max(r["Status"]["raftTerm"] for r in rows)
for r in rows:
    s = r["Status"]
    if s["raftTerm"] == top and s["header"]["member_id"] == s["leader"]:
        print(s["leader"])
        break'
}
echo "== etcdctl put in a loop through the router, $(( (kills + 2) / 3 )) kills"
results=()
for k in $(seq $(( (kills + 2) / 3 ))); do
  id=""
  for _ in $(seq 40); do id=$(leader_id || true); [ -n "$id" ] && break; sleep 0.25; done
  [ -n "$id" ] || { echo "no leader in $cell" >&2; exit 1; }
  pid=$(q 'print(next(p["pid"] for p in json.load(open(sys.argv[1]))["processes"] if p["cell"]==sys.argv[2] and p["id"]==int(sys.argv[3])))' $cell "$id")
  http=$(q 'print(next(p["http"] for p in json.load(open(sys.argv[1]))["processes"] if p["cell"]==sys.argv[2] and p["id"]==int(sys.argv[3])))' $cell "$id")
  t0=$(date +%s%N)
  kill -9 "$pid"
  until etcdctl --endpoints="$router" --command-timeout=1s put /a/failover-etcdctl "$k" >/dev/null 2>&1; do :; done
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  results+=("$ms")
  echo "kill $k: $cell/$id -> a put succeeded after $ms ms (etcdctl, each try a new process)"
  for _ in $(seq 100); do [ "$(q 'print(next(p["pid"] for p in json.load(open(sys.argv[1]))["processes"] if p["cell"]==sys.argv[2] and p["id"]==int(sys.argv[3])))' $cell "$id")" = 0 ] && break; sleep 0.1; done
  mkdir -p "$dir/restart" && touch "$dir/restart/member-$cell-$id"
  for _ in $(seq 150); do curl -sf "http://$http/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  sleep 3
done
printf '%s\n' "${results[@]}" | sort -n | python3 -c '
import sys
v = [int(x) for x in sys.stdin if x.strip()]
print(f"etcdctl: {len(v)} kills: median {v[len(v)//2]} ms, max {v[-1]} ms")'
