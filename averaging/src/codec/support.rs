//! What the codecs share: the choice between the sequential and the parallel path, deterministic chunked
//! statistics, finiteness scans and little-endian field access.

use rayon::prelude::*;

use super::{Codec, CodecError};

/// Parts with at least this many values are encoded and decoded on the rayon pool (256 Ki values, 1 MiB of
/// `f32`); smaller ones stay on the calling thread, where the pool's overhead would dominate.
pub const PARALLEL_MIN_VALUES: usize = 256 * 1024;

/// Values per unit of work and per partial sum. Statistics are summed chunk by chunk and the chunk sums are
/// added in order, on either path, which is what makes the parallel path bit-identical to the sequential one.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Whether a part is processed on the calling thread or on the rayon pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exec {
    Sequential,
    Parallel,
}

impl Exec {
    /// The path for a part of `len` values.
    pub(crate) fn for_len(len: usize) -> Exec {
        if len >= PARALLEL_MIN_VALUES {
            Exec::Parallel
        } else {
            Exec::Sequential
        }
    }

    /// Calls `f(index, input_chunk, output_chunk)` on matching chunks of `input` (`in_chunk` items each) and
    /// `output` (`out_chunk` items each). The two slices must split into the same number of chunks.
    pub(crate) fn zip_chunks<A: Sync, B: Send>(
        self,
        input: &[A],
        in_chunk: usize,
        output: &mut [B],
        out_chunk: usize,
        f: impl Fn(usize, &[A], &mut [B]) + Sync + Send,
    ) {
        match self {
            Exec::Sequential => input
                .chunks(in_chunk)
                .zip(output.chunks_mut(out_chunk))
                .enumerate()
                .for_each(|(c, (i, o))| f(c, i, o)),
            Exec::Parallel => input
                .par_chunks(in_chunk)
                .zip(output.par_chunks_mut(out_chunk))
                .enumerate()
                .for_each(|(c, (i, o))| f(c, i, o)),
        }
    }

    /// Like [`Exec::zip_chunks`], collecting one result per chunk, in order.
    pub(crate) fn zip_chunks_map<A: Sync, B: Send, T: Send>(
        self,
        input: &[A],
        in_chunk: usize,
        output: &mut [B],
        out_chunk: usize,
        f: impl Fn(usize, &[A], &mut [B]) -> T + Sync + Send,
    ) -> Vec<T> {
        match self {
            Exec::Sequential => input
                .chunks(in_chunk)
                .zip(output.chunks_mut(out_chunk))
                .enumerate()
                .map(|(c, (i, o))| f(c, i, o))
                .collect(),
            Exec::Parallel => input
                .par_chunks(in_chunk)
                .zip(output.par_chunks_mut(out_chunk))
                .enumerate()
                .map(|(c, (i, o))| f(c, i, o))
                .collect(),
        }
    }

    /// One result per chunk of `chunk` items of `input`, in order.
    pub(crate) fn map_chunks<A: Sync, T: Send>(
        self,
        input: &[A],
        chunk: usize,
        f: impl Fn(&[A]) -> T + Sync + Send,
    ) -> Vec<T> {
        match self {
            Exec::Sequential => input.chunks(chunk).map(f).collect(),
            Exec::Parallel => input.par_chunks(chunk).map(f).collect(),
        }
    }
}

/// Sums of `x − pivot` and `(x − pivot)²` in `f64`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ShiftedSums {
    pub sum: f64,
    pub sum_squares: f64,
}

impl ShiftedSums {
    /// Sums over `values`, in chunks of [`CHUNK`] added in order. Eight independent lanes per chunk let the
    /// compiler vectorise the loop without reordering any addition.
    pub(crate) fn of(values: &[f32], pivot: f64, exec: Exec) -> ShiftedSums {
        exec.map_chunks(values, CHUNK, |chunk| Self::of_chunk(chunk, pivot))
            .into_iter()
            .fold(ShiftedSums::default(), |acc, part| ShiftedSums {
                sum: acc.sum + part.sum,
                sum_squares: acc.sum_squares + part.sum_squares,
            })
    }

