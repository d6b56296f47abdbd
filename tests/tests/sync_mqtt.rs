//! Sync over MQTT v5 against real mosquitto brokers started on free ports with persistence
//! in the test's directory: telemetry across a broker killed with SIGKILL and restarted
//! (nothing lost, duplicates carry the same `perch-msg-id`), desired state from a retained
//! topic with the outcome in the retained reported state, the last will when the agent
//! dies, and a publish the broker refuses kept in the outbox until it is allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use perch_tests::mqtt::{Mosquitto, Received, Receiver};
use perch_tests::{Launch, Perchd, artifact, examples, repo_root};
use serde_json::{Value, json};

type TestResult = anyhow::Result<()>;

const DEVICE: &str = "gw-1";
/// The agent's MQTT keep-alive (`perch_sync::mqtt::KEEP_ALIVE`).
const KEEP_ALIVE: Duration = Duration::from_secs(10);

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

fn sync_config(broker: &Mosquitto, extra: &str) -> String {
    format!(
        "[sync]\ndevice = \"{DEVICE}\"\ntransport = \"mqtt\"\nurl = \"{}\"\nheartbeat = \"1s\"\n{extra}",
        broker.url()
    )
}

fn topic(leaf: &str) -> String {
    format!("perch/v1/{DEVICE}/{leaf}")
}

fn status(agent: &Perchd) -> anyhow::Result<Value> {
    agent.get("/v1/status")
}

/// Every telemetry message received, checked for topic and properties; returns the
/// number each distinct `perch-msg-id` carried, and how many messages repeated an id.
fn by_message_id(messages: &[Received]) -> (BTreeMap<String, u64>, usize) {
    let mut ids = BTreeMap::new();
    let mut repeats = 0;
    for m in messages {
        assert_eq!(m.topic, topic("telemetry/burst"), "{m:?}");
        let id = m.property("perch-msg-id").unwrap_or_default().to_string();
        assert!(id.starts_with(&format!("{DEVICE}:")), "message id in {m:?}");
        assert_eq!(m.property("perch-component"), Some("burst"), "{m:?}");
        assert!(
            m.property("perch-time")
                .and_then(|t| t.parse::<u64>().ok())
                .is_some(),
            "{m:?}"
        );
        let n: u64 = m
            .text()
            .parse()
            .unwrap_or_else(|_| panic!("payload {:?} is not a number", m.payload));
        match ids.insert(id.clone(), n) {
            None => {}
            Some(earlier) => {
                assert_eq!(earlier, n, "two payloads under {id}");
                repeats += 1;
            }
        }
    }
    (ids, repeats)
}

