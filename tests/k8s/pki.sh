#!/usr/bin/env bash
# The cluster's certificates, made with openssl in the current directory (up.sh runs it once).
set -e
openssl genrsa -out ca.key 2048 2>/dev/null
openssl req -x509 -new -nodes -key ca.key -subj "/CN=shardkv-k8s-ca" -days 3650 -out ca.crt
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
# name CN O [sans]
mk() {
  n=$1 cn=$2 o=$3 sans=$4
  openssl genrsa -out $n.key 2048 2>/dev/null
  subj="/CN=$cn"; [ -n "$o" ] && subj="/O=$o/CN=$cn"
  openssl req -new -key $n.key -subj "$subj" -out $n.csr
  if [ -n "$sans" ]; then
    printf "subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n" "$sans" > $n.ext
  else
    printf "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n" > $n.ext
  fi
  openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile $n.ext -out $n.crt 2>/dev/null
}
mk apiserver kube-apiserver "" "IP:10.200.0.1,IP:127.0.0.1,IP:10.201.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
mk admin admin system:masters
mk apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
mk controller-manager system:kube-controller-manager ""
mk scheduler system:kube-scheduler ""
mk kube-proxy system:kube-proxy ""
mk kubelet system:node:shardkv-node system:nodes
