//! LAMB's two passes over one segment.
//!
//! Pass 1 updates the moments as Adam does and sums, per segment, the squares of the parameters and of the
//! update direction `u = m̂ / (√v̂ + eps) + weight_decay · p`. The optimizer adds the segment sums of each
//! tensor in segment order and turns them into the tensor's trust ratio. Pass 2 computes `u` again from the
//! stored moments (cheaper than writing it out and reading it back: 16 bytes a value instead of 20) and moves
//! `p` by `lr · ratio · u`.
//!
//! Sums run in eight `f64` lanes so that the loop vectorises and the result does not depend on the thread
//! that runs the segment.

use super::adam::{corrections, moments};

/// Lanes of the per-segment sums.
const LANES: usize = 8;

/// LAMB's constants for one group and one step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LambStep {
    /// Decay of the first moment.
    pub beta1: f32,
    /// `1 - beta1`.
    pub one_minus_beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `1 / (1 - beta1^t)`.
    pub inv_correction1: f32,
    /// `1 / √(1 - beta2^t)`.
    pub inv_sqrt_correction2: f32,
    /// Added to the corrected root of the second moment.
    pub eps: f32,
    /// Weight decay inside the update direction.
    pub weight_decay: f32,
}

impl LambStep {
    /// The constants of step `t` (counted from 1).
    pub fn new(beta1: f32, beta2: f32, eps: f32, weight_decay: f32, t: u64) -> Self {
        let (correction1, correction2) = corrections(beta1, beta2, t);
        Self {
            beta1,
            one_minus_beta1: 1.0 - beta1,
            beta2,
            one_minus_beta2: 1.0 - beta2,
            inv_correction1: (1.0 / correction1) as f32,
            inv_sqrt_correction2: (1.0 / correction2.sqrt()) as f32,
            eps,
            weight_decay,
        }
    }
}

/// The update direction of one value from its parameter and new moments; the same expression in both passes.
#[inline(always)]
fn direction<const DECAY: bool>(p: f32, m: f32, v: f32, step: &LambStep) -> f32 {
    let adam = (m * step.inv_correction1) / (v.sqrt() * step.inv_sqrt_correction2 + step.eps);
    if DECAY { adam + step.weight_decay * p } else { adam }
}

/// Pass 1: updates the moments and returns `(Σ p², Σ u²)` over the segment.
pub(crate) fn moments_and_norms(
    params: &[f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    step: &LambStep,
) -> (f64, f64) {
    if step.weight_decay != 0.0 {
        pass1::<true>(params, grads, exp_avg, exp_avg_sq, step)
    } else {
        pass1::<false>(params, grads, exp_avg, exp_avg_sq, step)
    }
}

fn pass1<const DECAY: bool>(
    params: &[f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    step: &LambStep,
) -> (f64, f64) {
    let n = params.len();
    let (grads, exp_avg, exp_avg_sq) = (&grads[..n], &mut exp_avg[..n], &mut exp_avg_sq[..n]);
    let mut p_squares = [0.0f64; LANES];
    let mut u_squares = [0.0f64; LANES];
    let mut element = |lane: usize, p: f32, g: f32, m: &mut f32, v: &mut f32| {
        let (m_new, v_new) = moments(
            g,
            *m,
            *v,
            step.beta1,
            step.one_minus_beta1,
            step.beta2,
            step.one_minus_beta2,
        );
        *m = m_new;
        *v = v_new;
        let u = direction::<DECAY>(p, m_new, v_new, step);
        p_squares[lane] += f64::from(p) * f64::from(p);
        u_squares[lane] += f64::from(u) * f64::from(u);
    };
    let (p_blocks, p_tail) = params.as_chunks::<LANES>();
    let (g_blocks, g_tail) = grads.as_chunks::<LANES>();
    let (m_blocks, m_tail) = exp_avg.as_chunks_mut::<LANES>();
    let (v_blocks, v_tail) = exp_avg_sq.as_chunks_mut::<LANES>();
    for (((p, g), m), v) in p_blocks.iter().zip(g_blocks).zip(m_blocks).zip(v_blocks) {
        for lane in 0..LANES {
            element(lane, p[lane], g[lane], &mut m[lane], &mut v[lane]);
        }
    }
    for (lane, (((&p, &g), m), v)) in p_tail.iter().zip(g_tail).zip(m_tail).zip(v_tail).enumerate() {
        element(lane, p, g, m, v);
    }
    (p_squares.iter().sum(), u_squares.iter().sum())
}

/// Pass 2: `p -= scaled_lr · u`, with `scaled_lr = lr · trust ratio` of the segment's tensor.
pub(crate) fn apply(params: &mut [f32], exp_avg: &[f32], exp_avg_sq: &[f32], step: &LambStep, scaled_lr: f32) {
    if step.weight_decay != 0.0 {
        pass2::<true>(params, exp_avg, exp_avg_sq, step, scaled_lr);
    } else {
        pass2::<false>(params, exp_avg, exp_avg_sq, step, scaled_lr);
    }
}

fn pass2<const DECAY: bool>(params: &mut [f32], exp_avg: &[f32], exp_avg_sq: &[f32], step: &LambStep, scaled_lr: f32) {
    for ((p, &m), &v) in params.iter_mut().zip(exp_avg).zip(exp_avg_sq) {
        *p -= scaled_lr * direction::<DECAY>(*p, m, v, step);
    }
}

/// The trust ratio of a tensor from its sums: `min(‖p‖, clamp_value) / ‖u‖`, or 1 where either norm is 0.
pub(crate) fn trust_ratio(p_squares: f64, u_squares: f64, clamp_value: f32) -> f64 {
    let weight_norm = p_squares.sqrt().min(f64::from(clamp_value));
    let update_norm = u_squares.sqrt();
    if weight_norm == 0.0 || update_norm == 0.0 {
        1.0
    } else {
        weight_norm / update_norm
    }
}
