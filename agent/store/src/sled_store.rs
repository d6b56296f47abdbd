//! [`SledStore`]: the [`Store`] on one sled 0.34 database.
//!
//! Layout (sled trees):
//! - `perch/blobs`: digest (32 bytes) -> object header (size, object id, sha256).
//! - `perch/artifacts`: digest ++ engine fingerprint -> object header.
//! - `perch/chunks`: object id (u64 BE) ++ chunk index (u64 BE) -> up to
//!   [`crate::objects::CHUNK_SIZE`] bytes of a blob or artifact ([`crate::objects`] says why).
//!   A header and its chunks are written and removed in one transaction.
//! - `perch/journal`: `current`, `previous` -> sealed (generation u64 BE ++ document);
//!   `generation` -> the last generation handed out.
//! - `perch/meta`: `format` -> [`FORMAT`]; `outbox-last-seq` -> the last outbox sequence
//!   number handed out and `outbox-dropped` -> records dropped by the outbox bounds (u64 BE).
//! - `perch/outbox`: sequence number (u64 BE) -> encoded [`OutboxRecord`] ([`outbox`]).
//! - `kv/<namespace>`: one tree per component namespace, keys are the UTF-8 keys.

use std::convert::Infallible;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use perch_core::Digest;
use sled::transaction::ConflictableTransactionError;
use sled::{Transactional, Tree};
use tracing::{Span, debug, error, info, instrument, warn};

use crate::durable::{BlobFiles, sync_dir, sync_file};
use crate::error::{io_err, sled_err, tx_err};
use crate::frame;
use crate::objects::{self, Header, ReadError};
use crate::{Journal, JournalEntry, OutboxReceipt, OutboxRecord, OutboxStats, Store, StoreError};

mod chunk;
mod outbox;

use outbox::Outbox;

/// sled's page cache size unless configured. sled's own default (1 GiB) is sized for
/// servers. sled's accounting is loose, so this is not an RSS bound: measured here with
/// 4 MiB, reading 28 MiB of blobs took a fresh process to ~44 MB RSS, writing 40 MiB to
/// ~110 MB (the same with 256 KiB or 64 MiB), 200k small kv writes levelled off at ~34 MB.
pub const DEFAULT_CACHE_CAPACITY: u64 = 4 * 1024 * 1024;

/// How often sled's background thread flushes and fsyncs `db`, in milliseconds (sled's own
/// default). It bounds what a power cut can lose of writes nobody called
/// [`Store::sync`] for; acknowledged writes do not depend on it.
pub const DEFAULT_FLUSH_EVERY_MS: u64 = 500;

/// [`SledOptions::outbox_max_bytes`] unless configured: 64 MiB, about 600,000 records of
/// 100 bytes.
pub const DEFAULT_OUTBOX_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// [`SledOptions::outbox_max_age`] unless configured: 7 days.
pub const DEFAULT_OUTBOX_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The on-disk format this build reads and writes, recorded in the store on creation. The
/// tree layout and the chunk size are part of it.
pub const FORMAT: &str = "perch-store/1";

const BLOBS: &str = "perch/blobs";
const CHUNKS: &str = "perch/chunks";
const ARTIFACTS: &str = "perch/artifacts";
const JOURNAL: &str = "perch/journal";
const META: &str = "perch/meta";
/// The outbox as chunks of consecutive records (`sled_store/chunk.rs`).
const OUTBOX: &str = "perch/outbox-chunks";
/// The outbox as one record per key, as stores before chunks kept it; moved into
/// [`OUTBOX`] when such a store is opened.
const OUTBOX_LEGACY: &str = "perch/outbox";
const KV_PREFIX: &str = "kv/";

const CURRENT: &[u8] = b"current";
const PREVIOUS: &[u8] = b"previous";
const GENERATION: &[u8] = b"generation";
const FORMAT_KEY: &[u8] = b"format";

/// sled's files inside the store directory (sled 0.34.7: `config.rs`, `blob_io.rs`,
/// `snapshot.rs`).
const SLED_DB_FILE: &str = "db";
const SLED_CONF_FILE: &str = "conf";
const SLED_BLOB_DIR: &str = "blobs";

/// How to open a [`SledStore`].
///
/// # The outbox bounds
///
/// During a long outage the telemetry outbox grows until the broker is back. Two bounds
/// keep it from filling the disk, both applied when a batch of new records is committed:
/// - **Size**: when the new records would put the outbox over `outbox_max_bytes` (the sum
///   of the encoded records: payload, names and 12 bytes of framing each), the *oldest*
///   records are dropped until they fit. New records are never dropped for them: after a
///   long outage the newest data is the most valuable. A record larger than the whole bound
///   is refused with [`StoreError::Invalid`].
/// - **Age**: records whose `timestamp_ms` is older than `outbox_max_age` are dropped,
///   oldest first, at most 4096 per commit. The check walks from the oldest record and
///   stops at the first one young enough, so an old timestamp behind a newer one (a clock
///   that jumped back) waits until that one expires. Timestamps are taken as given: records
///   made while the device clock was unset (1970) are dropped at the next commit once the
///   clock is right.
///
/// Only records already durable are dropped, never one whose appender is still waiting, so
/// while appenders are committing concurrently the outbox can be over its size bound by
/// the records in flight until the next commit. Drops are written with the commit that
/// causes them, counted in [`OutboxStats::dropped`](crate::OutboxStats::dropped)
/// (persisted) and logged once per commit (`store.outbox_dropped`, with how many and their
/// sequence numbers). An outbox nobody appends to is not trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledOptions {
    /// sled's page cache, in bytes.
    pub cache_capacity: u64,
    /// sled's background flush interval in milliseconds; `None` turns the thread off (only
    /// explicit syncs then reach the disk before the store is dropped).
    pub flush_every_ms: Option<u64>,
    /// The most encoded bytes the outbox holds before it drops its oldest records; at
    /// least 1.
    pub outbox_max_bytes: u64,
    /// Records older than this are dropped; `None` keeps them until the size bound drops
    /// them.
    pub outbox_max_age: Option<Duration>,
}

impl Default for SledOptions {
    fn default() -> Self {
        Self {
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            flush_every_ms: Some(DEFAULT_FLUSH_EVERY_MS),
            outbox_max_bytes: DEFAULT_OUTBOX_MAX_BYTES,
            outbox_max_age: Some(DEFAULT_OUTBOX_MAX_AGE),
        }
    }
}

