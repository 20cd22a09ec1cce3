#!/usr/bin/env bash
# The autoscaler's decisions on simulated load (steady, ramp, spike, drop to
# zero, one slow replica, a partition-count cap): for each trace, a Markdown
# table of input rate, lag, replicas and each decision with its reason, every
# two minutes and at every change. The simulation and the properties its
# tests check are in operator/src/autoscaler/simulation.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
cargo run --locked --quiet --example autoscaler_traces
