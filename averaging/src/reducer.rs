//! The part reducer: the sans-IO core of a reducer peer, which averages the parts it owns.
//!
//! In the butterfly all-reduce each sender streams the parts of this peer's shard, in order, and the
//! reducer hands back each part's weighted average as soon as every sender still in the round has sent
//! it. [`PartReducer`] holds that logic and nothing else: the caller feeds it decoded parts
//! ([`PartReducer::accumulate`]), tells it when a sender has failed ([`PartReducer::ban`]) and collects the
//! results ([`PartReducer::next_completed`]); timeouts, streams and codecs stay with the caller.
//!
//! A sender that fails keeps its contribution to the parts it already delivered and is no longer waited
//! for, so one slow peer cannot stall the round. Each part has one accumulator, allocated on its first
//! contribution and released when the part is handed out, so memory stays near one shard even when senders
//! run at different speeds; with a [`SumPool`] the caller gives averages back once it has sent them, and the
//! next parts sum into those warm buffers instead of fresh memory. Values are accumulated in `f32`: a part
//! is the sum of a few senders, and the summing loop is bound by memory bandwidth on multi-megabyte shards,
//! which `f64` would halve.
//!
//! With [`Aggregation::CenteredClip`] a part's accumulator holds every sender's copy instead of a running
//! sum (the robust centre needs them all at once), so a part in flight costs the group size times the part
//! size until it is handed out; the rules for order, bans and zero weights are the same.

use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::aggregation::{Aggregation, AggregationError, centered_clip};

/// Why a contribution was refused. The reducer's state is unchanged; the caller usually bans the sender.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ReducerError {
    /// The sender index is not one of the group's senders.
    #[error("sender {sender} is unknown: the round has {num_senders} senders")]
    UnknownSender {
        /// The index given.
        sender: usize,
        /// Number of senders.
        num_senders: usize,
    },
    /// The sender was banned and its later parts are no longer waited for.
    #[error("sender {sender} was banned from this round; its part {part} is refused")]
    BannedSender {
        /// The banned sender.
        sender: usize,
        /// The part it tried to deliver.
        part: usize,
    },
    /// The part index is beyond this reducer's shard.
    #[error("sender {sender} sent part {part} but this reducer owns only {num_parts} parts")]
    PartOutOfRange {
        /// The sender.
        sender: usize,
        /// The part index given.
        part: usize,
        /// Parts owned.
        num_parts: usize,
    },
    /// The sender already delivered this part.
    #[error("sender {sender} sent part {part} twice (it has delivered {delivered} parts)")]
    DuplicatePart {
        /// The sender.
        sender: usize,
        /// The repeated part.
        part: usize,
        /// Parts it has delivered.
        delivered: usize,
    },
    /// The sender skipped ahead: parts must arrive in order.
    #[error("sender {sender} sent part {part} but its next part must be {expected}: parts arrive in order")]
    OutOfOrder {
        /// The sender.
        sender: usize,
        /// The part given.
        part: usize,
        /// The part expected next.
        expected: usize,
    },
    /// The part holds the wrong number of values.
    #[error("sender {sender} sent {actual} values for part {part}, which has {expected}")]
    WrongLength {
        /// The sender.
        sender: usize,
        /// The part.
        part: usize,
        /// Values in the part.
        expected: usize,
        /// Values given.
        actual: usize,
    },
    /// The part holds a NaN or an infinity, which would poison everyone's average.
    #[error("sender {sender} sent {value} at position {position} of part {part}; values must be finite")]
    NonFinite {
        /// The sender.
        sender: usize,
        /// The part.
        part: usize,
        /// Position of the first non-finite value within the part.
        position: usize,
        /// The value.
        value: f32,
    },
}

/// One part's result, handed out in part order.
#[derive(Debug, Clone, PartialEq)]
pub struct ReducedPart {
    /// Index of the part within this reducer's shard.
    pub index: usize,
    /// `Σ w·x / Σ w` over the senders that delivered the part; the plain mean when all their weights are 0;
    /// `None` when nobody delivered it (every sender was banned first), so the caller knows there is no
    /// average rather than receiving zeros.
    pub average: Option<Vec<f32>>,
    /// How many senders delivered the part.
    pub contributors: usize,
    /// How many of their copies CenteredClip clipped (always 0 for the mean).
    pub clipped: usize,
}

/// What the reducer keeps of one part until it is handed out.
#[derive(Debug)]
enum Accumulator {
    /// The mean's running sum.
    Sum(RunningSum),
    /// CenteredClip's copies, by sender (`None`: not delivered).
    Copies(Vec<Option<Vec<f32>>>),
}

/// The running sum of one part.
#[derive(Debug)]
struct RunningSum {
    /// `Σ w·x` once a sender with positive weight has contributed; `Σ x` of the zero-weight senders before.
    sum: Vec<f32>,
    /// Whether `sum` is weighted (some contributor had positive weight).
    weighted: bool,
    /// `Σ w` of the contributors, in `f64` so that many small weights do not lose precision.
    weight_sum: f64,
    contributors: usize,
}

