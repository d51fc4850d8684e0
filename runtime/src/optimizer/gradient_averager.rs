//! The gradient averager: turns an epoch's accumulated gradients into the gradient of the swarm's global
//! batch, with one samples-weighted all-reduce.
//!
//! A peer sends `Σ batch·gradient / target` and one more value, `samples / target`, at equal weights; the
//! average of the first divided by the average of the second is `Σ_peers Σ batch·gradient / Σ_peers
//! samples`. So the weights need not be known when the group forms (matchmaking starts before the epoch
//! ends), a peer with no samples (tagging along) changes nothing, and the result is what Hivemind's
//! samples-weighted average of per-peer mean gradients gives.

use std::sync::Arc;
use std::time::Duration;

use colony_averaging::codec::{Codec, CodecPolicy};
use colony_averaging::matchmaking::GroupInfo;
use colony_averaging::tensor::{FlatTensors, TensorLayout};
use colony_offload::kernels;

use super::gradient_accumulator::GradientAccumulator;
use super::offload::SAMPLES_TENSOR;
use crate::averager::{Averager, AveragerConfig, AveragerError, GroupOptions};
use crate::membership::Membership;

/// One epoch's gradients, taken from the accumulator for a round.
#[derive(Debug, Clone)]
pub struct EpochGradients {
    /// `Σ batch·gradient / target`, then `samples / target`.
    values: Vec<f32>,
    samples: u64,
    target: u64,
}

impl EpochGradients {
    /// Takes (and resets) what `accumulator` holds; `trainer` is the trainer's gradient buffer, read and
    /// zeroed when it is the accumulator.
    pub fn take(accumulator: &mut GradientAccumulator, trainer: &mut [f32], target: u64) -> Self {
        let len = trainer.len();
        let mut values = vec![0.0f32; len + 1];
        let taken = accumulator.take_into(&mut values[..len], 1.0 / target as f32, trainer);
        values[len] = taken.samples as f32 / target as f32;
        Self {
            values,
            samples: taken.samples,
            target,
        }
    }

    /// Replaces gradients that hold NaN or infinity by nothing (zero gradient, zero samples: the peer
    /// still takes part, so the others need not wait for it). Returns whether it did. One pass per epoch,
    /// not per step, so the trainer's `step()` stays one axpy.
    pub fn drop_if_not_finite(&mut self) -> bool {
        if self.values.iter().all(|v| v.is_finite()) {
            return false;
        }
        self.values.fill(0.0);
        self.samples = 0;
        true
    }

    /// Samples accumulated.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The mean gradient over this peer's own samples (what a failed round falls back to); `None` without
    /// samples.
    pub fn local(&self) -> Option<Vec<f32>> {
        (self.samples > 0).then(|| {
            let mut grads = self.values[..self.values.len() - 1].to_vec();
            kernels::scale(&mut grads, self.target as f32 / self.samples as f32);
            grads
        })
    }
}

/// Averages epochs' gradients with groups of peers (under the group key prefix `grads`).
pub struct GradientAverager {
    averager: Averager,
}

impl GradientAverager {
    /// The gradient round codecs: `policy` for the gradients, none for the sample count.
    pub fn codecs(policy: &CodecPolicy) -> CodecPolicy {
        CodecPolicy::ByName {
            codecs: [(SAMPLES_TENSOR.to_owned(), Codec::None)].into_iter().collect(),
            default: Box::new(policy.clone()),
        }
    }

    /// Starts the averager of `layout` (the gradient layout: the parameters' tensors, then the sample
    /// count) on `membership`.
    pub fn start(
        membership: &Membership,
        services: &crate::averager::AveragerServices,
        layout: Arc<TensorLayout>,
        config: AveragerConfig,
    ) -> Result<Self, AveragerError> {
        Ok(Self {
            averager: Averager::start(membership, services, layout, config)?,
        })
    }

