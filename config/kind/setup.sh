#!/usr/bin/env bash
# Turn a kind cluster's control plane into kom-gateway groups and put the gateway in front.
#
#   config/kind/setup.sh [cluster-name]      (default: kom; needs docker, kind, kubectl, helm, openssl)
#
# 1. creates the cluster from kind-config.yaml (four control-plane nodes) unless it exists;
# 2. writes the routing config, builds the gateway image and loads it into the nodes;
# 3. gives each node's kube-apiserver its group's watch cache as `kom-gateway plan
#    --apiserver-flags` derives it from the routing config (--default-watch-cache-size,
#    --watch-cache-sizes), by editing its static pod manifest (the kubelet restarts it);
# 4. creates the Secrets (cluster CA, the cluster's front-proxy client cert, a serving cert
#    for the gateway signed by the cluster CA) and installs the chart with the nodes'
#    apiservers as the groups' endpoints, exposed on 127.0.0.1:8443;
# 5. writes kubeconfig-gateway: the kind admin's credentials, pointed at the gateway.
set -euo pipefail

CLUSTER="${1:-kom}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
NAMESPACE=kom-gateway
IMAGE=kom-gateway:dev
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

GROUPS_IN_ORDER=(default pod config event)

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml"
fi
KCTX="kind-$CLUSTER"

mapfile -t NODES < <(kind get nodes --name "$CLUSTER" | grep control-plane | sort)
if [ "${#NODES[@]}" -lt 4 ]; then
  echo "need 4 control-plane nodes, found ${#NODES[@]}" >&2
  exit 1
fi

declare -A ENDPOINT NODE_OF
for i in "${!GROUPS_IN_ORDER[@]}"; do
  group="${GROUPS_IN_ORDER[$i]}"
  NODE_OF[$group]="${NODES[$i]}"
  ip="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "${NODES[$i]}")"
  ENDPOINT[$group]="https://$ip:6443"
done

# The routing config: the groups, what each claims, and the first cut-over. The
# apiservers' cache flags below are derived from it, so routes and caches agree.
mkdir -m 755 "$WORK/routing"  # the image runs as 65532: this directory only, readable
cat > "$WORK/routing/config.yaml" <<ROUTING
groups:
  default: {endpoints: ["${ENDPOINT[default]}"]}
  pod: {endpoints: ["${ENDPOINT[pod]}"], resources: [pods, bindings]}
  config:
    endpoints: ["${ENDPOINT[config]}"]
    resources: [nodes, configmaps, secrets, serviceaccounts, services, endpoints,
                namespaces, leases.coordination.k8s.io, endpointslices.discovery.k8s.io]
  event: {endpoints: ["${ENDPOINT[event]}"], resources: [events, events.events.k8s.io]}
cutover:
  - match: {userAgent: "kubectl/*"}
    percent: {pod: 100, config: 100, event: 100}
goaway: {chance: 0.001}
accessLog: {enabled: true, sampleRate: 1}
ROUTING

docker build -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# each group's kube-apiserver flags, from `kom-gateway plan --apiserver-flags` (its watch
# cache holds what the group claims; default keeps the stock settings and caches everything)
for group in "${GROUPS_IN_ORDER[@]}"; do
  node="${NODE_OF[$group]}"
  mapfile -t flags < <(docker run --rm -v "$WORK/routing:/routing:ro" "$IMAGE" \
    plan --apiserver-flags --config /routing/config.yaml --group "$group")
  manifest=/etc/kubernetes/manifests/kube-apiserver.yaml
  for flag in "${flags[@]}"; do
    name="${flag%%=*}"
    # replace the flag if present, else add it after the command line's first entry
    docker exec "$node" sh -c "grep -q -- '- $name=' $manifest \
      && sed -i 's|- $name=.*|- $flag|' $manifest \
      || sed -i 's|^    - kube-apiserver$|    - kube-apiserver\n    - $flag|' $manifest"
  done
  echo "$node: kube-apiserver is group $group (${flags[*]:-caches everything})"
done

echo "waiting for every kube-apiserver to come back"
for group in "${GROUPS_IN_ORDER[@]}"; do
  until kubectl --context "$KCTX" --server "${ENDPOINT[$group]}" --insecure-skip-tls-verify \
      get --raw /readyz >/dev/null 2>&1; do
    sleep 2
  done
done

# the cluster's CA and front-proxy client cert, from the first control-plane node
for file in ca.crt ca.key front-proxy-client.crt front-proxy-client.key; do
  docker exec "${NODES[0]}" cat "/etc/kubernetes/pki/$file" > "$WORK/$file"
done
SERVICE_DNS="kom-gateway.$NAMESPACE.svc"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$WORK/serving.key" -subj "/CN=kom-gateway" -out "$WORK/serving.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.cluster.local,DNS:localhost,IP:127.0.0.1\n' \
  "$SERVICE_DNS" "$SERVICE_DNS" > "$WORK/san.ext"
openssl x509 -req -in "$WORK/serving.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
  -CAcreateserial -days 365 -extfile "$WORK/san.ext" -out "$WORK/serving.crt" 2>/dev/null

K=(kubectl --context "$KCTX")
"${K[@]}" create namespace "$NAMESPACE" --dry-run=client -o yaml | "${K[@]}" apply -f -
"${K[@]}" -n "$NAMESPACE" create secret tls kom-gateway-serving \
  --cert "$WORK/serving.crt" --key "$WORK/serving.key" --dry-run=client -o yaml | "${K[@]}" apply -f -
"${K[@]}" -n "$NAMESPACE" create secret tls kom-gateway-front-proxy \
  --cert "$WORK/front-proxy-client.crt" --key "$WORK/front-proxy-client.key" \
  --dry-run=client -o yaml | "${K[@]}" apply -f -
"${K[@]}" -n "$NAMESPACE" create secret generic kom-gateway-cluster-ca \
  --from-file=ca.crt="$WORK/ca.crt" --dry-run=client -o yaml | "${K[@]}" apply -f -

cat > "$WORK/values.yaml" <<VALUES
image: {repository: kom-gateway, tag: dev, pullPolicy: Never}
replicaCount: 2
workers: 1
service: {type: NodePort, nodePort: 30443}
tls:
  servingSecretName: kom-gateway-serving
  clientCASecretName: kom-gateway-cluster-ca
  upstreamCASecretName: kom-gateway-cluster-ca
  frontProxySecretName: kom-gateway-front-proxy
resources: {requests: {cpu: 100m, memory: 128Mi}}
# the kind nodes run the apiservers: the gateway may sit beside them
tolerations: [{key: node-role.kubernetes.io/control-plane, effect: NoSchedule}]
config:
$(sed 's/^/  /' "$WORK/routing/config.yaml")
VALUES
helm upgrade --install kom-gateway "$ROOT/charts/kom-gateway" --kube-context "$KCTX" \
  -n "$NAMESPACE" -f "$WORK/values.yaml" --wait

# the admin's own credentials, pointed at the gateway (which verifies them, then
# forwards the identity to the apiservers as a front proxy)
kind get kubeconfig --name "$CLUSTER" \
  | sed "s|server: https://.*|server: https://127.0.0.1:8443|" > "$HERE/kubeconfig-gateway"
echo
echo "done: KUBECONFIG=$HERE/kubeconfig-gateway kubectl get pods -A"
echo "every request's group: kubectl --context $KCTX -n $NAMESPACE logs deploy/kom-gateway | grep answeredBy"
