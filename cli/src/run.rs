//! `perch run`: the inner loop. Builds the crate (or takes a `.wasm`), runs it in an agent
//! inside this process on the simulated board, streams its log, and with `--watch` rebuilds
//! and swaps it in whenever a source file changes. Ctrl-C stops everything cleanly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};

use perch_artifact::SecretKey;
use perch_core::command::LogLine;
use perch_core::{AgentConfig, Command, CommandHandler, Limits, Reply};
use perchd::Agent;

use crate::Failure;
use crate::builder;
use crate::shell::Shell;

/// What `perch run` was asked to do.
#[derive(Debug)]
pub struct RunOptions {
    pub path: PathBuf,
    pub watch: bool,
    pub listen: SocketAddr,
    pub board: String,
    pub state_dir: Option<PathBuf>,
}

/// Runs until Ctrl-C.
pub fn run(shell: &Shell, opts: RunOptions) -> Result<()> {
    let is_wasm = opts.path.extension().is_some_and(|e| e == "wasm");
    if opts.watch && is_wasm {
        return Err(Failure::msg(
            "`--watch` rebuilds a crate: give a crate directory, not a .wasm file",
        ));
    }
    let tmp;
    let state = match &opts.state_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("perch-run-")
                .tempdir()
                .context("creating a state dir")?;
            tmp.path().to_path_buf()
        }
    };
    let mut config = AgentConfig {
        data_dir: state.join("data"),
        listen: opts.listen,
        board: opts.board.clone(),
        ..AgentConfig::default()
    };
    // The agent trusts the developer's own key; a hand-built `.wasm` may be unsigned.
    let key = if is_wasm {
        crate::keys::load()?
    } else {
        Some(crate::keys::load_or_create(shell)?)
    };
    config.signing.trusted_keys = key.iter().map(|k| k.public().to_string()).collect();
    config.signing.allow_unsigned = is_wasm;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let agent = Agent::start(config.clone())
            .await
            .map_err(|e| Failure::msg(format!("cannot start the agent: {e}")))?;
        let (listener, addr) = perchd::server::bind(config.listen).await.map_err(|e| {
            Failure::msg(format!(
                "cannot listen on {}: {e} (pick another address with --listen)",
                config.listen
            ))
        })?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = {
            let agent = agent.clone();
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                let _ = perchd::server::serve(agent, listener, async move {
                    let _ = rx.changed().await;
                })
                .await;
            })
        };
        shell.status(
            "Running",
            format!(
                "agent on http://{addr} (board `{}`, state in {})",
                config.board,
                state.display()
            ),
        );

        let result = drive(shell, &agent, &opts, is_wasm, key.as_ref()).await;
        let _ = stop_tx.send(true);
        let _ = server.await;
        agent.shutdown();
        result
    })
}

async fn drive(
    shell: &Shell,
    agent: &Arc<Agent>,
    opts: &RunOptions,
    is_wasm: bool,
    key: Option<&SecretKey>,
) -> Result<()> {
    let mut name = deploy_once(shell, agent, &opts.path, is_wasm, key).await;
    let mut stamp = if opts.watch {
        Some(sources_stamp(&opts.path))
    } else {
        None
    };
    if opts.watch {
        shell.status("Watching", format!("{} for changes", opts.path.display()));
    }
    let mut seen_up_to: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                shell.status("Stopping", "Ctrl-C");
                return Ok(());
            }
            _ = tick.tick() => {}
        }
        if let Some(n) = &name {
            seen_up_to = print_new_logs(agent, n, seen_up_to).await;
        }
        if let Some(old) = stamp {
            let now = sources_stamp(&opts.path);
            if now != old {
                stamp = Some(now);
                shell.status("Rebuilding", "a source file changed");
                if let Some(n) = deploy_once(shell, agent, &opts.path, is_wasm, key).await {
                    name = Some(n);
                }
            }
        }
    }
}

/// Builds (unless `path` is a `.wasm`) and deploys; errors are shown, not fatal, so a typo
/// under `--watch` does not end the session.
async fn deploy_once(
    shell: &Shell,
    agent: &Arc<Agent>,
    path: &Path,
    is_wasm: bool,
    key: Option<&SecretKey>,
) -> Option<String> {
    let bytes = if is_wasm {
        match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                shell.error(format!("reading {}: {e}", path.display()), &[]);
                return None;
            }
        }
    } else {
        let shell2 = *shell;
        let path2 = path.to_path_buf();
        let key = key.cloned();
        let built = tokio::task::spawn_blocking(move || {
            builder::build(&shell2, &path2, key.as_ref(), None)
        })
        .await;
        match built {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                crate::report(shell, &e);
                return None;
            }
            Err(e) => {
                shell.error(format!("the build task failed: {e}"), &[]);
                return None;
            }
        }
    };
    let name = if is_wasm {
        match perch_artifact::manifest(&bytes) {
            Ok(Some(m)) => Some(m.name),
            _ => path
                .file_stem()
                .map(|s| s.to_string_lossy().replace('_', "-")),
        }
    } else {
        None
    };
    let reply = agent
        .handle(Command::DeployComponent {
            name,
            bytes,
            expected_digest: None,
            triggers: Vec::new(),
            limits: Limits::default(),
        })
        .await;
    match reply {
        Ok(Reply::Deployed(d)) => {
            let c = &d.component;
            shell.status(
                "Deployed",
                format!(
                    "{} ({}, {}), triggers: {}",
                    c.name,
                    c.state.as_str(),
                    c.digest.short(),
                    crate::remote::triggers(&serde_json::to_value(&c.triggers).unwrap_or_default())
                ),
            );
            Some(c.name.clone())
        }
        Ok(_) => None,
        Err(e) => {
            shell.error(&e.message, &e.details);
            None
        }
    }
}

/// Prints log lines newer than `after` (ms); returns the newest timestamp seen.
async fn print_new_logs(agent: &Arc<Agent>, name: &str, after: u64) -> u64 {
    let Ok(Reply::Logs(lines)) = agent
        .handle(Command::Logs {
            name: name.to_string(),
            limit: 200,
        })
        .await
    else {
        return after;
    };
    let mut newest = after;
    for l in lines.iter().filter(|l: &&LogLine| l.at_ms > after) {
        crate::remote::print_log_line(&serde_json::to_value(l).unwrap_or_default());
        newest = newest.max(l.at_ms);
    }
    newest
}

/// The newest modification time under `src/` and of `Cargo.toml`.
fn sources_stamp(root: &Path) -> Option<SystemTime> {
    let mut newest: Option<SystemTime> = None;
    let mut stack = vec![root.join("src"), root.join("Cargo.toml")];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if let Ok(m) = meta.modified() {
            newest = Some(newest.map_or(m, |n| n.max(m)));
        }
    }
    newest
}
