//! The CLI as a new user drives it: `perch new --template sensor`, `perch build`,
//! `perch inspect`, `perch deploy` to a running perchd, then `perch status` and `perch logs`,
//! and the component really reads the sensor and publishes telemetry. The user writes two
//! files; everything else is generated.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use perch_tests::{Launch, Perchd, perch_bin, repo_root, run_capture};
use serde_json::Value;

type TestResult = anyhow::Result<()>;

/// A `perch` command with its own config dir, a shared cargo target dir for guest builds
/// (so repeated runs are incremental) and no colour.
fn perch(config_dir: &Path) -> Command {
    let mut cmd = Command::new(perch_bin());
    cmd.env("PERCH_CONFIG_DIR", config_dir)
        .env("CARGO_TARGET_DIR", guest_target())
        .env_remove("PERCH_DEVICE")
        .env_remove("RUSTFLAGS")
        .arg("--color=never");
    cmd
}

/// `<outer target>/cli-guests`, next to the other build products.
fn guest_target() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // <target>/<profile>/deps/cli-<hash>
    exe.ancestors()
        .nth(3)
        .expect("target dir")
        .join("cli-guests")
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let (status, out) = run_capture(cmd)?;
    anyhow::ensure!(status.success(), "{cmd:?} failed ({status}):\n{out}");
    Ok(out)
}

fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).expect("prefix").display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_new_user_goes_from_nothing_to_a_running_sensor_component() -> TestResult {
    let home = tempfile::tempdir()?;
    let cfg = home.path().join("config");
    let work = home.path().join("work");
    std::fs::create_dir_all(&work)?;

    // 1. A crate from the sensor template: exactly two files.
    run(perch(&cfg)
        .args(["new", "demo", "--template", "sensor", "--dir"])
        .arg(&work))?;
    let demo = work.join("demo");
    assert_eq!(files_under(&demo), ["Cargo.toml", "src/lib.rs"]);
    let written = (
        std::fs::read(demo.join("Cargo.toml"))?,
        std::fs::read(demo.join("src/lib.rs"))?,
    );

    // 2. A signing key, and an agent that trusts only it.
    let public = run(perch(&cfg).args(["key", "new"]))?;
    let public = public
        .lines()
        .find(|l| l.starts_with("ed25519:"))
        .ok_or_else(|| anyhow::anyhow!("no public key in {public}"))?
        .to_string();
    assert_eq!(run(perch(&cfg).args(["key", "show"]))?.trim(), public);
    let agent_dir = tempfile::tempdir()?;
    let agent = agent_trusting(agent_dir.path(), &public)?;
    let url = format!("http://{}", agent.addr);

    // 3. Build: compiles for wasm32-wasip2, checks grants, embeds the manifest, signs.
    let artifact = home.path().join("demo.wasm");
    let out = run(perch(&cfg)
        .arg("build")
        .arg(&demo)
        .arg("--out")
        .arg(&artifact))?;
    assert!(out.contains("Finished"), "{out}");
    assert!(out.contains("signed by"), "{out}");

    // 4. Inspect shows code, manifest and a valid signature by our key.
    let shown = run(perch(&cfg).arg("inspect").arg(&artifact))?;
    for expected in [
        "perch:device/sensors@0.1.0",
        "perch:device/telemetry@0.1.0",
        "sensors = [\"room-temp\"]",
        "every = \"1s\"",
        &public,
        "valid, and covers every byte before it",
    ] {
        assert!(
            shown.contains(expected),
            "missing {expected:?} in:\n{shown}"
        );
    }
    let json: Value = serde_json::from_str(&run(perch(&cfg)
        .arg("inspect")
        .arg(&artifact)
        .arg("--json"))?)?;
    assert_eq!(json["manifest"]["name"], "demo");
    assert_eq!(json["signature"]["valid"], true);

    // 5. Deploy to the running agent; it reports the component running.
    let out = run(perch(&cfg)
        .arg("deploy")
        .arg(&artifact)
        .args(["--to", &url]))?;
    assert!(out.contains("Deployed"), "{out}");
    assert!(out.contains("demo running"), "{out}");

    // 6. The component reads the simulated sensor and publishes durable telemetry.
    let records = agent.wait_for(Duration::from_secs(20), "telemetry from demo", |a| {
        let t = a.get("/v1/telemetry?limit=20")?;
        let n = t
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["component"] == "demo" && r["stream"] == "climate")
            .count();
        Ok((n >= 2).then_some(t))
    })?;
    let first: Value = serde_json::from_str(
        records[0]["payload"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{records}"))?,
    )?;
    assert_eq!(first["sensor"], "room-temp");
    assert_eq!(first["unit"], "°C");
    assert!(
        (10.0..40.0).contains(&first["value"].as_f64().unwrap_or(f64::NAN)),
        "{first}"
    );

    // 7. Status and logs, as tables and as JSON.
    let table = run(perch(&cfg).args(["status", "--device", &url]))?;
    assert!(table.contains("NAME") && table.contains("demo"), "{table}");
    assert!(table.contains("running"), "{table}");
    let status: Value = serde_json::from_str(&run(
        perch(&cfg).args(["status", "--json", "--device", &url])
    )?)?;
    assert_eq!(status["components"][0]["name"], "demo");
    assert_eq!(status["components"][0]["signer"], public.as_str());
    let logs = run(perch(&cfg).args(["logs", "demo", "--device", &url]))?;
    assert!(logs.contains("\"sensor\":\"room-temp\""), "{logs}");

    // 8. The template's own test passes on the host.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(["test", "--quiet", "--manifest-path"])
        .arg(demo.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", guest_target())
        .env_remove("RUSTFLAGS"))?;

    // The files the user wrote are untouched; the build only added its lock file.
    assert_eq!(
        (
            std::fs::read(demo.join("Cargo.toml"))?,
            std::fs::read(demo.join("src/lib.rs"))?
        ),
        written
    );
    assert_eq!(
        files_under(&demo),
        ["Cargo.lock", "Cargo.toml", "src/lib.rs"]
    );
    Ok(())
}

