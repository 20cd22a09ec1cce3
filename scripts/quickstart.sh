#!/usr/bin/env bash
# The main job: builds `sluice` and runs a local example that needs nothing
# external. Usage: scripts/quickstart.sh [EXAMPLE.yaml] [sluice run options...]
# Default: examples/local/fraud-transactions.yaml (10 batches, then it stops).
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh
apt_install "${BUILD_PACKAGES[@]}"

example="${1:-examples/local/fraud-transactions.yaml}"
shift || true
cargo build --locked --bin sluice
"$CARGO_TARGET_DIR/debug/sluice" run "$example" "$@"
