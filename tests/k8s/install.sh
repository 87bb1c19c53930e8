#!/usr/bin/env bash
# A real one-node Kubernetes 1.20.2 for the end-to-end test, from Debian's packages alone
# (after ../shared/k8s-recipe, verified by hand on a machine of this kind): the control plane,
# the kubelet on Debian's Docker Engine (dockershim), kube-proxy, and dnsmasq standing in for
# CoreDNS. Idempotent; everything lands in $K8S_DIR (default ~/.cache/shardkv-k8s).
#
# Builds kube-controller-manager, kube-scheduler, kube-proxy and the kubelet from Debian
# bookworm's `kubernetes` source package (with reflect2 1.0.2 swapped in, as
# tests/envtest/install.sh does) and reuses the envtest's kube-apiserver when it is there:
# about 8 minutes on 2 cores, 17 with the apiserver. Needs root (apt-get).
set -euo pipefail
K8S_DIR=${K8S_DIR:-$HOME/.cache/shardkv-k8s}
here=$(cd "$(dirname "$0")" && pwd)
ENVTEST_DIR=${ENVTEST_DIR:-$HOME/.cache/shardkv-envtest}
mkdir -p "$K8S_DIR/bin"
log() { echo "k8s: $*" >&2; }

need_apt=()
for p in golang-go dpkg-dev rsync golang-github-modern-go-reflect2-dev etcd-server docker.io \
  dnsmasq-base conntrack busybox-static debootstrap iptables; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
src_list=/etc/apt/sources.list.d/bookworm-src.sources
if [[ ! -f $src_list ]]; then
  cat >"$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  need_update=1
fi
if ((${#need_apt[@]})) || [[ ${need_update:-} ]]; then
  log "apt-get install ${need_apt[*]}"
  apt-get update -qq
  ((${#need_apt[@]} == 0)) || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian's docker.io starts its own dockerd on install; the test runs one of its own.
systemctl disable --now docker.service docker.socket >/dev/null 2>&1 || true

components=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet)
if [[ -x $ENVTEST_DIR/bin/kube-apiserver && ! -x $K8S_DIR/bin/kube-apiserver ]]; then
  cp "$ENVTEST_DIR/bin/kube-apiserver" "$K8S_DIR/bin/"
fi
missing=()
for c in "${components[@]}"; do [[ -x $K8S_DIR/bin/$c ]] || missing+=("$c"); done
if ((${#missing[@]})); then
  build=$K8S_DIR/build
  rm -rf "$build" && mkdir -p "$build" && cd "$build"
  log "fetching Debian's kubernetes source package"
  apt-get source --download-only kubernetes >/dev/null
  mkdir src && tar xzf kubernetes_*.orig.tar.gz -C src --strip-components=1
  cd src
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  rm -f vendor/github.com/modern-go/reflect2/go.mod
  sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#g' vendor/modules.txt go.mod
  export GOPATH=$PWD/.go
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  for c in "${missing[@]}"; do
    log "building $c"
    # The kubelet links with cgo (the build's default); the others are static.
    cgo=0; [[ $c == kubelet ]] && cgo=1
    env HOME="$build/home" CGO_ENABLED=$cgo make WHAT=cmd/$c >"$build/make-$c.log" 2>&1 ||
      { tail -20 "$build/make-$c.log" >&2; exit 1; }
    cp "_output/bin/$c" "$K8S_DIR/bin/$c"
  done
  # The pause container, from the same source.
  gcc -Os -static -DVERSION=v3.4-debian -o "$K8S_DIR/bin/pause" build/pause/linux/pause.c
  cd / && rm -rf "$build"
fi
if [[ ! -x $K8S_DIR/bin/pause ]]; then
  log "the pause binary is missing: remove $K8S_DIR/bin/kubelet to rebuild"
  exit 1
fi
install -m 0755 "$here/runc-nonneg-oom" "$K8S_DIR/bin/runc-nonneg-oom"
log "ready: $K8S_DIR"
