//! Making sled's files durable.
//!
//! sled 0.34.7 on Linux writes its log into the single file `db` and only asks the kernel to
//! start writeback (`sync_file_range`) when flushing; a real `fsync` of `db` runs only in the
//! background flusher every `flush_every_ms`. Pages (a tree node with its values) whose log
//! record is larger than about a quarter of a segment (512 KiB / 4, i.e. ~128 KiB) are
//! written to `blobs/<lsn>` files, which sled never syncs at all (`blob_io.rs`). The
//! snapshot `snap.<lsn>` is synced by sled before it is renamed into place, but the rename
//! (a directory entry) is not, and `conf` is written once without a sync. This module closes
//! those gaps.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{StoreError, io_err};

/// `fdatasync` of the file at `path`. Syncing through a fresh read-only descriptor is enough
/// on Linux: the dirty pages belong to the inode, not to the descriptor that wrote them.
pub(crate) fn sync_file(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_data())
        .map_err(io_err("fdatasync", path))
}

/// `fsync` of a directory, so that files created, renamed or removed in it stay that way.
/// Filesystems that cannot sync directories (EINVAL) are accepted as they are.
pub(crate) fn sync_dir(path: &Path) -> Result<(), StoreError> {
    match File::open(path).and_then(|f| f.sync_all()) {
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
        other => other.map_err(io_err("fsync directory", path)),
    }
}

/// sled's `blobs/` files already made durable, by name and by the length they had when they
/// were synced. sled writes each blob file once (`create_new`) and never changes it, so a
/// file is synced once; a file seen while another thread was still writing it has grown
/// since and is synced again.
#[derive(Debug, Default)]
pub(crate) struct BlobFiles {
    synced: Mutex<HashMap<OsString, u64>>,
}

impl BlobFiles {
    /// Syncs every blob file in `dir` not synced yet, then `dir` itself when files were
    /// added or removed. Returns how many files were synced.
    pub(crate) fn sync(&self, dir: &Path) -> Result<usize, StoreError> {
        let mut synced = self
            .synced
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut seen = HashMap::with_capacity(synced.len());
        let mut newly_synced = 0;
        for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let path = entry.path();
            // sled removes blob files it no longer needs at any time.
            let len = match entry.metadata() {
                Ok(meta) if meta.is_file() => meta.len(),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("inspect", &path)(e)),
            };
            let name = entry.file_name();
            if synced.get(&name) != Some(&len) {
                match File::open(&path).and_then(|f| f.sync_data()) {
                    Ok(()) => newly_synced += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("fdatasync", &path)(e)),
                }
            }
            seen.insert(name, len);
        }
        let dir_changed =
            seen.len() != synced.len() || seen.keys().any(|n| !synced.contains_key(n));
        if dir_changed {
            sync_dir(dir)?;
        }
        *synced = seen;
        Ok(newly_synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_files_are_synced_once_and_again_when_they_grow()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let files = BlobFiles::default();
        assert_eq!(files.sync(dir.path())?, 0);

        std::fs::write(dir.path().join("100"), b"abc")?;
        std::fs::write(dir.path().join("200"), b"defg")?;
        assert_eq!(files.sync(dir.path())?, 2);
        assert_eq!(
            files.sync(dir.path())?,
            0,
            "unchanged files are not synced again"
        );

        std::fs::write(dir.path().join("200"), b"defgh")?;
        std::fs::write(dir.path().join("300"), b"x")?;
        std::fs::remove_file(dir.path().join("100"))?;
        assert_eq!(files.sync(dir.path())?, 2, "the grown file and the new one");
        let known = files.synced.lock().map_err(|e| e.to_string())?.len();
        assert_eq!(known, 2, "removed files are forgotten");
        Ok(())
    }

    #[test]
    fn missing_paths_name_the_path() {
        let err = sync_file(Path::new("/nonexistent/perch/db")).expect_err("no such file");
        assert!(err.to_string().contains("/nonexistent/perch/db"), "{err}");
    }
}
