#!/usr/bin/env bash
# Installs what building and testing Perch needs on a Debian machine, skipping what is there:
# the wasm32-wasip2 Rust target and a few Debian packages (curl, iproute2, util-linux, and
# the nats-server and mosquitto brokers the sync tests start on free ports, and openssl,
# which makes the certificates of the TLS test), and for the firmware images and their
# hardware-in-the-loop tests: musl-tools (static perchd), e2fsprogs (mke2fs -d), mtools (the
# FAT boot and slot partitions), zstd (disk.img.zst), and the
# shared libraries of QEMU, whose Debian packages the HIL harness unpacks into its cache
# rather than installing (Debian 12's QEMU 7.2 conflicts with a newer qemu-utils).
set -euo pipefail

need_pkgs=()
command -v curl >/dev/null || need_pkgs+=(curl)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v unshare >/dev/null && command -v nsenter >/dev/null || need_pkgs+=(util-linux)
command -v cc >/dev/null || need_pkgs+=(gcc)
command -v nats-server >/dev/null || need_pkgs+=(nats-server)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || need_pkgs+=(mosquitto)
command -v musl-gcc >/dev/null || need_pkgs+=(musl-tools)
command -v mke2fs >/dev/null || [[ -x /usr/sbin/mke2fs ]] || need_pkgs+=(e2fsprogs)
command -v mformat >/dev/null || need_pkgs+=(mtools)
command -v zstd >/dev/null || need_pkgs+=(zstd)
for lib in libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2; do
    dpkg -s "$lib" >/dev/null 2>&1 || need_pkgs+=("$lib")
done
if ((${#need_pkgs[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "setup: installing ${need_pkgs[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_pkgs[@]}"
fi

command -v rustup >/dev/null || { echo "setup: rustup is required (https://rustup.rs)" >&2; exit 1; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"  # so rust-toolchain.toml selects the toolchain
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
