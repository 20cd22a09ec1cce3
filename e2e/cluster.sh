#!/usr/bin/env bash
# End to end on a real Kubernetes cluster, when KUBECONFIG reaches one (kind or
# k3d; any cluster with SLUICE_E2E_IMAGE): builds the image, installs the chart
# (rendered by the real Helm engine, helm-python-sdk) into a fresh namespace,
# and checks, against the real API server, kubelet and operator:
# - the operator Deployment becomes available, one replica holds the Lease
#   and reports itself leader in /metrics (sluice_operator_leader);
# - a StreamingQuery with a `rate` generator and a console sink becomes
#   Ready and its status.progress.batchId increases;
# - suspend: true brings it to phase Suspended with no engine pod;
# - deleting it removes its StatefulSet, ConfigMap and Service;
# - examples/invalid/kubernetes-invalid.yaml is stored and reported Degraded
#   (InvalidSpec) with the message its comment shows;
#   examples/invalid/kubernetes-rejected.yaml is refused by the API server.
# The Kafka examples need the Kafka connector, which is not built yet, so no
# broker is installed here for now.
#
# Without a cluster (KUBECONFIG unset, no kubectl, or `kubectl cluster-info`
# failing within 10 s) it prints "SKIPPED: ..." and exits 0.
#
# The operator watches only the test's namespace (watchNamespace), so that
# the test creates no cluster-wide object but the CRD, and leaves alone any
# Sluice already installed; the CRD is applied (server-side, forced) and kept
# afterwards, as the chart keeps it. The namespace is deleted on exit.
#
# Environment:
#   SLUICE_E2E_IMAGE  an image (repository:tag) already pushed where the
#                     cluster can pull it; then nothing is built or loaded,
#                     and the context may be any cluster. Default: build
#                     sluice:e2e with docker and load it into the kind or k3d
#                     cluster of the context.
#   SLUICE_E2E_KEEP=1 keep the namespace, to look around after a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

skip() { echo "SKIPPED: e2e/cluster.sh needs a Kubernetes cluster: $*"; exit 0; }
[[ -n "${KUBECONFIG:-}" ]] || skip "KUBECONFIG is not set"
command -v kubectl >/dev/null 2>&1 || skip "kubectl is not installed"
if ! reason=$(timeout 10 kubectl cluster-info --request-timeout=10s 2>&1 >/dev/null); then
  skip "kubectl cluster-info failed within 10 s: $(printf '%s' "${reason:-timed out}" | tail -n 1)"
fi

fail() { echo "FAIL $*" >&2; exit 1; }
ok() { echo "ok   $*"; }
python3 -c 'import helm_python, yaml' 2>/dev/null \
  || fail "helm-python-sdk is not installed: pip install helm-python-sdk pyyaml"

# --- the image --------------------------------------------------------------------
context=$(kubectl config current-context)
if [[ -n "${SLUICE_E2E_IMAGE:-}" ]]; then
  image="$SLUICE_E2E_IMAGE"
  pull_policy=IfNotPresent
else
  image=sluice:e2e
  pull_policy=Never
  command -v docker >/dev/null 2>&1 || fail "docker is not installed (or set SLUICE_E2E_IMAGE to a pushed image)"
  echo "-- docker build -t $image . (the first build compiles every dependency)"
  docker build -t "$image" .
  case "$context" in
    kind-*)
      command -v kind >/dev/null 2>&1 || fail "the context $context is a kind cluster, but kind is not installed"
      kind load docker-image "$image" --name "${context#kind-}" ;;
    k3d-*)
      command -v k3d >/dev/null 2>&1 || fail "the context $context is a k3d cluster, but k3d is not installed"
      k3d image import "$image" --cluster "${context#k3d-}" ;;
    *)
      fail "the context $context is neither kind-* nor k3d-*: push the image and set SLUICE_E2E_IMAGE" ;;
  esac
  ok "built $image and loaded it into $context"
fi