/// The [`Store`] on a sled 0.34 database in one directory.
///
/// sled keeps its log in `<dir>/db`; a page (a tree node with its values) whose log record
/// is over ~128 KiB (a quarter of sled's 512 KiB segment) goes to its own file
/// `<dir>/blobs/<lsn>` instead; its settings are in `<dir>/conf` and a page-table snapshot
/// in `<dir>/snap.<lsn>`. Blobs and artifacts are stored in 4 KiB chunks so their pages stay
/// in the log. [`Store::sync`] calls sled's `flush()` and then
/// `fdatasync`s the blob files not synced before, the `blobs` directory when its entries
/// changed, and `db`; opening also syncs `conf` and the store directory.
///
/// The telemetry outbox is a durable queue with group commit: records submitted together
/// ([`Store::outbox_submit`], [`Store::outbox_append`]) share one sled flush and `fdatasync`
/// on the outbox's writer and syncer threads, sequence numbers
/// come from a persisted high-water mark, and [`SledOptions`] bounds its size and age (see
/// there for what is dropped).
pub struct SledStore {
    path: PathBuf,
    options: SledOptions,
    db: sled::Db,
    blobs: Tree,
    artifacts: Tree,
    chunks: Tree,
    journal: Tree,
    outbox: Outbox,
    disk: Disk,
}

/// What making the store's writes durable needs, shared with the outbox's commit threads.
#[derive(Clone)]
pub(super) struct Disk {
    path: Arc<Path>,
    db: sled::Db,
    blob_files: Arc<BlobFiles>,
}

impl Disk {
    fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `op`, turning a sled panic into [`StoreError::Unrecoverable`]. sled 0.34 panics
    /// on some damaged logs instead of returning an error (seen here: "cannot find pid 13 in
    /// view_for_key" reading a tree after bytes in a live segment were flipped); an error
    /// lets the agent report it and decide. Does nothing under `panic = "abort"`.
    fn guarded<T>(
        &self,
        action: impl FnOnce() -> String,
        op: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        guard(&self.path, action, op)
    }

    /// sled's `flush()` and then `fdatasync` of what it wrote: blob files first (the log in
    /// `db` points at them), then `db`.
    fn flush_and_sync(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(sled_err(|| format!("flushing `{}`", self.path.display())))?;
        self.blob_files.sync(&self.path.join(SLED_BLOB_DIR))?;
        sync_file(&self.path.join(SLED_DB_FILE))
    }
}

impl fmt::Debug for SledStore {
    // sled's own Debug prints every tree's contents: never let that reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Attempts, 50 ms apart, to take sled's lock on a store that was just closed.
const LOCK_RETRIES: u32 = 40;

impl SledStore {
    /// Opens the store in directory `path`, creating it when it does not exist. Refuses a
    /// path that is a file, a non-empty directory without a sled database, or a store of
    /// another format.
    pub fn open(path: impl AsRef<Path>, options: &SledOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if options.outbox_max_bytes == 0 {
            return Err(StoreError::Invalid {
                what: "outbox_max_bytes",
                value: "0".into(),
                reason: "the outbox must be able to hold a record",
            });
        }
        let found = prepare_dir(&path)?;

        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_capacity)
            .mode(sled::Mode::LowSpace)
            .flush_every_ms(options.flush_every_ms);
        // sled 0.34 panics on some corrupt logs instead of returning an error (seen here:
        // "tried to serialize Uninitialized" after bytes in a live segment were flipped).
        // With `panic = "abort"` (the firmware profile) this cannot help and the process dies.
        // sled's file lock outlives a dropped store by as long as its flusher thread takes to
        // notice, so a store closed and opened again at once (a restart inside one process)
        // can find its own lock still held: wait for it briefly. Another process holding the
        // store is still refused, after the wait.
        let mut attempts = 0;
        let db = loop {
            let opened =
                std::panic::catch_unwind(AssertUnwindSafe(|| config.open())).map_err(|panic| {
                    StoreError::Unrecoverable {
                        path: path.clone(),
                        reason: format!(
                            "sled panicked while recovering its log: {}",
                            panic_message(&*panic)
                        ),
                    }
                })?;
            match opened {
                Err(sled::Error::Io(e))
                    if attempts < LOCK_RETRIES
                        && e.to_string().contains("could not acquire lock") =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => {
                    break other.map_err(|source| StoreError::Open {
                        path: path.clone(),
                        source,
                    })?;
                }
            }
        };

        let open_tree = |name: &'static str| {
            db.open_tree(name).map_err(sled_err(|| {
                format!("opening tree `{name}` in `{}`", path.display())
            }))
        };
        let meta = open_tree(META)?;
        let outbox_tree = open_tree(OUTBOX)?;
        let disk = Disk {
            path: Arc::from(path.as_path()),
            db: db.clone(),
            blob_files: Arc::default(),
        };
        let legacy = if db
            .tree_names()
            .iter()
            .any(|n| n == OUTBOX_LEGACY.as_bytes())
        {
            Some(open_tree(OUTBOX_LEGACY)?)
        } else {
            None
        };
        let outbox = guard(
            &path,
            || "loading the outbox".into(),
            || Outbox::open(outbox_tree, legacy, meta.clone(), disk.clone(), options),
        )?;
        let store = Self {
            blobs: open_tree(BLOBS)?,
            chunks: open_tree(CHUNKS)?,
            artifacts: open_tree(ARTIFACTS)?,
            journal: open_tree(JOURNAL)?,
            outbox,
            disk,
            options: options.clone(),
            path,
            db,
        };
        store.check_format(&meta, found)?;
        store.probe()?;

        // Make the creation itself durable: sled writes `conf` once without syncing it,
        // renames its snapshot into place without syncing the directory, and a new store
        // directory is an entry in its parent.
        store.sync()?;
        sync_file(&store.path.join(SLED_CONF_FILE))?;
        sync_dir(&store.path)?;
        if found == Found::Nothing
            && let Some(parent) = store.path.parent().filter(|p| !p.as_os_str().is_empty())
        {
            sync_dir(parent)?;
        }
        info!(
            path = %store.path.display(),
            recovered = store.db.was_recovered(),
            "store.open"
        );
        Ok(store)
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_format(&self, meta: &Tree, found: Found) -> Result<(), StoreError> {
        let marker = meta
            .get(FORMAT_KEY)
            .map_err(sled_err(|| "reading the store format marker".into()))?;
        match marker {
            Some(marker) if marker == FORMAT.as_bytes() => Ok(()),
            Some(marker) => Err(StoreError::UnsupportedFormat {
                path: self.path.clone(),
                found: String::from_utf8_lossy(&marker).into_owned(),
                expected: FORMAT,
            }),
            // sled does not fail on a log it cannot read: it starts empty (measured here
            // with a `db` file of garbage). Every store gets its marker on first open, so
            // an existing `db` without one lost its contents, or never was a perch store.
            None if found == Found::SledFiles => Err(StoreError::Unrecoverable {
                path: self.path.clone(),
                reason: "sled recovered no perch data from the existing `db` file (it is \
                         corrupt, belongs to another program, or the store's first open was \
                         interrupted)"
                    .into(),
            }),
            None => {
                meta.insert(FORMAT_KEY, FORMAT.as_bytes())
                    .map_err(sled_err(|| "writing the store format marker".into()))?;
                Ok(())
            }
        }
    }

