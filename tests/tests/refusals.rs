//! Bad component files are refused with a clear error naming the problem, and the agent
//! keeps running what it already had.

use perch_tests::{Launch, Perchd, examples};

fn error_message(r: &perch_tests::Resp) -> String {
    let e = &r.body["error"];
    let mut msg = e["message"].as_str().unwrap_or_default().to_string();
    for d in e["details"].as_array().into_iter().flatten() {
        msg.push_str(" | ");
        msg.push_str(d.as_str().unwrap_or_default());
    }
    msg
}

#[test]
fn bad_components_are_refused_and_the_agent_keeps_running() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(dir.path(), Launch::default())?;
    let timer = examples::bytes(examples::TIMER);
    let ok = agent.deploy("timer", &timer, "every=100ms")?;
    assert_eq!(ok.status, 201, "{}", ok.body);
    let revision = ok.body["revision"].as_u64().expect("revision");

    // A digest that does not match the bytes.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let r = agent.deploy("x", &timer, &format!("every=1s&digest={wrong}"))?;
    assert_eq!(r.status, 422, "{}", r.body);
    let msg = error_message(&r);
    assert!(
        msg.contains("digest mismatch") && msg.contains(&wrong),
        "{msg}"
    );

    // A core module, not a component.
    let core = wat::parse_str("(module (func (export \"run\")))")?;
    let r = agent.deploy("x", &core, "every=1s")?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        error_message(&r).contains("is a core WebAssembly module, not a component"),
        "{}",
        r.body
    );

    // Random bytes.
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let r = agent.deploy("x", &random, "every=1s")?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        error_message(&r).contains("is not a WebAssembly binary"),
        "{}",
        r.body
    );

    // A truncated component.
    let r = agent.deploy("x", &timer[..timer.len() / 2], "every=1s")?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        error_message(&r).contains("malformed component at byte")
            && error_message(&r).contains("(truncated file?)"),
        "{}",
        r.body
    );

    // A component importing an interface this agent does not provide.
    let r = agent.deploy("x", &examples::bytes(examples::UNKNOWN_IMPORT), "every=1s")?;
    assert_eq!(r.status, 422, "{}", r.body);
    let msg = error_message(&r);
    assert!(
        msg.contains("perch:fixture/teleport") && msg.contains("does not provide"),
        "{msg}"
    );

    // A trigger whose export is missing.
    let r = agent.deploy("x", &examples::bytes(examples::BENCH_HELLO), "every=1s")?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        error_message(&r).contains("does not export `perch:device/timer.on-tick`"),
        "{}",
        r.body
    );

    // Bad triggers are 400s listing each problem.
    let r = agent.deploy("Bad_Name", &timer, "every=5&http=nope")?;
    assert_eq!(r.status, 400, "{}", r.body);

    // Nothing changed: same revision, timer still running and ticking, agent healthy.
    let desired = agent.get("/v1/desired")?;
    assert_eq!(desired["revision"].as_u64(), Some(revision));
    assert_eq!(desired["components"].as_array().map(Vec::len), Some(1));
    let before = agent.component("timer")?["invocations"]
        .as_u64()
        .unwrap_or(0);
    agent.wait_for(
        std::time::Duration::from_secs(10),
        "timer to keep ticking",
        |a| {
            let c = a.component("timer")?;
            Ok(
                (c["invocations"].as_u64().unwrap_or(0) > before && c["state"] == "running")
                    .then_some(()),
            )
        },
    )?;
    assert_eq!(agent.get("/v1/health")?["status"], "ok");
    Ok(())
}