    /// The underlying averager.
    pub fn averager(&self) -> &Averager {
        &self.averager
    }

    /// Looks for a group among `expected` peers (this one included) for at most `timeout`, intending to start
    /// at `scheduled_start` (the epoch's estimated end) at the latest.
    ///
    /// Groups are not bound to an epoch: a peer that ends its epoch a moment after the others joins the
    /// group they are forming rather than wait alone for a round that is over (which kept late peers one
    /// step out of phase for good when rounds were bound to epochs).
    pub async fn find_group(
        &self,
        expected: usize,
        scheduled_start: Option<f64>,
        timeout: Duration,
    ) -> Result<GroupInfo, AveragerError> {
        let options = GroupOptions {
            timeout,
            scheduled_start,
            expected_group_size: Some(expected.max(2)),
            round: None,
        };
        self.averager.find_group(1.0, options).await
    }

    /// Averages `gradients` in `group`: the mean gradient of the group's global batch, or `None` when no
    /// member accumulated a sample. A round where some parts kept local values (a reducer failed) is an
    /// error: mixing averaged and local parts would scale them differently.
    pub async fn average(&self, group: &GroupInfo, gradients: EpochGradients) -> Result<Option<Vec<f32>>, String> {
        let params_len = gradients.values.len() - 1;
        let tensors = FlatTensors::new(self.averager.layout().clone(), gradients.values)
            .map_err(|e| format!("the gradients do not fit the averager's layout: {e}"))?;
        let outcome = self
            .averager
            .average_in(group, Some(tensors))
            .await
            .map_err(|e| e.to_string())?;
        let report = &outcome.report;
        if report.parts_averaged < report.parts {
            return Err(format!(
                "only {} of {} parts were averaged (failed reducers: {}, timed out: {})",
                report.parts_averaged,
                report.parts,
                report.failed_reducers.len(),
                report.timed_out
            ));
        }
        let mut averaged = outcome.tensors.ok_or("the all-reduce returned no tensors")?.into_vec();
        let mean_samples = averaged[params_len];
        averaged.truncate(params_len);
        Ok((mean_samples > 0.0).then(|| {
            kernels::scale(&mut averaged, 1.0 / mean_samples);
            averaged
        }))
    }

    /// Takes part in `group` with nothing (zero gradient, zero samples): for a peer that matched but will
    /// not use the round, so that the others need not wait for it.
    pub async fn tag_along(&self, group: &GroupInfo) {
        let zeros = self.averager.layout().zeros();
        let _ = self.averager.average_in(group, Some(zeros)).await;
    }

    /// Reduces for the others without tensors of its own (an auxiliary peer).
    pub async fn reduce_for_others(&self, group: &GroupInfo) -> Result<(), AveragerError> {
        self.averager.average_in(group, None).await.map(|_| ())
    }

    /// Stops the matchmaker.
    pub fn shutdown(&self) {
        self.averager.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_gradient_is_the_mean_over_own_samples_and_non_finite_epochs_are_dropped() {
        let mut accumulator = GradientAccumulator::new(2, false);
        let mut trainer = [0.0f32; 2];
        accumulator.accumulate(&[1.0, 2.0], 4);
        accumulator.accumulate(&[3.0, 6.0], 12);
        let mut gradients = EpochGradients::take(&mut accumulator, &mut trainer, 32);
        assert_eq!(gradients.samples(), 16);
        // (4·[1, 2] + 12·[3, 6]) / 16
        assert_eq!(gradients.local(), Some(vec![2.5, 5.0]));
        assert!(!gradients.drop_if_not_finite());

        accumulator.accumulate(&[f32::NAN, 1.0], 4);
        let mut gradients = EpochGradients::take(&mut accumulator, &mut trainer, 32);
        assert!(gradients.drop_if_not_finite());
        assert_eq!(gradients.samples(), 0);
        assert_eq!(gradients.local(), None);
    }
}
