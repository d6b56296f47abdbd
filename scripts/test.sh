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
# The hardware-in-the-loop tests boot the aarch64 firmware image (QEMU virt through U-Boot)
# with a static perchd cross-built for it; scripts/hil.sh runs them on every board.
PERCH_HIL_BOARD="${PERCH_HIL_BOARD:-qemu-aarch64-virt}"
PERCH_HIL_PERCHD="$(scripts/cross-build.sh aarch64-unknown-linux-musl)"
export PERCH_HIL_BOARD PERCH_HIL_PERCHD
scripts/size-gate.sh aarch64-unknown-linux-musl "$PERCH_HIL_PERCHD"
cargo test --release --workspace "$@"
