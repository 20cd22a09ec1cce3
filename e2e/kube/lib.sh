# shellcheck shell=bash
# A real Kubernetes control plane on 127.0.0.1 for end-to-end tests, without
# containers: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
# and kwok (simulated nodes and pod lifecycles: no kubelet, no container runs;
# pods are scheduled onto a fake node and reported Running). Binaries come
# from e2e/kube/build.sh ($SLUICE_CACHE/kube/$KUBE_VERSION/bin).
#
#   . e2e/kube/lib.sh
#   trap kube_stop EXIT            # kube_start sets no trap of its own
#   kube_start "$(mktemp -d)"      # exports KUBECONFIG, KUBE_DIR, ...; kubectl in PATH
#   kubectl apply --server-side -f crds/streamingquery.yaml
#   ...
#   kube_audit_writes 'system:serviceaccount:ns:sluice-operator'
#
# Functions:
#   kube_start DIR      generate certs/keys, start everything, wait until ready
#                       (node Ready, default ServiceAccount present); DIR holds
#                       the data, logs (*.log), audit.log, pids, kubeconfig.
#   kube_stop [DIR]     stop every process kube_start started (DIR defaults to
#                       $KUBE_DIR; works from another shell with DIR).
#   kube_logs [N]       print the last N (default 30) lines of every log.
#   kube_add_node NAME  create another kwok-managed fake node.
#   kube_sa_kubeconfig NS SA OUT [DURATION]
#                       write a kubeconfig authenticating as ServiceAccount
#                       NS/SA (a TokenRequest token; RBAC applies to it).
#   kube_wait_sa NS [SA] [TIMEOUT]
#                       wait for the ServiceAccount (default "default") that
#                       the controller-manager creates in a new namespace.
#   kube_audit_writes [USER] [RESOURCE] [CODES]
#                       count completed write requests (create, update,
#                       patch, delete, deletecollection) in the audit log,
#                       by user (exact username; "" for anyone), resource
#                       (plural, e.g. statefulsets; "" for any) and response
#                       code class: "all" (default: refused and failed
#                       requests count too) or "2xx" (successful only).
#   kube_audit_events [USER]
#                       print the audit log's ResponseComplete events as TSV:
#                       verb, resource, subresource, namespace, name, code, user.
#
# Exported by kube_start: KUBECONFIG KUBE_DIR KUBE_API_URL KUBE_CA_FILE
#   KUBE_ADMIN_TOKEN (static token of user "admin" in system:masters; the
#   kubeconfig itself uses a client certificate, CN=admin O=system:masters)
#   KUBE_AUDIT_LOG KUBE_BIN; PATH gains $KUBE_BIN first (so `kubectl` is the
#   built v1.37 one, not Debian's 1.20).
#
# Settings (environment): KUBE_VERSION etc. (versions.sh); KUBE_NODES (fake
#   nodes to create, default 1; 0 for none); KUBE_START_TIMEOUT (seconds,
#   default 180); KUBE_NO_KWOK=1 (no kwok: pods stay Pending);
#   KUBE_AUTO_BUILD=1 (run build.sh when binaries are missing, default: fail);
#   KUBE_KWOK_STAGES (kwok's stages file, default $KUBE_BIN/kwok-stages.yaml:
#   pods become Running, pods of Jobs complete at once); KUBE_POD_CIDR (the
#   pods' IPs, default 10.244.0.0/16; a 127.x range makes them loopback
#   addresses a process on this machine can listen on).
#
# Everything listens on 127.0.0.1 only, on free ports picked at start.
# Needs: bash, openssl, curl, jq, python3 (free ports), base64.
# Certificates: one EC P-256 CA (pki/ca.crt) signs the API server's serving
# certificate (SANs 127.0.0.1, localhost, kubernetes.default.svc...) and the
# admin client certificate; the kubeconfig embeds them (no insecure-skip).

_kube_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$_kube_here/versions.sh"