/// The broker is killed (SIGKILL) while a component publishes and started again with its
/// saved state. The agent reconnects with a fresh session and sends again from the outbox
/// what was not acknowledged; a fleet subscriber with a persistent session gets every
/// record, a few twice under the same `perch-msg-id` (at-least-once), none lost.
#[test]
fn telemetry_survives_a_broker_kill9_and_restart() -> TestResult {
    const TOTAL: u64 = 5_000;
    const WINDOW: usize = 256;
    let dir = tempfile::tempdir()?;
    let mut broker = Mosquitto::start(&dir.path().join("mosquitto"), "")?;
    // The fleet's subscriber is there before anything is published.
    let fleet = Receiver::connect(
        broker.port,
        "fleet-telemetry",
        None,
        &[&topic("telemetry/#")],
    )?;

    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: sync_config(&broker, &format!("window = {WINDOW}\n")),
            ..Launch::default()
        },
    )?;
    let r = agent.deploy_artifact(&burst(TOTAL, 10)?)?;
    assert_eq!(r.status, 201, "{}", r.body);
    agent.wait_for(Duration::from_secs(60), "1,000 records sent", |a| {
        let s = status(a)?;
        Ok((s["sync"]["sent"].as_u64() >= Some(1_000)).then_some(()))
    })?;
    broker.kill();
    let down = agent.wait_for(Duration::from_secs(30), "the link to drop", |a| {
        let s = status(a)?;
        Ok((s["sync"]["link"] != "connected").then_some(s))
    })?;
    assert!(down["sync"]["last-error"].is_string(), "{down}");
    assert!(
        down["outbox"]["last-seq"].as_u64() < Some(TOTAL),
        "the broker went away after the component finished: {down}"
    );
    // Records keep being accepted while the broker is away.
    let before = down["outbox"]["last-seq"].as_u64().unwrap_or(0);
    agent.wait_for(Duration::from_secs(30), "records appended offline", |a| {
        Ok((status(a)?["outbox"]["last-seq"].as_u64() > Some(before + 200)).then_some(()))
    })?;

    broker.restart()?;
    let s = agent.wait_for(Duration::from_secs(120), "the backlog to drain", |a| {
        let s = status(a)?;
        let done = s["outbox"]["last-seq"].as_u64() >= Some(TOTAL)
            && s["outbox"]["backlog"].as_u64() == Some(0)
            && s["sync"]["link"] == "connected";
        Ok(done.then_some(s))
    })?;
    assert_eq!(s["sync"]["transport"], "mqtt", "{s}");
    assert_eq!(s["outbox"]["dropped"], 0, "{s}");
    assert!(s["sync"]["connects"].as_u64() >= Some(2), "{s}");
    let metrics = agent.request("GET", "/metrics", None)?.body;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(
        metrics.contains("perch_sync_connected{transport=\"mqtt\"} 1"),
        "{metrics}"
    );

    let distinct = |m: &[Received]| {
        m.iter()
            .filter_map(|m| m.property("perch-msg-id"))
            .collect::<BTreeSet<_>>()
            .len() as u64
    };
    let messages = fleet
        .wait_for(Duration::from_secs(60), "every record at the fleet", |m| {
            distinct(m) >= TOTAL
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}; the fleet has {} distinct of {TOTAL}",
                distinct(&fleet.messages())
            )
        })?;
    // Late duplicates, if any, have arrived too.
    std::thread::sleep(Duration::from_secs(1));
    let messages = if fleet.messages().len() > messages.len() {
        fleet.messages()
    } else {
        messages
    };
    let (ids, repeats) = by_message_id(&messages);
    let numbers: BTreeSet<u64> = ids.values().copied().collect();
    let missing: Vec<u64> = (1..=TOTAL).filter(|n| !numbers.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{} numbers never arrived, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // The agent was not killed, so the component published each number once: one outbox
    // record, one message id.
    assert_eq!(ids.len() as u64, TOTAL, "message ids vs numbers");
    // Duplicates: the records in flight when the broker died, sent again (one window at
    // most), and what the broker itself delivers twice after its restart.
    assert!(
        repeats <= WINDOW,
        "{repeats} duplicates for one broker restart"
    );
    eprintln!(
        "{} messages for {TOTAL} records: {repeats} duplicates; fleet connects {}",
        messages.len(),
        fleet.connects()
    );
    Ok(())
}

fn reported(fleet: &Receiver) -> Option<Value> {
    fleet
        .last_on(&topic("reported"))
        .and_then(|m| serde_json::from_slice(&m.payload).ok())
}

