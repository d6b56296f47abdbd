//! The flashable disk: an MBR with four primary partitions (boot, slot A, slot B, data),
//! FAT filesystems made with mtools, and the U-Boot boot script, all written to plain files
//! (no loop devices, no root mounts) with fixed serials and times.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Bytes in a sector.
pub const SECTOR: u64 = 512;
/// Where the first partition starts (1 MiB, the usual alignment for flash media).
pub const FIRST_LBA: u64 = 2048;
/// MBR partition type of a FAT32 (LBA) filesystem.
pub const TYPE_FAT: u8 = 0x0c;
/// MBR partition type of a Linux filesystem.
pub const TYPE_LINUX: u8 = 0x83;

/// One primary partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub kind: u8,
    pub bootable: bool,
    /// Its filesystem image; the partition is the image's size rounded up to 1 MiB.
    pub image: std::path::PathBuf,
}

/// Where each partition landed: (first sector, sectors).
pub type Placement = Vec<(u64, u64)>;

/// The 512-byte MBR for partitions at `placement`, with disk signature `signature`.
pub fn mbr(kinds: &[(u8, bool)], placement: &[(u64, u64)], signature: u32) -> Result<[u8; 512]> {
    if kinds.len() > 4 || kinds.len() != placement.len() {
        bail!("an MBR holds at most four primary partitions");
    }
    let mut s = [0u8; 512];
    s[440..444].copy_from_slice(&signature.to_le_bytes());
    for (i, (&(kind, bootable), &(start, len))) in kinds.iter().zip(placement).enumerate() {
        let start = u32::try_from(start).context("partition start beyond 2 TiB")?;
        let len = u32::try_from(len).context("partition beyond 2 TiB")?;
        let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
        e[0] = if bootable { 0x80 } else { 0 };
        // CHS fields say "use LBA" (the maximum), as every modern tool writes them.
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = kind;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    Ok(s)
}

/// Writes the disk `out`: the MBR, then each partition's image at 1 MiB-aligned offsets
/// (the file stays sparse where images are). Returns where each partition landed.
pub fn write(out: &Path, parts: &[Partition], signature: u32) -> Result<Placement> {
    let align = FIRST_LBA;
    let mut placement = Vec::new();
    let mut next = FIRST_LBA;
    for p in parts {
        let bytes = std::fs::metadata(&p.image)
            .with_context(|| format!("reading {}", p.image.display()))?
            .len();
        let sectors = bytes.div_ceil(SECTOR).div_ceil(align) * align;
        placement.push((next, sectors));
        next += sectors;
    }
    let kinds: Vec<(u8, bool)> = parts.iter().map(|p| (p.kind, p.bootable)).collect();
    let table = mbr(&kinds, &placement, signature)?;
    let mut f =
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.write_all(&table)?;
    for (p, &(start, _)) in parts.iter().zip(&placement) {
        f.seek(SeekFrom::Start(start * SECTOR))?;
        copy_sparse(&p.image, &mut f)?;
    }
    f.set_len(next * SECTOR)?;
    f.sync_all()?;
    Ok(placement)
}

/// Copies `from` into `to` at its position, seeking over whole zero blocks so the result
/// stays sparse.
fn copy_sparse(from: &Path, to: &mut std::fs::File) -> Result<()> {
    use std::io::Read;
    let mut src = std::fs::File::open(from)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        for chunk in buf[..n].chunks(4096) {
            if chunk.iter().all(|&b| b == 0) {
                to.seek(SeekFrom::Current(chunk.len() as i64))?;
            } else {
                to.write_all(chunk)?;
            }
        }
    }
}

