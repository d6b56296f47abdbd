//! A board file with real sysfs sensors, against a fake sysfs tree shaped like the kernel's:
//! the agent reports hardware the board names but lacks at start, components read sensors
//! through the same WIT path the simulated board uses, and a sensor that disappears and
//! comes back needs no restart.

use std::path::Path;
use std::time::Duration;

use perch_tests::{Launch, Perchd, artifact, examples, repo_root};
use serde_json::Value;

fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

const W1: &str = "bus/w1/devices/28-00000abcdef0";

fn w1_reading(milli: u32) -> String {
    format!("72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t={milli}\n")
}

/// Telemetry records of `thermostat` with their `t`.
fn temperatures(agent: &Perchd) -> anyhow::Result<Vec<(u64, f64)>> {
    let records = agent.get("/v1/telemetry?limit=50")?;
    Ok(records
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["component"] == "thermostat")
        .filter_map(|r| {
            let payload: Value = serde_json::from_str(r["payload"].as_str()?).ok()?;
            Some((r["seq"].as_u64()?, payload["t"].as_f64()?))
        })
        .collect())
}

#[test]
fn sysfs_sensors_are_read_reported_and_recovered() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sys = dir.path().join("sys");
    write(&sys, &format!("{W1}/w1_slave"), &w1_reading(23250));
    write(&sys, "class/hwmon/hwmon2/name", "cpu_thermal\n");
    write(&sys, "class/hwmon/hwmon2/temp1_input", "48312\n");
    let board = dir.path().join("test-pi.toml");
    std::fs::write(
        &board,
        format!(
            r#"inherit = "{}"
description = "a Pi 4 on a fake sysfs"

[sensors.board-temp]
i2c = {{ bus = 1, address = 0x48, register = 0, scale = "0.00390625", unit = "°C" }}

[sensors.bad-unit]
i2c = {{ bus = 1, address = 0x49, register = 0, scale = "1", unit = "furlongs" }}
"#,
            repo_root()
                .join("board-configs/raspberry-pi-4.toml")
                .display()
        ),
    )?;
    // An empty device root: no GPIO chip, no I2C adapter.
    let dev = dir.path().join("dev");
    std::fs::create_dir_all(&dev)?;
    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: format!(
                "board = \"{}\"\nsysfs-root = \"{}\"\ndev-root = \"{}\"\n",
                board.display(),
                sys.display(),
                dev.display()
            ),
            ..Launch::default()
        },
    )?;

    // What the board names but the machine lacks is reported by name at start.
    let status = agent.get("/v1/status")?;
    assert_eq!(status["board"], board.display().to_string());
    let missing: Vec<String> = status["hardware-missing"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str().map(String::from))
        .collect();
    let has = |needle: &str| missing.iter().any(|m| m.contains(needle));
    assert!(has("sensor `pressure`"), "{missing:?}");
    let chip = dev.join("gpiochip0");
    assert!(
        has(&format!(
            "GPIO line `fan`: chip `gpiochip0` is not present ({} does not exist)",
            chip.display()
        )),
        "{missing:?}"
    );
    assert!(has("GPIO line `button`"), "{missing:?}");
    assert!(
        has(&format!(
            "sensor `board-temp` (I2C bus 1, address 0x48): {} does not exist",
            dev.join("i2c-1").display()
        )),
        "{missing:?}"
    );
    assert!(
        has("sensor `bad-unit`") && has("unit `furlongs` is not one of"),
        "{missing:?}"
    );
    assert!(!has("room-temp"), "{missing:?}");
    assert!(
        agent.log().contains("board hardware not available"),
        "{}",
        agent.log()
    );

    // The thermostat reads the 1-Wire sensor through perch:device/sensors. A threshold it
    // never reaches keeps it off the fan (its chip is missing).
    let bytes = artifact(
        examples::THERMOSTAT,
        &repo_root().join("examples/thermostat/Cargo.toml"),
        None,
        |m| {
            m.config.insert("threshold-c".into(), "1000".into());
            m.triggers = vec![perch_core::Trigger::Every(
                "100ms".parse().expect("duration"),
            )];
        },
    )?;
    let r = agent.deploy_artifact(&bytes)?;
    assert_eq!(r.status, 201, "{}", r.body);
    let seen = agent.wait_for(Duration::from_secs(20), "a reading of 23.25", |a| {
        let t = temperatures(a)?;
        Ok(t.iter()
            .any(|(_, v)| (*v - 23.25).abs() < 1e-9)
            .then_some(t))
    })?;
    let last_seq = seen.iter().map(|(s, _)| *s).max().unwrap_or(0);

    // Unplugged: each read fails with a typed error naming the sensor; the agent goes on.
    std::fs::remove_dir_all(sys.join(W1))?;
    let c = agent.wait_for(Duration::from_secs(20), "a failed read", |a| {
        let c = a.component("thermostat")?;
        let msg = c["last-error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        Ok(msg
            .contains("sensor `room-temp` is not present")
            .then_some(c))
    })?;
    assert_eq!(c["state"], "running", "{c}");

    // Plugged back in with a new reading: no restart needed.
    write(&sys, &format!("{W1}/w1_slave"), &w1_reading(26500));
    agent.wait_for(Duration::from_secs(20), "a reading of 26.5", |a| {
        let t = temperatures(a)?;
        Ok(t.iter()
            .any(|(s, v)| *s > last_seq && (*v - 26.5).abs() < 1e-9)
            .then_some(()))
    })?;

    // A thermostat that wants the fan on gets a typed error naming the missing chip, and
    // keeps running.
    let cooler = artifact(
        examples::THERMOSTAT,
        &repo_root().join("examples/thermostat/Cargo.toml"),
        None,
        |m| {
            m.name = "cooler".into();
            m.config.insert("threshold-c".into(), "-100".into());
            m.triggers = vec![perch_core::Trigger::Every(
                "100ms".parse().expect("duration"),
            )];
        },
    )?;
    let r = agent.deploy_artifact(&cooler)?;
    assert_eq!(r.status, 201, "{}", r.body);
    let c = agent.wait_for(Duration::from_secs(20), "a failed fan write", |a| {
        let c = a.component("cooler")?;
        let msg = c["last-error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        Ok(msg
            .contains("GPIO line `fan`: chip `gpiochip0` is not present")
            .then_some(c))
    })?;
    assert_eq!(c["state"], "running", "{c}");

    // A write grant on an input line is refused at deploy time, naming the line and the
    // fix.
    let pusher = artifact(
        examples::THERMOSTAT,
        &repo_root().join("examples/thermostat/Cargo.toml"),
        None,
        |m| {
            m.name = "pusher".into();
            m.grants.gpio.write = ["fan".to_string(), "button".to_string()].into();
        },
    )?;
    let r = agent.deploy_artifact(&pusher)?;
    let body = r.body.to_string();
    assert_eq!(r.status, 400, "{body}");
    assert!(
        body.contains("component `pusher` is granted `write` on GPIO line `button`, which board")
            && body.contains("configures as an input: grant it under `grants.gpio.read`"),
        "{body}"
    );
    Ok(())
}