#[test]
fn build_refuses_ungranted_interfaces_and_bad_manifests() -> TestResult {
    let home = tempfile::tempdir()?;
    let cfg = home.path().join("config");

    // The fixture calls gpio::write but its manifest grants no GPIO.
    let (status, out) = run_capture(
        perch(&cfg)
            .arg("build")
            .arg(repo_root().join("fixtures/ungranted"))
            .arg("--out")
            .arg(home.path().join("u.wasm")),
    )?;
    assert!(!status.success(), "{out}");
    assert!(
        out.contains(
            "the component imports `perch:device/gpio@0.1.0` but its manifest grants no gpio: add `grants.gpio = { read = [\"button\"], write = [\"fan\"] }` to [package.metadata.perch]"
        ),
        "{out}"
    );
    assert!(!home.path().join("u.wasm").exists());

    // Manifest mistakes are reported before anything is compiled, each with its key.
    let bad = home.path().join("bad");
    std::fs::create_dir_all(bad.join("src"))?;
    std::fs::write(bad.join("src/lib.rs"), "")?;
    std::fs::write(
        bad.join("Cargo.toml"),
        r#"[package]
name = "bad"
version = "0.1.0"
edition = "2024"

[package.metadata.perch]
triggers = [{ evry = "5s" }]
grants = { sensor = ["room-temp"] }
limits = { memory = 16, timeout = "5 sec" }
"#,
    )?;
    let (status, out) = run_capture(perch(&cfg).arg("build").arg(&bad))?;
    assert!(!status.success(), "{out}");
    for line in [
        "4 problems in the component manifest",
        "package.metadata.perch.triggers[0]: unknown trigger kind `evry`; did you mean `every`?",
        "package.metadata.perch.grants.sensor: unknown grant `sensor`; did you mean `sensors`?",
        "package.metadata.perch.limits.memory: `16` has no unit: write a size such as `\"16MiB\"`",
        "package.metadata.perch.limits.timeout: `5 sec` is not a duration",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.contains("Compiling"), "{out}");
    Ok(())
}

