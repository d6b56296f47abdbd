//! A/B system updates through U-Boot: a good slot image installed over the API boots as a
//! trial, passes the health gate and commits; a bad one (an agent that never comes up)
//! fails its trial, and the next boot falls back to the committed slot, still running what
//! it ran before, and reports the rollback.
//!
//! Runs on boards whose bootloader is U-Boot (`PERCH_HIL_BOARD`, default
//! `qemu-aarch64-virt`); a board booted directly by QEMU has no A/B loader to test and says
//! so. With `PERCH_HIL_TARGET=host:port` it updates that real board (running a Perch image
//! of `PERCH_HIL_BOARD`) instead, from whichever slot it runs.

use std::time::Duration;

use perch_hil::{Machine, image};
use perch_tests::examples;
use serde_json::Value;

fn board() -> String {
    std::env::var("PERCH_HIL_BOARD").unwrap_or_else(|_| "qemu-aarch64-virt".into())
}

fn boot_state(m: &Machine) -> anyhow::Result<Value> {
    Ok(m.get("/v1/status")?["boot"].clone())
}

/// Waits (through a reboot: the API is down meanwhile) until the agent reports `want`
/// for the boot state's fields.
fn wait_boot(m: &mut Machine, what: &str, want: &[(&str, Value)]) -> anyhow::Result<Value> {
    m.wait_for(Duration::from_secs(420), what, |m| {
        let b = boot_state(m)?;
        Ok(want.iter().all(|(k, v)| b[*k] == *v).then_some(b))
    })
}

#[test]
fn a_good_update_commits_and_a_bad_one_rolls_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let good = image::build_with(&board(), &dir.path().join("good"), None, &[])?;
    if good.bootloader != "u-boot" {
        eprintln!(
            "hil: {} boots its kernel directly (bootloader `{}`): no A/B loader to test here",
            board(),
            good.bootloader
        );
        return Ok(());
    }
    // The bad update: the same system with an agent that exits at once, so the trial boot
    // never becomes healthy.
    let broken = dir.path().join("broken-perchd");
    std::fs::write(&broken, "#!/bin/sh\necho 'perchd: broken build'\nexit 1\n")?;
    let bad = image::build_with(&board(), &dir.path().join("bad"), Some(broken), &[])?;

    let mut m = match Machine::target() {
        Some(t) => Machine::attach(&t)?,
        None => {
            let mut m = Machine::boot(&good.spec)?;
            let boot = m.wait_healthy(Duration::from_secs(240))?;
            eprintln!(
                "hil: {}: healthy {boot:?} after power-on (through U-Boot)",
                board()
            );
            m
        }
    };
    let b = boot_state(&m)?;
    assert_eq!(b["committed"], true, "{b}");
    let first = b["slot"].as_str().unwrap_or_default().to_string();
    let other = if first == "a" { "b" } else { "a" };
    if m.emulated() {
        assert_eq!(first, "a", "a new disk boots slot a: {b}");
    }
    let (status, body) = m.send(
        "PUT",
        "/v1/components/timer?trigger=every:1s",
        examples::bytes(examples::TIMER),
    )?;
    anyhow::ensure!(status == 201, "deploy answered {status}: {body}");
    m.wait_running("timer", Duration::from_secs(120))?;
    let revision = m.get("/v1/status")?["revision"].clone();

    // Good update: the other slot is written, tried, found healthy and committed.
    let (status, body) = m.send("PUT", "/v1/system/update", std::fs::read(&good.slot)?)?;
    anyhow::ensure!(status == 202, "the update answered {status}: {body}");
    assert_eq!(body["slot"], other, "{body}");
    assert_eq!(body["rebooting"], true, "{body}");
    let b = wait_boot(
        &mut m,
        &format!("slot {other} committed after its trial boot"),
        &[("slot", other.into()), ("committed", true.into())],
    )?;
    eprintln!("hil: good update: {b}");
    assert_eq!(b.get("rolled-back-from"), None, "{b}");
    m.wait_running("timer", Duration::from_secs(120))?;
    assert_eq!(
        m.get("/v1/status")?["revision"],
        revision,
        "the data partition came along"
    );

    // Bad update into the first slot: its trial never commits, so the device goes back.
    let (status, body) = m.send("PUT", "/v1/system/update", std::fs::read(&bad.slot)?)?;
    anyhow::ensure!(status == 202, "the update answered {status}: {body}");
    assert_eq!(body["slot"], first.as_str(), "{body}");
    if m.emulated() {
        m.wait_for(
            Duration::from_secs(240),
            "the trial boot of the broken slot",
            |m| {
                Ok(m.console_tail(400)
                    .contains("perchd: broken build")
                    .then_some(()))
            },
        )?;
    }
    let b = wait_boot(
        &mut m,
        &format!("the rollback to slot {other}"),
        &[
            ("slot", other.into()),
            ("committed", true.into()),
            ("rolled-back-from", first.as_str().into()),
        ],
    )?;
    eprintln!("hil: bad update: {b}");
    assert_eq!(b["trial"], false, "{b}");
    m.wait_running("timer", Duration::from_secs(120))?;
    assert_eq!(m.get("/v1/status")?["revision"], revision);

    // A refused image changes nothing.
    let (status, body) = m.send("PUT", "/v1/system/update", b"not a filesystem".to_vec())?;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("not a FAT filesystem"), "{body}");
    assert_eq!(boot_state(&m)?.get("pending"), None);
    Ok(())
}
