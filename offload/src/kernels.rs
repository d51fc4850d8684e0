//! Element-wise kernels over flat `f32` buffers: [`axpy`], [`scale`], [`copy`], [`fill_zero`] and the
//! STREAM-like [`triad`] that benchmarks use as the memory-bandwidth bound.
//!
//! Buffers of at least [`PARALLEL_MIN_VALUES`] values are cut into chunks of [`CHUNK_VALUES`] and the chunks
//! run on the rayon pool; smaller ones run on the calling thread, where waking the pool would cost more than
//! the work. Every output value depends only on the inputs at the same index, computed by the same code on
//! every path, so the result is bit-identical whatever the number of threads. The element loops are plain
//! zips over one chunk with the scalars hoisted, which the compiler turns into vector instructions.
//!
//! Lengths are our own invariant here (the callers size their buffers from one validated layout), so a
//! mismatch is a bug and panics with both lengths in the message.

use rayon::prelude::*;

/// Buffers with at least this many values (256 Ki, 1 MiB of `f32`) are processed on the rayon pool.
pub const PARALLEL_MIN_VALUES: usize = 256 * 1024;

/// Values per unit of parallel work (32 Ki, 128 KiB of `f32`): large enough that scheduling is negligible,
/// small enough that two threads balance and a chunk's arrays stay in the L2 cache while it is worked on.
pub const CHUNK_VALUES: usize = 32 * 1024;

/// `y[i] += alpha * x[i]` for every `i`.
///
/// # Panics
///
/// If `y` and `x` differ in length.
///
/// ```
/// let mut y = [1.0, 2.0];
/// colony_offload::kernels::axpy(&mut y, 0.5, &[4.0, -2.0]);
/// assert_eq!(y, [3.0, 1.0]);
/// ```
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len(), "axpy: y has {} values but x has {}", y.len(), x.len());
    if y.len() < PARALLEL_MIN_VALUES {
        axpy_chunk(y, alpha, x);
    } else {
        y.par_chunks_mut(CHUNK_VALUES)
            .zip(x.par_chunks(CHUNK_VALUES))
            .for_each(|(y, x)| axpy_chunk(y, alpha, x));
    }
}

fn axpy_chunk(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `y[i] *= alpha` for every `i`.
///
/// ```
/// let mut y = [1.0, -2.0];
/// colony_offload::kernels::scale(&mut y, 0.25);
/// assert_eq!(y, [0.25, -0.5]);
/// ```
pub fn scale(y: &mut [f32], alpha: f32) {
    let chunk = |y: &mut [f32]| {
        for y in y {
            *y *= alpha;
        }
    };
    if y.len() < PARALLEL_MIN_VALUES {
        chunk(y);
    } else {
        y.par_chunks_mut(CHUNK_VALUES).for_each(chunk);
    }
}

/// `dst[i] = src[i]` for every `i`.
///
/// # Panics
///
/// If `dst` and `src` differ in length.
pub fn copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(
        dst.len(),
        src.len(),
        "copy: dst has {} values but src has {}",
        dst.len(),
        src.len()
    );
    if dst.len() < PARALLEL_MIN_VALUES {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(CHUNK_VALUES)
            .zip(src.par_chunks(CHUNK_VALUES))
            .for_each(|(dst, src)| dst.copy_from_slice(src));
    }
}

/// `y[i] = 0` for every `i`.
pub fn fill_zero(y: &mut [f32]) {
    if y.len() < PARALLEL_MIN_VALUES {
        y.fill(0.0);
    } else {
        y.par_chunks_mut(CHUNK_VALUES).for_each(|y| y.fill(0.0));
    }
}

/// `a[i] = b[i] + scalar * c[i]` for every `i`: the STREAM triad, chunked and threaded like the other kernels.
///
/// Benchmarks time it as the machine's memory-bandwidth bound (it reads two arrays and writes one, 12 bytes per
/// value as STREAM counts them).
///
/// # Panics
///
/// If the three slices differ in length.
pub fn triad(a: &mut [f32], b: &[f32], scalar: f32, c: &[f32]) {
    assert!(
        a.len() == b.len() && a.len() == c.len(),
        "triad: a has {} values, b {} and c {}",
        a.len(),
        b.len(),
        c.len()
    );
    let chunk = |((a, b), c): ((&mut [f32], &[f32]), &[f32])| {
        for ((a, &b), &c) in a.iter_mut().zip(b).zip(c) {
            *a = b + scalar * c;
        }
    };
    if a.len() < PARALLEL_MIN_VALUES {
        chunk(((a, b), c));
    } else {
        a.par_chunks_mut(CHUNK_VALUES)
            .zip(b.par_chunks(CHUNK_VALUES))
            .zip(c.par_chunks(CHUNK_VALUES))
            .for_each(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random_values;

    #[test]
    fn small_buffers_give_exact_values() {
        let mut y = [1.0, -2.0, 0.5];
        axpy(&mut y, 2.0, &[0.25, 1.0, -1.0]);
        assert_eq!(y, [1.5, 0.0, -1.5]);
        scale(&mut y, -0.5);
        assert_eq!(y, [-0.75, -0.0, 0.75]);
        copy(&mut y, &[7.0, 8.0, 9.0]);
        assert_eq!(y, [7.0, 8.0, 9.0]);
        fill_zero(&mut y);
        assert_eq!(y, [0.0; 3]);
        let mut a = [0.0; 2];
        triad(&mut a, &[1.0, 2.0], 3.0, &[0.5, -1.0]);
        assert_eq!(a, [2.5, -1.0]);
    }

    /// The threaded path (1 Mi values, far above the threshold, with a ragged last chunk) against a plain
    /// sequential loop, bit for bit, on pools of one and of four threads.
    #[test]
    fn threaded_kernels_equal_sequential_loops_bit_for_bit() {
        let len = (1 << 20) + 13;
        let x = random_values(len, 1);
        let y0 = random_values(len, 2);
        let alpha = 0.123_456_7_f32;
        let mut axpy_expected = y0.clone();
        for (y, &x) in axpy_expected.iter_mut().zip(&x) {
            *y += alpha * x;
        }
        let scale_expected: Vec<f32> = y0.iter().map(|&y| y * alpha).collect();
        let triad_expected: Vec<f32> = y0.iter().zip(&x).map(|(&b, &c)| b + alpha * c).collect();
        for threads in [1, 4] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut y = y0.clone();
                axpy(&mut y, alpha, &x);
                assert!(bits_equal(&y, &axpy_expected), "axpy on {threads} threads");
                let mut y = y0.clone();
                scale(&mut y, alpha);
                assert!(bits_equal(&y, &scale_expected), "scale on {threads} threads");
                let mut a = vec![0.0; len];
                triad(&mut a, &y0, alpha, &x);
                assert!(bits_equal(&a, &triad_expected), "triad on {threads} threads");
                copy(&mut a, &x);
                assert!(bits_equal(&a, &x), "copy on {threads} threads");
                fill_zero(&mut a);
                assert!(a.iter().all(|v| v.to_bits() == 0), "fill_zero on {threads} threads");
            });
        }
    }

    fn bits_equal(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    #[should_panic(expected = "axpy: y has 2 values but x has 3")]
    fn axpy_refuses_mismatched_lengths() {
        axpy(&mut [0.0; 2], 1.0, &[0.0; 3]);
    }

    #[test]
    #[should_panic(expected = "copy: dst has 1 values but src has 0")]
    fn copy_refuses_mismatched_lengths() {
        copy(&mut [0.0; 1], &[]);
    }
}
