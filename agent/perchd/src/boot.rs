//! A/B system updates: which slot this boot came from, installing a slot image into the
//! other slot, and committing a trial boot once the agent is healthy.
//!
//! The state machine (docs/images.md) lives in `perch.env` on the boot partition, a file
//! of `key=value` lines both the bootloader and the agent read and write:
//! - `perch_slot=a|b`: the committed slot, booted by default;
//! - `perch_try=<slot>`: set by the agent after installing; the bootloader consumes it
//!   (removes it before booting) and boots that slot once with `perch.trial=1`;
//! - `perch_tried=<slot>`: set by the bootloader when it consumes a trial. The agent clears
//!   it when it commits; found on a non-trial boot it means the trial failed and the
//!   device rolled back.
//!
//! The kernel command line says which slot booted (`perch.slot=`) and whether it is a trial
//! (`perch.trial=1`). Updates are possible only when both are there and the board names
//! its `disk`.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use perch_core::board::partition;
use perch_core::{BootStatus, CommandError, ComponentState, Digest, ErrorKind};

/// The boot partition's mount point (the image's `/init` mounts it there).
pub const BOOT_DIR: &str = "/boot";
/// The A/B state file on the boot partition.
pub const BOOT_ENV: &str = "perch.env";
/// How long every component must have been running before a trial boot commits.
pub const HEALTHY_FOR: Duration = Duration::from_secs(5);

/// Why an A/B operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("this device has no A/B slots: {0}")]
    NoSlots(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the slot image is {got} bytes and slot {slot} ({device}) holds {room}")]
    TooBig {
        slot: String,
        device: String,
        got: u64,
        room: u64,
    },
    #[error("slot {slot} reads back with digest {got}, not the written {want}")]
    Verify {
        slot: String,
        got: Digest,
        want: Digest,
    },
    #[error("the slot image's digest is {got}, not the expected {want}")]
    Digest { got: Digest, want: Digest },
    #[error("the slot image is not a FAT filesystem (no boot sector signature)")]
    NotASlotImage,
}

impl From<BootError> for CommandError {
    fn from(e: BootError) -> Self {
        let kind = match &e {
            BootError::NoSlots(_) => ErrorKind::Conflict,
            BootError::TooBig { .. } | BootError::Digest { .. } | BootError::NotASlotImage => {
                ErrorKind::Rejected
            }
            BootError::Io { .. } | BootError::Verify { .. } => ErrorKind::Internal,
        };
        CommandError::new(kind, e.to_string())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// This boot's A/B facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    /// The slot that booted (`a` or `b`).
    pub booted: String,
    /// Whether this is a one-shot trial of a newly installed slot.
    pub trial: bool,
    /// The slot partitions (`a`, `b`).
    pub devices: [PathBuf; 2],
    /// Where the boot partition is mounted.
    pub boot_dir: PathBuf,
}

impl Slots {
    /// The A/B facts of a boot from its kernel command line, the board's disk and the boot
    /// partition's mount point; an error says why updates are not possible here.
    pub fn detect(cmdline: &str, disk: Option<&str>, boot_dir: &Path) -> Result<Self, BootError> {
        let arg = |key: &str| {
            cmdline
                .split_whitespace()
                .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
        };
        let booted = match arg("perch.slot") {
            Some(s @ ("a" | "b")) => s.to_string(),
            Some(other) => {
                return Err(BootError::NoSlots(format!(
                    "the kernel command line names slot `{other}`; expected a or b"
                )));
            }
            None => {
                return Err(BootError::NoSlots(
                    "the kernel command line has no `perch.slot=` (not booted from a Perch image)"
                        .into(),
                ));
            }
        };
        let disk =
            disk.ok_or_else(|| BootError::NoSlots("the board config names no `disk`".into()))?;
        if !boot_dir.join(BOOT_ENV).is_file() {
            return Err(BootError::NoSlots(format!(
                "{} is missing (the boot partition is not mounted)",
                boot_dir.join(BOOT_ENV).display()
            )));
        }
        Ok(Self {
            booted,
            trial: arg("perch.trial") == Some("1"),
            devices: [partition(disk, 2).into(), partition(disk, 3).into()],
            boot_dir: boot_dir.to_path_buf(),
        })
    }

    /// Reads this machine's A/B facts (`/proc/cmdline`, the board's disk, [`BOOT_DIR`]).
    pub fn from_system(disk: Option<&str>) -> Result<Self, BootError> {
        let cmdline =
            std::fs::read_to_string("/proc/cmdline").map_err(io(Path::new("/proc/cmdline")))?;
        Self::detect(&cmdline, disk, Path::new(BOOT_DIR))
    }

    fn env_path(&self) -> PathBuf {
        self.boot_dir.join(BOOT_ENV)
    }

