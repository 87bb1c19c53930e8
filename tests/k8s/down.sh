#!/usr/bin/env bash
# Stops what up.sh started and restores the host, in the order the recipe found necessary (the
# kubelet and kube-proxy change the host): pods first, so the kubelet unmounts their volumes;
# then the kubelet and its bind mount; then everything else; then the firewall, the sysctls, the
# bridge, the kubelet's cgroups and the paths it hardcodes. Safe to run twice, and after a failed
# up.sh. Keeps the binaries, the certificates and Docker's images for the next up.sh.
set -uo pipefail
K8S_DIR=${K8S_DIR:-$HOME/.cache/shardkv-k8s}
R=$K8S_DIR/run C=$K8S_DIR/conf
BRIDGE=skvk8s0
log() { echo "k8s down: $*" >&2; }
[[ -f $R/up ]] || { log "not up"; exit 0; }

stop() { # name [grace seconds]
  local pidfile=$R/$1.pid grace=${2:-10}
  [[ -f $pidfile ]] || return 0
  local pid; pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  for _ in $(seq "$((grace * 5))"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
}

if [[ -f $C/admin.kubeconfig ]] && kubectl --kubeconfig "$C/admin.kubeconfig" get --raw /readyz >/dev/null 2>&1; then
  log "deleting the pods"
  kubectl --kubeconfig "$C/admin.kubeconfig" delete pods --all -A --wait=true --timeout=60s >/dev/null 2>&1 ||
    kubectl --kubeconfig "$C/admin.kubeconfig" delete pods --all -A --force --grace-period=0 >/dev/null 2>&1
fi
stop kubelet
grep " $K8S_DIR/kubelet" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l
stop dns-sync 2
stop dnsmasq 2
stop kube-proxy
stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver 15
stop etcd
if [[ -S $R/docker.sock ]]; then
  ids=$(docker -H "unix://$R/docker.sock" ps -aq 2>/dev/null)
  [[ -z $ids ]] || docker -H "unix://$R/docker.sock" rm -f $ids >/dev/null 2>&1
fi
stop dockerd 20

log "restoring the firewall and the sysctls"
# Every table back to empty, then to the snapshot taken before up.sh (an empty snapshot, as on
# a host with no rules, restores nothing by itself: the kubelet's chains and Docker's FORWARD
# DROP policy would stay).
for table in filter nat mangle raw; do
  iptables -t "$table" -F 2>/dev/null
  iptables -t "$table" -X 2>/dev/null
  for chain in $(iptables -t "$table" -S 2>/dev/null | awk '/^-P / {print $2}'); do
    iptables -t "$table" -P "$chain" ACCEPT
  done
done
[[ -f $R/iptables.before ]] && iptables-restore <"$R/iptables.before"
if [[ -f $R/sysctl.before ]]; then
  while IFS= read -r line; do sysctl -q -w "$line" >/dev/null; done <"$R/sysctl.before"
fi

ip link del "$BRIDGE" 2>/dev/null
# The kubelet's cgroups (cgroupfs driver): leaves first.
for root in /sys/fs/cgroup /sys/fs/cgroup/*; do
  [[ -d $root/kubepods ]] && find "$root/kubepods" -depth -type d -exec rmdir {} + 2>/dev/null
done
grep -q " /var/lib/kubelet" /proc/mounts && grep " /var/lib/kubelet" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l
rm -rf /var/lib/kubelet /var/log/pods /var/log/containers /usr/libexec/kubernetes \
  "$K8S_DIR/kubelet" "$K8S_DIR/dockershim" "$K8S_DIR/etcd-data" "$K8S_DIR/dns" "$K8S_DIR/volumes" \
  "$R/apiserver-certs"
rm -f "$R/up"
log "down"
