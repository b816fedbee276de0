#!/usr/bin/env bash
# One cellplane cell (cells/alpha.toml, 3 members) and one etcd cluster (3 members),
# both on 127.0.0.1, driven by the same closed-loop loadgen runs, alternated.
#
#   loadgen/bench-cell-vs-etcd.sh [DURATION_SECS]
#
# Needs a release build (cargo build --release). Prints one line per run; the
# figures in docs/benchmarks.md come from this script.
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-10}
target=${CARGO_TARGET_DIR:-target}
bin=$target/release
for port in 12379 12389 12399 12381 12391 12401 42379 42389 42399; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "$(basename "$0"): port $port is taken: stop \`cellplane up\` (alpha's ports) and any etcd on 42379..42399 first" >&2
    exit 1
  fi
done
work=$(mktemp -d /tmp/cellplane-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for id in 1 2 3; do
  "$bin/cellplane" node --plaintext --cell cells/alpha.toml --id $id --data-dir "$work/alpha-$id" >"$work/alpha-$id.log" 2>&1 &
  pids+=($!)
done
for port in 12381 12391 12401; do
  for _ in $(seq 1 150); do
    curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
done
cell=127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399
etcd=$(loadgen/etcd-cluster.sh start "$work/etcd")

run() { # name endpoints args...
  local name=$1 eps=$2; shift 2
  printf '%-10s ' "$name"
  "$bin/loadgen" closed --endpoints "$eps" --duration "$dur" "$@"
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, duration ${dur}s per run"
for args in "--op put --clients 1 --connections 1" \
            "--op put --clients 16 --connections 4" \
            "--op put --clients 64 --connections 8" \
            "--op put --clients 256 --connections 16" \
            "--op get --clients 64 --connections 8" \
            "--op serializable-get --clients 64 --connections 8"; do
  # shellcheck disable=SC2086
  run cellplane "$cell" $args
  # shellcheck disable=SC2086
  run etcd "$etcd" $args
done
