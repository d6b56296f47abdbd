//! `perch-image`: firmware images from board configs (`board-configs/*.toml`).
//!
//! What a board's image holds: the kernel of a pinned Debian package (`image/debian.lock`),
//! an initramfs that is the whole root (busybox-static of the target arch, `perchd`, the
//! board's kernel modules with their dependencies, and an `/init` that mounts the data
//! partition, brings up the network and supervises `perchd`), and a data partition (ext4,
//! made with `mke2fs -d`: no root mounts, no loop devices) holding the device config and
//! anything preloaded. Every step is deterministic: the same inputs give the same bytes.
//!
//! Built so far: x86_64 (the host architecture: packages come from the host's apt). Still
//! to come (docs/images.md): the MBR disk with A/B slots, foreign-architecture packages from
//! a private apt directory, U-Boot and the A/B update.

pub mod cpio;
pub mod debs;
pub mod disk;
pub mod modules;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use perch_core::board::BoardConfig;

/// The fixed time every image file carries (2024-01-01T00:00:00Z).
pub const EPOCH: u64 = 1_704_067_200;
/// The data partition's filesystem UUID (fixed, for reproducible bytes).
pub const DATA_UUID: &str = "50455243-4800-4000-8000-000000000001";
/// The port perchd listens on inside the image.
pub const AGENT_PORT: u16 = 7070;
/// The disk's MBR signature (fixed, for reproducible bytes).
pub const DISK_SIGNATURE: u32 = 0x5045_5243;
/// Size of the boot partition (the boot script and the A/B state file).
pub const BOOT_MIB: u64 = 16;
/// Size of each A/B slot (the kernel and the initramfs).
pub const SLOT_MIB: u64 = 128;
/// The A/B state file on the boot partition (`perch_slot=a`, see [`disk::ab_script`]).
pub const BOOT_ENV: &str = "perch.env";
/// Seconds a trial boot has to commit before `/init` reboots into the previous slot.
pub const TRIAL_TIMEOUT_S: u32 = 90;
/// Modules every image loads, whatever the board: the data partition's ext4 and the boot
/// partition's FAT (whose default code page and character set are built as modules).
pub const IMAGE_MODULES: &[&str] = &["ext4", "vfat", "nls_cp437", "nls_ascii", "nls_utf8"];

/// What [`build`] made.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// The slot's kernel and initramfs, also inside `slot` (for direct kernel boots).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The data partition's ext4 image.
    pub data: PathBuf,
    /// The boot partition's FAT image (the boot script and the A/B state file).
    pub boot: PathBuf,
    /// A slot's FAT image: what an A/B update installs into the inactive slot.
    pub slot: PathBuf,
    /// The whole disk (boot, slot A, slot B empty, data), raw.
    pub disk: PathBuf,
    /// The same, compressed with zstd, for flashing.
    pub disk_zst: PathBuf,
}

/// Inputs of one build.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The board file (`board-configs/<name>.toml`); the image ships it, with its
    /// `inherit` chain merged, as `/etc/perch/boards/<name>.toml`.
    pub board_file: PathBuf,
    /// `perchd` built for the board's Rust target.
    pub perchd: PathBuf,
    /// `image/debian.lock`.
    pub lock: PathBuf,
    /// The device config baked into the data partition (`perchd.toml`).
    pub device_config: String,
    /// Extra files for the data partition: (path inside it, bytes).
    pub data_files: Vec<(String, Vec<u8>)>,
    /// Size of the data partition.
    pub data_mib: u64,
}

/// The Debian architecture of a board's `arch`.
fn debian_arch(arch: &str) -> Result<&'static str> {
    Ok(match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "armv7" => "armhf",
        other => bail!("board arch `{other}`: expected x86_64, aarch64 or armv7"),
    })
}

