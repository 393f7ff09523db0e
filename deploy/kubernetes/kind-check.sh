#!/usr/bin/env bash
# ============================================================================
# NEEDS A REAL CLUSTER: kind (Kubernetes in Docker) with a container engine.
# NOT run in CI and NOT run on the development machine (neither has a
# container engine that can run kind, nor network access for its images).
# It has never been run: treat its first run as the first real-cluster test.
# `cargo xtask manifests` (in CI) only renders and validates the manifests.
# ============================================================================
#
# The steps of README "Install on Kubernetes" on a throwaway 3-node kind
# cluster, checked: the agent ready on every node, two pods of a namespace
# labelled for the mesh on two different nodes talking over HBONE (mutual
# TLS to port 15008, seen in both agents' metrics), then a DENY policy
# (security.nodemesh.dev, since kind has no Istio) refusing the same call.
#
# Needs on PATH: kind, kubectl (>= 1.30), skopeo, docker (or podman with
# KIND_EXPERIMENTAL_PROVIDER=podman); and the image archive and the agent
# binary from this workspace:
#   sudo cargo xtask image      # target/image/nodemesh-agent.oci.tar
#   cargo build --release -p nodemesh-agent   # for `create-ca`
#
# Usage: deploy/kubernetes/kind-check.sh [--keep]
#   --keep   leave the cluster (kind delete cluster --name nodemesh-check)
set -euo pipefail

cd "$(dirname "$0")/../.."
CLUSTER=nodemesh-check
IMAGE=ghcr.io/nodemesh/nodemesh-agent:0.1.0
ARCHIVE=${ARCHIVE:-target/image/nodemesh-agent.oci.tar}
AGENT_BIN=${AGENT_BIN:-target/release/nodemesh-agent}
KEEP=0
[[ ${1:-} == --keep ]] && KEEP=1

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

for tool in kind kubectl skopeo; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH"
done
[[ -f $ARCHIVE ]] || fail "$ARCHIVE missing: sudo cargo xtask image"
[[ -x $AGENT_BIN ]] || fail "$AGENT_BIN missing: cargo build --release -p nodemesh-agent"

WORK=$(mktemp -d)
cleanup() {
  rm -rf "$WORK"
  if [[ $KEEP == 0 ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

step "kind cluster $CLUSTER: a control plane and two workers"
cat >"$WORK/kind.yaml" <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
EOF
kind create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --wait 120s
kubectl config use-context "kind-$CLUSTER"
mapfile -t WORKERS < <(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
[[ ${#WORKERS[@]} == 2 ]] || fail "expected 2 workers, got ${WORKERS[*]}"

step "bpffs on every node (the agent's pins must live on the node's bpffs)"
for node in $(kind get nodes --name "$CLUSTER"); do
  docker exec "$node" sh -c 'mount | grep -q "on /sys/fs/bpf type bpf" || mount -t bpf bpf /sys/fs/bpf'
done

step "load $IMAGE (OCI archive -> docker archive -> kind)"
skopeo copy "oci-archive:$ARCHIVE:$IMAGE" "docker-archive:$WORK/image.tar:$IMAGE"
kind load image-archive "$WORK/image.tar" --name "$CLUSTER"

step "the mesh CA as the Secret nodemesh-ca"
kubectl apply -f deploy/kubernetes/base/namespace.yaml
"$AGENT_BIN" create-ca --trust-domain cluster.local --cert "$WORK/ca.pem" --key "$WORK/ca.key"
kubectl -n nodemesh-system create secret generic nodemesh-ca \
  --from-file=ca.pem="$WORK/ca.pem" --from-file=ca.key="$WORK/ca.key"

step "kubectl apply -k deploy/kubernetes"
kubectl apply -k deploy/kubernetes
kubectl -n nodemesh-system rollout status daemonset/nodemesh-agent --timeout=180s

agent_on() {
  kubectl -n nodemesh-system get pods -l app.kubernetes.io/name=nodemesh-agent \
    --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}'
}
# An agent's endpoint through the API server's pod proxy (no port-forward).
agent_get() { kubectl get --raw "/api/v1/namespaces/nodemesh-system/pods/$1:$2/proxy$3"; }

step "every agent ready (/healthz/ready)"
for pod in $(kubectl -n nodemesh-system get pods -l app.kubernetes.io/name=nodemesh-agent -o name); do
  agent_get "${pod#pod/}" 15021 /healthz/ready >/dev/null || fail "$pod not ready"
  echo "$pod ready"
done

step "namespace shop in the mesh; a server on ${WORKERS[1]}, a client on ${WORKERS[0]}"
kubectl create namespace shop
kubectl label namespace shop nodemesh.dev/mesh=enabled
kubectl apply -f - <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec:
  serviceAccountName: server
  nodeName: ${WORKERS[1]}
  containers:
    - name: httpd
      image: busybox:1.36
      command: [sh, -c, 'mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www']
      ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: shop}
spec:
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  serviceAccountName: client
  nodeName: ${WORKERS[0]}
  containers:
    - name: sleep
      image: busybox:1.36
      command: [sleep, infinity]
EOF
kubectl -n shop wait --for=condition=Ready pod/server pod/client --timeout=120s

SERVER_AGENT=$(agent_on "${WORKERS[1]}")
CLIENT_AGENT=$(agent_on "${WORKERS[0]}")
call() { kubectl -n shop exec client -- wget -qO- -T 5 http://server.shop/; }

step "client -> server over the mesh"
[[ $(call) == hello ]] || fail "the call failed"
sleep 2
server_metrics=$(agent_get "$SERVER_AGENT" 15020 /stats/prometheus)
client_metrics=$(agent_get "$CLIENT_AGENT" 15020 /stats/prometheus)
grep '^istio_tcp_connections_opened_total{' <<<"$server_metrics" | grep 'reporter="destination"' \
  | grep 'connection_security_policy="mutual_tls"' | grep -q 'destination_workload="server"' \
  || fail "the server's agent reports no mutual-TLS (HBONE) connection to server"
grep '^nodemesh_hbone_pool_connections_opened_total' <<<"$client_metrics" | grep -qv ' 0$' \
  || fail "the client's agent opened no HBONE connection (port 15008)"
echo "HBONE: the client's agent opened an HBONE connection; the server's reports mutual_tls"

step "a DENY policy: client may not call server"
kubectl apply -f - <<'EOF'
apiVersion: security.nodemesh.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
EOF
for _ in $(seq 1 20); do
  if ! call >/dev/null 2>&1; then denied=1; break; fi
  sleep 1
done
[[ ${denied:-0} == 1 ]] || fail "the call still succeeds 20 s after the DENY policy"
agent_get "$SERVER_AGENT" 15020 /stats/prometheus | grep '^istio_tcp_connections_' \
  | grep -q 'response_flags="DENY"' || fail "no connection counted with response_flags=DENY"
echo "denied, and counted with response_flags=\"DENY\""

kubectl delete authorizationpolicies.security.nodemesh.dev -n shop deny-client
step "PASS"
