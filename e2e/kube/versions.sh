# Versions of the test cluster's components, sourced by build.sh and lib.sh.
# Kubernetes: the newest minor that k8s-openapi 0.29's `latest` feature knows
# (v1_37), at its newest patch that the Go module proxy serves: v1.37.2 is
# tagged, but proxy.golang.org answers 403 "This module version is not
# available" for k8s.io/kubernetes@v1.37.2's zip (its go.mod is identical to
# v1.37.1's). The staging modules (k8s.io/api, ...) are used at the matching
# v0.37.1. etcd: the version k8s.io/kubernetes v1.37.x's go.mod requires.
# kwok: the newest release.
: "${KUBE_VERSION:=v1.37.1}"
: "${ETCD_VERSION:=v3.7.0}"
: "${KWOK_VERSION:=v0.8.0}"
: "${SLUICE_CACHE:=$HOME/.cache/sluice}"
KUBE_CACHE="$SLUICE_CACHE/kube"
KUBE_BIN="$KUBE_CACHE/$KUBE_VERSION/bin"
