#!/usr/bin/env bash
# Builds the `cellplane-prometheus:local` image from Debian's Prometheus binary
# and the shared libraries it needs, on `FROM scratch` (no registry is reachable,
# so there is no base image to pull), with the cellplane alert rules baked in.
#
#   deploy/prometheus/build-image.sh            # build
#   deploy/prometheus/build-image.sh --check    # build, then start it once: the
#                                               # rules must load (needs curl)
#   PROMETHEUS_BIN=/path/to/prometheus deploy/prometheus/build-image.sh
#   CELLPLANE_PROMETHEUS_IMAGE=cellplane-prometheus:dev deploy/prometheus/build-image.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${PROMETHEUS_BIN:-/usr/bin/prometheus}
web=${PROMETHEUS_WEB:-/usr/share/prometheus/web}
tag=${CELLPLANE_PROMETHEUS_IMAGE:-cellplane-prometheus:local}
check=0
for arg in "$@"; do
    case $arg in
        --check) check=1 ;;
        -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

if [[ ! -x $bin ]]; then
    echo "build-image: $bin is missing: install Debian's \`prometheus\` package" >&2
    echo "  (apt-get install prometheus), or point PROMETHEUS_BIN at a prometheus binary" >&2
    exit 1
fi
command -v docker >/dev/null || { echo "build-image: docker is not installed" >&2; exit 1; }

# The rules go into the image: refuse rules that do not load.
if command -v promtool >/dev/null; then
    promtool check rules "$here/alerts.yml" >/dev/null || {
        promtool check rules "$here/alerts.yml" >&2; exit 1; }
else
    echo "build-image: promtool not found; alerts.yml not checked (Debian's prometheus package ships it)" >&2
fi

ctx=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-prometheus-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/bin" "$root/etc/prometheus" "$root/prometheus" "$root/tmp"
# Written by whatever uid the container runs as (65534 by default, or --user).
chmod 1777 "$root/prometheus" "$root/tmp"
cp "$bin" "$root/bin/prometheus"

# Every library ldd resolves ("libx.so => /path (addr)") and the loader
# ("/lib64/ld-linux-x86-64.so.2 (addr)"); the vDSO has no file and is skipped.
# Debian's binary needs libc and the loader only.
if ldd "$bin" | grep -q 'not found'; then
    echo "build-image: a library of $bin is missing:" >&2
    ldd "$bin" >&2
    exit 1
fi
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
for lib in $libs; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# Go's resolver reads nsswitch.conf to choose how to resolve target host names
# (Compose service names, Kubernetes DNS).
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"

# The classic web UI (/classic/alerts shows every alert's state): Debian's binary
# reads its page templates and static files from here. Debian links most static
# files to libjs-* packages: copy the files, not the links, and leave out
# moment-timezone's 200 MB of source data (the pages load one prebuilt file).
if [[ -d $web/templates && -d $web/static ]]; then
    mkdir -p "$root$web/static"
    cp -rL "$web/templates" "$root$web/templates"
    for entry in "$web"/static/*; do
        name=$(basename "$entry")
        if [[ $name == moment-timezone ]]; then
            mkdir -p "$root$web/static/$name"
            cp -L "$entry"/*.js "$root$web/static/$name/"
        else
            cp -rL "$entry" "$root$web/static/$name"
        fi
    done
else
    echo "build-image: $web/templates or static is missing: the classic web UI will answer 500 (the API and the rules are unaffected)" >&2
fi

cp "$here/alerts.yml" "$root/etc/prometheus/alerts.yml"
# A config that works alone: Prometheus scrapes itself and loads the rules.
# Mount the rendered prometheus.yml over it to scrape cellplane.
cat >"$root/etc/prometheus/prometheus.yml" <<'EOF'
# Default config of the cellplane-prometheus image: scrapes Prometheus itself and
# loads the cellplane alert rules. Mount the config rendered by
# `cellplane deploy render prometheus` over this file to scrape cellplane.
global:
  scrape_interval: 15s
  evaluation_interval: 15s
rule_files:
  - alerts.yml
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["localhost:9090"]
EOF
cp "$here/Dockerfile" "$ctx/Dockerfile"

# The legacy builder warns on stderr that it is deprecated: show its output only
# when the build fails.
if ! docker build --quiet --tag "$tag" "$ctx" >"$ctx/build.log" 2>&1; then
    cat "$ctx/build.log" >&2
    exit 1
fi
echo "build-image: built $tag from $bin ($(echo "$libs" | wc -w) shared libraries)"

[[ $check == 1 ]] || exit 0

# --check: start the image with a config of our own mounted at the path its
# entrypoint names (the flag cannot be given twice) that scrapes itself and loads
# `alerts.yml`, mounted next to it, and wait until the rules API lists every rule.
command -v curl >/dev/null || { echo "build-image: --check needs curl" >&2; exit 1; }
want=$(grep -c '^ *- alert: ' "$here/alerts.yml")
conf=$ctx/check
mkdir -p "$conf"
cp "$here/alerts.yml" "$conf/alerts.yml"
cat >"$conf/prometheus.yml" <<'EOF'
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - alerts.yml
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["localhost:9090"]
EOF
chmod -R a+rX "$conf"
name=cellplane-prometheus-check-$$
docker run -d --name "$name" -p 127.0.0.1::9090 \
    -v "$conf/prometheus.yml:/etc/prometheus/prometheus.yml:ro" \
    -v "$conf/alerts.yml:/etc/prometheus/alerts.yml:ro" "$tag" >/dev/null
cleanup() { docker rm -f -v "$name" >/dev/null 2>&1 || true; rm -rf "$ctx"; }
trap cleanup EXIT
port=$(docker port "$name" 9090/tcp | head -1 | sed 's/.*://')
got=0
for _ in $(seq 1 60); do
    body=$(curl -sf "http://127.0.0.1:$port/api/v1/rules" || true)
    got=$(printf '%s' "$body" | grep -o '"type":"alerting"' | wc -l || true)
    [[ $got -ge $want ]] && break
    sleep 0.5
done
if [[ $got -lt $want ]]; then
    echo "build-image: --check: $got of $want alert rules loaded; container log:" >&2
    docker logs "$name" >&2 || true
    exit 1
fi
# And it scrapes: its own target answers (the first scrape comes within 5 s).
up=
for _ in $(seq 1 40); do
    up=$(curl -sf "http://127.0.0.1:$port/api/v1/query?query=up" | grep -o '"value":\[[^]]*,"1"\]' || true)
    [[ -n $up ]] && break
    sleep 0.5
done
if [[ -z $up ]]; then
    echo "build-image: --check: the rules loaded but Prometheus did not scrape itself; container log:" >&2
    docker logs "$name" >&2 || true
    exit 1
fi
echo "build-image: --check: $tag started; /api/v1/rules lists $got of $want alert rules; it scrapes itself (up 1)"