#[test]
fn completions_and_help_follow_cargo_conventions() -> TestResult {
    let home = tempfile::tempdir()?;
    let bash = run(perch(home.path()).args(["completions", "bash"]))?;
    assert!(bash.contains("_perch()"), "{bash}");
    let help = run(perch(home.path()).arg("help"))?;
    for cmd in [
        "new", "build", "inspect", "run", "deploy", "status", "logs", "key",
    ] {
        assert!(help.contains(cmd), "missing {cmd} in:\n{help}");
    }
    // Usage errors exit with 2, failures with 1, and name what was wrong.
    let (status, out) = run_capture(perch(home.path()).args(["deploy", "x.wasm"]))?;
    assert_eq!(status.code(), Some(2), "{out}");
    let (status, out) =
        run_capture(perch(home.path()).args(["status", "--device", "http://127.0.0.1:9"]))?;
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("cannot reach the agent at http://127.0.0.1:9"),
        "{out}"
    );
    Ok(())
}

/// A perchd that accepts only components signed by `public`.
fn agent_trusting(dir: &Path, public: &str) -> anyhow::Result<Perchd> {
    Perchd::start(
        dir,
        Launch {
            extra_config: format!("[signing]\ntrusted-keys = [\"{public}\"]\n"),
            ..Launch::default()
        },
    )
}

