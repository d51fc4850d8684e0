//! [`Codec::Uniform8Bit`](super::Codec::Uniform8Bit): 256 equal-width buckets centred on the mean and spanning
//! ± 3 unbiased standard deviations; values beyond fall into the first or last bucket. Each bucket decodes to the
//! mean of the values that fell into it.
//!
//! With `shift = mean`, `scale = 6σ / 256` (σ the unbiased standard deviation), a value's index is
//! `clamp(round((x − shift) / scale) + 128, 0, 255)` (halves round to even). A part with σ = 0 (constants, one value)
//! puts everything into bucket 128, which then decodes to the exact constant.

use super::codebook::{self, BucketSums};
use super::support::{CHUNK, Exec, ShiftedSums};

/// Values quantized at a time before their bucket sums are taken (the quantization loop vectorises; the
/// scattered sums cannot).
const BATCH: usize = 1024;

pub(crate) fn encode(values: &[f32], out: &mut Vec<u8>, exec: Exec) {
    let (head, indices) = codebook::grow(out, values.len(), exec);
    let n = values.len();
    let pivot = values.first().map_or(0.0, |&x| f64::from(x));
    let (mean, deviance) = ShiftedSums::of(values, pivot, exec).mean_and_deviance(pivot, n);
    let std = if n > 1 { (deviance / (n - 1) as f64).sqrt() } else { 0.0 };
    let shift = mean as f32;
    // 1 / scale, computed in f64 and saturated, so that a tiny deviation cannot make it infinite (and a zero
    // or NaN one leaves every value in the middle bucket).
    let inverse_scale = if std > 0.0 {
        ((256.0 / (6.0 * std)) as f32).min(f32::MAX)
    } else {
        0.0
    };
    let parts = exec.zip_chunks_map(values, CHUNK, indices, CHUNK, |_, values, indices| {
        let mut sums = BucketSums::new();
        for (values, indices) in values.chunks(BATCH).zip(indices.chunks_mut(BATCH)) {
            quantize(values, indices, shift, inverse_scale);
            sums.add::<true>(values, indices);
        }
        sums.totals()
    });
    let (sums, counts) = codebook::merge(parts);
    codebook::write_codebook(head, &sums, &counts);
}

/// `index = round(clamp((x − shift) · inverse_scale + 128, 0, 255))`, halves to even; NaN goes to 0.
///
/// Rounding adds 1.5 · 2²³: the sum's last mantissa bits are then the rounded integer (for values in
/// `[0, 2²²]`), which vectorises where a saturating float-to-integer conversion does not.
#[inline]
fn quantize(values: &[f32], indices: &mut [u8], shift: f32, inverse_scale: f32) {
    const ROUND: f32 = 12_582_912.0;
    for (q, &x) in indices.iter_mut().zip(values) {
        let position = ((x - shift) * inverse_scale + 128.0).clamp(0.0, 255.0);
        *q = (position + ROUND).to_bits() as u8;
    }
}
