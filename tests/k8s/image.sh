#!/usr/bin/env bash
# Builds the shardkv image into up.sh's Docker Engine, from release binaries built on the host
# (no registry here to pull a Rust toolchain image from): a Debian base made once by
# debootstrap (cached as the image shardkv-base:bookworm), then the Dockerfile's `host` target.
#   tests/k8s/image.sh TAG      (after `cargo build --release -p shardkv --bins -p shardkv-operator`)
set -euo pipefail
K8S_DIR=${K8S_DIR:-$HOME/.cache/shardkv-k8s}
tag=${1:?usage: image.sh TAG}
repo=$(cd "$(dirname "$0")/../.." && pwd)
docker_() { docker -H "unix://$K8S_DIR/run/docker.sock" "$@"; }
docker_ info >/dev/null 2>&1 || { echo "Docker Engine is not up: run tests/k8s/up.sh" >&2; exit 1; }
for b in shardkv-node shardkvctl shardkv-operator; do
  [[ -x $repo/target/release/$b ]] || { echo "no target/release/$b: build the release binaries" >&2; exit 1; }
done
if ! docker_ image inspect shardkv-base:bookworm >/dev/null 2>&1; then
  echo "k8s image: making the Debian base (debootstrap, about 2 minutes)" >&2
  root=$K8S_DIR/base-root
  rm -rf "$root"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$K8S_DIR/logs/debootstrap.log" 2>&1
  tar -C "$root" -c . | docker_ import - shardkv-base:bookworm >/dev/null
  rm -rf "$root"
fi
docker_ build -q --target host --build-arg BASE=shardkv-base:bookworm -t "$tag" "$repo" >/dev/null
echo "$tag"
