//! SGD's update of one segment, as `torch.optim.SGD` defines it:
//!
//! ```text
//! d = g + weight_decay · p
//! buf = d                                           (first step)
//! buf = momentum · buf + (1 - dampening) · d        (later steps)
//! d = d + momentum · buf  (Nesterov)   or   d = buf
//! p = p - lr · d
//! ```
//!
//! Which of the lines apply is decided once per segment (const generics), so the element loop has no
//! branches and vectorises.

/// SGD's constants for one group and one step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SgdStep {
    /// The group's learning rate times the schedule's factor.
    pub lr: f32,
    /// The group's weight decay.
    pub weight_decay: f32,
    /// The momentum factor (0: no momentum buffer).
    pub momentum: f32,
    /// `1 - dampening`.
    pub one_minus_dampening: f32,
    /// Whether the momentum buffer is still to be initialised (the first step with momentum).
    pub first: bool,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// Updates `params` (and `buf`, empty without momentum) from `grads`.
pub(crate) fn update(params: &mut [f32], grads: &[f32], buf: &mut [f32], step: &SgdStep) {
    if step.weight_decay != 0.0 {
        with_decay::<true>(params, grads, buf, step);
    } else {
        with_decay::<false>(params, grads, buf, step);
    }
}

fn with_decay<const DECAY: bool>(params: &mut [f32], grads: &[f32], buf: &mut [f32], step: &SgdStep) {
    if step.momentum == 0.0 {
        return plain::<DECAY>(params, grads, step);
    }
    match (step.first, step.nesterov) {
        (true, true) => momentum::<DECAY, true, true>(params, grads, buf, step),
        (true, false) => momentum::<DECAY, true, false>(params, grads, buf, step),
        (false, true) => momentum::<DECAY, false, true>(params, grads, buf, step),
        (false, false) => momentum::<DECAY, false, false>(params, grads, buf, step),
    }
}

fn plain<const DECAY: bool>(params: &mut [f32], grads: &[f32], step: &SgdStep) {
    let (lr, weight_decay) = (step.lr, step.weight_decay);
    for (p, &g) in params.iter_mut().zip(grads) {
        let d = if DECAY { g + weight_decay * *p } else { g };
        *p -= lr * d;
    }
}

fn momentum<const DECAY: bool, const FIRST: bool, const NESTEROV: bool>(
    params: &mut [f32],
    grads: &[f32],
    buf: &mut [f32],
    step: &SgdStep,
) {
    let (lr, weight_decay, momentum, keep) = (step.lr, step.weight_decay, step.momentum, step.one_minus_dampening);
    for ((p, &g), b) in params.iter_mut().zip(grads).zip(buf.iter_mut()) {
        let d = if DECAY { g + weight_decay * *p } else { g };
        let velocity = if FIRST { d } else { momentum * *b + keep * d };
        *b = velocity;
        let d = if NESTEROV { d + momentum * velocity } else { velocity };
        *p -= lr * d;
    }
}
