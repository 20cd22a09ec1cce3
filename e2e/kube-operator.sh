#!/usr/bin/env bash
# The operator against a real Kubernetes API server (what a mocked one cannot
# show: the server's own OpenAPI and CEL validation, server-side apply and
# its normalisation, watches, the /scale subresource, RBAC, Leases, the
# controller-manager's StatefulSet, Job and garbage-collector controllers).
#
# It starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
# kwok on 127.0.0.1 (e2e/kube/lib.sh; the binaries are built from Go sources
# by e2e/kube/build.sh when missing, ~20 min the first time), installs the
# chart's CRD, ServiceAccount and RBAC (rendered by the real Helm engine,
# helm-python-sdk), and runs two `sluice-operator` processes with that
# ServiceAccount's token, electing a leader. Engine pods are scheduled onto a
# kwok node with loopback IPs (127.1.x.x), and e2e/kube/engine_kubelet.py
# runs the real `sluice` binary for each (its query from the pod's
# ConfigMap), reporting restarts, exits and termination messages as the
# kubelet does. It checks, with kubectl of the same version:
# - the CRD is accepted and Established; every examples/kubernetes/*.yaml is
#   accepted; examples/invalid/kubernetes-rejected.yaml is refused with the
#   very lines the README and its comment show; kubernetes-invalid.yaml is
#   Failed / Degraded InvalidSpec with the message its comment shows;
# - a running query gets its ConfigMap, Service, PDB and StatefulSet, turns
#   Running, `kubectl get sq` shows every printer column with a value;
# - over 60 s of that query running a batch a second, the operator
#   reconciles it at its polling rate (the server's audit log: GETs of its
#   StatefulSet), writes none of its objects, and writes its status at most
#   once per poll;
# - `kubectl scale sq/X --replicas 0|1|2` goes through /scale (2 of a
#   generator query is refused by the operator's validation: only Kafka
#   queries scale out; InvalidSpec, the pod keeps running); each engine pod
#   gets its replica number (the pod-index label) and the count;
#   suspend and resume; delete removes every object;
# - a change of an immutable StatefulSet field is Degraded (ApplyFailed) with
#   the server's message, and an Event says it;
# - an availableNow query runs as a Job and ends Completed with its final
#   progress in status; a spec change runs a new Job;
# - an engine that keeps failing is restarted, then Failed past
#   restartPolicy.maxRestarts with its last error (termination message);
#   with rollback: true, a failed change goes back to the last spec that ran;
# - a stuck sink makes /healthz say "stalled" and the status Degraded Stalled;
# - a deletion whose pod cannot go (a finalizer) gives up after the
#   operator's --deletion-timeout with an Event naming the pod;
# - the autoscaler, with a real Kafka 4 broker: a Kafka -> Kafka query with
#   spec.autoscaling and a backlog of 400,000 records is scaled up from its
#   engine pod's progress (StatefulSet replicas, status.autoscaling, an
#   Event, the RECOMMENDED column, the operator's metrics), to zero once the
#   topic is drained and idle, and back to one when the broker holds new
#   records; its spec is never written; the sink holds every result once;
# - killing the leader (SIGKILL) hands over to the other replica within the
#   Lease's duration (15 s) plus two retry periods (2 s each: one to see the
#   last renewal, one to see it expire) and 1 s of latency, and the new
#   leader reconciles.
# Prints "ok"/"FAIL" lines and "kube-operator: P passed, F failed"; exits 1
# if any check failed. Says SKIPPED (exit 0) only when the control plane
# cannot be built here (no Go toolchain), and SKIP for a part it leaves out.
#
# Environment: KUBE_OPERATOR_KEEP=1 keeps the work directory (logs of every
# process, the audit log); KUBE_VERSION etc. as e2e/kube/versions.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
t_start=$SECONDS

passed=0 failed=0
ok() { echo "ok   [+$((SECONDS - t_start))s] $*"; passed=$((passed + 1)); }
fail() { echo "FAIL [+$((SECONDS - t_start))s] $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@" >/dev/null; then ok "$what"; else fail "$what"; fi; }

# --- what it needs ---------------------------------------------------------------
. scripts/lib/setup.sh
set +e
apt_install jq curl openssl
# shellcheck source=kube/versions.sh
. e2e/kube/versions.sh
missing=()
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok kwok-stages.yaml; do
  [[ -s "$KUBE_BIN/$b" ]] || missing+=("$b")
