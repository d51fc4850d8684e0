//! Cutting the flat buffer into parts and deciding which peer reduces each part.
//!
//! Every member of a group computes the same [`PartitionPlan`] on its own, from the same
//! [`TensorLayout`], the same part sizes and the same fractions (the output of [`crate::balance`]): no
//! message says who reduces what, so the plan must be bit-identical on every machine. It therefore uses
//! only integer arithmetic and a fixed sequence of `f64` operations (a sequential prefix sum, one division
//! and one multiplication per pivot), never anything whose rounding depends on the platform or on
//! parallelism.
//!
//! A part is a range of the flat buffer that never crosses a tensor boundary (so codecs can choose per
//! tensor and results can be released tensor by tensor) and is never empty. Peer `j` is meant to reduce
//! the values between pivots `j − 1` and `j`; a part that straddles pivots goes to the peer whose range
//! covers most of it, which keeps each peer's parts one contiguous run.

use std::ops::Range;

use thiserror::Error;

use crate::tensor::{TensorInfo, TensorLayout};

/// Bytes per value assumed when a caller's estimate is unusable: an uncompressed `f32`.
const FALLBACK_BYTES_PER_VALUE: f64 = 4.0;

/// One contiguous piece of one tensor: the unit that is compressed, sent, reduced and returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Index of the tensor in the layout that holds the whole part.
    pub tensor: usize,
    /// The part's range of the flat buffer (not of the tensor); never empty.
    pub range: Range<usize>,
}

impl Part {
    /// Number of values in the part.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Always false: parts are never empty. Present so `len` has its usual companion.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// How many values fit a part of `part_size_bytes` when each value costs `bytes_per_value` on the wire.
///
/// Part sizes are budgets in *compressed* bytes, so a codec that halves the size doubles the values per
/// part. The result is at least 1 so that every non-empty tensor can be cut; an estimate that is not a
/// positive finite number falls back to 4 bytes (plain `f32`) rather than failing, because it only shapes
/// message sizes, never correctness.
///
/// ```
/// use colony_averaging::partition::values_per_part;
/// assert_eq!(values_per_part(1 << 19, 4.0), 131_072);
/// assert_eq!(values_per_part(1 << 19, 2.0), 262_144);
/// assert_eq!(values_per_part(3, 4.0), 1);
/// assert_eq!(values_per_part(16, f64::NAN), 4);
/// ```
pub fn values_per_part(part_size_bytes: usize, bytes_per_value: f64) -> usize {
    let bytes_per_value = if bytes_per_value.is_finite() && bytes_per_value > 0.0 {
        bytes_per_value
    } else {
        FALLBACK_BYTES_PER_VALUE
    };
    // `as` saturates, so absurd budgets become usize::MAX values per part (one part per tensor).
    ((part_size_bytes as f64 / bytes_per_value).floor() as usize).max(1)
}

/// Cuts every tensor of `layout` into consecutive parts of at most `values_per_part(index, info)` values.
///
/// The size is asked per tensor because codecs (and thus bytes per value) are chosen per tensor. A size of
/// 0 counts as 1. Empty tensors give no parts; the last part of a tensor holds the remainder.
pub fn split_into_parts(layout: &TensorLayout, values_per_part: impl Fn(usize, &TensorInfo) -> usize) -> Vec<Part> {
    let mut parts = Vec::new();
    for (tensor, info) in layout.tensors().iter().enumerate() {
        let range = layout.range(tensor);
        if range.is_empty() {
            continue;
        }
        let step = values_per_part(tensor, info).max(1);
        let mut start = range.start;
        while start < range.end {
            // Subtraction first: `start + step` may overflow for huge steps.
            let end = if range.end - start > step {
                start + step
            } else {
                range.end
            };
            parts.push(Part {
                tensor,
                range: start..end,
            });
            start = end;
        }
    }
    parts
}

/// Why a partition plan or a reassembly was refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PartitionError {
    /// The group has no peers to give parts to.
    #[error("cannot partition among zero peers: the fraction list is empty")]
    NoPeers,
    /// A peer's fraction is negative, NaN or infinite.
    #[error("peer {peer} has fraction {value}; fractions must be finite and non-negative")]
    InvalidFraction {
        /// Index of the peer in the group.
        peer: usize,
        /// The offending fraction.
        value: f64,
    },
    /// The fractions are so large that their sum overflows `f64`; scale them down.
    #[error("the fractions sum to {sum}; scale them down so their sum is finite")]
    FractionSumNotFinite {
        /// The (infinite) sum.
        sum: f64,
    },
    /// Every fraction is zero although there are values to reduce.
    #[error("all {num_peers} fractions are zero but the layout has {total_values} values to reduce")]
    AllFractionsZero {
        /// Number of peers.
        num_peers: usize,
        /// Values in the layout.
        total_values: usize,
    },
    /// The caller's buffer size does not match the plan's layout.
    #[error("reassembly asked for {actual} values but the plan covers {expected}")]
    TotalMismatch {
        /// Values covered by the plan.
        expected: usize,
        /// Values asked for.
        actual: usize,
    },
    /// One shard list per peer is needed.
    #[error("got shards from {actual} peers but the plan has {expected} peers")]
    ShardCount {
        /// Peers in the plan.
        expected: usize,
        /// Shard lists given.
        actual: usize,
    },
    /// A peer's shard holds the wrong number of parts.
    #[error("peer {peer} returned {actual} parts but owns {expected}")]
    PartCount {
        /// The peer.
        peer: usize,
        /// Parts it owns.
        expected: usize,
        /// Parts given.
        actual: usize,
    },
    /// A part holds the wrong number of values.
    #[error("part {part} (peer {peer}) has {actual} values but should have {expected}")]
    PartLength {
        /// The peer that owns the part.
        peer: usize,
        /// Global index of the part.
        part: usize,
        /// Values the part covers.
        expected: usize,
        /// Values given.
        actual: usize,
    },
}

