#!/usr/bin/env bash
# The Helm chart, with the real Helm engine (helm-python-sdk bundles it as a
# library): it lints, its values are checked by values.schema.json, and it
# renders the CRD the Rust types generate (crds/streamingquery.yaml), or
# nothing when crds.enabled is false.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import helm_python' 2>/dev/null || {
  echo "helm: helm-python-sdk is not installed: pip install helm-python-sdk" >&2; exit 1; }
python3 - <<'PY'
import yaml
from helm_python.chart import Chart, lint

passed = failed = 0
def check(ok, what):
    global passed, failed
    print(("ok   " if ok else "FAIL ") + what)
    passed += ok
    failed += not ok

# Helm's severities: 1 info, 2 warning, 4 error.
result = lint("charts/sluice", strict=True)
problems = result["errors"] + [m for m in result["messages"] if m["severity"] >= 2]
check(result["total_charts_linted"] == 1 and not problems, f"helm lint --strict: {problems or 'no warnings or errors'}")

chart = Chart.load("charts/sluice")
rendered = chart.render(name="sluice", namespace="sluice-system", is_install=True)
crd = yaml.safe_load(rendered["sluice/templates/crd.yaml"])
generated = yaml.safe_load(open("crds/streamingquery.yaml"))
check(crd["kind"] == "CustomResourceDefinition" and crd["metadata"]["name"] == "streamingqueries.sluice.dev",
      "renders the StreamingQuery CRD")
check(crd["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep", "the CRD is kept on uninstall")
del crd["metadata"]["annotations"]
check(crd == generated, "the rendered CRD is the one the Rust types generate")

off = chart.render({"crds": {"enabled": False}}, name="sluice", namespace="sluice-system", is_install=True)
check(not off.get("sluice/templates/crd.yaml", "").strip(), "crds.enabled=false renders no CRD")

try:
    chart.render({"crds": {"enabld": True}}, name="sluice", namespace="sluice-system", is_install=True)
    check(False, "values.schema.json refuses an unknown key")
except Exception as e:
    check("enabld" in str(e) or "additional" in str(e).lower(), f"values.schema.json refuses an unknown key ({str(e)[:80]})")

print(f"helm: {passed} passed, {failed} failed")
raise SystemExit(1 if failed else 0)
PY
