#!/usr/bin/env bash
# The Argo CD customizations of StreamingQuery, run under a real Lua
# interpreter on sample objects covering each rule:
# - the health check (charts/sluice/argocd/health.lua): e2e/argocd-health/
#   test.lua loads the script with `obj` set, as Argo CD does, and checks the
#   status and message it returns; last line "argocd-health: P passed, F failed";
# - the resource actions suspend, resume and restart
#   (charts/sluice/argocd/actions/): e2e/argocd-health/actions.lua runs the
#   discovery script and each action on sample objects and checks what they
#   offer and change; last line "argocd-actions: P passed, F failed".
# Needs the Debian package lua5.4; installs nothing. Exits non-zero if any
# case failed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v lua5.4 >/dev/null 2>&1; then
  echo "argocd-health: lua5.4 not found; install it with: apt-get install lua5.4" >&2
  exit 1
fi

status=0
lua5.4 e2e/argocd-health/test.lua charts/sluice/argocd/health.lua || status=1
lua5.4 e2e/argocd-health/actions.lua charts/sluice/argocd/actions || status=1
exit "$status"
