#!/usr/bin/env bash
# The Argo CD health check of StreamingQuery (charts/sluice/argocd/health.lua),
# run under a real Lua interpreter on sample objects covering each rule:
# e2e/argocd-health/test.lua loads the script with `obj` set, as Argo CD does,
# and checks the status and message it returns. Needs the Debian package
# lua5.4; installs nothing. The last line is
# "argocd-health: P passed, F failed"; exits non-zero if any case failed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v lua5.4 >/dev/null 2>&1; then
  echo "argocd-health: lua5.4 not found; install it with: apt-get install lua5.4" >&2
  exit 1
fi

exec lua5.4 e2e/argocd-health/test.lua charts/sluice/argocd/health.lua
