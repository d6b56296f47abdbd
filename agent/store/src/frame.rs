//! Checksummed values: `[sha256 of payload (32 bytes)][payload]`.
//!
//! sled checks its own log with crc32, but a value can still come back wrong (a torn write
//! sled did not notice, a bug, a bit flip in memory or on flash). Journal entries decide what
//! runs, so they carry a sha256 of their own (blobs and artifacts carry theirs in their
//! object header, see `objects`).

use perch_core::Digest;

/// Length of the checksum in front of every sealed value.
pub(crate) const CHECKSUM_LEN: usize = 32;

/// The concatenation of `parts` with its checksum in front.
pub(crate) fn seal_parts(parts: &[&[u8]]) -> Vec<u8> {
    let len = parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(CHECKSUM_LEN + len);
    out.extend_from_slice(&[0; CHECKSUM_LEN]);
    for part in parts {
        out.extend_from_slice(part);
    }
    let sum = Digest::of(&out[CHECKSUM_LEN..]);
    out[..CHECKSUM_LEN].copy_from_slice(sum.as_bytes());
    out
}

/// The payload of a sealed value, or why it does not verify (a sentence for
/// `StoreError::Corrupt::detail`).
pub(crate) fn open(sealed: &[u8]) -> Result<&[u8], String> {
    if sealed.len() < CHECKSUM_LEN {
        return Err(format!(
            "the entry is {} bytes, shorter than its {CHECKSUM_LEN}-byte checksum",
            sealed.len()
        ));
    }
    let (sum, payload) = sealed.split_at(CHECKSUM_LEN);
    let mut stored = [0; CHECKSUM_LEN];
    stored.copy_from_slice(sum);
    let stored = Digest::from_bytes(stored);
    let actual = Digest::of(payload);
    if stored == actual {
        Ok(payload)
    } else {
        Err(format!(
            "its checksum says {stored} but its {} bytes hash to {actual}",
            payload.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(payload: &[u8]) -> Vec<u8> {
        seal_parts(&[payload])
    }

    #[test]
    fn sealed_values_open_to_their_payload() {
        assert_eq!(open(&seal(b"hello")), Ok(&b"hello"[..]));
        assert_eq!(open(&seal(b"")), Ok(&b""[..]));
        assert_eq!(seal_parts(&[b"ab", b"", b"c"]), seal(b"abc"));
    }

    #[test]
    fn truncation_and_bit_flips_are_detected() {
        let sealed = seal(b"some artifact bytes");
        let truncated = &sealed[..sealed.len() - 1];
        let err = open(truncated).expect_err("truncated value must not verify");
        assert!(err.contains("18 bytes hash to"), "{err}");

        let mut flipped = sealed.clone();
        flipped[CHECKSUM_LEN + 3] ^= 0x10;
        assert!(open(&flipped).is_err());

        let mut bad_sum = sealed;
        bad_sum[0] ^= 1;
        assert!(open(&bad_sum).is_err());

        let err = open(&[1, 2, 3]).expect_err("3 bytes cannot hold a checksum");
        assert!(err.contains("3 bytes, shorter"), "{err}");
    }
}