/// A FAT filesystem image of `mib` MiB holding `files` (flat: names only) with volume
/// serial `serial`, made with mtools. Every file's times are [`crate::EPOCH`].
pub fn make_vfat(out: &Path, mib: u64, serial: u32, files: &[(&str, &Path)]) -> Result<()> {
    let f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(mib << 20)?;
    drop(f);
    run(Command::new("mformat")
        .arg("-i")
        .arg(out)
        .args(["-N", &format!("{serial:08x}"), "::"]))
    .context("making a FAT filesystem (Debian package mtools)")?;
    let epoch = std::time::UNIX_EPOCH + std::time::Duration::from_secs(crate::EPOCH);
    for (name, src) in files {
        if name.contains('/') {
            bail!("`{name}`: the FAT partitions are flat, without folders");
        }
        // mcopy -m keeps the source's modification time, so the source gets the epoch.
        std::fs::File::options()
            .write(true)
            .open(src)
            .and_then(|f| f.set_modified(epoch))
            .with_context(|| format!("setting the time of {}", src.display()))?;
        run(Command::new("mcopy")
            .args(["-m", "-o", "-i"])
            .arg(out)
            .arg(src)
            .arg(format!("::{name}")))
        .with_context(|| format!("copying {name} into {}", out.display()))?;
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// U-Boot's architecture number for a board arch.
fn uboot_arch(arch: &str) -> Result<u8> {
    Ok(match arch {
        "aarch64" => 22,
        "armv7" => 2,
        other => bail!("no U-Boot image architecture for `{other}`"),
    })
}

/// A U-Boot script image (what `mkimage -T script` makes): a legacy image header, then the
/// multi-image size table (one entry, zero-terminated) and the script.
pub fn uboot_script(script: &str, arch: &str, name: &str) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    data.extend_from_slice(&(script.len() as u32).to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(script.as_bytes());
    let mut h = [0u8; 64];
    h[0..4].copy_from_slice(&0x2705_1956u32.to_be_bytes());
    h[8..12].copy_from_slice(&(crate::EPOCH as u32).to_be_bytes());
    h[12..16].copy_from_slice(&(data.len() as u32).to_be_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(&data).to_be_bytes());
    h[28] = 5; // Linux
    h[29] = uboot_arch(arch)?;
    h[30] = 6; // script
    h[31] = 0; // not compressed
    let n = name.len().min(31);
    h[32..32 + n].copy_from_slice(&name.as_bytes()[..n]);
    let hcrc = crc32fast::hash(&h);
    h[4..8].copy_from_slice(&hcrc.to_be_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(&data);
    Ok(out)
}

/// The A/B boot script U-Boot runs from the boot partition. The boot state lives in
/// `perch.env` there (`perch_slot=a|b`, and `perch_try=<slot>` for a one-shot trial): a
/// pending trial is consumed before its boot (U-Boot writes the file back without it and
/// records `perch_tried`), so a trial that never commits falls back to `perch_slot` on the
/// next boot. The agent commits a healthy trial by rewriting the file (`perch_slot=<new>`).
pub fn ab_script(console: &str, boot_cmd: &str) -> String {
    format!(
        r#"echo "perch: A/B boot"
setenv perch_slot a
setenv perch_try
setenv perch_tried
if load virtio 0:1 ${{loadaddr}} perch.env; then env import -t ${{loadaddr}} ${{filesize}}; fi
setenv perch_boot ${{perch_slot}}
setenv perch_trial 0
if test -n "${{perch_try}}"; then
  setenv perch_boot ${{perch_try}}
  setenv perch_trial 1
  setenv perch_tried ${{perch_try}}
  setenv perch_try
  env export -t ${{loadaddr}} perch_slot perch_tried
  fatwrite virtio 0:1 ${{loadaddr}} perch.env ${{filesize}}
fi
if test "${{perch_boot}}" = "b"; then setenv perch_part 3; else setenv perch_part 2; fi
echo "perch: booting slot ${{perch_boot}} (partition ${{perch_part}}, trial ${{perch_trial}})"
load virtio 0:${{perch_part}} ${{kernel_addr_r}} vmlinuz
load virtio 0:${{perch_part}} ${{ramdisk_addr_r}} initrd.img
setenv bootargs "console={console} panic=-1 loglevel=6 perch.slot=${{perch_boot}} perch.trial=${{perch_trial}}"
{boot_cmd} ${{kernel_addr_r}} ${{ramdisk_addr_r}}:${{filesize}} ${{fdt_addr}}
echo "perch: slot ${{perch_boot}} did not boot"
reset
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mbr_has_four_entries_and_the_boot_signature() {
        let kinds = [
            (TYPE_FAT, true),
            (TYPE_FAT, false),
            (TYPE_FAT, false),
            (TYPE_LINUX, false),
        ];
        let place = [
            (2048, 32768),
            (34816, 262144),
            (296960, 262144),
            (559104, 524288),
        ];
        let s = mbr(&kinds, &place, 0x5045_5243).expect("mbr");
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        assert_eq!(&s[440..444], &0x5045_5243u32.to_le_bytes());
        assert_eq!(s[446], 0x80, "the boot partition is active");
        assert_eq!(s[446 + 16], 0);
        assert_eq!(s[446 + 48 + 4], TYPE_LINUX);
        let start = u32::from_le_bytes(s[446 + 16 + 8..446 + 16 + 12].try_into().expect("4"));
        assert_eq!(start, 34816);
        assert!(mbr(&[(TYPE_FAT, false); 5], &[(0, 0); 5], 0).is_err());
    }

    #[test]
    fn a_script_image_has_valid_checksums() {
        let img = uboot_script("echo hi\n", "aarch64", "perch").expect("image");
        assert_eq!(&img[0..4], &0x2705_1956u32.to_be_bytes());
        let mut h = img[..64].to_vec();
        let hcrc = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        h[4..8].fill(0);
        assert_eq!(crc32fast::hash(&h), hcrc);
        let data = &img[64..];
        assert_eq!(
            u32::from_be_bytes(img[24..28].try_into().expect("4")),
            crc32fast::hash(data)
        );
        assert_eq!(&data[8..], b"echo hi\n");
        assert_eq!(u32::from_be_bytes(data[0..4].try_into().expect("4")), 8);
    }
}
