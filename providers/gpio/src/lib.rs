//! `perch-provider-gpio`: named GPIO lines on Linux GPIO character devices (uAPI v2).
//!
//! This crate owns the line configuration types ([`LineConfig`]), the backend trait the
//! runtime holds as `Arc<dyn GpioBackend>` ([`GpioBackend`]) and its real Linux
//! implementation ([`CdevBackend`], on `/dev/gpiochipN` through the `gpiocdev` crate). The
//! simulated board lives in the runtime; this crate only provides the seam and the real
//! thing.
//!
//! What the backend guarantees:
//! - each line is requested once, with the agent as consumer ([`CONSUMER`]), and the request
//!   is kept and shared between threads;
//! - a chip that is missing or a request that fails is a typed [`GpioError`] naming the line,
//!   the chip and its path, and the next call tries again, so a chip that appears later
//!   (module loaded, overlay applied) works without restarting the agent;
//! - edges of input lines are reported as `(line, new logical level)` from background threads
//!   that end when the backend is dropped.
//!
//! It must not depend on other Perch crates, nor on an async runtime: the agent bridges the
//! edge callback into its own channels.

#![forbid(unsafe_code)]

mod cdev;

use std::path::PathBuf;
use std::sync::Arc;

pub use cdev::{CONSUMER, CdevBackend, RETRY_INTERVAL};

/// One named line, as a board config describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineConfig {
    /// The chip's device name below the device root, e.g. `gpiochip0` (`/dev/gpiochip0`).
    pub chip: String,
    /// The line's offset on the chip.
    pub offset: u32,
    /// Whether the agent reads or drives the line.
    pub direction: Direction,
    /// The logical level is the inverse of the electrical one.
    pub active_low: bool,
    /// Pull-up or pull-down resistors; `None` leaves the chip's setting alone.
    pub bias: Option<Bias>,
    /// How an output is driven; `None` is the chip's default (push-pull). Ignored for
    /// inputs (the board config refuses a drive on an input).
    pub drive: Option<Drive>,
}

/// Direction of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Read, with edges reported by [`GpioBackend::watch`].
    Input,
    /// Driven by [`GpioBackend::write`]; starts inactive (logical 0) when first requested.
    Output,
}

/// Bias of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    Disabled,
    PullUp,
    PullDown,
}

/// Drive of an output line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    PushPull,
    OpenDrain,
    OpenSource,
}

/// Receives `(line name, new logical level)` for every edge of an input line. Called from
/// the backend's watcher threads: it must return quickly (forward into a channel).
pub type EdgeSink = Arc<dyn Fn(&str, bool) + Send + Sync>;

/// Named GPIO lines backed by hardware. The runtime holds one as `Arc<dyn GpioBackend>`.
pub trait GpioBackend: Send + Sync + std::fmt::Debug {
    /// The logical level of `line` (input or output).
    fn read(&self, line: &str) -> Result<bool, GpioError>;
    /// Drives the output `line` to the logical `value`; an input is [`GpioError::NotOutput`].
    fn write(&self, line: &str, value: bool) -> Result<(), GpioError>;
    /// One human-readable line for each configured line that cannot be used now, naming the
    /// line, its chip and path, and why (for the agent's report at start).
    fn missing(&self) -> Vec<String>;
    /// Starts reporting edges of every input line to `sink` until the backend is dropped.
    /// A line whose chip is missing now is retried every [`RETRY_INTERVAL`] in the
    /// background, so this fails only if the watchers cannot start at all, or if edges are
    /// already watched ([`GpioError::AlreadyWatching`]).
    fn watch(&self, sink: EdgeSink) -> Result<(), GpioError>;
}

/// Why a GPIO call failed. Every message names the line; hardware errors also name the chip
/// and its device path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpioError {
    /// The board config has no such line.
    #[error("no GPIO line named `{line}` is configured")]
    UnknownLine { line: String },
    /// The line is an input and cannot be driven.
    #[error("GPIO line `{line}` is an input and cannot be driven")]
    NotOutput { line: String },
    /// The chip's device file does not exist (driver not loaded, overlay not applied).
    #[error("GPIO line `{line}`: chip `{chip}` is not present ({path} does not exist)")]
    ChipMissing {
        line: String,
        chip: String,
        path: PathBuf,
    },
    /// The chip's path exists but is not a GPIO character device.
    #[error("GPIO line `{line}`: {path} (chip `{chip}`) {reason}")]
    NotAChip {
        line: String,
        chip: String,
        path: PathBuf,
        reason: &'static str,
    },
    /// The chip has fewer lines than the configured offset.
    #[error(
        "GPIO line `{line}`: chip `{chip}` ({path}) has {lines} lines, so it has no line {offset}"
    )]
    NoSuchLine {
        line: String,
        chip: String,
        path: PathBuf,
        offset: u32,
        lines: u32,
    },
    /// Another consumer (a kernel driver, another process) holds the line.
    #[error(
        "GPIO line `{line}`: line {offset} of chip `{chip}` ({path}) is in use{}",
        held_by(.consumer)
    )]
    Busy {
        line: String,
        chip: String,
        path: PathBuf,
        offset: u32,
        /// The consumer label the kernel reports for the line, if any.
        consumer: Option<String>,
    },
    /// Another failure of the chip or the line request.
    #[error("GPIO line `{line}` (chip `{chip}` line {offset}, {path}): {message}")]
    Io {
        line: String,
        chip: String,
        path: PathBuf,
        offset: u32,
        message: String,
    },
    /// [`GpioBackend::watch`] was called a second time.
    #[error("GPIO edges are already being watched")]
    AlreadyWatching,
    /// The edge watchers could not be started.
    #[error("cannot start watching GPIO edges: {message}")]
    Watch { message: String },
}

fn held_by(consumer: &Option<String>) -> String {
    match consumer {
        Some(c) => format!(" by `{c}`"),
        None => String::new(),
    }
}
