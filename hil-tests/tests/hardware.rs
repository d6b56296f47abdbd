//! A first boot with no network runs the components the image ships, and they reach the
//! board's real kernel drivers: on QEMU's aarch64 `virt` the `fan` and `led` lines are the
//! PL061 GPIO controller's, driven through the character-device uAPI and read back through
//! the driver.
//!
//! `PERCH_HIL_BOARD` picks the board (default `qemu-aarch64-virt`).

use std::time::Duration;

use perch_core::board::{BoardConfig, LineSource};
use perch_hil::{Machine, image};
use perch_tests::{artifact, examples, repo_root};

fn board() -> String {
    std::env::var("PERCH_HIL_BOARD").unwrap_or_else(|_| "qemu-aarch64-virt".into())
}

#[test]
fn preloaded_components_run_offline_and_drive_the_boards_gpio() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let echo = artifact(
        examples::GPIO_ECHO,
        &repo_root().join("fixtures/gpio-echo/Cargo.toml"),
        None,
        |_| {},
    )?;
    let config = BoardConfig::load(&repo_root().join(format!("board-configs/{}.toml", board())))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let chip_lines: Vec<String> = config
        .gpio
        .iter()
        .filter(|(_, l)| matches!(l.source, LineSource::Chip { .. }))
        .map(|(n, _)| n.clone())
        .collect();
    let preload: Vec<(&str, Vec<u8>)> = if chip_lines.is_empty() {
        Vec::new()
    } else {
        vec![("gpio-echo", echo)]
    };
    let img = image::build_with(&board(), dir.path(), None, &preload)?;
    let mut m = Machine::boot(&img.spec)?;
    m.wait_healthy(Duration::from_secs(240))?;
    if chip_lines.is_empty() {
        eprintln!("hil: {} has no GPIO chip lines: nothing to drive", board());
        return Ok(());
    }

    // Deployed on the first boot from the data partition; QEMU's network is restricted
    // (`restrict=on`): nothing came from outside.
    m.wait_running("gpio-echo", Duration::from_secs(120))?;
    let status = m.get("/v1/status")?;
    assert_eq!(status["revision"], 1, "{status}");
    let missing = status["hardware-missing"].clone();
    if missing != serde_json::json!([]) {
        anyhow::bail!(
            "hardware missing: {missing}\n--- guest console ---\n{}",
            m.console_tail(400)
        );
    }

    // One write at a time: each is read back before the next goes out.
    let mut done = 0;
    for line in &chip_lines {
        for level in ["1", "0", "1"] {
            let (code, body) = m.send(
                "POST",
                "/v1/messages/gpio-echo",
                format!("{line} {level}").into_bytes(),
            )?;
            anyhow::ensure!(code == 200, "publish answered {code}: {body}");
            done += 1;
            let newest = m.wait_for(
                Duration::from_secs(60),
                &format!("`{line} {level}` read back"),
                |m| {
                    let records = m.get("/v1/telemetry?limit=1000")?;
                    let mut echo: Vec<(u64, String)> = records
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter(|r| r["stream"] == "gpio-echo")
                                .filter_map(|r| {
                                    Some((r["seq"].as_u64()?, r["payload"].as_str()?.to_string()))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    echo.sort();
                    Ok((echo.len() >= done)
                        .then(|| echo.pop().map(|(_, p)| p))
                        .flatten())
                },
            )?;
            assert_eq!(newest, format!("{line} wrote={level} read={level}"));
        }
    }
    Ok(())
}