/// The fleet retains the device's desired state on `perch/v1/<device>/desired`. A change is
/// applied live; a change made while the agent is down is applied when it connects again;
/// an undecodable document and one naming a missing artifact are rejected, the running set
/// is kept, and the outcome is in the retained reported state.
#[test]
fn desired_state_from_a_retained_topic_is_applied_and_bad_ones_are_reported() -> TestResult {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("mosquitto"), "")?;
    let fleet = Receiver::connect(broker.port, "fleet-state", None, &[&topic("reported")])?;
    let desired = topic("desired");
    let launch = Launch {
        extra_config: sync_config(&broker, ""),
        ..Launch::default()
    };
    let agent_dir = dir.path().join("agent");
    let mut agent = Perchd::start(&agent_dir, launch.clone())?;
    let timer = agent.upload_blob(&examples::bytes(examples::TIMER))?;
    let noop = agent.upload_blob(&examples::bytes(examples::NOOP))?;
    let doc = perch_tests::desired_doc;

    fleet.publish(
        &desired,
        &doc(
            5,
            json!([{ "name": "timer", "digest": timer, "triggers": [{ "every": "100ms" }] }]),
        )?,
        true,
    )?;
    agent.wait_for(Duration::from_secs(20), "revision 5", |a| {
        let s = status(a)?;
        Ok((s["revision"] == 5 && s["sync"]["desired"]["result"] == "applied").then_some(()))
    })?;
    agent.wait_for(Duration::from_secs(20), "timer ticks", |a| {
        Ok((a.component("timer")?["invocations"].as_u64() >= Some(2)).then_some(()))
    })?;
    fleet.wait_for(Duration::from_secs(20), "revision 5 reported", |_| {
        reported(&fleet).is_some_and(|r| r["applied-revision"] == 5)
    })?;

    // The agent dies; the fleet changes the retained document meanwhile.
    agent.kill9();
    fleet.publish(
        &desired,
        &doc(
            6,
            json!([
                { "name": "timer", "digest": timer, "triggers": [{ "every": "100ms" }] },
                { "name": "idle", "digest": noop, "triggers": [{ "every": "1h" }] },
            ]),
        )?,
        true,
    )?;
    agent = Perchd::start(&agent_dir, launch)?;
    let back = Instant::now();
    agent.wait_for(Duration::from_secs(30), "revision 6 after restart", |a| {
        let s = status(a)?;
        Ok((s["revision"] == 6 && s["sync"]["desired"]["result"] == "applied").then_some(()))
    })?;
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "applied {took:?} after start"
    );
    assert_eq!(agent.component("idle")?["state"], "running");

    // A component without a digest: the document does not decode; rejected as a whole.
    fleet.publish(
        &desired,
        &doc(
            7,
            json!([{ "name": "ghost", "triggers": [{ "every": "1s" }] }]),
        )?,
        true,
    )?;
    let s = agent.wait_for(Duration::from_secs(20), "the undecodable document", |a| {
        let s = status(a)?;
        Ok((s["sync"]["desired"]["result"] == "rejected").then_some(s))
    })?;
    assert!(
        s["sync"]["desired"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("digest")),
        "{s}"
    );
    // Its revision is still reported, read from the raw document.
    assert_eq!(s["sync"]["desired"]["revision"], 7, "{s}");
    assert_eq!(s["revision"], 6, "{s}");
    fleet.wait_for(Duration::from_secs(20), "the rejection reported", |_| {
        reported(&fleet).is_some_and(|r| {
            r["desired"]["result"] == "rejected"
                && r["desired"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("digest"))
        })
    })?;

    // A digest the device does not have: rejected with its revision and the component named.
    let ghost = format!("sha256:{}", "1".repeat(64));
    fleet.publish(
        &desired,
        &doc(
            8,
            json!([{ "name": "ghost", "digest": ghost, "triggers": [{ "every": "1s" }] }]),
        )?,
        true,
    )?;
    let s = agent.wait_for(Duration::from_secs(20), "revision 8 rejected", |a| {
        let s = status(a)?;
        Ok((s["sync"]["desired"]["revision"] == 8).then_some(s))
    })?;
    assert_eq!(s["sync"]["desired"]["result"], "rejected", "{s}");
    assert!(
        s["sync"]["desired"]
            .to_string()
            .contains("component `ghost`"),
        "{s}"
    );
    assert_eq!(s["revision"], 6, "{s}");
    assert_eq!(agent.component("timer")?["state"], "running");
    fleet.wait_for(
        Duration::from_secs(20),
        "revision 8 rejection reported",
        |_| {
            reported(&fleet).is_some_and(|r| {
                r["desired"]["revision"] == 8
                    && r["desired"]["result"] == "rejected"
                    && r["applied-revision"] == 6
            })
        },
    )?;

    // The reported state is retained: a subscriber arriving now gets it at once.
    let late = Receiver::connect(broker.port, "fleet-late", None, &[&topic("reported")])?;
    let m = late.wait_for(
        Duration::from_secs(10),
        "the retained reported state",
        |m| !m.is_empty(),
    )?;
    assert!(m[0].retain, "{:?}", m[0]);
    let r: Value = serde_json::from_slice(&m[0].payload)?;
    assert_eq!(r["desired"]["revision"], 8, "{r}");
    assert_eq!(r["desired"]["result"], "rejected", "{r}");
    Ok(())
}

