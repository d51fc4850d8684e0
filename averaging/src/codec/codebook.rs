//! The layout that [`Codec::Uniform8Bit`] and [`Codec::Quantile8Bit`] share: a codebook of at most 256 `f32`
//! entries and one byte per value that indexes it. Both fill each bucket's entry with the mean of the original
//! values that fell into it, which minimises the squared error for the chosen buckets.
//!
//! Layout: `u32 codebook_len ‖ codebook_len × f32 ‖ n × u8`, with `codebook_len` in `1..=256` (encoders write
//! 256) and every index below `codebook_len`.

use super::support::{self, CHUNK, Exec};
use super::{Codec, CodecError};

/// Entries in an encoder's codebook: one per value of a byte.
pub(crate) const CODEBOOK_LEN: usize = 256;
const HEADER: usize = 4;
/// Independent accumulator tables per chunk: consecutive values rarely hit the same table entry, so the
/// scattered additions do not wait on each other.
const WAYS: usize = 4;

pub(crate) fn encoded_len(len: usize) -> usize {
    len.saturating_add(HEADER + 4 * CODEBOOK_LEN)
}

/// Grows `out` by an encoding of `len` values and returns the codebook region (header included) and the index
/// region; the encoder fills the indices, then [`write_codebook`].
pub(crate) fn grow(out: &mut Vec<u8>, len: usize, exec: Exec) -> (&mut [u8], &mut [u8]) {
    support::grow(out, encoded_len(len), exec).split_at_mut(HEADER + 4 * CODEBOOK_LEN)
}

/// Writes the header and the codebook `sums[k] / counts[k]` (0 for empty buckets).
pub(crate) fn write_codebook(head: &mut [u8], sums: &[f64; CODEBOOK_LEN], counts: &[u64; CODEBOOK_LEN]) {
    head[..HEADER].copy_from_slice(&(CODEBOOK_LEN as u32).to_le_bytes());
    for ((field, &sum), &count) in head[HEADER..].chunks_exact_mut(4).zip(sums).zip(counts) {
        let entry = if count > 0 { (sum / count as f64) as f32 } else { 0.0 };
        field.copy_from_slice(&entry.to_le_bytes());
    }
}

/// Per-bucket sums of values (and optionally counts), accumulated chunk by chunk in a fixed order.
pub(crate) struct BucketSums {
    sums: [[f64; CODEBOOK_LEN]; WAYS],
    counts: [[u32; CODEBOOK_LEN]; WAYS],
}

impl BucketSums {
    pub(crate) fn new() -> Box<Self> {
        Box::new(Self {
            sums: [[0.0; CODEBOOK_LEN]; WAYS],
            counts: [[0; CODEBOOK_LEN]; WAYS],
        })
    }

    /// Adds `values[i]` to bucket `indices[i]`; counts too when `COUNT`. At most `u32::MAX` values per
    /// accumulator (callers use one per chunk of [`CHUNK`]).
    #[inline]
    pub(crate) fn add<const COUNT: bool>(&mut self, values: &[f32], indices: &[u8]) {
        let mut value_groups = values.chunks_exact(WAYS);
        let mut index_groups = indices.chunks_exact(WAYS);
        for (v, q) in (&mut value_groups).zip(&mut index_groups) {
            for way in 0..WAYS {
                self.sums[way][usize::from(q[way])] += f64::from(v[way]);
                if COUNT {
                    self.counts[way][usize::from(q[way])] += 1;
                }
            }
        }
        for (&v, &q) in value_groups.remainder().iter().zip(index_groups.remainder()) {
            self.sums[0][usize::from(q)] += f64::from(v);
            if COUNT {
                self.counts[0][usize::from(q)] += 1;
            }
        }
    }

    /// The ways added in order: per-bucket sums and counts of this accumulator.
    pub(crate) fn totals(&self) -> ([f64; CODEBOOK_LEN], [u64; CODEBOOK_LEN]) {
        let mut sums = [0.0; CODEBOOK_LEN];
        let mut counts = [0u64; CODEBOOK_LEN];
        for way in 0..WAYS {
            for k in 0..CODEBOOK_LEN {
                sums[k] += self.sums[way][k];
                counts[k] += u64::from(self.counts[way][k]);
            }
        }
        (sums, counts)
    }
}

/// Adds per-chunk totals in chunk order.
pub(crate) fn merge(
    parts: Vec<([f64; CODEBOOK_LEN], [u64; CODEBOOK_LEN])>,
) -> ([f64; CODEBOOK_LEN], [u64; CODEBOOK_LEN]) {
    let mut sums = [0.0; CODEBOOK_LEN];
    let mut counts = [0u64; CODEBOOK_LEN];
    for (part_sums, part_counts) in parts {
        for k in 0..CODEBOOK_LEN {
            sums[k] += part_sums[k];
            counts[k] += part_counts[k];
        }
    }
    (sums, counts)
}

/// Checks the header and the size against `len` values; returns the codebook's length.
pub(crate) fn parse_header(codec: Codec, bytes: &[u8], len: usize) -> Result<usize, CodecError> {
    if bytes.len() < HEADER {
        return support::check_size(codec, bytes, Some(HEADER)).map(|_| 0);
    }
    let field = support::read_u32(bytes, 0);
    let codebook_len = field as usize;
    if !(1..=CODEBOOK_LEN).contains(&codebook_len) {
        return Err(CodecError::Malformed {
            codec,
            reason: format!("codebook_len is {field}, must be in 1..={CODEBOOK_LEN}"),
        });
    }
    let expected = len.checked_add(HEADER + 4 * codebook_len);
    support::check_size(codec, bytes, expected)?;
    Ok(codebook_len)
}

pub(crate) fn decode(codec: Codec, bytes: &[u8], out: &mut [f32], exec: Exec) -> Result<(), CodecError> {
    let codebook_len = parse_header(codec, bytes, out.len())?;
    let entries = support::read_finite_f32s(codec, bytes, HEADER, codebook_len)?;
    let mut codebook = [0.0f32; CODEBOOK_LEN];
    codebook[..codebook_len].copy_from_slice(&entries);
    let indices = &bytes[HEADER + 4 * codebook_len..];
    let found = exec.zip_chunks_map(indices, CHUNK, out, CHUNK, |c, indices, out| {
        if codebook_len < CODEBOOK_LEN {
            // A branch-free maximum first (it vectorises); the position only when something is wrong.
            let largest = indices.iter().fold(0u8, |m, &q| m.max(q));
            if usize::from(largest) >= codebook_len {
                let i = indices
                    .iter()
                    .position(|&q| usize::from(q) >= codebook_len)
                    .unwrap_or(0);
                return Some((c * CHUNK + i, indices[i]));
            }
        }
        for (x, &q) in out.iter_mut().zip(indices) {
            *x = codebook[usize::from(q)];
        }
        None
    });
    match found.into_iter().flatten().next() {
        Some((i, q)) => Err(CodecError::Malformed {
            codec,
            reason: format!("index {q} of value {i} is past the codebook of {codebook_len} entries"),
        }),
        None => Ok(()),
    }
}