#[test]
fn an_unknown_board_is_a_config_error_naming_the_known_ones() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut agent = Perchd::spawn(
        dir.path(),
        Launch {
            extra_config: format!(
                "board = \"rpi9\"\nboards-dir = [\"{}\"]\n",
                repo_root().join("board-configs").display()
            ),
            ..Launch::default()
        },
    )?;
    let status = agent.wait_exit(Duration::from_secs(30))?;
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains("no board named `rpi9`"), "{log}");
    assert!(log.contains("raspberry-pi-4"), "{log}");
    Ok(())
}

#[test]
fn a_component_reading_sensors_in_a_tight_loop_does_not_starve_others() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(dir.path(), Launch::default())?;
    // hwloop with its manifest (grants room-temp), limited to 3 s per invocation.
    let hwloop = artifact(
        examples::HWLOOP,
        &repo_root().join("fixtures/hwloop/Cargo.toml"),
        None,
        |m| m.limits.timeout = Some("3s".parse().expect("duration")),
    )?;
    let r = agent.deploy_artifact(&hwloop)?;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = agent.deploy("timer", &examples::bytes(examples::TIMER), "every=50ms")?;
    assert_eq!(r.status, 201, "{}", r.body);
    agent.wait_for(Duration::from_secs(10), "the timer ticking", |a| {
        let c = a.component("timer")?;
        Ok((c["invocations"].as_u64() >= Some(3)).then_some(()))
    })?;

    // Billions of reads: the loop runs until its timeout, on the same two workers.
    let before = agent.component("timer")?["invocations"]
        .as_u64()
        .unwrap_or(0);
    let started = std::time::Instant::now();
    let r = agent.publish("hwloop", b"sensor 2000000000")?;
    assert_eq!(r.status, 200, "{}", r.body);
    let c = agent.wait_for(Duration::from_secs(20), "the loop to time out", |a| {
        let c = a.component("hwloop")?;
        Ok((c["failures"].as_u64() >= Some(1)).then_some(c))
    })?;
    let busy = started.elapsed();
    let ticks = agent.component("timer")?["invocations"]
        .as_u64()
        .unwrap_or(0)
        - before;
    assert!(
        c["last-error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("timed out"),
        "{c}"
    );
    // 50 ms ticks over about 3 s: most of them still ran, and the API answered throughout.
    let expected = busy.as_millis() as u64 / 50;
    assert!(
        ticks * 2 >= expected,
        "only {ticks} ticks in {busy:?} while the loop ran (expected about {expected})"
    );
    Ok(())
}

