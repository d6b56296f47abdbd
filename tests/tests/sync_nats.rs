//! Sync over NATS against real nats-server processes started on free ports: telemetry
//! published by a component while the fleet is away reaches it once the link is back, in
//! full and without duplicated outbox records, across an agent killed with SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use perch_tests::nats::{JsApi, NatsServer, Peer, StoredMessage};
use perch_tests::{Launch, Perchd, artifact, examples, repo_root};
use serde_json::{Value, json};

type TestResult = anyhow::Result<()>;

const DEVICE: &str = "gw-1";

/// The burst component publishing 1..=`total`, `batch` every 10 ms.
fn burst(total: u64, batch: u64) -> anyhow::Result<Vec<u8>> {
    artifact(
        examples::BURST,
        &repo_root().join("fixtures/burst/Cargo.toml"),
        None,
        |m| {
            m.config.insert("total".into(), total.to_string());
            m.config.insert("batch".into(), batch.to_string());
        },
    )
}

fn outbox(agent: &Perchd) -> anyhow::Result<Value> {
    Ok(agent.get("/v1/status")?["outbox"].clone())
}

/// Waits until `total` records were appended, none is left in the outbox and the link is
/// up; returns the status.
fn wait_drained(agent: &Perchd, total: u64, timeout: Duration) -> anyhow::Result<Value> {
    agent.wait_for(timeout, "the backlog to drain", |a| {
        let s = a.get("/v1/status")?;
        let done = s["outbox"]["last-seq"].as_u64() >= Some(total)
            && s["outbox"]["backlog"].as_u64() == Some(0)
            && s["sync"]["link"] == "connected";
        Ok(done.then_some(s))
    })
}

fn sync_config(url: &str, domain: Option<&str>) -> String {
    let domain = domain.map_or(String::new(), |d| format!("domain = \"{d}\"\n"));
    format!("[sync]\ndevice = \"{DEVICE}\"\nurl = \"{url}\"\n{domain}heartbeat = \"1s\"\n")
}

/// Checks that `messages` carry every number 1..=`total` of the burst component, that no
/// outbox record (message id) is there twice, and that a number repeats at most
/// `max_repeats` times (the component's own window between an acknowledged publish and
/// its kv write, once per crash).
fn check_burst(messages: &[StoredMessage], total: u64, max_repeats: usize) {
    let mut ids = BTreeSet::new();
    let mut numbers: BTreeMap<u64, usize> = BTreeMap::new();
    for m in messages {
        assert_eq!(m.subject, format!("perch.v1.{DEVICE}.telemetry.burst"));
        let id = m.header("Nats-Msg-Id").unwrap_or_default().to_string();
        assert!(id.starts_with(&format!("{DEVICE}:")), "message id `{id}`");
        assert!(ids.insert(id.clone()), "outbox record {id} stored twice");
        let n: u64 = String::from_utf8_lossy(&m.data)
            .parse()
            .unwrap_or_else(|_| panic!("payload {:?} is not a number", m.data));
        *numbers.entry(n).or_default() += 1;
    }
    let missing: Vec<u64> = (1..=total).filter(|n| !numbers.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "{} numbers never arrived, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let repeated: Vec<(u64, usize)> = numbers
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, c)| (*n, *c))
        .collect();
    assert!(
        repeated.len() <= max_repeats && repeated.iter().all(|(_, c)| *c == 2),
        "repeated numbers: {repeated:?}"
    );
    assert_eq!(messages.len() as u64, total + repeated.len() as u64);
}

