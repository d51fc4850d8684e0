//! The gradient accumulator: adds each micro-batch's gradient, weighted by its batch size, into one buffer
//! and counts samples and steps. It runs on the trainer's call, so it is a plain value, not an actor: its
//! cost per `step()` is one `axpy` over the gradient.

use colony_offload::HostBuffer;
use colony_offload::kernels;

/// What one epoch accumulated, taken at the epoch boundary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accumulated {
    /// Samples accumulated.
    pub samples: u64,
    /// `step()` calls that accumulated.
    pub steps: u64,
}

/// Accumulates `Σ batch · gradient` (the sum of per-sample gradients when each micro-batch's gradient is the
/// mean over its samples), in Colony's buffer or in the trainer's own (`reuse_grad_buffers`).
#[derive(Debug)]
pub struct GradientAccumulator {
    /// Colony's accumulator; `None` when the trainer's buffer is reused.
    buffer: Option<HostBuffer>,
    /// The first batch size seen: with `reuse_grad_buffers` every step is assumed to have it (the trainer
    /// adds plain gradients, unweighted), as in Hivemind.
    anchor_batch: Option<u32>,
    samples: u64,
    steps: u64,
}

impl GradientAccumulator {
    /// An accumulator for `len` values; `reuse` leaves the accumulation to the trainer's buffer.
    pub fn new(len: usize, reuse: bool) -> Self {
        Self {
            buffer: (!reuse).then(|| HostBuffer::zeroed(len)),
            anchor_batch: None,
            samples: 0,
            steps: 0,
        }
    }

    /// Adds one micro-batch: `grads` is its mean gradient over `batch` samples (or, when the trainer's
    /// buffer is reused, the trainer's running sum, which is left alone).
    pub fn accumulate(&mut self, grads: &[f32], batch: u32) {
        let anchor = *self.anchor_batch.get_or_insert(batch);
        if let Some(buffer) = &mut self.buffer {
            // Scaled by batch/anchor rather than batch so that values stay near the gradient's magnitude
            // (this matters for the 16-bit codecs); `take` multiplies the anchor back in.
            kernels::axpy(buffer, batch as f32 / anchor as f32, grads);
        }
        self.samples += u64::from(batch);
        self.steps += 1;
    }

    /// Samples accumulated this epoch.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Steps accumulated this epoch.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Writes `scale · Σ batch · gradient` into `out` and resets the accumulator; `trainer` is the trainer's
    /// gradient buffer, read (and zeroed: zeroing it is Colony's job) when it is the accumulator.
    pub fn take_into(&mut self, out: &mut [f32], scale: f32, trainer: &mut [f32]) -> Accumulated {
        let anchor = self.anchor_batch.unwrap_or(1) as f32;
        match &mut self.buffer {
            Some(buffer) => {
                kernels::copy(out, buffer);
                kernels::scale(out, scale * anchor);
                kernels::fill_zero(buffer);
            }
            None => {
                kernels::copy(out, trainer);
                kernels::scale(out, scale * anchor);
                kernels::fill_zero(trainer);
            }
        }
        let taken = Accumulated {
            samples: self.samples,
            steps: self.steps,
        };
        self.samples = 0;
        self.steps = 0;
        taken
    }

    /// Forgets this epoch's gradients (after loading the state, computed on stale parameters).
    pub fn reset(&mut self, trainer: &mut [f32]) {
        match &mut self.buffer {
            Some(buffer) => kernels::fill_zero(buffer),
            None => kernels::fill_zero(trainer),
        }
        self.samples = 0;
        self.steps = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_per_sample_gradients_weighted_by_batch() {
        let mut acc = GradientAccumulator::new(2, false);
        let mut trainer = [0.0f32; 2];
        acc.accumulate(&[1.0, 2.0], 2);
        acc.accumulate(&[3.0, -1.0], 6);
        let mut out = [0.0; 2];
        let taken = acc.take_into(&mut out, 1.0, &mut trainer);
        assert_eq!(taken, Accumulated { samples: 8, steps: 2 });
        assert_eq!(out, [2.0 * 1.0 + 6.0 * 3.0, 2.0 * 2.0 - 6.0]);
        // Reset after taking.
        assert_eq!(acc.samples(), 0);
        acc.take_into(&mut out, 1.0, &mut trainer);
        assert_eq!(out, [0.0, 0.0]);
    }

    #[test]
    fn a_reused_trainer_buffer_is_read_scaled_by_the_anchor_and_zeroed() {
        let mut acc = GradientAccumulator::new(2, true);
        // The trainer summed three gradients of batch 4 into its own buffer.
        let mut trainer = [3.0f32, 6.0];
        for _ in 0..3 {
            acc.accumulate(&trainer.clone(), 4);
        }
        let mut out = [0.0; 2];
        let taken = acc.take_into(&mut out, 0.5, &mut trainer);
        assert_eq!(taken, Accumulated { samples: 12, steps: 3 });
        assert_eq!(out, [6.0, 12.0]);
        assert_eq!(trainer, [0.0, 0.0]);
    }
}
