//! CPU optimizers over one flat `f32` buffer: [`CpuOptimizer`] applies SGD, Adam, AdamW or LAMB
//! ([`OptimizerKind`]) to the ranges of its [`ParamGroup`]s, keeping its state (`exp_avg`, `exp_avg_sq`,
//! `momentum_buffer`) in full-length named [`HostBuffer`]s, so that the state averager can average the
//! statistics it is told to and state transfer can send them.
//!
//! A step is cut into segments of at most [`CHUNK_VALUES`](crate::kernels::CHUNK_VALUES) values of one range;
//! large models run them on the rayon pool. Each segment is updated in one fused pass that reads the
//! parameters, the gradients and the state once and writes the parameters and the state once (LAMB needs a
//! second pass for its per-tensor trust ratio). Hyper-parameter choices are made per segment, not per value,
//! so the element loops vectorise. Results are bit-identical whatever the number of threads.

mod adam;
mod config;
mod error;
mod lamb;
mod metadata;
mod plan;
mod sgd;
#[cfg(test)]
mod tests;

pub use config::{
    DEFAULT_ADAM_EPS, DEFAULT_BETA1, DEFAULT_BETA2, DEFAULT_LAMB_CLAMP, DEFAULT_LAMB_EPS, OptimizerConfig,
    OptimizerKind, ParamGroup,
};
pub use error::OptimizerError;
pub use metadata::{METADATA_LEN, METADATA_VERSION};

use crate::HostBuffer;
use adam::AdamStep;
use lamb::LambStep;
use metadata::Metadata;
use plan::Plan;
use sgd::SgdStep;

/// Name of SGD's velocity buffer.
pub const MOMENTUM_BUFFER: &str = "momentum_buffer";
/// Name of Adam's, AdamW's and LAMB's first moment.
pub const EXP_AVG: &str = "exp_avg";
/// Name of Adam's, AdamW's and LAMB's second moment.
pub const EXP_AVG_SQ: &str = "exp_avg_sq";

const SGD_MOMENTUM_STATE: &[&str] = &[MOMENTUM_BUFFER];
const ADAM_STATE: &[&str] = &[EXP_AVG, EXP_AVG_SQ];

/// An optimizer over a flat buffer of `total_values` parameters, with its state.
///
/// ```
/// use colony_offload::{CpuOptimizer, OptimizerConfig};
///
/// let mut optimizer = CpuOptimizer::new(OptimizerConfig::sgd(0.5, 0.0, 2), 2)?;
/// let mut params = [1.0, 2.0];
/// optimizer.step(&mut params, &[1.0, -1.0], 1.0)?;
/// assert_eq!(params, [0.5, 2.5]);
/// assert_eq!(optimizer.steps(), 1);
/// # Ok::<(), colony_offload::OptimizerError>(())
/// ```
#[derive(Debug, Clone)]
pub struct CpuOptimizer {
    config: OptimizerConfig,
    total_values: usize,
    plan: Plan,
    /// The buffers named by `state_names()`, in that order; unused slots are empty.
    state: [HostBuffer; 2],
    steps: u64,
    momentum_initialised: bool,
}

impl CpuOptimizer {
    /// An optimizer for a buffer of `total_values` parameters, with zeroed state.
    ///
    /// Refuses a configuration whose hyper-parameters are out of range or not finite, or whose ranges are
    /// reversed, reach past `total_values` or overlap; the error names the field and the value.
    pub fn new(config: OptimizerConfig, total_values: usize) -> Result<Self, OptimizerError> {
        config.validate(total_values)?;
        let plan = Plan::new(&config);
        let buffers = state_names_of(&config.kind).len();
        let state = std::array::from_fn(|i| HostBuffer::zeroed(if i < buffers { total_values } else { 0 }));
        Ok(Self {
            config,
            total_values,
            plan,
            state,
            steps: 0,
            momentum_initialised: false,
        })
    }

