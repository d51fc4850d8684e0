//! Load balancing: how many values of the averaged vector each member of a group reduces.
//!
//! In the butterfly all-reduce every peer sends all but its own share of the vector and receives, from
//! each of the `N − 1` others, its own share: peer `i` with fraction `w_i` moves `V·(1 + (N − 2)·w_i)`
//! values through a link of bandwidth `b_i`. The round lasts as long as the slowest peer, so the fractions
//! solve the linear programme
//!
//! ```text
//! minimise ξ  subject to  w ≥ 0,  Σ w = 1,  w_i = 0 where b_i = 0,  (1 + (N − 2)·w_i) / b_i ≤ ξ where b_i > 0
//! ```
//!
//! Every member computes the split on its own and they must agree to the last value, so the programme is
//! solved in closed form ([`optimal_fractions`]) rather than by an iterative solver, with sums taken in an
//! order that does not depend on the order of the peers. The fractions are then turned into whole values
//! with the Hagenbach-Bischoff method ([`hagenbach_bischoff`]).

use thiserror::Error;

/// Why no split could be computed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum BalanceError {
    /// The group is empty.
    #[error("cannot balance load among zero peers")]
    NoPeers,
    /// Every peer has bandwidth zero (or is a client): nobody would reduce anything.
    #[error("all {num_peers} peers have bandwidth 0 (or are clients): nobody can reduce; one must accept parts")]
    NobodyCanReduce {
        /// Size of the group.
        num_peers: usize,
    },
    /// A peer reported a bandwidth that is negative, NaN or infinite.
    #[error("peer {peer} reported bandwidth {value}; bandwidths must be finite and non-negative")]
    InvalidBandwidth {
        /// Index of the peer in the group.
        peer: usize,
        /// The reported value.
        value: f64,
    },
}

/// Splits a vector of `vector_size` values among peers with the given bandwidths.
///
/// `None` is a peer that did not report its bandwidth: it counts as the mean of the reported positive
/// bandwidths (and, when nobody reported one, every `None` peer gets an equal share). A bandwidth of 0 —
/// also how callers pass a client-mode peer — reduces nothing. Fractions that would give a peer fewer than
/// `min_vector_size` values are dropped (unless every fraction is that small), so no peer pays the fixed
/// cost of a stream for a handful of values. The result sums to `vector_size` and is identical on every
/// peer that passes the same inputs.
///
/// ```
/// use colony_averaging::balance::load_balance_peers;
/// assert_eq!(load_balance_peers(100, &[None, None], 0).unwrap(), vec![50, 50]);
/// let clients_and_unknown = [Some(0.0), Some(0.0), Some(0.0), None, None];
/// assert_eq!(load_balance_peers(100, &clients_and_unknown, 0).unwrap(), vec![0, 0, 0, 50, 50]);
/// assert!(load_balance_peers(100, &[Some(0.0), Some(0.0), Some(0.0)], 0).is_err());
/// ```
pub fn load_balance_peers(
    vector_size: usize,
    bandwidths: &[Option<f64>],
    min_vector_size: usize,
) -> Result<Vec<usize>, BalanceError> {
    let mut fractions = balance_fractions(bandwidths)?;
    drop_small_fractions(&mut fractions, vector_size, min_vector_size);
    Ok(hagenbach_bischoff(vector_size, &fractions))
}

/// The real-valued fractions (summing to 1) that [`load_balance_peers`] rounds: exposed so callers and
/// tests can see the split before rounding and before small shares are dropped.
pub fn balance_fractions(bandwidths: &[Option<f64>]) -> Result<Vec<f64>, BalanceError> {
    if bandwidths.is_empty() {
        return Err(BalanceError::NoPeers);
    }
    for (peer, bandwidth) in bandwidths.iter().enumerate() {
        if let Some(value) = *bandwidth
            && !(value.is_finite() && value >= 0.0)
        {
            return Err(BalanceError::InvalidBandwidth { peer, value });
        }
    }
    let positive: Vec<f64> = bandwidths.iter().flatten().copied().filter(|&b| b > 0.0).collect();
    if positive.is_empty() {
        if bandwidths.iter().all(Option::is_some) {
            return Err(BalanceError::NobodyCanReduce {
                num_peers: bandwidths.len(),
            });
        }
        // Nobody measured anything: the unmeasured peers share equally.
        let count = bandwidths.iter().filter(|b| b.is_none()).count() as f64;
        return Ok(bandwidths
            .iter()
            .map(|b| if b.is_none() { 1.0 / count } else { 0.0 })
            .collect());
    }
    // Each value is at most f64::MAX / len after the division, so the sum cannot overflow.
    let len = positive.len() as f64;
    let mean = order_independent_sum(positive.iter().map(|b| b / len));
    let known: Vec<f64> = bandwidths.iter().map(|b| b.unwrap_or(mean)).collect();
    Ok(optimal_fractions(&known))
}

