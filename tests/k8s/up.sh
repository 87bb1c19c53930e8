#!/usr/bin/env bash
# Starts the one-node Kubernetes that install.sh built: Docker Engine on a bridge of its own,
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the kubelet, kube-proxy, and
# dnsmasq with dns-sync.sh (standing in for CoreDNS). Waits until the node is Ready.
# Prints the admin kubeconfig's path. Stop it with down.sh, which restores what the kubelet and
# kube-proxy change on the host; run down.sh even after a failed up.sh.
#
# Addresses are this script's own: the bridge skvk8s0 at 10.200.0.1/24 (pods take addresses on
# it), Services in 10.201.0.0/24, the API server at https://10.200.0.1:16443.
set -euo pipefail
K8S_DIR=${K8S_DIR:-$HOME/.cache/shardkv-k8s}
here=$(cd "$(dirname "$0")" && pwd)
B=$K8S_DIR/bin R=$K8S_DIR/run L=$K8S_DIR/logs P=$K8S_DIR/pki C=$K8S_DIR/conf
BRIDGE=skvk8s0 IP=10.200.0.1 API=https://10.200.0.1:16443
log() { echo "k8s up: $*" >&2; }
[[ -x $B/kubelet ]] || { echo "no Kubernetes in $K8S_DIR: run tests/k8s/install.sh" >&2; exit 1; }
if [[ -f $R/up ]]; then log "already up (down.sh first)"; exit 1; fi
mkdir -p "$R" "$L" "$C" "$K8S_DIR/dns/hosts"

# What down.sh restores: the firewall and the sysctls the kubelet and kube-proxy change.
iptables-save >"$R/iptables.before"
for k in vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.conf.all.route_localnet; do
  echo "$k=$(sysctl -n "$k")"
done >"$R/sysctl.before"
touch "$R/up"

start() { # name command...
  local name=$1; shift
  nohup "$@" >"$L/$name.log" 2>&1 &
  echo $! >"$R/$name.pid"
}
wait_for() { # what seconds command...
  local what=$1 seconds=$2; shift 2
  for _ in $(seq "$((seconds * 5))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "k8s up: $what did not come up in ${seconds}s; logs in $L" >&2
  exit 1
}

ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
ip addr replace "$IP/24" dev "$BRIDGE"
ip link set "$BRIDGE" up

start dockerd dockerd --data-root="$K8S_DIR/docker/data" --exec-root="$K8S_DIR/docker/exec" \
  -H "unix://$R/docker.sock" --pidfile="$R/dockerd.docker-pid" --bridge="$BRIDGE" \
  --storage-driver=overlay2 --exec-opt native.cgroupdriver=cgroupfs \
  --add-runtime "nonneg-oom=$B/runc-nonneg-oom" --default-runtime=nonneg-oom
docker_() { docker -H "unix://$R/docker.sock" "$@"; }
wait_for dockerd 60 docker_ info
if ! docker_ image inspect k8s.gcr.io/pause:3.2 >/dev/null 2>&1; then
  tar -C "$B" -c pause | docker_ import -c 'ENTRYPOINT ["/pause"]' - k8s.gcr.io/pause:3.2 >/dev/null
fi

if [[ ! -f $P/ca.crt ]]; then
  log "making certificates"
  mkdir -p "$P" && (cd "$P" && bash "$here/pki.sh")
fi
kubeconfig() { # file user cert
  local f=$C/$1.kubeconfig
  kubectl config set-cluster k8s --server="$API" --certificate-authority="$P/ca.crt" --embed-certs --kubeconfig "$f" >/dev/null
  kubectl config set-credentials "$2" --client-certificate="$P/$3.crt" --client-key="$P/$3.key" --embed-certs --kubeconfig "$f" >/dev/null
  kubectl config set-context default --cluster k8s --user "$2" --kubeconfig "$f" >/dev/null
  kubectl config use-context default --kubeconfig "$f" >/dev/null
}
kubeconfig admin admin admin
kubeconfig controller-manager system:kube-controller-manager controller-manager
kubeconfig scheduler system:kube-scheduler scheduler
kubeconfig kube-proxy system:kube-proxy kube-proxy
kubeconfig kubelet system:node:shardkv-node kubelet
sed "s#K8S_DIR#$K8S_DIR#g" "$here/kubelet-config.yaml" >"$C/kubelet-config.yaml"
K=(kubectl --kubeconfig "$C/admin.kubeconfig")

start etcd etcd --name k8s --data-dir "$K8S_DIR/etcd-data" \
  --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
  --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
  --initial-cluster k8s=http://127.0.0.1:23800 --listen-metrics-urls http://127.0.0.1:23810
start kube-apiserver "$B/kube-apiserver" --etcd-servers=http://127.0.0.1:23790 \
  --bind-address=$IP --advertise-address=$IP --secure-port=16443 --insecure-port=0 \
  --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" --client-ca-file="$P/ca.crt" \
  --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range=10.201.0.0/24 --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NodeRestriction --allow-privileged=true \
  --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$P/apiserver-kubelet-client.key" --kubelet-preferred-address-types=InternalIP \
  --cert-dir="$R/apiserver-certs"
wait_for kube-apiserver 120 "${K[@]}" get --raw /readyz
start kube-controller-manager "$B/kube-controller-manager" --kubeconfig="$C/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$C/controller-manager.kubeconfig" --authorization-kubeconfig="$C/controller-manager.kubeconfig" \
  --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
  --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key" \
  --use-service-account-credentials=true --bind-address=127.0.0.1 --port=0 --leader-elect=false
start kube-scheduler "$B/kube-scheduler" --kubeconfig="$C/scheduler.kubeconfig" \
  --authentication-kubeconfig="$C/scheduler.kubeconfig" --authorization-kubeconfig="$C/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --port=0 --leader-elect=false
start kubelet "$B/kubelet" --kubeconfig="$C/kubelet.kubeconfig" --config="$C/kubelet-config.yaml" \
  --container-runtime=docker --docker-endpoint="unix://$R/docker.sock" \
  --pod-infra-container-image=k8s.gcr.io/pause:3.2 --root-dir="$K8S_DIR/kubelet" --cert-dir="$K8S_DIR/kubelet/pki" \
  --hostname-override=shardkv-node --node-ip=$IP --experimental-dockershim-root-directory="$K8S_DIR/dockershim"
start kube-proxy "$B/kube-proxy" --kubeconfig="$C/kube-proxy.kubeconfig" --proxy-mode=iptables \
  --cluster-cidr=10.200.0.0/24 --hostname-override=shardkv-node --bind-address=$IP \
  --healthz-bind-address=127.0.0.1:10256 --metrics-bind-address=127.0.0.1:10249 \
  --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0
# As root: it would drop to nobody, who cannot read a cache under /root.
start dnsmasq dnsmasq --keep-in-foreground --user=root --log-facility=- --no-resolv --no-hosts --listen-address=$IP \
  --bind-interfaces --local=/cluster.local/ --hostsdir="$K8S_DIR/dns/hosts"
start dns-sync "$here/dns-sync.sh" "$C/admin.kubeconfig" "$K8S_DIR/dns/hosts"
ready() { "${K[@]}" get node shardkv-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True; }
wait_for "the node" 180 ready
log "node Ready"
echo "$C/admin.kubeconfig"
