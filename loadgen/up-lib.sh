# Shared by the benchmark scripts that run against `cellplane up` and etcd
# (compare.sh, bench-perf.sh): sourced, not run.
#
#   refuse_taken_ports PORT...   exits, naming what to stop, when one is taken
#   start_up BIN WORK            starts `cellplane up --fresh` in WORK/up, sets
#                                up_pid, waits until it is ready (exits with its
#                                log otherwise); CELLPLANE_WORKER_THREADS=N gives
#                                every cellplane process N runtime threads

refuse_taken_ports() {
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$(basename "$0"): port $port is taken: stop \`cellplane up\` (or whatever listens there) and any etcd on 42379..42399 first" >&2
      exit 1
    fi
  done
}

start_up() {
  local bin=$1 work=$2
  if [ -n "${CELLPLANE_WORKER_THREADS:-}" ]; then
    TOKIO_WORKER_THREADS=$CELLPLANE_WORKER_THREADS "$bin/cellplane" up --data-dir "$work/up" --fresh >"$work/up.log" 2>&1 &
  else
    "$bin/cellplane" up --data-dir "$work/up" --fresh >"$work/up.log" 2>&1 &
  fi
  up_pid=$!
  for _ in $(seq 1 600); do
    grep -q "cellplane is ready" "$work/up.log" && return 0
    kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "cellplane up not ready; log:" >&2
  cat "$work/up.log" >&2
  exit 1
}