    /// The other slot.
    pub fn inactive(&self) -> &'static str {
        if self.booted == "a" { "b" } else { "a" }
    }

    fn device(&self, slot: &str) -> &Path {
        &self.devices[usize::from(slot == "b")]
    }

    /// The boot state as reported in the agent's status.
    pub fn status(&self) -> BootStatus {
        let env = read_env(&self.env_path()).unwrap_or_default();
        let committed = env.get("perch_slot").map(String::as_str) == Some(self.booted.as_str());
        let tried = env.get("perch_tried").cloned();
        BootStatus {
            slot: self.booted.clone(),
            trial: self.trial,
            committed,
            pending: env.get("perch_try").cloned(),
            rolled_back_from: tried.filter(|t| !self.trial && *t != self.booted),
        }
    }

    /// Commits the booted slot: it becomes the default, and the trial record is cleared.
    pub fn commit(&self) -> Result<(), BootError> {
        let path = self.env_path();
        let mut env = read_env(&path)?;
        env.insert("perch_slot".into(), self.booted.clone());
        env.remove("perch_tried");
        env.remove("perch_try");
        write_env(&path, &env)
    }

    /// Writes `image` (a slot's FAT filesystem) into the inactive slot, reads it back to
    /// verify it, and marks a one-shot trial of that slot for the next boot. Returns the
    /// slot written.
    pub fn install(&self, image: &[u8], expected: Option<&Digest>) -> Result<String, BootError> {
        let digest = Digest::of(image);
        if let Some(want) = expected
            && *want != digest
        {
            return Err(BootError::Digest {
                got: digest,
                want: *want,
            });
        }
        if image.len() < 512 || image[510..512] != [0x55, 0xaa] {
            return Err(BootError::NotASlotImage);
        }
        let slot = self.inactive();
        let device = self.device(slot);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .map_err(io(device))?;
        let room = f.seek(SeekFrom::End(0)).map_err(io(device))?;
        if image.len() as u64 > room {
            return Err(BootError::TooBig {
                slot: slot.into(),
                device: device.display().to_string(),
                got: image.len() as u64,
                room,
            });
        }
        tracing::info!(slot, device = %device.display(), bytes = image.len(), "writing the slot image");
        f.seek(SeekFrom::Start(0)).map_err(io(device))?;
        for (i, chunk) in image.chunks(4 << 20).enumerate() {
            f.write_all(chunk).map_err(io(device))?;
            if i % 8 == 7 {
                tracing::info!(
                    slot,
                    written = (i + 1) * chunk.len(),
                    total = image.len(),
                    "writing the slot image"
                );
            }
        }
        f.sync_all().map_err(io(device))?;
        // Read back what the device holds (past the page cache as far as a block device
        // lets a plain read go: the data was just synced) and compare.
        f.seek(SeekFrom::Start(0)).map_err(io(device))?;
        let mut back = vec![0u8; image.len()];
        f.read_exact(&mut back).map_err(io(device))?;
        let got = Digest::of(&back);
        if got != digest {
            return Err(BootError::Verify {
                slot: slot.into(),
                got,
                want: digest,
            });
        }
        let path = self.env_path();
        let mut env = read_env(&path)?;
        env.insert("perch_slot".into(), self.booted.clone());
        env.insert("perch_try".into(), slot.into());
        env.remove("perch_tried");
        write_env(&path, &env)?;
        tracing::info!(
            slot,
            "slot image installed and verified; the next boot tries it once"
        );
        Ok(slot.into())
    }
}

/// The `key=value` lines of an env file.
pub fn read_env(path: &Path) -> Result<BTreeMap<String, String>, BootError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(_, v)| !v.is_empty())
        .collect())
}

/// Replaces an env file durably: a new file, synced, renamed over the old one, and the
/// directory synced (FAT has no journal: the rename is the commit point).
pub fn write_env(path: &Path, env: &BTreeMap<String, String>) -> Result<(), BootError> {
    let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let tmp = path.with_extension("new");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// Flushes every filesystem and restarts the machine (the bootloader then runs its A/B
/// script). Returns only when the kernel refuses (not root, or in a container).
pub fn reboot() {
    // SAFETY: sync and reboot take no pointers; reboot(2) either restarts the machine or
    // fails with an errno.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync();
        if libc::reboot(libc::RB_AUTOBOOT) != 0 {
            tracing::error!(error = %std::io::Error::last_os_error(), "reboot failed");
        }
    }
}

