#!/usr/bin/env bash
# Put throughput and latency at 64 clients on one cell (cells/alpha.toml) and on
# etcd, side by side, with (a) no watchers, (b) 10,000 idle watchers on keys that
# are not written, (c) 1,000 stalled watchers (streams never read) on the written
# keys, (d) 1,000 active watchers on the written keys. Each system starts fresh
# for each case, so a case cannot inherit another's damage.
#
#   loadgen/bench-watchers.sh [DURATION_SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-10}
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /tmp/cellplane-wbench.XXXXXX)
pids=()
stop_cell() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
  rm -rf "$work"/alpha-*
}
cleanup() {
  stop_cell
  loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
start_cell() {
  for id in 1 2 3; do
    "$bin/cellplane" node --cell cells/alpha.toml --id $id --data-dir "$work/alpha-$id" >"$work/alpha-$id.log" 2>&1 &
    pids+=($!)
  done
  for port in 12381 12391 12401; do
    for _ in $(seq 1 150); do curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  done
}
cell=127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399
echo "# $(date -u +%FT%TZ) $(nproc) cores, 64 put clients on 8 connections, ${dur}s per run"
for case in "none|" "idle|--watchers 10000 --watch-mode idle" "stalled|--watchers 1000 --watch-mode stalled" "active|--watchers 1000 --watch-mode active"; do
  name=${case%%|*}; args=${case#*|}
  start_cell
  printf '%-10s %-8s ' cellplane "$name"
  # shellcheck disable=SC2086
  "$bin/loadgen" closed --endpoints "$cell" --op put --clients 64 --connections 8 --duration "$dur" $args
  stop_cell
  etcd=$(loadgen/etcd-cluster.sh start "$work/etcd")
  printf '%-10s %-8s ' etcd "$name"
  # shellcheck disable=SC2086
  "$bin/loadgen" closed --endpoints "$etcd" --op put --clients 64 --connections 8 --duration "$dur" $args
  loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null
done