    fn of_chunk(values: &[f32], pivot: f64) -> ShiftedSums {
        const LANES: usize = 8;
        let mut sum = [0.0f64; LANES];
        let mut sum_squares = [0.0f64; LANES];
        let mut groups = values.chunks_exact(LANES);
        for group in &mut groups {
            for lane in 0..LANES {
                let d = f64::from(group[lane]) - pivot;
                sum[lane] += d;
                sum_squares[lane] += d * d;
            }
        }
        for (lane, &x) in groups.remainder().iter().enumerate() {
            let d = f64::from(x) - pivot;
            sum[lane] += d;
            sum_squares[lane] += d * d;
        }
        ShiftedSums {
            sum: sum.iter().sum(),
            sum_squares: sum_squares.iter().sum(),
        }
    }

    /// Mean and sum of squared deviations from the mean of `n` values summed about `pivot`.
    pub(crate) fn mean_and_deviance(self, pivot: f64, n: usize) -> (f64, f64) {
        if n == 0 {
            return (0.0, 0.0);
        }
        let n = n as f64;
        let mean_offset = self.sum / n;
        // max(0): rounding can make the difference slightly negative for constant inputs.
        let deviance = (self.sum_squares - self.sum * mean_offset).max(0.0);
        (pivot + mean_offset, deviance)
    }
}

/// Whether any of `values` is NaN or infinite; branch-free so that it vectorises.
fn any_non_finite(values: &[f32]) -> bool {
    values
        .iter()
        .fold(0u32, |acc, x| acc | u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000))
        != 0
}

/// The index of the first NaN or infinity in `values`, if any.
pub(crate) fn first_non_finite(values: &[f32]) -> Option<usize> {
    const BLOCK: usize = 1024;
    values
        .chunks(BLOCK)
        .enumerate()
        .find(|(_, block)| any_non_finite(block))
        .and_then(|(b, block)| block.iter().position(|x| !x.is_finite()).map(|i| b * BLOCK + i))
}

/// `Ok` when `bytes` holds exactly `expected` bytes (`None`: the size overflows `usize`).
pub(crate) fn check_size(codec: Codec, bytes: &[u8], expected: Option<usize>) -> Result<(), CodecError> {
    match expected {
        Some(expected) if expected == bytes.len() => Ok(()),
        _ => Err(CodecError::Length {
            codec,
            expected: expected.unwrap_or(usize::MAX),
            actual: bytes.len(),
        }),
    }
}

/// The little-endian `u32` at `offset`; the caller has checked that the buffer holds it.
pub(crate) fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(field)
}

/// The little-endian `u64` at `offset`; the caller has checked that the buffer holds it.
pub(crate) fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(field)
}

/// Reads little-endian `f32`s from `bytes` into `out` (`bytes.len() == 4 · out.len()`).
pub(crate) fn read_f32s(bytes: &[u8], out: &mut [f32]) {
    for (value, field) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *value = f32::from_le_bytes([field[0], field[1], field[2], field[3]]);
    }
}

/// Writes `values` as little-endian `f32`s into `out` (`out.len() == 4 · values.len()`).
pub(crate) fn write_f32s(values: &[f32], out: &mut [u8]) {
    for (field, value) in out.chunks_exact_mut(4).zip(values) {
        field.copy_from_slice(&value.to_le_bytes());
    }
}

/// Grows `out` by `len` zero bytes and returns the new tail. On the parallel path the zeroing (and the page
/// faults of fresh memory) are spread over the pool too: done by one thread, they would cost about as much as
/// the parallel encoding itself.
pub(crate) fn grow(out: &mut Vec<u8>, len: usize, exec: Exec) -> &mut [u8] {
    let start = out.len();
    match exec {
        Exec::Sequential => out.resize(start + len, 0),
        Exec::Parallel => out.par_extend(rayon::iter::repeat_n(0u8, len)),
    }
    &mut out[start..]
}

/// Reads `count` little-endian `f32` fields starting at byte `offset`, refusing non-finite ones.
pub(crate) fn read_finite_f32s(
    codec: Codec,
    bytes: &[u8],
    offset: usize,
    count: usize,
) -> Result<Vec<f32>, CodecError> {
    let mut values = vec![0.0; count];
    read_f32s(&bytes[offset..offset + 4 * count], &mut values);
    match first_non_finite(&values) {
        Some(i) => Err(CodecError::NonFinite {
            codec,
            index: offset + 4 * i,
        }),
        None => Ok(values),
    }
}
