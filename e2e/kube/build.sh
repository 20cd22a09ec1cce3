#!/usr/bin/env bash
# Builds a real Kubernetes control plane for the operator's end-to-end tests,
# from Go sources fetched through the Go module proxy:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes $KUBE_VERSION)
#   etcd                                                              (go.etcd.io/etcd/server/v3 $ETCD_VERSION)
#   kwok                                                              (sigs.k8s.io/kwok $KWOK_VERSION)
# into $SLUICE_CACHE/kube/$KUBE_VERSION/bin (default ~/.cache/sluice/kube/...),
# skipping every binary already there. Go's module cache and build cache live
# under $SLUICE_CACHE/kube/gopath and $SLUICE_CACHE/kube/go-build (outside the
# clone, shared by every clone and version; delete them to reclaim ~2-3 GB,
# the binaries stay).
#
# Usage: e2e/kube/build.sh [--force]    (--force rebuilds every binary)
#   KUBE_BUILD_CLEAN=1 deletes Go's module and build caches afterwards.
# Needs: Go >= 1.26 (PATH or /usr/local/go/bin), network access to the Go
# module proxy (GOPROXY, default https://proxy.golang.org). Nothing else.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$here/versions.sh"

force=0
[[ "${1:-}" == "--force" ]] && force=1