/// Averages the parts of one reducer's shard from many senders, in order, tolerating failed senders; the
/// average is the weighted mean unless [`PartReducer::with_aggregation`] chose another [`Aggregation`].
///
/// ```
/// use colony_averaging::reducer::PartReducer;
///
/// let mut reducer = PartReducer::new(vec![2, 1], vec![1.0, 3.0]);
/// reducer.accumulate(0, 0, &[1.0, 2.0]).unwrap();
/// assert!(reducer.next_completed().is_none()); // sender 1 has not sent part 0 yet
/// reducer.accumulate(1, 0, &[5.0, 6.0]).unwrap();
/// let part = reducer.next_completed().unwrap();
/// assert_eq!(part.average, Some(vec![4.0, 5.0]));
/// // Sender 1 fails: part 1 no longer waits for it.
/// reducer.accumulate(0, 1, &[7.0]).unwrap();
/// reducer.ban(1);
/// assert_eq!(reducer.next_completed().unwrap().average, Some(vec![7.0]));
/// assert!(reducer.is_finished());
/// ```
#[derive(Debug)]
pub struct PartReducer {
    part_lens: Vec<usize>,
    /// Per sender, scaled by a power of two so the largest lies in [1, 2]; negative or non-finite weights are 0.
    weights: Vec<f32>,
    delivered: Vec<usize>,
    banned: Vec<bool>,
    accumulators: Vec<Option<Accumulator>>,
    next_out: usize,
    aggregation: Aggregation,
    /// Where sums come from, when the caller recycles averages.
    pool: Option<Arc<SumPool>>,
}

impl PartReducer {
    /// A reducer for parts of `part_lens` values, fed by `weights.len()` senders with those weights.
    ///
    /// Weights are relative (only their ratios matter). A weight that is negative or not finite counts as
    /// 0: such a sender is waited for, but its values count only when no positive-weight sender delivered
    /// the same part.
    pub fn new(part_lens: Vec<usize>, weights: Vec<f32>) -> Self {
        let weights: Vec<f32> = weights
            .into_iter()
            .map(|w| if w.is_finite() && w > 0.0 { w } else { 0.0 })
            .collect();
        // Scale by a power of two so the largest weight lies in [1, 2]: sums cannot overflow through the
        // weights, and the scaling is exact, so a lone contributor's average is its own values.
        let max = weights.iter().copied().fold(0.0f32, f32::max);
        let weights = if max > 0.0 {
            let scale = 2f32.powi(-max.log2().floor() as i32);
            weights.into_iter().map(|w| w * scale).collect()
        } else {
            weights
        };
        let num_senders = weights.len();
        let num_parts = part_lens.len();
        Self {
            part_lens,
            weights,
            delivered: vec![0; num_senders],
            banned: vec![false; num_senders],
            accumulators: std::iter::repeat_with(|| None).take(num_parts).collect(),
            next_out: 0,
            aggregation: Aggregation::Mean,
            pool: None,
        }
    }

