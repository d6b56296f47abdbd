//! Power cuts in QEMU: the VM is killed without warning while a component writes telemetry
//! and while a deploy is under way. After the next boot every record the agent had
//! reported as stored is there, the desired-state journal is intact, and the agent runs
//! what it last committed.
//!
//! Needs the board's image (built here; the first build downloads the pinned Debian
//! packages and cross-builds perchd). `PERCH_HIL_BOARD` picks the board (default
//! `qemu-x86_64`).

use std::time::Duration;

use perch_hil::{Machine, image};
use perch_tests::{artifact, examples, repo_root};
use serde_json::Value;

fn board() -> String {
    std::env::var("PERCH_HIL_BOARD").unwrap_or_else(|_| "qemu-aarch64-virt".into())
}

fn outbox(m: &Machine) -> anyhow::Result<Value> {
    Ok(m.get("/v1/status")?["outbox"].clone())
}

#[test]
fn acknowledged_telemetry_and_the_journal_survive_power_cuts() -> anyhow::Result<()> {
    if let Some(t) = Machine::target() {
        eprintln!(
            "hil: {t}: power cuts need QEMU (or a switched supply the harness lacks): skipped"
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let spec = image::build(&board(), dir.path())?;

    let mut m = Machine::boot(&spec)?;
    let marker = m.kernel_start_marker();
    let kernel = m.wait_console(marker, Duration::from_secs(120))?;
    let boot = m.wait_healthy(Duration::from_secs(180))?;
    eprintln!(
        "hil: {}: kernel started {kernel:.1?} and the agent healthy {boot:.1?} after power-on",
        board()
    );
    let burst = artifact(
        examples::BURST,
        &repo_root().join("fixtures/burst/Cargo.toml"),
        None,
        |m| {
            m.config.insert("total".into(), "1000000".into());
            m.config.insert("batch".into(), "20".into());
        },
    )?;
    let (status, body) = m.send("POST", "/v1/components", burst)?;
    anyhow::ensure!(status == 201, "deploy answered {status}: {body}");

    // Records are being appended; what the agent reports as stored is durable.
    m.wait_for(Duration::from_secs(120), "telemetry being written", |m| {
        Ok((outbox(m)?["last-seq"].as_u64() > Some(300)).then_some(()))
    })?;
    let stored = outbox(&m)?["last-seq"].as_u64().unwrap_or(0);
    let spec = m.power_cut()?;

    let mut m = Machine::boot(&spec)?;
    m.wait_healthy(Duration::from_secs(180))?;
    let after = outbox(&m)?;
    let last = after["last-seq"].as_u64().unwrap_or(0);
    eprintln!("hil: {stored} records stored before the power cut; {last} in the outbox after it");
    assert!(
        last >= stored,
        "records 1..={stored} were reported stored before the cut; after it the outbox ends at {last}: {after}"
    );
    assert_eq!(after["dropped"], 0, "{after}");
    // Nothing is ever sent without [sync], so no record may be missing below the last.
    assert_eq!(after["backlog"].as_u64(), Some(last), "{after}");
    let s = m.get("/v1/status")?;
    assert_eq!(s["revision"], 1, "the journal after the cut: {s}");
    m.wait_running("burst", Duration::from_secs(120))?;

    // A cut while a deploy is under way: after the next boot the agent runs either the old
    // set or the new one, healthy, with its journal readable.
    let timer = examples::bytes(examples::TIMER);
    let api = m.api();
    let deploy = std::thread::spawn(move || {
        let _ = reqwest::blocking::Client::new()
            .put(format!("{api}/v1/components/timer?trigger=every:1s"))
            .timeout(Duration::from_secs(60))
            .body(timer)
            .send();
    });
    std::thread::sleep(Duration::from_millis(400));
    let spec = m.power_cut()?;
    let _ = deploy.join();
    let mut m = Machine::boot(&spec)?;
    m.wait_healthy(Duration::from_secs(180))?;
    let s = m.get("/v1/status")?;
    let revision = s["revision"].as_u64();
    eprintln!("hil: after a power cut during a deploy the agent runs revision {revision:?}");
    assert!(
        matches!(revision, Some(1) | Some(2)),
        "revision after a cut during a deploy: {s}"
    );
    let components = m.get("/v1/components")?;
    let names: Vec<&str> = components
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    let expected: &[&str] = if revision == Some(2) {
        &["burst", "timer"]
    } else {
        &["burst"]
    };
    assert_eq!(names, expected, "{components}");
    Ok(())
}
