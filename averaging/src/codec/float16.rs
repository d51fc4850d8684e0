//! The element-wise codecs: raw `f32` ([`Codec::None`]) and clamped half precision ([`Codec::Float16`]), and
//! the `f16` batch conversion that [`Codec::ScaledFloat16`] shares.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::support::{self, CHUNK, Exec};
use super::{Codec, CodecError};

/// Values converted at a time through a stack buffer (the `half` crate converts slices with F16C where the
/// CPU has it).
pub(crate) const BATCH: usize = 1024;

pub(crate) fn encode_f32(values: &[f32], out: &mut Vec<u8>, exec: Exec) {
    let tail = support::grow(out, values.len() * 4, exec);
    exec.zip_chunks(values, CHUNK, tail, CHUNK * 4, |_, values, out| {
        support::write_f32s(values, out)
    });
}

pub(crate) fn decode_f32(bytes: &[u8], out: &mut [f32], exec: Exec) -> Result<(), CodecError> {
    let codec = Codec::None;
    support::check_size(codec, bytes, out.len().checked_mul(4))?;
    let found = exec.zip_chunks_map(bytes, CHUNK * 4, out, CHUNK, |_, bytes, out| {
        support::read_f32s(bytes, out);
        support::first_non_finite(out)
    });
    match first_found(found) {
        Some(i) => Err(CodecError::NonFinite { codec, index: i * 4 }),
        None => Ok(()),
    }
}

pub(crate) fn encode_f16(values: &[f32], out: &mut Vec<u8>, exec: Exec) {
    let tail = support::grow(out, values.len() * 2, exec);
    exec.zip_chunks(values, CHUNK, tail, CHUNK * 2, |_, values, out| {
        for (values, out) in values.chunks(BATCH).zip(out.chunks_mut(BATCH * 2)) {
            write_halves(values, out);
        }
    });
}

pub(crate) fn decode_f16(bytes: &[u8], out: &mut [f32], exec: Exec) -> Result<(), CodecError> {
    let codec = Codec::Float16;
    support::check_size(codec, bytes, out.len().checked_mul(2))?;
    let found = exec.zip_chunks_map(bytes, CHUNK * 2, out, CHUNK, |_, bytes, out| decode_halves(bytes, out));
    match first_found(found) {
        Some(i) => Err(CodecError::NonFinite { codec, index: i * 2 }),
        None => Ok(()),
    }
}

/// The first hit of per-chunk searches over chunks of [`CHUNK`] values, as an index into the whole.
pub(crate) fn first_found(found: Vec<Option<usize>>) -> Option<usize> {
    found
        .into_iter()
        .enumerate()
        .find_map(|(c, hit)| hit.map(|i| c * CHUNK + i))
}

/// Writes `values` (at most [`BATCH`]) as little-endian halves into `out` (`out.len() == 2 · values.len()`),
/// clamped to ±65504.
///
/// Rather than clamping every input, the conversion (round to nearest even, as IEEE and F16C do) turns
/// anything at or beyond 65520 into infinity, and infinities are then replaced by ±65504: the same result,
/// one subtraction on the integer bits instead of two comparisons on each float. NaN stays NaN, so that the
/// receiver refuses it.
pub(crate) fn write_halves(values: &[f32], out: &mut [u8]) {
    let mut halves = [f16::ZERO; BATCH];
    let halves = &mut halves[..values.len()];
    halves.convert_from_f32_slice(values);
    for (field, half) in out.chunks_exact_mut(2).zip(halves.iter()) {
        let bits = half.to_bits();
        // ±infinity (0x7c00, 0xfc00) minus one is ±65504 (0x7bff, 0xfbff).
        let bits = bits - u16::from(bits & 0x7fff == 0x7c00);
        field.copy_from_slice(&bits.to_le_bytes());
    }
}

/// Converts little-endian halves from `bytes` into `out` (`bytes.len() == 2 · out.len()`). Returns the index
/// of the first NaN or infinite half, if any (then `out` is only partly written).
pub(crate) fn decode_halves(bytes: &[u8], out: &mut [f32]) -> Option<usize> {
    let mut bits = [0u16; BATCH];
    for (b, (bytes, out)) in bytes.chunks(BATCH * 2).zip(out.chunks_mut(BATCH)).enumerate() {
        let n = out.len();
        for (bits, field) in bits.iter_mut().zip(bytes.chunks_exact(2)) {
            *bits = u16::from_le_bytes([field[0], field[1]]);
        }
        let bits = &bits[..n];
        // An all-ones exponent is infinity or NaN; branch-free so that the scan vectorises.
        let any_bad = bits.iter().fold(0u16, |acc, h| acc | u16::from(h & 0x7c00 == 0x7c00));
        if any_bad != 0 {
            let i = bits.iter().position(|h| h & 0x7c00 == 0x7c00).unwrap_or(0);
            return Some(b * BATCH + i);
        }
        bits.reinterpret_cast::<f16>().convert_to_f32_slice(out);
    }
    None
}
