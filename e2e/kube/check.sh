#!/usr/bin/env bash
# Self-test of the local control plane (e2e/kube/lib.sh): builds the binaries
# if needed (e2e/kube/build.sh), starts etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kwok on 127.0.0.1, and checks,
# with the built kubectl:
# - the server's version;
# - crds/streamingquery.yaml applies (server-side) and becomes Established;
# - every examples/kubernetes/*.yaml is accepted, and listed by `kubectl get sq`
#   with the CRD's printer columns;
# - examples/invalid/kubernetes-rejected.yaml is refused, at spec.outputMode
#   and spec.statePartitions (the server's message is printed);
# - a new namespace gets its default ServiceAccount and kube-root-ca.crt;
# - RBAC: a ServiceAccount's token authenticates as that ServiceAccount and is
#   refused what it was not granted;
# - a StatefulSet of 2 replicas gets its pods (statefulset controller), kwok
#   runs them (Running; Pending without kwok), deleting it with cascade
#   removes them (garbage collector); a Job completes (job controller + kwok);
# - the audit log records requests.
# Prints PASS/FAIL lines (SKIP for the StreamingQuery checks when the CRD is
# refused), exits 1 if any check failed. Stops everything on exit.
#
# Environment: KUBE_CHECK_DIR (default: a new temporary directory, removed
# when every check passed), KUBE_CHECK_CRD (another CRD file to apply instead
# of crds/streamingquery.yaml), KUBE_NO_KWOK=1, and lib.sh's settings.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

"$here/build.sh" || { echo "FAIL build (e2e/kube/build.sh)"; exit 1; }

# shellcheck source=lib.sh
. "$here/lib.sh"

failures=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }

dir="${KUBE_CHECK_DIR:-$(mktemp -d /tmp/sluice-kube-check.XXXXXX)}"
cleanup() {
  kube_stop "$dir"
  if (( failures == 0 )) && [[ -z "${KUBE_CHECK_DIR:-}" ]]; then rm -rf "$dir"; else echo "(files kept in $dir)"; fi
}
trap cleanup EXIT

t0=$SECONDS
if ! kube_start "$dir"; then
  fail "kube_start (see above)"
  exit 1
fi
pass "control plane started in $(( SECONDS - t0 ))s ($KUBE_API_URL)"

k() { kubectl "$@"; }

# --- version ---
if out=$(k version -o json 2>&1) \
   && server=$(jq -r .serverVersion.gitVersion <<<"$out") && client=$(jq -r .clientVersion.gitVersion <<<"$out") \
   && [[ "$server" == "$KUBE_VERSION" && "$client" == "$KUBE_VERSION" ]]; then
  pass "kubectl version: client $client, server $server"
else
  fail "kubectl version: want $KUBE_VERSION: $out"
fi

# --- CRD ---
crd=streamingqueries.sluice.dev
have_crd=0
crd_file="${KUBE_CHECK_CRD:-$repo/crds/streamingquery.yaml}"
if out=$(k apply --server-side --force-conflicts -f "$crd_file" 2>&1); then
  pass "CRD ${crd_file#"$repo"/} applied server-side: ${out//$'\n'/; }"
  if out=$(k wait --for=condition=Established "crd/$crd" --timeout=60s 2>&1); then
    pass "CRD Established"
    have_crd=1
  else
    fail "CRD not Established: $out"
  fi
else
  fail "CRD ${crd_file#"$repo"/} refused by the API server: $out"
fi
skip() { echo "SKIP $* (no CRD)"; }

ns=sluice-check
k create namespace "$ns" >/dev/null
kube_wait_sa "$ns" default 60 || fail "ServiceAccount $ns/default never appeared"
if k wait -n "$ns" --for=create configmap/kube-root-ca.crt --timeout=60s >/dev/null 2>&1 \
   && k get configmap kube-root-ca.crt -n "$ns" -o jsonpath='{.data.ca\.crt}' | cmp -s - "$KUBE_CA_FILE"; then
  pass "namespace $ns: ServiceAccount default and ConfigMap kube-root-ca.crt (the cluster CA) created"
