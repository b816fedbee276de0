#!/usr/bin/env bash
# cellplane against etcd with `loadgen compare`, on this machine, in one run:
# starts `cellplane up` (fresh, in a temporary folder: cells alpha, beta, gamma, the
# directory, a router) and a 3-member etcd (loadgen/etcd-cluster.sh, which installs
# Debian's etcd-server when it is missing), then runs each scenario against alpha's
# three members directly, the router, and etcd, alternated round by round, and
# stops everything.
#
#   loadgen/compare.sh [DURATION] [ROUNDS] [OUT_DIR]   # default: 10s, 2 rounds
#
# Needs a release build of both binaries:
#   cargo build --release -p cellplane -p loadgen
# Prints each run, the merged figures and the ratios; with OUT_DIR, writes each
# comparison as JSON there. The figures in docs/benchmarks.md come from this script.
# Refuses to start, naming what to stop, while any port `cellplane up` or the etcd
# would bind is taken (loadgen/up-lib.sh: every member of cells/, every router).
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-10s}
rounds=${2:-2}
out=${3:-}
bin=${CARGO_TARGET_DIR:-target}/release
# shellcheck source=loadgen/up-lib.sh
. loadgen/up-lib.sh
refuse_taken_ports up etcd
bench_header "$dur per run, $rounds rounds"
work=$(mktemp -d /tmp/cellplane-compare.XXXXXX)
up_pid=""
cleanup() {
  if [ -n "$up_pid" ]; then
    kill "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
  loadgen/etcd-cluster.sh stop "$work/etcd" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start_up "$bin" "$work"
etcd=$(loadgen/etcd-cluster.sh start "$work/etcd")
alpha=127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399   # cells/alpha.toml
router=127.0.0.1:2379                                    # cells/routers.toml

compare() { # name scenario args...
  local name=$1 scenario=$2; shift 2
  local json=()
  [ -n "$out" ] && mkdir -p "$out" && json=(--json "$out/$name.json")
  "$bin/loadgen" compare "$scenario" --cellplane "$alpha" --cell-name alpha \
    --router "$router" --etcd "$etcd" --rounds "$rounds" --set "load.duration=$dur" \
    --no-progress "${json[@]}" "$@"
}
compare put-256 loadgen/scenarios/put.toml --set load.clients=256 --set load.connections=16
compare get-linearizable loadgen/scenarios/get-linearizable.toml
