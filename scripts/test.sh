#!/usr/bin/env bash
# Runs every check and test: formatting, clippy (warnings are errors), then the whole
# workspace's tests in release mode (the end-to-end tests drive a real perchd binary with
# example components built from source).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/perch/target}"

cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
# The end-to-end tests start the perchd binary, so build it before running them.
cargo build --release --workspace --bins
# The hardware-in-the-loop tests boot a firmware image with a static perchd for the board.
PERCH_HIL_PERCHD="$(scripts/cross-build.sh x86_64-unknown-linux-musl)"
export PERCH_HIL_PERCHD
cargo test --release --workspace "$@"
