//! A first boot with no network runs the components the image ships, and they reach the
//! board's real kernel drivers through the providers: on QEMU's aarch64 `virt` the `fan`
//! and `led` lines are the PL061 GPIO controller's (written through the character-device
//! uAPI, read back through the driver). On `qemu-x86_64` the sensors are a simulated SMBus
//! chip (the kernel's `i2c_stub`, as no QEMU for x86 models an I2C sensor) read through the
//! real lm75 hwmon driver and through i2c-dev, at temperatures the test writes into the
//! chip's registers from the console shell. (A sensor QEMU itself modelled would be set with
//! `Machine::qmp`, e.g. `qom-set` of a `tmp105`'s `temperature`.)
//!
//! `PERCH_HIL_BOARD` picks the board (default `qemu-aarch64-virt`).

use std::time::Duration;

use anyhow::Context;
use perch_core::board::{BoardConfig, LineSource, SensorSource};
use perch_hil::{Machine, image};
use perch_tests::{artifact, examples, repo_root};

fn board() -> String {
    std::env::var("PERCH_HIL_BOARD").unwrap_or_else(|_| "qemu-aarch64-virt".into())
}

/// Sensors on the kernel's simulated SMBus chips (`i2c_stub chip_addr=...` in the board's
/// modules), with the chip's address: the hwmon devices of drivers the board binds to a chip
/// on the stub's adapter, and I2C register sources at a chip's address.
fn stub_sensors(config: &BoardConfig) -> Vec<(String, u16)> {
    let Some(addresses) = config.image.module_params.get("i2c_stub").map(|params| {
        params
            .iter()
            .filter_map(|p| p.strip_prefix("chip_addr="))
            .flat_map(|list| list.split(','))
            .filter_map(|a| u16::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            .collect::<Vec<u16>>()
    }) else {
        return Vec::new();
    };
    config
        .sensors
        .iter()
        .filter_map(|(name, source)| {
            let address = match source {
                SensorSource::Hwmon { name: driver, .. } => config
                    .image
                    .i2c_devices
                    .iter()
                    .find(|d| d.adapter == "SMBus stub driver" && &d.driver == driver)
                    .map(|d| d.address),
                SensorSource::I2c { address, .. } => Some(*address),
                _ => None,
            }?;
            addresses
                .contains(&address)
                .then(|| (name.clone(), address))
        })
        .collect()
}

/// The word to store in an i2c-stub register so that a TMP105/LM75 temperature register
/// reads `millis`: the register is big-endian (1/256 °C per bit), an SMBus word is sent
/// low byte first, so the stub holds it byte-swapped.
fn stub_word(millis: i32) -> u16 {
    let raw = (millis * 256 / 1000) as i16 as u16;
    raw.swap_bytes()
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
    let settable = stub_sensors(&config);
    let i2c_sensors: Vec<String> = settable.iter().map(|(n, _)| n.clone()).collect();
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
    let settable = if m.emulated() { settable } else { Vec::new() };
    if !settable.is_empty() {
        // The simulated chip's adapter number, as the kernel gave it.
        let bus = m.console(
            "grep -l 'SMBus stub driver' /sys/bus/i2c/devices/i2c-*/name",
            Duration::from_secs(30),
        )?;
        let bus: u32 = bus
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("/sys/bus/i2c/devices/i2c-")?
                    .strip_suffix("/name")?
                    .parse()
                    .ok()
            })
            .with_context(|| format!("no i2c-stub adapter in `{bus}`"))?;
        // Halves and whole degrees: exact at both the TMP105 driver's 1/16 °C and the
        // register source's 1/256 °C.
        for millis in [23_500i32, -5_500, 31_000] {
            for (sensor, address) in &settable {
                m.console(
                    &format!(
                        "i2cset -f -y {bus} {address:#04x} 0 {:#06x} w",
                        stub_word(millis)
                    ),
                    Duration::from_secs(30),
                )?;
                count += 1;
                let got = ask(&mut m, &format!("sensor {sensor}"), &mut seen)?;
                assert_eq!(got, format!("{sensor}={} °C", f64::from(millis) / 1000.0));
            }
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
