//! Perch's durable on-device store.
//!
//! Owns everything the agent keeps on disk in one sled database: the component blob cache
//! (original bytes addressed by sha256 digest, verified on the way in and on the way out), the
//! precompiled artifact cache (one native artifact per blob and engine fingerprint, each with
//! its own checksum), the desired-state journal (the current and the previous accepted
//! document, committed atomically and durably) and one key-value namespace per component.
//! The agent talks to it through the object-safe [`Store`] trait, so sled stays an
//! implementation detail ([`SledStore`]). It must not depend on wasmtime or on a tokio
//! runtime: calls are blocking and plain bytes go in and out; the runtime decides what an
//! artifact means. Two pieces face async code without needing a runtime:
//! [`Store::outbox_watch`], a `tokio::sync::watch` channel (tokio's runtime-free `sync`
//! module) so a drainer task wakes when telemetry becomes durable, and the
//! [`OutboxReceipt`] of [`Store::outbox_submit`], a future a component's publish awaits
//! (a thread can block on it instead).
//!
//! The telemetry outbox is a durable queue: appenders that arrive together share one commit
//! (one sled flush and one `fdatasync`, done by the outbox's own two threads), sequence
//! numbers never repeat over the life of the store, and [`SledOptions`] bounds its size and
//! age; see [`SledStore`].
//!
//! sled 0.34's `flush()` does not fsync (it issues `sync_file_range`), so [`Store::sync`] and
//! [`Store::commit_desired`] follow it with `fdatasync` of sled's files; see
//! [`SledStore`] for which files those are.

#![forbid(unsafe_code)]

mod durable;
mod error;
mod frame;
mod objects;
mod receipt;
mod sled_store;

use perch_core::Digest;

pub use error::StoreError;
pub use receipt::OutboxReceipt;
pub use sled_store::{
    DEFAULT_CACHE_CAPACITY, DEFAULT_FLUSH_EVERY_MS, DEFAULT_OUTBOX_MAX_AGE,
    DEFAULT_OUTBOX_MAX_BYTES, FORMAT, SledOptions, SledStore,
};