fn wait_until(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> TestResult {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what} (last error: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hub_stream(api: &JsApi, sources: Option<&str>) -> TestResult {
    let mut config = json!({
        "name": "PERCH_TELEMETRY",
        "storage": "file",
        "retention": "limits",
        "discard": "old",
        "num_replicas": 1,
        "duplicate_window": 600_000_000_000u64,
    });
    match sources {
        // Sourcing the device's stream on its leaf node, across the leaf connection.
        Some(domain) => {
            config["sources"] = json!([{
                "name": "PERCH_OUT",
                "external": { "api": format!("$JS.{domain}.API"), "deliver": "" }
            }]);
        }
        None => config["subjects"] = json!(["perch.v1.*.telemetry.>"]),
    }
    api.create_stream(&config)
}

/// The recommended deployment: a leaf node on the device with its own JetStream domain.
/// The hub is down while the component publishes 10,000 records; the agent is killed with
/// SIGKILL half-way and started again; then the hub comes back and its stream, sourcing
/// the device's, holds every record once.
#[test]
fn leaf_node_backlog_reaches_the_hub_after_an_outage_and_a_kill9() -> TestResult {
    const TOTAL: u64 = 10_000;
    let dir = tempfile::tempdir()?;
    let nats_dir = dir.path().join("nats");
    let mut hub = NatsServer::hub(&nats_dir)?;
    let leaf = NatsServer::leaf(&nats_dir, &hub, "gw1")?;
    hub_stream(&JsApi::connect(&hub.url(), None)?, Some("gw1"))?;
    hub.kill();

    let agent_dir = dir.path().join("agent");
    let launch = Launch {
        extra_config: sync_config(&leaf.url(), Some("gw1")),
        ..Launch::default()
    };
    let mut agent = Perchd::start(&agent_dir, launch.clone())?;
    let r = agent.deploy_artifact(&burst(TOTAL, 200)?)?;
    assert_eq!(r.status, 201, "{}", r.body);
    agent.wait_for(Duration::from_secs(60), "4,000 records", |a| {
        Ok((outbox(a)?["last-seq"].as_u64() >= Some(4_000)).then_some(()))
    })?;
    agent.kill9();

    let agent = Perchd::start(&agent_dir, launch)?;
    let status = agent.wait_for(Duration::from_secs(120), "every record in the leaf", |a| {
        let s = a.get("/v1/status")?;
        let done = s["outbox"]["last-seq"].as_u64() >= Some(TOTAL)
            && s["outbox"]["backlog"].as_u64() == Some(0);
        Ok(done.then_some(s))
    })?;
    assert_eq!(status["sync"]["link"], "connected", "{status}");
    assert_eq!(status["outbox"]["dropped"], 0, "{status}");

    // The hub returns: its stream catches up from the leaf.
    hub.restart()?;
    let api = JsApi::connect(&hub.url(), None)?;
    let leaf_count = JsApi::connect(&leaf.url(), Some("gw1"))?.stream_messages("PERCH_OUT")?;
    assert!(leaf_count >= TOTAL, "the leaf holds {leaf_count}");
    wait_until(Duration::from_secs(90), "the hub to catch up", || {
        Ok(api.stream_messages("PERCH_TELEMETRY")? >= leaf_count)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let messages = api.all_messages("PERCH_TELEMETRY")?;
    check_burst(&messages, TOTAL, 1);
    Ok(())
}

/// Direct to the hub: the server is killed while the component publishes and started again
/// with its data; the agent reconnects, resends what was not acknowledged, and JetStream
/// keeps one copy of each record.
#[test]
fn direct_link_resends_after_a_broker_restart_without_duplicates() -> TestResult {
    // 12 s of publishing at 500 records a second: the component is still publishing when
    // the agent notices the broker is gone, which may take a heartbeat plus the client's
    // 5 s timeout after the kill.
    const TOTAL: u64 = 6_000;
    let dir = tempfile::tempdir()?;
    let mut hub = NatsServer::standalone(&dir.path().join("nats"), "hub")?;
    hub_stream(&JsApi::connect(&hub.url(), None)?, None)?;

    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: sync_config(&hub.url(), None),
            ..Launch::default()
        },
    )?;
    // 500 records a second at most: the broker goes away while the component publishes.
    let r = agent.deploy_artifact(&burst(TOTAL, 5)?)?;
    assert_eq!(r.status, 201, "{}", r.body);
    agent.wait_for(Duration::from_secs(60), "1,000 records sent", |a| {
        let s = a.get("/v1/status")?;
        Ok((s["sync"]["sent"].as_u64() >= Some(1_000)).then_some(()))
    })?;
    hub.kill();
    let down = agent.wait_for(Duration::from_secs(30), "the link to drop", |a| {
        let s = a.get("/v1/status")?;
        Ok((s["sync"]["link"] != "connected").then_some(s))
    })?;
    assert!(down["sync"]["last-error"].is_string(), "{down}");
    // Records keep being accepted while the broker is away.
    let before = outbox(&agent)?["last-seq"].as_u64().unwrap_or(0);
    agent.wait_for(Duration::from_secs(30), "records appended offline", |a| {
        Ok((outbox(a)?["last-seq"].as_u64() > Some(before + 200)).then_some(()))
    })?;

    hub.restart()?;
    let s = wait_drained(&agent, TOTAL, Duration::from_secs(90))?;
    assert!(s["sync"]["connects"].as_u64() >= Some(2), "{s}");
    let metrics = agent.request("GET", "/metrics", None)?.body;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(
        metrics.contains("perch_sync_connected{transport=\"nats\"} 1"),
        "{metrics}"
    );
    let messages = JsApi::connect(&hub.url(), None)?.all_messages("PERCH_TELEMETRY")?;
    check_burst(&messages, TOTAL, 0);
    Ok(())
}

/// Bad `[sync]` settings stop the agent at start with the key named.
#[test]
fn a_bad_sync_section_is_a_config_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut agent = Perchd::spawn(
        dir.path(),
        Launch {
            extra_config: "[sync]\ndevice = \"Gateway 1\"\nurl = \"http://hub\"\n".into(),
            ..Launch::default()
        },
    )?;
    let status = agent.wait_exit(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(64));
    let log = agent.log();
    assert!(
        log.contains("sync.device: `Gateway 1` is not a device id")
            && log.contains("sync.url: `http://hub` must start with nats:// or tls://"),
        "{log}"
    );
    Ok(())
}

fn reported(hub: &JsApi) -> anyhow::Result<Option<Value>> {
    Ok(
        match hub.last("KV_perch-reported", &format!("$KV.perch-reported.{DEVICE}"))? {
            Some(bytes) => Some(serde_json::from_slice(&bytes)?),
            None => None,
        },
    )
}

/// Desired state lives in the hub's `perch-desired` KV; the device's leaf node mirrors its
/// key. A change made while the device is offline is applied within seconds of it coming
/// back; a document naming a missing artifact or widening a grant is rejected, reported
/// with its revision, and the running set is kept.
#[test]
fn desired_state_from_the_hub_is_applied_after_reconnect_and_bad_ones_are_rejected() -> TestResult {
    let dir = tempfile::tempdir()?;
    let nats_dir = dir.path().join("nats");
    let hub = NatsServer::hub(&nats_dir)?;
    let mut leaf = NatsServer::leaf(&nats_dir, &hub, "gw1")?;
    let api = JsApi::connect(&hub.url(), None)?;
    api.create_kv("perch-desired", None)?;
    // The device's reported state arrives from its leaf node's bucket.
    api.create_kv("perch-reported", Some("gw1"))?;
    let key = format!("$KV.perch-desired.{DEVICE}");

    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: sync_config(&leaf.url(), Some("gw1")),
            ..Launch::default()
        },
    )?;
    // Artifacts are in the device's cache (fetching them by digest from the fleet's object
    // store is a later step of the protocol).
    let timer = agent.upload_blob(&examples::bytes(examples::TIMER))?;
    let noop = agent.upload_blob(&examples::bytes(examples::NOOP))?;
    let thermostat = agent.upload_blob(&artifact(
        examples::THERMOSTAT,
        &repo_root().join("examples/thermostat/Cargo.toml"),
        None,
        |_| {},
    )?)?;

    let doc = perch_tests::desired_doc;
    api.put(
        &key,
        &doc(
            5,
            json!([{ "name": "timer", "digest": timer, "triggers": [{ "every": "100ms" }] }]),
        )?,
    )?;
    agent.wait_for(Duration::from_secs(20), "revision 5", |a| {
        let s = a.get("/v1/status")?;
        Ok((s["revision"] == 5).then_some(()))
    })?;
    agent.wait_for(Duration::from_secs(20), "timer ticks", |a| {
        Ok((a.component("timer")?["invocations"].as_u64() >= Some(2)).then_some(()))
    })?;

    // The device goes offline (its leaf node stops); the fleet changes its desired state.
    leaf.kill();
    agent.wait_for(Duration::from_secs(30), "the link to drop", |a| {
        Ok((a.get("/v1/status")?["sync"]["link"] != "connected").then_some(()))
    })?;
    api.put(
        &key,
        &doc(
            6,
            json!([
                { "name": "timer", "digest": timer, "triggers": [{ "every": "100ms" }] },
                { "name": "idle", "digest": noop, "triggers": [{ "every": "1h" }] },
            ]),
        )?,
    )?;
    leaf.restart()?;
    let back = std::time::Instant::now();
    agent.wait_for(Duration::from_secs(30), "revision 6 after reconnect", |a| {
        let s = a.get("/v1/status")?;
        Ok((s["revision"] == 6 && s["sync"]["desired"]["result"] == "applied").then_some(()))
    })?;
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "applied {took:?} after reconnect"
    );
    assert_eq!(agent.component("idle")?["state"], "running");
    agent.wait_for(
        Duration::from_secs(20),
        "revision 6 reported",
        |_| match reported(&api)? {
            Some(r) if r["applied-revision"] == 6 => Ok(Some(())),
            other => {
                let on_leaf = JsApi::connect(&leaf.url(), Some("gw1"))?
                    .last("KV_perch-reported", &format!("$KV.perch-reported.{DEVICE}"));
                let info = api.request("STREAM.INFO.KV_perch-reported", &Value::Null)?;
                anyhow::bail!("the hub has {other:?}; the leaf has {on_leaf:?}; hub info {info}")
            }
        },
    )?;

    // A missing artifact: rejected with the revision and the component named; revision 6
    // keeps running.
    let ghost = format!("sha256:{}", "1".repeat(64));
    api.put(
        &key,
        &doc(
            7,
            json!([{ "name": "ghost", "digest": ghost, "triggers": [{ "every": "1s" }] }]),
        )?,
    )?;
    let s = agent.wait_for(Duration::from_secs(20), "revision 7 rejected", |a| {
        let s = a.get("/v1/status")?;
        Ok((s["sync"]["desired"]["revision"] == 7).then_some(s))
    })?;
    assert_eq!(s["sync"]["desired"]["result"], "rejected", "{s}");
    assert!(
        s["sync"]["desired"]
            .to_string()
            .contains("component `ghost`"),
        "{s}"
    );
    assert_eq!(s["revision"], 6, "{s}");
    agent.wait_for(Duration::from_secs(20), "the rejection reported", |_| {
        Ok(reported(&api)?
            .is_some_and(|r| r["desired"]["revision"] == 7 && r["desired"]["result"] == "rejected")
            .then_some(()))
    })?;

    // A grant the component's manifest does not give: rejected, nothing changes.
    api.put(
        &key,
        &doc(
            8,
            json!([{ "name": "thermostat", "digest": thermostat, "triggers": [{ "every": "1s" }],
                     "grants": { "sensors": ["room-temp", "door"] } }]),
        )?,
    )?;
    let s = agent.wait_for(Duration::from_secs(20), "revision 8 rejected", |a| {
        let s = a.get("/v1/status")?;
        Ok((s["sync"]["desired"]["revision"] == 8).then_some(s))
    })?;
    assert_eq!(s["sync"]["desired"]["result"], "rejected", "{s}");
    assert!(s["sync"]["desired"].to_string().contains("door"), "{s}");
    assert_eq!(s["revision"], 6, "{s}");
    let timer_status = agent.component("timer")?;
    assert_eq!(timer_status["state"], "running", "{timer_status}");
    Ok(())
}

