//! LAMB's two passes over one segment.
//!
//! Pass 1 updates the moments as Adam does and sums, per segment, the squares of the parameters and of the
//! update direction `u = m̂ / (√v̂ + eps) + weight_decay · p`. The optimizer adds the segment sums of each
//! tensor in segment order and turns them into the tensor's trust ratio. Pass 2 computes `u` again from the
//! stored moments (cheaper than writing it out and reading it back: 16 bytes a value instead of 20) and moves
//! `p` by `lr · ratio · u`.
//!
//! Each block of 256 values first updates the moments and writes its directions to a small stack array, then
//! sums the squares in eight `f32` lanes (32 additions per lane, so rounding stays near `f32`'s precision), and
//! adds the block's sum to the segment's in `f64`: both loops vectorise, and the order of additions is fixed by
//! the data alone, never by the thread that runs the segment.

use super::adam::{corrections, moments};

/// Values whose directions are kept on the stack between the update and the sums (1 KiB, in L1).
const BLOCK: usize = 256;
/// Lanes of the `f32` sums within a block.
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
    let mut p_total = 0.0f64;
    let mut u_total = 0.0f64;
    let mut directions = [0.0f32; BLOCK];
    for (((p, g), m), v) in params
        .chunks(BLOCK)
        .zip(grads.chunks(BLOCK))
        .zip(exp_avg.chunks_mut(BLOCK))
        .zip(exp_avg_sq.chunks_mut(BLOCK))
    {
        let u = &mut directions[..p.len()];
        for ((((u, &p), &g), m), v) in u.iter_mut().zip(p).zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
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
            *u = direction::<DECAY>(p, m_new, v_new, step);
        }
        p_total += sum_of_squares(p);
        u_total += sum_of_squares(u);
    }
    (p_total, u_total)
}

/// `Σ x²` of at most [`BLOCK`] values: `f32` in [`LANES`] lanes (at most 32 additions each), then `f64`.
#[inline(always)]
fn sum_of_squares(values: &[f32]) -> f64 {
    let mut lanes = [0.0f32; LANES];
    let (blocks, tail) = values.as_chunks::<LANES>();
    for block in blocks {
        for lane in 0..LANES {
            lanes[lane] += block[lane] * block[lane];
        }
    }
    for (lane, &x) in lanes.iter_mut().zip(tail) {
        *lane += x * x;
    }
    lanes.iter().map(|&lane| f64::from(lane)).sum()
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