else
  fail "namespace $ns: ConfigMap kube-root-ca.crt missing or not the cluster CA"
fi

# --- examples are accepted ---
names=()
if (( have_crd )); then
for f in "$repo"/examples/kubernetes/*.yaml; do
  name=$(k create --dry-run=client -o jsonpath='{.metadata.name}' -f "$f" 2>/dev/null)
  if out=$(k apply --server-side -n "$ns" -f "$f" 2>&1) && k get sq "$name" -n "$ns" >/dev/null 2>&1; then
    pass "accepted ${f#"$repo"/}: $out"
    names+=("$name")
  else
    fail "${f#"$repo"/} refused: $out"
  fi
done

# --- the rejected example is refused, at both fields ---
rej="$repo/examples/invalid/kubernetes-rejected.yaml"
if out=$(k apply --server-side -n "$ns" -f "$rej" 2>&1); then
  fail "${rej#"$repo"/} was ACCEPTED: $out"
else
  printf '     server said: %s\n' "${out//$'\n'/$'\n'     }"
  if grep -q 'spec.outputMode' <<<"$out" && grep -q 'spec.statePartitions' <<<"$out"; then
    pass "${rej#"$repo"/} rejected at spec.outputMode and spec.statePartitions"
  else
    fail "${rej#"$repo"/} rejected, but not at spec.outputMode and spec.statePartitions"
  fi
  if k get sq clicks-per-minute -n "$ns" >/dev/null 2>&1; then fail "clicks-per-minute was stored"; fi
fi

# --- printer columns ---
mapfile -t cols < <(k get crd "$crd" -o json | jq -r '.spec.versions[] | select(.served) | .additionalPrinterColumns[]? | select((.priority // 0) == 0) | .name | ascii_upcase')
out=$(k get sq -n "$ns" 2>&1)
echo "$out" | sed 's/^/     /'
header=$(head -n 1 <<<"$out")
missing=()
for c in NAME "${cols[@]}"; do grep -qw -- "$c" <<<"$header" || missing+=("$c"); done
rows=$(( $(wc -l <<<"$out") - 1 ))
if (( ${#cols[@]} )) && (( ${#missing[@]} == 0 )) && (( rows == ${#names[@]} )); then
  pass "kubectl get sq: columns NAME ${cols[*]}, $rows rows"
else
  fail "kubectl get sq: printer columns (${cols[*]}) missing from header [${missing[*]}], $rows rows for ${#names[@]} queries"
fi
else
  skip "examples/kubernetes/*.yaml accepted, examples/invalid/kubernetes-rejected.yaml rejected, kubectl get sq columns"
fi

# --- RBAC with a ServiceAccount token ---
k create serviceaccount reader -n "$ns" >/dev/null
k create role cm-reader -n "$ns" --verb=get,list,watch --resource=configmaps >/dev/null
k create rolebinding cm-reader -n "$ns" --role=cm-reader --serviceaccount="$ns:reader" >/dev/null
if kube_sa_kubeconfig "$ns" reader "$dir/reader.kubeconfig" 1h; then
  who=$(KUBECONFIG="$dir/reader.kubeconfig" kubectl auth whoami -o jsonpath='{.status.userInfo.username}' 2>&1)
  if [[ "$who" == "system:serviceaccount:$ns:reader" ]] \
     && KUBECONFIG="$dir/reader.kubeconfig" kubectl get configmap kube-root-ca.crt -n "$ns" >/dev/null 2>&1 \
     && denied=$(KUBECONFIG="$dir/reader.kubeconfig" kubectl delete configmap kube-root-ca.crt -n "$ns" 2>&1; true) \
     && grep -q Forbidden <<<"$denied"; then
    pass "RBAC: token of $who may read ConfigMaps, may not delete them"
  else
    fail "RBAC: whoami=$who; delete answer: ${denied:-}"
  fi
else
  fail "kubectl create token"
fi

# --- StatefulSet: statefulset controller, scheduler, kwok, garbage collector ---
k apply -n "$ns" -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: sts-check}
spec:
  clusterIP: None
  selector: {app: sts-check}
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: sts-check}
spec:
  serviceName: sts-check
  replicas: 2
  podManagementPolicy: Parallel
  selector: {matchLabels: {app: sts-check}}
  template:
    metadata: {labels: {app: sts-check}}
    spec:
      containers:
      - name: main
        image: registry.invalid/sluice/never-pulled:0
EOF
want=Running; [[ "${KUBE_NO_KWOK:-0}" == 1 ]] && want=Pending
deadline=$(( SECONDS + 120 ))
while :; do
  phases=$(k get pods -n "$ns" -l app=sts-check -o jsonpath='{range .items[*]}{.metadata.name}={.status.phase}@{.spec.nodeName} {end}' 2>/dev/null)
  n_want=$(grep -o "=$want@" <<<"$phases" | wc -l)
  (( n_want == 2 || SECONDS >= deadline )) && break
  sleep 1
done
echo "     pods: ${phases:-none}"
if (( n_want == 2 )); then
  pass "StatefulSet sts-check: 2 pods $want"
else
  fail "StatefulSet sts-check: want 2 pods $want, got: ${phases:-none}"
fi
if [[ $want == Running ]]; then
  if ready=$(k wait -n "$ns" --for=jsonpath='{.status.readyReplicas}'=2 sts/sts-check --timeout=60s 2>&1); then
    pass "StatefulSet sts-check: readyReplicas=2"
  else
    fail "StatefulSet readyReplicas: $ready"
  fi
fi
k delete statefulset sts-check -n "$ns" --cascade=background --wait=true >/dev/null
deadline=$(( SECONDS + 90 ))
while left=$(k get pods -n "$ns" -l app=sts-check -o name 2>/dev/null) && [[ -n "$left" ]] && (( SECONDS < deadline )); do sleep 1; done
if [[ -z "$left" ]]; then
  pass "garbage collector removed the StatefulSet's pods"
else
  fail "pods left after deleting the StatefulSet: $left"
fi

# --- Job: job controller; kwok completes pods owned by a Job ---
if [[ "${KUBE_NO_KWOK:-0}" != 1 ]]; then
  k create job job-check -n "$ns" --image=registry.invalid/sluice/never-pulled:0 -- true >/dev/null
  if out=$(k wait -n "$ns" --for=condition=Complete job/job-check --timeout=90s 2>&1); then
    pass "Job job-check Complete"
  else
    fail "Job job-check not Complete: $out; $(k get pods -n "$ns" -l job-name=job-check -o wide 2>&1)"
  fi
fi

# --- audit log ---
total=$(cat "$KUBE_AUDIT_LOG" 2>/dev/null | wc -l)
writes=$(kube_audit_writes admin)
sq_writes=$(kube_audit_writes admin streamingqueries)
sq_ok=$(kube_audit_writes admin streamingqueries 2xx)
if (( total > 0 && writes > 0 && (have_crd == 0 || (sq_ok == ${#names[@]} && sq_writes > sq_ok)) )); then
  pass "audit log: $total events, $writes writes by admin; on streamingqueries $sq_writes writes, $sq_ok succeeded${names:+ (the rejected one is logged too)}"
else
  fail "audit log: $total events, $writes writes by admin, $sq_writes on streamingqueries ($KUBE_AUDIT_LOG)"
fi

if (( failures )); then
  echo "FAIL e2e/kube/check.sh: $failures check(s) failed"
  kube_logs 20 "$dir"
  exit 1
fi
echo "PASS e2e/kube/check.sh: every check passed"
