#!/usr/bin/env bash
# What 1,000 never-read watch streams cost the write path, cellplane (cell alpha,
# 3 members) against etcd 3.4 (3 members) in the same run, measured by an
# independent client: stalled_watchers.py (Python grpcio, gRPC C-core, default
# HTTP/2 flow control with BDP probing), not the project's Rust loadgen.
#
#   loadgen/independent/bench-stalled.sh [DURATION_SECS=10] [ROUNDS=3]
#
# Each run: 64 writers on 16 connections putting 256 B values under /bench/
# (10,000 keys) for WARMUP (2) + DURATION seconds, with no watchers ("none") or
# with 1,000 watch streams on /bench/ on 16 connections of their own, never read
# ("stalled"). Every run starts its system fresh and stops it after. A round is
# the four runs (cellplane none, etcd none, cellplane stalled, etcd stalled), in
# reverse order every other round. Prints one line per run (the client's JSON),
# then each system and case's medians over rounds (ops/s, p99, the members' CPU
# per 1,000 puts) and the ratio stalled / none of the same system: of the
# medians, and the median of each round's own ratio. For cellplane it also counts
# the streams its members ended as not read (their logs' "watch stream not read
# by its client" lines).
#
# ROUNDS can also come from the environment (ROUNDS=3 ... bench-stalled.sh 10);
# WARMUP=SECS, PYTHON=python3 with grpcio, OUT=FILE for the runs' JSON lines
# ("SYSTEM CASE JSON"; default /tmp/bench-stalled-<UTC time>.jsonl). Installs grpcio and grpcio-tools with
# pip when missing. Refuses to start, naming what to stop, while a port of
# alpha's members or of etcd's is taken. Needs a release build of cellplane
# (${CARGO_TARGET_DIR:-target}/release/cellplane).
set -euo pipefail
cd "$(dirname "$0")/../.."
dur=${1:-10}
rounds=${2:-${ROUNDS:-3}}
warmup=${WARMUP:-2}
bin=${CARGO_TARGET_DIR:-target}/release
client=loadgen/independent/stalled_watchers.py
# shellcheck source=loadgen/up-lib.sh
. loadgen/up-lib.sh
[ -x "$bin/cellplane" ] || { echo "$(basename "$0"): no $bin/cellplane: cargo build --release --workspace (with this CARGO_TARGET_DIR)" >&2; exit 1; }
py=${PYTHON:-$(up_lib_python)}
if ! "$py" -c 'import grpc, grpc_tools' 2>/dev/null; then
  echo "$(basename "$0"): installing grpcio and grpcio-tools for $py" >&2
  "$py" -m pip install --quiet grpcio grpcio-tools >&2 || {
    echo "$(basename "$0"): could not install them; in a venv: python3 -m venv V && V/bin/pip install grpcio grpcio-tools, then PYTHON=V/bin/python $0" >&2
    exit 1
  }
