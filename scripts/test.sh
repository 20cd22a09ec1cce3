#!/usr/bin/env bash
# Every test: formatting, lints, unit and integration tests of every crate,
# then the end-to-end checks against the real `sluice` binary.
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh
apt_install "${BUILD_PACKAGES[@]}" curl prometheus lua5.4
rustup_components rustfmt clippy
# An S3-compatible server for the checkpoint tests (e2e/s3-crash.sh).
python3 -c 'import moto, boto3' 2>/dev/null || python3 -m pip install -q "moto[server]"
# Helm as a library, for the chart's lint and render tests (e2e/helm.sh);
# jsonschema, for the examples against the CRD's schema (e2e/manifests.sh).
python3 -c 'import helm_python, yaml, jsonschema' 2>/dev/null || python3 -m pip install -q helm-python-sdk pyyaml jsonschema

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --workspace
echo "== e2e"
for test in e2e/*.sh; do
  echo "-- $test"
  bash "$test"
done