#[test]
fn gpio_edges_trigger_components_with_debounce() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(dir.path(), Launch::default())?;
    let bytes = artifact(
        examples::BUTTON,
        &repo_root().join("fixtures/button/Cargo.toml"),
        None,
        |_| {},
    )?;
    let r = agent.deploy_artifact(&bytes)?;
    assert_eq!(r.status, 201, "{}", r.body);
    let set = |level: &str| -> anyhow::Result<()> {
        let r = agent.request(
            "PUT",
            "/v1/board/gpio/button",
            Some(level.as_bytes().to_vec()),
        )?;
        anyhow::ensure!(r.status == 200, "{}", r.body);
        Ok(())
    };
    let calls = |a: &Perchd| -> anyhow::Result<u64> {
        Ok(a.component("button")?["invocations"].as_u64().unwrap_or(0))
    };

    // Pressed: a rising edge, which this trigger ignores; released: a falling edge.
    set("1")?;
    set("0")?;
    agent.wait_for(Duration::from_secs(10), "the first press", |a| {
        Ok((calls(a)? >= 1).then_some(()))
    })?;
    std::thread::sleep(Duration::from_millis(700));

    // Contact bounce: four quick changes count once.
    for level in ["1", "0", "1", "0", "1", "0"] {
        set(level)?;
    }
    agent.wait_for(Duration::from_secs(10), "the second press", |a| {
        Ok((calls(a)? >= 2).then_some(()))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(calls(&agent)?, 2);
    let logs = agent.get("/v1/components/button/logs?limit=10")?;
    assert!(
        logs.to_string().contains("press 2 (button high=false)"),
        "{logs}"
    );

    // Outputs and unknown lines cannot be set; a trigger on an ungranted line is refused.
    let r = agent.request("PUT", "/v1/board/gpio/fan", Some(b"1".to_vec()))?;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = agent.request("PUT", "/v1/board/gpio/doorbell", Some(b"1".to_vec()))?;
    assert_eq!(r.status, 404, "{}", r.body);
    let ungranted = artifact(
        examples::BUTTON,
        &repo_root().join("fixtures/button/Cargo.toml"),
        None,
        |m| {
            m.name = "peeker".into();
            m.grants = Default::default();
        },
    )?;
    let r = agent.deploy_artifact(&ungranted)?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.to_string().contains(
            "component `peeker` has a gpio trigger on line `button` but no grant to read it"
        ),
        "{}",
        r.body
    );
    Ok(())
}
