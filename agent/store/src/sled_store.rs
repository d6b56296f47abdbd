//! [`SledStore`]: the [`Store`] on one sled 0.34 database.
//!
//! Layout (sled trees):
//! - `perch/blobs`: digest (32 bytes) -> blob bytes, verified against the key on read.
//! - `perch/blob-sizes`: digest -> size (u64 BE), written in the same transaction as the
//!   blob, so listing and `has_blob` never read blob bytes.
//! - `perch/artifacts`: digest ++ engine fingerprint -> sealed artifact ([`crate::frame`]).
//! - `perch/journal`: `current`, `previous` -> sealed (generation u64 BE ++ document);
//!   `generation` -> the last generation handed out.
//! - `perch/meta`: `format` -> [`FORMAT`].
//! - `kv/<namespace>`: one tree per component namespace, keys are the UTF-8 keys.

use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};

use perch_core::Digest;
use sled::{Transactional, Tree};
use sled::transaction::ConflictableTransactionError;
use tracing::{Span, debug, info, instrument, warn};

use crate::durable::{BlobFiles, sync_dir, sync_file};
use crate::error::{io_err, sled_err, tx_err};
use crate::frame;
use crate::{Journal, JournalEntry, Store, StoreError};

/// sled's page cache size unless configured: sled's own default (1 GiB) is sized for
/// servers; a few MiB keeps a small device's RSS down while the working set (the journal,
/// kv data, the blob being loaded) still fits.
pub const DEFAULT_CACHE_CAPACITY: u64 = 4 * 1024 * 1024;

/// How often sled's background thread flushes and fsyncs `db`, in milliseconds (sled's own
/// default). It bounds what a power cut can lose of writes nobody called
/// [`Store::sync`] for; acknowledged writes do not depend on it.
pub const DEFAULT_FLUSH_EVERY_MS: u64 = 500;

/// The on-disk format this build reads and writes, recorded in the store on creation.
pub const FORMAT: &str = "perch-store/1";

const BLOBS: &str = "perch/blobs";
const BLOB_SIZES: &str = "perch/blob-sizes";
const ARTIFACTS: &str = "perch/artifacts";
const JOURNAL: &str = "perch/journal";
const META: &str = "perch/meta";
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledOptions {
    /// sled's page cache, in bytes.
    pub cache_capacity: u64,
    /// sled's background flush interval in milliseconds; `None` turns the thread off (only
    /// explicit syncs then reach the disk before the store is dropped).
    pub flush_every_ms: Option<u64>,
}

impl Default for SledOptions {
    fn default() -> Self {
        Self {
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            flush_every_ms: Some(DEFAULT_FLUSH_EVERY_MS),
        }
    }
}

/// The [`Store`] on a sled 0.34 database in one directory.
///
/// sled keeps its log in `<dir>/db`, values too large for a log segment (over ~128 KiB
/// with sled's 512 KiB segments) in `<dir>/blobs/<lsn>`, its settings in `<dir>/conf` and a
/// page-table snapshot in `<dir>/snap.<lsn>`. [`Store::sync`] calls sled's `flush()` and then
/// `fdatasync`s the blob files not synced before, the `blobs` directory when its entries
/// changed, and `db`; opening also syncs `conf` and the store directory.
pub struct SledStore {
    path: PathBuf,
    options: SledOptions,
    db: sled::Db,
    blobs: Tree,
    blob_sizes: Tree,
    artifacts: Tree,
    journal: Tree,
    blob_files: BlobFiles,
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

impl SledStore {
    /// Opens the store in directory `path`, creating it when it does not exist. Refuses a
    /// path that is a file, a non-empty directory without a sled database, or a store of
    /// another format.
    pub fn open(path: impl AsRef<Path>, options: &SledOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let created = prepare_dir(&path)?;

        let mut config = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_capacity)
            .mode(sled::Mode::LowSpace);
        config = config.flush_every_ms(options.flush_every_ms);
        let db = config.open().map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;

        let open_tree = |name: &'static str| {
            db.open_tree(name)
                .map_err(sled_err(|| format!("opening tree `{name}` in `{}`", path.display())))
        };
        let meta = open_tree(META)?;
        let store = Self {
            blobs: open_tree(BLOBS)?,
            blob_sizes: open_tree(BLOB_SIZES)?,
            artifacts: open_tree(ARTIFACTS)?,
            journal: open_tree(JOURNAL)?,
            blob_files: BlobFiles::default(),
            options: options.clone(),
            path,
            db,
        };
        store.check_format(&meta)?;