_kube_log() { printf '[kube %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

_kube_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# kube_logs [N] [DIR]
kube_logs() {
  local n="${1:-30}" dir="${2:-${KUBE_DIR:-}}" f
  [[ -n "$dir" ]] || return 0
  for f in "$dir"/logs/*.log; do
    [[ -f "$f" ]] || continue
    echo "----- last $n lines of $f" >&2
    tail -n "$n" "$f" >&2
  done
}

# _kube_fail MESSAGE: print MESSAGE and the log tails, stop everything, return 1
_kube_fail() {
  _kube_log "ERROR: $*"
  kube_logs 30 "$KUBE_DIR"
  kube_stop "$KUBE_DIR"
  return 1
}

# _kube_spawn NAME CMD...: start CMD in the background,
# logging to $KUBE_DIR/logs/NAME.log, pid recorded in $KUBE_DIR/pids
_kube_spawn() {
  local name="$1"; shift
  "$@" >"$KUBE_DIR/logs/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$name $pid" >>"$KUBE_DIR/pids"
  eval "_KUBE_PID_${name//-/_}=$pid"
}

_kube_alive() {  # _kube_alive NAME -> 0 if the process is still running
  local v="_KUBE_PID_${1//-/_}"
  kill -0 "${!v}" 2>/dev/null
}

# _kube_wait WHAT TIMEOUT PROCNAME CMD...: retry CMD every 0.5 s until it
# succeeds; fail early if PROCNAME died
_kube_wait() {
  local what="$1" timeout="$2" proc="$3"; shift 3
  local deadline=$(( SECONDS + timeout ))
  until "$@" >/dev/null 2>&1; do
    if [[ -n "$proc" ]] && ! _kube_alive "$proc"; then
      _kube_fail "$proc exited while waiting for $what (see $KUBE_DIR/logs/$proc.log)"
      return 1
    fi
    if (( SECONDS >= deadline )); then
      _kube_fail "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

_kube_gen_pki() {
  local pki="$1"
  mkdir -p "$pki"
  (
    set -e
    cd "$pki"
    # cluster CA: signs the serving cert and client certs; the root CA the
    # controller-manager publishes (kube-root-ca.crt) and CSRs are signed with
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout ca.key -out ca.crt -days 3650 -subj "/CN=sluice-e2e-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
    # API server serving cert: 127.0.0.1 / localhost, and the in-cluster names
    cat >apiserver.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out apiserver.crt -days 3650 -extfile apiserver.ext 2>/dev/null
    # admin client cert: O=system:masters (cluster-admin through RBAC's bootstrap binding)
    cat >client.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
    # service-account token signing key pair
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
    # static token for "admin" (curl-friendly; Authorization: Bearer)
    openssl rand -hex 24 >admin.token
    printf '%s,admin,admin,"system:masters"\n' "$(cat admin.token)" >tokens.csv
    rm -f ./*.csr ./*.ext ./*.srl
    chmod 600 ./*.key admin.token tokens.csv
  )
}

_kube_write_kubeconfig() {  # _kube_write_kubeconfig FILE
  local b64="base64 -w0"
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sluice-e2e
  cluster:
    server: $KUBE_API_URL
    certificate-authority-data: $($b64 <"$KUBE_DIR/pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $($b64 <"$KUBE_DIR/pki/admin.crt")
    client-key-data: $($b64 <"$KUBE_DIR/pki/admin.key")
contexts:
- name: sluice-e2e
  context:
    cluster: sluice-e2e
    user: admin
    namespace: default
current-context: sluice-e2e
EOF
  chmod 600 "$1"
}

# kube_start DIR
kube_start() {
  local dir="${1:?usage: kube_start DIR}"
  local timeout="${KUBE_START_TIMEOUT:-180}"
  local t0=$SECONDS
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [[ -s "$dir/pids" ]]; then
    _kube_log "ERROR: $dir/pids exists: a cluster may be running from $dir (kube_stop $dir)"
    return 1
  fi
  export KUBE_DIR="$dir"
  export KUBE_BIN

  local b missing=()
  local -a want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
  [[ "${KUBE_NO_KWOK:-0}" == 1 ]] || want+=(kwok kwok-stages.yaml)
  for b in "${want[@]}"; do [[ -s "$KUBE_BIN/$b" ]] || missing+=("$b"); done
  if (( ${#missing[@]} )); then
    if [[ "${KUBE_AUTO_BUILD:-0}" == 1 ]]; then
      "$_kube_here/build.sh" || return 1
    else
      _kube_log "ERROR: missing ${missing[*]} in $KUBE_BIN: run e2e/kube/build.sh (or set KUBE_AUTO_BUILD=1)"
      return 1
    fi
  fi
  case ":$PATH:" in *":$KUBE_BIN:"*) ;; *) export PATH="$KUBE_BIN:$PATH" ;; esac

  # a fresh cluster every time: drop what an earlier kube_start left in DIR
  rm -rf "$dir/etcd" "$dir/pki" "$dir/logs" "$dir/apiserver-certs" "$dir/kcm-certs" \
    "$dir/scheduler-certs" "$dir/kwok-home" "$dir/audit.log" "$dir/kubeconfig"
  mkdir -p "$dir/logs"
  mkdir -m 700 "$dir/etcd"
  : >"$dir/pids"
  _kube_gen_pki "$dir/pki" || { _kube_log "ERROR: openssl failed"; return 1; }
  export KUBE_CA_FILE="$dir/pki/ca.crt"
  KUBE_ADMIN_TOKEN="$(cat "$dir/pki/admin.token")"; export KUBE_ADMIN_TOKEN
  export KUBE_AUDIT_LOG="$dir/audit.log"

  cat >"$dir/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
# one event per request, when its response is complete; who, what, verb,
# response code; no bodies
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
- level: Metadata
EOF

  local p_etcd p_peer p_api p_kcm p_sched p_kwok
  p_etcd=$(_kube_free_port); p_peer=$(_kube_free_port); p_api=$(_kube_free_port)
  p_kcm=$(_kube_free_port); p_sched=$(_kube_free_port); p_kwok=$(_kube_free_port)
  export KUBE_API_URL="https://127.0.0.1:$p_api"
  export KUBE_ETCD_URL="http://127.0.0.1:$p_etcd"

  # --- etcd ---
  _kube_spawn etcd "$KUBE_BIN/etcd" --name sluice-e2e --data-dir "$dir/etcd" \
    --listen-client-urls "$KUBE_ETCD_URL" --advertise-client-urls "$KUBE_ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:$p_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$p_peer" \
    --initial-cluster "sluice-e2e=http://127.0.0.1:$p_peer" \
    --unsafe-no-fsync --log-level warn
  _kube_wait "etcd ($KUBE_ETCD_URL/health)" "$timeout" etcd \
    curl -fsS --max-time 2 "$KUBE_ETCD_URL/health" || return 1

  # --- kube-apiserver ---
  local pki="$dir/pki"
  _kube_spawn kube-apiserver "$KUBE_BIN/kube-apiserver" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$p_api" \
    --etcd-servers="$KUBE_ETCD_URL" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --cert-dir="$dir/apiserver-certs" \
    --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" \
    --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=RBAC \
    --service-cluster-ip-range=10.96.0.0/16 \
    --endpoint-reconciler-type=none \
    --allow-privileged=true \
    --audit-policy-file="$dir/audit-policy.yaml" --audit-log-path="$KUBE_AUDIT_LOG" \
    --audit-log-mode=blocking --audit-log-maxsize=0 \
    --profiling=false
  _kube_wait "kube-apiserver ($KUBE_API_URL/readyz)" "$timeout" kube-apiserver \
    curl -fsS --max-time 3 --cacert "$pki/ca.crt" -H "Authorization: Bearer $KUBE_ADMIN_TOKEN" \
    "$KUBE_API_URL/readyz" || return 1

  export KUBECONFIG="$dir/kubeconfig"
  _kube_write_kubeconfig "$KUBECONFIG"

  # --- kube-controller-manager (statefulset, job, garbage collector,
  # namespace, serviceaccount, ... every default controller) ---
  _kube_spawn kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig="$KUBECONFIG" \
    --authentication-kubeconfig="$KUBECONFIG" --authorization-kubeconfig="$KUBECONFIG" \
    --bind-address=127.0.0.1 --secure-port="$p_kcm" \
    --cert-dir="$dir/kcm-certs" \
    --leader-elect=false \
    --controllers='*' \
    --service-account-private-key-file="$pki/sa.key" \
    --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --use-service-account-credentials=false
  # --- kube-scheduler ---
  _kube_spawn kube-scheduler "$KUBE_BIN/kube-scheduler" \
    --kubeconfig="$KUBECONFIG" \
    --authentication-kubeconfig="$KUBECONFIG" --authorization-kubeconfig="$KUBECONFIG" \
    --bind-address=127.0.0.1 --secure-port="$p_sched" \
    --cert-dir="$dir/scheduler-certs" \
    --leader-elect=false
  # --- kwok: fake nodes and pod lifecycles (its default "fast" stages) ---
  if [[ "${KUBE_NO_KWOK:-0}" != 1 ]]; then
    # HOME: kwok also loads ~/.kwok/kwok.yaml when it exists; not here
    mkdir -p "$dir/kwok-home"
    _kube_spawn kwok env HOME="$dir/kwok-home" "$KUBE_BIN/kwok" \
      --config="${KUBE_KWOK_STAGES:-$KUBE_BIN/kwok-stages.yaml}" \
      --kubeconfig="$KUBECONFIG" \
      --manage-all-nodes=false \
      --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
      --manage-nodes-with-label-selector= \
      --cidr="${KUBE_POD_CIDR:-10.244.0.0/16}" --node-ip=127.0.0.1 \
      --node-lease-duration-seconds=40 \
      --server-address="127.0.0.1:$p_kwok"
  fi

  local hz=(curl -fsS --max-time 3 -k)
  _kube_wait "kube-controller-manager (https://127.0.0.1:$p_kcm/healthz)" "$timeout" \
    kube-controller-manager "${hz[@]}" "https://127.0.0.1:$p_kcm/healthz" || return 1
  _kube_wait "kube-scheduler (https://127.0.0.1:$p_sched/healthz)" "$timeout" \
    kube-scheduler "${hz[@]}" "https://127.0.0.1:$p_sched/healthz" || return 1
  # the ServiceAccount controller is up once "default" has its ServiceAccount
  _kube_wait "ServiceAccount default/default" "$timeout" kube-controller-manager \
    "$KUBE_BIN/kubectl" get serviceaccount default -n default || return 1

  local i n="${KUBE_NODES:-1}"
  if [[ "${KUBE_NO_KWOK:-0}" != 1 ]]; then
    for (( i = 0; i < n; i++ )); do kube_add_node "kwok-node-$i" || return 1; done
  fi
  _kube_log "Kubernetes $KUBE_VERSION up in $(( SECONDS - t0 ))s: $KUBE_API_URL, KUBECONFIG=$KUBECONFIG, logs in $dir/logs"
}

# kube_add_node NAME: a Node that kwok manages (annotation kwok.x-k8s.io/node=fake);
# waits until it is Ready
kube_add_node() {
  local name="${1:?usage: kube_add_node NAME}"
  "$KUBE_BIN/kubectl" apply -f - >/dev/null <<EOF || { _kube_fail "could not create node $name"; return 1; }
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: $name
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kubernetes.io/role: agent
    node-role.kubernetes.io/agent: ""
    type: kwok
EOF
  _kube_wait "node $name Ready" "${KUBE_START_TIMEOUT:-180}" kwok \
    "$KUBE_BIN/kubectl" wait --for=condition=Ready "node/$name" --timeout=5s || return 1
}

# kube_stop [DIR]
kube_stop() {
  local dir="${1:-${KUBE_DIR:-}}"
  [[ -n "$dir" && -f "$dir/pids" ]] || return 0
  local name pid pids=()
  # stop in reverse start order: kwok, scheduler, controller-manager, apiserver, etcd
  while read -r name pid; do pids=("$pid" "${pids[@]}"); done <"$dir/pids"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$(( SECONDS + 15 ))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # reap our own children (no "Killed" noise later)
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -f "$dir/pids"
}

# kube_wait_sa NS [SA] [TIMEOUT]
kube_wait_sa() {
  local ns="${1:?usage: kube_wait_sa NS [SA] [TIMEOUT]}" sa="${2:-default}" t="${3:-60}"
  local deadline=$(( SECONDS + t ))
  until "$KUBE_BIN/kubectl" get serviceaccount "$sa" -n "$ns" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { _kube_log "ServiceAccount $ns/$sa did not appear in ${t}s"; return 1; }
    sleep 0.5
  done
}

# kube_sa_kubeconfig NS SA OUT [DURATION]
kube_sa_kubeconfig() {
  local ns="${1:?}" sa="${2:?}" out="${3:?usage: kube_sa_kubeconfig NS SA OUT [DURATION]}" dur="${4:-24h}"
  local token
  token="$("$KUBE_BIN/kubectl" create token "$sa" -n "$ns" --duration="$dur")" || return 1
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sluice-e2e
  cluster:
    server: $KUBE_API_URL
    certificate-authority-data: $(base64 -w0 <"$KUBE_CA_FILE")
users:
- name: $ns-$sa
  user:
    token: $token
contexts:
- name: $ns-$sa
  context: {cluster: sluice-e2e, user: $ns-$sa, namespace: $ns}
current-context: $ns-$sa
EOF
  chmod 600 "$out"
}

# kube_audit_events [USER]: TSV of completed requests
kube_audit_events() {
  local user="${1:-}"
  [[ -f "${KUBE_AUDIT_LOG:-}" ]] || return 0
  jq -r --arg u "$user" '
    select(.stage == "ResponseComplete")
    | select($u == "" or .user.username == $u)
    | [.verb, (.objectRef.resource // "-"), (.objectRef.subresource // "-"),
       (.objectRef.namespace // "-"), (.objectRef.name // "-"),
       (.responseStatus.code // 0 | tostring), .user.username] | @tsv' "$KUBE_AUDIT_LOG"
}

# kube_audit_writes [USER] [RESOURCE] [all|2xx]: number of completed write requests
kube_audit_writes() {
  local user="${1:-}" res="${2:-}" codes="${3:-all}"
  [[ -f "${KUBE_AUDIT_LOG:-}" ]] || { echo 0; return 0; }
  jq -c --arg u "$user" --arg r "$res" --arg c "$codes" '
    select(.stage == "ResponseComplete")
    | select(.verb == "create" or .verb == "update" or .verb == "patch"
             or .verb == "delete" or .verb == "deletecollection")
    | select($u == "" or .user.username == $u)
    | select($r == "" or .objectRef.resource == $r)
    | select($c != "2xx" or ((.responseStatus.code // 0) >= 200 and (.responseStatus.code // 0) < 300))' "$KUBE_AUDIT_LOG" | wc -l
}