/// The parts of a layout and the peer that reduces each, as every member of the group computes it.
///
/// Parts are numbered in flat-buffer order; each peer owns one contiguous run of part indices, and peers
/// own runs in peer order, so peer `j`'s shard is a contiguous range of the flat buffer.
///
/// ```
/// use colony_averaging::partition::PartitionPlan;
/// use colony_averaging::tensor::{TensorInfo, TensorLayout};
///
/// let layout = TensorLayout::new(vec![TensorInfo::new("w", [10]), TensorInfo::new("b", [3])]).unwrap();
/// let plan = PartitionPlan::new(&layout, |_, _| 4, &[1.0, 1.0]).unwrap();
/// // Parts: w[0..4], w[4..8], w[8..10], b[10..13]; the pivot at 6 splits part 1 evenly: the lower peer wins.
/// assert_eq!(plan.parts().len(), 4);
/// assert_eq!(plan.parts_of_peer(0), 0..2);
/// assert_eq!(plan.parts_of_peer(1), 2..4);
/// assert_eq!(plan.parts_of_tensor(1), 3..4);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPlan {
    parts: Vec<Part>,
    /// `peer_starts[j]..peer_starts[j + 1]` are peer `j`'s parts; length `num_peers + 1`.
    peer_starts: Vec<usize>,
    /// `tensor_starts[t]..tensor_starts[t + 1]` are tensor `t`'s parts; length `num_tensors + 1`.
    tensor_starts: Vec<usize>,
    /// Values in each peer's parts.
    peer_values: Vec<usize>,
    total_values: usize,
}

