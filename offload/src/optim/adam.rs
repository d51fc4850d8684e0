//! Adam's and AdamW's update of one segment, as `torch.optim.Adam` and `torch.optim.AdamW` define it:
//!
//! ```text
//! g = g + weight_decay · p                (Adam: L2)
//! p = p · (1 - lr · weight_decay)         (AdamW: decoupled)
//! m = beta1 · m + (1 - beta1) · g
//! v = beta2 · v + (1 - beta2) · g²
//! p = p - lr / (1 - beta1^t) · m / (√v / √(1 - beta2^t) + eps)
//! ```
//!
//! The bias corrections are folded into two constants per step (`step_size = lr / (1 - beta1^t)` and
//! `1 / √(1 - beta2^t)`, computed in `f64`), so an element costs one square root and one division. The moments
//! are also LAMB's ([`moments`]).

/// Adam's constants for one group and one step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep {
    /// Decay of the first moment.
    pub beta1: f32,
    /// `1 - beta1`.
    pub one_minus_beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `1 / √(1 - beta2^t)`.
    pub inv_sqrt_correction2: f32,
    /// Added to the corrected root of the second moment.
    pub eps: f32,
    /// L2 weight decay added to the gradient (Adam; 0 for AdamW).
    pub l2: f32,
    /// Factor of the parameters before the update, `1 - lr · weight_decay` (AdamW; 1 for Adam).
    pub decay_factor: f32,
}

impl AdamStep {
    /// The constants of step `t` (counted from 1) with learning rate `lr`. `decoupled` selects AdamW.
    pub fn new(beta1: f32, beta2: f32, eps: f32, lr: f64, weight_decay: f32, decoupled: bool, t: u64) -> Self {
        let (correction1, correction2) = corrections(beta1, beta2, t);
        Self {
            beta1,
            one_minus_beta1: 1.0 - beta1,
            beta2,
            one_minus_beta2: 1.0 - beta2,
            step_size: (lr / correction1) as f32,
            inv_sqrt_correction2: (1.0 / correction2.sqrt()) as f32,
            eps,
            l2: if decoupled { 0.0 } else { weight_decay },
            decay_factor: if decoupled {
                (1.0 - lr * f64::from(weight_decay)) as f32
            } else {
                1.0
            },
        }
    }
}

/// `(1 - beta1^t, 1 - beta2^t)` in `f64`.
pub(crate) fn corrections(beta1: f32, beta2: f32, t: u64) -> (f64, f64) {
    let t = t as f64;
    (1.0 - f64::from(beta1).powf(t), 1.0 - f64::from(beta2).powf(t))
}

/// The new first and second moments from the old ones and the gradient.
#[inline(always)]
pub(crate) fn moments(
    g: f32,
    m: f32,
    v: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
) -> (f32, f32) {
    (beta1 * m + one_minus_beta1 * g, beta2 * v + one_minus_beta2 * (g * g))
}

/// Updates `params`, `exp_avg` and `exp_avg_sq` from `grads`.
pub(crate) fn update(params: &mut [f32], grads: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], step: &AdamStep) {
    match (step.l2 != 0.0, step.decay_factor != 1.0) {
        (false, false) => kernel::<false, false>(params, grads, exp_avg, exp_avg_sq, step),
        (true, false) => kernel::<true, false>(params, grads, exp_avg, exp_avg_sq, step),
        (false, true) => kernel::<false, true>(params, grads, exp_avg, exp_avg_sq, step),
        (true, true) => kernel::<true, true>(params, grads, exp_avg, exp_avg_sq, step),
    }
}

fn kernel<const L2: bool, const DECOUPLED: bool>(
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    step: &AdamStep,
) {
    let AdamStep {
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        step_size,
        inv_sqrt_correction2,
        eps,
        l2,
        decay_factor,
    } = *step;
    for (((p, &g), m), v) in params
        .iter_mut()
        .zip(grads)
        .zip(exp_avg.iter_mut())
        .zip(exp_avg_sq.iter_mut())
    {
        let g = if L2 { g + l2 * *p } else { g };
        let (m_new, v_new) = moments(g, *m, *v, beta1, one_minus_beta1, beta2, one_minus_beta2);
        *m = m_new;
        *v = v_new;
        let denom = v_new.sqrt() * inv_sqrt_correction2 + eps;
        let p_old = if DECOUPLED { *p * decay_factor } else { *p };
        *p = p_old - step_size * (m_new / denom);
    }
}
