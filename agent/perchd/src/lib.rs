//! The Perch on-device agent as a library: the [`Agent`] (store + runtime + desired state,
//! driven by commands), config loading, logging setup and the server. The `perchd` binary is
//! a thin wrapper; the CLI's in-process agent and the tests use this crate directly.

pub mod agent;
pub mod boot;
pub mod memory;
pub mod server;

pub use agent::{Agent, StartError};
