#!/usr/bin/env bash
# Throughput, latency and CPU per operation of every process, for cellplane (one
# cell, cells/alpha.toml, directly and through the router) and a 3-member etcd
# 3.4, in one run, alternated round by round (in reverse order every other
# round). Workloads: puts at 1, 16, 64 and 256 clients, linearizable gets at 256.
# Also the floor under one client's put: this disk's fdatasync latency and a
# round trip to a member.
#
#   loadgen/bench-perf.sh [DURATION_SECS] [ROUNDS]      # default 10 s, 3 rounds
#
# Starts `cellplane up --fresh` (cells alpha, beta, gamma, the directory and a
# router, in a temporary folder) and etcd (loadgen/etcd-cluster.sh), and stops
# both at the end; refuses to start, naming what to stop, while any port they
# would bind is taken (every member of cells/, every router, etcd's). Keys are
# /a/bench/… (tenant `a`, pinned to alpha), 10,000 of them, 256-byte values.
#
# Each run's line ends with the CPU (user + system, ms) each process group spent
# per 1,000 operations over the measured window (`loadgen closed --cpu`):
# `members` (the cell's three members or etcd's three), `router`, `client`
# (loadgen). The summary gives medians over the rounds and the ratios to etcd.
# CELLPLANE_WORKER_THREADS=N starts every cellplane process with N runtime
# threads (`up --process-threads N`; by default `up` shares the host's cores out
# among its 11 processes, at least one thread each), e.g. 2 to see what thread
# hand-offs cost when every process has a thread per core.
# Needs a release build: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-10}
rounds=${2:-3}
bin=${CARGO_TARGET_DIR:-target}/release
# shellcheck source=loadgen/up-lib.sh
. loadgen/up-lib.sh
refuse_taken_ports up etcd
for b in cellplane loadgen; do
  [ -x "$bin/$b" ] || { echo "bench-perf: no $bin/$b: run cargo build --release --workspace first" >&2; exit 1; }
done
bench_header "${dur}s per run, $rounds round(s)"
[ -n "${CELLPLANE_WORKER_THREADS:-}" ] && echo "# cellplane processes run $CELLPLANE_WORKER_THREADS runtime thread(s) each"
work=$(mktemp -d /tmp/cellplane-perf.XXXXXX)
up_pid=""
cleanup() {
  if [ -n "$up_pid" ]; then kill "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true; fi
  loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start_up "$bin" "$work"
pids_of() { # kind cell -> PID+PID...
  python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); print("+".join(str(p["pid"]) for p in e["processes"] if p["kind"]==sys.argv[2] and p["cell"]==sys.argv[3]))' \
    "$work/up/up.json" "$1" "$2"
}
alpha_pids=$(pids_of member alpha)
router_pid=$(pids_of router "")
etcd=$(loadgen/etcd-cluster.sh start "$work/etcd")
etcd_pids=$(cat "$work"/etcd/e*.pid | paste -sd+)
alpha=127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399   # cells/alpha.toml
router=127.0.0.1:2379                                    # cells/routers.toml

# The floor: fdatasync of a 4 KiB append in the folder the members write to.
floor=$(python3 - "$work" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
lat = []
for _ in range(1000):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter(); os.fdatasync(fd); lat.append(time.perf_counter() - t)
os.close(fd); os.unlink(path)
lat.sort()
print("%.3f %.3f" % (lat[len(lat) // 2] * 1000, lat[len(lat) * 99 // 100] * 1000))
PY
)
rtt=$("$bin/loadgen" closed --endpoints "${alpha%%,*}" --op serializable-get --clients 1 --connections 1 \
  --duration 3 --warmup 1 --prefix /a/bench/ | grep -o 'p50 [0-9.]*' | cut -d' ' -f2)

echo "# floor: fdatasync of a 4 KiB append p50 ${floor% *} ms, p99 ${floor#* } ms; one client's serializable get from a member (a round trip) p50 $rtt ms"
workloads=("put-1|--op put --clients 1 --connections 1"
           "put-16|--op put --clients 16 --connections 4"
           "put-64|--op put --clients 64 --connections 8"
           "put-256|--op put --clients 256 --connections 16"
           "get-256|--op get --clients 256 --connections 16")
systems=("cellplane|$alpha|--cpu members=$alpha_pids"
         "router|$router|--cpu members=$alpha_pids --cpu router=$router_pid"
         "etcd|$etcd|--cpu members=$etcd_pids")
results="$work/results"
for round in $(seq 1 "$rounds"); do
  order=(0 1 2)
  [ $((round % 2)) -eq 0 ] && order=(2 1 0)
  for w in "${workloads[@]}"; do
    name=${w%%|*}; args=${w#*|}
    for i in "${order[@]}"; do
      IFS='|' read -r sys eps cpu <<<"${systems[$i]}"
      # shellcheck disable=SC2086
      line=$("$bin/loadgen" closed --endpoints "$eps" --duration "$dur" --prefix /a/bench/ $args $cpu)
      printf '%-9s %-8s %s\n' "$sys" "$name" "$line" | tee -a "$results"
    done
  done
done

echo "# medians of $rounds round(s); CPU in ms per 1,000 ops; x etcd = ratio of the medians"
awk '
  { sys=$1; w=$2; k=sys" "w
    for (i=3; i<=NF; i++) {
      if ($(i+1) ~ /^ops\/s/) ops=$i
      if ($i=="p50") p50=$(i+1)+0
      if ($i=="p99") p99=$(i+1)+0
    }
    m=0; r=0; c=0
    for (i=3; i<=NF; i++) { if ($i=="members") m=$(i+1)+0; if ($i=="router") r=$(i+1)+0; if ($i=="client") c=$(i+1)+0 }
    n[k]++; O[k,n[k]]=ops+0; P5[k,n[k]]=p50; P9[k,n[k]]=p99; M[k,n[k]]=m; R[k,n[k]]=r; C[k,n[k]]=c
    if (!seen[k]++) order[++cnt]=k }
  function med(A, k,   i, j, t, v, c) { c=n[k]
    for (i=1; i<=c; i++) v[i]=A[k,i]
    for (i=1; i<=c; i++) for (j=i+1; j<=c; j++) if (v[j]<v[i]) { t=v[i]; v[i]=v[j]; v[j]=t }
    return c%2 ? v[(c+1)/2] : (v[c/2]+v[c/2+1])/2 }
  END {
    printf "%-9s %-8s %9s %8s %8s %8s %7s %7s | %9s %8s %9s\n", "system", "workload", "ops/s", "p50 ms", "p99 ms", "members", "router", "client", "ops x etcd", "p99 x", "cpu x etcd"
    for (i=1; i<=cnt; i++) { k=order[i]; split(k, a, " "); e="etcd "a[2]
      printf "%-9s %-8s %9.0f %8.2f %8.2f %8.0f %7.0f %7.0f | %9.2f %8.2f %9.2f\n", a[1], a[2], med(O,k), med(P5,k), med(P9,k), med(M,k), med(R,k), med(C,k),
        med(O,k)/med(O,e), med(P9,k)/med(P9,e), (med(M,k)+med(R,k))/med(M,e) } }
' "$results"
