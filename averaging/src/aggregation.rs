//! How a reducer combines the senders' copies of a part: the weighted mean, or CenteredClip, a robust
//! aggregate that bounds how far one bad sender can pull the result.
//!
//! The mean lets any one sender move the average anywhere: a peer that sends its gradient scaled by 10³, or
//! random values, moves everyone's step by that much over the group size. CenteredClip (from the BTARD
//! paper, Gorbunov et al., "Secure Distributed Training at Scale") starts from a centre and repeats
//!
//! ```text
//! v ← v + (1/Σw) · Σ_i w_i · (x_i − v) · min(1, τ·√n / ‖x_i − v‖)
//! ```
//!
//! for a fixed number of iterations: each sender pulls the centre towards its copy with a force bounded by
//! τ, so a far-away copy counts as if it lay at distance τ, while copies within τ of the centre count fully
//! (with no copy clipped, one iteration gives the weighted mean).
//!
//! Colony's choices, each for a reason:
//! - **τ is per value.** The norm is taken over one part of `n` values and compared with `τ·√n`, so τ is a
//!   bound on the root-mean-square deviation per value and one τ suits every part size and tensor (parts are
//!   cut by bytes, and a tensor's last part is shorter).
//! - **The first centre is the coordinate-wise weighted median** of the copies. BTARD starts from the
//!   previous round's centre, which a reducer does not keep (each round reduces other parts with other
//!   groups). The median lies within the honest copies' range in every coordinate as long as the honest
//!   senders hold more than half the weight, so the iterations start near the honest copies rather than at a
//!   mean an outlier has already dragged away, and few iterations are enough.
//! - **The iteration count is fixed** (no convergence test), so every reducer does the same work and the
//!   result does not depend on a tolerance.
//!
//! Its cost: the reducer holds every sender's copy of a part until the last one arrives (memory of the group
//! size times the part size per part in flight, where the mean keeps one running sum), and reduces each part
//! with `2 · iterations + 1` passes over all copies, plus a small sort per value for the median.

use thiserror::Error;

/// The iteration count used when a configuration gives none.
pub const DEFAULT_CENTERED_CLIP_ITERATIONS: u32 = 5;

/// How a reducer combines the copies of a part it receives from the group's senders.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Aggregation {
    /// `Σ w·x / Σ w`: exact, one running sum per part; any one sender can move it arbitrarily far.
    #[default]
    Mean,
    /// CenteredClip around the coordinate-wise weighted median: each sender's pull on the result is bounded.
    CenteredClip {
        /// The clipping radius, as a root-mean-square deviation per value (in the units of the values): a
        /// copy whose deviation from the centre is larger pulls as if it were this far. Finite and above 0.
        /// Choose it above the honest senders' typical deviation from their mean, so that they are not
        /// clipped; below it the result drifts towards the median.
        tau: f32,
        /// Clipping iterations after the median; at least 1.
        iterations: u32,
    },
}

/// Why an [`Aggregation`] is unusable.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AggregationError {
    /// τ is not a finite number above zero.
    #[error("centered clip's tau is {0}; it must be a finite number above 0 (a deviation per value)")]
    InvalidTau(f32),
    /// No iteration was asked for.
    #[error("centered clip needs at least 1 iteration, got 0")]
    NoIterations,
}

