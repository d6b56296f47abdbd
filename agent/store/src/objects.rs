//! Large values (blobs, artifacts) stored as fixed-size chunks.
//!
//! sled 0.34 splits a leaf by item count (more than 16), not by bytes, and rewrites a whole
//! leaf when it consolidates it. Measured here with each blob as one value: ten 4 MiB blobs
//! ended up in one 40 MiB sled blob file, and reading one of them back loaded all 40 MiB
//! (111 ms, 134 MB peak RSS with a 4 MiB cache). So an object is a small header in its own
//! tree plus chunks of [`CHUNK_SIZE`] in the `chunks` tree under `object id ++ chunk index`:
//! reading a 4 MiB blob from a fresh process now takes ~10-13 ms and ~18 MB RSS.
//!
//! The chunk size keeps a full leaf (17 chunks) under sled's ~128 KiB threshold for writing a
//! page to its own file in `blobs/`; opening slowed with the number of such files: for
//! 40 MiB of blobs, 4 KiB chunks (no files) reopened in 45 ms, 8 KiB (26 files) in 164 ms,
//! 16 KiB (226 files) in 540 ms.

use perch_core::Digest;
use sled::transaction::{TransactionalTree, UnabortableTransactionError};

/// Bytes per chunk. Part of [`crate::FORMAT`]: removal computes chunk keys from the size.
pub(crate) const CHUNK_SIZE: usize = 4 * 1024;

/// Where an object's bytes are and what they must hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// Total size in bytes.
    pub size: u64,
    /// Key prefix of its chunks in the chunk tree.
    pub id: u64,
    /// sha256 of the whole object.
    pub checksum: Digest,
}

const HEADER_LEN: usize = 8 + 8 + 32;

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[..8].copy_from_slice(&self.size.to_be_bytes());
        out[8..16].copy_from_slice(&self.id.to_be_bytes());
        out[16..].copy_from_slice(self.checksum.as_bytes());
        out
    }

    /// The header, or why the stored bytes are not one.
    pub(crate) fn decode(raw: &[u8]) -> Result<Self, String> {
        let raw: &[u8; HEADER_LEN] = raw
            .try_into()
            .map_err(|_| format!("its header is {} bytes, not {HEADER_LEN}", raw.len()))?;
        let (size, rest) = raw.split_at(8);
        let (id, checksum) = rest.split_at(8);
        let word = |b: &[u8]| {
            let mut w = [0; 8];
            w.copy_from_slice(b);
            u64::from_be_bytes(w)
        };
        let mut sum = [0; 32];
        sum.copy_from_slice(checksum);
        Ok(Self {
            size: word(size),
            id: word(id),
            checksum: Digest::from_bytes(sum),
        })
    }

    /// How many chunks an object of this size has.
    pub(crate) fn chunk_count(&self) -> u64 {
        self.size.div_ceil(CHUNK_SIZE as u64)
    }
}

/// Key of chunk `index` of object `id`.
pub(crate) fn chunk_key(id: u64, index: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&id.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

/// Writes `bytes` as the chunks of object `id`.
pub(crate) fn write_chunks(
    chunks: &TransactionalTree,
    id: u64,
    bytes: &[u8],
) -> Result<(), UnabortableTransactionError> {
    for (index, chunk) in (0u64..).zip(bytes.chunks(CHUNK_SIZE)) {
        chunks.insert(&chunk_key(id, index)[..], chunk)?;
    }
    Ok(())
}

/// Removes the chunks of the object described by `header`.
pub(crate) fn remove_chunks(
    chunks: &TransactionalTree,
    header: &Header,
) -> Result<(), UnabortableTransactionError> {
    for index in 0..header.chunk_count() {
        chunks.remove(&chunk_key(header.id, index)[..])?;
    }
    Ok(())
}

/// Why stored chunks do not make up the object their header describes.
#[derive(Debug)]
pub(crate) enum ReadError {
    Sled(sled::Error),
    Corrupt(String),
}

/// Reads and verifies the object described by `header`.
pub(crate) fn read(chunks: &sled::Tree, header: &Header) -> Result<Vec<u8>, ReadError> {
    let size = usize::try_from(header.size).map_err(|_| {
        ReadError::Corrupt(format!("its size {} does not fit in memory", header.size))
    })?;
    // A damaged header can claim any size: let the vector grow past 64 MiB, never allocate
    // it up front.
    let mut out = Vec::with_capacity(size.min(64 << 20));
    for (expected_index, item) in (0u64..).zip(chunks.scan_prefix(header.id.to_be_bytes())) {
        let (key, chunk) = item.map_err(ReadError::Sled)?;
        if key.as_ref() != chunk_key(header.id, expected_index) {
            return Err(ReadError::Corrupt(format!(
                "chunk {expected_index} of {} is missing",
                header.chunk_count()
            )));
        }
        if out.len() + chunk.len() > size {
            return Err(ReadError::Corrupt(format!(
                "its chunks hold more than the {size} bytes its header says"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    if out.len() != size {
        return Err(ReadError::Corrupt(format!(
            "its chunks hold {} of the {size} bytes its header says",
            out.len()
        )));
    }
    let actual = Digest::of(&out);
    if actual != header.checksum {
        return Err(ReadError::Corrupt(format!(
            "its {size} bytes hash to {actual}, not {}",
            header.checksum
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_wrong_lengths() {
        let header = Header {
            size: 123_456,
            id: 42,
            checksum: Digest::of(b"x"),
        };
        assert_eq!(Header::decode(&header.encode()), Ok(header));
        assert_eq!(header.chunk_count(), 123_456u64.div_ceil(CHUNK_SIZE as u64));
        let err = Header::decode(&header.encode()[..10]).expect_err("short header");
        assert!(err.contains("10 bytes"), "{err}");
        let empty = Header { size: 0, ..header };
        assert_eq!(empty.chunk_count(), 0);
    }

    #[test]
    fn chunk_keys_sort_by_object_then_index() {
        assert!(chunk_key(1, 255) < chunk_key(1, 256));
        assert!(chunk_key(1, u64::MAX) < chunk_key(2, 0));
    }
}
