#!/usr/bin/env bash
# Stands in for CoreDNS: every second, writes the cluster's pod and Service names to a hosts
# file that dnsmasq (started by up.sh with --hostsdir) rereads on change:
#   IP hostname.subdomain.namespace.svc.cluster.local   for a pod with spec.subdomain
#   IP name.namespace.svc.cluster.local                  for a Service with a ClusterIP
# Usage: dns-sync.sh KUBECONFIG HOSTS_DIR
set -uo pipefail
kubeconfig=$1 dir=$2
while true; do
  {
    kubectl --kubeconfig "$kubeconfig" get pods -A -o json 2>/dev/null | python3 -c '
import json, sys
for p in json.load(sys.stdin)["items"]:
    s, st, m = p["spec"], p.get("status", {}), p["metadata"]
    ip, sub = st.get("podIP"), s.get("subdomain")
    if ip and sub:
        host = s.get("hostname", m["name"])
        print("%s %s.%s.%s.svc.cluster.local" % (ip, host, sub, m["namespace"]))
'
    kubectl --kubeconfig "$kubeconfig" get services -A -o json 2>/dev/null | python3 -c '
import json, sys
for svc in json.load(sys.stdin)["items"]:
    ip, m = svc["spec"].get("clusterIP"), svc["metadata"]
    if ip and ip != "None":
        print("%s %s.%s.svc.cluster.local" % (ip, m["name"], m["namespace"]))
'
  } >"$dir.tmp" && mv "$dir.tmp" "$dir/cluster"
  sleep 1
done