/// A flapping link: 20 cuts and restores while the component publishes. Nothing is lost,
/// no outbox record is stored twice, and the agent's memory stays flat.
#[test]
fn a_flapping_link_loses_nothing_and_memory_stays_flat() -> TestResult {
    const TOTAL: u64 = 20_000;
    let dir = tempfile::tempdir()?;
    let hub = NatsServer::standalone(&dir.path().join("nats"), "hub")?;
    let api = JsApi::connect(&hub.url(), None)?;
    hub_stream(&api, None)?;
    let proxy = perch_tests::proxy::Proxy::start(hub.port)?;
    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: sync_config(&format!("nats://127.0.0.1:{}", proxy.port), None),
            ..Launch::default()
        },
    )?;
    let bytes = artifact(
        examples::BURST,
        &repo_root().join("fixtures/burst/Cargo.toml"),
        None,
        |m| {
            m.config.insert("total".into(), TOTAL.to_string());
            // About 20 s of publishing: the cuts land while records are being appended.
            m.config.insert("batch".into(), "10".into());
        },
    )?;
    let r = agent.deploy_artifact(&bytes)?;
    assert_eq!(r.status, 201, "{}", r.body);

    let rss = |a: &Perchd| -> anyhow::Result<u64> {
        Ok(a.get("/v1/status")?["rss-bytes"].as_u64().unwrap_or(0))
    };
    let mut rss_after_5 = 0;
    for cycle in 1..=20 {
        std::thread::sleep(Duration::from_millis(400));
        proxy.cut();
        std::thread::sleep(Duration::from_millis(300));
        proxy.restore();
        if cycle == 5 {
            rss_after_5 = rss(&agent)?;
        }
    }
    let rss_after_20 = rss(&agent)?;
    let s = wait_drained(&agent, TOTAL, Duration::from_secs(120))?;
    // The client reconnected after every cut (it may ride out a short cut inside one sync
    // session: publishes wait for the reconnection, resends are deduplicated).
    assert!(
        proxy.connections() >= 21,
        "the link was cut 20 times but only {} connections were made: {s}",
        proxy.connections()
    );
    let growth = rss_after_20.saturating_sub(rss_after_5);
    assert!(
        growth < 8 << 20,
        "resident memory grew by {growth} bytes between cycle 5 ({rss_after_5}) and 20 ({rss_after_20})"
    );
    let messages = api.all_messages("PERCH_TELEMETRY")?;
    check_burst(&messages, TOTAL, 0);
    Ok(())
}

