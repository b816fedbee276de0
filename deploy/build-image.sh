#!/usr/bin/env bash
# Builds the `cellplane:local` image from the release binary and the shared
# libraries it needs, on `FROM scratch` (no registry is reachable, so there is no
# base image to pull).
#
#   deploy/build-image.sh                 # the binary `cargo build --release` made
#   CELLPLANE_BIN=path/to/cellplane deploy/build-image.sh
#   CELLPLANE_IMAGE=registry.example.com/cellplane:1.0 deploy/build-image.sh
#
# The binary is the normal build output: <target dir>/release/cellplane, the
# target dir as cargo reports it (CARGO_TARGET_DIR, build.target-dir, else
# <repo>/target). If it is missing the script runs that same `cargo build
# --release`, so nothing is compiled twice. It does not rebuild a binary that is
# there: run `cargo build --release` first after changing the code.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag=${CELLPLANE_IMAGE:-cellplane:local}

if [[ -n ${CELLPLANE_BIN:-} ]]; then
    bin=$CELLPLANE_BIN
else
    # One line of JSON; the field holds an absolute path.
    target=$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    if [[ -z $target ]]; then
        echo "build-image: cannot find the target directory (cargo metadata)" >&2
        exit 1
    fi
    bin=$target/release/cellplane
    if [[ ! -x $bin ]]; then
        echo "build-image: $bin is missing; building it: cargo build --release" >&2
        (cd "$repo" && cargo build --release)
    fi
fi
if [[ ! -x $bin ]]; then
    echo "build-image: $bin is not an executable" >&2
    exit 1
fi

ctx=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
cp "$bin" "$root/cellplane"

# Every library ldd resolves ("libx.so => /path (addr)") and the loader
# ("/lib64/ld-linux-x86-64.so.2 (addr)"); the vDSO has no file and is skipped.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
if ldd "$bin" | grep -q 'not found'; then
    echo "build-image: a library of $bin is missing:" >&2
    ldd "$bin" >&2
    exit 1
fi
for lib in $libs; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# glibc resolves host names (Kubernetes members are DNS names) through NSS; say
# where to look rather than rely on its built-in default.
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
cp "$repo/deploy/Dockerfile" "$ctx/Dockerfile"

# The legacy builder warns on stderr that it is deprecated: show its output only
# when the build fails.
if ! docker build --quiet --tag "$tag" "$ctx" >"$ctx/build.log" 2>&1; then
    cat "$ctx/build.log" >&2
    exit 1
fi
echo "build-image: built $tag from $bin ($(echo "$libs" | wc -w) shared libraries)"