fi
refuse_taken_ports cells/alpha.toml etcd
bench_header "independent client ($py, grpcio $("$py" -c 'import grpc; print(grpc.__version__)')): 64 writers on 16 connections, 1,000 stalled watchers on 16, ${warmup}s + ${dur}s per run, $rounds round(s)"
work=$(mktemp -d /tmp/cellplane-stalled.XXXXXX)
cleanup() {
  stop_cell
  loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# One run: SYSTEM CASE ENDPOINTS WATCHERS PID...; appends "SYSTEM CASE JSON" to results.
measure() {
  local system=$1 case=$2 endpoints=$3 watchers=$4 rc=0 line; shift 4
  line=$("$py" "$client" "$endpoints" --duration "$dur" --warmup "$warmup" --writers 64 --write-conns 16 \
    --watchers "$watchers" --watch-conns 16 --value-bytes 256 --prefix /bench/ \
    --server-pids "$(IFS=,; echo "$*")" --label "$system") || rc=$?
  # 3: the run completed with failed puts (kept, flagged); anything else: no figures.
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
    echo "$(basename "$0"): $system $case: the client failed (exit $rc)" >&2
    exit 1
  fi
  printf '%s %s %s\n' "$system" "$case" "$line" >>"$results"
  "$py" - "$system" "$case" "$line" <<'PY'
import json, sys
s, c, d = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cpu = d["server_cpu_ms_per_1k_puts"]
print(f"{s:<10} {c:<8} {d['ops_per_s']:8.0f} ops/s  p50 {d['p50_ms']:7.2f} ms  p99 {d['p99_ms']:8.2f} ms"
      f"  members {cpu if cpu is not None else '?':>6} cpu ms/1k puts  client {d['client_cpu_ms_per_1k_puts']} cpu ms/1k"
      f"  client rss {d['client_max_rss_mb']:.0f} MB  errors {d['errors']}  watch streams ended (client) {d['watch_streams_ended']}"
      + ("" if d["ok"] else "  FAILED PUTS: " + json.dumps(d["first_error"])), flush=True)
PY
}
cell=127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399
results=${OUT:-/tmp/bench-stalled-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
: >"$results"
runs=("cellplane none 0" "etcd none 0" "cellplane stalled 1000" "etcd stalled 1000")
for round in $(seq 1 "$rounds"); do
  order=(0 1 2 3)
  [ $((round % 2)) -eq 0 ] && order=(3 2 1 0)
  echo "# round $round"
  for i in "${order[@]}"; do
    read -r system case watchers <<<"${runs[$i]}"
    if [ "$system" = cellplane ]; then
      start_cell "$bin" cells/alpha.toml "$work"   # up-lib.sh: checks alpha's ports again, fails unless every member is ready
      measure cellplane "$case" "$cell" "$watchers" "${pids[@]}"
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || echo "  cellplane: member pid $p died during the run" >&2; done
      ended=$(cat "$work"/alpha-*.log 2>/dev/null | grep -c "watch stream not read by its client" || true)
      echo "  cellplane: members ended $ended watch stream(s) as not read"
      stop_cell
    else
      etcd=$(loadgen/etcd-cluster.sh start "$work/etcd")
      # shellcheck disable=SC2046 # one PID per word
      measure etcd "$case" "$etcd" "$watchers" $(cat "$work"/etcd/e*.pid)
      for f in "$work"/etcd/e*.pid; do kill -0 "$(cat "$f")" 2>/dev/null || echo "  etcd: $(basename "$f" .pid) died during the run" >&2; done
      loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null
    fi
  done
done
echo "# medians of $rounds round(s); stalled / none of the same system: of the medians | the median of each round's own ratio"
"$py" - "$results" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    s, c, j = line.split(" ", 2)
    runs.setdefault((s, c), []).append(json.loads(j))
med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
def col(rs, k):
    return [r[k] for r in rs if r.get(k) is not None]
for s in ("cellplane", "etcd"):
    for c in ("none", "stalled"):
        rs = runs.get((s, c), [])
        if not rs:
            continue
        o, p, u = med(col(rs, "ops_per_s")), med(col(rs, "p99_ms")), med(col(rs, "server_cpu_ms_per_1k_puts"))
        errs = sum(r["errors"] for r in rs)
        line = f"{s:<10} {c:<8} {o:8.0f} ops/s {p:8.2f} ms p99 {u:7.0f} members cpu ms/1k puts"
        base = runs.get((s, "none"), [])
        if c != "none" and base:
            bo, bp = med(col(base, "ops_per_s")), med(col(base, "p99_ms"))
            n = min(len(rs), len(base))
            ro = med([rs[i]["ops_per_s"] / base[i]["ops_per_s"] for i in range(n)])
            rp = med([rs[i]["p99_ms"] / base[i]["p99_ms"] for i in range(n)])
            line += f" | ops {o / bo:.2f}x, p99 {p / bp:.2f}x | per round ops {ro:.2f}x, p99 {rp:.2f}x"
        if errs:
            line += f" | {errs} failed puts"
        print(line)
PY
echo "# every run's JSON: $results"
