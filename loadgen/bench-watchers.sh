#!/usr/bin/env bash
# Put throughput and latency at 64 clients on one cell (cells/alpha.toml) and on
# etcd, side by side, with (a) no watchers, (b) 10,000 idle watchers on keys that
# are not written, (c) 1,000 stalled watchers (streams never read) on the written
# keys, (c2) the same stalled watchers on connections whose HTTP/2 windows grow
# adaptively, as grpc-go and gRPC C-core clients' do (`--watch-flow adaptive`: a
# stream nobody reads takes much more before the server sees it stall), (d) 1,000
# active watchers on the written keys. Each system starts fresh
# for each case, so a case cannot inherit another's damage.
#
#   loadgen/bench-watchers.sh [DURATION_SECS] [ROUNDS]
#
# One run on 2 cores swings by 20 % with the machine (mostly the disk's fsync
# time), so with ROUNDS > 1 every case runs ROUNDS times, the cases alternated
# within each round (in reverse order every other round), and a summary gives
# each case's median throughput and p99 and the ratios to (a). Each line also
# gives the CPU the system's three processes spent per 1,000 puts over the
# measured window (`loadgen closed --cpu`), which the disk does not blur.
#
# Refuses to start, naming what to stop, while a port of alpha's members
# (cells/alpha.toml: client, peer, HTTP) or of etcd's is taken: stop
# `cellplane up` first. Needs a release build (cargo build --release --workspace).
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-10}
rounds=${2:-1}
bin=${CARGO_TARGET_DIR:-target}/release
# shellcheck source=loadgen/up-lib.sh
. loadgen/up-lib.sh
refuse_taken_ports cells/alpha.toml etcd
bench_header "64 put clients on 8 connections, ${dur}s per run, $rounds round(s)"
work=$(mktemp -d /tmp/cellplane-wbench.XXXXXX)
cleanup() {
  stop_cell
  loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# One measured run against ENDPOINTS by the processes PIDS...: prints the line.
measure() {
  local endpoints=$1 args=$2; shift 2
  local pids
  pids=$(IFS=+; echo "$*")
  # shellcheck disable=SC2086
  "$bin/loadgen" closed --endpoints "$endpoints" --op put --clients 64 --connections 8 --duration "$dur" $args --cpu "members=$pids"
}
cases=("none|" "idle|--watchers 10000 --watch-mode idle" "stalled|--watchers 1000 --watch-mode stalled"
       "stalled-adaptive|--watchers 1000 --watch-mode stalled --watch-flow adaptive" "active|--watchers 1000 --watch-mode active")
cell=127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399
results="$work/results"
for round in $(seq 1 "$rounds"); do
order=(0 1 2 3 4)
[ $((round % 2)) -eq 0 ] && order=(4 3 2 1 0)
for i in "${order[@]}"; do
  case=${cases[$i]}; name=${case%%|*}; args=${case#*|}
  start_cell "$bin" cells/alpha.toml "$work"   # up-lib.sh: checks alpha's ports again, fails unless every member is ready
  line=$(measure "$cell" "$args" "${pids[@]}")
  printf '%-10s %-16s %s\n' cellplane "$name" "$line" | tee -a "$results"
  stop_cell
  etcd=$(loadgen/etcd-cluster.sh start "$work/etcd")
  # shellcheck disable=SC2046 # one PID per word
  line=$(measure "$etcd" "$args" $(cat "$work"/etcd/e*.pid))
  printf '%-10s %-16s %s\n' etcd "$name" "$line" | tee -a "$results"
  loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null
done
done
if [ "$rounds" -gt 1 ]; then
  echo "# medians of $rounds rounds; ratios to (a) of the same system: of the medians, and the median of each round's own ratio"
  awk '
    { sys=$1; c=$2
      for (i=3; i<=NF; i++) { if ($(i+1) ~ /^ops\/s/) ops=$i; if ($i=="p99") p99=$(i+1); if ($i=="members") cpu=$(i+1) }
      k=sys" "c; n[k]++; o[k, n[k]]=ops+0; p[k, n[k]]=p99+0; u[k, n[k]]=cpu+0; order[++m]=k }
    function median(arr, k, cnt,   i, j, t, v) {
      for (i=1; i<=cnt; i++) v[i]=arr[k, i]
      for (i=1; i<=cnt; i++) for (j=i+1; j<=cnt; j++) if (v[j]<v[i]) { t=v[i]; v[i]=v[j]; v[j]=t }
      return cnt%2 ? v[(cnt+1)/2] : (v[cnt/2]+v[cnt/2+1])/2 }
    END {
      for (i=1; i<=m; i++) { k=order[i]; if (done[k]++) continue
        split(k, a, " "); mo=median(o, k, n[k]); mp=median(p, k, n[k]); mu=median(u, k, n[k])
        base=a[1]" none"; bo=median(o, base, n[base]); bp=median(p, base, n[base])
        for (r=1; r<=n[k]; r++) { ro[k, r]=o[k, r]/o[base, r]; rp[k, r]=p[k, r]/p[base, r] }
        printf "%-10s %-16s %6.0f ops/s %7.2f ms p99 %5.0f cpu ms/1k puts | %.2fx, p99 %.2fx | per round %.2fx, p99 %.2fx\n",
          a[1], a[2], mo, mp, mu, mo/bo, mp/bp, median(ro, k, n[k]), median(rp, k, n[k]) } }
  ' "$results"
fi