impl PartitionPlan {
    /// Cuts `layout` into parts (see [`split_into_parts`]) and gives them to peers by `fractions`.
    ///
    /// Fractions are relative (they need not sum to 1) and one per peer, in group order. Fails when there
    /// are no peers, a fraction is negative or not finite, or all fractions are zero while there are
    /// values to reduce (a layout without values needs no reducer).
    pub fn new(
        layout: &TensorLayout,
        values_per_part: impl Fn(usize, &TensorInfo) -> usize,
        fractions: &[f64],
    ) -> Result<Self, PartitionError> {
        let total_values = layout.total_values();
        let pivots = pivots(fractions, total_values)?;
        let parts = split_into_parts(layout, values_per_part);

        let mut tensor_starts = Vec::with_capacity(layout.len() + 1);
        let mut next_part = 0;
        for tensor in 0..layout.len() {
            tensor_starts.push(next_part);
            while next_part < parts.len() && parts[next_part].tensor == tensor {
                next_part += 1;
            }
        }
        tensor_starts.push(parts.len());

        let num_peers = fractions.len();
        let mut peer_starts = vec![0; num_peers + 1];
        let mut peer_values = vec![0; num_peers];
        // Owners never decrease along the buffer (see `owner_by_overlap`), so one cursor suffices.
        let mut cursor = 0;
        for (index, part) in parts.iter().enumerate() {
            let owner = owner_by_overlap(&pivots, &mut cursor, &part.range);
            peer_starts[owner + 1] = index + 1;
            peer_values[owner] += part.range.len();
        }
        // Peers that own nothing start (and end) where the previous peer ended.
        for peer in 1..=num_peers {
            peer_starts[peer] = peer_starts[peer].max(peer_starts[peer - 1]);
        }

        Ok(Self {
            parts,
            peer_starts,
            tensor_starts,
            peer_values,
            total_values,
        })
    }

    /// All parts, in flat-buffer order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Number of peers (fractions) the plan was made for.
    pub fn num_peers(&self) -> usize {
        self.peer_values.len()
    }

    /// Values in the layout the plan was made for.
    pub fn total_values(&self) -> usize {
        self.total_values
    }

    /// The part indices `peer` reduces: one contiguous run, empty when it reduces nothing or is not a
    /// member of the plan.
    pub fn parts_of_peer(&self, peer: usize) -> Range<usize> {
        if peer >= self.num_peers() {
            return self.parts.len()..self.parts.len();
        }
        self.peer_starts[peer]..self.peer_starts[peer + 1]
    }

    /// The flat range of the buffer that `peer` reduces (empty when it reduces nothing).
    pub fn flat_range_of_peer(&self, peer: usize) -> Range<usize> {
        let parts = self.parts_of_peer(peer);
        if parts.is_empty() {
            return 0..0;
        }
        self.parts[parts.start].range.start..self.parts[parts.end - 1].range.end
    }

    /// The peer that reduces `part`. Panics when `part` is not a part of this plan (a caller's bug).
    pub fn owner_of(&self, part: usize) -> usize {
        assert!(
            part < self.parts.len(),
            "part {part} is out of range: the plan has {} parts",
            self.parts.len()
        );
        // The last peer whose run starts at or before `part`; empty runs share their start with a later
        // peer, so take the last one.
        self.peer_starts[..self.num_peers()].partition_point(|&start| start <= part) - 1
    }

    /// The part indices of `tensor`: contiguous, empty for empty tensors and tensors not in the layout.
    pub fn parts_of_tensor(&self, tensor: usize) -> Range<usize> {
        if tensor + 1 >= self.tensor_starts.len() {
            return self.parts.len()..self.parts.len();
        }
        self.tensor_starts[tensor]..self.tensor_starts[tensor + 1]
    }

    /// Number of values `peer` reduces: what it receives from each sender and sends back to each.
    pub fn values_of_peer(&self, peer: usize) -> usize {
        self.peer_values.get(peer).copied().unwrap_or(0)
    }
}

/// The end of each peer's ideal range: `floor(cumsum(fractions) / sum × total)`, the last one exactly
/// `total`. Sequential sums keep the numbers identical on every machine and make them non-decreasing.
fn pivots(fractions: &[f64], total_values: usize) -> Result<Vec<usize>, PartitionError> {
    if fractions.is_empty() {
        return Err(PartitionError::NoPeers);
    }
    if let Some((peer, &value)) = fractions
        .iter()
        .enumerate()
        .find(|(_, value)| !(value.is_finite() && **value >= 0.0))
    {
        return Err(PartitionError::InvalidFraction { peer, value });
    }
    let mut cumulative = Vec::with_capacity(fractions.len());
    let mut sum = 0.0f64;
    for &fraction in fractions {
        sum += fraction;
        cumulative.push(sum);
    }
    if !sum.is_finite() {
        return Err(PartitionError::FractionSumNotFinite { sum });
    }
    if total_values == 0 {
        return Ok(vec![0; fractions.len()]);
    }
    if sum == 0.0 {
        return Err(PartitionError::AllFractionsZero {
            num_peers: fractions.len(),
            total_values,
        });
    }
    // Layouts hold at most 2^40 values, so `total_values` is exact in f64.
    let total = total_values as f64;
    let mut pivots: Vec<usize> = cumulative
        .iter()
        .map(|&partial| ((partial / sum * total).floor() as usize).min(total_values))
        .collect();
    *pivots.last_mut().expect("fractions are not empty (checked above)") = total_values;
    Ok(pivots)
}

