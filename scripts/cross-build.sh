#!/usr/bin/env bash
# Builds perchd for a board's Rust target without Docker, with Debian's cross compilers:
#   scripts/cross-build.sh x86_64-unknown-linux-musl      # static, musl-gcc for the C parts
#   scripts/cross-build.sh aarch64-unknown-linux-musl     # static, rust-lld + aarch64-linux-gnu-gcc
#   scripts/cross-build.sh armv7-unknown-linux-gnueabihf  # glibc + crt-static, arm-linux-gnueabihf-gcc
# Installs the rustup target and the Debian packages it needs when they are missing, and
# prints the path of the stripped binary. PROFILE (default `firmware`) picks the cargo
# profile; builds go to PERCH_CROSS_TARGET_DIR (default ~/.cache/perch/cross-target, apart
# from the host builds) so repeat builds are incremental. Users with Docker may use `cross` instead (Cross.toml); this is the tested path.
set -euo pipefail
target="${1:?usage: scripts/cross-build.sh <rust-target>}"
profile="${PROFILE:-firmware}"
root="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${PERCH_CROSS_TARGET_DIR:-$HOME/.cache/perch/cross-target}"

need_deb() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "cross-build: installing ${missing[*]}" >&2
        local sudo=""
        [[ $(id -u) -eq 0 ]] || sudo="sudo"
        # Fresh package lists first: a new machine may have none.
        $sudo apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

case "$target" in
    x86_64-unknown-linux-musl)
        need_deb musl-tools
        export CC_x86_64_unknown_linux_musl=musl-gcc
        ;;
    aarch64-unknown-linux-musl)
        need_deb gcc-aarch64-linux-gnu libc6-dev-arm64-cross
        export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
        export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld
        ;;
    armv7-unknown-linux-gnueabihf)
        need_deb gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
        export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
        export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
        export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUSTFLAGS="-C target-feature=+crt-static"
        ;;
    *)
        echo "cross-build: unknown target \`$target\`: expected x86_64-unknown-linux-musl, aarch64-unknown-linux-musl or armv7-unknown-linux-gnueabihf" >&2
        exit 2
        ;;
esac
rustup target list --installed | grep -qx "$target" || rustup target add "$target" >&2
cd "$root"
echo "cross-build: perchd for $target (profile $profile) in $CARGO_TARGET_DIR" >&2
cargo build --locked --profile "$profile" --target "$target" -p perchd >&2
echo "$CARGO_TARGET_DIR/$target/$profile/perchd"