    /// Takes the buffers of new sums from `pool`: a caller that gives every average back to it
    /// ([`SumPool::give`]) lets the parts of a round reuse a few warm buffers instead of allocating one per
    /// part.
    pub fn with_pool(mut self, pool: Arc<SumPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// [`new`](Self::new) with `aggregation` instead of the mean; refuses an invalid one
    /// ([`Aggregation::validate`]).
    ///
    /// ```
    /// use colony_averaging::aggregation::Aggregation;
    /// use colony_averaging::reducer::PartReducer;
    ///
    /// let clip = Aggregation::CenteredClip { tau: 1.0, iterations: 5 };
    /// let mut reducer = PartReducer::with_aggregation(vec![1], vec![1.0; 3], clip).unwrap();
    /// for (sender, value) in [(0, 1.0), (1, 2.0), (2, 1e6)] {
    ///     reducer.accumulate(sender, 0, &[value]).unwrap();
    /// }
    /// let part = reducer.next_completed().unwrap();
    /// // The mean would be 333334.3; the outlier pulls by at most τ = 1, in a third of the weight.
    /// assert!(part.average.unwrap()[0] < 3.0);
    /// assert_eq!(part.clipped, 1);
    /// ```
    pub fn with_aggregation(
        part_lens: Vec<usize>,
        weights: Vec<f32>,
        aggregation: Aggregation,
    ) -> Result<Self, AggregationError> {
        aggregation.validate()?;
        Ok(Self {
            aggregation,
            ..Self::new(part_lens, weights)
        })
    }

    /// How the parts are combined.
    pub fn aggregation(&self) -> Aggregation {
        self.aggregation
    }

    /// Number of parts in the shard.
    pub fn num_parts(&self) -> usize {
        self.part_lens.len()
    }

    /// Number of senders.
    pub fn num_senders(&self) -> usize {
        self.weights.len()
    }

    /// Adds `sender`'s values for `part`, which must be the part after the last one it delivered.
    ///
    /// Everything is checked before anything is added, so a refused part leaves the reducer unchanged.
    pub fn accumulate(&mut self, sender: usize, part: usize, values: &[f32]) -> Result<(), ReducerError> {
        self.check(sender, part, values)?;
        let weight = self.weights[sender];
        let num_senders = self.num_senders();
        let slot = &mut self.accumulators[part];
        if let Aggregation::CenteredClip { .. } = self.aggregation {
            if !matches!(slot, Some(Accumulator::Copies(_))) {
                *slot = Some(Accumulator::Copies(vec![None; num_senders]));
            }
            if let Some(Accumulator::Copies(copies)) = slot {
                copies[sender] = Some(values.to_vec());
            }
            self.delivered[sender] += 1;
            return Ok(());
        }
        match slot {
            None | Some(Accumulator::Copies(_)) => {
                let mut sum = self.pool.as_ref().map_or_else(Vec::new, |pool| pool.take(values.len()));
                if weight > 0.0 {
                    sum.extend(values.iter().map(|&x| weight * x));
                } else {
                    sum.extend_from_slice(values);
                }
                *slot = Some(Accumulator::Sum(RunningSum {
                    sum,
                    weighted: weight > 0.0,
                    weight_sum: f64::from(weight),
                    contributors: 1,
                }));
            }
            Some(Accumulator::Sum(accumulator)) => {
                if weight > 0.0 {
                    if accumulator.weighted {
                        add_scaled(&mut accumulator.sum, values, weight);
                    } else {
                        // The zero-weight values gathered so far no longer count: start the weighted sum.
                        set_scaled(&mut accumulator.sum, values, weight);
                        accumulator.weighted = true;
                    }
                    accumulator.weight_sum += f64::from(weight);
                } else if !accumulator.weighted {
                    add(&mut accumulator.sum, values);
                }
                accumulator.contributors += 1;
            }
        }
        self.delivered[sender] += 1;
        Ok(())
    }

    fn check(&self, sender: usize, part: usize, values: &[f32]) -> Result<(), ReducerError> {
        if sender >= self.num_senders() {
            return Err(ReducerError::UnknownSender {
                sender,
                num_senders: self.num_senders(),
            });
        }
        if self.banned[sender] {
            return Err(ReducerError::BannedSender { sender, part });
        }
        if part >= self.num_parts() {
            return Err(ReducerError::PartOutOfRange {
                sender,
                part,
                num_parts: self.num_parts(),
            });
        }
        let delivered = self.delivered[sender];
        if part < delivered {
            return Err(ReducerError::DuplicatePart {
                sender,
                part,
                delivered,
            });
        }
        if part > delivered {
            return Err(ReducerError::OutOfOrder {
                sender,
                part,
                expected: delivered,
            });
        }
        if values.len() != self.part_lens[part] {
            return Err(ReducerError::WrongLength {
                sender,
                part,
                expected: self.part_lens[part],
                actual: values.len(),
            });
        }
        if !all_finite(values) {
            let position = values
                .iter()
                .position(|v| !v.is_finite())
                .expect("all_finite found a non-finite value");
            return Err(ReducerError::NonFinite {
                sender,
                part,
                position,
                value: values[position],
            });
        }
        Ok(())
    }

    /// Stops waiting for `sender`: parts it delivered keep its contribution, later parts complete without
    /// it. Banning twice, or an unknown sender, does nothing.
    pub fn ban(&mut self, sender: usize) {
        if let Some(banned) = self.banned.get_mut(sender) {
            *banned = true;
        }
    }

    /// Whether `sender` has been banned.
    pub fn is_banned(&self, sender: usize) -> bool {
        self.banned.get(sender).copied().unwrap_or(false)
    }

    /// The next part, in part order, that every sender still in the round has delivered; `None` while the
    /// next part still waits for someone (or all parts were handed out). Its accumulator is released.
    pub fn next_completed(&mut self) -> Option<ReducedPart> {
        let index = self.next_out;
        if index >= self.num_parts() || index >= self.completed_frontier() {
            return None;
        }
        self.next_out += 1;
        let accumulator = match self.accumulators[index].take() {
            Some(Accumulator::Sum(accumulator)) => accumulator,
            Some(Accumulator::Copies(copies)) => return Some(self.clip(index, &copies)),
            None => {
                return Some(ReducedPart {
                    index,
                    average: None,
                    contributors: 0,
                    clipped: 0,
                });
            }
        };
        let RunningSum {
            mut sum,
            weighted,
            weight_sum,
            contributors,
        } = accumulator;
        let denominator = if weighted { weight_sum } else { contributors as f64 };
        // Division rather than a reciprocal: once per part, and exact when the sum is exact.
        let denominator_f32 = denominator as f32;
        if denominator_f32.is_normal() {
            sum.iter_mut().for_each(|x| *x /= denominator_f32);
        } else {
            // A weight sum below f32's normal range: divide in f64.
            sum.iter_mut().for_each(|x| *x = (f64::from(*x) / denominator) as f32);
        }
        Some(ReducedPart {
            index,
            average: Some(sum),
            contributors,
            clipped: 0,
        })
    }

    /// CenteredClip of the delivered copies of part `index`. As for the mean, zero-weight copies count
    /// (equally) only when no positive-weight sender delivered the part.
    fn clip(&self, index: usize, copies: &[Option<Vec<f32>>]) -> ReducedPart {
        let Aggregation::CenteredClip { tau, iterations } = self.aggregation else {
            unreachable!("copies are kept only for CenteredClip (invariant of accumulate)");
        };
        let delivered: Vec<(&[f32], f32)> = copies
            .iter()
            .zip(&self.weights)
            .filter_map(|(copy, &weight)| copy.as_deref().map(|copy| (copy, weight)))
            .collect();
        let contributors = delivered.len();
        let weighted = delivered.iter().any(|&(_, weight)| weight > 0.0);
        let (values, weights): (Vec<&[f32]>, Vec<f32>) = delivered
            .into_iter()
            .filter(|&(_, weight)| !weighted || weight > 0.0)
            .map(|(copy, weight)| (copy, if weighted { weight } else { 1.0 }))
            .unzip();
        let result = centered_clip(&values, &weights, tau, iterations);
        ReducedPart {
            index,
            average: Some(result.values),
            contributors,
            clipped: result.clipped,
        }
    }

    /// Parts below this index have been delivered by every sender that is not banned.
    fn completed_frontier(&self) -> usize {
        self.delivered
            .iter()
            .zip(&self.banned)
            .filter(|(_, banned)| !**banned)
            .map(|(delivered, _)| *delivered)
            .min()
            .unwrap_or(usize::MAX)
    }

    /// Whether every part has been handed out by [`next_completed`](Self::next_completed).
    pub fn is_finished(&self) -> bool {
        self.next_out >= self.num_parts()
    }

    /// Parts received from `sender` so far (0 for an unknown sender): the next part it must send.
    pub fn delivered(&self, sender: usize) -> usize {
        self.delivered.get(sender).copied().unwrap_or(0)
    }
}

/// Spare buffers for part sums, shared by a reducer and whoever drops its averages. Holds at most `limit`
/// buffers; a buffer given back beyond that is freed.
#[derive(Debug)]
pub struct SumPool {
    free: Mutex<Vec<Vec<f32>>>,
    limit: usize,
}

impl SumPool {
    /// A pool that keeps at most `limit` buffers.
    pub fn new(limit: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            limit,
        }
    }