/// Builds the board's kernel, initramfs and data partition into `out`.
pub fn build(inputs: &Inputs, out: &Path) -> Result<Outputs> {
    let board = BoardConfig::load(&inputs.board_file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let board_toml =
        BoardConfig::flattened(&inputs.board_file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let arch = board
        .image
        .arch
        .as_deref()
        .with_context(|| format!("board `{}` has no `arch`", board.name))?;
    // An image without a way to boot it would flash and then do nothing: refuse it here.
    if board.image.bootloader.is_none() {
        bail!(
            "board `{}` names no `bootloader`, so its image would not boot: the builder makes \
             images for `u-boot` (an A/B boot script, QEMU virt) and `direct` (the loader is \
             given slot A's kernel, QEMU -kernel); Raspberry Pi firmware boot (`tryboot`, \
             docs/images.md) is not built yet",
            board.name
        );
    }
    let deb_arch = debian_arch(arch)?;
    let lock = debs::read_lock(&inputs.lock)?;
    let cache = debs::cache_dir();
    let pick = |prefix: &str| -> Result<&debs::Pinned> {
        lock.iter()
            .find(|p| p.arch == deb_arch && p.name.starts_with(prefix))
            .with_context(|| {
                format!(
                    "{} pins no `{prefix}*` package for {deb_arch}",
                    inputs.lock.display()
                )
            })
    };
    std::fs::create_dir_all(out)?;
    let work = out.join("work");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }

    step("kernel and modules");
    let kernel_deb = debs::fetch(pick("linux-image-")?, &cache)?;
    let kdir = work.join("kernel");
    debs::unpack(&kernel_deb, &kdir)?;
    let vmlinuz = std::fs::read_dir(kdir.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("the kernel package has no /boot/vmlinuz-*")?;
    let modules_root = std::fs::read_dir(kdir.join("lib/modules"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .next()
        .context("the kernel package has no /lib/modules/<version>")?;
    let mut wanted: Vec<String> = board.image.modules.clone();
    for m in IMAGE_MODULES {
        if !wanted.iter().any(|w| w == m) {
            wanted.push((*m).to_string());
        }
    }
    let mods = modules::load_order(
        &modules_root.join("kernel"),
        &wanted,
        &modules::builtin(&modules_root),
    )?;

    let loaded: Vec<String> = module_names(&mods)?
        .iter()
        .map(|m| m.replace('-', "_"))
        .collect();
    for name in board.image.module_params.keys() {
        if !loaded.contains(&name.replace('-', "_")) {
            bail!(
                "module `{name}` has parameters in the board config but is built into the \
                 kernel, so /init cannot pass them: put `{name}.<param>=<value>` on the kernel \
                 command line instead"
            );
        }
    }

    step("busybox");
    let bb_deb = debs::fetch(pick("busybox-static")?, &cache)?;
    let bbdir = work.join("busybox");
    debs::unpack(&bb_deb, &bbdir)?;
    let busybox =
        std::fs::read(bbdir.join("bin/busybox")).context("busybox-static has no /bin/busybox")?;

    step("initramfs");
    let perchd = std::fs::read(&inputs.perchd)
        .with_context(|| format!("reading perchd at {}", inputs.perchd.display()))?;
    let initrd = out.join("initrd.img");
    let board_path = format!("/etc/perch/boards/{}.toml", board.name);
    let disk_dev = board
        .image
        .disk
        .clone()
        .unwrap_or_else(|| "/dev/vda".into());
    let init = init_script(&disk_dev, &module_names(&mods)?, &board.image);
    write_initramfs(
        &initrd,
        &busybox,
        &perchd,
        &mods,
        (&board_path, &board_toml),
        &init,
    )?;
    let kernel = out.join("vmlinuz");
    std::fs::copy(&vmlinuz, &kernel)?;

    step("data partition");
    let data_dir = work.join("data");
    std::fs::create_dir_all(&data_dir)?;
    std::fs::write(data_dir.join("perchd.toml"), &inputs.device_config)?;
    for (path, bytes) in &inputs.data_files {
        let p = data_dir.join(path.trim_start_matches('/'));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, bytes)?;
    }
    let data = out.join("data.img");
    make_ext4(&data_dir, &data, inputs.data_mib, "perch-data", DATA_UUID)?;

    step("slot and boot partitions");
    let slot = out.join("slot.img");
    disk::make_vfat(
        &slot,
        SLOT_MIB,
        DISK_SIGNATURE + 2,
        &[
            ("vmlinuz", kernel.as_path()),
            ("initrd.img", initrd.as_path()),
        ],
    )?;
    let boot_files = work.join("boot");
    std::fs::create_dir_all(&boot_files)?;
    let env = boot_files.join(BOOT_ENV);
    std::fs::write(&env, "perch_slot=a\n")?;
    let mut boot_list = vec![(BOOT_ENV, env.clone())];
    if board.image.bootloader.as_deref() == Some("u-boot") {
        let (console, cmd) = match arch {
            "aarch64" => ("ttyAMA0", "booti"),
            _ => ("ttyAMA0", "bootz"),
        };
        let script = disk::uboot_script(&disk::ab_script(console, cmd), arch, "perch A/B boot")?;
        let scr = boot_files.join("boot.scr");
        std::fs::write(&scr, script)?;
        boot_list.push(("boot.scr", scr));
    }
    let boot = out.join("boot.img");
    let boot_refs: Vec<(&str, &Path)> = boot_list.iter().map(|(n, p)| (*n, p.as_path())).collect();
    disk::make_vfat(&boot, BOOT_MIB, DISK_SIGNATURE + 1, &boot_refs)?;

    step("disk");
    // Slot B starts empty (zeros): the first update fills it.
    let empty_b = work.join("slot-b.img");
    std::fs::File::create(&empty_b)?.set_len(SLOT_MIB << 20)?;
    let disk_img = out.join("disk.img");
    let part = |kind, bootable, image: &Path| disk::Partition {
        kind,
        bootable,
        image: image.to_path_buf(),
    };
    disk::write(
        &disk_img,
        &[
            part(disk::TYPE_FAT, true, &boot),
            part(disk::TYPE_FAT, false, &slot),
            part(disk::TYPE_FAT, false, &empty_b),
            part(disk::TYPE_LINUX, false, &data),
        ],
        DISK_SIGNATURE,
    )?;
    step("compressing the disk (zstd)");
    let disk_zst = out.join("disk.img.zst");
    let status = Command::new("zstd")
        .args(["-q", "-f", "-T1", "--no-progress"])
        .arg(&disk_img)
        .arg("-o")
        .arg(&disk_zst)
        .status()
        .context("running zstd (Debian package zstd)")?;
    if !status.success() {
        bail!("zstd failed ({status}) compressing {}", disk_img.display());
    }
    std::fs::remove_dir_all(&work)?;
    Ok(Outputs {
        kernel,
        initrd,
        data,
        boot,
        slot,
        disk: disk_img,
        disk_zst,
    })
}

/// `perchd` for `target`, built by `<repo>/scripts/cross-build.sh` (its progress goes to
/// stderr); returns the binary's path.
pub fn cross_build(repo: &Path, target: &str) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(repo.join("scripts/cross-build.sh"))
        .arg(target)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running scripts/cross-build.sh")?;
    if !out.status.success() {
        bail!("scripts/cross-build.sh {target} failed ({})", out.status);
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The module names (file stems) of module paths, in order.
fn module_names(mods: &[PathBuf]) -> Result<Vec<String>> {
    mods.iter()
        .map(|m| {
            m.file_stem()
                .and_then(|n| n.to_str())
                .map(str::to_string)
                .with_context(|| format!("module path {}", m.display()))
        })
        .collect()
}

fn step(what: &str) {
    tracing::info!(step = what, "image");
    eprintln!("image: {what}");
}

/// The `/init` of the image: mounts, loads modules (with the board's parameters),
/// instantiates the board's `i2c-devices`, mounts the data partition (`<disk>4`) at
/// `/var/lib/perch` and the boot partition (`<disk>1`) at `/boot`, brings up the network
/// (QEMU user networking's fixed addresses), starts a root shell on the console if the board
/// asks for one (`console-shell`, for HIL tests), and runs perchd again whenever it exits.
/// On a trial boot (`perch.trial=1` on the kernel command line) it also keeps the A/B
/// promise: a slot that has not committed within `perch.trial_timeout` seconds (default
/// [`TRIAL_TIMEOUT_S`]) reboots, and the bootloader falls back to the previous slot.
///
/// `modules` are the module files' names in load order (`i2c-stub`); `image` gives their
/// parameters (keyed by module name, where `-` and `_` are the same) and the rest. Board
/// configs are validated so that nothing in them needs quoting here.
pub fn init_script(disk: &str, modules: &[String], image: &perch_core::board::ImageSpec) -> String {
    let canonical = |m: &str| m.replace('-', "_");
    let mut load = String::new();
    for m in modules {
        let params = image
            .module_params
            .iter()
            .find(|(name, _)| canonical(name) == canonical(m))
            .map(|(_, p)| format!(" {}", p.join(" ")))
            .unwrap_or_default();
        load.push_str(&format!(
            "insmod /lib/modules/{m}.ko{params} || echo \"perch-init: module {m} failed\"\n"
        ));
    }
    for d in &image.i2c_devices {
        load.push_str(&format!(
            "i2c_new_device '{}' {} {:#04x}\n",
            d.adapter, d.driver, d.address
        ));
    }
    let shell = if image.console_shell {
        "echo \"perch-init: root shell on the console\"\n(while true; do setsid cttyhack sh -c 'stty columns 4096; exec sh'; sleep 1; done) &\n"
    } else {
        ""
    };
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# An I2C device no firmware table describes, on the adapter named $1: driver $2, address $3.
i2c_new_device() {{
  for a in /sys/bus/i2c/devices/i2c-*; do
    if [ "$(cat "$a/name" 2>/dev/null)" = "$1" ]; then
      echo "$2 $3" > "$a/new_device" && echo "perch-init: $2 at $3 on ${{a##*/}} ($1)" && return 0
    fi
  done
  echo "perch-init: no I2C adapter named '$1' for $2 at $3"
}}
echo "perch-init: loading modules"
{load}mkdir -p /var/lib/perch /tmp /boot
slot=a
trial=0
timeout={timeout}
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    perch.slot=*) slot="${{arg#perch.slot=}}" ;;
    perch.trial=*) trial="${{arg#perch.trial=}}" ;;
    perch.trial_timeout=*) timeout="${{arg#perch.trial_timeout=}}" ;;
  esac
done
i=0
while [ ! -b {data} ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 -o noatime {data} /var/lib/perch; then
  echo "perch-init: data partition mounted"
else
  echo "perch-init: no data partition; running from RAM"
fi
if mount -t vfat -o noatime {boot} /boot; then
  echo "perch-init: boot partition mounted (slot $slot, trial $trial)"
fi
if [ "$trial" = 1 ]; then
  echo "perch-init: trial boot of slot $slot: it must commit within $timeout s"
  (
    sleep "$timeout"
    if ! grep -q "^perch_slot=$slot\$" /boot/{env}; then
      echo "perch-init: slot $slot did not commit within $timeout s: rebooting into the previous slot"
      sync
      reboot -f
    fi
  ) &
fi
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
{shell}cd /var/lib/perch
n=0
while true; do
  n=$((n+1))
  echo "perch-init: starting perchd (run $n)"
  /usr/bin/perchd --config /var/lib/perch/perchd.toml
  echo "perch-init: perchd exited with $?"
  sleep 1
done
"#,
        timeout = TRIAL_TIMEOUT_S,
        data = perch_core::board::partition(disk, 4),
        boot = perch_core::board::partition(disk, 1),
        env = BOOT_ENV,
    )
}

/// Writes the initramfs: busybox, perchd, the modules in load order and `/init`.
fn write_initramfs(
    path: &Path,
    busybox: &[u8],
    perchd: &[u8],
    modules: &[PathBuf],
    board: (&str, &str),
    init: &str,
) -> Result<()> {
    use cpio::Entry;
    let dir = |p: &str| Entry::Dir {
        path: p.into(),
        mode: 0o755,
    };
    let mut entries = vec![
        dir("/bin"),
        dir("/dev"),
        dir("/etc"),
        dir("/etc/perch"),
        dir("/etc/perch/boards"),
        dir("/lib"),
        dir("/lib/modules"),
        dir("/proc"),
        dir("/sys"),
        dir("/tmp"),
        dir("/usr"),
        dir("/usr/bin"),
        dir("/var"),
        dir("/var/lib"),
        Entry::CharDev {
            path: "/dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::File {
            path: "/bin/busybox".into(),
            mode: 0o755,
            data: busybox.to_vec(),
        },
        Entry::File {
            path: board.0.into(),
            mode: 0o644,
            data: board.1.as_bytes().to_vec(),
        },
        Entry::File {
            path: "/usr/bin/perchd".into(),
            mode: 0o755,
            data: perchd.to_vec(),
        },
    ];
    for (m, name) in modules.iter().zip(module_names(modules)?) {
        entries.push(Entry::File {
            path: format!("/lib/modules/{name}.ko"),
            mode: 0o644,
            data: std::fs::read(m)?,
        });
    }
    entries.push(Entry::File {
        path: "/init".into(),
        mode: 0o755,
        data: init.as_bytes().to_vec(),
    });
    let mut bytes = Vec::new();
    cpio::write(&mut bytes, &entries)?;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// An ext4 image of `dir` (`mke2fs -d`), with fixed UUID, hash seed and times. `mke2fs`
/// copies each file's times from `dir`, and a ctime cannot be set from user space, so
/// every inode's times are then set to [`EPOCH`] with `debugfs` (on the image file; no
/// mount).
pub fn make_ext4(dir: &Path, out: &Path, mib: u64, label: &str, uuid: &str) -> Result<()> {
    if out.exists() {
        std::fs::remove_file(out)?;
    }
    let mut paths = vec!["/".to_string(), "/lost+found".to_string()];
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(char::is_whitespace) || name.contains('"') {
                bail!(
                    "{}: names with spaces or quotes are not supported in the data partition",
                    e.path().display()
                );
            }
            let r = format!("{rel}/{name}");
            if e.file_type()?.is_dir() {
                stack.push((e.path(), r.clone()));
            }
            paths.push(r);
        }
    }
    let status = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", label, "-U", uuid])
        .args(["-E", &format!("root_owner=0:0,hash_seed={uuid}")])
        .arg("-d")
        .arg(dir)
        .arg(out)
        .arg(format!("{mib}M"))
        .env("E2FSPROGS_FAKE_TIME", EPOCH.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .context("running mke2fs (Debian package e2fsprogs)")?;
    if !status.success() {
        bail!("mke2fs failed ({status}) making {}", out.display());
    }
    let mut script = String::new();
    for p in &paths {
        for field in ["atime", "mtime", "ctime", "crtime"] {
            script.push_str(&format!(
                "sif {p} {field} @{EPOCH}\nsif {p} {field}_extra 0\n"
            ));
        }
    }
    let script_path = out.with_extension("debugfs");
    std::fs::write(&script_path, script)?;
    let done = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(out)
        .env("E2FSPROGS_FAKE_TIME", EPOCH.to_string())
        .output()
        .context("running debugfs (Debian package e2fsprogs)")?;
    std::fs::remove_file(&script_path)?;
    if !done.status.success() {
        bail!(
            "debugfs failed ({}) setting times in {}: {}",
            done.status,
            out.display(),
            String::from_utf8_lossy(&done.stderr)
        );
    }
    Ok(())
}