done
if (( ${#missing[@]} )); then
  if ! command -v go >/dev/null 2>&1 && [[ ! -x /usr/local/go/bin/go ]]; then
    echo "SKIPPED: e2e/kube-operator.sh needs a Kubernetes control plane built from Go sources (missing in $KUBE_BIN: ${missing[*]}), and no Go toolchain is installed to build it: install Go >= 1.26 and rerun (e2e/kube/build.sh)"
    exit 0
  fi
  echo "-- building the control plane (${missing[*]}): e2e/kube/build.sh"
  t0=$SECONDS
  e2e/kube/build.sh || { echo "FAIL e2e/kube/build.sh"; exit 1; }
  echo "-- built in $((SECONDS - t0))s"
fi
# The binaries (sluice and sluice-operator), and a real Kafka broker for the
# autoscaler's scenario (e2e/kafka/lib.sh).
echo "-- cargo test --workspace --no-run, confluent-kafka, the broker's jars"
# shellcheck source=kafka/lib.sh
. e2e/kafka/lib.sh
kafka_e2e_prepare || { echo "FAIL kafka_e2e_prepare (cargo build, pip, the broker's jars)"; exit 1; }
sluice="$CARGO_TARGET_DIR/debug/sluice"
operator="$CARGO_TARGET_DIR/debug/sluice-operator"

# shellcheck source=kube/lib.sh
. e2e/kube/lib.sh
# shellcheck source=lib/cleanup.sh
. e2e/lib/cleanup.sh
work=$(mktemp -d /tmp/sluice-kube-operator.XXXXXX)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  kube_stop "$work/kube"
  kafka_kill "$work/broker" 2>/dev/null
  if (( failed )) || [[ -n "${KUBE_OPERATOR_KEEP:-}" ]]; then
    echo "(logs kept in $work)"
  else
    remove_dir "$work"
  fi
}
trap cleanup EXIT

# kwok's default stages, but for Job pods' completion: engine_kubelet.py ends
# them when their engine exits. Pod IPs on the loopback network.
awk 'BEGIN { RS = "\n---\n"; ORS = "\n---\n" } !/name: pod-complete/' \
  "$KUBE_BIN/kwok-stages.yaml" > "$work/kwok-stages.yaml"
export KUBE_KWOK_STAGES="$work/kwok-stages.yaml" KUBE_POD_CIDR=127.1.0.0/16
t0=$SECONDS
kube_start "$work/kube" || { echo "FAIL kube_start"; exit 1; }
ok "control plane $KUBE_VERSION up in $((SECONDS - t0))s"
kafka_start "$work/broker" >"$work/broker.log" 2>&1 || { echo "FAIL kafka_start: $(tail -5 "$work/broker.log")"; exit 1; }

# Polls `cmd...` every 0.5 s until its output matches the regex `want`, for
# at most `seconds`; prints the last output.
wait_for() {
  local want=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds)) out=""
  while :; do
    out=$("$@" 2>&1)
    [[ "$out" =~ $want ]] && { printf '%s' "$out"; return 0; }
    (( SECONDS >= deadline )) && { printf '%s' "$out"; return 1; }
    sleep 0.5
  done
}
field() { kubectl get "$1" -n "$2" -o jsonpath="$3" 2>/dev/null; }
# notes QUERY REASON: the notes of the Events on sq/QUERY with that reason
notes() {
  kubectl get events.events.k8s.io -n e2e -o json | jq -r --arg q "$1" --arg r "$2" \
    '.items[] | select(.regarding.kind == "StreamingQuery" and .regarding.name == $q and .reason == $r) | .note'
}
condition() { field "sq/$1" "$2" "{.status.conditions[?(@.type==\"$3\")].$4}"; }

# --- the CRD, the ServiceAccount and RBAC, from the chart --------------------------
crd=streamingqueries.sluice.dev
if python3 -c 'import helm_python, yaml' 2>/dev/null; then
  python3 - "$work/chart.yaml" <<'PY'
import sys
import yaml
from helm_python.chart import Chart