    /// An empty buffer with room for `len` values: the smallest spare that fits, else a new one.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut free = self.lock();
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, buffer)| buffer.capacity() >= len)
            .min_by_key(|(_, buffer)| buffer.capacity())
            .map(|(index, _)| index);
        match best {
            Some(index) => free.swap_remove(index),
            None => Vec::with_capacity(len),
        }
    }

    /// Gives `buffer` back for a later sum.
    pub fn give(&self, mut buffer: Vec<f32>) {
        buffer.clear();
        let mut free = self.lock();
        if free.len() < self.limit && buffer.capacity() > 0 {
            free.push(buffer);
        }
    }

    /// Buffers held.
    pub fn spare(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<f32>>> {
        // Every critical section is one push or removal: a poisoned list is still a list of spare buffers.
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether no value is NaN or infinite. Checks a block at a time so the compiler can vectorise the test.
pub(crate) fn all_finite(values: &[f32]) -> bool {
    let mut blocks = values.chunks_exact(64);
    for block in &mut blocks {
        let mut finite = true;
        for &value in block {
            finite &= value.is_finite();
        }
        if !finite {
            return false;
        }
    }
    blocks.remainder().iter().all(|v| v.is_finite())
}

/// `sum += weight · values`, element-wise. The slices have equal lengths (checked by the caller); zipping
/// them lets the compiler drop bounds checks and vectorise.
fn add_scaled(sum: &mut [f32], values: &[f32], weight: f32) {
    debug_assert_eq!(sum.len(), values.len());
    for (total, &value) in sum.iter_mut().zip(values) {
        *total += weight * value;
    }
}

/// `sum = weight · values`, element-wise.
fn set_scaled(sum: &mut [f32], values: &[f32], weight: f32) {
    debug_assert_eq!(sum.len(), values.len());
    for (total, &value) in sum.iter_mut().zip(values) {
        *total = weight * value;
    }
}

/// `sum += values`, element-wise.
fn add(sum: &mut [f32], values: &[f32]) {
    debug_assert_eq!(sum.len(), values.len());
    for (total, &value) in sum.iter_mut().zip(values) {
        *total += value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (SplitMix64) so every interleaving can be replayed from its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }

        fn chance(&mut self, p: f64) -> bool {
            self.unit() < p
        }
    }

    /// How senders take turns: all in lockstep, a random interleaving, or one sender after another.
    #[derive(Debug, Clone, Copy)]
    enum Schedule {
        Lockstep,
        Random,
        OneAfterAnother,
    }

    struct Scenario {
        part_lens: Vec<usize>,
        weights: Vec<f32>,
        /// values[sender][part]
        values: Vec<Vec<Vec<f32>>>,
        /// Parts each sender delivers before it is banned (`None`: never banned).
        ban_after: Vec<Option<usize>>,
        aggregation: Aggregation,
    }

    impl Scenario {
        fn new(rng: &mut Rng, senders: usize, parts: usize, ban_probability: f64) -> Self {
            let part_lens: Vec<usize> = (0..parts).map(|_| 1 + rng.below(300)).collect();
            let weights = (0..senders).map(|_| (0.01 + 10.0 * rng.unit()) as f32).collect();
            let values = (0..senders)
                .map(|_| {
                    part_lens
                        .iter()
                        .map(|&len| (0..len).map(|_| (rng.unit() * 8.0 - 4.0) as f32).collect())
                        .collect()
                })
                .collect();
            let ban_after = (0..senders)
                .map(|_| rng.chance(ban_probability).then(|| rng.below(parts + 1)))
                .collect();
            Self {
                part_lens,
                weights,
                values,
                ban_after,
                aggregation: Aggregation::Mean,
            }
        }

        /// The f64 weighted mean of part `part` over the senders that deliver it.
        fn expected(&self, part: usize) -> Option<Vec<f64>> {
            let contributors: Vec<usize> = (0..self.weights.len())
                .filter(|&s| self.ban_after[s].is_none_or(|k| part < k))
                .collect();
            if contributors.is_empty() {
                return None;
            }
            let weight_sum: f64 = contributors.iter().map(|&s| f64::from(self.weights[s])).sum();
            Some(
                (0..self.part_lens[part])
                    .map(|i| {
                        contributors
                            .iter()
                            .map(|&s| f64::from(self.weights[s]) * f64::from(self.values[s][part][i]))
                            .sum::<f64>()
                            / weight_sum
                    })
                    .collect(),
            )
        }

        /// Delivers everything in `schedule`'s order, banning senders at their ban points and draining
        /// completed parts at random moments; returns the parts in the order they were handed out.
        fn run(&self, rng: &mut Rng, schedule: Schedule) -> Vec<ReducedPart> {
            let senders = self.weights.len();
            let parts = self.part_lens.len();
            let mut reducer =
                PartReducer::with_aggregation(self.part_lens.clone(), self.weights.clone(), self.aggregation).unwrap();
            let mut out = Vec::new();
            let limit = |s: usize| self.ban_after[s].unwrap_or(parts);
            let drain = |reducer: &mut PartReducer, out: &mut Vec<ReducedPart>| {
                while let Some(part) = reducer.next_completed() {
                    // Completion means every sender still in the round has delivered the part.
                    for s in 0..senders {
                        assert!(
                            reducer.is_banned(s) || reducer.delivered(s) > part.index,
                            "part {} handed out before sender {s} delivered it",
                            part.index
                        );
                    }
                    // Released on hand-out.
                    assert!(reducer.accumulators[part.index].is_none());
                    out.push(part);
                }
            };
            let send = |reducer: &mut PartReducer, s: usize| {
                let part = reducer.delivered(s);
                reducer.accumulate(s, part, &self.values[s][part]).unwrap();
                if reducer.delivered(s) == self.ban_after[s].unwrap_or(usize::MAX) {
                    reducer.ban(s);
                }
            };
            // Senders banned before their first part.
            for s in 0..senders {
                if self.ban_after[s] == Some(0) {
                    reducer.ban(s);
                }
            }
            match schedule {
                Schedule::Lockstep => {
                    for part in 0..parts {
                        for s in (0..senders).filter(|&s| part < limit(s)) {
                            send(&mut reducer, s);
                        }
                        drain(&mut reducer, &mut out);
                    }
                }
                Schedule::Random => loop {
                    let pending: Vec<usize> = (0..senders).filter(|&s| reducer.delivered(s) < limit(s)).collect();
                    if pending.is_empty() {
                        break;
                    }
                    send(&mut reducer, pending[rng.below(pending.len())]);
                    if rng.chance(0.3) {
                        drain(&mut reducer, &mut out);
                    }
                },
                Schedule::OneAfterAnother => {
                    for s in 0..senders {
                        while reducer.delivered(s) < limit(s) {
                            send(&mut reducer, s);
                        }
                        drain(&mut reducer, &mut out);
                    }
                }
            }
            drain(&mut reducer, &mut out);
            assert!(
                reducer.is_finished(),
                "all senders done or banned, so every part completes"
            );
            assert!(reducer.next_completed().is_none());
            out
        }

        fn check(&self, out: &[ReducedPart]) {
            assert_eq!(out.len(), self.part_lens.len());
            for (index, part) in out.iter().enumerate() {
                assert_eq!(part.index, index, "parts are handed out in order");
                let contributors = (0..self.weights.len())
                    .filter(|&s| self.ban_after[s].is_none_or(|k| index < k))
                    .count();
                assert_eq!(part.contributors, contributors, "part {index}");
                match (self.expected(index), &part.average) {
                    (None, None) => {}
                    (Some(expected), Some(average)) => {
                        assert_eq!(expected.len(), average.len());
                        for (i, (&want, &got)) in expected.iter().zip(average).enumerate() {
                            let error = (f64::from(got) - want).abs();
                            assert!(
                                error <= 1e-5 + 1e-3 * want.abs(),
                                "part {index} value {i}: got {got}, want {want}"
                            );
                        }
                    }
                    (expected, got) => panic!("part {index}: expected {expected:?}, got {got:?}"),
                }
            }
        }
    }

    #[test]
    fn weighted_mean_for_every_group_size_part_count_and_interleaving() {
        let mut rng = Rng(7);
        for senders in [1, 2, 4, 10] {
            for parts in [0, 1, 100] {
                for schedule in [Schedule::Lockstep, Schedule::Random, Schedule::OneAfterAnother] {
                    for _ in 0..3 {
                        let scenario = Scenario::new(&mut rng, senders, parts, 0.0);
                        let out = scenario.run(&mut rng, schedule);
                        scenario.check(&out);
                    }
                }
            }
        }
    }

    #[test]
    fn bans_keep_earlier_contributions_and_release_later_parts() {
        let mut rng = Rng(11);
        let mut saw_empty_part = false;
        for senders in [1, 2, 4, 10] {
            for parts in [1, 100] {
                for schedule in [Schedule::Lockstep, Schedule::Random, Schedule::OneAfterAnother] {
                    for _ in 0..5 {
                        let scenario = Scenario::new(&mut rng, senders, parts, 0.5);
                        let out = scenario.run(&mut rng, schedule);
                        scenario.check(&out);
                        saw_empty_part |= out.iter().any(|p| p.average.is_none());
                    }
                }
            }
        }
        assert!(saw_empty_part, "some scenario banned every sender before a part");
    }

    /// With a τ far above the values' spread CenteredClip clips nothing and equals the weighted mean, so the
    /// whole harness (interleavings, bans, empty parts) applies to the copies it keeps.
    #[test]
    fn centered_clip_with_a_large_tau_is_the_weighted_mean_under_every_interleaving_and_ban() {
        let mut rng = Rng(13);
        let clip = Aggregation::CenteredClip {
            tau: 1e6,
            iterations: 3,
        };
        for senders in [1, 2, 4, 10] {
            for parts in [0, 1, 40] {
                for schedule in [Schedule::Lockstep, Schedule::Random, Schedule::OneAfterAnother] {
                    for ban_probability in [0.0, 0.5] {
                        let scenario = Scenario {
                            aggregation: clip,
                            ..Scenario::new(&mut rng, senders, parts, ban_probability)
                        };
                        let out = scenario.run(&mut rng, schedule);
                        scenario.check(&out);
                        assert!(out.iter().all(|p| p.clipped == 0));
                    }
                }
            }
        }
    }

    #[test]
    fn centered_clip_bounds_an_outlier_and_keeps_a_banned_senders_delivered_parts() {
        let clip = Aggregation::CenteredClip {
            tau: 0.5,
            iterations: 5,
        };
        let mut reducer = PartReducer::with_aggregation(vec![3, 3], vec![1.0; 4], clip).unwrap();
        assert_eq!(reducer.aggregation(), clip);
        for sender in 0..3 {
            let base = 1.0 + sender as f32 * 0.1;
            reducer.accumulate(sender, 0, &[base, -base, base]).unwrap();
        }
        assert!(reducer.next_completed().is_none(), "part 0 waits for sender 3");
        // Sender 3 sends a part a thousand times too large, then fails.
        reducer.accumulate(3, 0, &[1.1e3, -1.1e3, 1.1e3]).unwrap();
        reducer.ban(3);
        let part = reducer.next_completed().unwrap();
        assert_eq!((part.index, part.contributors, part.clipped), (0, 4, 1));
        let average = part.average.unwrap();
        // The median of the four is 1.15 (per sign); the outlier pulls by at most τ = 0.5 in a quarter of
        // the weight per iteration; the mean would be 275.8.
        for (value, sign) in average.iter().zip([1.0f32, -1.0, 1.0]) {
            let magnitude = value * sign;
            assert!((1.0..1.8).contains(&magnitude), "{average:?}");
        }
        // Part 1 no longer waits for the banned sender, and its copies are the three others'.
        for sender in 0..3 {
            reducer.accumulate(sender, 1, &[2.0, 2.0, 2.0]).unwrap();
        }
        let part = reducer.next_completed().unwrap();
        assert_eq!(
            (part.average, part.contributors, part.clipped),
            (Some(vec![2.0; 3]), 3, 0)
        );
        assert!(reducer.is_finished());
    }

    #[test]
    fn centered_clip_counts_zero_weights_only_without_weighted_copies_and_releases_copies() {
        let clip = Aggregation::CenteredClip {
            tau: 100.0,
            iterations: 2,
        };
        // Sender 0 weighs nothing: it counts only where sender 1 (weight 2) did not deliver.
        let mut reducer = PartReducer::with_aggregation(vec![2, 2], vec![0.0, 2.0], clip).unwrap();
        reducer.accumulate(0, 0, &[10.0, 20.0]).unwrap();
        reducer.accumulate(1, 0, &[1.0, 2.0]).unwrap();
        assert!(reducer.accumulators[0].is_some() && reducer.accumulators[1].is_none());
        reducer.ban(1);
        reducer.accumulate(0, 1, &[3.0, 5.0]).unwrap();
        let part = reducer.next_completed().unwrap();
        assert_eq!((part.average, part.contributors), (Some(vec![1.0, 2.0]), 2));
        assert!(reducer.accumulators[0].is_none(), "released on hand-out");
        assert_eq!(reducer.next_completed().unwrap().average, Some(vec![3.0, 5.0]));
        // All weights zero, negative or not finite: the plain mean (a large τ clips nothing).
        let mut reducer = PartReducer::with_aggregation(vec![1], vec![0.0, -1.0, f32::NAN], clip).unwrap();
        for (sender, value) in [(0, 1.0), (1, 2.0), (2, 6.0)] {
            reducer.accumulate(sender, 0, &[value]).unwrap();
        }
        let average = reducer.next_completed().unwrap().average.unwrap();
        assert!((average[0] - 3.0).abs() < 1e-6, "{average:?}");
    }

    #[test]
    fn sums_come_from_the_pool_and_averages_go_back_to_it_within_its_limit() {
        let pool = Arc::new(SumPool::new(2));
        for capacity in [8, 3, 5] {
            pool.give(Vec::with_capacity(capacity));
        }
        assert_eq!(pool.spare(), 2, "the third buffer is beyond the limit and freed");
        let mut reducer = PartReducer::new(vec![4, 4], vec![1.0, 3.0]).with_pool(pool.clone());
        reducer.accumulate(0, 0, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(
            pool.spare(),
            1,
            "the sum of part 0 took the buffer of 8 (the one of 3 is too small)"
        );
        reducer.accumulate(1, 0, &[5.0, 6.0, 7.0, 8.0]).unwrap();
        let average = reducer.next_completed().unwrap().average.unwrap();
        assert_eq!(average, vec![4.0, 5.0, 6.0, 7.0]);
        assert_eq!(average.capacity(), 8, "the sum was built in the pooled buffer");
        pool.give(average);
        let eight = pool.take(4);
        assert_eq!(eight.capacity(), 8, "the only spare that fits 4 values");
        pool.give(Vec::with_capacity(6));
        pool.give(eight);
        assert_eq!(pool.spare(), 2);
        assert_eq!(pool.take(4).capacity(), 6, "the smallest spare that fits");
        reducer.accumulate(0, 1, &[2.0; 4]).unwrap();
        reducer.accumulate(1, 1, &[2.0; 4]).unwrap();
        assert_eq!(reducer.next_completed().unwrap().average, Some(vec![2.0; 4]));
        assert_eq!(pool.take(100).capacity(), 100, "no spare fits 100 values: a new buffer");
    }

    #[test]
    fn an_invalid_aggregation_is_refused() {
        let error = PartReducer::with_aggregation(
            vec![1],
            vec![1.0],
            Aggregation::CenteredClip {
                tau: f32::NAN,
                iterations: 1,
            },
        )
        .unwrap_err();
        assert!(matches!(error, AggregationError::InvalidTau(tau) if tau.is_nan()));
        // Refused input is refused as with the mean: a non-finite copy never enters the copies.
        let clip = Aggregation::CenteredClip {
            tau: 1.0,
            iterations: 1,
        };
        let mut reducer = PartReducer::with_aggregation(vec![2], vec![1.0], clip).unwrap();
        assert!(matches!(
            reducer.accumulate(0, 0, &[1.0, f32::INFINITY]),
            Err(ReducerError::NonFinite { position: 1, .. })
        ));
        assert!(reducer.accumulators[0].is_none());
    }

    #[test]
    fn a_ban_releases_parts_waiting_for_the_banned_sender() {
        let mut reducer = PartReducer::new(vec![1, 1, 1], vec![1.0, 1.0]);
        reducer.accumulate(0, 0, &[2.0]).unwrap();
        reducer.accumulate(0, 1, &[4.0]).unwrap();
        reducer.accumulate(1, 0, &[6.0]).unwrap();
        assert_eq!(reducer.next_completed().unwrap().average, Some(vec![4.0]));
        assert!(reducer.next_completed().is_none(), "part 1 waits for sender 1");
        reducer.ban(1);
        reducer.ban(1);
        let part = reducer.next_completed().unwrap();
        assert_eq!((part.index, part.average, part.contributors), (1, Some(vec![4.0]), 1));
        assert!(reducer.next_completed().is_none(), "part 2 still waits for sender 0");
        reducer.ban(0);
        let part = reducer.next_completed().unwrap();
        assert_eq!((part.index, part.average, part.contributors), (2, None, 0));
        assert!(reducer.is_finished());
        assert_eq!(
            reducer.accumulate(1, 1, &[1.0]),
            Err(ReducerError::BannedSender { sender: 1, part: 1 })
        );
    }

    #[test]
    fn zero_weights_fall_back_to_the_plain_mean_of_the_contributors() {
        // Sender 0 weighs nothing: it counts only where sender 1 (weight 2) did not deliver.
        let mut reducer = PartReducer::new(vec![2, 2], vec![0.0, 2.0]);
        reducer.accumulate(0, 0, &[10.0, 20.0]).unwrap();
        reducer.accumulate(1, 0, &[1.0, 2.0]).unwrap();
        reducer.ban(1);
        reducer.accumulate(0, 1, &[3.0, 5.0]).unwrap();
        let part = reducer.next_completed().unwrap();
        assert_eq!((part.average, part.contributors), (Some(vec![1.0, 2.0]), 2));
        assert_eq!(reducer.next_completed().unwrap().average, Some(vec![3.0, 5.0]));
        // All weights zero, negative or not finite: the plain mean.
        let mut reducer = PartReducer::new(vec![1], vec![0.0, -1.0, f32::NAN]);
        for (sender, value) in [(0, 1.0), (1, 2.0), (2, 6.0)] {
            reducer.accumulate(sender, 0, &[value]).unwrap();
        }
        assert_eq!(reducer.next_completed().unwrap().average, Some(vec![3.0]));
        // A weighted sender after zero-weight ones replaces their values.
        let mut reducer = PartReducer::new(vec![1], vec![0.0, 1e-3]);
        reducer.accumulate(0, 0, &[100.0]).unwrap();
        reducer.accumulate(1, 0, &[5.0]).unwrap();
        assert_eq!(reducer.next_completed().unwrap().average, Some(vec![5.0]));
    }

    #[test]
    fn extreme_weights_neither_overflow_nor_lose_the_average() {
        let mut reducer = PartReducer::new(vec![2], vec![f32::MAX, f32::MAX]);
        reducer.accumulate(0, 0, &[1.0, -3.0]).unwrap();
        reducer.accumulate(1, 0, &[3.0, 3.0]).unwrap();
        assert_eq!(reducer.next_completed().unwrap().average, Some(vec![2.0, 0.0]));
        let mut reducer = PartReducer::new(vec![1], vec![1e-30]);
        reducer.accumulate(0, 0, &[7.0]).unwrap();
        assert_eq!(reducer.next_completed().unwrap().average, Some(vec![7.0]));
    }

    #[test]
    fn bad_input_is_an_error_and_changes_nothing() {
        let mut reducer = PartReducer::new(vec![3, 2], vec![1.0, 1.0]);
        assert_eq!(
            reducer.accumulate(2, 0, &[0.0; 3]),
            Err(ReducerError::UnknownSender {
                sender: 2,
                num_senders: 2
            })
        );
        assert_eq!(
            reducer.accumulate(0, 2, &[0.0; 3]),
            Err(ReducerError::PartOutOfRange {
                sender: 0,
                part: 2,
                num_parts: 2
            })
        );
        assert_eq!(
            reducer.accumulate(0, 1, &[0.0; 2]),
            Err(ReducerError::OutOfOrder {
                sender: 0,
                part: 1,
                expected: 0
            })
        );
        assert_eq!(
            reducer.accumulate(0, 0, &[0.0; 2]),
            Err(ReducerError::WrongLength {
                sender: 0,
                part: 0,
                expected: 3,
                actual: 2
            })
        );
        // A NaN after a long finite run (past the first 64-value block) is found, with its position.
        let mut long = PartReducer::new(vec![200], vec![1.0]);
        let mut values = vec![1.0f32; 200];
        values[130] = f32::NEG_INFINITY;
        assert_eq!(
            long.accumulate(0, 0, &values),
            Err(ReducerError::NonFinite {
                sender: 0,
                part: 0,
                position: 130,
                value: f32::NEG_INFINITY
            })
        );
        values[130] = 1.0;
        values[199] = f32::NAN;
        let error = long.accumulate(0, 0, &values).unwrap_err();
        assert!(matches!(error, ReducerError::NonFinite { position: 199, value, .. } if value.is_nan()));
        assert!(error.to_string().contains("position 199"), "{error}");
        // None of the refused parts counted.
        assert_eq!(reducer.delivered(0), 0);
        assert!(reducer.accumulators.iter().all(Option::is_none));
        reducer.accumulate(0, 0, &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            reducer.accumulate(0, 0, &[1.0, 2.0, 3.0]),
            Err(ReducerError::DuplicatePart {
                sender: 0,
                part: 0,
                delivered: 1
            })
        );
        assert_eq!(reducer.delivered(0), 1);
        assert_eq!(reducer.delivered(5), 0);
        reducer.ban(7);
        assert!(!reducer.is_banned(7));
        reducer.accumulate(1, 0, &[3.0, 2.0, 1.0]).unwrap();
        assert_eq!(reducer.next_completed().unwrap().average, Some(vec![2.0, 2.0, 2.0]));
    }

    #[test]
    fn accumulators_live_only_between_first_contribution_and_hand_out() {
        let mut reducer = PartReducer::new(vec![4; 10], vec![1.0, 1.0]);
        assert!(reducer.accumulators.iter().all(Option::is_none));
        for part in 0..10 {
            reducer.accumulate(0, part, &[1.0; 4]).unwrap();
        }
        reducer.accumulate(1, 0, &[1.0; 4]).unwrap();
        reducer.accumulate(1, 1, &[1.0; 4]).unwrap();
        assert!(reducer.next_completed().is_some());
        assert!(reducer.next_completed().is_some());
        let live = reducer.accumulators.iter().filter(|a| a.is_some()).count();
        assert_eq!(live, 8);
    }

    #[test]
    fn senders_or_parts_may_be_absent() {
        let mut no_senders = PartReducer::new(vec![3, 1], vec![]);
        assert_eq!(no_senders.next_completed().unwrap().average, None);
        assert_eq!(no_senders.next_completed().unwrap().contributors, 0);
        assert!(no_senders.is_finished());
        let mut no_parts = PartReducer::new(vec![], vec![1.0]);
        assert!(no_parts.is_finished());
        assert!(no_parts.next_completed().is_none());
    }

    /// Accumulation speed against a same-run memory bound (a STREAM-like triad over the same sizes), with
    /// senders in lockstep as in a healthy round (all senders deliver part p, then it is handed out).
    /// Run with `cargo test --release -p colony-averaging --lib reducer::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark; run by hand in release mode"]
    fn throughput() {
        use std::time::Instant;
        const VALUES: usize = 64 << 20;
        const PART: usize = 1 << 17;
        let senders = 4;
        let parts = VALUES / PART;
        let data: Vec<f32> = (0..VALUES).map(|i| (i % 1000) as f32 * 1e-3).collect();
        let mut reducer = PartReducer::new(vec![PART; parts], vec![1.0; senders]);
        let start = Instant::now();
        let mut checksum = 0.0f32;
        for (p, chunk) in data.chunks_exact(PART).enumerate() {
            for s in 0..senders {
                reducer.accumulate(s, p, chunk).unwrap();
            }
            while let Some(part) = reducer.next_completed() {
                checksum += part.average.unwrap()[0];
            }
        }
        let reduce = start.elapsed().as_secs_f64();
        // Triad a = a + s·b over the same bytes the reducer reads (senders × VALUES), on touched memory.
        let mut a = data.clone();
        let start = Instant::now();
        for _ in 0..senders {
            add_scaled(&mut a, std::hint::black_box(&data), 0.5);
        }
        let triad = start.elapsed().as_secs_f64();
        let gb = (senders * VALUES * 4) as f64 / 1e9;
        println!(
            "reducer: {:.2} GB/s of input, triad: {:.2} GB/s, ratio {:.2} (checksum {checksum}, {})",
            gb / reduce,
            gb / triad,
            triad / reduce,
            a[1]
        );
    }
}
