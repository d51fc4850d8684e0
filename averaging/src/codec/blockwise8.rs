//! [`Codec::Blockwise8Bit`]: blocks of [`BLOCK_SIZE`] values, each divided by its largest magnitude (its
//! *absmax*) and coded as the nearest entry of a fixed 256-entry map of `[-1, 1]` that is finer near zero.
//!
//! The map is described at [`dynamic_map`].
//!
//! Layout: `u32 block_size ‖ blocks × f32 absmax ‖ n × u8 code`, `blocks = ⌈n / block_size⌉`, `block_size ≥ 1`
//! (encoders write [`BLOCK_SIZE`]), every absmax finite and non-negative.

use std::sync::OnceLock;

use super::support::{self, CHUNK, Exec};
use super::{Codec, CodecError};

/// Values per block when encoding (decoding accepts any block size the header names).
pub const BLOCK_SIZE: usize = 4096;
const CODEC: Codec = Codec::Blockwise8Bit;
const HEADER: usize = 4;

/// The 128 non-negative magnitudes of the dynamic map, in increasing order.
const fn magnitudes() -> [f32; 128] {
    let mut table = [0.0f32; 128];
    let mut c = 1;
    while c < 128 {
        let p = 31 - (c as u32).leading_zeros();
        let f = c - (1 << p);
        let mut low = 1.0f64;
        let mut k = p;
        while k < 7 {
            low /= 4.0;
            k += 1;
        }
        table[c] = (low * (1.0 + 3.0 * (f + 1) as f64 / (1u32 << p) as f64)) as f32;
        c += 1;
    }
    table
}

const MAGNITUDES: [f32; 128] = magnitudes();

const fn signed_map() -> [f32; 256] {
    let mut map = [0.0f32; 256];
    let mut code = 0;
    while code < 128 {
        map[code] = MAGNITUDES[code];
        map[code + 128] = -MAGNITUDES[code];
        code += 1;
    }
    map
}

const DYNAMIC_MAP: [f32; 256] = signed_map();

/// The 256-entry dynamic map of [`Codec::Blockwise8Bit`]: a code decodes to `dynamic_map()[code] · absmax`.
///
/// A code byte is a sign bit (`0x80`) and a 7-bit magnitude code `c`; entries 128 to 255 are the negatives of
/// entries 0 to 127. `c = 0` is zero. Otherwise the position of `c`'s leading one, `p = ⌊log₂ c⌋` (0 to 6), is
/// an exponent written in unary (the more leading zeros, the smaller the value) and the `p` bits below it, `f`,
/// a fraction: the magnitude is `4^(p−7) · (1 + 3 · (f + 1) / 2^p)`, i.e. the `2^p` codes of exponent `p`
/// split `(4^(p−7), 4^(p−6)]` evenly. The magnitudes run from `4⁻⁶ ≈ 2.4e-4` up to exactly 1: 64 of them in
/// `(1/4, 1]` (steps of 3/256), and each factor of 4 closer to zero halves both the number of codes and the
/// step, so small values keep far more precision than a linear map's steps of 1/127 would give them. Every
/// entry has at most 9 significant bits, so the table is exact in `f32` on every machine. Code 128 (negative
/// zero) decodes to zero.
///
/// ```
/// let map = colony_averaging::codec::dynamic_map();
/// assert_eq!((map[0], map[127], map[255]), (0.0, 1.0, -1.0));
/// assert!(map[1] > 0.0 && map[1] < 3e-4);
/// ```
pub fn dynamic_map() -> &'static [f32; 256] {
    &DYNAMIC_MAP
}

/// The encoder's look-up table covers magnitudes in `[2⁻¹⁴, 1]` by their top 16 bits (exponent and 7 mantissa
/// bits): 1,793 bins, small enough to stay in the L1 cache. Anything below 2⁻¹⁴ is nearest zero (the smallest
/// non-zero magnitude is 4⁻⁶ = 2⁻¹², the switch to it at 2⁻¹³) and shares the first bin.
const LUT_FIRST_BIN: u32 = 0x3880_0000 >> 16;
const LUT_BINS: usize = ((0x3f80_0000 >> 16) - LUT_FIRST_BIN + 1) as usize;

/// For each bin of `|x| / absmax` (its top 16 bits): the code nearest the bin's lowest value, and the value
/// above which the next code is nearer. Each bin is narrower than the gap between neighbouring magnitudes, so
/// at most one such switch falls inside it.
struct NearestTable {
    code: Vec<u8>,
    switch_above: Vec<f32>,
}

fn nearest_table() -> &'static NearestTable {
    static TABLE: OnceLock<NearestTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut code = Vec::with_capacity(LUT_BINS);
        let mut switch_above = Vec::with_capacity(LUT_BINS);
        let mut nearest = 0usize;
        for bin in LUT_FIRST_BIN..LUT_FIRST_BIN + LUT_BINS as u32 {
            // The first bin also holds everything smaller: its low end is 0.
            let low = if bin == LUT_FIRST_BIN {
                0.0
            } else {
                f32::from_bits(bin << 16)
            };
            let high = f32::from_bits((bin << 16) | 0xffff);
            // Midpoints are exact in f32 (the magnitudes have at most 9 significant bits); ties go to the
            // smaller code.
            while nearest < 127 && low > (MAGNITUDES[nearest] + MAGNITUDES[nearest + 1]) / 2.0 {
                nearest += 1;
            }
            code.push(nearest as u8);
            let switch = if nearest < 127 {
                (MAGNITUDES[nearest] + MAGNITUDES[nearest + 1]) / 2.0
            } else {
                f32::INFINITY
            };
            switch_above.push(if switch <= high { switch } else { f32::INFINITY });
        }
        NearestTable { code, switch_above }
    })
}

