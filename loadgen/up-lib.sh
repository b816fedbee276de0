# shellcheck shell=bash
# Shared by the benchmark scripts and etcd-cluster.sh: sourced, not run.
#
#   bench_header [TEXT]          the first line every benchmark prints: "# <UTC time>
#                                commit <short hash>, <N> cores, load average
#                                <1 5 15 min>, TEXT" (the hash says "with uncommitted
#                                changes" when the tree differs from it)
#   port_taken HOST:PORT         true when something accepts connections there
#   bench_ports SOURCE...        "HOST:PORT<TAB>whose" for every port SOURCE binds;
#                                a SOURCE is `up` (everything `cellplane up` starts
#                                from cells/: every member of every cell, the
#                                directory included, and every router of
#                                routers.toml), `etcd` (loadgen/etcd-cluster.sh's
#                                members), or a cell file (its members) or a
#                                routers file (its routers)
#   refuse_taken_ports SOURCE... exits 1 before anything starts when one of those
#                                ports is taken, naming each taken port, whose it
#                                is, what holds it (when `ss` can tell) and what
#                                to stop
#   start_up BIN WORK            starts `cellplane up --fresh` in WORK/up, sets
#                                up_pid, waits until it is ready (exits with its
#                                log otherwise); CELLPLANE_WORKER_THREADS=N gives
#                                every cellplane process N runtime threads (`up
#                                --process-threads`; by default `up` shares the
#                                host's cores out among its processes)
#   start_cell BIN CELL_TOML WORK  refuses the cell's taken ports, then starts its
#                                members (plaintext; data and logs in
#                                WORK/<cell>-<id>; CELLPLANE_WORKER_THREADS=N
#                                gives each N runtime threads, else one per core),
#                                appends their PIDs to the array
#                                `pids`, and waits until each answers /readyz (exits
#                                with the log of one that exits or is not ready)
#   stop_cell                    stops the members start_cell started (the array
#                                `pids`), waits for them, empties `pids` and
#                                removes their data folders
#   check_up_env DIR             exits unless DIR is a running `cellplane up`
#                                without --restart, every process it lists alive
#                                and answering on its ports

# The repository (this file is loadgen/up-lib.sh).
up_lib_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# loadgen/etcd-cluster.sh's members' client ports; each one's peer port is the next.
etcd_client_ports=(42379 42389 42399)

bench_header() {
  local commit
  if commit=$(git -C "$up_lib_root" rev-parse --short HEAD 2>/dev/null); then
    [ -n "$(git -C "$up_lib_root" status --porcelain --untracked-files=no 2>/dev/null)" ] &&
      commit+=" with uncommitted changes"
  else
    commit='?'
  fi
  echo "# $(date -u +%FT%TZ) commit $commit, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)${1:+, $*}"
}