    /// One optimizer step: updates `params` and the state from `grads`. `lr_factor` multiplies every group's
    /// learning rate (the schedule's factor for the epoch, see [`LrSchedule`](crate::LrSchedule)).
    ///
    /// Refuses buffers whose length is not `total_values` and a factor that is negative or not finite, before
    /// changing anything. Non-finite gradients are not checked here (the caller checks what peers send).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr_factor: f64) -> Result<(), OptimizerError> {
        for (buffer, len) in [("params", params.len()), ("grads", grads.len())] {
            if len != self.total_values {
                return Err(OptimizerError::LengthMismatch {
                    buffer,
                    len,
                    expected: self.total_values,
                });
            }
        }
        if !(lr_factor.is_finite() && lr_factor >= 0.0) {
            return Err(OptimizerError::InvalidLrFactor { value: lr_factor });
        }
        self.steps = self.steps.saturating_add(1);
        let t = self.steps;
        let lrs: Vec<f64> = self
            .config
            .groups
            .iter()
            .map(|group| f64::from(group.lr) * lr_factor)
            .collect();
        let [first, second] = &mut self.state;
        let mut jobs = self.plan.jobs(params, grads, first, second);
        match self.config.kind {
            OptimizerKind::Sgd {
                momentum,
                dampening,
                nesterov,
            } => {
                let steps: Vec<SgdStep> = self
                    .config
                    .groups
                    .iter()
                    .zip(&lrs)
                    .map(|(group, &lr)| SgdStep {
                        lr: lr as f32,
                        weight_decay: group.weight_decay,
                        momentum,
                        one_minus_dampening: 1.0 - dampening,
                        first: !self.momentum_initialised,
                        nesterov,
                    })
                    .collect();
                self.plan.for_each(&mut jobs, |job| {
                    sgd::update(job.params, job.grads, job.first, &steps[job.segment.group]);
                });
                self.momentum_initialised |= momentum != 0.0;
            }
            OptimizerKind::Adam { beta1, beta2, eps } | OptimizerKind::AdamW { beta1, beta2, eps } => {
                let decoupled = matches!(self.config.kind, OptimizerKind::AdamW { .. });
                let steps: Vec<AdamStep> = self
                    .config
                    .groups
                    .iter()
                    .zip(&lrs)
                    .map(|(group, &lr)| AdamStep::new(beta1, beta2, eps, lr, group.weight_decay, decoupled, t))
                    .collect();
                self.plan.for_each(&mut jobs, |job| {
                    adam::update(job.params, job.grads, job.first, job.second, &steps[job.segment.group]);
                });
            }
            OptimizerKind::Lamb {
                beta1,
                beta2,
                eps,
                clamp_value,
            } => {
                let steps: Vec<LambStep> = self
                    .config
                    .groups
                    .iter()
                    .map(|group| LambStep::new(beta1, beta2, eps, group.weight_decay, t))
                    .collect();
                let sums = self.plan.map(&mut jobs, |job| {
                    lamb::moments_and_norms(job.params, job.grads, job.first, job.second, &steps[job.segment.group])
                });
                // Per tensor, in segment order: the same additions whatever ran each segment.
                let mut tensor_sums = vec![(0.0f64, 0.0f64); self.plan.tensors()];
                for (job, (p_squares, u_squares)) in jobs.iter().zip(sums) {
                    let sum = &mut tensor_sums[job.segment.tensor];
                    sum.0 += p_squares;
                    sum.1 += u_squares;
                }
                let ratios: Vec<f64> = tensor_sums
                    .iter()
                    .map(|&(p_squares, u_squares)| lamb::trust_ratio(p_squares, u_squares, clamp_value))
                    .collect();
                self.plan.for_each(&mut jobs, |job| {
                    let segment = job.segment;
                    let scaled_lr = (lrs[segment.group] * ratios[segment.tensor]) as f32;
                    lamb::apply(job.params, job.first, job.second, &steps[segment.group], scaled_lr);
                });
            }
        }
        Ok(())
    }

    /// Steps taken (Adam's and LAMB's bias corrections use it: the next step is number `steps() + 1`).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Sets the number of steps taken, e.g. after loading another peer's state. It does not change whether
    /// SGD's momentum buffer counts as initialised (see [`load_metadata`](Self::load_metadata)).
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// Whether SGD's momentum buffer holds a velocity; the first step with momentum copies the gradient into
    /// it instead of decaying it. Always false for the other rules.
    pub fn momentum_initialised(&self) -> bool {
        self.momentum_initialised
    }

    /// The names of the state buffers: `["momentum_buffer"]` for SGD with momentum, none for SGD without,
    /// `["exp_avg", "exp_avg_sq"]` for Adam, AdamW and LAMB.
    pub fn state_names(&self) -> &'static [&'static str] {
        state_names_of(&self.config.kind)
    }

    /// The state buffer called `name` (all `total_values` values), or `None` if this rule has no such state.
    pub fn state(&self, name: &str) -> Option<&[f32]> {
        let index = self.state_names().iter().position(|&n| n == name)?;
        Some(self.state[index].as_slice())
    }

    /// The state buffer called `name`, writable (to load averaged or transferred state).
    pub fn state_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let index = self.state_names().iter().position(|&n| n == name)?;
        Some(self.state[index].as_mut_slice())
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The number of parameters the optimizer was built for.
    pub fn total_values(&self) -> usize {
        self.total_values
    }

    /// The non-tensor state (steps taken; whether SGD's momentum buffer is initialised) as a small versioned
    /// encoding ([`METADATA_LEN`] bytes), for state transfer.
    pub fn metadata(&self) -> Vec<u8> {
        Metadata {
            steps: self.steps,
            momentum_initialised: self.momentum_initialised,
        }
        .encode(&self.config.kind)
    }

    /// Loads what [`metadata`](Self::metadata) produced, possibly on another peer. Refuses, without changing
    /// anything, bytes of another length, version or optimizer kind, or with unknown flags; never panics.
    pub fn load_metadata(&mut self, bytes: &[u8]) -> Result<(), OptimizerError> {
        let metadata = Metadata::decode(bytes, &self.config.kind)?;
        self.steps = metadata.steps;
        self.momentum_initialised = metadata.momentum_initialised;
        Ok(())
    }

    #[cfg(test)]
    fn set_parallel_min_values(&mut self, values: usize) {
        self.plan.set_parallel_min_values(values);
    }
}

fn state_names_of(kind: &OptimizerKind) -> &'static [&'static str] {
    match *kind {
        OptimizerKind::Sgd { momentum, .. } if momentum != 0.0 => SGD_MOMENTUM_STATE,
        OptimizerKind::Sgd { .. } => &[],
        OptimizerKind::Adam { .. } | OptimizerKind::AdamW { .. } | OptimizerKind::Lamb { .. } => ADAM_STATE,
    }
}
