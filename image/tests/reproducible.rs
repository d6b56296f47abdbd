//! Two builds of the same board from the same inputs give identical bytes.

use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

#[test]
fn two_builds_give_identical_bytes() -> anyhow::Result<()> {
    // x86_64 packages come in the machine's own architecture, aarch64 ones through the
    // builder's private apt directory.
    for board in ["qemu-x86_64", "qemu-aarch64-virt"] {
        builds_are_identical(board)?;
    }
    Ok(())
}

fn builds_are_identical(board: &str) -> anyhow::Result<()> {
    let root = repo();
    // Any executable stands in for perchd: this checks the builder, not the agent.
    let dir = tempfile::tempdir()?;
    let fake_perchd = dir.path().join("perchd");
    std::fs::write(&fake_perchd, b"#!/bin/sh\necho perchd\n")?;
    let inputs = perch_image::Inputs {
        board_file: root.join(format!("board-configs/{board}.toml")),
        perchd: fake_perchd,
        lock: root.join("image/debian.lock"),
        device_config: "board = \"sim\"\n".into(),
        data_files: vec![("components/readme.txt".into(), b"preloaded".to_vec())],
        data_mib: 16,
    };
    let a = perch_image::build(&inputs, &dir.path().join("a"))?;
    let b = perch_image::build(&inputs, &dir.path().join("b"))?;
    for (x, y) in [
        (&a.kernel, &b.kernel),
        (&a.initrd, &b.initrd),
        (&a.data, &b.data),
    ] {
        let (bx, by) = (std::fs::read(x)?, std::fs::read(y)?);
        assert!(!bx.is_empty(), "{} is empty", x.display());
        assert!(bx == by, "{} and {} differ", x.display(), y.display());
    }
    // The initramfs holds the agent, busybox, /init and the board's modules with their
    // dependencies (ext4 needs jbd2, mbcache and crc16, and crc32c before it).
    let initrd = String::from_utf8_lossy(&std::fs::read(&a.initrd)?).into_owned();
    let board_file = format!("etc/perch/boards/{board}.toml");
    for name in [
        board_file.as_str(),
        "usr/bin/perchd",
        "bin/busybox",
        "init",
        "lib/modules/virtio_blk.ko",
        "lib/modules/jbd2.ko",
        "lib/modules/ext4.ko",
        "lib/modules/crc32c_generic.ko",
    ] {
        assert!(
            initrd.contains(&format!("{name}\0")),
            "{name} missing from the initramfs"
        );
    }
    let order = |m: &str| {
        initrd
            .find(&format!("lib/modules/{m}.ko\0"))
            .unwrap_or(usize::MAX)
    };
    assert!(order("jbd2") < order("ext4") && order("crc32c_generic") < order("ext4"));
    Ok(())
}

#[test]
fn a_board_without_a_bootloader_gets_no_image() -> anyhow::Result<()> {
    let root = repo();
    let dir = tempfile::tempdir()?;
    let inputs = perch_image::Inputs {
        board_file: root.join("board-configs/raspberry-pi-4.toml"),
        perchd: dir.path().join("perchd"),
        lock: root.join("image/debian.lock"),
        device_config: String::new(),
        data_files: Vec::new(),
        data_mib: 16,
    };
    let e = perch_image::build(&inputs, &dir.path().join("out"))
        .expect_err("a Raspberry Pi image cannot boot yet");
    let text = e.to_string();
    assert!(
        text.contains("board `raspberry-pi-4` names no `bootloader`") && text.contains("tryboot"),
        "{text}"
    );
    assert!(
        !dir.path().join("out").exists(),
        "nothing is written for a refused board"
    );
    Ok(())
}
