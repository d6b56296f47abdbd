#!/usr/bin/env bash
# Builds the guest components in examples/ for wasm32-wasip2 and copies them to one directory.
#   scripts/build-examples.sh [OUT_DIR]
# OUT_DIR defaults to $PERCH_EXAMPLES_OUT or target/examples; the cargo target dir to
# $PERCH_EXAMPLES_TARGET or ~/.cache/perch/examples-target.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${PERCH_EXAMPLES_OUT:-$repo/target/examples}}"
export CARGO_TARGET_DIR="${PERCH_EXAMPLES_TARGET:-$HOME/.cache/perch/examples-target}"
target=wasm32-wasip2

cd "$repo/examples"
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
cargo build --release --target "$target"

mkdir -p "$out"
for dir in */; do
    name="${dir%/}"
    [[ -f "$name/Cargo.toml" ]] || continue
    wasm="$CARGO_TARGET_DIR/$target/release/${name//-/_}.wasm"
    # A component starts with "\0asm" and layer 1, version 0x0d: 00 61 73 6d 0d 00 01 00.
    if [[ "$(head -c 8 "$wasm" | od -An -tx1 | tr -d ' \n')" != 0061736d0d000100 ]]; then
        echo "error: $wasm is not a component" >&2
        exit 1
    fi
    cp "$wasm" "$out/$name.wasm"
    printf '%8d  %s\n' "$(stat -c %s "$out/$name.wasm")" "$out/$name.wasm"
done
