#!/usr/bin/env bash
# One cellplane cell (cells/alpha.toml, 3 members) and one etcd cluster (3 members),
# both on 127.0.0.1, driven by the same closed-loop loadgen runs, alternated.
#
#   loadgen/bench-cell-vs-etcd.sh [DURATION_SECS]
#
# Needs a release build (cargo build --release). Prints one line per run; the
# figures in docs/benchmarks.md come from this script. Refuses to start, naming
# what to stop, while a port of alpha's members (cells/alpha.toml: client, peer,
# HTTP) or of etcd's is taken: stop `cellplane up` first.
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-10}
target=${CARGO_TARGET_DIR:-target}
bin=$target/release
# shellcheck source=loadgen/up-lib.sh
. loadgen/up-lib.sh
refuse_taken_ports cells/alpha.toml etcd
bench_header "duration ${dur}s per run"
work=$(mktemp -d /tmp/cellplane-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_cell "$bin" cells/alpha.toml "$work"   # up-lib.sh: fails unless every member is ready
cell=127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399
etcd=$(loadgen/etcd-cluster.sh start "$work/etcd")

run() { # name endpoints args...
  local name=$1 eps=$2; shift 2
  printf '%-10s ' "$name"
  "$bin/loadgen" closed --endpoints "$eps" --duration "$dur" "$@"
}

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