files = Chart.load("charts/sluice").render({}, name="sluice", namespace="sluice-system", is_install=True)
docs = [d for _, text in sorted(files.items()) for d in yaml.safe_load_all(text) if d]
# The operator runs as processes here: no Deployment (kwok would only fake it).
keep = [d for d in docs if d["kind"] in ("CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                                         "ClusterRoleBinding", "Role", "RoleBinding")]
open(sys.argv[1], "w").write(yaml.safe_dump_all(keep, sort_keys=False))
PY
  kubectl create namespace sluice-system >/dev/null
  if out=$(kubectl apply --server-side -f "$work/chart.yaml" 2>&1); then
    ok "the chart's CRD, ServiceAccount and RBAC applied: ${out//$'\n'/; }"
  else
    fail "the chart's objects refused: $out"
  fi
  kube_wait_sa sluice-system sluice-operator 30 \
    && kube_sa_kubeconfig sluice-system sluice-operator "$work/operator.kubeconfig" 2h
  operator_user=system:serviceaccount:sluice-system:sluice-operator
else
  echo "SKIP the operator runs as the cluster admin, not with the chart's RBAC: helm-python-sdk is not installed (pip install helm-python-sdk pyyaml)"
  kubectl create namespace sluice-system >/dev/null
  kubectl apply --server-side -f crds/streamingquery.yaml >/dev/null
  cp "$KUBECONFIG" "$work/operator.kubeconfig"
  operator_user=admin
fi
check "CRD $crd Established" kubectl wait --for=condition=Established "crd/$crd" --timeout=60s

# --- two operator replicas ---------------------------------------------------------
declare -A op_pid op_port
start_operator() {
  local id=$1
  op_port[$id]=$(_kube_free_port)
  KUBECONFIG="$work/operator.kubeconfig" RUST_LOG=info,kube=warn \
    "$operator" run --identity "$id" --lease-namespace sluice-system --lease-name sluice-operator \
      --http-port "${op_port[$id]}" --engine-image sluice:e2e \
      --progress-interval 5s --deletion-timeout 10s >"$work/$id.log" 2>&1 &
  op_pid[$id]=$!
  pids+=("$!")
}
leader_metric() { curl -fsS "localhost:${op_port[$1]}/metrics" 2>/dev/null | awk '$1 == "sluice_operator_leader" {print $2}'; }
start_operator op-a
start_operator op-b
holder=$(wait_for '^op-[ab]$' 30 field lease/sluice-operator sluice-system '{.spec.holderIdentity}')
leaders=0
for id in op-a op-b; do
  [[ "$(wait_for '^[01]$' 10 leader_metric "$id")" == 1 ]] && leaders=$((leaders + 1)) && leader=$id
done
if [[ "$holder" =~ ^op-[ab]$ && $leaders == 1 && "${leader:-}" == "$holder" ]]; then
  ok "two operators: $holder holds the Lease and is the one reporting sluice_operator_leader 1"
else
  fail "leader election: Lease holder '$holder', $leaders replicas report leading"
fi
follower=op-a; [[ "$holder" == op-a ]] && follower=op-b

kubectl create namespace e2e >/dev/null
kubectl create namespace examples >/dev/null
kube_wait_sa e2e default 30 && kube_wait_sa examples default 30
python3 e2e/kube/engine_kubelet.py --sluice "$sluice" --work "$work/engines" \
  --namespace e2e --stuck-stdout stuck 2>"$work/kubelet.log" &
pids+=("$!")

# --- the examples, and what the API server refuses ----------------------------------
for f in examples/kubernetes/*.yaml; do
  if out=$(kubectl apply --server-side -n examples -f "$f" 2>&1); then ok "accepted $f: $out"; else fail "$f refused: $out"; fi
done
rejected=examples/invalid/kubernetes-rejected.yaml
expected=$(sed -n 's/^#   \(The StreamingQuery\|\* \)/\1/p' "$rejected")
in_readme() { local line; while IFS= read -r line; do grep -qxF -- "$line" README.md || return 1; done <<<"$1"; }
if out=$(kubectl apply -n examples -f "$rejected" 2>&1); then
  fail "$rejected was accepted"
# (The server lists the fields in no fixed order.)
elif [[ "$(sed 's/ *$//' <<<"$out" | sort)" == "$(sort <<<"$expected")" ]] && in_readme "$expected"; then
  ok "$rejected refused by the API server with the very lines its comment and the README show"
else
  fail "$rejected: the server said"$'\n'"$out"$'\n'"and its comment shows"$'\n'"$expected"
fi
invalid=examples/invalid/kubernetes-invalid.yaml
kubectl apply --server-side -n examples -f "$invalid" >/dev/null
want=$(sed -n '/^#   InvalidSpec$/{n;s/^#   //;p;q}' "$invalid")
got=$(wait_for 'InvalidSpec' 30 condition payments-enriched examples Degraded reason)
shown=$(condition payments-enriched examples Degraded message)
if [[ "$got" == InvalidSpec && "$shown" == "$want" && "$(field sq/payments-enriched examples '{.status.phase}')" == Failed ]] \
   && ! kubectl get statefulset payments-enriched -n examples >/dev/null 2>&1; then
  ok "$invalid: Failed, Degraded InvalidSpec with the message its comment shows, no StatefulSet"
else
  fail "$invalid: reason '$got', message '$shown' (want '$want')"
fi

# --- the queries of the scenarios, all at once ---------------------------------------
rate_query() {  # rate_query NAME [EXTRA-SPEC-LINES]
  cat <<YAML
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: $1, namespace: e2e}
spec:
  sources:
    - name: rate
      generator: {kind: rate, rowsPerSecond: 50}
  query: SELECT value, value % 2 = 0 AS even FROM rate
  sink: {console: {numRows: 2}}
  trigger: {processingTime: 1s}
${2:-}
YAML
}
rate_query live | kubectl apply --server-side -f - >/dev/null
rate_query scaled | kubectl apply --server-side -f - >/dev/null
# A volume for sq/volume's state claim (no provisioner here).
cat <<'YAML' | kubectl apply --server-side -f - >/dev/null
apiVersion: v1
kind: PersistentVolume
metadata: {name: e2e-state}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  hostPath: {path: /tmp/sluice-e2e-state}
YAML
rate_query volume "  engine: {stateVolume: {size: 1Gi}}" | kubectl apply --server-side -f - >/dev/null
rate_query crashing "  restartPolicy: {maxRestarts: 2}" | sed 's#sink: {console: {numRows: 2}}#sink: {files: {path: /proc/sluice-e2e-out}}#' \
  | kubectl apply --server-side -f - >/dev/null
rate_query upgrade "  restartPolicy: {maxRestarts: 1, rollback: true}" | kubectl apply --server-side -f - >/dev/null
rate_query blocked | kubectl apply --server-side -f - >/dev/null
cat <<'YAML' | kubectl apply --server-side -f - >/dev/null
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: stuck, namespace: e2e}
spec:
  sources:
    - name: rate
      generator: {kind: rate, rowsPerSecond: 5000}
  query: SELECT value, value * 2 AS twice FROM rate
  sink: {console: {numRows: 5000, truncate: false}}
  trigger: {processingTime: 200ms}
  stallTimeout: 3s
YAML
cat <<'YAML' | kubectl apply --server-side -f - >/dev/null
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: batch, namespace: e2e}
spec:
  sources:
    - name: rate
      generator: {kind: rate, rowsPerSecond: 1000, rowsPerBatch: 250, totalRows: 1000}
  query: SELECT value FROM rate WHERE value % 3 = 0
  sink: {console: {numRows: 1}}
  trigger: {availableNow: true}
YAML

# --- a running query: objects, status, printer columns ------------------------------
if phase=$(wait_for '^Running$' 60 field sq/live e2e '{.status.phase}') \
   && wait_for '^[0-9]+$' 30 field sq/live e2e '{.status.progress.batchId}' >/dev/null; then
  ok "sq/live is Running and its status has progress (batch $(field sq/live e2e '{.status.progress.batchId}'))"
else
  fail "sq/live: phase '$phase', progress '$(field sq/live e2e '{.status.progress}')'"
fi
t_window=$(date -u +%s)
objects=$(kubectl get configmap/live-query service/live poddisruptionbudget/live statefulset/live -n e2e -o name 2>&1)
owners=$(kubectl get configmap/live-query service/live poddisruptionbudget/live statefulset/live -n e2e \
  -o jsonpath='{range .items[*]}{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name} {end}' 2>&1)
check "the operator created the ConfigMap, Service, PDB and StatefulSet of sq/live, owned by it" \
  test "$(wc -l <<<"$objects")-$owners" == "4-StreamingQuery/live StreamingQuery/live StreamingQuery/live StreamingQuery/live "
mapfile -t cols < <(kubectl get crd "$crd" -o json | jq -r '.spec.versions[] | select(.served) | .additionalPrinterColumns[] | select((.priority // 0) == 0) | .name | ascii_upcase')
table=$(kubectl get sq live -n e2e 2>&1)
echo "$table" | sed 's/^/     /'
header=$(head -1 <<<"$table")
# The row's cells, cut at the header's column starts (an empty cell is blank).
mapfile -t values < <(python3 -c '
import re, sys
header, row = sys.argv[1], sys.argv[2]
starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", header)]
for a, b in zip(starts, starts[1:] + [None]):
    print(row[a:b].strip())' "$header" "$(tail -1 <<<"$table")")
in_header() { local c; for c in "${cols[@]}"; do grep -qF -- "$c" <<<"$header" || return 1; done; }
# NAME PHASE REPLICAS RECOMMENDED INPUT/S LAG LAST-BATCH AGE: every column
# has a value but RECOMMENDED (sq/live is not autoscaled)
if [[ ${#values[@]} -eq $(( ${#cols[@]} + 1 )) && "${values[1]}" == Running && "${values[2]}" == 1 \
      && -z "${values[3]}" && "${values[4]}" =~ ^[0-9.]+$ && "${values[5]}" == 0 \
      && -n "${values[6]}" && -n "${values[7]}" ]] && in_header; then
  ok "kubectl get sq: the printer columns (${cols[*]}) all have values (RECOMMENDED is empty: not autoscaled)"
else
  fail "kubectl get sq: columns ${cols[*]}, got: $table"
fi

# --- a stall ----------------------------------------------------------------------------------------
if out=$(wait_for 'Stalled' 60 condition stuck e2e Degraded reason); then
  ip=$(field pod/stuck-0 e2e '{.status.podIP}')
  healthz=$(curl -sS "http://$ip:9464/healthz" 2>&1)
  ok "a stuck sink: /healthz says '${healthz%%$'\n'*}', the status Degraded Stalled: $(condition stuck e2e Degraded message)"
else
  fail "stuck: '$out'; $(field sq/stuck e2e '{.status.conditions}')"
fi
kubectl delete sq stuck -n e2e --wait=false >/dev/null

# --- /scale, suspend, resume ----------------------------------------------------------
wait_for '^Running$' 60 field sq/scaled e2e '{.status.phase}' >/dev/null
kubectl scale sq/scaled -n e2e --replicas 0 >/dev/null
if wait_for '^0 Suspended 0$' 30 field sq/scaled e2e '{.spec.replicas} {.status.phase} {.status.replicas}' >/dev/null \
   && wait_for '^0$' 30 field statefulset/scaled e2e '{.spec.replicas}' >/dev/null; then
  ok "kubectl scale sq/scaled --replicas 0 (the /scale subresource): StatefulSet at 0, phase Suspended"
else
  fail "scale to 0: $(field sq/scaled e2e '{.spec.replicas} {.status.phase} {.status.replicas}')"
fi
kubectl scale sq/scaled -n e2e --replicas 1 >/dev/null
check "kubectl scale sq/scaled --replicas 1: Running again with 1 replica" \
  wait_for '^Running 1$' 60 field sq/scaled e2e '{.status.phase} {.status.replicas}'
scale=$(kubectl get --raw /apis/sluice.dev/v1alpha1/namespaces/e2e/streamingqueries/scaled/scale 2>&1)
check "the /scale subresource reads spec 1, status 1 and the pods' selector" \
  test "$(jq -r '"\(.spec.replicas) \(.status.replicas) \(.status.selector)"' <<<"$scale")" \
  == "1 1 app.kubernetes.io/instance=scaled,app.kubernetes.io/managed-by=sluice-operator,app.kubernetes.io/name=sluice-engine"
kubectl scale sq/scaled -n e2e --replicas 2 >/dev/null
reason=$(wait_for 'InvalidSpec' 30 condition scaled e2e Degraded reason)
if [[ "$reason" == InvalidSpec && "$(condition scaled e2e Degraded message)" == *"scale-out of other sources and sinks is not built"* \
      && "$(field statefulset/scaled e2e '{.spec.replicas}')" == 1 ]]; then
  ok "kubectl scale --replicas 2 of a generator query: the API server takes it, the operator refuses it (InvalidSpec: only Kafka queries scale out), 1 pod keeps running"
else
  fail "scale to 2: $reason: $(condition scaled e2e Degraded message)"
fi
kubectl scale sq/scaled -n e2e --replicas 1 >/dev/null
pod_env=$(kubectl get pod scaled-0 -n e2e -o json | jq -c '[.metadata.labels["apps.kubernetes.io/pod-index"], (.spec.containers[0].env[] | select(.name | startswith("SLUICE_REPLICA")) | .value // .valueFrom.fieldRef.fieldPath)]')
check "the engine pod knows its replica (pod-index label 0, through the downward API) and the count (1): $pod_env" \
  test "$pod_env" == '["0","metadata.labels['"'"'apps.kubernetes.io/pod-index'"'"']","1"]'
kubectl patch sq scaled -n e2e --type=merge -p '{"spec":{"suspend":true}}' >/dev/null
if wait_for '^Suspended$' 30 field sq/scaled e2e '{.status.phase}' >/dev/null \
   && wait_for '^$' 30 kubectl get pods -n e2e -l app.kubernetes.io/instance=scaled -o name >/dev/null; then
  ok "suspend: phase Suspended, no engine pod"
else
  fail "suspend: $(field sq/scaled e2e '{.status.phase}'), pods: $(kubectl get pods -n e2e -l app.kubernetes.io/instance=scaled -o name)"
fi
hash_before=$(field statefulset/scaled e2e '{.spec.template.metadata.annotations.sluice\.dev/spec-hash}')
kubectl patch sq scaled -n e2e --type=merge -p '{"spec":{"suspend":false}}' >/dev/null
check "resume: Running again, the same pod template (no roll)" \
  wait_for "^Running $hash_before\$" 60 field sq/scaled e2e "{.status.phase} $hash_before"

# --- an immutable field -----------------------------------------------------------------
wait_for '^Running$' 60 field sq/volume e2e '{.status.phase}' >/dev/null
kubectl patch sq volume -n e2e --type=merge -p '{"spec":{"engine":{"stateVolume":{"size":"2Gi"}}}}' >/dev/null
reason=$(wait_for 'ApplyFailed' 30 condition volume e2e Degraded reason)
message=$(condition volume e2e Degraded message)
events=$(notes volume Failed)
if [[ "$reason" == ApplyFailed && "$message" == "The API server refused the change: StatefulSet volume: StatefulSet.apps \"volume\" is invalid: spec.volumeClaimTemplates: "*": field is immutable" \
      && "$events" == *"spec.volumeClaimTemplates: "*": field is immutable"* ]]; then
  ok "an immutable StatefulSet field changed: Degraded ApplyFailed with the server's message, and a Warning Event"
else
  fail "immutable change: reason '$reason', message '$message', events '$events'"
fi
kubectl patch sq volume -n e2e --type=merge -p '{"spec":{"engine":{"stateVolume":{"size":"1Gi"}}}}' >/dev/null
check "reverting it clears the condition" wait_for '^False Running$' 30 field sq/volume e2e \
  '{.status.conditions[?(@.type=="Degraded")].status} {.status.phase}'

# --- availableNow: a Job, Completed --------------------------------------------------------
if out=$(wait_for '^Completed 3$' 90 field sq/batch e2e '{.status.phase} {.status.progress.batchId}'); then
  job=$(field sq/batch e2e '{.status.job}')
  ok "sq/batch (availableNow) ran as Job $job and is Completed, with its last batch (3) in status.progress"
else
  fail "sq/batch: '$out'; $(kubectl get jobs,pods -n e2e -l app.kubernetes.io/instance=batch 2>&1)"
fi
kubectl patch sq batch -n e2e --type=merge -p '{"spec":{"query":"SELECT value FROM rate WHERE value % 5 = 0"}}' >/dev/null
# (generation 2 in the pattern: the status of generation 1 is Completed too)
if out=$(wait_for '^Completed 2 batch-' 90 field sq/batch e2e '{.status.phase} {.status.observedGeneration} {.status.job}') \
   && [[ "$out" != *" ${job:-none}" ]]; then
  ok "a spec change runs a new Job (${out##* }), Completed again"
else
  fail "sq/batch after a change: '$out' (first Job ${job:-none})"
fi

# --- restarts, the limit, rollback ------------------------------------------------------------
if out=$(wait_for 'RestartLimitExceeded' 90 condition crashing e2e Degraded reason); then
  message=$(condition crashing e2e Degraded message)
  if [[ "$(field sq/crashing e2e '{.status.phase}')" == Failed && "$message" == *"more than spec.restartPolicy.maxRestarts (2)"* \
        && "$message" == *"error: /proc/sluice-e2e-out: cannot create the directory"* ]] \
     && wait_for '^0$' 30 field statefulset/crashing e2e '{.spec.replicas}' >/dev/null; then
    ok "an engine that keeps failing: restarted, then Failed past maxRestarts with its last error, pods stopped"
  else
    fail "crashing: phase $(field sq/crashing e2e '{.status.phase}'): $message"
  fi
else
  fail "crashing: $out; $(field sq/crashing e2e '{.status}')"
fi
if wait_for '^1$' 60 field sq/upgrade e2e '{.status.lastStableGeneration}' >/dev/null; then
  kubectl patch sq upgrade -n e2e --type=merge -p '{"spec":{"sink":{"console":null,"files":{"path":"/proc/sluice-e2e-upgrade"}}}}' >/dev/null
  if out=$(wait_for 'RolledBack' 90 condition upgrade e2e Degraded reason) \
     && wait_for '^Running 1$' 60 field sq/upgrade e2e '{.status.phase} {.status.runningGeneration}' >/dev/null \
     && [[ "$(field configmap/upgrade-query e2e '{.data.query\.yaml}')" == *"console:"* ]]; then
    ok "rollback: generation 2 failed; the pods run generation 1 again ($(condition upgrade e2e Degraded message | cut -c1-120)...)"
  else
    fail "rollback: '$out': $(field sq/upgrade e2e '{.status}')"
  fi
else
  fail "sq/upgrade never recorded a stable spec: $(field sq/upgrade e2e '{.status}')"
fi

# --- deletion, and a deletion that cannot finish -------------------------------------------------
wait_for '^Running$' 60 field sq/blocked e2e '{.status.phase}' >/dev/null
kubectl patch pod blocked-0 -n e2e --type=merge -p '{"metadata":{"finalizers":["e2e.sluice.dev/block"]}}' >/dev/null
t0=$SECONDS
kubectl delete sq blocked -n e2e --wait=false >/dev/null
if wait_for '^$' 40 kubectl get sq blocked -n e2e -o name --ignore-not-found >/dev/null; then
  note=$(notes blocked DeletionTimedOut)
  if [[ "$note" == *"pod blocked-0 (Running on kwok-node-0, terminating since"*"finalizers e2e.sluice.dev/block"* ]]; then
    ok "a deletion blocked by a pod gives up after $((SECONDS - t0))s (--deletion-timeout 10s) with an Event naming it: ${note:0:100}..."
  else
    fail "deletion timeout: Event '$note'"
  fi
else
  fail "sq/blocked is still there after 40 s"
fi
kubectl patch pod blocked-0 -n e2e --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1
kubectl delete sq scaled -n e2e --timeout=60s >/dev/null
check "delete: sq/scaled and its StatefulSet, ConfigMap, Service and PDB are gone" \
  wait_for '^$' 60 kubectl get sq/scaled statefulset/scaled configmap/scaled-query service/scaled poddisruptionbudget/scaled \
  -n e2e -o name --ignore-not-found

# --- the autoscaler, on a real Kafka broker ----------------------------------------------------
# A Kafka -> Kafka query with spec.autoscaling and a backlog: the operator
# scales its StatefulSet up from the engine pod's progress, down to zero
# once the topic is drained and idle, and back to one when the broker holds
# new records (no engine runs then: the operator asks the broker); the
# StreamingQuery's spec is never written; the sink holds every result once.
produce() {  # produce TOPIC FIRST COUNT: JSON records {"id": n}, keyed by n
  python3 - "$KAFKA_BOOTSTRAP" "$@" <<'PY'
import sys
from confluent_kafka import Producer
bootstrap, topic, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
for i in range(first, first + count):
    while True:
        try:
            p.produce(topic, key=str(i).encode(), value=('{"id": %d}' % i).encode())
            break
        except BufferError:
            # The local queue (100,000 messages) is full: wait for the broker.
            p.poll(0.1)
    if i % 5000 == 0:
        p.poll(0)
if p.flush(120) != 0:
    sys.exit(f"{len(p)} records to {topic} were not delivered")
PY
}
kafka_topic_create auto-in 4 && kafka_topic_create auto-out 1
produce auto-in 0 400000
cat <<YAML | kubectl apply --server-side -f - >/dev/null
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: auto, namespace: e2e}
spec:
  sources:
    - name: numbers
      kafka: {bootstrapServers: "$KAFKA_BOOTSTRAP", topic: auto-in, startingOffsets: earliest, maxOffsetsPerTrigger: 4000}
      schema: [{name: id, type: long}]
  query: SELECT id FROM numbers WHERE id % 3 = 0
  sink: {kafka: {bootstrapServers: "$KAFKA_BOOTSTRAP", topic: auto-out}}
  checkpoint: {location: "$work/auto-checkpoint"}
  autoscaling: {maxReplicas: 4, catchUpWithin: 2s, restartTime: 1s, metricWindow: 20s, scaleDownWindow: 20s, scaleToZeroAfter: 10s}
YAML
sts_replicas() { field statefulset/auto e2e '{.spec.replicas}'; }
if up=$(wait_for '^[2-4]$' 90 sts_replicas); then
  ok "a backlog of 400,000 records: the autoscaler scaled the StatefulSet from 1 to $up replicas ($(field sq/auto e2e '{.status.autoscaling.reason}'))"
else
  fail "no scale-up: StatefulSet at '$up', status $(field sq/auto e2e '{.status.autoscaling}')"
fi
event=$(kubectl get events -n e2e --field-selector involvedObject.name=auto,reason=Rescaled -o jsonpath='{.items[0].note}{.items[0].message}' 2>&1)
check "an Event says why: ${event:0:160}" grep -q '^The autoscaler scaled the query from 1 to' <<<"$event"
table=$(kubectl get sq auto -n e2e 2>&1)
echo "$table" | sed 's/^/     /'
check "kubectl get sq shows the recommendation (RECOMMENDED column)" \
  awk 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "RECOMMENDED") c = i } NR == 2 { exit !(c && $c ~ /^[0-9]+$/) }' <<<"$table"
check "the operator's /metrics has the autoscaler's view of sq/auto" \
  grep -q 'sluice_operator_autoscaler{query="e2e/auto",value="recommended"}' <(curl -fsS "localhost:${op_port[$holder]}/metrics")
if zero=$(wait_for '^0 0$' 180 field sq/auto e2e '{.spec.replicas}{.status.autoscaling.replicas} {.status.replicas}'); then
  ok "drained and idle: scaled to zero ($(condition auto e2e Ready reason): $(condition auto e2e Ready message))"
else
  fail "no scale to zero: '$zero', $(field sq/auto e2e '{.status.autoscaling}')"
fi
# The pods leave the API before their engines exit, and an engine asked to
# stop finishes the batch under way: one still stopping could read the new
# records itself (exactly once, but then nothing is left to wake for).
for _ in $(seq 30); do pgrep -f "$work/engines/e2e-auto-" >/dev/null || break; sleep 1; done
produce auto-in 400000 3000
if one=$(wait_for '^1 1$' 60 field sq/auto e2e '{.status.autoscaling.replicas} {.status.replicas}'); then
  ok "3,000 new records at the broker while at zero: back to 1 replica ($(field sq/auto e2e '{.status.autoscaling.reason}'))"
else
  fail "not woken: '$one', $(field sq/auto e2e '{.status.autoscaling}')"
fi
check "the autoscaler never wrote the spec: generation 1, spec.replicas unset" \
  test "$(field sq/auto e2e '{.metadata.generation} {.spec.replicas}')" == "1 "
# Every id divisible by 3 exactly once, read_committed.
want=$(( (403000 + 2) / 3 ))
got=$(kafka_consume auto-out "$want" 60000 2>/dev/null | python3 -c '
import json, sys
ids = [json.loads(line)["id"] for line in sys.stdin if line.strip()]
want = set(range(0, 403000, 3))
print(f"{len(ids)} rows, {len(set(ids))} distinct, equal={set(ids) == want}")')
check "the sink holds every result once through 1 -> $up -> 0 -> 1 replicas: $got" \
  test "$got" == "$want rows, $want distinct, equal=True"
kubectl delete sq auto -n e2e --wait=false >/dev/null

# --- 60 s of a running query: reconciles at the polling rate, no writes -----------------------------
left=$(( t_window + 62 - $(date -u +%s) ))
(( left > 0 )) && sleep "$left"
t_end=$((t_window + 60))
in_window() { jq -c --arg u "$operator_user" --argjson a "$t_window" --argjson b "$t_end" '
  select(.stage == "ResponseComplete" and .user.username == $u and .objectRef.namespace == "e2e")
  | select((.stageTimestamp | sub("\\.[0-9]+Z$"; "Z") | fromdateiso8601) as $t | $t >= $a and $t < $b)' "$KUBE_AUDIT_LOG"; }
reconciles=$(in_window | jq -s '[.[] | select(.verb == "get" and .objectRef.resource == "statefulsets" and .objectRef.name == "live")] | length')
writes=$(in_window | jq -s '[.[] | select((.verb == "patch" or .verb == "update" or .verb == "create" or .verb == "delete")
  and (.objectRef.name == "live" or .objectRef.name == "live-query") and .objectRef.resource != "streamingqueries")] | length')
status_writes=$(in_window | jq -s '[.[] | select(.verb == "patch" and .objectRef.resource == "streamingqueries" and .objectRef.name == "live")] | length')
batches=$(field sq/live e2e '{.status.progress.batchId}')
echo "     sq/live over 60 s: $reconciles reconciles, $writes writes of its objects, $status_writes status writes; it is at batch $batches"
if (( reconciles >= 6 && reconciles <= 16 && writes == 0 && status_writes <= reconciles )); then
  ok "the status-write loop is gone: over 60 s sq/live was reconciled $reconciles times (polling every 5 s: ~12), not per batch (~60); none of its objects was written"
else
  fail "sq/live over 60 s: $reconciles reconciles (want about 12), $writes object writes (want 0), $status_writes status writes"
fi

# --- the leader is killed ------------------------------------------------------------------------
kill -KILL "${op_pid[$holder]}"
t0=$(date +%s.%N)
if wait_for "^$follower\$" 30 field lease/sluice-operator sluice-system '{.spec.holderIdentity}' >/dev/null \
   && wait_for '^1$' 10 leader_metric "$follower" >/dev/null; then
  took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")
  # client-go's rule: a follower takes over once it has seen the Lease
  # unchanged for its duration (15 s), looking every retry period (2 s): at
  # most 15 s + 2 s after the leader's last renewal, itself at most 2 s
  # before the kill; 1 s more for the requests and this script's polling.
  if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 20 else 1)" "$took"; then
    ok "the leader $holder was killed: $follower took the Lease over in ${took}s (Lease duration 15 s, retry period 2 s)"
  else
    fail "handover took ${took}s, more than the Lease's 15 s, two 2 s retry periods and 1 s"
  fi
  kubectl patch sq live -n e2e --type=merge -p '{"spec":{"suspend":true}}' >/dev/null
  check "the new leader reconciles: sq/live suspended" wait_for '^Suspended$' 30 field sq/live e2e '{.status.phase}'
else
  fail "no handover: Lease held by '$(field lease/sluice-operator sluice-system '{.spec.holderIdentity}')'"
fi

if (( failed )); then
  echo "-- operator logs (last 15 lines each), kubelet log"
  for f in "$work"/op-*.log "$work/kubelet.log"; do echo "----- $f"; tail -n 15 "$f"; done
fi
echo "kube-operator: $passed passed, $failed failed ($((SECONDS - t_start))s)"
exit $(( failed > 0 ))
