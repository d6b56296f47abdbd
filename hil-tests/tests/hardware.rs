//! A first boot with no network runs the components the image ships, and they reach the
//! board's real kernel drivers through the providers: on QEMU's aarch64 `virt` the `fan`
//! and `led` lines are the PL061 GPIO controller's (written through the character-device
//! uAPI, read back through the driver). A board whose QEMU emulates a TMP105 (`tmp105,id=tmp0`
//! in `qemu-devices`) has its I2C sensors read through i2c-dev at temperatures the test sets
//! over QMP; Debian 12's QEMU builds that model only for ARM machines, whose `virt` has no
//! I2C bus, so no board here has one yet.
//!
//! `PERCH_HIL_BOARD` picks the board (default `qemu-aarch64-virt`).

use std::time::Duration;

use perch_core::board::{BoardConfig, LineSource, SensorSource};
use perch_hil::{Machine, image};
use perch_tests::{artifact, examples, repo_root};
use serde_json::json;

fn board() -> String {
    std::env::var("PERCH_HIL_BOARD").unwrap_or_else(|_| "qemu-aarch64-virt".into())
}

/// The `hw-echo` telemetry records, oldest first, as (sequence, payload).
fn echo_records(m: &Machine) -> anyhow::Result<Vec<(u64, String)>> {
    let records = m.get("/v1/telemetry?limit=1000")?;
    let mut echo: Vec<(u64, String)> = records
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["stream"] == "hw-echo")
                .filter_map(|r| Some((r["seq"].as_u64()?, r["payload"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    echo.sort();
    Ok(echo)
}

/// Sends `request` to hw-echo and returns its report: the first `hw-echo` record after
/// sequence `*seen`, which then moves past it.
fn ask(m: &mut Machine, request: &str, seen: &mut u64) -> anyhow::Result<String> {
    let (code, body) = m.send("POST", "/v1/messages/hw-echo", request.as_bytes().to_vec())?;
    anyhow::ensure!(code == 200, "publish answered {code}: {body}");
    let after = *seen;
    let answer = m.wait_for(
        Duration::from_secs(60),
        &format!("the answer to `{request}`"),
        |m| Ok(echo_records(m)?.into_iter().find(|(seq, _)| *seq > after)),
    );
    let (seq, payload) = answer.map_err(|e| {
        // No answer: the component's own error says why.
        let c = m.get("/v1/components/hw-echo").unwrap_or_default();
        e.context(format!("hw-echo's last error: {}", c["last-error"]))
    })?;
    *seen = seq;
    Ok(payload)
}

#[test]
fn preloaded_components_run_offline_and_reach_the_boards_drivers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = BoardConfig::load(&repo_root().join(format!("board-configs/{}.toml", board())))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let lines: Vec<String> = config
        .gpio
        .iter()
        .filter(|(_, l)| matches!(l.source, LineSource::Chip { .. }))
        .map(|(n, _)| n.clone())
        .collect();
    // Sensors QEMU emulates as I2C devices the test can set (a TMP105).
    let i2c_sensors: Vec<String> = if config
        .image
        .qemu_devices
        .iter()
        .any(|d| d.starts_with("tmp105,id=tmp0"))
    {
        config
            .sensors
            .iter()
            .filter(|(_, s)| matches!(s, SensorSource::I2c { .. }))
            .map(|(n, _)| n.clone())
            .collect()
    } else {
        Vec::new()
    };
    // Granted exactly what this board has (a grant of hardware the board lacks is refused).
    let echo = artifact(
        examples::HW_ECHO,
        &repo_root().join("fixtures/hw-echo/Cargo.toml"),
        None,
        |m| {
            let grants = &mut m.grants;
            grants.gpio.read = lines.iter().cloned().collect();
            grants.gpio.write = lines.iter().cloned().collect();
            grants.sensors = i2c_sensors.iter().cloned().collect();
        },
    )?;
    let mut m = match Machine::target() {
        // A real board: hw-echo is deployed over the API (its preloads ran long ago).
        Some(t) => {
            let m = Machine::attach(&t)?;
            let (code, body) = m.send("PUT", "/v1/components/hw-echo", echo)?;
            anyhow::ensure!(code == 201, "deploy answered {code}: {body}");
            m
        }
        None => {
            let img = image::build_with(&board(), dir.path(), None, &[("hw-echo", echo)])?;
            let mut m = Machine::boot(&img.spec)?;
            m.wait_healthy(Duration::from_secs(240))?;
            m
        }
    };
    // On QEMU: deployed on the first boot from the data partition, with the network
    // restricted (`restrict=on`): nothing came from outside.
    m.wait_running("hw-echo", Duration::from_secs(120))?;
    let status = m.get("/v1/status")?;
    if m.emulated() {
        assert_eq!(status["revision"], 1, "{status}");
    }
    eprintln!(
        "hil: {}: hardware missing: {}",
        board(),
        status["hardware-missing"]
    );

    // One request at a time: each answer is read before the next request goes out.
    let mut seen = echo_records(&m)?.last().map_or(0, |(seq, _)| *seq);
    let mut count = 0;
    for line in &lines {
        for level in ["1", "0", "1"] {
            count += 1;
            let got = ask(&mut m, &format!("gpio {line} {level}"), &mut seen)?;
            assert_eq!(got, format!("{line} wrote={level} read={level}"));
        }
    }
    // The TMP105 powers up at 9-bit resolution (0.5 °C), so the values are halves.
    let i2c_sensors = if m.emulated() {
        i2c_sensors
    } else {
        Vec::new()
    };
    for sensor in &i2c_sensors {
        for millis in [23_500, -5_500, 31_000] {
            m.qmp(
                "qom-set",
                json!({"path": "/machine/peripheral/tmp0", "property": "temperature", "value": millis}),
            )?;
            count += 1;
            let got = ask(&mut m, &format!("sensor {sensor}"), &mut seen)?;
            assert_eq!(got, format!("{sensor}={} °C", millis as f64 / 1000.0));
        }
    }
    eprintln!(
        "hil: {}: {} GPIO lines and {} I2C sensors reached through their drivers",
        board(),
        lines.len(),
        i2c_sensors.len()
    );
    if count == 0 {
        eprintln!(
            "hil: {} has no GPIO chip lines or settable I2C sensors to drive",
            board()
        );
    }
    Ok(())
}
