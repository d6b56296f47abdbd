//! Perch's domain model.
//!
//! Owns the agent config, component specs and desired state, the command enum the local API
//! speaks, and the typed errors around them. It must not depend on tokio, wasmtime, sled or
//! axum: everything here is plain data and validation, usable by the agent, the CLI and tests.

pub mod board;
pub mod command;
pub mod config;
pub mod digest;
pub mod manifest;
pub mod spec;
pub mod units;
mod walk;

pub use command::{
    BootStatus, Command, CommandError, CommandHandler, ComponentState, ErrorKind, Reply,
    UpdateStarted,
};
pub use config::AgentConfig;
pub use digest::{Digest, DigestError};
pub use manifest::{Manifest, ManifestError};
pub use spec::{ComponentSpec, DesiredState, Grants, Limits, Trigger};
pub use units::{ByteSize, HumanDuration};

/// The agent's version, reported by the API.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest component artifact the agent takes, uploaded or fetched.
pub const MAX_COMPONENT_BYTES: usize = 64 << 20;
