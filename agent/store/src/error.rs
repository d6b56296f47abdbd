//! The store's typed errors. Every message names the file, digest, namespace or key involved.

use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};

use perch_core::Digest;
use sled::transaction::TransactionError;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `{path}` is not a perch store: {reason}
    #[error("`{}` is not a perch store: {reason}", .path.display())]
    NotAStore {
        /// The path given to open.
        path: PathBuf,
        /// What was found there instead.
        reason: &'static str,
    },

    /// cannot open the sled database at `{path}`: {source}
    #[error("cannot open the sled database at `{}`: {source}", .path.display())]
    Open {
        /// The store directory.
        path: PathBuf,
        /// sled's reason.
        #[source]
        source: sled::Error,
    },

    /// the sled database at `{path}` cannot be recovered: {reason}
    #[error("the sled database at `{}` cannot be recovered: {reason}; move the directory aside to start with an empty store", .path.display())]
    Unrecoverable {
        /// The store directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// the store at `{path}` has format `{found}`; this agent reads `{expected}`
    #[error("the store at `{}` has format `{found}`; this agent reads `{expected}`", .path.display())]
    UnsupportedFormat {
        /// The store directory.
        path: PathBuf,
        /// The format marker found on disk.
        found: String,
        /// The format this build reads.
        expected: &'static str,
    },

    /// cannot {action} `{path}`: {source}
    #[error("cannot {action} `{}`: {source}", .path.display())]
    Io {
        /// What was being done, e.g. `fdatasync`.
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },

    /// sled failed while {action}: {source}
    #[error("sled failed while {action}: {source}")]
    Sled {
        /// What was being done, naming the digest, namespace or key.
        action: String,
        /// sled's reason.
        #[source]
        source: sled::Error,
    },

    /// blob digest mismatch: expected {expected}, the bytes hash to {actual}
    #[error("blob digest mismatch: expected {expected}, the bytes hash to {actual}")]
    DigestMismatch {
        /// The digest the caller asked for.
        expected: Digest,
        /// The digest of the bytes it gave.
        actual: Digest,
    },

    /// {what} is corrupt: {detail}
    #[error("{what} is corrupt: {detail}")]
    Corrupt {
        /// The entry, e.g. `blob sha256:...` or `journal current entry`.
        what: String,
        /// What is wrong with it and what was done about it.
        detail: String,
    },

    /// invalid {what} `{value}`: {reason}
    #[error("invalid {what} `{value}`: {reason}")]
    Invalid {
        /// What kind of argument, e.g. `kv namespace`.
        what: &'static str,
        /// The value given.
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}

impl StoreError {
    /// Whether this is a checksum or digest failure of stored data (as opposed to an I/O,
    /// sled or argument error): the agent can drop and re-fetch, or fall back.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Self::Corrupt { .. })
    }

    /// The same error for another caller: a failed outbox commit is reported to every
    /// appender of its batch. An I/O error keeps its kind and OS error code and message.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::NotAStore { path, reason } => Self::NotAStore {
                path: path.clone(),
                reason,
            },
            Self::Open { path, source } => Self::Open {
                path: path.clone(),
                source: source.clone(),
            },
            Self::Unrecoverable { path, reason } => Self::Unrecoverable {
                path: path.clone(),
                reason: reason.clone(),
            },
            Self::UnsupportedFormat {
                path,
                found,
                expected,
            } => Self::UnsupportedFormat {
                path: path.clone(),
                found: found.clone(),
                expected,
            },
            Self::Io {
                action,
                path,
                source,
            } => Self::Io {
                action,
                path: path.clone(),
                source: match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            Self::Sled { action, source } => Self::Sled {
                action: action.clone(),
                source: source.clone(),
            },
            Self::DigestMismatch { expected, actual } => Self::DigestMismatch {
                expected: *expected,
                actual: *actual,
            },
            Self::Corrupt { what, detail } => Self::Corrupt {
                what: what.clone(),
                detail: detail.clone(),
            },
            Self::Invalid {
                what,
                value,
                reason,
            } => Self::Invalid {
                what,
                value: value.clone(),
                reason,
            },
        }
    }
}

/// `map_err` adapter for sled errors; `action` is only formatted when there is an error.
pub(crate) fn sled_err(action: impl FnOnce() -> String) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Sled {
        action: action(),
        source,
    }
}

/// `map_err` adapter for I/O errors on `path`.
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// `map_err` adapter for a sled transaction whose closure never aborts.
pub(crate) fn tx_err(
    action: impl FnOnce() -> String,
) -> impl FnOnce(TransactionError<Infallible>) -> StoreError {
    move |e| match e {
        TransactionError::Storage(source) => StoreError::Sled {
            action: action(),
            source,
        },
        TransactionError::Abort(never) => match never {},
    }
}
