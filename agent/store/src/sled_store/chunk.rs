//! Outbox chunks: consecutive outbox records stored as one sled value.
//!
//! sled's cost is per key (an insert, a removal and an iterator step each take a few
//! microseconds, about as long as copying kilobytes), so the outbox keeps records that were
//! committed together in chunks of up to [`CHUNK_BYTES`]: the key is the first record's
//! sequence number (u64 BE) and the value is
//!
//! ```text
//! u32 BE count | count x (u32 BE frame length | frame)
//! ```
//!
//! where the records' sequence numbers are the key's, the key's + 1, ... A chunk never
//! spans two commits, so sequence numbers a failed commit handed out leave a gap between
//! chunks, never inside one.

use crate::StoreError;

/// Largest chunk written (a single larger record gets a chunk of its own). sled splits a
/// leaf page at 17 entries, not by size, and writes a page over ~128 KiB to a file of its
/// own that every commit would then have to sync: 17 chunks of 4 KiB stay in the log.
pub(super) const CHUNK_BYTES: usize = 4096;

const COUNT_LEN: usize = 4;
const LEN_LEN: usize = 4;

/// The bytes a chunk spends on framing for `count` records.
pub(super) fn overhead(count: u64) -> u64 {
    (COUNT_LEN + LEN_LEN * count as usize) as u64
}

/// Splits `frames` (encoded records, in sequence order) into chunk values of at most
/// [`CHUNK_BYTES`], each with how many records it holds.
pub(super) fn build<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> Vec<(u64, Vec<u8>)> {
    let mut chunks = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut count: u32 = 0;
    let finish = |current: &mut Vec<u8>, count: &mut u32, chunks: &mut Vec<(u64, Vec<u8>)>| {
        if *count > 0 {
            current[..COUNT_LEN].copy_from_slice(&count.to_be_bytes());
            chunks.push((u64::from(*count), std::mem::take(current)));
            *count = 0;
        }
    };
    for frame in frames {
        if count > 0 && current.len() + LEN_LEN + frame.len() > CHUNK_BYTES {
            finish(&mut current, &mut count, &mut chunks);
        }
        if count == 0 {
            current.reserve(CHUNK_BYTES.max(COUNT_LEN + LEN_LEN + frame.len()));
            current.extend_from_slice(&[0; COUNT_LEN]);
        }
        // Frames are at most `outbox_max_bytes`, checked before they are queued; a u32 is
        // enough for any bound a device sets, and a larger frame is refused there.
        current.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        current.extend_from_slice(frame);
        count += 1;
    }
    finish(&mut current, &mut count, &mut chunks);
    chunks
}

/// How many records a chunk value holds (its header, without walking the records).
pub(super) fn count(first: u64, value: &[u8]) -> Result<u64, StoreError> {
    let header: [u8; COUNT_LEN] = value
        .get(..COUNT_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| corrupt(first, format!("it is {} bytes", value.len())))?;
    match u32::from_be_bytes(header) {
        0 => Err(corrupt(first, "it holds no records".into())),
        n => Ok(u64::from(n)),
    }
}

/// The records of the chunk whose first sequence number is `first`, with their sequence
/// numbers.
pub(super) fn frames(first: u64, value: &[u8]) -> Result<Frames<'_>, StoreError> {
    let left = count(first, value)?;
    Ok(Frames {
        first,
        seq: first,
        left,
        rest: &value[COUNT_LEN..],
    })
}

/// Iterator over a chunk's `(sequence number, frame)` pairs; a frame length that runs past
/// the end of the value is an error.
pub(super) struct Frames<'a> {
    first: u64,
    seq: u64,
    left: u64,
    rest: &'a [u8],
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<(u64, &'a [u8]), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let parsed = self
            .rest
            .get(..LEN_LEN)
            .and_then(|l| <[u8; LEN_LEN]>::try_from(l).ok())
            .map(|l| u32::from_be_bytes(l) as usize)
            .and_then(|len| Some((len, self.rest.get(LEN_LEN..LEN_LEN + len)?)));
        let Some((len, frame)) = parsed else {
            self.left = 0;
            return Some(Err(corrupt(
                self.first,
                format!("record {} runs past the end of the chunk", self.seq),
            )));
        };
        self.rest = &self.rest[LEN_LEN + len..];
        self.left -= 1;
        let seq = self.seq;
        self.seq += 1;
        Some(Ok((seq, frame)))
    }
}

fn corrupt(first: u64, detail: String) -> StoreError {
    StoreError::Corrupt {
        what: format!("the outbox chunk starting at record {first}"),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_hold_consecutive_frames_up_to_the_size_limit() -> Result<(), StoreError> {
        let input: Vec<Vec<u8>> = (0..100u8).map(|n| vec![n; 130]).collect();
        let chunks = build(input.iter().map(Vec::as_slice));
        assert!(chunks.len() > 1);
        let mut first = 10;
        let mut back = Vec::new();
        for (n, value) in &chunks {
            assert!(value.len() <= CHUNK_BYTES);
            assert_eq!(count(first, value)?, *n);
            for item in frames(first, value)? {
                let (seq, frame) = item?;
                assert_eq!(seq, 10 + back.len() as u64);
                back.push(frame.to_vec());
            }
            first += n;
        }
        assert_eq!(back, input);

        // A record larger than a chunk gets one of its own.
        let big = vec![7u8; CHUNK_BYTES * 2];
        let chunks = build([&[1u8][..], &big, &[2u8][..]]);
        assert_eq!(
            chunks.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        Ok(())
    }

    #[test]
    fn a_damaged_chunk_is_reported_not_read_past() {
        let chunks = build([&b"abc"[..], b"defg"]);
        let value = &chunks[0].1;
        let truncated = &value[..value.len() - 2];
        let read: Vec<_> = frames(5, truncated).into_iter().flatten().collect();
        assert!(matches!(read[0], Ok((5, b"abc"))));
        assert!(
            matches!(&read[1], Err(StoreError::Corrupt { what, .. }) if what.contains("record 5"))
        );
        assert_eq!(read.len(), 2);
        assert!(count(1, &[0, 0]).is_err());
        assert!(count(1, &[0, 0, 0, 0]).is_err());
    }
}
