#!/usr/bin/env bash
# The example manifests against the CRD's own schema, as the API server would
# check them on `kubectl apply`: the openAPIV3Schema of crds/streamingquery.yaml
# (its spec part), read as JSON Schema by Python's jsonschema.
# - every examples/kubernetes/*.yaml and examples/local/*.yaml passes;
# - every examples/invalid/*.yaml passes too (their mistakes are for the
#   operator's validation to report), except kubernetes-rejected.yaml, which
#   fails at exactly the fields its comment names;
# - with the `sluice` binary built (it builds nothing), each invalid example's
#   comment shows every problem `sluice validate` prints for it.
#
# Read as the API server reads the schema: `nullable: true` allows null;
# x-kubernetes-int-or-string allows an integer or a string; an object with
# declared properties takes no other field (unless
# x-kubernetes-preserve-unknown-fields), as kubectl's default strict field
# validation refuses unknown fields. NB: CEL rules (x-kubernetes-validations)
# are not evaluated by this check; a rule added to the CRD is checked only by
# a real API server (e2e/cluster.sh). The last line is
# "manifests: P passed, F failed".
set -euo pipefail
cd "$(dirname "$0")/.."
sluice="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}/debug/sluice"
python3 -c 'import jsonschema, yaml' 2>/dev/null || {
  echo "manifests: needs Python's jsonschema and pyyaml: pip install jsonschema pyyaml" >&2; exit 1; }

SLUICE_BIN="$sluice" python3 - <<'PY'
import glob
import os
import subprocess

import jsonschema
import yaml

passed = failed = 0
def check(ok, what):
    global passed, failed
    print(("ok   " if ok else "FAIL ") + what)
    passed += bool(ok)
    failed += not ok

# The files the CRD's schema must refuse, and the fields it must refuse them at.
REJECTED = {"examples/invalid/kubernetes-rejected.yaml": {"spec.outputMode", "spec.statePartitions"}}

def to_json_schema(node):
    """An OpenAPI v3 structural schema node as JSON Schema, the API server's way."""
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(prop) for name, prop in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(s) for s in value]
        elif key == "nullable" or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out = {"allOf": [out, {"type": ["integer", "string"]}]} if out.get("anyOf") else {**out, "type": ["integer", "string"]}
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = out["enum"] + [None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out

crd = yaml.safe_load(open("crds/streamingquery.yaml"))
[version] = [v for v in crd["spec"]["versions"] if v["storage"]]
api_version = f'{crd["spec"]["group"]}/{version["name"]}'
kind = crd["spec"]["names"]["kind"]
spec_schema = to_json_schema(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
jsonschema.Draft202012Validator.check_schema(spec_schema)
validator = jsonschema.Draft202012Validator(spec_schema)

def field(error):
    return "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)

def problems(doc):
    """(field, message) for each place the CRD's schema refuses, sorted."""
    found = []
    if doc.get("apiVersion") != api_version or doc.get("kind") != kind:
        found.append(("", f"apiVersion/kind are {doc.get('apiVersion')}/{doc.get('kind')}, not {api_version}/{kind}"))
    if not (doc.get("metadata") or {}).get("name"):
        found.append(("metadata.name", "is missing"))
    found += [(field(e), e.message) for e in validator.iter_errors(doc.get("spec"))]
    return sorted(found)

# The reading of the schema itself, on small specs: a misspelt field, a null
# where the CRD says nullable, a quantity as integer or string, an unknown enum.
base = {"sources": [{"name": "t", "generator": {"kind": "rate", "rowsPerSecond": 1}}], "query": "SELECT * FROM t", "sink": {"console": {}}}
doc = lambda **spec: {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}, "spec": {**base, **spec}}
check(not problems(doc()), "the schema accepts a minimal spec")
check([f for f, _ in problems(doc(sink={"consle": {}}))] == ["spec.sink"], "the schema refuses a misspelt field (spec.sink.consle)")
check(not problems(doc(checkpoint=None, trigger=None)), "the schema takes null where the CRD says nullable")
check(not problems(doc(engine={"stateVolume": {"size": "20Gi"}})) and not problems(doc(engine={"stateVolume": {"size": 1000}})),
      "the schema takes a quantity as a string or an integer")
check([f for f, _ in problems(doc(outputMode="upsert"))] == ["spec.outputMode"], "the schema refuses an output mode it does not list")

files = sorted(glob.glob("examples/kubernetes/*.yaml")) + sorted(glob.glob("examples/local/*.yaml"))
check(any(f.startswith("examples/kubernetes/") for f in files), "there are Kubernetes examples")
for path in files + sorted(glob.glob("examples/invalid/*.yaml")):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    found = [p for d in docs for p in problems(d)]
    if path in REJECTED:
        fields = {f for f, _ in found}
        check(fields == REJECTED[path], f"{path}: the CRD's schema refuses it at {', '.join(sorted(fields)) or 'nothing'}"
              + ("" if fields == REJECTED[path] else f" (expected {', '.join(sorted(REJECTED[path]))})"))
    else:
        check(len(docs) == 1 and not found, f"{path}: a StreamingQuery the CRD's schema accepts"
              + "".join(f"\n       {f}: {m}" for f, m in found))
for path in REJECTED:
    check(os.path.exists(path), f"{path} exists")

# What `sluice validate` prints for each invalid example is in its comment.
sluice = os.environ["SLUICE_BIN"]
if os.access(sluice, os.X_OK):
    for path in sorted(glob.glob("examples/invalid/*.yaml")):
        run = subprocess.run([sluice, "validate", path], capture_output=True, text=True)
        printed = [line.strip() for line in (run.stdout + run.stderr).splitlines()
                   if line.startswith("  ") and line.strip()]
        comment = "\n".join(line for line in open(path) if line.startswith("#"))
        missing = [line for line in printed if line not in comment]
        check(run.returncode == 1 and printed and not missing,
              f"{path}: its comment shows the {len(printed)} problem(s) `sluice validate` prints"
              + "".join(f"\n       not in the comment: {line}" for line in missing))
else:
    print(f"manifests: {sluice} is not built: the comments of examples/invalid were not compared with `sluice validate`")

print(f"manifests: {passed} passed, {failed} failed")
raise SystemExit(1 if failed else 0)
PY
