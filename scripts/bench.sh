#!/usr/bin/env bash
# Runs the benchmark table of docs/performance.md. Installs the load generator (wrk) and
# wasmtime-cli 48.0.8 (for the `wasmtime serve` baseline) when missing, builds perchd with the
# `firmware` profile (fat LTO, stripped: what ships on devices) and runs perch-bench against it.
#   scripts/bench.sh [--idle-secs 60] [--launches 30] [--drain-records N] [--only invoke|load|cold-start|instances|http|idle-rss|boundary|drain]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/perch/target}"
tools="$HOME/.cache/perch/tools"

if ! command -v wrk >/dev/null; then
    sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get install -y -qq wrk
fi
if [[ ! -x "$tools/bin/wasmtime" ]]; then
    echo "bench: installing wasmtime-cli 48.0.8 into $tools (a long build)"
    cargo install wasmtime-cli@48.0.8 --locked --root "$tools"
fi

cargo build --release -p perch-tests --bin perch-bench
# The firmware build (fat LTO, one codegen unit, stripped) gets its own target dir so it never
# invalidates the release artifacts the tests use.
firmware="${PERCH_FIRMWARE_TARGET:-$HOME/.cache/perch/firmware-target}"
CARGO_TARGET_DIR="$firmware" cargo build --profile firmware -p perchd
PERCHD_BIN="$firmware/firmware/perchd" WASMTIME="$tools/bin/wasmtime" \
    "$CARGO_TARGET_DIR/release/perch-bench" "$@"