/// Artifacts by digest from the hub's `perch-components` object store, across the leaf
/// connection: a desired state naming an object not uploaded yet is rejected and tried
/// again until the object is there, then applied without a new revision; bytes that do not
/// hash to their name, or hash right but are no component, are refused before they reach
/// the cache. Commands sent from the hub are answered by the device.
#[test]
fn artifacts_come_from_the_hub_object_store_and_commands_are_answered() -> TestResult {
    let dir = tempfile::tempdir()?;
    let nats_dir = dir.path().join("nats");
    let hub = NatsServer::hub(&nats_dir)?;
    let leaf = NatsServer::leaf(&nats_dir, &hub, "gw1")?;
    let api = JsApi::connect(&hub.url(), None)?;
    api.create_kv("perch-desired", None)?;
    api.create_kv("perch-reported", Some("gw1"))?;
    let key = format!("$KV.perch-desired.{DEVICE}");
    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: sync_config(&leaf.url(), Some("gw1")),
            ..Launch::default()
        },
    )?;
    let doc = perch_tests::desired_doc;
    let desired_of =
        |a: &Perchd| -> anyhow::Result<Value> { Ok(a.get("/v1/status")?["sync"].clone()) };

    // Revision 1 names the timer, which the fleet has not uploaded yet.
    let timer = examples::bytes(examples::TIMER);
    let timer_digest = perch_core::Digest::of(&timer).to_string();
    api.put(
        &key,
        &doc(
            1,
            json!([{ "name": "timer", "digest": timer_digest, "triggers": [{ "every": "100ms" }] }]),
        )?,
    )?;
    let s = agent.wait_for(Duration::from_secs(20), "revision 1 waiting", |a| {
        let s = desired_of(a)?;
        Ok((s["desired"]["revision"] == 1).then_some(s))
    })?;
    assert_eq!(s["desired"]["result"], "rejected", "{s}");
    assert_eq!(s["desired"]["retrying"], true, "{s}");
    assert!(
        s["desired"]["details"]
            .to_string()
            .contains("component `timer`"),
        "{s}"
    );
    assert_eq!(agent.get("/v1/status")?["revision"], 0);

    // The fleet uploads it: the same document is applied at the next poll.
    api.put_object("perch-components", &timer_digest, &timer)?;
    let s = agent.wait_for(Duration::from_secs(20), "revision 1 applied", |a| {
        let s = a.get("/v1/status")?;
        Ok((s["revision"] == 1 && s["sync"]["desired"]["result"] == "applied").then_some(s))
    })?;
    assert_eq!(s["sync"]["artifacts-fetched"], 1, "{s}");
    assert_eq!(s["sync"]["artifact-bytes"], timer.len() as u64, "{s}");
    agent.wait_for(Duration::from_secs(20), "timer ticks", |a| {
        Ok((a.component("timer")?["invocations"].as_u64() >= Some(2)).then_some(()))
    })?;

    // An object whose bytes hash to something else than its name: refused for good.
    let noop = examples::bytes(examples::NOOP);
    let liar = perch_core::Digest::of(b"something else").to_string();
    api.put_object("perch-components", &liar, &noop)?;
    api.put(
        &key,
        &doc(
            2,
            json!([{ "name": "timer", "digest": timer_digest, "triggers": [{ "every": "100ms" }] },
                   { "name": "idle", "digest": liar, "triggers": [{ "every": "1h" }] }]),
        )?,
    )?;
    let s = agent.wait_for(Duration::from_secs(20), "revision 2 refused", |a| {
        let s = desired_of(a)?;
        Ok((s["desired"]["revision"] == 2).then_some(s))
    })?;
    assert_eq!(s["desired"]["result"], "rejected", "{s}");
    assert_eq!(s["desired"].get("retrying"), None, "{s}");
    assert!(
        s["desired"]["details"].to_string().contains("hash to"),
        "{s}"
    );

    // Bytes that hash right but are no component: refused before they are cached.
    let junk = b"these bytes are not a wasm component".repeat(100);
    let junk_digest = perch_core::Digest::of(&junk).to_string();
    api.put_object("perch-components", &junk_digest, &junk)?;
    let junk_doc = doc(
        3,
        json!([{ "name": "junk", "digest": junk_digest, "triggers": [{ "every": "1h" }] }]),
    )?;
    api.put(&key, &junk_doc)?;
    let s = agent.wait_for(Duration::from_secs(20), "revision 3 refused", |a| {
        let s = desired_of(a)?;
        Ok((s["desired"]["revision"] == 3).then_some(s))
    })?;
    assert_eq!(s["desired"]["result"], "rejected", "{s}");
    assert!(
        s["desired"]["details"].to_string().contains("`junk`"),
        "{s}"
    );
    let local = agent.request("PUT", "/v1/desired", Some(junk_doc))?;
    assert_eq!(local.status, 422, "{local:?}");
    assert!(
        local.body.to_string().contains("not in the cache"),
        "{local:?}"
    );
    assert_eq!(agent.get("/v1/status")?["revision"], 1);
    assert_eq!(agent.component("timer")?["state"], "running");

    // Commands from the hub reach the device through its leaf node.
    let cmd = |op: &str| format!("perch.v1.{DEVICE}.cmd.{op}");
    let r = api.command(&cmd("status"), b"", None)?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["revision"], 1, "{r}");
    let r = api.command(&cmd("logs"), b"{}", None)?;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["kind"], "bad-request", "{r}");
    assert!(
        r["error"]["message"].to_string().contains("needs `name`"),
        "{r}"
    );
    let r = api.command(&cmd("reboot"), b"", None)?;
    assert_eq!(r["error"]["kind"], "not-found", "{r}");
    // The same command id twice runs once: the second gets the first answer (running
    // `remove` again would answer "not found").
    let body = br#"{"name": "timer"}"#;
    let first = api.command(&cmd("remove"), body, Some("fleet-42"))?;
    assert_eq!(first["ok"], true, "{first}");
    let again = api.command(&cmd("remove"), body, Some("fleet-42"))?;
    assert_eq!(again, first);
    let r = api.command(&cmd("components"), b"", None)?;
    assert_eq!(r["result"], json!([]), "{r}");
    let s = agent.get("/v1/status")?;
    assert!(s["sync"]["commands"].as_u64() >= Some(6), "{s}");
    Ok(())
}