    /// Stores `bytes` as a new object under `key` in `headers`, replacing (and freeing) the
    /// object stored there before, in one transaction.
    fn put_object(&self, headers: &Tree, key: &[u8], bytes: &[u8]) -> Result<(), StoreError> {
        let id = self
            .db
            .generate_id()
            .map_err(sled_err(|| "allocating an object id".into()))?;
        let header = Header {
            size: bytes.len() as u64,
            id,
            checksum: Digest::of(bytes),
        };
        (headers, &self.chunks)
            .transaction(|(headers, chunks)| {
                if let Some(old) = headers.get(key)?
                    && let Ok(old) = Header::decode(&old)
                {
                    objects::remove_chunks(chunks, &old)?;
                }
                objects::write_chunks(chunks, id, bytes)?;
                headers.insert(key, &header.encode()[..])?;
                Ok::<_, ConflictableTransactionError<Infallible>>(())
            })
            .map_err(tx_err(|| "storing an object".into()))
    }

    /// Reads the object under `key` in `headers`, which must hash to `expected` when given.
    /// A corrupt object is removed and reported as corrupt; `what` names it and `after` says
    /// what the caller can do.
    fn get_object(
        &self,
        headers: &Tree,
        key: &[u8],
        expected: Option<&Digest>,
        what: impl Fn() -> String,
        after: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        // A concurrent replacement frees the chunks being read; that is a retry, not damage.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let Some(raw) = headers
                .get(key)
                .map_err(sled_err(|| format!("reading {}", what())))?
            else {
                return Ok(None);
            };
            let detail = match Header::decode(&raw) {
                Ok(header) if expected.is_some_and(|e| *e != header.checksum) => {
                    format!("its header says its bytes hash to {}", header.checksum)
                }
                Ok(header) => match objects::read(&self.chunks, &header) {
                    Ok(bytes) => return Ok(Some(bytes)),
                    Err(ReadError::Sled(source)) => {
                        return Err(StoreError::Sled {
                            action: format!("reading {}", what()),
                            source,
                        });
                    }
                    Err(ReadError::Corrupt(detail)) => detail,
                },
                Err(detail) => detail,
            };
            // A damaged header may point at another object's chunks: free them only when no
            // other header does.
            let free = match Header::decode(&raw) {
                Ok(header) if !self.object_is_shared(header.id, headers, key)? => Some(header),
                _ => None,
            };
            // Remove it only if nobody replaced it meanwhile.
            let removed = (headers, &self.chunks)
                .transaction(|(headers, chunks)| {
                    if headers.get(key)?.as_ref() != Some(&raw) {
                        return Ok::<_, ConflictableTransactionError<Infallible>>(false);
                    }
                    headers.remove(key)?;
                    if let Some(header) = &free {
                        objects::remove_chunks(chunks, header)?;
                    }
                    Ok(true)
                })
                .map_err(tx_err(|| format!("removing the corrupt {}", what())))?;
            if !removed && attempts < 3 {
                continue;
            }
            warn!(what = what(), removed, "store.object_corrupt");
            let outcome = if removed {
                format!("the entry was removed {after}")
            } else {
                "it was replaced while being read".to_string()
            };
            return Err(StoreError::Corrupt {
                what: what(),
                detail: format!("{detail}; {outcome}"),
            });
        }
    }

    /// Whether a header other than `key` in `headers` points at object `id`.
    fn object_is_shared(&self, id: u64, headers: &Tree, key: &[u8]) -> Result<bool, StoreError> {
        for tree in [&self.blobs, &self.artifacts] {
            for item in tree.iter() {
                let (k, raw) = item.map_err(sled_err(|| "listing object headers".into()))?;
                if tree.name() == headers.name() && k == key {
                    continue;
                }
                if Header::decode(&raw).is_ok_and(|h| h.id == id) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// [`Disk::guarded`].
    fn guarded<T>(
        &self,
        action: impl FnOnce() -> String,
        op: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.disk.guarded(action, op)
    }

    /// [`Disk::flush_and_sync`].
    fn flush_and_sync(&self) -> Result<(), StoreError> {
        self.disk.flush_and_sync()
    }

    /// Reads what the agent needs first (journal, blob index) so a damaged database is
    /// reported by `open` rather than on first use.
    fn probe(&self) -> Result<(), StoreError> {
        self.guarded(
            || "checking the journal and the blob index".into(),
            || {
                for key in [CURRENT, PREVIOUS, GENERATION] {
                    self.journal
                        .get(key)
                        .map_err(sled_err(|| "reading the desired-state journal".into()))?;
                }
                for item in self.blobs.iter() {
                    item.map_err(sled_err(|| "listing blobs".into()))?;
                }
                Ok(())
            },
        )
    }

    fn kv_tree_name(ns: &str) -> Result<String, StoreError> {
        if ns.is_empty() {
            return Err(StoreError::Invalid {
                what: "kv namespace",
                value: ns.to_string(),
                reason: "it must not be empty",
            });
        }
        Ok(format!("{KV_PREFIX}{ns}"))
    }

    /// The namespace's tree if it exists; reads never create a namespace.
    fn existing_kv_tree(&self, ns: &str) -> Result<Option<Tree>, StoreError> {
        let name = Self::kv_tree_name(ns)?;
        if !self.db.tree_names().iter().any(|n| n == name.as_bytes()) {
            return Ok(None);
        }
        self.db
            .open_tree(&name)
            .map(Some)
            .map_err(sled_err(|| format!("opening kv namespace `{ns}`")))
    }
}

/// [`SledStore::guarded`] for code that runs before the store exists.
fn guard<T>(
    path: &Path,
    action: impl FnOnce() -> String,
    op: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    std::panic::catch_unwind(AssertUnwindSafe(op)).unwrap_or_else(|panic| {
        let action = action();
        let message = panic_message(&*panic);
        error!(path = %path.display(), action, message, "store.sled_panic");
        Err(StoreError::Unrecoverable {
            path: path.to_path_buf(),
            reason: format!("sled panicked while {action}: {message}"),
        })
    })
}

/// What [`prepare_dir`] found at the store path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Nothing: the directory was created.
    Nothing,
    /// An empty directory, or one with only sled's `blobs` directory or an empty `db`.
    Empty,
    /// A non-empty sled `db` file.
    SledFiles,
}

/// Checks that `path` can hold a store and creates it when missing.
fn prepare_dir(path: &Path) -> Result<Found, StoreError> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => Err(StoreError::NotAStore {
            path: path.to_path_buf(),
            reason: "it is not a directory",
        }),
        Ok(_) => {
            let mut has_sled_file = false;
            let mut db_has_data = false;
            let mut has_other = false;
            for entry in std::fs::read_dir(path).map_err(io_err("list", path))? {
                let entry = entry.map_err(io_err("list", path))?;
                let name = entry.file_name();
                if name == SLED_DB_FILE {
                    has_sled_file = true;
                    let meta = entry.metadata().map_err(io_err("inspect", &entry.path()))?;
                    db_has_data = meta.len() > 0;
                } else if name == SLED_CONF_FILE {
                    has_sled_file = true;
                } else if name != SLED_BLOB_DIR {
                    has_other = true;
                }
            }
            if has_other && !has_sled_file {
                return Err(StoreError::NotAStore {
                    path: path.to_path_buf(),
                    reason: "the directory holds other files and no sled database (`db`, `conf`)",
                });
            }
            Ok(if db_has_data {
                Found::SledFiles
            } else {
                Found::Empty
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(io_err("create directory", path))?;
            Ok(Found::Nothing)
        }
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn encode_entry(generation: u64, doc: &[u8]) -> Vec<u8> {
    frame::seal_parts(&[&generation.to_be_bytes(), doc])
}

fn decode_entry(raw: &[u8]) -> Result<(u64, &[u8]), String> {
    let payload = frame::open(raw)?;
    match payload.split_first_chunk::<8>() {
        Some((generation, doc)) => Ok((u64::from_be_bytes(*generation), doc)),
        None => Err(format!(
            "its payload is {} bytes, too short for a generation number",
            payload.len()
        )),
    }
}

fn journal_entry(which: &str, raw: Option<&[u8]>) -> Result<Option<JournalEntry>, StoreError> {
    let Some(raw) = raw else { return Ok(None) };
    let (generation, doc) = decode_entry(raw).map_err(|detail| StoreError::Corrupt {
        what: format!("journal {which} entry"),
        detail,
    })?;
    Ok(Some(JournalEntry {
        generation,
        doc: doc.to_vec(),
    }))
}

fn artifact_key(digest: &Digest, fingerprint: &str) -> Result<Vec<u8>, StoreError> {
    if fingerprint.is_empty() {
        return Err(StoreError::Invalid {
            what: "engine fingerprint",
            value: String::new(),
            reason: "it must not be empty",
        });
    }
    let mut key = Vec::with_capacity(32 + fingerprint.len());
    key.extend_from_slice(digest.as_bytes());
    key.extend_from_slice(fingerprint.as_bytes());
    Ok(key)
}

/// Names the operation in a sled error raised by a shared helper.
fn with_action(e: StoreError, action: impl FnOnce() -> String) -> StoreError {
    match e {
        StoreError::Sled { source, .. } => StoreError::Sled {
            action: action(),
            source,
        },
        other => other,
    }
}

fn digest_from_key(key: &[u8], tree: &str) -> Result<Digest, StoreError> {
    <[u8; 32]>::try_from(key)
        .map(Digest::from_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: format!("key in tree `{tree}`"),
            detail: format!("it is {} bytes, not a 32-byte digest", key.len()),
        })
}

impl Store for SledStore {
    fn put_blob(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<Digest, StoreError> {
        self.guarded(
            || "storing a blob".into(),
            || {
                let actual = Digest::of(bytes);
                if let Some(expected) = expected
                    && *expected != actual
                {
                    return Err(StoreError::DigestMismatch {
                        expected: *expected,
                        actual,
                    });
                }
                let key = actual.as_bytes();
                let present = self
                    .blobs
                    .contains_key(key)
                    .map_err(sled_err(|| format!("looking up blob {actual}")))?;
                if !present {
                    self.put_object(&self.blobs, key, bytes)
                        .map_err(|e| with_action(e, || format!("storing blob {actual}")))?;
                    debug!(digest = %actual, size = bytes.len(), "store.put_blob");
                }
                Ok(actual)
            },
        )
    }

    fn get_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        self.guarded(
            || format!("reading blob {digest}"),
            || {
                self.get_object(
                    &self.blobs,
                    digest.as_bytes(),
                    Some(digest),
                    || format!("blob {digest}"),
                    "so it can be fetched again",
                )
            },
        )
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        self.guarded(
            || format!("looking up blob {digest}"),
            || {
                self.blobs
                    .contains_key(digest.as_bytes())
                    .map_err(sled_err(|| format!("looking up blob {digest}")))
            },
        )
    }

    fn remove_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        self.guarded(
            || format!("removing blob {digest}"),
            || {
                let key = digest.as_bytes();
                let artifact_keys = self
                    .artifacts
                    .scan_prefix(key)
                    .keys()
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sled_err(|| format!("listing artifacts of blob {digest}")))?;
                (&self.blobs, &self.artifacts, &self.chunks)
                    .transaction(|(blobs, artifacts, chunks)| {
                        if let Some(raw) = blobs.remove(key)?
                            && let Ok(header) = Header::decode(&raw)
                        {
                            objects::remove_chunks(chunks, &header)?;
                        }
                        for artifact in &artifact_keys {
                            if let Some(raw) = artifacts.remove(artifact)?
                                && let Ok(header) = Header::decode(&raw)
                            {
                                objects::remove_chunks(chunks, &header)?;
                            }
                        }
                        Ok::<_, ConflictableTransactionError<Infallible>>(())
                    })
                    .map_err(tx_err(|| format!("removing blob {digest}")))?;
                debug!(digest = %digest, artifacts = artifact_keys.len(), "store.remove_blob");
                Ok(())
            },
        )
    }

    fn blobs(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        self.guarded(
            || "listing blobs".into(),
            || {
                self.blobs
                    .iter()
                    .map(|item| {
                        let (key, value) = item.map_err(sled_err(|| "listing blobs".into()))?;
                        let digest = digest_from_key(&key, BLOBS)?;
                        let header =
                            Header::decode(&value).map_err(|detail| StoreError::Corrupt {
                                what: format!("blob {digest}"),
                                detail,
                            })?;
                        Ok((digest, header.size))
                    })
                    .collect()
            },
        )
    }

    fn put_artifact(
        &self,
        digest: &Digest,
        fingerprint: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.guarded(
            || format!("storing the artifact of blob {digest} for engine `{fingerprint}`"),
            || {
                let key = artifact_key(digest, fingerprint)?;
                self.put_object(&self.artifacts, &key, bytes).map_err(|e| {
                    with_action(e, || {
                        format!("storing the artifact of blob {digest} for engine `{fingerprint}`")
                    })
                })?;
                debug!(digest = %digest, fingerprint, size = bytes.len(), "store.put_artifact");
                Ok(())
            },
        )
    }

    fn get_artifact(
        &self,
        digest: &Digest,
        fingerprint: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.guarded(
            || format!("reading the artifact of blob {digest} for engine `{fingerprint}`"),
            || {
                let key = artifact_key(digest, fingerprint)?;
                self.get_object(
                    &self.artifacts,
                    &key,
                    None,
                    || format!("artifact of blob {digest} for engine `{fingerprint}`"),
                    "so it can be compiled again",
                )
            },
        )
    }

    fn prune_artifacts(&self, keep_fingerprint: &str) -> Result<u64, StoreError> {
        self.guarded(
            || "pruning artifacts".into(),
            || {
                let mut stale = Vec::new();
                for key in self.artifacts.iter().keys() {
                    let key = key.map_err(sled_err(|| "listing artifacts".into()))?;
                    if key.get(32..) != Some(keep_fingerprint.as_bytes()) {
                        stale.push(key);
                    }
                }
                (&self.artifacts, &self.chunks)
                    .transaction(|(artifacts, chunks)| {
                        for key in &stale {
                            if let Some(raw) = artifacts.remove(key)?
                                && let Ok(header) = Header::decode(&raw)
                            {
                                objects::remove_chunks(chunks, &header)?;
                            }
                        }
                        Ok::<_, ConflictableTransactionError<Infallible>>(())
                    })
                    .map_err(tx_err(|| {
                        format!("removing artifacts not built for engine `{keep_fingerprint}`")
                    }))?;
                let removed = stale.len() as u64;
                if removed > 0 {
                    info!(removed, keep = keep_fingerprint, "store.prune_artifacts");
                }
                Ok(removed)
            },
        )
    }

    fn journal(&self) -> Result<Journal, StoreError> {
        self.guarded(
            || "reading the desired-state journal".into(),
            || {
                // One transaction so a concurrent commit cannot be seen half-way.
                let (current, previous) = self
                    .journal
                    .transaction(|tx| {
                        Ok::<_, ConflictableTransactionError<Infallible>>((
                            tx.get(CURRENT)?,
                            tx.get(PREVIOUS)?,
                        ))
                    })
                    .map_err(tx_err(|| "reading the desired-state journal".into()))?;
                Ok(Journal {
                    current: journal_entry("current", current.as_deref()),
                    previous: journal_entry("previous", previous.as_deref()),
                })
            },
        )
    }

    #[instrument(name = "store.commit_desired", skip_all, fields(bytes = doc.len(), generation), err)]
    fn commit_desired(&self, doc: &[u8]) -> Result<u64, StoreError> {
        self.guarded(
            || "committing to the desired-state journal".into(),
            || {
                let (generation, replaced_corrupt) = self
                    .journal
                    .transaction(|tx| {
                        let current = tx.get(CURRENT)?;
                        let previous = tx.get(PREVIOUS)?;
                        let counter = tx
                            .get(GENERATION)?
                            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                            .map_or(0, u64::from_be_bytes);
                        let generation_of = |raw: &Option<sled::IVec>| {
                            raw.as_deref()
                                .and_then(|r| decode_entry(r).ok())
                                .map(|(g, _)| g)
                        };
                        let current_generation = generation_of(&current);
                        let next = counter
                            .max(current_generation.unwrap_or(0))
                            .max(generation_of(&previous).unwrap_or(0))
                            + 1;
                        // A corrupt current document is dropped rather than shifted into
                        // `previous`, which keeps the last good document for rollback.
                        let replaced_corrupt = current.is_some() && current_generation.is_none();
                        if let (Some(current), Some(_)) = (current, current_generation) {
                            tx.insert(PREVIOUS, current)?;
                        }
                        tx.insert(CURRENT, encode_entry(next, doc))?;
                        tx.insert(GENERATION, &next.to_be_bytes()[..])?;
                        Ok::<_, ConflictableTransactionError<Infallible>>((next, replaced_corrupt))
                    })
                    .map_err(tx_err(|| "committing to the desired-state journal".into()))?;
                if replaced_corrupt {
                    warn!(
                        generation,
                        "store.journal_corrupt: replaced a corrupt current entry"
                    );
                }
                Span::current().record("generation", generation);
                self.sync()?;
                Ok(generation)
            },
        )
    }

    fn kv_get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.guarded(
            || format!("reading key `{key}` in kv namespace `{ns}`"),
            || {
                let Some(tree) = self.existing_kv_tree(ns)? else {
                    return Ok(None);
                };
                tree.get(key)
                    .map(|v| v.map(|v| v.to_vec()))
                    .map_err(sled_err(|| {
                        format!("reading key `{key}` in kv namespace `{ns}`")
                    }))
            },
        )
    }

    fn kv_set(&self, ns: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.guarded(
            || format!("writing key `{key}` in kv namespace `{ns}`"),
            || {
                let name = Self::kv_tree_name(ns)?;
                let tree = self
                    .db
                    .open_tree(name)
                    .map_err(sled_err(|| format!("opening kv namespace `{ns}`")))?;
                tree.insert(key, value).map_err(sled_err(|| {
                    format!("writing key `{key}` in kv namespace `{ns}`")
                }))?;
                Ok(())
            },
        )
    }

    fn kv_delete(&self, ns: &str, key: &str) -> Result<bool, StoreError> {
        self.guarded(
            || format!("deleting key `{key}` in kv namespace `{ns}`"),
            || {
                let Some(tree) = self.existing_kv_tree(ns)? else {
                    return Ok(false);
                };
                tree.remove(key)
                    .map(|old| old.is_some())
                    .map_err(sled_err(|| {
                        format!("deleting key `{key}` in kv namespace `{ns}`")
                    }))
            },
        )
    }

    fn kv_increment(&self, ns: &str, key: &str, delta: u64) -> Result<u64, StoreError> {
        self.guarded(
            || format!("incrementing key `{key}` in kv namespace `{ns}`"),
            || {
                let name = Self::kv_tree_name(ns)?;
                let tree = self
                    .db
                    .open_tree(name)
                    .map_err(sled_err(|| format!("opening kv namespace `{ns}`")))?;
                let action = || format!("incrementing key `{key}` in kv namespace `{ns}`");
                // Compare-and-swap until no other writer got in between.
                loop {
                    let old = tree.get(key).map_err(sled_err(action))?;
                    let current = match &old {
                        None => 0,
                        Some(bytes) => std::str::from_utf8(bytes)
                            .ok()
                            .and_then(|t| t.parse::<u64>().ok())
                            .ok_or_else(|| StoreError::Invalid {
                                what: "counter",
                                value: format!("{ns}/{key}"),
                                reason: "its value is not a decimal number",
                            })?,
                    };
                    let new = current
                        .checked_add(delta)
                        .ok_or_else(|| StoreError::Invalid {
                            what: "counter",
                            value: format!("{ns}/{key}"),
                            reason: "adding the delta overflows a u64",
                        })?;
                    let swapped = tree
                        .compare_and_swap(key, old, Some(new.to_string().into_bytes()))
                        .map_err(sled_err(action))?;
                    if swapped.is_ok() {
                        return Ok(new);
                    }
                }
            },
        )
    }

    fn kv_keys(&self, ns: &str) -> Result<Vec<String>, StoreError> {
        self.guarded(
            || format!("listing kv namespace `{ns}`"),
            || {
                let Some(tree) = self.existing_kv_tree(ns)? else {
                    return Ok(Vec::new());
                };
                tree.iter()
                    .keys()
                    .map(|key| {
                        let key =
                            key.map_err(sled_err(|| format!("listing kv namespace `{ns}`")))?;
                        String::from_utf8(key.to_vec()).map_err(|_| StoreError::Corrupt {
                            what: format!("a key in kv namespace `{ns}`"),
                            detail: format!("it is not UTF-8 ({} bytes)", key.len()),
                        })
                    })
                    .collect()
            },
        )
    }

    fn kv_drop(&self, ns: &str) -> Result<(), StoreError> {
        self.guarded(
            || format!("dropping kv namespace `{ns}`"),
            || {
                let name = Self::kv_tree_name(ns)?;
                let existed = self
                    .db
                    .drop_tree(name)
                    .map_err(sled_err(|| format!("dropping kv namespace `{ns}`")))?;
                if existed {
                    info!(ns, "store.kv_drop");
                }
                Ok(())
            },
        )
    }

    #[instrument(name = "store.sync", level = "debug", skip_all, err)]
    fn sync(&self) -> Result<(), StoreError> {
        self.guarded(
            || format!("syncing `{}`", self.path.display()),
            || self.flush_and_sync(),
        )
    }

    #[instrument(name = "store.outbox_submit", level = "debug", skip_all, fields(stream = %record.stream))]
    fn outbox_submit(&self, record: &OutboxRecord) -> OutboxReceipt {
        // Commits run under `guarded` on the outbox's threads; nothing here touches sled.
        self.outbox.submit(record)
    }

    fn outbox_read(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        self.guarded(
            || format!("reading the outbox after {after}"),
            || self.outbox.read(after, limit),
        )
    }

    #[instrument(name = "store.outbox_ack", level = "debug", skip(self), err)]
    fn outbox_ack(&self, through: u64) -> Result<u64, StoreError> {
        self.guarded(
            || format!("acknowledging outbox records to {through}"),
            || self.outbox.ack(through),
        )
    }

    fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        self.guarded(|| "reading the outbox stats".into(), || self.outbox.stats())
    }

    fn outbox_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.outbox.watch()
    }

    fn outbox_recent(&self, limit: usize) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        self.guarded(
            || "reading the outbox".to_string(),
            || self.outbox.recent(limit),
        )
    }

    fn outbox_len(&self) -> Result<u64, StoreError> {
        Ok(self.outbox.len())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for dir in [self.path.clone(), self.path.join(SLED_BLOB_DIR)] {
            for entry in std::fs::read_dir(&dir).map_err(io_err("list", &dir))? {
                let entry = entry.map_err(io_err("list", &dir))?;
                match entry.metadata() {
                    Ok(meta) if meta.is_file() => total += allocated(&meta),
                    Ok(_) => {}
                    // sled removes old blob files and snapshots at any time.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("inspect", &entry.path())(e)),
                }
            }
        }
        Ok(total)
    }
}

