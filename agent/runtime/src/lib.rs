//! Perch's WebAssembly runtime.
//!
//! Owns the one wasmtime `Engine` (pooling allocator sized for small devices, epoch-based
//! timeouts), the linker with the [`provider`]s (WASI 0.2, `wasi:http`, `wasi:logging`,
//! `wasi:keyvalue`, `wasi:config` and the `perch:device` host interfaces),
//! component loading through the precompiled cache, trigger dispatch (timers, messages,
//! startup, HTTP routes) and per-component supervision (limits, crash-loop backoff, logs).
//! It must not depend on the sync layer or the API: those talk to the agent through commands.

pub mod board;
pub mod bus;
pub mod component;
pub mod engine;
pub mod host;
pub mod provider;
pub mod runtime;
pub mod supervisor;

pub use component::{LoadError, LoadSource, Loaded};
pub use engine::AllocatorKind;
pub use runtime::{Call, HttpError, Running, Runtime, RuntimeError};
pub use supervisor::Outcome;
