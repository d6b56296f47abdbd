//! Signed artifacts and grants, end to end against a real perchd: the agent accepts only
//! components signed by a trusted, unrevoked key, runs them with exactly the grants their
//! manifest names, and denies (never traps on) calls outside them.

use std::time::Duration;

use perch_artifact::SecretKey;
use perch_tests::{Launch, Perchd, artifact, examples, repo_root};
use serde_json::Value;

type TestResult = anyhow::Result<()>;

fn signing(trusted: &[&SecretKey], revoked: &[&SecretKey]) -> String {
    let list = |keys: &[&SecretKey]| {
        keys.iter()
            .map(|k| format!("\"{}\"", k.public()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[signing]\ntrusted-keys = [{}]\nrevoked-keys = [{}]\n",
        list(trusted),
        list(revoked)
    )
}

fn error_message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn thermostat(key: Option<&SecretKey>) -> anyhow::Result<Vec<u8>> {
    artifact(
        examples::THERMOSTAT,
        &repo_root().join("examples/thermostat/Cargo.toml"),
        key,
        |_| {},
    )
}

#[test]
fn only_trusted_unrevoked_untampered_signatures_are_accepted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let key = SecretKey::generate().map_err(anyhow::Error::msg)?;
    let stranger = SecretKey::generate().map_err(anyhow::Error::msg)?;
    let mut agent = Perchd::start(
        dir.path(),
        Launch {
            extra_config: signing(&[&key], &[]),
            ..Launch::default()
        },
    )?;

    // Unsigned: refused, and the message says how to sign.
    let r = agent.deploy_artifact(&thermostat(None)?)?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(
        error_message(&r.body),
        "component `thermostat` refused: the component is not signed: sign it with `perch build` (or set `allow-unsigned = true` under [signing] in the agent's config, for development only)"
    );

    // One flipped byte in the code: refused as modified after signing.
    let good = thermostat(Some(&key))?;
    let mut tampered = good.clone();
    let at = tampered.len() / 3;
    tampered[at] ^= 0x01;
    let r = agent.deploy_artifact(&tampered)?;
    assert_eq!(r.status, 422, "{}", r.body);
    let msg = error_message(&r.body);
    assert!(
        msg.contains("was modified after it was signed") || msg.contains("malformed"),
        "{msg}"
    );

    // Signed by a key the agent does not trust.
    let r = agent.deploy_artifact(&thermostat(Some(&stranger))?)?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(
        error_message(&r.body),
        format!(
            "component `thermostat` refused: the component is signed by key {}, which this agent does not trust: add it to `trusted-keys` under [signing] in the agent's config",
            stranger.public()
        )
    );

    // Nothing was stored or started by the refusals.
    let status = agent.get("/v1/status")?;
    assert_eq!(status["revision"].as_u64(), Some(0), "{status}");

    // The genuine artifact runs under its manifest's name, with its signer recorded.
    let r = agent.deploy_artifact(&good)?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["component"]["name"], "thermostat");
    assert_eq!(
        r.body["component"]["signer"].as_str(),
        Some(key.public().to_string().as_str())
    );

    // Revoke the key: after a restart, a redeploy of the same artifact is refused, while
    // the component already accepted keeps running from the store.
    agent.stop()?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            extra_config: signing(&[&key], &[&key]),
            ..Launch::default()
        },
    )?;
    let r = agent.deploy_artifact(&good)?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(
        error_message(&r.body),
        format!(
            "component `thermostat` refused: the component is signed by key {}, which this agent's config revokes",
            key.public()
        )
    );
    Ok(())
}

