//! The image under test: a board's image built with `perch-image` around a `perchd` cross
//! built for the board (`scripts/cross-build.sh`), with a device config for tests.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use perch_core::board::BoardConfig;

use crate::{Boot, MachineSpec};

/// The device config baked into test images for `board`: the API on all interfaces (QEMU
/// forwards a loopback port to it), data on the data partition, the board's real hardware
/// (its file ships in the image), preloaded components deployed on the first boot, unsigned
/// test components accepted.
pub fn test_device_config(board: &str) -> String {
    format!(
        r#"data-dir = "/var/lib/perch/data"
listen = "0.0.0.0:7070"
board = "{board}"
preload-dir = "/var/lib/perch/preload"

[signing]
allow-unsigned = true
"#
    )
}

/// `perchd` for `target`: `PERCH_HIL_PERCHD` if set, else built by `scripts/cross-build.sh`.
pub fn perchd_for(target: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PERCH_HIL_PERCHD") {
        return Ok(PathBuf::from(p));
    }
    perch_image::cross_build(&perch_tests::repo_root(), target)
}

/// A board's image, built for a test.
#[derive(Debug, Clone)]
pub struct Image {
    /// How to boot it.
    pub spec: MachineSpec,
    /// Its slot image (what `PUT /v1/system/update` installs).
    pub slot: PathBuf,
    /// The board's bootloader (`u-boot`, `direct`).
    pub bootloader: String,
}

/// Builds `board`'s image into `out` and returns how to boot it.
pub fn build(board: &str, out: &Path) -> Result<MachineSpec> {
    Ok(build_with(board, out, None, &[])?.spec)
}

/// Builds `board`'s image into `out` with `perchd` (default: the board's cross-built agent)
/// and `preload`ed components ((name, artifact bytes): the first boot deploys them).
pub fn build_with(
    board: &str,
    out: &Path,
    perchd: Option<PathBuf>,
    preload: &[(&str, Vec<u8>)],
) -> Result<Image> {
    let root = perch_tests::repo_root();
    let board_file = root.join("board-configs").join(format!("{board}.toml"));
    let board = BoardConfig::load(&board_file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = board
        .image
        .rust_target
        .clone()
        .context("the board has no rust-target")?;
    let arch = board.image.arch.clone().context("the board has no arch")?;
    let machine = board
        .image
        .qemu_machine
        .clone()
        .context("the board has no qemu-machine")?;
    let perchd = match perchd {
        Some(p) => p,
        None => perchd_for(&target)?,
    };
    let bootloader = board
        .image
        .bootloader
        .clone()
        .unwrap_or_else(|| "direct".into());
    let uboot = bootloader == "u-boot";
    let outputs = perch_image::build(
        &perch_image::Inputs {
            device_config: test_device_config(&board.name),
            board_file,
            perchd,
            lock: root.join("image/debian.lock"),
            data_files: preload
                .iter()
                .map(|(name, bytes)| (format!("preload/{name}.wasm"), bytes.clone()))
                .collect(),
            data_mib: 256,
        },
        out,
    )?;
    let spec = MachineSpec {
        arch: match arch.as_str() {
            "armv7" => "arm".into(),
            other => other.into(),
        },
        machine,
        boot: if uboot {
            Boot::UBoot
        } else {
            Boot::Direct {
                kernel: outputs.kernel,
                initrd: outputs.initrd,
            }
        },
        disk: outputs.disk,
        memory_mib: 1024,
        devices: board.image.qemu_devices.clone(),
    };
    Ok(Image {
        spec,
        slot: outputs.slot,
        bootloader,
    })
}
