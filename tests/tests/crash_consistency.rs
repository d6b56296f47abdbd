//! `kill -9` of perchd in the middle of deploys leaves either the old or the new desired
//! state, never a mix: every acknowledged deploy survives, and the agent starts and runs
//! exactly what its journal says.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use perch_tests::{Launch, Perchd, examples};

#[test]
fn kill_9_during_deploys_never_loses_or_mixes_desired_state() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wasm = [
        examples::bytes(examples::TIMER),
        examples::bytes(examples::NOOP),
    ];
    let acked = Arc::new(AtomicU64::new(0));
    for round in 0..6u64 {
        let agent = Perchd::start(dir.path(), Launch::default())?;
        let desired = agent.get("/v1/desired")?;
        let revision = desired["revision"].as_u64().unwrap_or(0);
        let last_acked = acked.load(Ordering::SeqCst);
        assert!(
            revision >= last_acked,
            "round {round}: acknowledged revision {last_acked} was lost (now {revision})"
        );
        assert!(
            revision <= last_acked + 1,
            "round {round}: revision {revision} is beyond anything sent"
        );
        // Every journaled component is running with the journaled digest: old or new, not a mix.
        let status = agent.get("/v1/status")?;
        let running = status["components"].as_array().cloned().unwrap_or_default();
        let wanted = desired["components"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            running.len(),
            wanted.len(),
            "round {round}: {status} vs {desired}"
        );
        for w in &wanted {
            let r = running
                .iter()
                .find(|r| r["name"] == w["name"])
                .expect("journaled component runs");
            assert_eq!(r["digest"], w["digest"], "round {round}");
            assert_eq!(r["state"], "running", "round {round}: {r}");
        }

        // Deploy in a loop from another thread, and kill -9 the agent part-way.
        let pid = agent.pid();
        let agent = Arc::new(std::sync::Mutex::new(agent));
        let deployer = {
            let (agent, acked, wasm) = (agent.clone(), acked.clone(), wasm.clone());
            std::thread::spawn(move || {
                for i in 0..1000u64 {
                    let a = agent.lock().expect("lock");
                    let which = ((i + round) % 2) as usize;
                    let name = format!("c{}", i % 3);
                    let Ok(r) = a.deploy(&name, &wasm[which], &format!("every={}ms", 100 + i))
                    else {
                        return;
                    };
                    drop(a);
                    if r.status != 201 {
                        return;
                    }
                    if let Some(rev) = r.body["revision"].as_u64() {
                        acked.fetch_max(rev, Ordering::SeqCst);
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(150 + 97 * round));
        // Kill by pid: the deployer may be mid-request.
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()?;
        deployer.join().expect("deployer");
        agent.lock().expect("lock").kill9();
    }
    assert!(
        acked.load(Ordering::SeqCst) > 3,
        "deploys were acknowledged between kills"
    );
    Ok(())
}