/// `perch/v1/<device>/online` is `1` (retained) while the agent is connected; killed with
/// SIGKILL, its last will sets it to `0` within the keep-alive allowance; back, `1` again.
#[test]
fn the_last_will_marks_a_killed_agent_offline() -> TestResult {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("mosquitto"), "")?;
    let online = topic("online");
    let fleet = Receiver::connect(broker.port, "fleet-presence", None, &[&online])?;
    let launch = Launch {
        extra_config: sync_config(&broker, ""),
        ..Launch::default()
    };
    let agent_dir = dir.path().join("agent");
    let mut agent = Perchd::start(&agent_dir, launch.clone())?;
    let is = |value: &'static str| {
        let fleet = &fleet;
        let online = online.clone();
        move |_: &[Received]| fleet.last_on(&online).is_some_and(|m| m.text() == value)
    };
    fleet.wait_for(Duration::from_secs(20), "online = 1", is("1"))?;

    agent.kill9();
    let killed = Instant::now();
    let allowance = KEEP_ALIVE * 3 / 2 + Duration::from_secs(2);
    fleet.wait_for(allowance, "online = 0 (the last will)", is("0"))?;
    eprintln!(
        "the last will arrived {:?} after the kill",
        killed.elapsed()
    );

    // Retained: a subscriber arriving now learns the device is offline.
    let late = Receiver::connect(broker.port, "fleet-late", None, &[&online])?;
    let m = late.wait_for(Duration::from_secs(10), "the retained presence", |m| {
        !m.is_empty()
    })?;
    assert_eq!((m[0].text().as_str(), m[0].retain), ("0", true));

    let _back = Perchd::start(&agent_dir, launch)?;
    fleet.wait_for(Duration::from_secs(20), "online = 1 again", is("1"))?;
    Ok(())
}

/// An MQTT v5 broker says when it refuses a publish (PUBACK reason `NotAuthorized`): the
/// records stay in the outbox, the link says why, and they are delivered once the ACL
/// allows them (reloaded with SIGHUP), none lost.
#[test]
fn a_publish_the_broker_refuses_stays_in_the_outbox_until_allowed() -> TestResult {
    const TOTAL: u64 = 300;
    let dir = tempfile::tempdir()?;
    let broker_dir = dir.path().join("mosquitto");
    std::fs::create_dir_all(&broker_dir)?;
    let acl = broker_dir.join("acl");
    let allow = format!(
        "user {DEVICE}\ntopic readwrite perch/v1/{DEVICE}/#\nuser fleet\ntopic readwrite #\n"
    );
    let deny = format!(
        "user {DEVICE}\ntopic deny perch/v1/{DEVICE}/telemetry/#\ntopic readwrite perch/v1/{DEVICE}/#\nuser fleet\ntopic readwrite #\n"
    );
    std::fs::write(&acl, &deny)?;
    let broker = Mosquitto::start(&broker_dir, &format!("acl_file {}", acl.display()))?;
    let fleet = Receiver::connect(
        broker.port,
        "fleet-acl",
        Some("fleet"),
        &[&topic("telemetry/#")],
    )?;
    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: sync_config(&broker, &format!("user = \"{DEVICE}\"\n")),
            ..Launch::default()
        },
    )?;
    let r = agent.deploy_artifact(&burst(TOTAL, 50)?)?;
    assert_eq!(r.status, 201, "{}", r.body);
    // The broker answers the publish with a NotAuthorized PUBACK (and mosquitto may then
    // drop the connection, so the link's last error can be either); what matters is that
    // nothing refused leaves the outbox.
    let s = agent.wait_for(Duration::from_secs(30), "the refusal", |a| {
        let s = status(a)?;
        let refused = a.log().contains("NotAuthorized") && s["sync"]["last-error"].is_string();
        Ok((refused && s["outbox"]["last-seq"].as_u64() >= Some(TOTAL)).then_some(s))
    })?;
    assert_eq!(s["outbox"]["backlog"].as_u64(), Some(TOTAL), "{s}");
    assert_eq!(s["sync"]["sent"], 0, "{s}");
    assert!(fleet.messages().is_empty());

    std::fs::write(&acl, &allow)?;
    broker.reload()?;
    agent.wait_for(Duration::from_secs(30), "the backlog to drain", |a| {
        let s = status(a)?;
        Ok((s["outbox"]["backlog"].as_u64() == Some(0)).then_some(()))
    })?;
    let messages = fleet.wait_for(Duration::from_secs(20), "every record", |m| {
        m.len() as u64 >= TOTAL
    })?;
    let (ids, _) = by_message_id(&messages);
    let numbers: BTreeSet<u64> = ids.values().copied().collect();
    assert_eq!(numbers, (1..=TOTAL).collect::<BTreeSet<u64>>());
    Ok(())
}