/// A download from the object store that broke off goes on at the next chunk: given what
/// an earlier attempt received (here marked, to tell it apart), the transport asks only
/// for the chunks after it.
#[test]
fn an_object_download_resumes_at_the_next_chunk() -> TestResult {
    use perch_sync::Transport as _;
    use perch_sync::artifact::{Partial, Progress, Resume};

    let dir = tempfile::tempdir()?;
    let hub = NatsServer::standalone(&dir.path().join("nats"), "hub")?;
    let api = JsApi::connect(&hub.url(), None)?;
    // Eight chunks of the object store's default 128 KiB, the last one short.
    let bytes: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = perch_core::Digest::of(&bytes);
    api.put_object("perch-components", &digest.to_string(), &bytes)?;

    let config = perch_core::AgentConfig::from_toml(&sync_config(&hub.url(), None), "test")?
        .sync
        .ok_or_else(|| anyhow::anyhow!("no sync section"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut nats = perch_sync::nats::Nats::new(&config)?;
        nats.connect().await?;
        let mut progress = Progress::new(&digest);
        let mut whole = Partial::default();
        nats.fetch_artifact(&digest, &mut whole, &mut progress)
            .await?;
        assert_eq!(whole.bytes, bytes);
        let Resume::Object { nuid, .. } = whole.resume.clone() else {
            anyhow::bail!("no object resume point: {:?}", whole.resume);
        };

        // As if the link broke after three chunks (stream sequences 1 to 3).
        const CHUNK: usize = 128 * 1024;
        let mut partial = Partial {
            bytes: vec![0xAA; 3 * CHUNK],
            total: Some(bytes.len() as u64),
            resume: Resume::Object { nuid, next_seq: 4 },
        };
        nats.fetch_artifact(&digest, &mut partial, &mut progress)
            .await?;
        assert_eq!(partial.bytes.len(), bytes.len());
        assert!(
            partial.bytes[..3 * CHUNK].iter().all(|b| *b == 0xAA),
            "the chunks held were fetched again"
        );
        assert_eq!(partial.bytes[3 * CHUNK..], bytes[3 * CHUNK..]);

        // A resume point of another upload of the name starts over.
        let mut stale = Partial {
            bytes: vec![0xAA; CHUNK],
            total: Some(bytes.len() as u64),
            resume: Resume::Object {
                nuid: "another-upload".into(),
                next_seq: 2,
            },
        };
        nats.fetch_artifact(&digest, &mut stale, &mut progress)
            .await?;
        assert_eq!(stale.bytes, bytes);

        // A name the store does not hold is worth retrying later; nothing is kept.
        let mut missing = Partial::default();
        let e = nats
            .fetch_artifact(
                &perch_core::Digest::of(b"absent"),
                &mut missing,
                &mut progress,
            )
            .await
            .expect_err("absent");
        assert!(!e.permanent && e.reason.contains("no object"), "{e}");
        Ok(())
    })
}

