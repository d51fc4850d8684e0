//! How a step is cut into units of work: every range (tensor) of every group becomes segments of at most
//! [`CHUNK_VALUES`] values, and each step hands each segment its own disjoint slices of the parameters, the
//! gradients and the state buffers.
//!
//! The segments depend only on the configuration, never on the number of threads, and reductions (LAMB's
//! norms) are summed per segment and then in segment order, so a step gives the same bits on any pool.

use rayon::prelude::*;

use super::OptimizerConfig;
use crate::kernels::{CHUNK_VALUES, PARALLEL_MIN_VALUES};

/// At most [`CHUNK_VALUES`] consecutive values of one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    /// First value in the flat buffer.
    pub start: usize,
    /// One past the last value.
    pub end: usize,
    /// Index of the parameter group.
    pub group: usize,
    /// Index of the range among all non-empty ranges, ordered by start (LAMB's per-tensor norms).
    pub tensor: usize,
}

/// The segments of a configuration, ordered by start.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    segments: Vec<Segment>,
    tensors: usize,
    /// Whether steps run on the rayon pool: when the ranges cover at least this many values.
    parallel_min_values: usize,
    covered: usize,
}

/// The slices of one segment for one step.
pub(crate) struct Job<'a> {
    /// The segment.
    pub segment: Segment,
    /// Its parameters.
    pub params: &'a mut [f32],
    /// Its gradients.
    pub grads: &'a [f32],
    /// Its part of the first state buffer (empty where the rule has none).
    pub first: &'a mut [f32],
    /// Its part of the second state buffer (empty where the rule has none).
    pub second: &'a mut [f32],
}

impl Plan {
    /// The plan of a validated configuration (disjoint, in-bounds ranges).
    pub fn new(config: &OptimizerConfig) -> Self {
        let mut ranges: Vec<(usize, usize, usize)> = config
            .groups
            .iter()
            .enumerate()
            .flat_map(|(g, group)| group.ranges.iter().map(move |range| (range.start, range.end, g)))
            .filter(|&(start, end, _)| start < end)
            .collect();
        ranges.sort_unstable();
        let mut segments = Vec::new();
        let mut covered = 0;
        for (tensor, &(start, end, group)) in ranges.iter().enumerate() {
            covered += end - start;
            segments.extend((start..end).step_by(CHUNK_VALUES).map(|from| Segment {
                start: from,
                end: (from + CHUNK_VALUES).min(end),
                group,
                tensor,
            }));
        }
        Self {
            segments,
            tensors: ranges.len(),
            parallel_min_values: PARALLEL_MIN_VALUES,
            covered,
        }
    }

    /// Number of non-empty ranges (tensors).
    pub fn tensors(&self) -> usize {
        self.tensors
    }

    /// Sets the size from which steps run on the rayon pool (tests force both paths with it).
    #[cfg(test)]
    pub fn set_parallel_min_values(&mut self, values: usize) {
        self.parallel_min_values = values;
    }

    fn parallel(&self) -> bool {
        self.covered >= self.parallel_min_values
    }

    /// One job per segment, in segment order. `first` and `second` are either empty or as long as `params`;
    /// `params` and `grads` cover every segment (the optimizer checks their lengths first).
    pub fn jobs<'a>(
        &self,
        params: &'a mut [f32],
        grads: &'a [f32],
        first: &'a mut [f32],
        second: &'a mut [f32],
    ) -> Vec<Job<'a>> {
        let (mut params, mut first, mut second) = (params, first, second);
        let mut offset = 0;
        let mut jobs = Vec::with_capacity(self.segments.len());
        for &segment in &self.segments {
            let skip = segment.start - offset;
            let len = segment.end - segment.start;
            offset = segment.end;
            jobs.push(Job {
                segment,
                params: carve(&mut params, skip, len),
                grads: &grads[segment.start..segment.end],
                first: carve(&mut first, skip, len),
                second: carve(&mut second, skip, len),
            });
        }
        jobs
    }

    /// Runs `work` on every job, on the rayon pool for large plans.
    pub fn for_each(&self, jobs: &mut [Job<'_>], work: impl Fn(&mut Job<'_>) + Sync + Send) {
        if self.parallel() {
            jobs.par_iter_mut().for_each(work);
        } else {
            jobs.iter_mut().for_each(work);
        }
    }

    /// Runs `work` on every job and returns its results in job order, on the rayon pool for large plans.
    pub fn map<T: Send>(&self, jobs: &mut [Job<'_>], work: impl Fn(&mut Job<'_>) -> T + Sync + Send) -> Vec<T> {
        if self.parallel() {
            jobs.par_iter_mut().map(work).collect()
        } else {
            jobs.iter_mut().map(work).collect()
        }
    }
}

/// Skips `skip` values of `rest` and takes the next `len`, leaving the remainder in `rest`; an empty `rest`
/// (a state buffer the rule does not have) gives empty slices.
fn carve<'a>(rest: &mut &'a mut [f32], skip: usize, len: usize) -> &'a mut [f32] {
    if rest.is_empty() {
        return &mut [];
    }
    let (mine, tail) = std::mem::take(rest)[skip..].split_at_mut(len);
    *rest = tail;
    mine
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{OptimizerKind, ParamGroup};

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn segments_split_long_ranges_and_follow_the_buffer_order() {
        let config = OptimizerConfig::new(
            OptimizerKind::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            vec![
                ParamGroup::new(vec![CHUNK_VALUES + 10..3 * CHUNK_VALUES, 5..5], 0.1, 0.0),
                ParamGroup::new(vec![0..10], 0.2, 0.0),
            ],
        );
        let plan = Plan::new(&config);
        let c = CHUNK_VALUES;
        let expected = [(0, 10, 1, 0), (c + 10, 2 * c + 10, 0, 1), (2 * c + 10, 3 * c, 0, 1)];
        let got: Vec<_> = plan
            .segments
            .iter()
            .map(|s| (s.start, s.end, s.group, s.tensor))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(plan.tensors(), 2);

        let total = 3 * c + 5;
        let mut params: Vec<f32> = (0..total).map(|i| i as f32).collect();
        let grads = params.clone();
        let mut first = vec![0.0; total];
        let mut jobs = plan.jobs(&mut params, &grads, &mut first, &mut []);
        assert_eq!(jobs.len(), 3);
        for job in &mut jobs {
            assert_eq!(job.params[0], job.segment.start as f32);
            assert_eq!(job.grads.len(), job.segment.end - job.segment.start);
            assert_eq!(job.first.len(), job.params.len());
            assert!(job.second.is_empty());
            job.first.fill(1.0);
        }
        drop(jobs);
        assert_eq!(
            first.iter().sum::<f32>(),
            (10 + 2 * c - 10) as f32,
            "values outside the ranges untouched"
        );
    }
}