/// Waits until `file` contains `needle`, or fails with what it holds.
fn wait_for_text(file: &Path, needle: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no {needle:?} after {timeout:?} in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn run_streams_logs_and_swaps_in_rebuilds_until_ctrl_c() -> TestResult {
    let home = tempfile::tempdir()?;
    let cfg = home.path().join("config");
    run(perch(&cfg)
        .args(["new", "ticker", "--template", "timer", "--dir"])
        .arg(home.path()))?;
    let krate = home.path().join("ticker");
    // Tick fast so the test does not wait for the template's 5s.
    let toml = std::fs::read_to_string(krate.join("Cargo.toml"))?
        .replace("every = \"5s\"", "every = \"200ms\"");
    std::fs::write(krate.join("Cargo.toml"), toml)?;

    let out_path = home.path().join("run.out");
    let out = std::fs::File::create(&out_path)?;
    let port = perch_tests::free_port();
    let mut child = perch(&cfg)
        .arg("run")
        .arg(&krate)
        .arg("--watch")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let result = (|| -> TestResult {
        wait_for_text(&out_path, "guest  tick 2", Duration::from_secs(120))?;
        // The in-process agent serves the same API as perchd.
        let status: Value =
            reqwest::blocking::get(format!("http://127.0.0.1:{port}/v1/status"))?.json()?;
        assert_eq!(status["components"][0]["name"], "ticker", "{status}");

        // Edit the source: the component is rebuilt and swapped in, and its kv count
        // carries on across the swap.
        let lib = std::fs::read_to_string(krate.join("src/lib.rs"))?
            .replace("format!(\"tick {count}\")", "format!(\"TOCK {count}\")");
        std::fs::write(krate.join("src/lib.rs"), lib)?;
        let text = wait_for_text(&out_path, "guest  TOCK", Duration::from_secs(120))?;
        assert!(text.contains("Rebuilding"), "{text}");
        let first_tock: u64 = text
            .lines()
            .find_map(|l| l.split("guest  TOCK ").nth(1))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no TOCK count in:\n{text}"))?;
        assert!(first_tock > 2, "the count restarted:\n{text}");
        Ok(())
    })();
    // Ctrl-C: a clean stop with exit code 0.
    // The shell's builtin `kill`, so no procps is needed.
    let sent = Command::new("sh")
        .args(["-c", "kill -INT \"$0\"", &child.id().to_string()])
        .status()?;
    assert!(sent.success());
    let status = child.wait()?;
    result?;
    let text = std::fs::read_to_string(&out_path)?;
    assert!(status.success(), "{status}:\n{text}");
    assert!(text.contains("Stopping"), "{text}");
    Ok(())
}

#[test]
fn build_composes_the_components_named_in_the_manifest() -> TestResult {
    let home = tempfile::tempdir()?;
    let cfg = home.path().join("config");
    let artifact = home.path().join("smoothed.wasm");
    let out = run(perch(&cfg)
        .arg("build")
        .arg(repo_root().join("fixtures/smoothed"))
        .arg("--out")
        .arg(&artifact))?;
    assert!(
        out.contains("Composed smoothed with ../smoother (perch:fixture/smooth)"),
        "{out}"
    );
    // One component: the plugged import is gone, the triggers' exports remain.
    let json: Value = serde_json::from_str(&run(perch(&cfg)
        .arg("inspect")
        .arg(&artifact)
        .arg("--json"))?)?;
    let imports = json["imports"].to_string();
    assert!(!imports.contains("perch:fixture/smooth"), "{imports}");
    assert!(
        json["exports"].to_string().contains("perch:device/timer"),
        "{json}"
    );

    // It runs on an agent, calling into the plugged component.
    let public = run(perch(&cfg).args(["key", "show"]))?.trim().to_string();
    let agent_dir = tempfile::tempdir()?;
    let agent = agent_trusting(agent_dir.path(), &public)?;
    let r = agent.deploy_artifact(&std::fs::read(&artifact)?)?;
    assert_eq!(r.status, 201, "{}", r.body);
    agent.wait_for(Duration::from_secs(20), "mean 2.5 in the log", |a| {
        let logs = a.get("/v1/components/smoothed/logs?limit=5")?;
        Ok(logs.to_string().contains("mean 2.5").then_some(()))
    })?;

    // A plug that does not export the named interface is refused with both names.
    let bad = home.path().join("bad");
    std::fs::create_dir_all(bad.join("src"))?;
    std::fs::write(bad.join("src/lib.rs"), "")?;
    std::fs::write(
        bad.join("Cargo.toml"),
        format!(
            r#"[package]
name = "bad"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[package.metadata.perch]
triggers = [{{ startup = true }}]

[package.metadata.perch.compose]
"perch:fixture/smooth" = "{}"
"#,
            artifact.display()
        ),
    )?;
    let (status, out) = run_capture(perch(&cfg).arg("build").arg(&bad))?;
    assert!(!status.success(), "{out}");
    assert!(out.contains("`bad` does not import it"), "{out}");
    Ok(())
}

/// `perch image build` makes a board's disk with the device config and preloaded
/// components baked in; `perch image flash` writes it to a target and verifies it, and
/// refuses what it must not touch.
#[test]
fn image_build_and_flash() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    // Any executable stands in for perchd: this checks the CLI and the builder, not the agent.
    let fake = dir.path().join("perchd");
    std::fs::write(&fake, "#!/bin/sh\necho perchd\n")?;
    let out = dir.path().join("image");
    let log = run(perch(&config)
        .current_dir(repo_root())
        .args(["image", "build", "--board", "qemu-x86_64", "--perchd"])
        .arg(&fake)
        .arg("--preload")
        .arg(perch_tests::examples::TIMER)
        .arg("--out")
        .arg(&out))?;
    assert!(log.contains("disk.img.zst"), "{log}");
    for f in [
        "disk.img",
        "disk.img.zst",
        "slot.img",
        "boot.img",
        "data.img",
    ] {
        assert!(out.join(f).is_file(), "{f} missing:\n{log}");
    }
    // The data partition holds the device config and the preloaded component.
    let listing = Command::new("debugfs")
        .args(["-R", "ls -p /preload"])
        .arg(out.join("data.img"))
        .output()?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("timer.wasm"), "{listing}");
    let cat = Command::new("debugfs")
        .args(["-R", "cat /perchd.toml"])
        .arg(out.join("data.img"))
        .output()?;
    let device_config = String::from_utf8_lossy(&cat.stdout);
    assert!(
        device_config.contains("board = \"qemu-x86_64\""),
        "{device_config}"
    );
    assert!(device_config.contains("preload-dir"), "{device_config}");

    let sd = dir.path().join("sd.img");
    let log = run(perch(&config)
        .args(["image", "flash"])
        .arg(out.join("disk.img.zst"))
        .arg(&sd))?;
    assert!(log.contains("verified"), "{log}");
    assert!(
        std::fs::read(&sd)? == std::fs::read(out.join("disk.img"))?,
        "the flashed bytes are the disk's"
    );

    // An unknown board is refused naming the known ones. (Mounted disks are refused too:
    // a unit test of the CLI checks that against a mount table, never against this
    // machine's own disk.)
    let (status, text) = run_capture(
        perch(&config)
            .current_dir(repo_root())
            .args(["image", "build", "--board", "no-such-board", "--perchd"])
            .arg(&fake),
    )?;
    assert!(!status.success());
    assert!(
        text.contains("no board `no-such-board`") && text.contains("qemu-aarch64-virt"),
        "{text}"
    );
    Ok(())
}