        // Make the creation itself durable: sled writes `conf` once without syncing it,
        // renames its snapshot into place without syncing the directory, and a new store
        // directory is an entry in its parent.
        store.sync()?;
        sync_file(&store.path.join(SLED_CONF_FILE))?;
        sync_dir(&store.path)?;
        if created && let Some(parent) = store.path.parent().filter(|p| !p.as_os_str().is_empty()) {
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

    fn check_format(&self, meta: &Tree) -> Result<(), StoreError> {
        let found = meta
            .get(FORMAT_KEY)
            .map_err(sled_err(|| "reading the store format marker".into()))?;
        match found {
            Some(found) if found == FORMAT.as_bytes() => Ok(()),
            Some(found) => Err(StoreError::UnsupportedFormat {
                path: self.path.clone(),
                found: String::from_utf8_lossy(&found).into_owned(),
                expected: FORMAT,
            }),
            None => {
                meta.insert(FORMAT_KEY, FORMAT.as_bytes())
                    .map_err(sled_err(|| "writing the store format marker".into()))?;
                Ok(())
            }
        }
    }

    fn remove_corrupt_blob(&self, digest: &Digest, stored: &sled::IVec) -> Result<bool, StoreError> {
        let key = digest.as_bytes();
        // Only remove what was read: a concurrent put may already have replaced it.
        (&self.blobs, &self.blob_sizes)
            .transaction(|(blobs, sizes)| {
                if blobs.get(key)?.as_ref() == Some(stored) {
                    blobs.remove(key)?;
                    sizes.remove(key)?;
                    Ok::<_, ConflictableTransactionError<Infallible>>(true)
                } else {
                    Ok(false)
                }
            })
            .map_err(tx_err(|| format!("removing corrupt blob {digest}")))
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

/// Checks that `path` can hold a store; creates it when missing (returns `true` then).
fn prepare_dir(path: &Path) -> Result<bool, StoreError> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => Err(StoreError::NotAStore {
            path: path.to_path_buf(),
            reason: "it is not a directory",
        }),
        Ok(_) => {
            let mut has_sled_file = false;
            let mut has_other = false;
            for entry in std::fs::read_dir(path).map_err(io_err("list", path))? {
                let name = entry.map_err(io_err("list", path))?.file_name();
                if name == SLED_DB_FILE || name == SLED_CONF_FILE {
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
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(io_err("create directory", path))?;
            Ok(true)
        }
        Err(e) => Err(io_err("inspect", path)(e)),
    }
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
            .blob_sizes
            .contains_key(key)
            .map_err(sled_err(|| format!("looking up blob {actual}")))?;
        if present {
            return Ok(actual);
        }
        let size = (bytes.len() as u64).to_be_bytes();
        (&self.blobs, &self.blob_sizes)
            .transaction(|(blobs, sizes)| {
                blobs.insert(&key[..], bytes)?;
                sizes.insert(&key[..], &size[..])?;
                Ok::<_, ConflictableTransactionError<Infallible>>(())
            })
            .map_err(tx_err(|| format!("storing blob {actual}")))?;
        debug!(digest = %actual, size = bytes.len(), "store.put_blob");
        Ok(actual)
    }

    fn get_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let stored = self
            .blobs
            .get(digest.as_bytes())
            .map_err(sled_err(|| format!("reading blob {digest}")))?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        if digest.matches(&stored) {
            return Ok(Some(stored.to_vec()));
        }
        let actual = Digest::of(&stored);
        self.remove_corrupt_blob(digest, &stored)?;
        warn!(digest = %digest, actual = %actual, "store.blob_corrupt: removed");
        Err(StoreError::Corrupt {
            what: format!("blob {digest}"),
            detail: format!(
                "its {} bytes hash to {actual}; the entry was removed so it can be fetched again",
                stored.len()
            ),
        })
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        self.blob_sizes
            .contains_key(digest.as_bytes())
            .map_err(sled_err(|| format!("looking up blob {digest}")))
    }

    fn remove_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let key = digest.as_bytes();
        let artifact_keys = self
            .artifacts
            .scan_prefix(key)
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(sled_err(|| format!("listing artifacts of blob {digest}")))?;
        (&self.blobs, &self.blob_sizes, &self.artifacts)
            .transaction(|(blobs, sizes, artifacts)| {
                blobs.remove(key)?;
                sizes.remove(key)?;
                for artifact in &artifact_keys {
                    artifacts.remove(artifact)?;
                }
                Ok::<_, ConflictableTransactionError<Infallible>>(())
            })
            .map_err(tx_err(|| format!("removing blob {digest}")))?;
        debug!(digest = %digest, artifacts = artifact_keys.len(), "store.remove_blob");
        Ok(())
    }

