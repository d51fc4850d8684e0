//! The messages of `/colony/state/1` and how values travel in chunk payloads.
//!
//! Headers are rkyv archives (validated on receipt like every Colony frame header); bulk data never goes
//! into a header: the metadata and the values travel as frame payloads, byte for byte.

use std::ops::Range;

use bytes::Bytes;

/// The receiver's only message: which part of the donor's flat buffer it wants, in chunks of a size the
/// receiver chooses (so that chunk numbers mean the same thing at every donor it talks to).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StateRequest {
    /// Values per chunk; every chunk holds this many except the buffer's last one, which may be shorter.
    pub chunk_values: u64,
    /// Index of the first chunk wanted.
    pub start_chunk: u64,
    /// Number of chunks wanted (0 asks only for the info).
    pub chunk_count: u64,
}

/// What a donor's state is, so that the receiver can refuse it before reading a single value.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StateInfo {
    /// The donor's epoch when it took the snapshot being served.
    pub epoch: u64,
    /// The schema hash of the donor's tensors ([`crate::tensor::SchemaHash`]).
    pub schema_hash: [u8; 32],
    /// Number of `f32` values in the donor's flat buffer.
    pub total_values: u64,
    /// The chunk size the donor uses; it echoes the request's.
    pub chunk_values: u64,
}

/// The donor's messages, in order: `Refused`, or `Info` then one `Chunk` per chunk of the range.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum StateResponse {
    /// The snapshot's description; the frame payload is the optimizer's opaque metadata.
    Info(StateInfo),
    /// Chunk `index` of the flat buffer; the frame payload is its values as little-endian `f32`.
    Chunk {
        /// The chunk's index in the whole buffer (not in the requested range).
        index: u64,
    },
    /// The donor does not share its state now; nothing follows.
    Refused {
        /// Why, for the receiver's report.
        reason: String,
    },
}

/// Number of chunks of `chunk_values` values (at least 1) that cover `total_values` values.
pub fn chunk_count(total_values: u64, chunk_values: u64) -> u64 {
    total_values.div_ceil(chunk_values.max(1))
}

/// The values of chunk `index`. The caller has checked that `index` is below [`chunk_count`].
pub fn chunk_range(index: u64, chunk_values: u64, total_values: u64) -> Range<usize> {
    let start = index.saturating_mul(chunk_values).min(total_values);
    let end = start.saturating_add(chunk_values).min(total_values);
    // Both are at most `total_values`, which counts the values of a buffer in memory.
    start as usize..end as usize
}

/// The values as little-endian bytes: the exact payload of a chunk frame.
pub fn encode_values(values: &[f32]) -> Bytes {
    let mut bytes = vec![0u8; values.len() * 4];
    let (words, _) = bytes.as_chunks_mut::<4>();
    for (word, value) in words.iter_mut().zip(values) {
        *word = value.to_le_bytes();
    }
    Bytes::from(bytes)
}

/// Why a chunk payload cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkFault {
    /// The payload is not `4 × expected values` bytes long.
    Length { bytes: usize, expected_bytes: usize },
    /// The value at `position` (within the chunk) is NaN or infinite.
    NonFinite { position: usize },
}

/// Checks that `payload` holds exactly `expected_values` finite little-endian `f32`.
pub fn check_chunk(payload: &[u8], expected_values: usize) -> Result<(), ChunkFault> {
    let expected_bytes = expected_values.saturating_mul(4);
    if payload.len() != expected_bytes {
        return Err(ChunkFault::Length {
            bytes: payload.len(),
            expected_bytes,
        });
    }
    let (words, _) = payload.as_chunks::<4>();
    // An f32 is NaN or infinite exactly when all its exponent bits are set. Blocks are scanned without an
    // early exit (which vectorises); only a bad block is searched value by value.
    const EXPONENT: u32 = 0x7f80_0000;
    const BLOCK: usize = 256;
    let non_finite = |word: &[u8; 4]| u32::from_le_bytes(*word) & EXPONENT == EXPONENT;
    let Some(block) = words
        .chunks(BLOCK)
        .position(|block| block.iter().fold(false, |any, word| any | non_finite(word)))
    else {
        return Ok(());
    };
    let within = words[block * BLOCK..].iter().position(non_finite).unwrap_or(0);
    Err(ChunkFault::NonFinite {
        position: block * BLOCK + within,
    })
}

/// Writes the little-endian `f32` of `payload` into `out` (as many as both hold).
pub fn decode_values(payload: &[u8], out: &mut [f32]) {
    let (words, _) = payload.as_chunks::<4>();
    for (value, word) in out.iter_mut().zip(words) {
        *value = f32::from_le_bytes(*word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_and_the_last_one_is_short() {
        assert_eq!(chunk_count(10, 4), 3);
        assert_eq!(chunk_count(8, 4), 2);
        assert_eq!(chunk_count(0, 4), 0);
        assert_eq!(chunk_range(0, 4, 10), 0..4);
        assert_eq!(chunk_range(2, 4, 10), 8..10);
        assert_eq!(chunk_range(u64::MAX, 4, 10), 10..10);
    }

    #[test]
    fn values_round_trip_as_little_endian_bytes() {
        let values = [1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e38];
        let bytes = encode_values(&values);
        assert_eq!(&bytes[..4], &1.5f32.to_le_bytes());
        assert_eq!(check_chunk(&bytes, 4), Ok(()));
        let mut out = [0.0f32; 4];
        decode_values(&bytes, &mut out);
        assert_eq!(out.map(f32::to_bits), values.map(f32::to_bits));
    }

    #[test]
    fn wrong_lengths_and_non_finite_values_are_faults() {
        let bytes = encode_values(&[1.0, 2.0, 3.0]);
        assert_eq!(
            check_chunk(&bytes[..11], 3),
            Err(ChunkFault::Length {
                bytes: 11,
                expected_bytes: 12
            })
        );
        assert!(matches!(check_chunk(&bytes, 2), Err(ChunkFault::Length { .. })));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let bytes = encode_values(&[1.0, bad, 3.0]);
            assert_eq!(check_chunk(&bytes, 3), Err(ChunkFault::NonFinite { position: 1 }));
            // Past the first block, and the first of two in a block.
            let mut values = vec![0.5f32; 1000];
            values[700] = bad;
            values[701] = bad;
            assert_eq!(
                check_chunk(&encode_values(&values), 1000),
                Err(ChunkFault::NonFinite { position: 700 })
            );
        }
        assert_eq!(check_chunk(&encode_values(&[f32::MAX, -f32::MAX, 0.0]), 3), Ok(()));
    }
}