/// A broker that stops answering (SIGSTOP) with its connections open: the agent notices
/// through its keep-alive and unanswered acks, reports the link down, keeps the records,
/// and once the broker answers again reconnects, delivers them and is online.
#[test]
fn a_frozen_broker_is_detected_and_the_link_recovers() -> TestResult {
    const TOTAL: u64 = 500;
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("mosquitto"), "")?;
    let online = topic("online");
    let fleet = Receiver::connect(
        broker.port,
        "fleet-frozen",
        None,
        &[&topic("telemetry/#"), &online],
    )?;
    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: sync_config(&broker, ""),
            ..Launch::default()
        },
    )?;
    agent.wait_for(Duration::from_secs(20), "the link", |a| {
        Ok((status(a)?["sync"]["link"] == "connected").then_some(()))
    })?;

    broker.freeze()?;
    let frozen = Instant::now();
    let r = agent.deploy_artifact(&burst(TOTAL, 50)?)?;
    assert_eq!(r.status, 201, "{}", r.body);
    // Two keep-alives without a ping answer, or an ack timeout, whichever comes first.
    let s = agent.wait_for(KEEP_ALIVE * 3, "the link to drop", |a| {
        let s = status(a)?;
        Ok((s["sync"]["link"] != "connected").then_some(s))
    });
    let detected = frozen.elapsed();
    broker.thaw()?;
    let s = s?;
    eprintln!(
        "frozen broker detected after {detected:?}: {}",
        s["sync"]["last-error"]
    );
    assert_eq!(s["sync"]["sent"], 0, "{s}");

    agent.wait_for(Duration::from_secs(60), "the backlog to drain", |a| {
        let s = status(a)?;
        let done = s["outbox"]["last-seq"].as_u64() >= Some(TOTAL)
            && s["outbox"]["backlog"].as_u64() == Some(0)
            && s["sync"]["link"] == "connected";
        Ok(done.then_some(()))
    })?;
    let messages = fleet.wait_for(Duration::from_secs(20), "every record", |m| {
        m.iter().filter(|m| m.topic != online).count() as u64 >= TOTAL
    })?;
    let telemetry: Vec<Received> = messages
        .iter()
        .filter(|m| m.topic != online)
        .cloned()
        .collect();
    let (ids, _) = by_message_id(&telemetry);
    let numbers: BTreeSet<u64> = ids.values().copied().collect();
    assert_eq!(numbers, (1..=TOTAL).collect::<BTreeSet<u64>>());
    // Whatever order the broker handled the old connection's end (its last will, `0`) and
    // the new connection in, the device ends up online.
    std::thread::sleep(Duration::from_secs(1));
    let late = Receiver::connect(broker.port, "fleet-late", None, &[&online])?;
    let m = late.wait_for(Duration::from_secs(10), "the retained presence", |m| {
        !m.is_empty()
    })?;
    assert_eq!(m[0].text(), "1", "{m:?}");
    Ok(())
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) -> TestResult {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| anyhow::anyhow!("run openssl (Debian package openssl): {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate for `gw-1`.
fn make_certs(dir: &std::path::Path) -> TestResult {
    std::fs::create_dir_all(dir)?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=perch test CA",
    ]);
    openssl(dir, &ca)?;
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n")?;
    std::fs::write(
        dir.join("client.ext"),
        "extendedKeyUsage=clientAuth\nsubjectAltName=DNS:gw-1\n",
    )?;
    for (name, cn) in [("server", "/CN=127.0.0.1"), ("client", "/CN=gw-1")] {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", cn]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        )?;
    }
    Ok(())
}