#[cfg(unix)]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

#[cfg(not(unix))]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.len()
}

#[cfg(test)]
mod tests {
    //! Corruption tests write to sled's trees directly, below the `Store` API.

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn open(dir: &Path) -> Result<SledStore, StoreError> {
        SledStore::open(dir, &SledOptions::default())
    }

    /// Damages a stored object below the `Store` API.
    type Damage = dyn Fn(&SledStore, &Header) -> sled::Result<()>;

    fn header(tree: &Tree, key: &[u8]) -> Result<Header, Box<dyn std::error::Error>> {
        let raw = tree.get(key)?.ok_or("no header")?;
        Ok(Header::decode(&raw)?)
    }

    fn chunks_of(store: &SledStore, id: u64) -> usize {
        store.chunks.scan_prefix(id.to_be_bytes()).count()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn corrupt_blob_is_reported_removed_and_can_be_stored_again() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = open(dir.path())?;
        let bytes = pattern(3 * objects::CHUNK_SIZE + 100, 1);
        let digest = store.put_blob(&bytes, None)?;
        let stored = header(&store.blobs, digest.as_bytes())?;
        assert_eq!(chunks_of(&store, stored.id), 4);

        // One flipped bit in the second chunk.
        let key = objects::chunk_key(stored.id, 1);
        let mut chunk = store.chunks.get(key)?.ok_or("no chunk")?.to_vec();
        chunk[17] ^= 0x01;
        store.chunks.insert(key, chunk)?;

        let err = store
            .get_blob(&digest)
            .expect_err("a corrupt blob must not be returned");
        assert!(err.is_corrupt(), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&format!("blob {digest} is corrupt")),
            "{message}"
        );
        assert!(message.contains("bytes hash to"), "{message}");
        assert!(message.contains("removed"), "{message}");