port_taken() {
  local host=${1%:*} port=${1##*:}
  host=${host#[}
  host=${host%]}
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# A python3 with tomllib (3.11+): the one on the PATH, or Debian's.
up_lib_python() {
  local py
  for py in python3 /usr/bin/python3; do
    if "$py" -c 'import tomllib' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  echo "$(basename "$0"): needs python3 3.11 or later (tomllib) to read cells/" >&2
  return 1
}

bench_ports() {
  local py
  py=$(up_lib_python) || return 1
  ETCD_CLIENT_PORTS="${etcd_client_ports[*]}" "$py" - "$up_lib_root" "$@" <<'PY'
import os, sys, tomllib

root = sys.argv[1]

def load(path):
    with open(path, "rb") as f:
        return tomllib.load(f)

def shown(path):
    p = os.path.abspath(path)
    return os.path.relpath(p, root) if p.startswith(root + os.sep) else path

def emit(path, doc):
    for r in doc.get("routers", []):
        for k in ("client", "admin", "http"):
            print(f"{r[k]}\trouter {r['id']}, {k} port ({shown(path)})")
    name = doc.get("name", os.path.basename(path))
    for m in doc.get("members", []):
        for k in ("client", "peer", "http"):
            print(f"{m[k]}\tcell {name}, member {m['id']}, {k} port ({shown(path)})")

for src in sys.argv[2:]:
    if src == "etcd":
        for i, p in enumerate(int(x) for x in os.environ["ETCD_CLIENT_PORTS"].split()):
            print(f"127.0.0.1:{p}\tetcd e{i}, client port (loadgen/etcd-cluster.sh)")
            print(f"127.0.0.1:{p + 1}\tetcd e{i}, peer port (loadgen/etcd-cluster.sh)")
    elif src == "up":
        # What `cellplane up` reads (crates/cellplane/src/up.rs, load_env):
        # routers.toml, and every other *.toml of the folder but the static map
        # is a cell.
        cells = os.path.join(root, "cells")
        routers_path = os.path.join(cells, "routers.toml")
        routers = load(routers_path)
        static = os.path.normpath(os.path.join(cells, routers.get("static_map", "routing.toml")))
        for f in sorted(os.listdir(cells)):
            p = os.path.join(cells, f)
            if f.endswith(".toml") and p != routers_path and os.path.normpath(p) != static:
                emit(p, load(p))
        emit(routers_path, routers)
    else:
        emit(src, load(src))
PY
}

# "PID<TAB>COMMAND NAME<TAB>COMMAND LINE" of the process listening on PORT, when
# `ss` can tell (as root, or for your own processes).
up_lib_holder() {
  local pid
  command -v ss >/dev/null 2>&1 || return 0
  pid=$(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
  [ -n "$pid" ] || return 0
  printf '%s\t%s\t%s\n' "$pid" "$(ps -o comm= -p "$pid" 2>/dev/null)" "$(ps -o args= -p "$pid" 2>/dev/null)"
}

refuse_taken_ports() {
  local lines addr whose holder pid comm args n=0 cellplane=0 debian=0 others=() etcd_dirs=() d
  lines=$(bench_ports "$@") || {
    echo "$(basename "$0"): cannot list the ports of $*" >&2
    exit 1
  }
  local taken="" last_pid=""
  while IFS=$'\t' read -r addr whose; do
    [ -n "$addr" ] || continue
    port_taken "$addr" || continue
    n=$((n + 1))
    taken+="  $addr  $whose"$'\n'
    holder=$(up_lib_holder "${addr##*:}")
    if [ -n "$holder" ]; then
      IFS=$'\t' read -r pid comm args <<<"$holder"
      # Once per process (a member's three ports come one after another).
      [ "$pid" = "$last_pid" ] || taken+="      held by pid $pid: ${args:0:120}"$'\n'
      last_pid=$pid
    else
      comm=""
      args=""
      # Nobody to name: go by whose port it is (and 2379 is etcd's default).
      case "$whose" in etcd*) comm=etcd args="--initial-cluster-token cellplane-bench" ;; *) comm=cellplane ;; esac
      [ "${addr##*:}" = 2379 ] && debian=1
    fi
    case "$comm" in
      cellplane) cellplane=1 ;;
      etcd)
        if [[ "$args" == *"--initial-cluster-token cellplane-bench"* ]]; then
          # etcd-cluster.sh's member: its folder is the parent of --data-dir.
          d=$(sed -n 's/.*--data-dir \([^ ]*\).*/\1/p' <<<"$args")
          d=${d:+$(dirname "$d")}
          [[ " ${etcd_dirs[*]} " == *" ${d:-DIR} "* ]] || etcd_dirs+=("${d:-DIR}")
        else
          debian=1
        fi
        ;;
      *) [[ " ${others[*]} " == *" $pid "* ]] || others+=("$pid") ;;
    esac
  done <<<"$lines"
  [ "$n" -eq 0 ] && return 0
  {
    if [ "$n" -eq 1 ]; then
      echo "$(basename "$0"): refusing to start, nothing started: a port it binds is taken:"
    else
      echo "$(basename "$0"): refusing to start, nothing started: $n of the ports it binds are taken:"
    fi
    printf '%s' "$taken"
    echo "Stop what holds $([ "$n" -eq 1 ] && echo it || echo them), then run it again:"
    [ "$cellplane" -eq 1 ] &&
      echo "  - a \`cellplane up\` (Ctrl-C it), or cellplane processes left behind: pkill -f 'cellplane (up|node|router)'"
    for d in "${etcd_dirs[@]}"; do
      if [ "$d" = DIR ]; then
        echo "  - an etcd of loadgen/etcd-cluster.sh: loadgen/etcd-cluster.sh stop DIR (the folder it was started with; default /tmp/cellplane-etcd)"
      else
        echo "  - an etcd of loadgen/etcd-cluster.sh: loadgen/etcd-cluster.sh stop $d"
      fi
    done
    [ "$debian" -eq 1 ] &&
      echo "  - an etcd not started by loadgen (Debian's etcd service listens on 2379 and 2380): sudo systemctl disable --now etcd, or stop that process"
    for pid in "${others[@]}"; do
      echo "  - pid $pid ($(ps -o comm= -p "$pid" 2>/dev/null || echo gone)), neither cellplane nor loadgen's etcd: stop it, or run where these ports are free"
    done
  } >&2
  exit 1
}

