//! Components deployed through the API run again after a restart with no network at all
//! (a fresh network namespace with only loopback) and without their source files: from the
//! agent's own cache, deserializing precompiled code instead of compiling.

use std::time::Duration;

use perch_tests::{Launch, Perchd, examples};

#[test]
fn deployed_components_restart_offline_from_the_cache() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Deploy from copies that are deleted before the restart: nothing but the store remains.
    let src = tempfile::tempdir()?;
    let copy = |name: &str, path: &str| -> anyhow::Result<std::path::PathBuf> {
        let p = src.path().join(name);
        std::fs::copy(path, &p)?;
        Ok(p)
    };
    let files = [
        (
            "timer",
            copy("timer.wasm", examples::TIMER)?,
            "every=100ms&startup=true",
        ),
        (
            "hello",
            copy("hello.wasm", examples::HTTP_HELLO)?,
            "http=/hello",
        ),
        (
            "bad",
            copy("bad.wasm", examples::MISBEHAVE)?,
            "message=misbehave.>&timeout=200ms",
        ),
    ];

    let mut agent = Perchd::start(dir.path(), Launch::default())?;
    for (name, path, query) in &files {
        let r = agent.deploy(name, &std::fs::read(path)?, query)?;
        assert_eq!(r.status, 201, "{name}: {}", r.body);
        assert_eq!(r.body["component"]["loaded-from"], "compiled");
    }
    agent.wait_for(Duration::from_secs(10), "timer ticks", |a| {
        let n = a.component("timer")?["invocations"].as_u64().unwrap_or(0);
        Ok((n >= 3).then_some(n))
    })?;
    let hello = agent.request("GET", "/hello", None)?;
    assert_eq!(
        (hello.status, hello.body.as_str()),
        (200, Some("hello from perch\n"))
    );
    // A clean stop (SIGTERM) makes the key-value data durable; kill -9 is covered by the
    // crash-consistency test.
    assert!(agent.stop()?.success());
    let count_before = last_tick(&agent.log());
    assert!(count_before >= 2, "ticks were logged before the restart");
    drop(src);

    let mut offline = Perchd::start(
        dir.path(),
        Launch {
            offline: true,
            ..Launch::default()
        },
    )?;
    let status = offline.get("/v1/status")?;
    let components = status["components"].as_array().cloned().unwrap_or_default();
    assert_eq!(components.len(), 3, "{status}");
    for c in &components {
        assert_eq!(c["state"], "running", "{c}");
        assert_eq!(
            c["loaded-from"], "cached",
            "precompiled code was reused: {c}"
        );
    }
    // The timer's key-value count survived and keeps growing from where it was.
    let log = offline.wait_for(Duration::from_secs(10), "timer to tick offline", |a| {
        let logs = a.get("/v1/components/timer/logs?limit=200")?.to_string();
        Ok(logs.contains("timer started, count=").then_some(logs))
    })?;
    let started_at: u64 = log
        .split("timer started, count=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("count in the startup line");
    assert!(
        started_at >= count_before,
        "kv count persisted ({started_at} >= {count_before})"
    );
    let hello = offline.request("GET", "/hello", None)?;
    assert_eq!(
        (hello.status, hello.body.as_str()),
        (200, Some("hello from perch\n"))
    );
    let r = offline.publish("misbehave.ok", b"")?;
    assert_eq!(r.body["delivered"], 1);
    // The namespace really has no network: only loopback exists.
    let links = std::process::Command::new("nsenter")
        .args([
            "-t",
            &offline.pid().to_string(),
            "-n",
            "--",
            "ip",
            "-o",
            "link",
        ])
        .output()?;
    let links = String::from_utf8_lossy(&links.stdout).to_string();
    assert_eq!(links.lines().count(), 1, "only loopback: {links}");
    assert!(offline.stop()?.success());
    Ok(())
}

/// The highest `tick N` the timer logged.
fn last_tick(log: &str) -> u64 {
    log.match_indices("tick ")
        .filter_map(|(i, m)| {
            log[i + m.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// A firmware image ships components in its `preload-dir`: the first start deploys them
/// (offline, from the files), later starts run what the store holds and never re-read the
/// folder, so a component removed since stays removed.
#[test]
fn preloaded_components_run_on_the_first_boot_only() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let preload = dir.path().join("preload");
    std::fs::create_dir_all(&preload)?;
    let timer = perch_tests::artifact(
        examples::TIMER,
        &perch_tests::repo_root().join("examples/timer/Cargo.toml"),
        None,
        |_| {},
    )?;
    std::fs::write(preload.join("timer.wasm"), &timer)?;
    std::fs::write(preload.join("broken.wasm"), b"not a component")?;
    std::fs::write(preload.join("notes.txt"), b"ignored")?;
    let launch = Launch {
        extra_config: format!("preload-dir = \"{}\"\n", preload.display()),
        offline: true,
        ..Launch::default()
    };

    let mut agent = Perchd::start(&dir.path().join("agent"), launch.clone())?;
    agent.wait_for(
        Duration::from_secs(30),
        "the preloaded timer ticking",
        |a| {
            let c = a.component("timer")?;
            Ok((c["invocations"].as_u64().unwrap_or(0) >= 1).then_some(()))
        },
    )?;
    let status = agent.get("/v1/status")?;
    let names: Vec<&str> = status["components"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        ["timer"],
        "the broken file is refused, the rest runs: {status}"
    );
    assert!(
        agent.log().contains("preloaded component refused"),
        "the refusal is logged"
    );
    let r = agent.request("DELETE", "/v1/components/timer", None)?;
    assert_eq!(r.status, 200, "{}", r.body);
    let revision = agent.get("/v1/status")?["revision"].clone();
    assert!(agent.stop()?.success());

    let again = Perchd::start(&dir.path().join("agent"), launch)?;
    let status = again.get("/v1/status")?;
    assert_eq!(status["revision"], revision, "{status}");
    assert_eq!(status["components"], serde_json::json!([]), "{status}");
    Ok(())
}