        assert!(!store.has_blob(&digest)?);
        assert_eq!(store.get_blob(&digest)?, None);
        assert!(store.blobs()?.is_empty());
        assert_eq!(chunks_of(&store, stored.id), 0, "its chunks are freed");

        assert_eq!(store.put_blob(&bytes, Some(&digest))?, digest);
        assert_eq!(store.get_blob(&digest)?, Some(bytes));
        Ok(())
    }

    #[test]
    fn a_blob_header_for_other_bytes_is_corrupt() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = open(dir.path())?;
        let a = store.put_blob(b"component a", None)?;
        let b = store.put_blob(b"component b", None)?;
        let b_header = store.blobs.get(b.as_bytes())?.ok_or("no header")?;
        store.blobs.insert(a.as_bytes(), b_header)?;
        let err = store.get_blob(&a).expect_err("wrong bytes for the digest");
        let message = err.to_string();
        assert!(
            message.contains(&format!("blob {a} is corrupt")),
            "{message}"
        );
        assert!(message.contains(&format!("hash to {b}")), "{message}");
        assert_eq!(store.get_blob(&a)?, None);
        assert_eq!(store.get_blob(&b)?, Some(b"component b".to_vec()));
        Ok(())
    }

    #[test]
    fn corrupt_artifacts_are_reported_and_removed() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = open(dir.path())?;
        let digest = Digest::of(b"component");
        let artifact = pattern(2 * objects::CHUNK_SIZE + 1000, 7);
        let key = artifact_key(&digest, "engine-1")?;
        let what = format!("artifact of blob {digest} for engine `engine-1` is corrupt");

        let damage: [(&str, &Damage, &str); 5] = [
            (
                "torn last chunk",
                &|s, h| {
                    let k = objects::chunk_key(h.id, 2);
                    let c = s.chunks.get(k)?.unwrap_or_default();
                    s.chunks.insert(k, &c[..c.len() - 100]).map(drop)
                },
                &format!("hold {} of the", artifact.len() - 100),
            ),
            (
                "missing last chunk",
                &|s, h| s.chunks.remove(objects::chunk_key(h.id, 2)).map(drop),
                &format!("hold {} of the", 2 * objects::CHUNK_SIZE),
            ),
            (
                "missing middle chunk",
                &|s, h| s.chunks.remove(objects::chunk_key(h.id, 1)).map(drop),
                "chunk 1 of 3 is missing",
            ),
            (
                "flipped bit",
                &|s, h| {
                    let k = objects::chunk_key(h.id, 0);
                    let mut c = s.chunks.get(k)?.unwrap_or_default().to_vec();
                    c[100] ^= 0x80;
                    s.chunks.insert(k, c).map(drop)
                },
                "bytes hash to",
            ),
            (
                "damaged header",
                &|s, _| {
                    let k = artifact_key(&Digest::of(b"component"), "engine-1").unwrap_or_default();
                    s.artifacts.insert(k, &b"short"[..]).map(drop)
                },
                "its header is 5 bytes",
            ),
        ];
        for (case, damage, expected) in damage {
            store.put_artifact(&digest, "engine-1", &artifact)?;
            let stored = header(&store.artifacts, &key)?;
            damage(&store, &stored)?;
            let err = store.get_artifact(&digest, "engine-1").expect_err(case);
            assert!(err.is_corrupt(), "{case}: {err}");
            let message = err.to_string();
            assert!(message.contains(&what), "{case}: {message}");
            assert!(message.contains(expected), "{case}: {message}");
            assert_eq!(store.get_artifact(&digest, "engine-1")?, None, "{case}");
            if case != "damaged header" {
                assert_eq!(chunks_of(&store, stored.id), 0, "{case}: chunks freed");
            }
        }
        Ok(())
    }

    #[test]
    fn replaced_and_removed_objects_free_their_chunks() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = open(dir.path())?;
        let digest = store.put_blob(&pattern(objects::CHUNK_SIZE * 2, 3), None)?;
        store.put_artifact(&digest, "e1", &pattern(objects::CHUNK_SIZE * 5, 4))?;
        store.put_artifact(&digest, "e2", &pattern(10, 5))?;
        assert_eq!(store.chunks.len(), 2 + 5 + 1);
        store.put_artifact(&digest, "e1", &pattern(objects::CHUNK_SIZE + 1, 6))?;
        assert_eq!(
            store.chunks.len(),
            2 + 2 + 1,
            "the replaced artifact's chunks are gone"
        );
        assert_eq!(store.prune_artifacts("e1")?, 1);
        assert_eq!(store.chunks.len(), 2 + 2);
        store.remove_blob(&digest)?;
        assert_eq!(store.chunks.len(), 0);
        assert!(store.artifacts.is_empty() && store.blobs.is_empty());
        Ok(())
    }

    #[test]
    fn corrupt_journal_current_is_reported_and_previous_stays_usable() -> TestResult {
        let dir = tempfile::tempdir()?;
        {
            let store = open(dir.path())?;
            assert_eq!(store.commit_desired(b"{\"revision\":1}")?, 1);
            assert_eq!(store.commit_desired(b"{\"revision\":2}")?, 2);
            let mut raw = store
                .journal
                .get(CURRENT)?
                .ok_or("no current entry")?
                .to_vec();
            let last = raw.len() - 2;
            raw[last] ^= 0xFF;
            store.journal.insert(CURRENT, raw)?;
            store.sync()?;
        }

        let store = open(dir.path())?;
        let journal = store.journal()?;
        let err = journal.current.as_ref().expect_err("current is corrupt");
        assert!(err.is_corrupt());
        assert!(
            err.to_string().contains("journal current entry is corrupt"),
            "{err}"
        );
        let previous = journal.previous.as_ref().map_err(|e| e.to_string())?;
        let previous = previous.as_ref().ok_or("previous missing")?;
        assert_eq!(
            (previous.generation, &previous.doc[..]),
            (1, &b"{\"revision\":1}"[..])
        );
        assert_eq!(journal.latest_good(), Some(previous));

        // The next commit replaces the corrupt entry and keeps the good one for rollback.
        assert_eq!(store.commit_desired(b"{\"revision\":3}")?, 3);
        let journal = store.journal()?;
        let current = journal
            .current
            .map_err(|e| e.to_string())?
            .ok_or("no current")?;
        let previous = journal
            .previous
            .map_err(|e| e.to_string())?
            .ok_or("no previous")?;
        assert_eq!(
            (current.generation, &current.doc[..]),
            (3, &b"{\"revision\":3}"[..])
        );
        assert_eq!(
            (previous.generation, &previous.doc[..]),
            (1, &b"{\"revision\":1}"[..])
        );
        Ok(())
    }

    #[test]
    fn large_blobs_are_chunked_and_survive_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let big = pattern(4 * 1024 * 1024 + 1, 9);
        let digest = {
            let store = open(dir.path())?;
            let digest = store.put_blob(&big, None)?;
            let stored = header(&store.blobs, digest.as_bytes())?;
            assert_eq!(chunks_of(&store, stored.id), 1025);
            digest
        };
        // No sled page holds the whole value (sled writes pages over ~128 KiB to files).
        let largest_page_file = std::fs::read_dir(dir.path().join(SLED_BLOB_DIR))?
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0);
        assert!(largest_page_file < 1024 * 1024, "{largest_page_file} bytes");

        let store = open(dir.path())?;
        assert_eq!(store.get_blob(&digest)?, Some(big));
        assert_eq!(store.blobs()?, vec![(digest, 4 * 1024 * 1024 + 1)]);
        Ok(())
    }

    #[test]
    fn large_journal_documents_go_to_sled_blob_files_that_sync_covers() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = open(dir.path())?;
        let doc = pattern(600 * 1024, 2);
        store.commit_desired(&doc)?;
        let files = std::fs::read_dir(dir.path().join(SLED_BLOB_DIR))?
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.len() >= doc.len() as u64)
            .count();
        assert!(files >= 1, "a 600 KiB value should be in a sled blob file");
        // commit_desired synced them; a second sync has nothing new to sync.
        assert_eq!(
            store
                .disk
                .blob_files
                .sync(&dir.path().join(SLED_BLOB_DIR))?,
            0
        );
        Ok(())
    }

    #[test]
    fn a_different_format_marker_is_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        {
            let store = open(dir.path())?;
            store
                .db
                .open_tree(META)?
                .insert(FORMAT_KEY, &b"perch-store/99"[..])?;
            store.sync()?;
        }
        let err = open(dir.path()).expect_err("unknown format must be refused");
        let message = err.to_string();
        assert!(
            message.contains("perch-store/99") && message.contains(FORMAT),
            "{message}"
        );
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        Ok(())
    }

    fn outbox_record(n: u64, payload_len: usize) -> OutboxRecord {
        OutboxRecord {
            component: "c".into(),
            stream: "s".into(),
            timestamp_ms: n,
            payload: pattern(payload_len, n as u8),
        }
    }

    #[test]
    fn large_outbox_records_go_to_sled_blob_files_that_the_commit_syncs() -> TestResult {
        let dir = tempfile::tempdir()?;
        let options = SledOptions {
            outbox_max_age: None,
            ..SledOptions::default()
        };
        let store = SledStore::open(dir.path(), &options)?;
        // sled splits a leaf at 17 entries, not by size: 20 KiB records make leaf pages
        // over its ~128 KiB blob threshold.
        for n in 1..=60 {
            store.outbox_append(&outbox_record(n, 20 * 1024))?;
        }
        let files = std::fs::read_dir(dir.path().join(SLED_BLOB_DIR))?.count();
        assert!(files >= 1, "outbox leaf pages should be in sled blob files");
        // Every append synced them; nothing is left to sync.
        assert_eq!(
            store
                .disk
                .blob_files
                .sync(&dir.path().join(SLED_BLOB_DIR))?,
            0
        );
        drop(store);
        let store = SledStore::open(dir.path(), &options)?;
        assert_eq!(store.outbox_read(0, 100)?.len(), 60);
        Ok(())
    }

    #[test]
    fn an_outbox_without_a_high_water_mark_continues_after_its_last_record() -> TestResult {
        let dir = tempfile::tempdir()?;
        let options = SledOptions {
            outbox_max_age: None,
            ..SledOptions::default()
        };
        {
            let store = SledStore::open(dir.path(), &options)?;
            for n in 1..=3 {
                store.outbox_append(&outbox_record(n, 10))?;
            }
            // As written by a build before the high-water mark existed.
            store.db.open_tree(META)?.remove(outbox::LAST_SEQ_KEY)?;
            store.sync()?;
        }
        let store = SledStore::open(dir.path(), &options)?;
        assert_eq!(store.outbox_stats()?.last_seq, 3);
        assert_eq!(store.outbox_append(&outbox_record(4, 10))?, 4);
        Ok(())
    }

    #[test]
    fn an_outbox_of_one_record_per_key_moves_into_chunks_on_open() -> TestResult {
        let dir = tempfile::tempdir()?;
        let options = SledOptions {
            outbox_max_age: None,
            ..SledOptions::default()
        };
        // Records 5, 6, 7 and 10 as a store before chunks kept them (a failed commit left
        // the gap), written behind the store's back.
        let seqs = [5u64, 6, 7, 10];
        {
            let store = SledStore::open(dir.path(), &options)?;
            let legacy = store.db.open_tree(OUTBOX_LEGACY)?;
            for n in seqs {
                legacy.insert(n.to_be_bytes(), outbox_record(n, 100).encode()?)?;
            }
            store
                .db
                .open_tree(META)?
                .insert(outbox::LAST_SEQ_KEY, &10u64.to_be_bytes()[..])?;
            store.sync()?;
        }
        let expected: Vec<_> = seqs.iter().map(|&n| (n, outbox_record(n, 100))).collect();
        {
            let store = SledStore::open(dir.path(), &options)?;
            assert!(
                !store
                    .db
                    .tree_names()
                    .iter()
                    .any(|n| n == OUTBOX_LEGACY.as_bytes()),
                "the old tree is gone"
            );
            assert_eq!(store.outbox_read(0, 100)?, expected);
            let stats = store.outbox_stats()?;
            assert_eq!(
                (stats.len, stats.first_seq, stats.last_seq),
                (4, Some(5), 10)
            );
            assert_eq!(store.outbox_append(&outbox_record(11, 100))?, 11);
        }
        let store = SledStore::open(dir.path(), &options)?;
        let mut expected = expected;
        expected.push((11, outbox_record(11, 100)));
        assert_eq!(store.outbox_read(0, 100)?, expected);
        Ok(())
    }

    #[test]
    fn an_acknowledgement_inside_a_chunk_holds_across_a_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let options = SledOptions {
            outbox_max_age: None,
            ..SledOptions::default()
        };
        {
            let store = SledStore::open(dir.path(), &options)?;
            // Submitted together: they share commits, so chunks of many records.
            let receipts: Vec<_> = (1..=100)
                .map(|n| store.outbox_submit(&outbox_record(n, 100)))
                .collect();
            for receipt in receipts {
                receipt.wait()?;
            }
            assert!(
                store.db.open_tree(OUTBOX)?.len() < 50,
                "records share chunks"
            );
            assert_eq!(store.outbox_ack(37)?, 37);
            assert_eq!(store.outbox_read(0, 1)?[0].0, 38);
            store.sync()?;
        }
        let store = SledStore::open(dir.path(), &options)?;
        let stats = store.outbox_stats()?;
        assert_eq!(
            (stats.len, stats.bytes, stats.first_seq),
            (
                63,
                63 * outbox_record(0, 100).encode()?.len() as u64,
                Some(38)
            )
        );
        let read = store.outbox_read(0, 1000)?;
        assert_eq!(read.first().map(|(seq, _)| *seq), Some(38));
        assert_eq!(read.len(), 63);
        assert_eq!(
            store
                .outbox_recent(3)?
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>(),
            [98, 99, 100]
        );
        Ok(())
    }
}
