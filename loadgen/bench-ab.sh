#!/usr/bin/env bash
# Two builds of cellplane against each other: what one change does to the write
# and read path, measured on the same machine in the same run, alternated round
# by round (in reverse order every other round) so a machine that drifts
# (another process, the disk's mood) blurs both alike.
#
#   loadgen/bench-ab.sh BASE_DIR NEW_DIR [DURATION_SECS] [ROUNDS]   # default 8 s, 3 rounds
#
# BASE_DIR and NEW_DIR each hold a `cellplane` binary (e.g. copies of
# target/release/cellplane before and after the change); loadgen is this
# checkout's. Each run starts cell alpha's three members fresh from that build
# (`cellplane node --plaintext`, cells/alpha.toml), puts 10,000 random keys of
# 256 bytes (closed loop, 2 s warm-up) at 1, 16 and 256 clients and reads them
# with linearizable gets at 256 clients, then stops the cell. Clients connect
# round-robin to the three members, as an etcd client given every endpoint does.
# Prints one line per run, then medians per build and the NEW ÷ BASE ratios of
# throughput, p50, p99 and the members' CPU (user + system ms per 1,000
# operations over the measured window).
#
# Refuses to start, naming what to stop, while a port of alpha's members is
# taken. Needs a release build of loadgen: cargo build --release --workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,20p' "$0" >&2; exit 2; }
base=$1 new=$2 dur=${3:-8} rounds=${4:-3}
bin=${CARGO_TARGET_DIR:-target}/release
for b in "$base/cellplane" "$new/cellplane" "$bin/loadgen"; do
  [ -x "$b" ] || { echo "bench-ab: no executable $b" >&2; exit 1; }
done
# shellcheck source=loadgen/up-lib.sh
. loadgen/up-lib.sh
refuse_taken_ports cells/alpha.toml
bench_header "base $base, new $new, ${dur}s per run, $rounds round(s)"
work=$(mktemp -d /tmp/cellplane-ab.XXXXXX)
cleanup() { stop_cell; rm -rf "$work"; }
trap cleanup EXIT
workloads=("put-1|--op put --clients 1 --connections 1"
           "put-16|--op put --clients 16 --connections 4"
           "put-256|--op put --clients 256 --connections 16"
           "get-256|--op get --clients 256 --connections 16")
cell=127.0.0.1:12379,127.0.0.1:12389,127.0.0.1:12399   # cells/alpha.toml
results="$work/results"
for round in $(seq 1 "$rounds"); do
  builds=(base new)
  [ $((round % 2)) -eq 0 ] && builds=(new base)
  for build in "${builds[@]}"; do
    dir=$base; [ "$build" = new ] && dir=$new
    start_cell "$dir" cells/alpha.toml "$work"   # up-lib.sh: fails unless every member is ready
    members=$(IFS=+; echo "${pids[*]}")
    for w in "${workloads[@]}"; do
      name=${w%%|*}; args=${w#*|}
      # Gets read the keys the puts wrote; every run writes before it reads.
      # shellcheck disable=SC2086
      line=$("$bin/loadgen" closed --endpoints "$cell" $args --duration "$dur" --warmup 2 \
        --prefix /a/bench/ --cpu "members=$members")
      printf '%-5s %-8s %s\n' "$build" "$name" "$line" | tee -a "$results"
    done
    stop_cell
  done
done
echo "# medians of $rounds round(s); new ÷ base"
awk '
  { b=$1; w=$2
    for (i=3; i<=NF; i++) { if ($(i+1) ~ /^ops\/s/) ops=$i; if ($i=="p50") p50=$(i+1); if ($i=="p99") p99=$(i+1); if ($i=="members") cpu=$(i+1) }
    k=b" "w; n[k]++; o[k, n[k]]=ops+0; f[k, n[k]]=p50+0; p[k, n[k]]=p99+0; u[k, n[k]]=cpu+0
    if (!(w in seen)) { seen[w]=1; order[++m]=w } }
  function median(arr, k, cnt,   i, j, t, v) {
    for (i=1; i<=cnt; i++) v[i]=arr[k, i]
    for (i=1; i<=cnt; i++) for (j=i+1; j<=cnt; j++) if (v[j]<v[i]) { t=v[i]; v[i]=v[j]; v[j]=t }
    return cnt%2 ? v[(cnt+1)/2] : (v[cnt/2]+v[cnt/2+1])/2 }
  END {
    for (i=1; i<=m; i++) { w=order[i]
      for (j=1; j<=2; j++) { b=(j==1 ? "base" : "new"); k=b" "w
        mo[b]=median(o, k, n[k]); mf[b]=median(f, k, n[k]); mp[b]=median(p, k, n[k]); mu[b]=median(u, k, n[k])
        printf "%-5s %-8s %7.0f ops/s  p50 %6.2f ms  p99 %6.2f ms  members %6.0f ms/1k\n", b, w, mo[b], mf[b], mp[b], mu[b] }
      printf "      %-8s new/base: ops %.2fx  p50 %.2fx  p99 %.2fx  CPU %.2fx\n", w,
        mo["new"]/mo["base"], mf["new"]/mf["base"], mp["new"]/mp["base"], mu["new"]/mu["base"] } }
' "$results"