/// The optimum of the load-balancing programme (see the module docs) for known bandwidths.
///
/// With `N` peers, `K` of them with positive bandwidth (total `B`, smallest `b_min`), the optimum time is
/// `ξ* = max(1/b_min, (N − 2 + K)/B)`. When the second term wins, the optimum is unique:
/// `w_i = (ξ*·b_i − 1)/(N − 2)`. When `1/b_min` wins, the slowest peer's sending time bounds the round
/// whatever the split, and many splits are optimal; this picks the one that shares the load in proportion
/// to each peer's headroom `ξ*·b_i − 1` (so the slowest peers reduce nothing), a deterministic centre of
/// the optimal set. With two peers every split is optimal and each positive peer gets an equal share.
///
/// Bandwidths that are not positive finite numbers count as 0. The result sums to 1 (up to rounding), or
/// is all zeros when no bandwidth is positive. Permuting the input permutes the output, bit for bit.
///
/// ```
/// use colony_averaging::balance::optimal_fractions;
/// assert_eq!(optimal_fractions(&[1.0, 1.0, 1.0, 1.0]), vec![0.25; 4]);
/// // 1/b_min dominates: the middle peer has no headroom.
/// assert_eq!(optimal_fractions(&[2.0, 1.0, 2.0]), vec![0.5, 0.0, 0.5]);
/// assert_eq!(optimal_fractions(&[0.0, 3.0]), vec![0.0, 1.0]);
/// ```
pub fn optimal_fractions(bandwidths: &[f64]) -> Vec<f64> {
    let usable = |b: f64| b.is_finite() && b > 0.0;
    let Some(max) = bandwidths.iter().copied().filter(|&b| usable(b)).reduce(f64::max) else {
        return vec![0.0; bandwidths.len()];
    };
    // Only ratios matter; dividing by the largest keeps every sum below N (no overflow).
    let scaled: Vec<f64> = bandwidths
        .iter()
        .map(|&b| if usable(b) { b / max } else { 0.0 })
        .collect();
    let positive = || scaled.iter().copied().filter(|&b| b > 0.0);
    let count = positive().count();
    let min = positive()
        .reduce(f64::min)
        .expect("max exists, so some bandwidth is positive");
    let total = order_independent_sum(positive());
    // Below N = 3 the reducer load term (N − 2)·w_i vanishes or is negative: any split among the positive
    // peers is optimal (N = 2) or there is one peer (N = 1). Share equally.
    if bandwidths.len() <= 2 {
        let share = 1.0 / count as f64;
        return scaled.iter().map(|&b| if b > 0.0 { share } else { 0.0 }).collect();
    }
    let load = (bandwidths.len() - 2) as f64;
    let headroom_sum = order_independent_sum(positive().map(|b| b - min));
    if load * min <= headroom_sum {
        // 1/b_min ≥ (N − 2 + K)/B: the slowest sender bounds the round; w_i ∝ headroom, which is ∝ b_i − b_min.
        // headroom_sum ≥ load·min > 0 here, so the division is safe.
        scaled
            .iter()
            .map(|&b| if b > 0.0 { (b - min) / headroom_sum } else { 0.0 })
            .collect()
    } else {
        let pressure = load + count as f64;
        scaled
            .iter()
            .map(|&b| {
                if b > 0.0 {
                    ((pressure * b - total) / (load * total)).max(0.0)
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// Rounds `total` into whole shares proportional to `scores` with the Hagenbach-Bischoff (D'Hondt) method.
///
/// Every peer first gets `floor(total·s_i/Σs)`; the few values left go one at a time to the peer with the
/// largest `s_i/(alloc_i + 1)`; a tie goes to the larger score (the usual D'Hondt rule, and the one that
/// keeps the split independent of the order of the peers), then to the lowest index. Peers with score 0 get
/// nothing. Scores that are negative or not finite count as 0; when no score is positive nothing can be
/// allocated and the result is all zeros.
///
/// ```
/// use colony_averaging::balance::hagenbach_bischoff;
/// assert_eq!(hagenbach_bischoff(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
/// assert_eq!(hagenbach_bischoff(7, &[0.0, 2.0, 5.0]), vec![0, 2, 5]);
/// ```
pub fn hagenbach_bischoff(total: usize, scores: &[f64]) -> Vec<usize> {
    let mut allocation = vec![0usize; scores.len()];
    let usable = |s: f64| s.is_finite() && s > 0.0;
    let Some(max) = scores.iter().copied().filter(|&s| usable(s)).reduce(f64::max) else {
        return allocation;
    };
    if total == 0 {
        return allocation;
    }
    // Normalising by the largest score keeps the sum finite; each ratio is exact up to one rounding.
    let scores: Vec<f64> = scores.iter().map(|&s| if usable(s) { s / max } else { 0.0 }).collect();
    let sum = order_independent_sum(scores.iter().copied());
    let total_f = total as f64;
    let mut assigned = 0usize;
    for (share, &score) in allocation.iter_mut().zip(&scores) {
        *share = ((score / sum * total_f).floor() as usize).min(total);
        assigned += *share;
    }
    // Rounding of `sum` can, in principle, push the floors above the total: take the excess back from the
    // most over-served peers (the reverse of the rule below).
    while assigned > total {
        let mut worst: Option<(usize, f64, f64)> = None;
        for (index, (&share, &score)) in allocation.iter().zip(&scores).enumerate() {
            if share == 0 {
                continue;
            }
            let quotient = score / share as f64;
            // The mirror of the rule below: smallest quotient, then smallest score, then highest index.
            if worst.is_none_or(|(_, q, s)| quotient < q || (quotient == q && score <= s)) {
                worst = Some((index, quotient, score));
            }
        }
        let (index, _, _) = worst.expect("assigned > total ≥ 0, so some share is positive");
        allocation[index] -= 1;
        assigned -= 1;
    }
    while assigned < total {
        let mut best: Option<(usize, f64, f64)> = None;
        for (index, (&share, &score)) in allocation.iter().zip(&scores).enumerate() {
            if score <= 0.0 {
                continue;
            }
            let quotient = score / (share as f64 + 1.0);
            if best.is_none_or(|(_, q, s)| quotient > q || (quotient == q && score > s)) {
                best = Some((index, quotient, score));
            }
        }
        let (index, _, _) = best.expect("some score is positive (checked above)");
        allocation[index] += 1;
        assigned += 1;
    }
    allocation
}

/// Zeroes fractions worth fewer than `min_vector_size` values, unless that would zero them all.
fn drop_small_fractions(fractions: &mut [f64], vector_size: usize, min_vector_size: usize) {
    if vector_size == 0 || min_vector_size == 0 {
        return;
    }
    let sum = order_independent_sum(fractions.iter().copied());
    if sum <= 0.0 || !sum.is_finite() {
        return;
    }
    let threshold = min_vector_size as f64 / vector_size as f64;
    if fractions.iter().any(|&f| f / sum >= threshold) {
        for fraction in fractions.iter_mut() {
            if *fraction / sum < threshold {
                *fraction = 0.0;
            }
        }
    }
}

/// A sum that is the same whatever order the values come in: sorted ascending, then added in sequence
/// (which is also the more accurate order for non-negative values).
fn order_independent_sum(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_unstable_by(f64::total_cmp);
    values.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_cases() {
        assert_eq!(load_balance_peers(100, &[None, None], 0).unwrap(), vec![50, 50]);
        assert_eq!(load_balance_peers(100, &[None; 5], 0).unwrap(), vec![20; 5]);
        let zeros_then_unknown = [Some(0.0), Some(0.0), Some(0.0), None, None];
        assert_eq!(
            load_balance_peers(100, &zeros_then_unknown, 0).unwrap(),
            vec![0, 0, 0, 50, 50]
        );
        assert_eq!(
            load_balance_peers(100, &[Some(0.0); 3], 0),
            Err(BalanceError::NobodyCanReduce { num_peers: 3 })
        );
    }

    #[test]
    fn errors_name_the_peer_and_value() {
        assert_eq!(load_balance_peers(10, &[], 0), Err(BalanceError::NoPeers));
        let negative = load_balance_peers(10, &[Some(1.0), Some(-2.0)], 0).unwrap_err();
        assert_eq!(negative, BalanceError::InvalidBandwidth { peer: 1, value: -2.0 });
        assert!(negative.to_string().contains("peer 1") && negative.to_string().contains("-2"));
        let infinite = load_balance_peers(10, &[None, None, Some(f64::INFINITY)], 0).unwrap_err();
        assert_eq!(
            infinite,
            BalanceError::InvalidBandwidth {
                peer: 2,
                value: f64::INFINITY
            }
        );
        assert!(matches!(
            load_balance_peers(10, &[Some(f64::NAN)], 0),
            Err(BalanceError::InvalidBandwidth { peer: 0, value }) if value.is_nan()
        ));
    }

    #[test]
    fn unknown_bandwidth_counts_as_the_mean_of_the_positive_ones() {
        // Mean of 1 and 3 (the 0 is not counted) is 2: the same split as if the None were Some(2.0).
        let with_none = balance_fractions(&[Some(1.0), Some(3.0), Some(0.0), None]).unwrap();
        let explicit = balance_fractions(&[Some(1.0), Some(3.0), Some(0.0), Some(2.0)]).unwrap();
        assert_eq!(with_none, explicit);
        assert_eq!(with_none[2], 0.0);
    }

    #[test]
    fn closed_form_matches_hand_solved_programmes() {
        // N = 4, b = (1, 2, 3, 4): B = 10, K = 4, (N − 2 + K)/B = 0.6 < 1/b_min = 1, so the slowest sender
        // dominates; headroom ∝ b − 1 = (0, 1, 2, 3).
        let w = optimal_fractions(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(w, vec![0.0, 1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
        // N = 4, b = (4, 5, 5, 6): ξ = 6/20 = 0.3 > 1/4; w_i = (0.3·b_i − 1)/2 = (0.1, 0.25, 0.25, 0.4).
        let w = optimal_fractions(&[4.0, 5.0, 5.0, 6.0]);
        for (got, want) in w.iter().zip([0.1, 0.25, 0.25, 0.4]) {
            assert!((got - want).abs() < 1e-12, "{w:?}");
        }
        // Zero and invalid bandwidths reduce nothing; all zero gives all zero.
        assert_eq!(optimal_fractions(&[0.0, f64::NAN, -1.0, 2.0])[..3], [0.0, 0.0, 0.0]);
        assert_eq!(optimal_fractions(&[0.0, 0.0]), vec![0.0, 0.0]);
        assert_eq!(optimal_fractions(&[7.0]), vec![1.0]);
        assert_eq!(optimal_fractions(&[]), Vec::<f64>::new());
        // Two peers: every split is optimal; equal shares.
        assert_eq!(optimal_fractions(&[1.0, 100.0]), vec![0.5, 0.5]);
        // Extreme ratios neither overflow nor produce NaN.
        let w = optimal_fractions(&[f64::MAX, f64::MIN_POSITIVE, 1.0]);
        assert!(w.iter().all(|x| x.is_finite() && *x >= 0.0), "{w:?}");
    }

    #[test]
    fn hagenbach_bischoff_gives_leftovers_by_largest_quotient() {
        assert_eq!(hagenbach_bischoff(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(hagenbach_bischoff(0, &[1.0, 1.0]), vec![0, 0]);
        assert_eq!(hagenbach_bischoff(5, &[0.0, 0.0]), vec![0, 0]);
        assert_eq!(hagenbach_bischoff(5, &[]), Vec::<usize>::new());
        // Quotas 90.5 and 0.5 × 19: D'Hondt hands all 10 leftovers to the large peer.
        let mut scores = vec![0.905];
        scores.extend([0.005; 19]);
        let split = hagenbach_bischoff(100, &scores);
        assert_eq!(split[0], 100);
        // Scores need not be normalised, and huge ones do not overflow.
        assert_eq!(
            hagenbach_bischoff(7, &[f64::MAX, f64::MAX / 2.0, f64::MAX / 4.0]),
            vec![4, 2, 1]
        );
        assert_eq!(hagenbach_bischoff(3, &[f64::NAN, 1.0, -1.0]), vec![0, 3, 0]);
        // Quotients 1/1 and 2/2 tie: the larger score wins whatever its position.
        assert_eq!(hagenbach_bischoff(2, &[1.0, 2.0]), vec![0, 2]);
        assert_eq!(hagenbach_bischoff(2, &[2.0, 1.0]), vec![2, 0]);
        // Equal scores: the lowest index.
        assert_eq!(hagenbach_bischoff(3, &[1.0, 1.0]), vec![2, 1]);
    }

    #[test]
    fn small_shares_are_dropped_unless_all_are_small() {
        // b = (1, 2, 3, 4) gives (0, 1/6, 2/6, 3/6): with V = 60 and a minimum of 15 values the 1/6 (10
        // values) is dropped and the rest share 60 as 2:3.
        let bandwidths = [Some(1.0), Some(2.0), Some(3.0), Some(4.0)];
        assert_eq!(load_balance_peers(60, &bandwidths, 0).unwrap(), vec![0, 10, 20, 30]);
        assert_eq!(load_balance_peers(60, &bandwidths, 15).unwrap(), vec![0, 0, 24, 36]);
        // A minimum above every share drops nothing.
        assert_eq!(load_balance_peers(60, &bandwidths, 1000).unwrap(), vec![0, 10, 20, 30]);
        // Exactly at the threshold is kept.
        assert_eq!(load_balance_peers(60, &bandwidths, 10).unwrap(), vec![0, 10, 20, 30]);
        assert_eq!(load_balance_peers(0, &bandwidths, 10).unwrap(), vec![0, 0, 0, 0]);
    }
}