/// `mqtts://` with mutual TLS: the broker requires a client certificate signed by its CA and
/// takes its common name as the user name; the agent trusts the CA of `ca-file` and shows
/// `cert-file` and `key-file`. Telemetry and presence flow as over plain TCP.
#[test]
fn mutual_tls_carries_telemetry_and_presence() -> TestResult {
    const TOTAL: u64 = 100;
    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    make_certs(&tls)?;
    let tls_port = perch_tests::free_port();
    let broker = Mosquitto::start(
        &dir.path().join("mosquitto"),
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\nrequire_certificate true\nuse_identity_as_username true\n",
            tls.display()
        ),
    )?;
    let online = topic("online");
    let fleet = Receiver::connect(
        broker.port,
        "fleet-tls",
        None,
        &[&topic("telemetry/#"), &online],
    )?;
    let agent = Perchd::start(
        &dir.path().join("agent"),
        Launch {
            extra_config: format!(
                "[sync]\ndevice = \"{DEVICE}\"\ntransport = \"mqtt\"\nurl = \"mqtts://127.0.0.1:{tls_port}\"\nheartbeat = \"1s\"\nca-file = \"{0}/ca.pem\"\ncert-file = \"{0}/client.pem\"\nkey-file = \"{0}/client.key\"\n",
                tls.display()
            ),
            ..Launch::default()
        },
    )?;
    let r = agent.deploy_artifact(&burst(TOTAL, 10)?)?;
    assert_eq!(r.status, 201, "{}", r.body);
    let s = agent.wait_for(Duration::from_secs(30), "the backlog to drain", |a| {
        let s = status(a)?;
        let done = s["outbox"]["last-seq"].as_u64() >= Some(TOTAL)
            && s["outbox"]["backlog"].as_u64() == Some(0);
        Ok(done.then_some(s))
    })?;
    assert_eq!(s["sync"]["link"], "connected", "{s}");
    assert!(
        s["sync"]["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("mqtts://")),
        "{s}"
    );
    let messages = fleet.wait_for(Duration::from_secs(20), "every record", |m| {
        m.iter().filter(|m| m.topic != online).count() as u64 >= TOTAL
    })?;
    assert!(
        messages
            .iter()
            .any(|m| m.topic == online && m.text() == "1"),
        "presence over TLS"
    );
    let telemetry: Vec<Received> = messages.into_iter().filter(|m| m.topic != online).collect();
    let (ids, _) = by_message_id(&telemetry);
    let numbers: BTreeSet<u64> = ids.values().copied().collect();
    assert_eq!(numbers, (1..=TOTAL).collect::<BTreeSet<u64>>());
    // The broker took the user name from the client certificate.
    let log = broker.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("as perch-gw-1") && l.contains("u'gw-1'")),
        "{log}"
    );
    Ok(())
}

