//! Config errors stop perchd with exit code 64 before it binds a port, listing every
//! problem; the agent starts under tight address-space limits like a Raspberry Pi's.

use std::net::TcpListener;
use std::process::Command;

use perch_tests::{Launch, Perchd, examples, free_port, perchd_bin, run_capture};

#[test]
fn bad_config_exits_64_listing_every_problem_before_binding() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata-dri = \"/tmp/x\"\n[limits]\nmemory = \"lots\"\ntimeout = \"5\"\n"
        ),
    )?;
    let (status, out) = run_capture(Command::new(perchd_bin()).arg("--config").arg(&cfg))?;
    assert_eq!(status.code(), Some(64), "{out}");
    assert!(out.contains("3 problems"), "{out}");
    assert!(
        out.contains("data-dri: unknown key; did you mean `data-dir`?"),
        "{out}"
    );
    assert!(out.contains("limits.memory: `lots` is not a size"), "{out}");
    assert!(
        out.contains("limits.timeout: `5` is not a duration"),
        "{out}"
    );
    // The port was never bound, and no data directory was created.
    TcpListener::bind(("127.0.0.1", port))?;
    assert!(!std::path::Path::new("/tmp/x").join("db").exists());
    let (status, out) = run_capture(
        Command::new(perchd_bin())
            .arg("--config")
            .arg(dir.path().join("missing.toml")),
    )?;
    assert_eq!(status.code(), Some(64), "{out}");
    assert!(out.contains("cannot read config file"), "{out}");
    Ok(())
}

fn runs_a_component(agent: &Perchd) -> anyhow::Result<()> {
    let r = agent.deploy("timer", &examples::bytes(examples::TIMER), "every=50ms")?;
    assert_eq!(r.status, 201, "{}", r.body);
    agent.wait_for(std::time::Duration::from_secs(10), "ticks", |a| {
        Ok((a.component("timer")?["invocations"].as_u64().unwrap_or(0) >= 2).then_some(()))
    })
}

#[test]
fn starts_with_default_pool_under_64_gib_of_address_space() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            ulimit_v_kib: Some(64 << 20),
            ..Launch::default()
        },
    )?;
    assert_eq!(agent.get("/v1/status")?["allocator"], "pooling");
    runs_a_component(&agent)
}

#[test]
fn starts_with_a_small_pool_under_1_gib_of_address_space() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            ulimit_v_kib: Some(1 << 20),
            extra_config: "store-cache = \"1MiB\"\n[limits]\nmemory = \"16MiB\"\n[runtime]\nallocator = \"pooling\"\npool-instances = 8\n".into(),
            ..Launch::default()
        },
    )?;
    assert_eq!(agent.get("/v1/status")?["allocator"], "pooling");
    runs_a_component(&agent)
}

#[test]
fn falls_back_to_on_demand_when_the_pool_does_not_fit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Perchd::start(
        dir.path(),
        Launch {
            ulimit_v_kib: Some(1 << 20),
            extra_config: "[runtime]\npool-instances = 1000\n".into(),
            ..Launch::default()
        },
    )?;
    assert_eq!(agent.get("/v1/status")?["allocator"], "on-demand");
    assert!(
        agent.log().contains("falling back to on-demand"),
        "{}",
        agent.log()
    );
    runs_a_component(&agent)
}
