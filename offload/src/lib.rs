//! `colony-offload` holds Colony's host-side memory and the CPU optimizer that runs on it, so that a model's
//! optimizer state can live in host RAM while the GPU trains (Hivemind's `offload_optimizer`). It sits below
//! the runtime, beside `colony-averaging`, and depends on no actor framework.
//!
//! - [`HostBuffer`]: a 64-byte aligned heap buffer of `f32` (page-locked memory for CUDA copies comes later
//!   behind the same type).
//! - [`kernels`]: multi-threaded, vectorised element-wise kernels (`axpy`, `scale`, `copy`, `fill_zero`, and
//!   the STREAM triad that benchmarks use as the memory-bandwidth bound).
//! - [`CpuOptimizer`]: SGD (momentum, dampening, Nesterov, weight decay), Adam, AdamW and LAMB over one flat
//!   parameter buffer, with named state buffers (`exp_avg`, `exp_avg_sq`, `momentum_buffer`) and a small
//!   metadata encoding for state transfer. Updates follow PyTorch's rules and are bit-identical whatever the
//!   number of threads.
//! - [`LrSchedule`]: the learning-rate factor of each epoch (step, exponential, warm-up with cosine or linear
//!   decay, or a closure).
//!
//! ```
//! use colony_offload::{CpuOptimizer, LrSchedule, OptimizerConfig};
//!
//! let total = 4;
//! let mut optimizer = CpuOptimizer::new(OptimizerConfig::adam(1e-3, total), total)?;
//! let schedule = LrSchedule::WarmupLinear { warmup: 10, total: 1000 };
//! let mut params = vec![0.5f32; total];
//! let grads = vec![0.1f32; total];
//! for epoch in 1..=3 {
//!     optimizer.step(&mut params, &grads, schedule.factor(epoch))?;
//! }
//! assert_eq!(optimizer.steps(), 3);
//! assert!(params.iter().all(|&p| p < 0.5));
//! assert_eq!(optimizer.state_names(), ["exp_avg", "exp_avg_sq"]);
//! # Ok::<(), colony_offload::OptimizerError>(())
//! ```

pub mod buffer;
pub mod kernels;
pub mod optim;
pub mod schedule;

pub use buffer::HostBuffer;
pub use optim::{CpuOptimizer, OptimizerConfig, OptimizerError, OptimizerKind, ParamGroup};
pub use schedule::LrSchedule;

#[cfg(test)]
pub(crate) mod test_support {
    /// `len` values from `seed` (SplitMix64), spread over several orders of magnitude and both signs, with a
    /// few exact zeros: enough variety that a reordered sum or a skipped rounding shows in the bits.
    pub fn random_values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                if z.is_multiple_of(97) {
                    return 0.0;
                }
                let unit = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                let exponent = ((z >> 8) % 8) as i32 - 4;
                unit * 2f32.powi(exponent)
            })
            .collect()
    }
}
