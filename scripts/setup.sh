#!/usr/bin/env bash
# Installs what cellplane needs from Debian's packages, and nothing when it is all
# there already (so it is cheap to run before every build).
#   libclang-dev   RocksDB's Rust bindings are generated with bindgen (libclang)
#   g++            RocksDB itself is C++, built by the rocksdb crate
#   etcd-client    etcdctl, used by the tests as a real etcd client
#   protobuf-compiler, libprotobuf-dev  protoc and its well-known types for the
#                  etcd-client crate's build (a test dependency);
#                  cellplane's own protos use the protoc-bin-vendored crate
#   prometheus     promtool: the tests lint every /metrics and unit-test the alert
#                  rules in deploy/prometheus/ (and Compose builds its image from it)
#   chromium       headless, for the tests that load the router's status page and
#                  loadgen's HTML report in a real browser
#   python3-kubernetes  the Kubernetes client's models: the structural check of
#                  the rendered manifests in deploy/k8s/
set -euo pipefail

need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
/usr/bin/python3 -c 'import kubernetes' >/dev/null 2>&1 || need+=(python3-kubernetes)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "setup: installing ${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
