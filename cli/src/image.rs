//! `perch image build` and `perch image flash`: firmware images for a board, and writing
//! one to an SD card or disk with verification.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use sha2::Digest as _;

use crate::Failure;
use crate::shell::{self, Shell};

/// What `perch image build` needs.
#[derive(Debug)]
pub struct BuildOptions {
    pub board: String,
    pub out: Option<PathBuf>,
    pub perchd: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub preload: Vec<PathBuf>,
}

/// Where preloaded components live on the data partition (mounted at `/var/lib/perch`).
pub const PRELOAD_DIR: &str = "preload";

/// The device config of an image unless one is given: the board's hardware, the API on
/// every interface, the store and the preloaded components on the data partition.
pub fn default_device_config(board: &str) -> String {
    format!(
        "# Written by `perch image build`; see docs/config.md.\n\
         board = \"{board}\"\n\
         data-dir = \"/var/lib/perch/data\"\n\
         listen = \"0.0.0.0:{port}\"\n\
         preload-dir = \"/var/lib/perch/{PRELOAD_DIR}\"\n",
        port = perch_image::AGENT_PORT
    )
}

/// The Perch source tree holding `board-configs/` and `image/debian.lock`: this directory
/// or one above it.
fn repo_root() -> Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    cwd.ancestors()
        .find(|d| d.join("board-configs").is_dir() && d.join("image/debian.lock").is_file())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            Failure::msg(format!(
                "{} is not inside a Perch checkout (no board-configs/ and image/debian.lock above it): run `perch image build` there",
                cwd.display()
            ))
        })
}

/// Builds a board's image: perchd cross-built for it (unless given), the device config and
/// preloaded components baked into the data partition.
pub fn build(shell: &Shell, opts: BuildOptions) -> Result<()> {
    let root = repo_root()?;
    let board_file = if opts.board.ends_with(".toml") {
        PathBuf::from(&opts.board)
    } else {
        root.join("board-configs")
            .join(format!("{}.toml", opts.board))
    };
    if !board_file.is_file() {
        let known: Vec<String> = std::fs::read_dir(root.join("board-configs"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_suffix(".toml").map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        return Err(Failure {
            message: format!(
                "no board `{}` in {}",
                opts.board,
                root.join("board-configs").display()
            ),
            details: vec![format!("boards: {}", known.join(", "))],
        }
        .into());
    }
    let board = perch_core::board::BoardConfig::load(&board_file)
        .map_err(|e| Failure::msg(e.to_string()))?;
    let target = board.image.rust_target.clone().ok_or_else(|| {
        Failure::msg(format!(
            "board `{}` names no `rust-target`: it has no image",
            board.name
        ))
    })?;
    let perchd = match opts.perchd {
        Some(p) => p,
        None => {
            shell.status(
                "Building",
                format!("perchd for {target} (scripts/cross-build.sh)"),
            );
            perch_image::cross_build(&root, &target)?
        }
    };
    let device_config = match &opts.config {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| Failure::msg(format!("reading {}: {e}", p.display())))?,
        None => default_device_config(&board.name),
    };
    // The agent must accept the config it boots with.
    perch_core::AgentConfig::from_toml(&device_config, "the device config")
        .map_err(|e| Failure::msg(e.to_string()))?;
    let mut data_files = Vec::new();
    for p in &opts.preload {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wasm"))
            .ok_or_else(|| {
                Failure::msg(format!(
                    "{}: a preloaded component is a .wasm file",
                    p.display()
                ))
            })?;
        let bytes =
            std::fs::read(p).map_err(|e| Failure::msg(format!("reading {}: {e}", p.display())))?;
        data_files.push((format!("{PRELOAD_DIR}/{name}"), bytes));
    }
    let out = opts
        .out
        .unwrap_or_else(|| root.join("target/perch-image").join(&board.name));
    shell.status("Imaging", format!("{} into {}", board.name, out.display()));
    let outputs = perch_image::build(
        &perch_image::Inputs {
            board_file,
            perchd,
            lock: root.join("image/debian.lock"),
            device_config,
            data_files,
            data_mib: 256,
        },
        &out,
    )?;
    for (what, path) in [
        ("disk (flash it)", &outputs.disk_zst),
        ("disk, raw", &outputs.disk),
        ("slot (A/B update)", &outputs.slot),
    ] {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        shell.status(
            "Wrote",
            format!("{} ({}): {what}", path.display(), shell::human_bytes(size)),
        );
    }
    shell.note(format!(
        "next: `perch image flash {} /dev/sdX`, or PUT {} to a running device's /v1/system/update",
        outputs.disk_zst.display(),
        outputs.slot.display()
    ));
    Ok(())
}

/// Why `target` must not be written: it (or a partition of it) is mounted, which also
/// covers the disk the running system lives on. `mounts` is `/proc/mounts`.
pub fn refusal(target: &Path, mounts: &str) -> Option<String> {
    let target = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    let t = target.to_string_lossy();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(dev), Some(at)) = (f.next(), f.next()) else {
            continue;
        };
        let dev_path = std::fs::canonicalize(dev).unwrap_or_else(|_| PathBuf::from(dev));
        let d = dev_path.to_string_lossy();
        let partition_of = d.strip_prefix(t.as_ref()).is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .trim_start_matches('p')
                    .chars()
                    .all(|c| c.is_ascii_digit())
        });
        if d == t || partition_of {
            let system = if at == "/" {
                " (the running system's disk)"
            } else {
                ""
            };
            return Some(format!("{d} is mounted at {at}{system}: unmount it first"));
        }
    }
    None
}

