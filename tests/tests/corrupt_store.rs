//! A corrupt entry in the store is detected, reported and refused, never executed: the
//! agent starts, shows the component as failed with the reason, and a redeploy heals it.

use std::time::Duration;

use perch_tests::{Launch, Perchd, examples};

/// Flips one byte in every stored chunk (blobs and precompiled artifacts alike), the way a
/// bad flash block would, by opening the stopped agent's sled database directly.
fn damage_every_chunk(data: &std::path::Path) -> anyhow::Result<usize> {
    let db = sled::open(data)?;
    let chunks = db.open_tree("perch/chunks")?;
    let mut n = 0;
    for item in chunks.iter() {
        let (k, v) = item?;
        let mut v = v.to_vec();
        let i = v.len() / 2;
        v[i] ^= 0x5a;
        chunks.insert(k, v)?;
        n += 1;
    }
    db.flush()?;
    Ok(n)
}

#[test]
fn corrupt_blobs_and_artifacts_are_refused_and_reported() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let timer = examples::bytes(examples::TIMER);
    let mut agent = Perchd::start(dir.path(), Launch::default())?;
    let r = agent.deploy("timer", &timer, "every=50ms")?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(agent.stop()?.success());

    let damaged = damage_every_chunk(&dir.path().join("data"))?;
    assert!(
        damaged > 10,
        "the blob and its artifact span many chunks ({damaged})"
    );

    let agent = Perchd::start(dir.path(), Launch::default())?;
    let c = agent.component("timer")?;
    assert_eq!(c["state"], "failed", "{c}");
    assert_eq!(c["invocations"], 0, "corrupt code never ran: {c}");
    let msg = c["last-error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("corrupt") && msg.contains("timer"), "{msg}");
    let logs = agent.get("/v1/components/timer/logs")?.to_string();
    assert!(logs.contains("cannot start"), "{logs}");
    assert!(agent.log().contains("corrupt"), "the agent log reports it");
    assert_eq!(agent.get("/v1/health")?["status"], "ok");

    // Deploying the same file again stores clean bytes and runs them.
    let r = agent.deploy("timer", &timer, "every=50ms")?;
    assert_eq!(r.status, 201, "{}", r.body);
    agent.wait_for(Duration::from_secs(10), "the healed timer to tick", |a| {
        let c = a.component("timer")?;
        Ok((c["state"] == "running" && c["invocations"].as_u64().unwrap_or(0) >= 2).then_some(()))
    })?;
    Ok(())
}

#[test]
fn an_unrecoverable_store_is_set_aside_and_the_agent_starts_empty() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut agent = Perchd::start(dir.path(), Launch::default())?;
    let r = agent.deploy("timer", &examples::bytes(examples::TIMER), "every=1s")?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(agent.stop()?.success());

    // Overwrite sled's log with garbage, as a failed flash write might.
    let db = dir.path().join("data").join("db");
    let len = std::fs::metadata(&db)?.len() as usize;
    std::fs::write(
        &db,
        (0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>(),
    )?;

    let agent = Perchd::start(dir.path(), Launch::default())?;
    assert_eq!(agent.get("/v1/health")?["status"], "ok");
    assert_eq!(agent.get("/v1/components")?, serde_json::json!([]));
    assert!(
        agent.log().contains("moved it aside and starting empty"),
        "{}",
        agent.log()
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("data.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged store is kept for inspection");
    // And it works: a deploy runs.
    let r = agent.deploy("timer", &examples::bytes(examples::TIMER), "every=1s")?;
    assert_eq!(r.status, 201, "{}", r.body);
    Ok(())
}