/// The peer whose ideal range covers most of `part` (ties go to the lower index).
///
/// `cursor` is the first peer whose range may still meet a part at or after `part`; it only moves forward.
/// The winner of a later part is never a lower peer: if a later part's winner `k` overlapped it, `k`'s
/// range would end before this part's winner's range begins, which this part's positive overlap forbids.
fn owner_by_overlap(pivots: &[usize], cursor: &mut usize, part: &Range<usize>) -> usize {
    // Skip peers whose range ends at or before the part (including empty ranges there).
    while pivots[*cursor] <= part.start {
        *cursor += 1;
    }
    let mut best = *cursor;
    let mut best_overlap = 0;
    let mut peer = *cursor;
    loop {
        let start = if peer == 0 { 0 } else { pivots[peer - 1] };
        if start >= part.end {
            break;
        }
        let overlap = pivots[peer].min(part.end) - start.max(part.start);
        if overlap > best_overlap {
            best = peer;
            best_overlap = overlap;
        }
        if pivots[peer] >= part.end {
            break;
        }
        peer += 1;
    }
    best
}

/// Puts the reduced parts of every peer back into one flat buffer of `total_values` values.
///
/// `shards[peer]` holds that peer's parts in order (as [`PartitionPlan::parts_of_peer`] lists them). Every
/// count and length is checked, because shards arrive from the network.
pub fn reassemble(
    plan: &PartitionPlan,
    total_values: usize,
    shards: &[Vec<Vec<f32>>],
) -> Result<Vec<f32>, PartitionError> {
    if total_values != plan.total_values {
        return Err(PartitionError::TotalMismatch {
            expected: plan.total_values,
            actual: total_values,
        });
    }
    if shards.len() != plan.num_peers() {
        return Err(PartitionError::ShardCount {
            expected: plan.num_peers(),
            actual: shards.len(),
        });
    }
    for (peer, shard) in shards.iter().enumerate() {
        let owned = plan.parts_of_peer(peer);
        if shard.len() != owned.len() {
            return Err(PartitionError::PartCount {
                peer,
                expected: owned.len(),
                actual: shard.len(),
            });
        }
        for (part, values) in owned.zip(shard) {
            let expected = plan.parts[part].range.len();
            if values.len() != expected {
                return Err(PartitionError::PartLength {
                    peer,
                    part,
                    expected,
                    actual: values.len(),
                });
            }
        }
    }
    // Parts tile the buffer in order and peers own runs in peer order: concatenation is the buffer.
    let mut flat = Vec::with_capacity(total_values);
    for values in shards.iter().flatten() {
        flat.extend_from_slice(values);
    }
    debug_assert_eq!(flat.len(), total_values, "parts tile the layout");
    Ok(flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(shapes: &[&[usize]]) -> TensorLayout {
        TensorLayout::new(
            shapes
                .iter()
                .enumerate()
                .map(|(i, shape)| TensorInfo::new(format!("t{i}"), shape.to_vec()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn values_per_part_floors_and_falls_back() {
        assert_eq!(values_per_part(31337, 4.0), 7834);
        assert_eq!(values_per_part(1 << 20, 4.0), 262_144);
        assert_eq!(values_per_part(10_000_000_000, 4.0), 2_500_000_000);
        assert_eq!(values_per_part(16, 4.0), 4);
        assert_eq!(values_per_part(1 << 19, 1.0), 1 << 19);
        assert_eq!(values_per_part(0, 4.0), 1);
        assert_eq!(values_per_part(16, 0.0), 4);
        assert_eq!(values_per_part(16, -2.0), 4);
        assert_eq!(values_per_part(16, f64::INFINITY), 4);
        assert_eq!(values_per_part(10, 3.0), 3);
    }

    #[test]
    fn split_skips_empty_tensors_and_keeps_remainders() {
        let layout = layout(&[&[5], &[0], &[], &[3, 0], &[7]]);
        let parts = split_into_parts(&layout, |_, _| 3);
        let ranges: Vec<_> = parts.iter().map(|p| (p.tensor, p.range.clone())).collect();
        assert_eq!(
            ranges,
            vec![(0, 0..3), (0, 3..5), (2, 5..6), (4, 6..9), (4, 9..12), (4, 12..13)]
        );
        // A size of 0 counts as 1; a huge size gives one part per tensor without overflowing.
        assert_eq!(split_into_parts(&layout, |_, _| 0).len(), 13);
        assert_eq!(split_into_parts(&layout, |_, _| usize::MAX).len(), 3);
        // Sizes are per tensor.
        let per_tensor = split_into_parts(&layout, |t, _| if t == 0 { 1 } else { 100 });
        assert_eq!(per_tensor.len(), 5 + 1 + 1);
    }

    #[test]
    fn pivot_straddling_part_goes_to_the_larger_overlap() {
        let layout = layout(&[&[10]]);
        // Pivots at 3 and 10: part 0..4 overlaps peer 0 by 3 and peer 1 by 1.
        let plan = PartitionPlan::new(&layout, |_, _| 4, &[0.3, 0.7]).unwrap();
        assert_eq!(plan.parts_of_peer(0), 0..1);
        assert_eq!(plan.parts_of_peer(1), 1..3);
        // Pivot at 1: part 0..4 overlaps peer 0 by 1 and peer 1 by 3.
        let plan = PartitionPlan::new(&layout, |_, _| 4, &[0.1, 0.9]).unwrap();
        assert_eq!(plan.parts_of_peer(0), 0..0);
        assert_eq!(plan.parts_of_peer(1), 0..3);
        assert_eq!(plan.values_of_peer(0), 0);
        assert_eq!(plan.values_of_peer(1), 10);
        // One part over three peers (pivots 2, 5, 10): the middle peer has 3, the last 5.
        let plan = PartitionPlan::new(&layout, |_, _| 100, &[0.2, 0.3, 0.5]).unwrap();
        assert_eq!(plan.owner_of(0), 2);
        assert_eq!(plan.parts_of_peer(2), 0..1);
        assert_eq!(plan.parts_of_peer(0), 0..0);
        assert_eq!(plan.parts_of_peer(1), 0..0);
        // Exact tie (2 and 2 in a 4-value part, pivot at 2 of 4): lower index wins.
        let layout4 = self::layout(&[&[4]]);
        let plan = PartitionPlan::new(&layout4, |_, _| 4, &[1.0, 1.0]).unwrap();
        assert_eq!(plan.owner_of(0), 0);
    }

    #[test]
    fn zero_fraction_peers_own_nothing_and_queries_are_total() {
        let layout = layout(&[&[100], &[0], &[50]]);
        let plan = PartitionPlan::new(&layout, |_, _| 10, &[0.0, 0.4, 0.6, 0.0]).unwrap();
        assert_eq!(plan.parts().len(), 15);
        assert_eq!(plan.parts_of_peer(0), 0..0);
        assert_eq!(plan.parts_of_peer(1), 0..6);
        assert_eq!(plan.parts_of_peer(2), 6..15);
        assert_eq!(plan.parts_of_peer(3), 15..15);
        assert_eq!(plan.parts_of_peer(99), 15..15);
        assert_eq!(plan.values_of_peer(1), 60);
        assert_eq!(plan.values_of_peer(2), 90);
        assert_eq!(plan.values_of_peer(99), 0);
        assert_eq!(plan.flat_range_of_peer(2), 60..150);
        assert_eq!(plan.flat_range_of_peer(0), 0..0);
        assert_eq!(plan.parts_of_tensor(0), 0..10);
        assert_eq!(plan.parts_of_tensor(1), 10..10);
        assert_eq!(plan.parts_of_tensor(2), 10..15);
        assert_eq!(plan.parts_of_tensor(3), 15..15);
        let owners: Vec<usize> = (0..15).map(|p| plan.owner_of(p)).collect();
        assert_eq!(owners, [vec![1; 6], vec![2; 9]].concat());
    }

    #[test]
    fn invalid_fractions_are_refused_with_the_peer_and_value() {
        let layout = layout(&[&[10]]);
        let vpp = |_: usize, _: &TensorInfo| 3;
        assert_eq!(PartitionPlan::new(&layout, vpp, &[]), Err(PartitionError::NoPeers));
        assert_eq!(
            PartitionPlan::new(&layout, vpp, &[1.0, -0.5]),
            Err(PartitionError::InvalidFraction { peer: 1, value: -0.5 })
        );
        assert_eq!(
            PartitionPlan::new(&layout, vpp, &[f64::INFINITY]),
            Err(PartitionError::InvalidFraction {
                peer: 0,
                value: f64::INFINITY
            })
        );
        let nan = PartitionPlan::new(&layout, vpp, &[1.0, 1.0, f64::NAN]).unwrap_err();
        assert!(matches!(nan, PartitionError::InvalidFraction { peer: 2, value } if value.is_nan()));
        assert!(matches!(
            PartitionPlan::new(&layout, vpp, &[f64::MAX, f64::MAX]),
            Err(PartitionError::FractionSumNotFinite { .. })
        ));
        let zero = PartitionPlan::new(&layout, vpp, &[0.0, 0.0]).unwrap_err();
        assert_eq!(
            zero,
            PartitionError::AllFractionsZero {
                num_peers: 2,
                total_values: 10
            }
        );
        assert!(zero.to_string().contains("10 values"), "{zero}");
        // Nothing to reduce: all-zero fractions are fine.
        let empty = self::layout(&[&[0], &[2, 0]]);
        let plan = PartitionPlan::new(&empty, vpp, &[0.0, 0.0]).unwrap();
        assert!(plan.parts().is_empty());
        assert_eq!(plan.parts_of_peer(1), 0..0);
        assert_eq!(reassemble(&plan, 0, &[vec![], vec![]]).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn reassemble_checks_counts_and_lengths() {
        let layout = layout(&[&[6]]);
        let plan = PartitionPlan::new(&layout, |_, _| 2, &[1.0, 2.0]).unwrap();
        assert_eq!(plan.parts_of_peer(0), 0..1);
        assert_eq!(plan.parts_of_peer(1), 1..3);
        let good = vec![vec![vec![0.0, 1.0]], vec![vec![2.0, 3.0], vec![4.0, 5.0]]];
        assert_eq!(reassemble(&plan, 6, &good).unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(
            reassemble(&plan, 7, &good),
            Err(PartitionError::TotalMismatch { expected: 6, actual: 7 })
        );
        assert_eq!(
            reassemble(&plan, 6, &good[..1]),
            Err(PartitionError::ShardCount { expected: 2, actual: 1 })
        );
        let mut missing = good.clone();
        missing[1].pop();
        assert_eq!(
            reassemble(&plan, 6, &missing),
            Err(PartitionError::PartCount {
                peer: 1,
                expected: 2,
                actual: 1
            })
        );
        let mut short = good.clone();
        short[1][1].pop();
        let error = reassemble(&plan, 6, &short).unwrap_err();
        assert_eq!(
            error,
            PartitionError::PartLength {
                peer: 1,
                part: 2,
                expected: 2,
                actual: 1
            }
        );
        assert!(error.to_string().contains("part 2"), "{error}");
    }

    #[test]
    #[should_panic(expected = "part 3 is out of range")]
    fn owner_of_an_unknown_part_is_a_caller_bug() {
        let plan = PartitionPlan::new(&layout(&[&[6]]), |_, _| 2, &[1.0]).unwrap();
        plan.owner_of(3);
    }
}