/// The health gate of a trial boot: once every component of the running set has been
/// `running` for [`HEALTHY_FOR`], the slot is committed. Until then nothing is written, so
/// a slot that never gets there is left uncommitted and `/init` reboots into the previous
/// one when the trial's time is up.
pub async fn gate(agent: Arc<crate::Agent>, slots: Slots) {
    if !slots.trial {
        return;
    }
    tracing::info!(slot = %slots.booted, "trial boot: committing once every component runs");
    let mut healthy_since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let status = agent.status();
        let all_running = status
            .components
            .iter()
            .all(|c| c.state == ComponentState::Running);
        if !all_running {
            healthy_since = None;
            continue;
        }
        let since = *healthy_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < HEALTHY_FOR {
            continue;
        }
        match slots.commit() {
            Ok(()) => tracing::info!(
                slot = %slots.booted,
                components = status.components.len(),
                "trial boot healthy: slot committed"
            ),
            Err(e) => tracing::error!(error = %e, "could not commit the trial slot"),
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot_dir(env: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join(BOOT_ENV), env).expect("write");
        d
    }

    #[test]
    fn the_command_line_and_the_board_say_whether_updates_are_possible() {
        let d = boot_dir("perch_slot=a\n");
        let s = Slots::detect(
            "console=ttyAMA0 perch.slot=a perch.trial=0",
            Some("/dev/vda"),
            d.path(),
        )
        .expect("slots");
        assert_eq!(
            s.devices,
            [PathBuf::from("/dev/vda2"), PathBuf::from("/dev/vda3")]
        );
        assert_eq!(
            (s.booted.as_str(), s.trial, s.inactive()),
            ("a", false, "b")
        );
        let mmc = Slots::detect("perch.slot=b perch.trial=1", Some("/dev/mmcblk0"), d.path())
            .expect("slots");
        assert_eq!(mmc.devices[1], PathBuf::from("/dev/mmcblk0p3"));
        assert!(mmc.trial);
        for (cmdline, disk) in [
            ("console=ttyS0", Some("/dev/vda")),
            ("perch.slot=c", Some("/dev/vda")),
            ("perch.slot=a", None),
        ] {
            let e = Slots::detect(cmdline, disk, d.path()).expect_err(cmdline);
            assert!(matches!(e, BootError::NoSlots(_)), "{e}");
        }
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(Slots::detect("perch.slot=a", Some("/dev/vda"), empty.path()).is_err());
    }

    #[test]
    fn install_writes_the_inactive_slot_and_marks_a_trial_that_commit_clears() {
        let d = boot_dir("perch_slot=a\n");
        // Files stand in for the slot partitions.
        let a = d.path().join("slot-a");
        let b = d.path().join("slot-b");
        std::fs::write(&a, vec![0u8; 8192]).expect("a");
        std::fs::write(&b, vec![0u8; 8192]).expect("b");
        let slots = Slots {
            booted: "a".into(),
            trial: false,
            devices: [a.clone(), b.clone()],
            boot_dir: d.path().to_path_buf(),
        };
        let mut image = vec![7u8; 4096];
        image[510] = 0x55;
        image[511] = 0xaa;
        let wrong = Digest::of(b"something else");
        assert!(matches!(
            slots.install(&image, Some(&wrong)),
            Err(BootError::Digest { .. })
        ));
        assert!(matches!(
            slots.install(&[1u8; 1024], None),
            Err(BootError::NotASlotImage)
        ));
        let mut huge = vec![0u8; 16384];
        huge[510] = 0x55;
        huge[511] = 0xaa;
        assert!(matches!(
            slots.install(&huge, None),
            Err(BootError::TooBig { .. })
        ));
        assert_eq!(
            std::fs::read(&b).expect("b"),
            vec![0u8; 8192],
            "refusals write nothing"
        );

        assert_eq!(
            slots
                .install(&image, Some(&Digest::of(&image)))
                .expect("install"),
            "b"
        );
        assert_eq!(&std::fs::read(&b).expect("b")[..4096], &image[..]);
        assert_eq!(
            std::fs::read(&a).expect("a"),
            vec![0u8; 8192],
            "the running slot is untouched"
        );
        let st = slots.status();
        assert_eq!((st.committed, st.pending.as_deref()), (true, Some("b")));

        // The bootloader consumes the trial; the trial boot of b commits.
        let mut env = read_env(&d.path().join(BOOT_ENV)).expect("env");
        env.remove("perch_try");
        env.insert("perch_tried".into(), "b".into());
        write_env(&d.path().join(BOOT_ENV), &env).expect("env");
        let trial = Slots {
            booted: "b".into(),
            trial: true,
            ..slots.clone()
        };
        assert!(!trial.status().committed);
        assert_eq!(trial.status().rolled_back_from, None);
        // Had it not committed, the next boot (of a) would report the rollback.
        assert_eq!(slots.status().rolled_back_from.as_deref(), Some("b"));
        trial.commit().expect("commit");
        assert_eq!(
            std::fs::read_to_string(d.path().join(BOOT_ENV)).expect("env"),
            "perch_slot=b\n"
        );
        assert!(trial.status().committed);
    }
}