#[test]
fn grants_are_enforced_by_name() -> TestResult {
    let dir = tempfile::tempdir()?;
    let key = SecretKey::generate().map_err(anyhow::Error::msg)?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            extra_config: format!("{}allow-unsigned = true\n", signing(&[&key], &[])),
            ..Launch::default()
        },
    )?;

    // The thermostat with its manifest: reads the sensor, drives the fan, publishes
    // telemetry, answers HTTP. Nothing is denied.
    let r = agent.deploy_artifact(&thermostat(Some(&key))?)?;
    assert_eq!(r.status, 201, "{}", r.body);
    let records = agent.wait_for(Duration::from_secs(20), "thermostat telemetry", |a| {
        let t = a.get("/v1/telemetry?limit=10")?;
        let mine: Vec<Value> = t
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["component"] == "thermostat")
            .cloned()
            .collect();
        Ok((mine.len() >= 2).then_some(mine))
    })?;
    assert_eq!(records[0]["stream"], "climate");
    let payload: Value = serde_json::from_str(records[0]["payload"].as_str().unwrap_or(""))?;
    assert!(payload["t"].as_f64().is_some(), "{payload}");
    let state = agent.request("GET", "/thermostat", None)?;
    assert_eq!(state.status, 200, "{}", state.body);
    assert!(state.body["fan"].is_boolean(), "{}", state.body);
    let c = agent.component("thermostat")?;
    assert_eq!(c["denied"].as_u64(), Some(0), "{c}");
    assert_eq!(c["grants"]["gpio"]["write"][0], "fan");

    // The same code with a manifest that grants no GPIO: every fan write is denied with a
    // WIT error the component returns, and counted; the agent and the sensor read go on.
    let narrowed = artifact(
        examples::THERMOSTAT,
        &repo_root().join("examples/thermostat/Cargo.toml"),
        Some(&key),
        |m| {
            m.name = "no-fan".into();
            m.grants.gpio = Default::default();
            m.triggers
                .retain(|t| !matches!(t, perch_core::Trigger::Http(_)));
            m.config.insert("threshold-c".into(), "-100".into());
        },
    )?;
    let r = agent.deploy_artifact(&narrowed)?;
    assert_eq!(r.status, 201, "{}", r.body);
    let c = agent.wait_for(Duration::from_secs(20), "a denied fan write", |a| {
        let c = a.component("no-fan")?;
        Ok((c["denied"].as_u64() >= Some(1) && !c["last-error"].is_null()).then_some(c))
    })?;
    assert_eq!(
        c["last-error"]["message"].as_str(),
        Some("returned an error: denied: gpio.write: line `fan` is not granted to `no-fan`"),
        "{c}"
    );

    // A hand-built component (plain cargo, no manifest) that writes the fan: it runs, and
    // every write is denied at run time.
    let r = agent.deploy(
        "ungranted",
        &examples::bytes(examples::UNGRANTED),
        "every=50ms",
    )?;
    assert_eq!(r.status, 201, "{}", r.body);
    let c = agent.wait_for(Duration::from_secs(20), "denied calls", |a| {
        let c = a.component("ungranted")?;
        Ok((c["denied"].as_u64() >= Some(2)).then_some(c))
    })?;
    assert_eq!(c["state"], "running", "{c}");
    let logs = agent.get("/v1/components/ungranted/logs?limit=20")?;
    assert!(
        logs.to_string()
            .contains("denied gpio.write: line `fan` is not granted to `ungranted`"),
        "{logs}"
    );
    let metrics = agent.request("GET", "/metrics", None)?;
    assert!(
        metrics
            .body
            .as_str()
            .unwrap_or_default()
            .contains("perch_component_denied_total{component=\"ungranted\"}"),
        "{}",
        metrics.body
    );

    // Grants naming hardware the board lacks are refused at deploy time, naming what it has.
    let unknown = artifact(
        examples::THERMOSTAT,
        &repo_root().join("examples/thermostat/Cargo.toml"),
        Some(&key),
        |m| {
            m.name = "lost".into();
            m.triggers
                .retain(|t| !matches!(t, perch_core::Trigger::Http(_)));
            m.grants.sensors.insert("basement-temp".into());
        },
    )?;
    let r = agent.deploy_artifact(&unknown)?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.to_string().contains(
            "component `lost` is granted sensor `basement-temp`, which board `sim` does not have (its sensors: humidity, room-temp)"
        ),
        "{}",
        r.body
    );

    // A desired state may narrow a component's grants but never widen them.
    let desired = agent.get("/v1/desired")?;
    let digest = desired["components"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "no-fan")
        .map(|c| c["digest"].clone())
        .ok_or_else(|| anyhow::anyhow!("no-fan in {desired}"))?;
    let widen = serde_json::json!({
        "components": [{
            "name": "no-fan",
            "digest": digest,
            "grants": { "gpio": { "write": ["fan"] } }
        }]
    });
    let r = agent.request("PUT", "/v1/desired", Some(widen.to_string().into_bytes()))?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body.to_string().contains(
            "component `no-fan`: grants may only narrow what its manifest grants; not in the manifest: gpio.write `fan`"
        ),
        "{}",
        r.body
    );
    Ok(())
}

