#!/usr/bin/env bash
# Runs the hardware-in-the-loop scenarios (hil-tests/) on QEMU boards, each with perchd
# cross-built for it, and prints a summary (pass/fail, boot times) per board:
#   scripts/hil.sh                     # every QEMU board
#   scripts/hil.sh qemu-aarch64-virt   # the boards named
# Set-up is scripts/setup.sh's; the first run downloads the pinned Debian packages.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/perch/target}"
boards=("$@")
if [[ ${#boards[@]} -eq 0 ]]; then
    boards=(qemu-x86_64 qemu-aarch64-virt qemu-armv7)
fi

# A board's `rust-target`, from its file or the one it inherits.
rust_target() {
    local file="board-configs/$1.toml" target parent
    target="$(sed -n 's/^rust-target *= *"\(.*\)"/\1/p' "$file")"
    parent="$(sed -n 's/^inherit *= *"\(.*\)"/\1/p' "$file")"
    if [[ -z "$target" && -n "$parent" ]]; then
        rust_target "${parent%.toml}"
    else
        echo "$target"
    fi
}

summary=()
failed=0
for board in "${boards[@]}"; do
    [[ -f "board-configs/$board.toml" ]] || { echo "hil: no board-configs/$board.toml" >&2; exit 2; }
    target="$(rust_target "$board")"
    echo "hil: $board ($target)" >&2
    perchd="$(scripts/cross-build.sh "$target")"
    log="$(mktemp)"
    if PERCH_HIL_BOARD="$board" PERCH_HIL_PERCHD="$perchd" \
        cargo test --release -p perch-hil -- --nocapture 2>&1 | tee "$log" >&2 \
        && ! grep -q "FAILED" "$log"; then
        result=pass
    else
        result=FAIL
        failed=1
    fi
    summary+=("$board: $result")
    while IFS= read -r line; do summary+=("  $line"); done < <(grep -E "^hil: " "$log" || true)
    rm -f "$log"
done
echo
printf '%s\n' "${summary[@]}"
exit "$failed"