/// Writes `image` (`.img`, or `.img.zst` decompressed on the fly) to `target`, syncs, and
/// reads it back to compare digests. `target` is a block device, or a file.
pub fn flash(shell: &Shell, image: &Path, target: &Path, yes: bool) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if let Some(why) = refusal(target, &mounts) {
        return Err(Failure::msg(format!(
            "refusing to flash {}: {why}",
            target.display()
        )));
    }
    let meta = std::fs::metadata(target);
    let is_block = {
        use std::os::unix::fs::FileTypeExt as _;
        meta.as_ref().is_ok_and(|m| m.file_type().is_block_device())
    };
    if meta.as_ref().is_ok_and(|m| m.is_dir()) {
        return Err(Failure::msg(format!("{} is a directory", target.display())));
    }
    if is_block && !yes {
        if !shell.interactive() {
            return Err(Failure::msg(format!(
                "{} is a block device and everything on it will be lost: pass --yes",
                target.display()
            )));
        }
        eprint!(
            "Everything on {} will be lost. Type `yes` to flash: ",
            target.display()
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            return Err(Failure::msg("not flashed"));
        }
    }
    let compressed = image.extension().is_some_and(|e| e == "zst");
    let (mut reader, mut child, total): (Box<dyn Read>, Option<std::process::Child>, u64) =
        if compressed {
            let mut c = Command::new("zstd")
                .args(["-dc", "--no-progress"])
                .arg(image)
                .stdout(Stdio::piped())
                .spawn()
                .context("running zstd (Debian package zstd)")?;
            let out = c.stdout.take().context("zstd's output")?;
            let size = zstd_content_size(image).unwrap_or(0);
            (Box::new(out), Some(c), size)
        } else {
            let f = std::fs::File::open(image)
                .map_err(|e| Failure::msg(format!("reading {}: {e}", image.display())))?;
            let size = f.metadata()?.len();
            (Box::new(f), None, size)
        };
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(!is_block)
        .truncate(!is_block)
        .open(target)
        .map_err(|e| Failure::msg(format!("opening {} for writing: {e}", target.display())))?;
    shell.status(
        "Flashing",
        format!("{} to {}", image.display(), target.display()),
    );
    let mut progress = shell::Progress::new(shell, "Flashing", total);
    let mut hasher = sha2::Sha256::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(|e| {
            Failure::msg(format!(
                "writing {} at byte {written}: {e}",
                target.display()
            ))
        })?;
        hasher.update(&buf[..n]);
        written += n as u64;
        progress.advance(n as u64);
    }
    progress.finish();
    if let Some(c) = child.as_mut() {
        let status = c.wait()?;
        if !status.success() {
            return Err(Failure::msg(format!(
                "zstd could not decompress {} ({status})",
                image.display()
            )));
        }
    }
    out.sync_all()?;
    drop(out);
    shell.status(
        "Verifying",
        format!("{} of {}", shell::human_bytes(written), target.display()),
    );
    let mut back = std::fs::File::open(target)?.take(written);
    let mut check = sha2::Sha256::new();
    let n = std::io::copy(&mut back, &mut check)?;
    let (want, got) = (hasher.finalize(), check.finalize());
    if n != written || want != got {
        return Err(Failure::msg(format!(
            "{} does not read back what was written ({n} of {written} bytes, sha256 {} vs {}): the medium may be failing",
            target.display(),
            hex::encode(got),
            hex::encode(want)
        )));
    }
    shell.status(
        "Flashed",
        format!(
            "{} and verified (sha256 {})",
            shell::human_bytes(written),
            hex::encode(want)
        ),
    );
    Ok(())
}

/// The decompressed size a zstd frame header records, if any.
fn zstd_content_size(path: &Path) -> Option<u64> {
    let out = Command::new("zstd").args(["-lv"]).arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Decompressed Size:"))
        .and_then(|v| v.split('(').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounted_disks_and_their_partitions_are_refused() {
        let mounts = "/dev/sda2 / ext4 rw 0 0\n/dev/mmcblk0p1 /media/boot vfat rw 0 0\nproc /proc proc rw 0 0\n";
        let root = refusal(Path::new("/dev/sda"), mounts).expect("refused");
        assert!(root.contains("running system"), "{root}");
        assert!(refusal(Path::new("/dev/mmcblk0"), mounts).is_some());
        assert!(refusal(Path::new("/dev/mmcblk0p1"), mounts).is_some());
        assert_eq!(refusal(Path::new("/dev/sdb"), mounts), None);
        assert_eq!(refusal(Path::new("/dev/sda1x"), mounts), None);
    }
}
