#!/usr/bin/env bash
# Fails when a firmware perchd is larger than its ceiling in scripts/binary-sizes:
#   scripts/size-gate.sh aarch64-unknown-linux-musl path/to/perchd
set -euo pipefail
target="${1:?usage: scripts/size-gate.sh <rust-target> <binary>}"
binary="${2:?usage: scripts/size-gate.sh <rust-target> <binary>}"
root="$(cd "$(dirname "$0")/.." && pwd)"
limit="$(awk -v t="$target" '$1 == t { print $2 }' "$root/scripts/binary-sizes")"
if [[ -z "$limit" ]]; then
    echo "size-gate: no ceiling for $target in scripts/binary-sizes" >&2
    exit 2
fi
size="$(stat -c %s "$binary")"
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
if ((size > limit)); then
    echo "size-gate: perchd for $target is $size bytes ($(mib "$size")), over its ceiling of $limit ($(mib "$limit")): find what grew, or raise the ceiling in scripts/binary-sizes with a reason in docs/performance.md" >&2
    exit 1
fi
echo "size-gate: perchd for $target is $size bytes ($(mib "$size")), ceiling $limit ($(mib "$limit"))" >&2