impl Aggregation {
    /// Checks τ and the iteration count.
    ///
    /// ```
    /// use colony_averaging::aggregation::{Aggregation, AggregationError};
    ///
    /// assert!(Aggregation::CenteredClip { tau: 0.1, iterations: 5 }.validate().is_ok());
    /// let error = Aggregation::CenteredClip { tau: 0.0, iterations: 5 }.validate().unwrap_err();
    /// assert_eq!(error, AggregationError::InvalidTau(0.0));
    /// ```
    pub fn validate(&self) -> Result<(), AggregationError> {
        match *self {
            Self::Mean => Ok(()),
            Self::CenteredClip { tau, iterations } => {
                if !(tau.is_finite() && tau > 0.0) {
                    Err(AggregationError::InvalidTau(tau))
                } else if iterations == 0 {
                    Err(AggregationError::NoIterations)
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The result of [`centered_clip`].
#[derive(Debug, Clone, PartialEq)]
pub struct Clipped {
    /// The robust centre.
    pub values: Vec<f32>,
    /// How many copies were clipped in the last iteration (their deviation exceeded τ per value).
    pub clipped: usize,
}

/// CenteredClip of `copies` with relative `weights` (one per copy, all positive, at least one copy, every
/// copy as long as the first): `iterations` clipping steps of radius `tau` per value from the coordinate-wise
/// weighted median. The caller checks the arguments ([`Aggregation::validate`]); the function neither
/// panics nor divides by zero on its own inputs: a zero distance is never clipped.
///
/// ```
/// use colony_averaging::aggregation::centered_clip;
///
/// // Three copies near 1 and one far outlier: the result stays near 1.
/// let copies: [&[f32]; 4] = [&[1.0, 1.0], &[1.1, 0.9], &[0.9, 1.1], &[1000.0, -1000.0]];
/// let result = centered_clip(&copies, &[1.0; 4], 0.5, 5);
/// assert!(result.values.iter().all(|v| (v - 1.0).abs() < 0.25), "{:?}", result.values);
/// assert_eq!(result.clipped, 1);
/// ```
pub fn centered_clip(copies: &[&[f32]], weights: &[f32], tau: f32, iterations: u32) -> Clipped {
    debug_assert_eq!(copies.len(), weights.len());
    let Some(first) = copies.first() else {
        return Clipped {
            values: Vec::new(),
            clipped: 0,
        };
    };
    let len = first.len();
    debug_assert!(copies.iter().all(|c| c.len() == len));
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let mut centre = weighted_median(copies, weights);
    if copies.len() == 1 || len == 0 {
        return Clipped {
            values: centre,
            clipped: 0,
        };
    }
    // Compared with the squared norm, so no square root per copy: ‖d‖ > τ·√n ⇔ ‖d‖² > τ²·n.
    let radius = f64::from(tau) * (len as f64).sqrt();
    let mut step = vec![0.0f32; len];
    let mut clipped = 0;
    for _ in 0..iterations {
        step.fill(0.0);
        clipped = 0;
        for (copy, &weight) in copies.iter().zip(weights) {
            let distance = squared_distance(copy, &centre).sqrt();
            let factor = if distance > radius {
                clipped += 1;
                radius / distance
            } else {
                1.0
            };
            add_scaled_difference(&mut step, copy, &centre, (f64::from(weight) * factor / total) as f32);
        }
        for (value, delta) in centre.iter_mut().zip(&step) {
            *value += delta;
        }
    }
    if !centre.iter().all(|v| v.is_finite()) {
        // Only inputs near f32's limits with a τ of the same order get here: the median is finite.
        centre = weighted_median(copies, weights);
    }
    Clipped {
        values: centre,
        clipped,
    }
}

/// `Σ (a − b)²`: in `f32` blocks summed in `f64` (vectorised), or wholly in `f64` when a block overflows
/// (a difference of two finite `f32` can exceed `f32`'s range), so the result is finite for finite inputs.
fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for (x, y) in a.chunks(256).zip(b.chunks(256)) {
        // Eight independent lanes, so the compiler may vectorise the sum (it keeps one ordered sum otherwise).
        let mut lanes = [0.0f32; 8];
        let (x_lanes, y_lanes) = (x.chunks_exact(8), y.chunks_exact(8));
        let (x_rest, y_rest) = (x_lanes.remainder(), y_lanes.remainder());
        for (x, y) in x_lanes.zip(y_lanes) {
            for ((lane, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
                let d = x - y;
                *lane += d * d;
            }
        }
        let mut block: f32 = lanes.iter().sum();
        for (&x, &y) in x_rest.iter().zip(y_rest) {
            block += (x - y) * (x - y);
        }
        total += if block.is_finite() {
            f64::from(block)
        } else {
            x.iter()
                .zip(y)
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum()
        };
    }
    total
}

/// `step += coefficient · (copy − centre)`, element-wise. Only copies near `f32`'s limits can overflow
/// here; the caller then falls back to the median.
fn add_scaled_difference(step: &mut [f32], copy: &[f32], centre: &[f32], coefficient: f32) {
    for ((s, &x), &c) in step.iter_mut().zip(copy).zip(centre) {
        *s += coefficient * (x - c);
    }
}

/// The coordinate-wise weighted median of `copies`: per value, the smallest copy value at which the
/// cumulative weight reaches half the total (the mean of it and the next one when it reaches exactly half,
/// as the plain median of an even count does).
pub fn weighted_median(copies: &[&[f32]], weights: &[f32]) -> Vec<f32> {
    let Some(first) = copies.first() else {
        return Vec::new();
    };
    if copies.len() == 1 {
        return first.to_vec();
    }
    if weights.iter().all(|&w| w == weights[0]) {
        return median(copies);
    }
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let half = total / 2.0;
    let mut column: Vec<(f32, f32)> = Vec::with_capacity(copies.len());
    (0..first.len())
        .map(|i| {
            column.clear();
            column.extend(copies.iter().zip(weights).map(|(copy, &w)| (copy[i], w)));
            column.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
            let mut cumulative = 0.0f64;
            for (k, &(value, weight)) in column.iter().enumerate() {
                cumulative += f64::from(weight);
                if cumulative >= half {
                    return match column.get(k + 1) {
                        Some(&(next, _)) if cumulative == half => value / 2.0 + next / 2.0,
                        _ => value,
                    };
                }
            }
            column.last().map_or(0.0, |&(value, _)| value)
        })
        .collect()
}

/// Groups up to this size take the median by ranks (branch-free, vectorised across values, `n²` compares
/// per value); larger ones by a selection per value.
const RANKED_MEDIAN_MAX_COPIES: usize = 24;

/// The plain coordinate-wise median (equal weights, the gradient rounds' case).
fn median(copies: &[&[f32]]) -> Vec<f32> {
    let n = copies.len();
    let len = copies[0].len();
    if n > RANKED_MEDIAN_MAX_COPIES {
        let mut column = vec![0.0f32; n];
        return (0..len)
            .map(|i| {
                for (slot, copy) in column.iter_mut().zip(copies) {
                    *slot = copy[i];
                }
                let (lower, &mut upper, _) = column.select_nth_unstable_by(n / 2, f32::total_cmp);
                if n % 2 == 1 {
                    upper
                } else {
                    lower.iter().copied().fold(f32::NEG_INFINITY, f32::max) / 2.0 + upper / 2.0
                }
            })
            .collect();
    }
    // A copy's rank is how many copies lie below it (ties broken by index, so the ranks are a permutation);
    // the median is the copy of rank n/2 (with the one of rank n/2 − 1 for an even count). Blocks of fixed
    // width let the compiler vectorise the compares; the tail is padded.
    const BLOCK: usize = 64;
    let mut out = vec![0.0f32; len];
    let (upper_rank, lower_rank) = ((n / 2) as u32, (n / 2).wrapping_sub(1) as u32);
    let mut columns = vec![[0.0f32; BLOCK]; n];
    for start in (0..len).step_by(BLOCK) {
        let end = (start + BLOCK).min(len);
        for (column, copy) in columns.iter_mut().zip(copies) {
            column[..end - start].copy_from_slice(&copy[start..end]);
        }
        let mut upper = [0.0f32; BLOCK];
        let mut lower = [0.0f32; BLOCK];
        for (k, candidate) in columns.iter().enumerate() {
            let mut ranks = [0u32; BLOCK];
            for (m, other) in columns.iter().enumerate() {
                if m < k {
                    for j in 0..BLOCK {
                        ranks[j] += u32::from(other[j] <= candidate[j]);
                    }
                } else if m > k {
                    for j in 0..BLOCK {
                        ranks[j] += u32::from(other[j] < candidate[j]);
                    }
                }
            }
            for j in 0..BLOCK {
                if ranks[j] == upper_rank {
                    upper[j] = candidate[j];
                }
                if ranks[j] == lower_rank {
                    lower[j] = candidate[j];
                }
            }
        }
        for (j, out) in out[start..end].iter_mut().enumerate() {
            *out = if n % 2 == 1 {
                upper[j]
            } else {
                lower[j] / 2.0 + upper[j] / 2.0
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64, for reproducible test vectors.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Roughly standard normal (sum of uniforms), enough for spread-out test values.
        fn normal(&mut self) -> f32 {
            let sum: f32 = (0..12)
                .map(|_| (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
                .sum();
            sum - 6.0
        }
    }

    fn weighted_mean(copies: &[Vec<f32>], weights: &[f32]) -> Vec<f64> {
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        (0..copies[0].len())
            .map(|i| {
                copies
                    .iter()
                    .zip(weights)
                    .map(|(c, &w)| f64::from(w) * f64::from(c[i]))
                    .sum::<f64>()
                    / total
            })
            .collect()
    }

    fn norm(values: impl Iterator<Item = f64>) -> f64 {
        values.map(|v| v * v).sum::<f64>().sqrt()
    }

    fn refs(copies: &[Vec<f32>]) -> Vec<&[f32]> {
        copies.iter().map(Vec::as_slice).collect()
    }

    /// Seven honest copies around a common signal (unit noise) and, when `outlier` is given, an eighth copy
    /// that is the honest copy 0 times it.
    fn group(rng: &mut Rng, len: usize, outlier: Option<f32>) -> Vec<Vec<f32>> {
        let signal: Vec<f32> = (0..len).map(|_| 3.0 * rng.normal()).collect();
        let mut copies: Vec<Vec<f32>> = (0..7)
            .map(|_| signal.iter().map(|s| s + rng.normal()).collect())
            .collect();
        if let Some(scale) = outlier {
            copies.push(copies[0].iter().map(|v| v * scale).collect());
        }
        copies
    }

    #[test]
    fn validation_names_what_is_wrong() {
        assert_eq!(Aggregation::Mean.validate(), Ok(()));
        assert_eq!(Aggregation::default(), Aggregation::Mean);
        for tau in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let error = Aggregation::CenteredClip { tau, iterations: 3 }.validate().unwrap_err();
            assert!(matches!(error, AggregationError::InvalidTau(_)), "{tau}: {error}");
            assert!(error.to_string().contains("tau"), "{error}");
        }
        let error = Aggregation::CenteredClip {
            tau: 1.0,
            iterations: 0,
        }
        .validate()
        .unwrap_err();
        assert_eq!(error, AggregationError::NoIterations);
        assert!(error.to_string().contains("at least 1 iteration"), "{error}");
        assert_eq!(
            Aggregation::CenteredClip {
                tau: f32::MIN_POSITIVE,
                iterations: 1
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn an_outlier_a_thousand_times_larger_is_bounded() {
        let mut rng = Rng(3);
        let len = 1000;
        let copies = group(&mut rng, len, Some(1e3));
        let honest = weighted_mean(&copies[..7], &[1.0; 7]);
        let mean = weighted_mean(&copies, &[1.0; 8]);
        let off = |values: &[f32]| norm(values.iter().zip(&honest).map(|(&v, h)| f64::from(v) - h));
        let mean_f32: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
        let tau = 2.0;
        let result = centered_clip(&refs(&copies), &[1.0; 8], tau, 5);
        // The mean is dragged ~125 times the signal away; the clipped centre moves by at most the outlier's
        // bounded pull, w_outlier / w_honest · τ·√n, plus what the honest copies' own clipping leaves.
        let bound = (1.0 / 7.0) * f64::from(tau) * (len as f64).sqrt();
        assert!(
            off(&mean_f32) > 1000.0 * bound,
            "the mean is far off: {}",
            off(&mean_f32)
        );
        assert!(
            off(&result.values) <= 1.5 * bound,
            "{} > {}",
            off(&result.values),
            1.5 * bound
        );
        // The honest copies deviate by about 1 per value, below τ: only the outlier is clipped.
        assert_eq!(result.clipped, 1);
        // Random values instead of a scaled copy: bounded too.
        let mut random = copies.clone();
        random[7] = (0..len).map(|_| 1e3 * rng.normal()).collect();
        let result = centered_clip(&refs(&random), &[1.0; 8], tau, 5);
        assert!(
            off(&result.values) <= 1.5 * bound,
            "{} > {}",
            off(&result.values),
            1.5 * bound
        );
    }

    #[test]
    fn without_outliers_and_with_a_large_tau_it_is_the_weighted_mean() {
        let mut rng = Rng(5);
        let copies = group(&mut rng, 300, None);
        let weights = [1.0, 2.0, 0.5, 3.0, 1.0, 0.25, 4.0];
        let expected = weighted_mean(&copies, &weights);
        for iterations in [1, 2, 10] {
            let result = centered_clip(&refs(&copies), &weights, 1e6, iterations);
            assert_eq!(result.clipped, 0);
            for (i, (&got, &want)) in result.values.iter().zip(&expected).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{iterations} iterations, value {i}: {got} against {want}"
                );
            }
        }
    }

    #[test]
    fn weights_are_respected() {
        // Two copies far apart: the heavier one holds the median and, clipped, the centre stays nearer it.
        let a = vec![0.0f32; 16];
        let b = vec![10.0f32; 16];
        let copies: [&[f32]; 2] = [&a, &b];
        assert_eq!(weighted_median(&copies, &[3.0, 1.0]), vec![0.0; 16]);
        assert_eq!(weighted_median(&copies, &[1.0, 3.0]), vec![10.0; 16]);
        assert_eq!(weighted_median(&copies, &[1.0, 1.0]), vec![5.0; 16]);
        // With τ = 1 per value b pulls by at most 1 per value in a quarter of the weight, while a (within τ)
        // pulls back by three quarters of the distance: v ← v + (1/4 − 3v/4), from the median 0 towards the
        // balance 1/3, which the mean (2.5) is far from. After k iterations v = (1 − 4^−k)/3.
        let result = centered_clip(&copies, &[3.0, 1.0], 1.0, 4);
        let expected = (1.0 - 0.25f32.powi(4)) / 3.0;
        assert!(
            result.values.iter().all(|&v| (v - expected).abs() < 1e-5),
            "{:?}",
            result.values
        );
        assert_eq!(result.clipped, 1);
        // A large τ gives the weighted mean, 2.5.
        let result = centered_clip(&copies, &[3.0, 1.0], 100.0, 1);
        assert!(
            result.values.iter().all(|&v| (v - 2.5).abs() < 1e-5),
            "{:?}",
            result.values
        );
        // Doubling every weight changes nothing.
        let mut rng = Rng(9);
        let group = group(&mut rng, 50, Some(-200.0));
        let once = centered_clip(&refs(&group), &[1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0], 0.5, 5);
        let twice = centered_clip(&refs(&group), &[2.0, 4.0, 2.0, 2.0, 6.0, 2.0, 2.0, 2.0], 0.5, 5);
        for (x, y) in once.values.iter().zip(&twice.values) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} against {y}");
        }
    }

    #[test]
    fn the_median_of_equal_weights_is_the_weighted_median() {
        let mut rng = Rng(17);
        for n in (2..10).chain([24, 25, 30, 31]) {
            let copies: Vec<Vec<f32>> = (0..n).map(|_| (0..50).map(|_| rng.normal()).collect()).collect();
            let plain = weighted_median(&refs(&copies), &vec![1.0; n]);
            // Unequal by a hair: the weighted path, which must agree.
            let mut weights = vec![1.0f32; n];
            weights[0] = 1.0 + 1e-6;
            let weighted = weighted_median(&refs(&copies), &weights);
            if n % 2 == 1 {
                assert_eq!(plain, weighted, "{n} copies");
            }
            for (i, value) in plain.iter().enumerate() {
                let mut column: Vec<f32> = copies.iter().map(|c| c[i]).collect();
                column.sort_by(f32::total_cmp);
                let expected = if n % 2 == 1 {
                    column[n / 2]
                } else {
                    column[n / 2 - 1] / 2.0 + column[n / 2] / 2.0
                };
                assert_eq!(*value, expected, "{n} copies, value {i}");
            }
        }
    }

    #[test]
    fn the_weighted_median_by_hand() {
        let copies: [&[f32]; 5] = [&[5.0, -1.0], &[1.0, -2.0], &[4.0, -3.0], &[2.0, -4.0], &[3.0, f32::MAX]];
        assert_eq!(weighted_median(&copies, &[1.0; 5]), vec![3.0, -2.0]);
        // Weight piles onto the first copy: it is the median.
        assert_eq!(weighted_median(&copies, &[10.0, 1.0, 1.0, 1.0, 1.0]), vec![5.0, -1.0]);
        let single: [&[f32]; 1] = [&[7.0, 8.0]];
        assert_eq!(weighted_median(&single, &[1.0]), vec![7.0, 8.0]);
        assert_eq!(weighted_median(&[], &[]), Vec::<f32>::new());
    }

    /// CenteredClip's cost against the mean's on the same copies (8 senders, 512 KiB parts of f32, 5
    /// iterations), both measured in this run. Run with `cargo test --release -p colony-averaging --lib
    /// aggregation::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark; run by hand in release mode"]
    fn throughput() {
        use std::time::Instant;
        const PART: usize = 1 << 17;
        const PARTS: usize = 16;
        let mut rng = Rng(1);
        let copies: Vec<Vec<f32>> = (0..8).map(|_| (0..PART).map(|_| rng.normal()).collect()).collect();
        let refs = refs(&copies);
        let weights = [1.0f32; 8];
        let start = Instant::now();
        let mut checksum = 0.0f32;
        for _ in 0..PARTS {
            let mut sum = vec![0.0f32; PART];
            for copy in &refs {
                for (s, &x) in sum.iter_mut().zip(copy.iter()) {
                    *s += x;
                }
            }
            checksum += std::hint::black_box(&sum)[0] / 8.0;
        }
        let mean = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..PARTS {
            checksum += std::hint::black_box(centered_clip(&refs, &weights, 0.5, 5)).values[0];
        }
        let clip = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..PARTS {
            checksum += std::hint::black_box(weighted_median(&refs, &weights))[0];
        }
        let median = start.elapsed().as_secs_f64();
        let gb = (8 * PART * PARTS * 4) as f64 / 1e9;
        println!(
            "mean: {:.2} GB/s of input; centered clip (5 iterations): {:.2} GB/s, {:.1} times the mean's time, \
             {:.0} % of it in the median (checksum {checksum})",
            gb / mean,
            gb / clip,
            clip / mean,
            100.0 * median / clip
        );
    }

    #[test]
    fn degenerate_inputs_neither_panic_nor_divide_by_zero() {
        assert_eq!(centered_clip(&[], &[], 1.0, 3).values, Vec::<f32>::new());
        let same: [&[f32]; 3] = [&[2.0, 2.0], &[2.0, 2.0], &[2.0, 2.0]];
        let result = centered_clip(&same, &[1.0; 3], 1e-30, 3);
        assert_eq!((result.values, result.clipped), (vec![2.0, 2.0], 0));
        let empty: [&[f32]; 2] = [&[], &[]];
        assert_eq!(centered_clip(&empty, &[1.0; 2], 1.0, 3).values, Vec::<f32>::new());
        // Values near f32's limits stay finite.
        let large: [&[f32]; 3] = [&[3e38], &[-3e38], &[3e38]];
        let result = centered_clip(&large, &[1.0; 3], 1.0, 3);
        assert!(result.values[0].is_finite(), "{:?}", result.values);
    }
}