start_up() {
  local bin=$1 work=$2
  local threads=()
  [ -n "${CELLPLANE_WORKER_THREADS:-}" ] && threads=(--process-threads "$CELLPLANE_WORKER_THREADS")
  "$bin/cellplane" up --data-dir "$work/up" --fresh "${threads[@]}" >"$work/up.log" 2>&1 &
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

pids=()
cell_dirs=()

start_cell() {
  local bin=$1 cell=$2 work=$3 py members name id http pid log m started=()
  refuse_taken_ports "$cell"
  py=$(up_lib_python) || exit 1
  members=$("$py" -c '
import sys, tomllib
d = tomllib.load(open(sys.argv[1], "rb"))
for m in d["members"]:
    print(d["name"], m["id"], m["http"])' "$cell") || exit 1
  while read -r name id http; do
    "$bin/cellplane" node --plaintext --cell "$cell" --id "$id" --data-dir "$work/$name-$id" \
      ${CELLPLANE_WORKER_THREADS:+--worker-threads "$CELLPLANE_WORKER_THREADS"} >"$work/$name-$id.log" 2>&1 &
    pids+=($!)
    cell_dirs+=("$work/$name-$id")
    started+=("$! $name $id $http")
  done <<<"$members"
  for m in "${started[@]}"; do
    read -r pid name id http <<<"$m"
    log="$work/$name-$id.log"
    for _ in $(seq 1 150); do
      curl -sf "http://$http/readyz" >/dev/null 2>&1 && break
      kill -0 "$pid" 2>/dev/null || { echo "$(basename "$0"): member $name/$id exited; its log:" >&2; cat "$log" >&2; exit 1; }
      sleep 0.2
    done
    if ! { kill -0 "$pid" 2>/dev/null && curl -sf "http://$http/readyz" >/dev/null 2>&1; }; then
      echo "$(basename "$0"): member $name/$id not ready after 30 s; its log:" >&2
      cat "$log" >&2
      exit 1
    fi
  done
}

stop_cell() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
  rm -rf "${cell_dirs[@]}"
  cell_dirs=()
}

check_up_env() {
  local dir=$1 py
  if [ ! -f "$dir/up.json" ]; then
    {
      echo "$(basename "$0"): no $dir/up.json: this benchmark runs against a \`cellplane up\` you start, without --restart:"
      echo "  cellplane up --fresh --data-dir $dir &"
      echo "  $0 $dir ..."
    } >&2
    exit 1
  fi
  py=$(up_lib_python) || exit 1
  "$py" - "$dir/up.json" "$(basename "$0")" <<'PY' || exit 1
import json, os, subprocess, sys, urllib.request

path, me = sys.argv[1], sys.argv[2]
env = json.load(open(path))
bad = []

def argv(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None

def is_cellplane(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "cellplane"
    except OSError:
        return False

sup = env.get("supervisor_pid", 0)
sargs = argv(sup) if sup else None
if not sup or not is_cellplane(sup) or "up" not in (sargs or []):
    bad.append(f"its `cellplane up` (pid {sup}) is not running: {path} is left from an earlier run")
elif "--restart" in sargs:
    bad.append(f"its `cellplane up` (pid {sup}) runs with --restart, which restarts the killed leader at once: start it without")

# Which process listens on each port, when `ss` shows it.
holders = {}
try:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 4:
            port = f[3].rsplit(":", 1)[-1]
            for tok in line.split("pid=")[1:]:
                holders.setdefault(port, set()).add(int(tok.split(",")[0]))
except OSError:
    pass

if not bad:
    for p in env["processes"]:
        what = f"router {p['id']}" if p["kind"] == "router" else f"{p['cell']}/{p['id']}"
        pid = p["pid"]
        if not pid or not is_cellplane(pid):
            bad.append(f"{what} is not running (pid {pid}): restart `cellplane up`")
            continue
        for addr in (p["client"], p["http"]):
            port = addr.rsplit(":", 1)[-1]
            if port in holders and pid not in holders[port]:
                bad.append(f"{what}'s port {addr} is held by pid {", ".join(map(str, sorted(holders[port])))}, not by {what} (pid {pid})")
        try:
            urllib.request.urlopen(f"http://{p['http']}/readyz", timeout=2).read()
        except Exception as e:
            bad.append(f"{what} does not answer http://{p['http']}/readyz ({e})")

if bad:
    print(f"{me}: {path} is not a running `cellplane up` this benchmark can use:", file=sys.stderr)
    for b in bad:
        print(f"  {b}", file=sys.stderr)
    print("Stop what is left (pkill -f 'cellplane (up|node|router)'), then start a fresh one without --restart:", file=sys.stderr)
    print(f"  cellplane up --fresh --data-dir {os.path.dirname(path) or '.'} &", file=sys.stderr)
    sys.exit(1)
PY
}
