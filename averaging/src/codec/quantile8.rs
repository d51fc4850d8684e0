//! [`Codec::Quantile8Bit`](super::Codec::Quantile8Bit): 256 buckets cut at approximate quantiles of the part;
//! each bucket decodes to the mean of the values that fell into it.
//!
//! A value's bucket is its rank scaled to `0..=255` and rounded: bucket `k` holds the values whose rank lies
//! within half a step of the quantile `k / 255`. The 254 inner buckets hold `n / 255` values each and the two
//! end buckets half that: the extreme buckets collect the tails, whose spread dominates the error, so making
//! them narrower lowers the error on normal data by about a third against 256 equal buckets.
//!
//! Ranks come from an exact histogram over 65,536 bins of the values' top 16 bits (sign, exponent and the 7
//! leading mantissa bits, ordered as the floats are): a bin spans at most 2⁻⁷ of its values' magnitude, and
//! bucket borders fall on bin edges, a bin going to the bucket of its middle rank. Buckets are thus contiguous
//! runs of bins, a constant part lands in one bucket (128) that decodes exactly, and quantizing is one table
//! look-up per value. The counts are integers, so the histogram does not depend on how the counting was split
//! across threads.

use rayon::prelude::*;

use super::codebook::{self, BucketSums, CODEBOOK_LEN};
use super::support::{CHUNK, Exec};

/// Bins of the histogram: one per value of a float's top 16 bits.
const BINS: usize = 1 << 16;
/// Values quantized at a time before their bucket sums are taken.
const BATCH: usize = 1024;

/// A float's bin: its top 16 bits after a map that orders bit patterns as the floats are ordered (negative
/// floats have all bits flipped, positive ones the sign bit set).
#[inline]
fn bin(x: f32) -> usize {
    let bits = x.to_bits();
    let flip = ((bits as i32 >> 31) as u32) | 0x8000_0000;
    ((bits ^ flip) >> 16) as usize
}

fn count_bins(values: &[f32], counts: &mut [u64; BINS]) {
    for &x in values {
        counts[bin(x)] += 1;
    }
}

fn as_bins(counts: &mut [u64]) -> &mut [u64; BINS] {
    counts.try_into().expect("histograms are allocated with BINS entries")
}

fn histogram(values: &[f32], exec: Exec) -> Vec<u64> {
    match exec {
        Exec::Sequential => {
            let mut counts = vec![0u64; BINS];
            count_bins(values, as_bins(&mut counts));
            counts
        }
        // Integer counts add up to the same histogram however the work is split.
        Exec::Parallel => values
            .par_chunks(CHUNK)
            .fold(
                || vec![0u64; BINS],
                |mut counts, chunk| {
                    count_bins(chunk, as_bins(&mut counts));
                    counts
                },
            )
            .reduce(
                || vec![0u64; BINS],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            ),
    }
}

/// The bucket of every occupied bin (its middle rank, scaled to `0..=255` and rounded), and each bucket's
/// count. Entries of empty bins are left at 0: the quantizing pass looks up only bins of the same values that
/// were counted, so it never reads them (and skipping them keeps small parts cheap).
fn buckets_of_bins(counts: &[u64], n: usize) -> (Box<[u8; BINS]>, [u64; CODEBOOK_LEN]) {
    // With m = 2 · (values below the bin) + (values in it), twice the middle rank, the bucket is
    // ⌊(255 · m + n) / 2n⌋, i.e. at least k when m ≥ n · (2k − 1) / 255. The 255 thresholds are computed once.
    // (n ≤ 2⁶¹ for a slice of f32, so m ≤ 2n fits in u64.)
    let n = n as u64;
    let mut thresholds = [0u64; CODEBOOK_LEN - 1];
    for (k, threshold) in (1u128..).zip(thresholds.iter_mut()) {
        *threshold = (u128::from(n) * (2 * k - 1)).div_ceil(255) as u64;
    }
    let mut lut = Box::new([0u8; BINS]);
    let mut bucket_counts = [0u64; CODEBOOK_LEN];
    let mut below = 0u64;
    let mut bucket = 0usize;
    for (entry, &count) in lut.iter_mut().zip(counts) {
        if count == 0 {
            continue;
        }
        let twice_middle = 2 * below + count;
        while bucket < CODEBOOK_LEN - 1 && twice_middle >= thresholds[bucket] {
            bucket += 1;
        }
        *entry = bucket as u8;
        bucket_counts[bucket] += count;
        below += count;
    }
    (lut, bucket_counts)
}

pub(crate) fn encode(values: &[f32], out: &mut Vec<u8>, exec: Exec) {
    let (head, indices) = codebook::grow(out, values.len(), exec);
    if values.is_empty() {
        codebook::write_codebook(head, &[0.0; CODEBOOK_LEN], &[0; CODEBOOK_LEN]);
        return;
    }
    let (lut, counts) = buckets_of_bins(&histogram(values, exec), values.len());
    let lut: &[u8; BINS] = &lut;
    let parts = exec.zip_chunks_map(values, CHUNK, indices, CHUNK, |_, values, indices| {
        let mut sums = BucketSums::new();
        for (values, indices) in values.chunks(BATCH).zip(indices.chunks_mut(BATCH)) {
            for (q, &x) in indices.iter_mut().zip(values) {
                *q = lut[bin(x)];
            }
            sums.add::<false>(values, indices);
        }
        sums.totals().0
    });
    let mut sums = [0.0f64; CODEBOOK_LEN];
    for part in parts {
        for (sum, part) in sums.iter_mut().zip(&part) {
            *sum += part;
        }
    }
    codebook::write_codebook(head, &sums, &counts);
}
