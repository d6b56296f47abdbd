//! `perchd`: the Perch agent binary. Loads and validates its config before touching
//! anything else (exit code 64 on a bad config), restores and starts the last deployed
//! components from its local store, then serves the local API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use perchd::Agent;
use perchd::server;

/// Exit code for a bad command line or config (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when a needed resource (store, port) is unavailable (sysexits EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// The Perch edge agent: runs WebAssembly components from a local cache.
#[derive(Debug, Parser)]
#[command(name = "perchd", version, about)]
struct Args {
    /// Config file (TOML). Defaults to /etc/perch/perchd.toml when it exists.
    #[arg(short, long, env = "PERCHD_CONFIG")]
    config: Option<PathBuf>,
    /// Override `data-dir` from the config.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override `listen` from the config (IP:PORT; port 0 picks a free one).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `board` from the config: a board name (looked up in `boards-dir`) or the
    /// path of a board file.
    #[arg(long)]
    board: Option<String>,
    /// Validate the config, print it as JSON and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let path = args.config.clone().or_else(|| {
        let p = PathBuf::from(server::DEFAULT_CONFIG_PATH);
        p.exists().then_some(p)
    });
    let mut config = match &path {
        Some(p) => match server::load_config(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("perchd: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => perch_core::AgentConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(b) = args.board {
        config.board = b;
    }
    if args.check_config {
        match serde_json::to_string_pretty(&config) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("perchd: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    server::init_logging();
    perchd::memory::limit_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .thread_stack_size(512 << 10)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("perchd: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: perch_core::AgentConfig) -> ExitCode {
    let listen = config.listen;
    tracing::info!(version = perch_core::VERSION, data_dir = %config.data_dir.display(), board = %config.board, "perchd starting");
    // Bind first: a port conflict is reported before any component runs.
    let (listener, addr) = match server::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("perchd: cannot listen on {listen}: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    // Register for SIGTERM before restoring components, so a stop requested during startup
    // still ends with a clean shutdown (components stopped, store synced) instead of a kill.
    let shutdown = shutdown_signal();
    let agent = match Agent::start(config).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("perchd: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    if let Some(slots) = agent.slots().filter(|s| s.trial) {
        tokio::spawn(perchd::boot::gate(agent.clone(), slots.clone()));
    }
    perchd::memory::trim();
    perchd::memory::settle_later();
    tracing::info!(%addr, "listening");
    let result = server::serve(agent.clone(), listener, shutdown).await;
    tracing::info!("shutting down");
    agent.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perchd: server failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C. The SIGTERM handler is installed when this is called,
/// not when the future is first polled.
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    async move {
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