    fn blobs(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        self.blob_sizes
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(sled_err(|| "listing blobs".into()))?;
                let digest = digest_from_key(&key, BLOB_SIZES)?;
                let size = <[u8; 8]>::try_from(value.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        what: format!("size record of blob {digest}"),
                        detail: format!("it is {} bytes, not 8", value.len()),
                    })?;
                Ok((digest, size))
            })
            .collect()
    }

    fn put_artifact(&self, digest: &Digest, fingerprint: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let key = artifact_key(digest, fingerprint)?;
        self.artifacts
            .insert(key, frame::seal(bytes))
            .map_err(sled_err(|| {
                format!("storing the artifact of blob {digest} for engine `{fingerprint}`")
            }))?;
        debug!(digest = %digest, fingerprint, size = bytes.len(), "store.put_artifact");
        Ok(())
    }

    fn get_artifact(&self, digest: &Digest, fingerprint: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = artifact_key(digest, fingerprint)?;
        let what = || format!("artifact of blob {digest} for engine `{fingerprint}`");
        let stored = self
            .artifacts
            .get(&key)
            .map_err(sled_err(|| format!("reading the {}", what())))?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let detail = match frame::open(&stored) {
            Ok(artifact) => return Ok(Some(artifact.to_vec())),
            Err(detail) => detail,
        };
        // Remove it only if nobody replaced it meanwhile; either way this read failed.
        let _ = self
            .artifacts
            .compare_and_swap(&key, Some(&stored), None::<&[u8]>)
            .map_err(sled_err(|| format!("removing the corrupt {}", what())))?;
        warn!(digest = %digest, fingerprint, "store.artifact_corrupt: removed");
        Err(StoreError::Corrupt {
            what: what(),
            detail: format!("{detail}; the entry was removed so it can be compiled again"),
        })
    }

    fn prune_artifacts(&self, keep_fingerprint: &str) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for key in self.artifacts.iter().keys() {
            let key = key.map_err(sled_err(|| "listing artifacts".into()))?;
            if key.get(32..) != Some(keep_fingerprint.as_bytes()) {
                batch.remove(key);
                removed += 1;
            }
        }
        self.artifacts
            .apply_batch(batch)
            .map_err(sled_err(|| format!("removing artifacts not built for engine `{keep_fingerprint}`")))?;
        if removed > 0 {
            info!(removed, keep = keep_fingerprint, "store.prune_artifacts");
        }
        Ok(removed)
    }

    fn journal(&self) -> Result<Journal, StoreError> {
        // One transaction so a concurrent commit cannot be seen half-way.
        let (current, previous) = self
            .journal
            .transaction(|tx| {
                Ok::<_, ConflictableTransactionError<Infallible>>((tx.get(CURRENT)?, tx.get(PREVIOUS)?))
            })
            .map_err(tx_err(|| "reading the desired-state journal".into()))?;
        Ok(Journal {
            current: journal_entry("current", current.as_deref()),
            previous: journal_entry("previous", previous.as_deref()),
        })
    }

    #[instrument(name = "store.commit_desired", skip_all, fields(bytes = doc.len(), generation), err)]
    fn commit_desired(&self, doc: &[u8]) -> Result<u64, StoreError> {
        let (generation, replaced_corrupt) = self
            .journal
            .transaction(|tx| {
                let current = tx.get(CURRENT)?;
                let previous = tx.get(PREVIOUS)?;
                let counter = tx
                    .get(GENERATION)?
                    .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                    .map_or(0, u64::from_be_bytes);
                let generation_of =
                    |raw: &Option<sled::IVec>| raw.as_deref().and_then(|r| decode_entry(r).ok()).map(|(g, _)| g);
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
            warn!(generation, "store.journal_corrupt: replaced a corrupt current entry");
        }
        Span::current().record("generation", generation);
        self.sync()?;
        Ok(generation)
    }

    fn kv_get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(tree) = self.existing_kv_tree(ns)? else {
            return Ok(None);
        };
        tree.get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(sled_err(|| format!("reading key `{key}` in kv namespace `{ns}`")))
    }

    fn kv_set(&self, ns: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let name = Self::kv_tree_name(ns)?;
        let tree = self
            .db
            .open_tree(name)
            .map_err(sled_err(|| format!("opening kv namespace `{ns}`")))?;
        tree.insert(key, value)
            .map_err(sled_err(|| format!("writing key `{key}` in kv namespace `{ns}`")))?;
        Ok(())
    }

    fn kv_delete(&self, ns: &str, key: &str) -> Result<bool, StoreError> {
        let Some(tree) = self.existing_kv_tree(ns)? else {
            return Ok(false);
        };
        tree.remove(key)
            .map(|old| old.is_some())
            .map_err(sled_err(|| format!("deleting key `{key}` in kv namespace `{ns}`")))
    }

    fn kv_keys(&self, ns: &str) -> Result<Vec<String>, StoreError> {
        let Some(tree) = self.existing_kv_tree(ns)? else {
            return Ok(Vec::new());
        };
        tree.iter()
            .keys()
            .map(|key| {
                let key = key.map_err(sled_err(|| format!("listing kv namespace `{ns}`")))?;
                String::from_utf8(key.to_vec()).map_err(|_| StoreError::Corrupt {
                    what: format!("a key in kv namespace `{ns}`"),
                    detail: format!("it is not UTF-8 ({} bytes)", key.len()),
                })
            })
            .collect()
    }

    fn kv_drop(&self, ns: &str) -> Result<(), StoreError> {
        let name = Self::kv_tree_name(ns)?;
        let existed = self
            .db
            .drop_tree(name)
            .map_err(sled_err(|| format!("dropping kv namespace `{ns}`")))?;
        if existed {
            info!(ns, "store.kv_drop");
        }
        Ok(())
    }

    #[instrument(name = "store.sync", level = "debug", skip_all, err)]
    fn sync(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(sled_err(|| format!("flushing `{}`", self.path.display())))?;
        // Blob files first: the log in `db` points at them.
        self.blob_files.sync(&self.path.join(SLED_BLOB_DIR))?;
        sync_file(&self.path.join(SLED_DB_FILE))
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

    #[test]
    fn corrupt_blob_is_reported_removed_and_can_be_stored_again() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = open(dir.path())?;
        let bytes = b"\0asm component bytes".to_vec();
        let digest = store.put_blob(&bytes, None)?;

        let mut flipped = bytes.clone();
        flipped[5] ^= 0x01;
        store.blobs.insert(digest.as_bytes(), flipped)?;

        let err = store.get_blob(&digest).expect_err("a corrupt blob must not be returned");
        assert!(err.is_corrupt(), "{err}");
        let message = err.to_string();
        assert!(message.contains(&format!("blob {digest} is corrupt")), "{message}");
        assert!(message.contains("removed"), "{message}");

        assert!(!store.has_blob(&digest)?);
        assert_eq!(store.get_blob(&digest)?, None);
        assert!(store.blobs()?.is_empty());

        assert_eq!(store.put_blob(&bytes, Some(&digest))?, digest);
        assert_eq!(store.get_blob(&digest)?, Some(bytes));
        Ok(())
    }

    #[test]
    fn corrupt_artifacts_are_reported_and_removed() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = open(dir.path())?;
        let digest = Digest::of(b"component");
        let artifact = vec![0xA5; 4096];
        let key = artifact_key(&digest, "engine-1")?;

        // Truncated, as a torn write would leave it.
        store.put_artifact(&digest, "engine-1", &artifact)?;
        let sealed = store.artifacts.get(&key)?.ok_or("artifact missing")?;
        store.artifacts.insert(&key, &sealed[..sealed.len() - 100])?;
        let err = store.get_artifact(&digest, "engine-1").expect_err("truncated");
        assert!(err.is_corrupt());
        let message = err.to_string();
        assert!(
            message.contains(&format!("artifact of blob {digest} for engine `engine-1` is corrupt")),
            "{message}"
        );
        assert!(message.contains("3996 bytes hash to"), "{message}");
        assert_eq!(store.get_artifact(&digest, "engine-1")?, None, "removed");

        // One flipped bit.
        store.put_artifact(&digest, "engine-1", &artifact)?;
        let mut flipped = store.artifacts.get(&key)?.ok_or("artifact missing")?.to_vec();
        flipped[frame::CHECKSUM_LEN + 2048] ^= 0x80;
        store.artifacts.insert(&key, flipped)?;
        assert!(store.get_artifact(&digest, "engine-1").is_err_and(|e| e.is_corrupt()));
        assert_eq!(store.get_artifact(&digest, "engine-1")?, None);

        // Shorter than a checksum.
        store.artifacts.insert(&key, &b"tiny"[..])?;
        let err = store.get_artifact(&digest, "engine-1").expect_err("too short");
        assert!(err.to_string().contains("shorter than its 32-byte checksum"), "{err}");
        Ok(())
    }

    #[test]
    fn corrupt_journal_current_is_reported_and_previous_stays_usable() -> TestResult {
        let dir = tempfile::tempdir()?;
        {
            let store = open(dir.path())?;
            assert_eq!(store.commit_desired(b"{\"revision\":1}")?, 1);
            assert_eq!(store.commit_desired(b"{\"revision\":2}")?, 2);
            let mut raw = store.journal.get(CURRENT)?.ok_or("no current entry")?.to_vec();
            let last = raw.len() - 2;
            raw[last] ^= 0xFF;
            store.journal.insert(CURRENT, raw)?;
            store.sync()?;
        }

        let store = open(dir.path())?;
        let journal = store.journal()?;
        let err = journal.current.as_ref().expect_err("current is corrupt");
        assert!(err.is_corrupt());
        assert!(err.to_string().contains("journal current entry is corrupt"), "{err}");
        let previous = journal.previous.as_ref().map_err(|e| e.to_string())?;
        let previous = previous.as_ref().ok_or("previous missing")?;
        assert_eq!((previous.generation, &previous.doc[..]), (1, &b"{\"revision\":1}"[..]));
        assert_eq!(journal.latest_good(), Some(previous));

        // The next commit replaces the corrupt entry and keeps the good one for rollback.
        assert_eq!(store.commit_desired(b"{\"revision\":3}")?, 3);
        let journal = store.journal()?;
        let current = journal.current.map_err(|e| e.to_string())?.ok_or("no current")?;
        let previous = journal.previous.map_err(|e| e.to_string())?.ok_or("no previous")?;
        assert_eq!((current.generation, &current.doc[..]), (3, &b"{\"revision\":3}"[..]));
        assert_eq!((previous.generation, &previous.doc[..]), (1, &b"{\"revision\":1}"[..]));
        Ok(())
    }

    #[test]
    fn large_values_live_in_sled_blob_files_and_survive_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let big: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let digest = {
            let store = open(dir.path())?;
            let digest = store.put_blob(&big, None)?;
            store.sync()?;
            digest
        };
        let blob_files = std::fs::read_dir(dir.path().join(SLED_BLOB_DIR))?
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.len() >= big.len() as u64)
            .count();
        assert!(blob_files >= 1, "a 1 MiB value should be in a sled blob file");

        let store = open(dir.path())?;
        assert_eq!(store.get_blob(&digest)?, Some(big));
        assert!(store.size_on_disk()? >= 1024 * 1024);
        Ok(())
    }

    #[test]
    fn a_different_format_marker_is_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        {
            let store = open(dir.path())?;
            store.db.open_tree(META)?.insert(FORMAT_KEY, &b"perch-store/99"[..])?;
            store.sync()?;
        }
        let err = open(dir.path()).expect_err("unknown format must be refused");
        let message = err.to_string();
        assert!(message.contains("perch-store/99") && message.contains(FORMAT), "{message}");
        assert!(message.contains(&dir.path().display().to_string()), "{message}");
        Ok(())
    }
}