/// Each hardware interface, granted narrowly: read but not write, no sensor, no telemetry
/// stream. Each call outside the grant is denied at run time with the interface and the
/// resource named; the calls that are granted go on working.
#[test]
fn each_interface_denies_what_is_not_granted_and_allows_what_is() -> TestResult {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            extra_config: "[signing]\nallow-unsigned = true\n".into(),
            ..Launch::default()
        },
    )?;
    let cargo_toml = repo_root().join("examples/thermostat/Cargo.toml");
    type Edit = fn(&mut perch_core::Manifest);
    let cases: [(&str, Edit, &str); 3] = [
        (
            // May read the fan line but not drive it.
            "read-only-fan",
            |m| {
                m.grants.gpio.write = Default::default();
                m.grants.gpio.read = ["fan".to_string()].into();
                m.config.insert("threshold-c".into(), "-100".into());
            },
            "denied: gpio.write: line `fan` is not granted to `read-only-fan`",
        ),
        (
            "no-sensor",
            |m| m.grants.sensors = Default::default(),
            "denied: sensors.read: sensor `room-temp` is not granted to `no-sensor`",
        ),
        (
            // Granted another stream only; a threshold it never reaches keeps the fan off.
            "no-stream",
            |m| {
                m.grants.telemetry = ["other".to_string()].into();
                m.config.insert("threshold-c".into(), "1000".into());
            },
            "denied: telemetry.publish: stream `climate` is not granted to `no-stream`",
        ),
    ];
    for (name, edit, _) in &cases {
        let bytes = artifact(examples::THERMOSTAT, &cargo_toml, None, |m| {
            m.name = (*name).into();
            m.triggers = vec![perch_core::Trigger::Every(
                "100ms".parse().expect("duration"),
            )];
            edit(m);
        })?;
        let r = agent.deploy_artifact(&bytes)?;
        assert_eq!(r.status, 201, "{name}: {}", r.body);
    }
    for (name, _, expected) in &cases {
        let c = agent.wait_for(Duration::from_secs(20), "a denied call", |a| {
            let c = a.component(name)?;
            Ok((c["denied"].as_u64() >= Some(1) && !c["last-error"].is_null()).then_some(c))
        })?;
        assert_eq!(
            c["last-error"]["message"].as_str(),
            Some(format!("returned an error: {expected}").as_str()),
            "{c}"
        );
        assert_eq!(c["state"], "running", "{c}");
    }
    // The granted calls before each denied one (the sensor read for `read-only-fan` and
    // `no-stream`, the config reads for all) succeeded, or the denial would not be reached.
    // Every denial is in the component's log and counted.
    let denied_line = agent.get("/v1/components/read-only-fan/logs?limit=50")?;
    assert!(
        denied_line
            .to_string()
            .contains("denied gpio.write: line `fan` is not granted to `read-only-fan`"),
        "{denied_line}"
    );
    let metrics = agent.request("GET", "/metrics", None)?.body;
    let metrics = metrics.as_str().unwrap_or_default();
    for (name, _, _) in &cases {
        assert!(
            metrics.contains(&format!(
                "perch_component_denied_total{{component=\"{name}\"}}"
            )),
            "{metrics}"
        );
    }
    Ok(())
}

/// A one-line HTTP server on a free local port answering `pong`; counts requests.
fn pong_server() -> anyhow::Result<(u16, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong",
            );
        }
    });
    Ok((port, hits))
}

#[test]
fn outgoing_http_reaches_only_granted_hosts() -> TestResult {
    let (port, hits) = pong_server()?;
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(dir.path(), Launch::default())?;
    let cargo_toml = repo_root().join("fixtures/fetcher/Cargo.toml");
    let url = format!("http://127.0.0.1:{port}/ping");

    // Granted `127.0.0.1`: the request goes out and the answer comes back.
    let allowed = artifact(examples::FETCHER, &cargo_toml, None, |m| {
        m.config.insert("url".into(), url.clone());
    })?;
    let r = agent.deploy_artifact(&allowed)?;
    assert_eq!(r.status, 201, "{}", r.body);
    agent.wait_for(Duration::from_secs(20), "200 pong in the log", |a| {
        let logs = a.get("/v1/components/fetcher/logs?limit=5")?;
        Ok(logs.to_string().contains("200 pong").then_some(()))
    })?;
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    agent.request("DELETE", "/v1/components/fetcher", None)?;

    // Granted only another host: denied in the host, audited, and nothing is sent.
    let before = hits.load(std::sync::atomic::Ordering::SeqCst);
    let denied = artifact(examples::FETCHER, &cargo_toml, None, |m| {
        m.name = "fetcher-elsewhere".into();
        m.config.insert("url".into(), url.clone());
        m.grants.http = ["hub.example.com".to_string()].into();
    })?;
    let r = agent.deploy_artifact(&denied)?;
    assert_eq!(r.status, 201, "{}", r.body);
    let c = agent.wait_for(Duration::from_secs(20), "a denied request", |a| {
        let c = a.component("fetcher-elsewhere")?;
        Ok((c["denied"].as_u64() >= Some(1) && !c["last-error"].is_null()).then_some(c))
    })?;
    assert_eq!(
        c["last-error"]["message"].as_str(),
        Some(format!("returned an error: denied: outgoing HTTP to `127.0.0.1:{port}`").as_str()),
        "{c}"
    );
    let logs = agent.get("/v1/components/fetcher-elsewhere/logs?limit=10")?;
    assert!(
        logs.to_string().contains(&format!(
            "denied http.outgoing: host `127.0.0.1:{port}` is not granted to `fetcher-elsewhere`"
        )),
        "{logs}"
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), before);
    Ok(())
}