log() { printf '[kube-build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- Go toolchain -----------------------------------------------------------
if ! command -v go >/dev/null 2>&1; then
  [[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH" || die "Go not found (install Go >= 1.26)"
fi
gover="$(go env GOVERSION)"   # e.g. go1.26.8
gominor="$(sed -E 's/^go1\.([0-9]+).*/\1/' <<<"$gover")"
(( gominor >= 26 )) || die "$gover is too old: k8s.io/kubernetes $KUBE_VERSION needs go >= 1.26"

export GOPATH="$KUBE_CACHE/gopath"
export GOMODCACHE="$GOPATH/pkg/mod"
export GOCACHE="$KUBE_CACHE/go-build"
export GOTOOLCHAIN=local        # never download another toolchain
export GOFLAGS="-modcacherw -buildvcs=false -mod=mod"
export CGO_ENABLED=0            # static binaries, no C toolchain needed
export GO111MODULE=on

vdir="$KUBE_CACHE/$KUBE_VERSION"
bin="$vdir/bin"
src="$vdir/src"
times="$vdir/build-times.txt"
mkdir -p "$bin" "$src"

need() {  # need NAME... -> prints the names whose binary is missing
  local n
  for n in "$@"; do
    if (( force )) || [[ ! -x "$bin/$n" ]]; then echo "$n"; fi
  done
}

now() { date +%s; }
record() { echo "$(date -Is) $*" >>"$times"; log "$*"; }

moddl_size() { du -sm "$GOMODCACHE/cache/download" 2>/dev/null | cut -f1 || echo 0; }

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubectl -------
build_kube() {
  local -a names pkgs
  mapfile -t names < <(need kube-apiserver kube-controller-manager kube-scheduler kubectl)
  (( ${#names[@]} )) || { log "kubernetes binaries present in $bin"; return 0; }
  local n; for n in "${names[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$n"); done

  local m="$src/kubernetes"
  rm -rf "$m"; mkdir -p "$m"; cd "$m"
  local t0 s0; t0=$(now); s0=$(moddl_size)
  log "wrapper module for k8s.io/kubernetes $KUBE_VERSION in $m"
  go mod init local/kbuild >/dev/null 2>&1
  go mod edit -require="k8s.io/kubernetes@$KUBE_VERSION"
  # k8s.io/kubernetes's go.mod replaces its staging modules with ./staging
  # paths, which `go install` refuses and a dependent module cannot see:
  # point each one at its published tag (k8s.io/<m> v0.<minor>.<patch>).
  local gomod dl
  if ! dl="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" 2>&1)"; then
    die "could not download k8s.io/kubernetes@$KUBE_VERSION: $(sed -n 's/^[[:space:]]*"Error": //p' <<<"$dl")"
  fi
  gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' <<<"$dl")"
  [[ -f "$gomod" ]] || die "no go.mod for k8s.io/kubernetes@$KUBE_VERSION in: $dl"
  local stagever="v0.${KUBE_VERSION#v1.}"
  local staged
  staged="$(sed -nE 's#^[[:space:]]*(k8s\.io/[A-Za-z0-9._-]+) => \./staging/.*#\1#p' "$gomod")"
  [[ -n "$staged" ]] || die "no staging replace lines in $gomod"
  for s in $staged; do
    # only modules k8s.io/kubernetes requires (sample-cli-plugin is never published)
    if grep -qE "^[[:space:]]+$s v0\.0\.0([[:space:]]|$)" "$gomod"; then
      go mod edit -replace="$s=$s@$stagever"
    fi
  done
  log "resolving and downloading modules for ${names[*]}"
  go list -deps "${pkgs[@]}" >/dev/null
  record "kubernetes $KUBE_VERSION: module download $(( $(now) - t0 ))s, +$(( $(moddl_size) - s0 )) MB in $GOMODCACHE/cache/download"

  t0=$(now)
  local ver="$KUBE_VERSION" minor
  minor="$(cut -d. -f2 <<<"$KUBE_VERSION")"
  local ld="-s -w"
  ld+=" -X k8s.io/component-base/version.gitVersion=$ver"
  ld+=" -X k8s.io/component-base/version.gitMajor=1"
  ld+=" -X k8s.io/component-base/version.gitMinor=$minor"
  ld+=" -X k8s.io/component-base/version.gitTreeState=clean"
  ld+=" -X k8s.io/component-base/version.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  ld+=" -X k8s.io/client-go/pkg/version.gitVersion=$ver"
  ld+=" -X k8s.io/client-go/pkg/version.gitMajor=1"
  ld+=" -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  local out="$m/out"; mkdir -p "$out"
  log "building ${names[*]} (slow: ~30+ min on 2 busy cores with an empty build cache)"
  go build -trimpath -ldflags "$ld" -o "$out/" "${pkgs[@]}"
  for n in "${names[@]}"; do mv -f "$out/$n" "$bin/$n"; done
  record "kubernetes $KUBE_VERSION: built ${names[*]} in $(( $(now) - t0 ))s"
}

# --- etcd -------------------------------------------------------------------
build_etcd() {
  [[ -n "$(need etcd)" ]] || { log "etcd present in $bin"; return 0; }
  local m="$src/etcd"
  rm -rf "$m"; mkdir -p "$m"; cd "$m"
  local t0 s0; t0=$(now); s0=$(moddl_size)
  go mod init local/etcdbuild >/dev/null 2>&1
  go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go list -deps go.etcd.io/etcd/server/v3 >/dev/null
  record "etcd $ETCD_VERSION: module download $(( $(now) - t0 ))s, +$(( $(moddl_size) - s0 )) MB"
  t0=$(now)
  go build -trimpath -ldflags "-s -w" -o "$m/etcd" go.etcd.io/etcd/server/v3
  mv -f "$m/etcd" "$bin/etcd"
  record "etcd $ETCD_VERSION: built in $(( $(now) - t0 ))s"
}

# --- kwok -------------------------------------------------------------------
build_kwok() {
  [[ -n "$(need kwok)" ]] || { kwok_stages; log "kwok present in $bin"; return 0; }
  local m="$src/kwok"
  rm -rf "$m"; mkdir -p "$m"; cd "$m"
  local t0 s0; t0=$(now); s0=$(moddl_size)
  go mod init local/kwokbuild >/dev/null 2>&1
  go mod edit -require="sigs.k8s.io/kwok@$KWOK_VERSION"
  go list -deps sigs.k8s.io/kwok/cmd/kwok >/dev/null
  record "kwok $KWOK_VERSION: module download $(( $(now) - t0 ))s, +$(( $(moddl_size) - s0 )) MB"
  t0=$(now)
  go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    -o "$m/kwok" sigs.k8s.io/kwok/cmd/kwok
  mv -f "$m/kwok" "$bin/kwok"
  record "kwok $KWOK_VERSION: built in $(( $(now) - t0 ))s"
  kwok_stages
}

# The standalone kwok binary has no built-in stages ("no stages found"; only
# kwokctl adds defaults): take the ones kwokctl uses by default from kwok's
# module source, node-initialize + node-heartbeat-with-lease + pod-ready,
# pod-complete, pod-delete ("fast" stages), into $bin/kwok-stages.yaml.
kwok_stages() {
  local out="$bin/kwok-stages.yaml"
  (( force )) || [[ ! -s "$out" ]] || return 0
  local d="$GOMODCACHE/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
  if [[ ! -d "$d" ]]; then
    (cd "$src/kwok" 2>/dev/null || { mkdir -p "$src/kwok" && cd "$src/kwok" && go mod init local/kwokbuild >/dev/null 2>&1; }
     go mod download "sigs.k8s.io/kwok@$KWOK_VERSION")
  fi
  local f first=1
  {
    echo "# kwok $KWOK_VERSION stages (from sigs.k8s.io/kwok/kustomize/stage), written by e2e/kube/build.sh"
    for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
             pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      [[ -f "$d/$f" ]] || die "missing $d/$f"
      (( first )) || echo "---"
      first=0
      cat "$d/$f"
    done
  } >"$out.tmp"
  mv -f "$out.tmp" "$out"
  log "kwok stages in $out"
}

T0=$(now)
log "Go $gover; GOMODCACHE=$GOMODCACHE GOCACHE=$GOCACHE"
build_etcd
build_kube
build_kwok
log "binaries ready in $bin ($(( $(now) - T0 ))s)"
if [[ "${KUBE_BUILD_CLEAN:-0}" == 1 ]]; then
  # the binaries are all the tests need: drop Go's caches (~1 GB of modules,
  # ~4.5 GB of build cache); a later build downloads and compiles again
  go clean -cache -modcache
  rm -rf "$src"
  log "removed $GOMODCACHE, $GOCACHE and $src (KUBE_BUILD_CLEAN=1)"
fi