/// The payloads received on `subject`, as text.
fn texts_on(got: &[(String, Vec<u8>)], subject: &str) -> Vec<String> {
    got.iter()
        .filter(|(s, _)| s == subject)
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
        .collect()
}

#[test]
fn fleet_messages_reach_components_and_their_messages_reach_the_fleet() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut nats = NatsServer::standalone(&dir.path().join("nats"), "hub")?;
    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: sync_config(&nats.url(), None),
            ..Launch::default()
        },
    )?;
    let relay = examples::bytes(examples::RELAY);
    let r = agent.deploy("relay", &relay, "message=work.>")?;
    assert!(r.status < 300, "{r:?}");
    let fleet = Peer::connect(&nats.url(), &format!("perch.v1.{DEVICE}.out.>"))?;
    let work = |leaf: &str| format!("perch.v1.{DEVICE}.in.work.{leaf}");
    let done = |leaf: &str| format!("perch.v1.{DEVICE}.out.done.{leaf}");

    // Until the link is up and subscribed, a probe may go nowhere: repeat it.
    agent.wait_for(Duration::from_secs(20), "a first round trip", |_| {
        fleet.publish(&work("probe"), b"calls")?;
        std::thread::sleep(Duration::from_millis(100));
        Ok((!texts_on(&fleet.received(), &done("probe")).is_empty()).then_some(()))
    })?;

    // 2,000 messages from the fleet, each handled by the component in a fresh instance and
    // its answer sent back up: every one arrives.
    const N: usize = 2000;
    for i in 0..N {
        fleet.publish(&work("job"), i.to_string().as_bytes())?;
    }
    let got = fleet.wait_for(Duration::from_secs(30), "every answer", |got| {
        texts_on(got, &done("job")).len() >= N
    })?;
    let answers: BTreeSet<String> = texts_on(&got, &done("job")).into_iter().collect();
    let expected: BTreeSet<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(answers, expected);
    // A fresh instance per call: every call is the instance's first.
    assert!(
        texts_on(&got, &done("probe")).iter().all(|c| c == "1"),
        "{:?}",
        texts_on(&got, &done("probe"))
    );

    // With `calls-per-instance` the component keeps its instance, and its state, between
    // calls.
    let r = agent.deploy(
        "relay",
        &relay,
        "message=work.>&instances=1&calls-per-instance=100",
    )?;
    assert!(r.status < 300, "{r:?}");
    for _ in 0..3 {
        fleet.publish(&work("count"), b"calls")?;
    }
    let got = fleet.wait_for(Duration::from_secs(10), "three counts", |got| {
        texts_on(got, &done("count")).len() >= 3
    })?;
    assert_eq!(texts_on(&got, &done("count")), ["1", "2", "3"]);

    // What the local API publishes goes up too.
    let r = agent.publish("alarm.door", b"open")?;
    assert!(r.status < 300, "{r:?}");
    let got = fleet.wait_for(Duration::from_secs(10), "the alarm", |got| {
        !texts_on(got, &format!("perch.v1.{DEVICE}.out.alarm.door")).is_empty()
    })?;
    assert_eq!(
        texts_on(&got, &format!("perch.v1.{DEVICE}.out.alarm.door")),
        ["open"]
    );
    let s = agent.get("/v1/status")?;
    assert!(
        s["sync"]["messages-in"].as_u64() >= Some(N as u64 + 4),
        "{s}"
    );
    assert!(
        s["sync"]["messages-out"].as_u64() >= Some(N as u64 + 4),
        "{s}"
    );
    assert_eq!(s["sync"]["messages-dropped"], 0, "{s}");

    // Without a link, messages for the fleet are dropped and counted (telemetry is the
    // durable path).
    nats.kill();
    agent.wait_for(Duration::from_secs(30), "the link to drop", |a| {
        Ok((a.get("/v1/status")?["sync"]["link"] != "connected").then_some(()))
    })?;
    agent.publish("alarm.door", b"closed")?;
    let s = agent.wait_for(Duration::from_secs(10), "the drop counted", |a| {
        let s = a.get("/v1/status")?;
        Ok((s["sync"]["messages-dropped"].as_u64() >= Some(1)).then_some(s))
    })?;
    assert_eq!(s["sync"]["messages-dropped"], 1, "{s}");
    Ok(())
}
