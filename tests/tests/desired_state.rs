//! The desired-state document path: upload blobs, apply a whole state, refuse stale revisions
//! and unknown digests, remove components.

use std::time::Duration;

use perch_tests::{Launch, Perchd, examples};
use serde_json::json;

#[test]
fn apply_replace_and_remove_through_desired_state_documents() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(dir.path(), Launch::default())?;
    let timer = agent.upload_blob(&examples::bytes(examples::TIMER))?;
    let noop = agent.upload_blob(&examples::bytes(examples::NOOP))?;

    // A deploy in between must not collect the blobs uploaded for the coming document.
    let r = agent.deploy(
        "other",
        &examples::bytes(examples::HTTP_HELLO),
        "http=/other",
    )?;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = agent.deploy("bad", b"not wasm", "every=1s")?;
    assert_eq!(r.status, 422, "{}", r.body);

    // A blob upload with the wrong expected digest is refused.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let r = agent.request(
        "PUT",
        &format!("/v1/blobs?digest={wrong}"),
        Some(b"\0asm".to_vec()),
    )?;
    assert_eq!(r.status, 422, "{}", r.body);

    let doc = json!({
        "revision": 10,
        "components": [
            {"name": "timer", "digest": timer, "triggers": [{"every": "50ms"}, {"startup": true}]},
            {"name": "idle", "digest": noop, "triggers": [{"every": "1h"}], "limits": {"memory": "4MiB", "instances": 1}},
        ]
    });
    let r = agent.request("PUT", "/v1/desired", Some(serde_json::to_vec(&doc)?))?;
    assert_eq!(
        (r.status, r.body["revision"].as_u64()),
        (200, Some(10)),
        "{}",
        r.body
    );
    let idle = agent.component("idle")?;
    assert_eq!(
        idle["limits"],
        json!({"memory": "4MiB", "timeout": "5s", "instances": 1, "calls-per-instance": 1})
    );
    agent.wait_for(Duration::from_secs(10), "timer ticks", |a| {
        Ok((a.component("timer")?["invocations"].as_u64().unwrap_or(0) >= 3).then_some(()))
    })?;

    // A stale revision conflicts; an unknown digest is refused, naming the component.
    let r = agent.request("PUT", "/v1/desired", Some(serde_json::to_vec(&doc)?))?;
    assert_eq!(r.status, 409, "{}", r.body);
    let missing = format!("sha256:{}", "1".repeat(64));
    let bad = json!({"components": [{"name": "ghost", "digest": missing, "triggers": [{"every": "1s"}]}]});
    let r = agent.request("PUT", "/v1/desired", Some(serde_json::to_vec(&bad)?))?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body.to_string().contains("component `ghost`: blob"),
        "{}",
        r.body
    );
    // A limit above the agent's maximum is a 400 naming the component.
    let big = json!({"components": [{"name": "big", "digest": noop, "triggers": [{"every": "1s"}], "limits": {"memory": "1GiB"}}]});
    let r = agent.request("PUT", "/v1/desired", Some(serde_json::to_vec(&big)?))?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.to_string().contains("`big` asks for 1GiB"),
        "{}",
        r.body
    );
    assert_eq!(
        agent.get("/v1/desired")?["revision"],
        10,
        "refusals changed nothing"
    );

    // Without a revision the next one is used; components left out are stopped.
    let next = json!({"components": [{"name": "timer", "digest": timer, "triggers": [{"every": "50ms"}]}]});
    let r = agent.request("POST", "/v1/desired", Some(serde_json::to_vec(&next)?))?;
    assert_eq!(
        (r.status, r.body["revision"].as_u64()),
        (200, Some(11)),
        "{}",
        r.body
    );
    assert_eq!(
        agent.request("GET", "/v1/components/idle", None)?.status,
        404
    );
    let list = agent.get("/v1/components")?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // DELETE removes it and bumps the revision; it is gone from status and desired state.
    let r = agent.request("DELETE", "/v1/components/timer", None)?;
    assert_eq!(
        (r.status, r.body["revision"].as_u64()),
        (200, Some(12)),
        "{}",
        r.body
    );
    assert_eq!(
        agent
            .request("DELETE", "/v1/components/timer", None)?
            .status,
        404
    );
    assert_eq!(agent.get("/v1/desired")?["components"], json!([]));
    assert_eq!(
        agent
            .request("GET", "/v1/components/timer/logs", None)?
            .status,
        404
    );
    Ok(())
}
