//! A component that loops, hogs memory or traps is stopped and contained while the timer
//! example keeps ticking; repeated crashes back off and show as `crash-looping`.

use std::time::Duration;

use perch_tests::{Launch, Perchd, examples};
use serde_json::Value;

fn invocations(agent: &Perchd, name: &str) -> anyhow::Result<u64> {
    Ok(agent.component(name)?["invocations"].as_u64().unwrap_or(0))
}

/// Publishes `subject` and waits until the component records a new error containing `needle`.
fn provoke(agent: &Perchd, subject: &str, needle: &str) -> anyhow::Result<Value> {
    let before = agent.component("bad")?["failures"].as_u64().unwrap_or(0);
    let r = agent.publish(subject, b"")?;
    assert_eq!(r.body["delivered"], 1, "{}", r.body);
    agent.wait_for(Duration::from_secs(20), needle, |a| {
        let c = a.component("bad")?;
        let msg = c["last-error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Ok((c["failures"].as_u64().unwrap_or(0) > before && msg.contains(needle)).then_some(c))
    })
}

#[test]
fn loop_hog_and_trap_are_contained_while_the_timer_ticks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            extra_config: "[runtime]\nbackoff-base = \"200ms\"\nbackoff-max = \"2s\"\n".into(),
            ..Launch::default()
        },
    )?;
    let r = agent.deploy("timer", &examples::bytes(examples::TIMER), "every=50ms")?;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = agent.deploy(
        "bad",
        &examples::bytes(examples::MISBEHAVE),
        "message=misbehave.>&timeout=300ms&memory=8MiB",
    )?;
    assert_eq!(r.status, 201, "{}", r.body);

    let t0 = invocations(&agent, "timer")?;
    let c = provoke(&agent, "misbehave.loop", "timed out after 300ms")?;
    assert_eq!(
        c["live-instances"], 0,
        "the looping instance was dropped: {c}"
    );
    let t1 = invocations(&agent, "timer")?;
    assert!(t1 > t0, "timer kept ticking during the loop ({t0} -> {t1})");

    let c = provoke(&agent, "misbehave.hog", "out of memory")?;
    assert!(
        c["memory-peak-bytes"].as_u64().unwrap_or(0) <= 8 << 20,
        "{c}"
    );
    let c = provoke(&agent, "misbehave.trap", "unreachable")?;
    assert_eq!(c["state"], "crash-looping", "three crashes in a row: {c}");

    // After the backoff, a good message runs and resets the state.
    agent.wait_for(Duration::from_secs(10), "recovery", |a| {
        a.publish("misbehave.ok", b"")?;
        std::thread::sleep(Duration::from_millis(100));
        let c = a.component("bad")?;
        Ok((c["state"] == "running" && c["consecutive-failures"] == 0).then_some(()))
    })?;
    let t2 = invocations(&agent, "timer")?;
    assert!(t2 > t1, "timer kept ticking ({t1} -> {t2})");
    assert_eq!(agent.component("timer")?["failures"], 0);

    let logs = agent.get("/v1/components/bad/logs?limit=50")?;
    let text = logs.to_string();
    assert!(
        text.contains("timed out")
            && text.contains("out of memory")
            && text.contains("unreachable"),
        "{text}"
    );
    assert_eq!(agent.get("/v1/health")?["status"], "ok");
    Ok(())
}

#[test]
fn repeated_crashes_back_off_and_show_crash_looping() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            extra_config: "[runtime]\nbackoff-base = \"400ms\"\nbackoff-max = \"800ms\"\n".into(),
            ..Launch::default()
        },
    )?;
    // misbehave's on-tick always traps.
    let r = agent.deploy(
        "looper",
        &examples::bytes(examples::MISBEHAVE),
        "every=20ms",
    )?;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = agent.deploy("timer", &examples::bytes(examples::TIMER), "every=50ms")?;
    assert_eq!(r.status, 201, "{}", r.body);
    let c = agent.wait_for(Duration::from_secs(10), "crash-looping", |a| {
        let c = a.component("looper")?;
        Ok((c["state"] == "crash-looping").then_some(c))
    })?;
    assert!(
        c["last-error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{c}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let c = agent.component("looper")?;
    let failures = c["failures"].as_u64().unwrap_or(0);
    let skipped = c["skipped"].as_u64().unwrap_or(0);
    // Without backoff, 2 s at 20 ms would be ~100 crashes; with 400-800 ms backoff, a handful.
    assert!(failures < 15, "backoff limits crashes: {c}");
    assert!(skipped > 20, "ticks were skipped while backing off: {c}");
    assert_eq!(agent.component("timer")?["state"], "running");
    assert!(
        agent
            .get("/metrics")?
            .as_str()
            .unwrap_or_default()
            .contains("perch_component_state{component=\"looper\",state=\"crash-looping\"} 1")
    );
    Ok(())
}

/// Publishes three looping messages and returns the most live instances seen while they run.
fn peak_live_instances(agent: &Perchd, name: &str) -> anyhow::Result<u64> {
    for _ in 0..3 {
        agent.publish(&format!("{name}.loop"), b"")?;
    }
    let mut peak = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = agent.component(name)?;
        peak = peak.max(c["live-instances"].as_u64().unwrap_or(0));
        if c["failures"].as_u64() == Some(3) && c["live-instances"] == 0 {
            return Ok(peak);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "three timeouts within 10 s: {c}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_instance_limit_caps_concurrent_invocations() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            extra_config: "[runtime]\nbackoff-base = \"10ms\"\nbackoff-max = \"10ms\"\n".into(),
            ..Launch::default()
        },
    )?;
    let wasm = examples::bytes(examples::MISBEHAVE);
    for (name, instances) in [("one", 1), ("three", 3)] {
        let q = format!("message={name}.%3E&timeout=400ms&instances={instances}");
        let r = agent.deploy(name, &wasm, &q)?;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    assert_eq!(
        peak_live_instances(&agent, "one")?,
        1,
        "instances=1 runs one at a time"
    );
    let peak = peak_live_instances(&agent, "three")?;
    assert!(
        peak >= 2,
        "instances=3 runs them side by side (peak {peak})"
    );
    Ok(())
}