/// Over MQTT artifacts come from the component's `source` URL. A download the server
/// breaks off half-way resumes where it stopped (an HTTP `Range`), is verified and cached;
/// a component without a source is refused with the reason. Commands published with a
/// response topic are answered there with their correlation data, and a command repeated
/// with the same `perch-cmd-id` runs once; a command sent while the device is offline is
/// queued by the broker in the device's session and answered when it is back.
#[test]
fn artifacts_from_urls_resume_and_commands_are_answered() -> TestResult {
    use perch_tests::files::FileServer;

    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("mosquitto"), "")?;
    let answers = topic("answers");
    let fleet = Receiver::connect(broker.port, "fleet-cmd", None, &[&answers])?;
    let files = FileServer::start()?;
    let launch = Launch {
        extra_config: sync_config(&broker, ""),
        ..Launch::default()
    };
    let agent_dir = dir.path().join("agent");
    let mut agent = Perchd::start(&agent_dir, launch.clone())?;
    let doc = perch_tests::desired_doc;

    let timer = examples::bytes(examples::TIMER);
    let digest = perch_core::Digest::of(&timer).to_string();
    files.put("/c/timer.wasm", timer.clone());
    files.break_next(1);
    fleet.publish(
        &topic("desired"),
        &doc(
            1,
            json!([{ "name": "timer", "digest": digest, "source": files.url("/c/timer.wasm"),
                     "triggers": [{ "every": "100ms" }] }]),
        )?,
        true,
    )?;
    let s = agent.wait_for(Duration::from_secs(30), "revision 1 applied", |a| {
        let s = status(a)?;
        Ok((s["revision"] == 1 && s["sync"]["desired"]["result"] == "applied").then_some(s))
    })?;
    assert_eq!(s["sync"]["artifacts-fetched"], 1, "{s}");
    let seen = files.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].range, None);
    assert_eq!(
        seen[1].range.as_deref(),
        Some(format!("bytes={}-", timer.len() / 2).as_str()),
        "the second request resumes at the break: {seen:?}"
    );
    assert!(agent.log().contains("resumes at the next attempt"));

    // No source: over MQTT there is no object store to fall back on.
    let noop = examples::bytes(examples::NOOP);
    fleet.publish(
        &topic("desired"),
        &doc(
            2,
            json!([{ "name": "idle", "digest": perch_core::Digest::of(&noop).to_string(),
                     "triggers": [{ "every": "1h" }] }]),
        )?,
        true,
    )?;
    let s = agent.wait_for(Duration::from_secs(20), "revision 2 refused", |a| {
        let s = status(a)?;
        Ok((s["sync"]["desired"]["revision"] == 2).then_some(s))
    })?;
    assert_eq!(s["sync"]["desired"]["result"], "rejected", "{s}");
    assert!(
        s["sync"]["desired"]["details"]
            .to_string()
            .contains("`source`"),
        "{s}"
    );
    assert_eq!(s["revision"], 1, "{s}");

    // Commands, MQTT 5 request/response.
    let answer = |id: &str| -> anyhow::Result<Value> {
        let m = fleet.wait_for(Duration::from_secs(20), "the answer", |ms| {
            ms.iter().any(|m| m.property("perch-cmd-id") == Some(id))
        })?;
        let m = m
            .iter()
            .rev()
            .find(|m| m.property("perch-cmd-id") == Some(id))
            .expect("found");
        assert_eq!(m.correlation.as_deref(), Some(id.as_bytes()), "{m:?}");
        Ok(serde_json::from_slice(&m.payload)?)
    };
    fleet.request(&topic("cmd/status"), b"", &answers, b"c-1", "c-1")?;
    let r = answer("c-1")?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["revision"], 1, "{r}");
    fleet.request(
        &topic("cmd/remove"),
        br#"{"name":"timer"}"#,
        &answers,
        b"c-2",
        "c-2",
    )?;
    assert_eq!(answer("c-2")?["ok"], true);
    fleet.request(
        &topic("cmd/remove"),
        br#"{"name":"timer"}"#,
        &answers,
        b"c-2",
        "c-2",
    )?;
    fleet.wait_for(Duration::from_secs(20), "the second answer", |ms| {
        ms.iter()
            .filter(|m| m.property("perch-cmd-id") == Some("c-2"))
            .count()
            == 2
    })?;
    let twice: Vec<Value> = fleet
        .messages()
        .iter()
        .filter(|m| m.property("perch-cmd-id") == Some("c-2"))
        .map(|m| serde_json::from_slice(&m.payload))
        .collect::<Result<_, _>>()?;
    assert_eq!(twice[0], twice[1], "a repeated id runs once");

    // Offline: the broker queues the command in the device's session.
    agent.stop()?;
    fleet.request(&topic("cmd/components"), b"", &answers, b"c-3", "c-3")?;
    agent = Perchd::start(&agent_dir, launch)?;
    let r = answer("c-3")?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"], json!([]), "{r}");
    drop(agent);
    Ok(())
}

