#!/usr/bin/env bash
# Starts or stops a real etcd cluster (Debian's etcd-server, 3 members on
# 127.0.0.1) to compare cellplane against in the same run. Installs etcd-server when
# it is missing.
#
#   loadgen/etcd-cluster.sh start [DIR]   # client endpoints on 127.0.0.1:42379,42389,42399
#   loadgen/etcd-cluster.sh stop  [DIR]
#
# `start` refuses (naming what to stop) when one of the members' client or peer
# ports (42379/42380, 42389/42390, 42399/42400) is taken: an etcd already there
# would answer the health check and be measured in place of this one.
# ETCD_EXTRA_FLAGS adds flags to every member (e.g. auto-compaction).
set -euo pipefail

cmd=${1:-}
dir=${2:-/tmp/cellplane-etcd}
# shellcheck source=loadgen/up-lib.sh
. "$(dirname "$0")/up-lib.sh"
ports=("${etcd_client_ports[@]}")

if ! command -v etcd >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server >&2
fi

case "$cmd" in
  start)
    refuse_taken_ports etcd
    mkdir -p "$dir"
    cluster=""
    for i in 0 1 2; do
      p=${ports[$i]}
      cluster+="e$i=http://127.0.0.1:$((p + 1)),"
    done
    cluster=${cluster%,}
    for i in 0 1 2; do
      p=${ports[$i]}
      # Debian's etcd-server unit is not used: these members are ours alone.
      # shellcheck disable=SC2086 # ETCD_EXTRA_FLAGS is a list of flags
      nohup etcd --name "e$i" --data-dir "$dir/e$i" \
        --listen-client-urls "http://127.0.0.1:$p" --advertise-client-urls "http://127.0.0.1:$p" \
        --listen-peer-urls "http://127.0.0.1:$((p + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((p + 1))" \
        --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token cellplane-bench \
        --quota-backend-bytes $((8 * 1024 * 1024 * 1024)) ${ETCD_EXTRA_FLAGS:-} \
        >"$dir/e$i.log" 2>&1 &
      echo $! >"$dir/e$i.pid"
    done
    eps="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
    for _ in $(seq 1 100); do
      if ETCDCTL_API=3 etcdctl --endpoints="$eps" endpoint health >/dev/null 2>&1; then
        for i in 0 1 2; do
          kill -0 "$(cat "$dir/e$i.pid")" 2>/dev/null || { echo "etcd e$i exited; its log: $dir/e$i.log" >&2; exit 1; }
        done
        echo "$eps"
        exit 0
      fi
      sleep 0.2
    done
    echo "etcd did not become healthy; logs in $dir" >&2
    exit 1
    ;;
  stop)
    pids=()
    for i in 0 1 2; do
      if [ -f "$dir/e$i.pid" ]; then
        pids+=("$(cat "$dir/e$i.pid")")
        rm -f "$dir/e$i.pid"
      fi
    done
    if [ ${#pids[@]} -gt 0 ]; then kill "${pids[@]}" 2>/dev/null || true; fi
    # Wait for them to exit (a member busy with fsyncs can take seconds), so the
    # next start finds its ports free and its data directory gone.
    for _ in $(seq 1 50); do
      alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [ $alive -eq 0 ] && break
      sleep 0.2
    done
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
    ;;
esac