/// The agent's durable storage, held as `Arc<dyn Store>`.
///
/// Writes are not durable on their own: [`Store::commit_desired`] and [`Store::sync`] make
/// everything written before them durable (group commit), so a caller that must acknowledge
/// a write (a kv `set` a component waits on, a fetched blob the next desired state needs)
/// batches its writes and then calls one of them.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a component blob and returns its digest. When `expected` is given and the bytes
    /// hash to something else, nothing is stored and [`StoreError::DigestMismatch`] is
    /// returned. Storing a blob that is already present is a no-op.
    fn put_blob(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<Digest, StoreError>;

    /// The blob with this digest. The bytes are verified against the digest on every read; a
    /// blob that no longer matches is removed (so it can be fetched again) and reported as
    /// [`StoreError::Corrupt`], never returned.
    fn get_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError>;

    /// Whether a blob with this digest is stored (without reading or verifying it).
    fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError>;

    /// Removes a blob and every precompiled artifact made from it. Removing a missing blob
    /// is not an error.
    fn remove_blob(&self, digest: &Digest) -> Result<(), StoreError>;

    /// Every stored blob with its size in bytes, ordered by digest.
    fn blobs(&self) -> Result<Vec<(Digest, u64)>, StoreError>;

    /// Stores the precompiled native artifact of blob `digest` for the engine identified by
    /// `fingerprint` (the runtime's engine/config hash), replacing an older one.
    fn put_artifact(
        &self,
        digest: &Digest,
        fingerprint: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError>;

    /// The artifact of blob `digest` for engine `fingerprint`. An artifact whose checksum no
    /// longer matches (truncated, bit-flipped) is removed and reported as
    /// [`StoreError::Corrupt`].
    fn get_artifact(
        &self,
        digest: &Digest,
        fingerprint: &str,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Removes every artifact built for an engine other than `keep_fingerprint` (after an
    /// agent upgrade they can never be used again) and returns how many were removed.
    fn prune_artifacts(&self, keep_fingerprint: &str) -> Result<u64, StoreError>;

    /// The desired-state journal: the current and the previous committed documents.
    fn journal(&self) -> Result<Journal, StoreError>;

    /// Commits `doc` as the current desired state. In one atomic step the current document
    /// becomes the previous one and `doc` becomes current; the commit is durable when this
    /// returns. A current document that is corrupt is not moved to `previous`: the last good
    /// document stays there for rollback. Returns the new entry's generation.
    fn commit_desired(&self, doc: &[u8]) -> Result<u64, StoreError>;

    /// The value of `key` in component namespace `ns`.
    fn kv_get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Sets `key` in namespace `ns`, creating the namespace if needed.
    fn kv_set(&self, ns: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Deletes `key` from namespace `ns`; returns whether it existed.
    fn kv_delete(&self, ns: &str, key: &str) -> Result<bool, StoreError>;

    /// Adds `delta` to the decimal counter at `key` in namespace `ns` (0 when unset) in one
    /// atomic step and returns the new value, stored back as decimal text. A value that is
    /// not a decimal `u64`, or an overflow, is an `Invalid` error and changes nothing.
    fn kv_increment(&self, ns: &str, key: &str, delta: u64) -> Result<u64, StoreError>;

    /// The keys of namespace `ns`, in byte order; empty for a namespace that does not exist.
    fn kv_keys(&self, ns: &str) -> Result<Vec<String>, StoreError>;

    /// Deletes namespace `ns` and everything in it (when its component is removed). Call it
    /// while no instance of that component runs.
    fn kv_drop(&self, ns: &str) -> Result<(), StoreError>;

    /// Appends a telemetry record to the outbox and returns its sequence number: 1, 2, ...
    /// over the life of the store, never repeated, even after the outbox was emptied and the
    /// store reopened (it becomes the broker message id receivers deduplicate on). Durable
    /// when this returns: the record survives a power cut. Appenders calling at the same
    /// time share one commit. An error means the record was not acknowledged (when the disk
    /// failed, it is taken out of the outbox again); its sequence number is not reused.
    fn outbox_append(&self, record: &OutboxRecord) -> Result<u64, StoreError> {
        self.outbox_submit(record).wait()
    }

    /// [`Store::outbox_append`] without blocking: queues the record for the next commit and
    /// returns a receipt that resolves to its sequence number once it is durable (await it,
    /// or [`OutboxReceipt::wait`]). A record refused outright (too large, the store closing)
    /// gets a receipt that resolves to the error at once. Records are committed in the order
    /// they were submitted.
    fn outbox_submit(&self, record: &OutboxRecord) -> OutboxReceipt;

    /// Up to `limit` durable records with a sequence number above `after`, oldest first.
    fn outbox_read(&self, after: u64, limit: usize)
    -> Result<Vec<(u64, OutboxRecord)>, StoreError>;

    /// Removes every record with a sequence number up to and including `through` (the
    /// broker acknowledged them) and returns how many were removed. Not synced on its own: a
    /// power cut may bring some back, which only means they are sent again.
    fn outbox_ack(&self, through: u64) -> Result<u64, StoreError>;

    /// The outbox's size, sequence numbers and drops.
    fn outbox_stats(&self) -> Result<OutboxStats, StoreError>;

    /// The sequence number of the last durable record, updated after every commit, so a
    /// drainer can wait for new records instead of polling.
    fn outbox_watch(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The newest `limit` durable outbox records, oldest first.
    fn outbox_recent(&self, limit: usize) -> Result<Vec<(u64, OutboxRecord)>, StoreError>;

    /// How many records the outbox holds.
    fn outbox_len(&self) -> Result<u64, StoreError>;

    /// Makes everything written so far durable.
    fn sync(&self) -> Result<(), StoreError>;

    /// Space the store takes on disk, in bytes (allocated blocks, not logical size).
    fn size_on_disk(&self) -> Result<u64, StoreError>;
}

/// One telemetry record waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// The component that published it.
    pub component: String,
    /// The telemetry stream.
    pub stream: String,
    /// When it was published, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The payload as published.
    pub payload: Vec<u8>,
}

impl OutboxRecord {
    /// Frame: u16 length + component, u16 length + stream, u64 timestamp, payload. A
    /// component or stream name longer than a u16 length can say is refused.
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut out =
            Vec::with_capacity(12 + self.component.len() + self.stream.len() + self.payload.len());
        for (what, s) in [
            ("outbox component", &self.component),
            ("outbox stream", &self.stream),
        ] {
            let len = u16::try_from(s.len()).map_err(|_| StoreError::Invalid {
                what,
                value: s.chars().take(64).collect(),
                reason: "it is longer than 65535 bytes",
            })?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// The timestamp in an encoded record, without decoding the rest.
    fn timestamp_of(frame: &[u8]) -> Option<u64> {
        let skip = |at: usize| -> Option<usize> {
            let len = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
            Some(at + 2 + usize::from(len))
        };
        let at = skip(skip(0)?)?;
        Some(u64::from_be_bytes(frame.get(at..at + 8)?.try_into().ok()?))
    }

    fn decode(mut bytes: &[u8]) -> Option<Self> {
        let mut text = || -> Option<String> {
            let len = u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?) as usize;
            let s = String::from_utf8(bytes.get(2..2 + len)?.to_vec()).ok()?;
            bytes = &bytes[2 + len..];
            Some(s)
        };
        let component = text()?;
        let stream = text()?;
        let timestamp_ms = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        Some(Self {
            component,
            stream,
            timestamp_ms,
            payload: bytes[8..].to_vec(),
        })
    }
}

/// The outbox at a glance, from [`Store::outbox_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records waiting to be acknowledged by the broker.
    pub len: u64,
    /// Their encoded size in bytes (what [`SledOptions::outbox_max_bytes`] bounds).
    pub bytes: u64,
    /// The lowest sequence number waiting (`None` when the outbox is empty).
    pub first_seq: Option<u64>,
    /// The highest sequence number ever assigned (0 before the first append).
    pub last_seq: u64,
    /// The timestamp of the oldest waiting record (the one with `first_seq`).
    pub oldest_ms: Option<u64>,
    /// Records dropped by the size and age bounds over the life of the store.
    pub dropped: u64,
    /// Commits (one sled flush and one `fdatasync` each) since the store was opened; with
    /// concurrent appenders it grows slower than `last_seq` (group commit).
    pub commits: u64,
}

/// One committed desired-state document.
#[derive(Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// Counts commits over the life of the store: the first commit is 1 and every commit
    /// adds one, so `previous.generation + 1 == current.generation` after a clean commit.
    pub generation: u64,
    /// The document exactly as committed.
    pub doc: Vec<u8>,
}

impl std::fmt::Debug for JournalEntry {
    // Documents may carry configuration values: show their size, never their contents.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalEntry")
            .field("generation", &self.generation)
            .field("doc_len", &self.doc.len())
            .finish()
    }
}

/// The desired-state journal as read from disk. Each side is read and verified on its own:
/// a corrupt `current` is an `Err` here while `previous` can still be used.
#[derive(Debug)]
pub struct Journal {
    /// The last committed document (`None` before the first commit).
    pub current: Result<Option<JournalEntry>, StoreError>,
    /// The document committed before it, kept for rollback.
    pub previous: Result<Option<JournalEntry>, StoreError>,
}

impl Journal {
    /// The document the agent should apply: `current` when it is intact, otherwise
    /// `previous` when that is.
    pub fn latest_good(&self) -> Option<&JournalEntry> {
        match (&self.current, &self.previous) {
            (Ok(Some(current)), _) => Some(current),
            (Err(_), Ok(Some(previous))) => Some(previous),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(generation: u64) -> JournalEntry {
        JournalEntry {
            generation,
            doc: format!("doc {generation}").into_bytes(),
        }
    }

    fn corrupt() -> StoreError {
        StoreError::Corrupt {
            what: "journal current entry".into(),
            detail: "test".into(),
        }
    }

    #[test]
    fn latest_good_prefers_current_and_falls_back_only_on_corruption() {
        let both = Journal {
            current: Ok(Some(entry(2))),
            previous: Ok(Some(entry(1))),
        };
        assert_eq!(both.latest_good().map(|e| e.generation), Some(2));

        let broken = Journal {
            current: Err(corrupt()),
            previous: Ok(Some(entry(1))),
        };
        assert_eq!(broken.latest_good().map(|e| e.generation), Some(1));

        let empty = Journal {
            current: Ok(None),
            previous: Ok(None),
        };
        assert_eq!(empty.latest_good(), None);
    }

    #[test]
    fn outbox_records_round_trip() {
        let r = OutboxRecord {
            component: "thermostat".into(),
            stream: "climate".into(),
            timestamp_ms: 1_700_000_000_123,
            payload: b"{\"t\":21.5}".to_vec(),
        };
        let frame = r.encode().expect("short names encode");
        assert_eq!(OutboxRecord::decode(&frame), Some(r.clone()));
        assert_eq!(OutboxRecord::timestamp_of(&frame), Some(r.timestamp_ms));
        assert_eq!(OutboxRecord::decode(&frame[..5]), None);
        assert_eq!(OutboxRecord::timestamp_of(&frame[..20]), None);
    }

    #[test]
    fn outbox_names_too_long_for_the_frame_are_refused() {
        let r = OutboxRecord {
            component: "c".into(),
            stream: "s".repeat(70_000),
            timestamp_ms: 1,
            payload: Vec::new(),
        };
        let err = r.encode().expect_err("a 70000-byte stream name");
        assert!(err.to_string().contains("invalid outbox stream"), "{err}");
    }

    #[test]
    fn entry_debug_hides_the_document() {
        let e = JournalEntry {
            generation: 7,
            doc: b"secret-token".to_vec(),
        };
        let shown = format!("{e:?}");
        assert!(shown.contains("generation: 7"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