/// The magnitude code nearest `a ∈ [0, 1]` (ties to the smaller; anything above 1 or NaN gives 127).
#[inline]
fn nearest_code(a: f32, code: &[u8; LUT_BINS], switch_above: &[f32; LUT_BINS]) -> u8 {
    let bin = (((a.to_bits() >> 16).saturating_sub(LUT_FIRST_BIN)) as usize).min(LUT_BINS - 1);
    code[bin] + u8::from(a > switch_above[bin])
}

/// [`nearest_code`] through the shared table (for tests).
#[cfg(test)]
pub(super) fn nearest_magnitude_code(a: f32) -> u8 {
    let table = nearest_table();
    nearest_code(
        a,
        table
            .code
            .as_slice()
            .try_into()
            .expect("the table has LUT_BINS entries"),
        table
            .switch_above
            .as_slice()
            .try_into()
            .expect("the table has LUT_BINS entries"),
    )
}

pub(crate) fn encoded_len(len: usize) -> usize {
    len.saturating_add(HEADER + 4 * len.div_ceil(BLOCK_SIZE))
}

pub(crate) fn encode(values: &[f32], out: &mut Vec<u8>, exec: Exec) {
    let blocks = values.len().div_ceil(BLOCK_SIZE);
    let tail = support::grow(out, encoded_len(values.len()), exec);
    let (header, rest) = tail.split_at_mut(HEADER);
    header.copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    let (absmax_fields, codes) = rest.split_at_mut(4 * blocks);
    let table = nearest_table();
    let code_table: &[u8; LUT_BINS] = table
        .code
        .as_slice()
        .try_into()
        .expect("the table has LUT_BINS entries");
    let switch_table: &[f32; LUT_BINS] = table
        .switch_above
        .as_slice()
        .try_into()
        .expect("the table has LUT_BINS entries");
    // CHUNK is a multiple of BLOCK_SIZE, so blocks never straddle chunks.
    let absmaxes = exec.zip_chunks_map(values, CHUNK, codes, CHUNK, |_, values, codes| {
        values
            .chunks(BLOCK_SIZE)
            .zip(codes.chunks_mut(BLOCK_SIZE))
            .map(|(block, codes)| encode_block(block, codes, code_table, switch_table))
            .collect::<Vec<f32>>()
    });
    for (field, absmax) in absmax_fields.chunks_exact_mut(4).zip(absmaxes.into_iter().flatten()) {
        field.copy_from_slice(&absmax.to_le_bytes());
    }
}

/// Codes one block; returns its absmax (NaN when the block holds a NaN, which the receiver then refuses).
fn encode_block(block: &[f32], codes: &mut [u8], code_table: &[u8; LUT_BINS], switch_table: &[f32; LUT_BINS]) -> f32 {
    // For non-negative floats the bit patterns order as the values do; NaN's pattern is above infinity's.
    let absmax = f32::from_bits(block.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff)));
    let inverse = 1.0 / absmax;
    let code_of = |x: f32, a: f32| nearest_code(a, code_table, switch_table) | (((x.to_bits() >> 31) as u8) << 7);
    if absmax == 0.0 {
        codes.fill(0);
    } else if inverse.is_finite() {
        for (code, &x) in codes.iter_mut().zip(block) {
            *code = code_of(x, x.abs() * inverse);
        }
    } else {
        // A subnormal absmax: its reciprocal overflows, so divide.
        for (code, &x) in codes.iter_mut().zip(block) {
            *code = code_of(x, x.abs() / absmax);
        }
    }
    absmax
}

/// Checks the header and the size against `len` values; returns the block size and the number of blocks.
pub(crate) fn parse_header(bytes: &[u8], len: usize) -> Result<(usize, usize), CodecError> {
    if bytes.len() < HEADER {
        return support::check_size(CODEC, bytes, Some(HEADER)).map(|_| (0, 0));
    }
    let block_size = support::read_u32(bytes, 0) as usize;
    if block_size == 0 {
        return Err(CodecError::Malformed {
            codec: CODEC,
            reason: "block_size is 0, must be at least 1".into(),
        });
    }
    let blocks = len.div_ceil(block_size);
    let expected = blocks
        .checked_mul(4)
        .and_then(|absmaxes| len.checked_add(absmaxes)?.checked_add(HEADER));
    support::check_size(CODEC, bytes, expected)?;
    Ok((block_size, blocks))
}

pub(crate) fn decode(bytes: &[u8], out: &mut [f32], exec: Exec) -> Result<(), CodecError> {
    let (block_size, blocks) = parse_header(bytes, out.len())?;
    let absmaxes = support::read_finite_f32s(CODEC, bytes, HEADER, blocks)?;
    if let Some(block) = absmaxes.iter().position(|&a| a < 0.0) {
        return Err(CodecError::Malformed {
            codec: CODEC,
            reason: format!("absmax of block {block} is {}, must not be negative", absmaxes[block]),
        });
    }
    let codes = &bytes[HEADER + 4 * blocks..];
    let blocks_per_task = (CHUNK / block_size).max(1);
    let values_per_task = block_size.saturating_mul(blocks_per_task);
    // Finite absmaxes times map entries in [-1, 1] are finite: no scan of the output is needed.
    exec.zip_chunks(codes, values_per_task, out, values_per_task, |task, codes, out| {
        let first_block = task * blocks_per_task;
        for (b, (codes, out)) in codes.chunks(block_size).zip(out.chunks_mut(block_size)).enumerate() {
            let absmax = absmaxes[first_block + b];
            for (x, &code) in out.iter_mut().zip(codes) {
                *x = DYNAMIC_MAP[usize::from(code)] * absmax;
            }
        }
    });
    Ok(())
}
