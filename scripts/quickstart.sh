#!/usr/bin/env bash
# The main job: builds `sluice` and runs a local example that needs nothing
# external. Usage: scripts/quickstart.sh [EXAMPLE.yaml] [sluice run options...]
# Default: examples/local/fraud-transactions.yaml (10 batches, then it stops).
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh
apt_install "${BUILD_PACKAGES[@]}"

example="${1:-examples/local/fraud-transactions.yaml}"
shift || true
# The binaries are built as `cargo test --workspace` builds them (the test
# suite's feature set), so that scripts/test.sh afterwards reuses this build
# instead of building DataFusion a second time.
cargo test --workspace --locked --no-run
"$CARGO_TARGET_DIR/debug/sluice" run "$example" "$@"