/// The payloads received on `topic`, as text.
fn texts_on(got: &[Received], topic: &str) -> Vec<String> {
    got.iter()
        .filter(|m| m.topic == topic)
        .map(Received::text)
        .collect()
}

#[test]
fn fleet_messages_reach_components_and_none_is_lost_while_the_agent_is_down() -> TestResult {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(&dir.path().join("mosquitto"), "")?;
    let fleet = Receiver::connect(broker.port, "fleet-bus", None, &[&topic("out/#")])?;
    let agent_dir = dir.path().join("agent");
    let launch = Launch {
        extra_config: sync_config(&broker, ""),
        ..Launch::default()
    };
    let mut agent = Perchd::start(&agent_dir, launch.clone())?;
    let relay = examples::bytes(examples::RELAY);
    let r = agent.deploy("relay", &relay, "message=work.>")?;
    assert!(r.status < 300, "{r:?}");

    // Until the agent's session is subscribed, a QoS 1 probe still waits in the broker
    // (the session persists), but the first connect may not have happened yet: repeat.
    agent.wait_for(Duration::from_secs(20), "a first round trip", |_| {
        fleet.publish(&topic("in/work/probe"), b"calls", false)?;
        std::thread::sleep(Duration::from_millis(100));
        Ok((!texts_on(&fleet.messages(), &topic("out/done/probe")).is_empty()).then_some(()))
    })?;

    // QoS 1 from the fleet, through the component, back up: every one arrives.
    const N: usize = 500;
    for i in 0..N {
        fleet.publish(&topic("in/work/job"), i.to_string().as_bytes(), false)?;
    }
    let got = fleet.wait_for(Duration::from_secs(30), "every answer", |got| {
        texts_on(got, &topic("out/done/job")).len() >= N
    })?;
    let answers: BTreeSet<String> = texts_on(&got, &topic("out/done/job")).into_iter().collect();
    assert_eq!(answers, (0..N).map(|i| i.to_string()).collect());

    // Sent while the agent is down: the broker keeps them for the device's session, and
    // the agent acknowledges each only once its bus took it, so all arrive after restart.
    agent.kill9();
    const LATE: usize = 200;
    for i in 0..LATE {
        fleet.publish(&topic("in/work/late"), i.to_string().as_bytes(), false)?;
    }
    let mut agent = Perchd::start(&agent_dir, launch)?;
    let got = fleet.wait_for(Duration::from_secs(30), "the late answers", |got| {
        texts_on(got, &topic("out/done/late")).len() >= LATE
    })?;
    let late: BTreeSet<String> = texts_on(&got, &topic("out/done/late"))
        .into_iter()
        .collect();
    assert_eq!(late, (0..LATE).map(|i| i.to_string()).collect());
    let s = status(&agent)?;
    assert!(
        s["sync"]["messages-in"].as_u64() >= Some(LATE as u64),
        "{s}"
    );
    assert_eq!(s["sync"]["messages-dropped"], 0, "{s}");
    agent.stop()?;
    Ok(())
}