# --- a fresh namespace, removed on exit ------------------------------------------------
ns="sluice-e2e-$(date +%s)"
work=$(mktemp -d)
query=rate-to-console
engine_pods="app.kubernetes.io/name=sluice-engine,app.kubernetes.io/instance=$query"
cleanup() {
  local status=$?
  if [[ $status -ne 0 ]]; then
    echo "-- state of $ns at the failure" >&2
    kubectl -n "$ns" get deploy,sts,pods,svc,cm,lease,sq -o wide >&2 || true
    kubectl -n "$ns" describe sq >&2 || true
    kubectl -n "$ns" logs deploy/sluice-operator --all-containers --tail=50 >&2 || true
    kubectl -n "$ns" logs -l "$engine_pods" --tail=20 >&2 || true
  fi
  if [[ -n "${SLUICE_E2E_KEEP:-}" ]]; then
    echo "-- SLUICE_E2E_KEEP is set: namespace $ns is kept" >&2
  else
    # Queries first, while their operator runs to take its finalizer off; a
    # query it could not finish is let go, so that the namespace can go.
    kubectl -n "$ns" delete sq --all --timeout=60s >/dev/null 2>&1 || true
    for sq in $(kubectl -n "$ns" get sq -o name 2>/dev/null); do
      kubectl -n "$ns" patch "$sq" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
    done
    kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
kubectl create namespace "$ns" >/dev/null
ok "namespace $ns"

# --- the chart ------------------------------------------------------------------------
IMAGE="$image" PULL_POLICY="$pull_policy" NS="$ns" python3 - > "$work/chart.yaml" <<'PY'
import os
import yaml
from helm_python.chart import Chart

# repository[:port]/name:tag; the tag is after the last ":" of the last part.
image = os.environ["IMAGE"]
name = image.rsplit("/", 1)[-1]
if ":" not in name:
    raise SystemExit(f"{image}: give the image a tag, repository:tag")
repository, _, tag = image.rpartition(":")
values = {
    "image": {"repository": repository, "tag": tag, "pullPolicy": os.environ["PULL_POLICY"]},
    "watchNamespace": os.environ["NS"],
}
files = Chart.load("charts/sluice").render(values, name="sluice", namespace=os.environ["NS"], is_install=True)
docs = [d for _, text in sorted(files.items()) for d in yaml.safe_load_all(text) if d]
print(yaml.safe_dump_all(docs, sort_keys=False), end="")
PY
kubectl apply --server-side --force-conflicts --field-manager=sluice-e2e -f "$work/chart.yaml" >/dev/null
kubectl wait --for=condition=Established crd/streamingqueries.sluice.dev --timeout=60s >/dev/null
kubectl -n "$ns" rollout status deploy/sluice-operator --timeout=300s >/dev/null \
  || fail "the operator Deployment did not become available within 300 s"
ok "the chart is installed; the operator Deployment is available"

# Polls a command until its output equals the expected text; prints the last output.
wait_for() {
  local expected=$1 seconds=$2; shift 2
  local out=""
  for _ in $(seq "$seconds"); do
    out=$("$@" 2>/dev/null || true)
    [[ "$out" == "$expected" ]] && { printf '%s' "$out"; return 0; }
    sleep 1
  done
  printf '%s' "$out"
  return 1
}

# Polls a command until its output is not empty; prints it.
wait_for_any() {
  local seconds=$1; shift
  local out=""
  for _ in $(seq "$seconds"); do
    out=$("$@" 2>/dev/null || true)
    [[ -n "$out" ]] && { printf '%s' "$out"; return 0; }
    sleep 1
  done
  return 1
}

# Leader election: one operator pod holds the Lease, and only that one says so.
holder=$(wait_for_any 60 kubectl -n "$ns" get lease sluice-operator -o jsonpath='{.spec.holderIdentity}') \
  || fail "no operator pod holds the Lease sluice-operator after 60 s"
leaders=0
for pod in $(kubectl -n "$ns" get pods -l app.kubernetes.io/name=sluice-operator -o jsonpath='{.items[*].metadata.name}'); do
  metrics=$(kubectl get --raw "/api/v1/namespaces/$ns/pods/$pod:8080/proxy/metrics")
  grep -q '^sluice_operator_reconciles_total' <<<"$metrics" || fail "$pod /metrics has no sluice_operator_reconciles_total"
  value=$(awk '$1 == "sluice_operator_leader" {print $2}' <<<"$metrics")
  if [[ "$value" == 1 ]]; then
    leaders=$((leaders + 1))
    [[ "$pod" == "$holder" ]] || fail "$pod says it leads, but the Lease is held by $holder"
  fi
done
[[ $leaders -eq 1 ]] || fail "$leaders operator pods report sluice_operator_leader 1, not 1"
ok "$holder holds the Lease and is the one replica reporting sluice_operator_leader 1"

# --- a query that needs nothing outside the cluster -------------------------------------
cat > "$work/query.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata:
  name: $query
  namespace: $ns
spec:
  sources:
    - name: rate
      generator: {kind: rate, rowsPerSecond: 20}
  query: SELECT value, timestamp, value % 2 = 0 AS even FROM rate
  sink:
    console: {numRows: 3}
  trigger: {processingTime: 2s}
YAML
kubectl apply --server-side --field-manager=sluice-e2e -f "$work/query.yaml" >/dev/null
kubectl -n "$ns" wait --for=condition=Ready "sq/$query" --timeout=300s >/dev/null \
  || fail "sq/$query was not Ready within 300 s"
ok "sq/$query is Ready"

batch_id() { kubectl -n "$ns" get sq "$query" -o jsonpath='{.status.progress.batchId}'; }
first=$(batch_id)
sleep 20
second=$(batch_id)
[[ "$first" =~ ^[0-9]+$ && "$second" =~ ^[0-9]+$ && "$second" -gt "$first" ]] \
  || fail "status.progress.batchId did not increase in 20 s: '$first' then '$second'"
ok "status.progress.batchId went from $first to $second in 20 s"

# --- suspend ----------------------------------------------------------------------------
kubectl -n "$ns" patch sq "$query" --type=merge -p '{"spec":{"suspend":true}}' >/dev/null
phase=$(wait_for Suspended 120 kubectl -n "$ns" get sq "$query" -o jsonpath='{.status.phase}') \
  || fail "suspend: the phase is '$phase' after 120 s, not Suspended"
pods=$(wait_for "" 120 kubectl -n "$ns" get pods -l "$engine_pods" -o name) \
  || fail "suspend: engine pods remain after 120 s: $pods"
ok "suspend: phase Suspended, no engine pod"

# --- delete -----------------------------------------------------------------------------
kubectl -n "$ns" delete sq "$query" --timeout=120s >/dev/null || fail "deleting sq/$query did not finish within 120 s"
left=$(wait_for "" 60 kubectl -n "$ns" get "statefulset/$query" "configmap/$query-query" "service/$query" \
  -o name --ignore-not-found) || fail "delete: left behind after 60 s: $left"
ok "delete: the StatefulSet, ConfigMap and Service are gone"

# --- what a user sees when a spec is wrong ----------------------------------------------
invalid=examples/invalid/kubernetes-invalid.yaml
name=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["metadata"]["name"])' "$invalid")
expected=$(sed -n '/^#   InvalidSpec$/{n;s/^#   //;p;q}' "$invalid")
[[ -n "$expected" ]] || fail "$invalid: its comment shows no message after '#   InvalidSpec'"
kubectl -n "$ns" apply --server-side --field-manager=sluice-e2e -f "$invalid" >/dev/null
kubectl -n "$ns" wait --for=condition=Degraded "sq/$name" --timeout=120s >/dev/null \
  || fail "sq/$name was not Degraded within 120 s"
shown=$(kubectl -n "$ns" get sq "$name" \
  -o jsonpath='{range .status.conditions[?(@.type=="Degraded")]}{.reason}{"\n"}{.message}{"\n"}{end}')
[[ "$shown" == "InvalidSpec"$'\n'"$expected" ]] || fail "sq/$name shows, not what $invalid says:"$'\n'"$shown"
[[ "$(kubectl -n "$ns" get sq "$name" -o jsonpath='{.status.phase}')" == Failed ]] \
  || fail "sq/$name is not in phase Failed"
ok "$invalid: phase Failed, Degraded InvalidSpec with the message its comment shows"

rejected=examples/invalid/kubernetes-rejected.yaml
if out=$(kubectl -n "$ns" apply --server-side --field-manager=sluice-e2e -f "$rejected" 2>&1); then
  fail "$rejected was accepted by the API server"
fi
for field in spec.outputMode spec.statePartitions; do
  grep -q "$field" <<<"$out" || fail "$rejected: the API server's refusal does not name $field: $out"
done
ok "$rejected: refused by the API server at spec.outputMode and spec.statePartitions"

echo "cluster: passed on $context"
