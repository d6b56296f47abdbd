//! Config loading, logging setup and serving the local API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use perch_core::AgentConfig;
use perch_core::config::ConfigError;

use crate::agent::Agent;

/// Config file read when none is given and it exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/perch/perchd.toml";

/// Why the config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Reads and validates a config file.
pub fn load_config(path: &Path) -> Result<AgentConfig, LoadConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(AgentConfig::from_toml(&text, &path.display().to_string())?)
}

/// Sets up `tracing` from `PERCH_LOG` (an env-filter, default `info`) and
/// `PERCH_LOG_FORMAT` (`plain` or `json`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // The NATS client logs every reconnect attempt at info; the sync layer reports the
    // link's state itself.
    let text = std::env::var("PERCH_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(format!("async_nats=warn,{text}"))
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    let json = std::env::var("PERCH_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Binds the listener (failing before anything is served) and returns it with its address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves the API and component routes until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = perch_api::ApiState::new(agent.clone(), Some(agent.clone()));
    let app = perch_api::router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
