//! The optimizer's configuration: which update rule ([`OptimizerKind`]) and which values of the flat buffer it
//! updates with which learning rate and weight decay ([`ParamGroup`]).

use std::ops::Range;

use super::OptimizerError;

/// The update rule and its rule-wide hyper-parameters. Each follows the PyTorch optimizer of the same name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    /// `torch.optim.SGD`: weight decay added to the gradient, then momentum with dampening, optionally Nesterov.
    /// The first step copies the gradient into the momentum buffer (no dampening), as torch does.
    Sgd {
        /// Momentum factor; 0 for plain SGD (then there is no `momentum_buffer`). Finite and at least 0.
        momentum: f32,
        /// Dampening of the gradient's share of the momentum; in `[0, 1]`.
        dampening: f32,
        /// Nesterov momentum; needs `momentum > 0` and `dampening == 0`.
        nesterov: bool,
    },
    /// `torch.optim.Adam`: weight decay is L2, added to the gradient before the moments.
    Adam {
        /// Decay of the first moment; in `[0, 1)`.
        beta1: f32,
        /// Decay of the second moment; in `[0, 1)`.
        beta2: f32,
        /// Added to the root of the second moment; finite and greater than 0.
        eps: f32,
    },
    /// `torch.optim.AdamW`: decoupled weight decay, `p *= 1 - lr · weight_decay`, before the Adam update.
    AdamW {
        /// Decay of the first moment; in `[0, 1)`.
        beta1: f32,
        /// Decay of the second moment; in `[0, 1)`.
        beta2: f32,
        /// Added to the root of the second moment; finite and greater than 0.
        eps: f32,
    },
    /// LAMB (You et al., 2019, as in torch-optimizer's `Lamb`, with bias correction on): Adam's moments give
    /// `u = m̂ / (√v̂ + eps) + weight_decay · p`; each range (one tensor) is then moved by
    /// `lr · min(‖p‖, clamp_value) / ‖u‖ · u`, with a trust ratio of 1 where either norm is 0.
    Lamb {
        /// Decay of the first moment; in `[0, 1)`.
        beta1: f32,
        /// Decay of the second moment; in `[0, 1)`.
        beta2: f32,
        /// Added to the root of the second moment; finite and greater than 0.
        eps: f32,
        /// Upper bound of the weight norm in the trust ratio; finite and greater than 0 (default 10).
        clamp_value: f32,
    },
}

impl OptimizerKind {
    /// The rule's name: `sgd`, `adam`, `adamw` or `lamb`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::Adam { .. } => "adam",
            Self::AdamW { .. } => "adamw",
            Self::Lamb { .. } => "lamb",
        }
    }
}

/// Values of the flat buffer updated with one learning rate and weight decay.
///
/// Each range is one tensor: LAMB computes its trust ratio per range, so a group of a whole model should list
/// one range per tensor, not one range over all of them. Ranges of all groups must be disjoint and inside the
/// buffer; values in no range are left alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    /// The tensors of the group, as ranges of the flat buffer.
    pub ranges: Vec<Range<usize>>,
    /// Learning rate before the schedule's factor; finite and at least 0.
    pub lr: f32,
    /// Weight decay (L2 for SGD and Adam, decoupled for AdamW, inside the update for LAMB); finite and at least 0.
    pub weight_decay: f32,
}

impl ParamGroup {
    /// A group of `ranges` with `lr` and `weight_decay`.
    pub fn new(ranges: Vec<Range<usize>>, lr: f32, weight_decay: f32) -> Self {
        Self {
            ranges,
            lr,
            weight_decay,
        }
    }
}

/// An optimizer's full configuration: the rule and the parameter groups.
///
/// ```
/// use colony_offload::{OptimizerConfig, OptimizerKind};
///
/// let config = OptimizerConfig::adamw(1e-3, 0.01, 1000);
/// assert!(matches!(config.kind, OptimizerKind::AdamW { .. }));
/// assert_eq!(config.groups[0].ranges, vec![0..1000]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerConfig {
    /// The update rule.
    pub kind: OptimizerKind,
    /// The parameter groups.
    pub groups: Vec<ParamGroup>,
}

/// Adam's default decay of the first moment (torch's).
pub const DEFAULT_BETA1: f32 = 0.9;
/// Adam's default decay of the second moment (torch's).
pub const DEFAULT_BETA2: f32 = 0.999;
/// Adam's and AdamW's default epsilon (torch's).
pub const DEFAULT_ADAM_EPS: f32 = 1e-8;
/// LAMB's default epsilon (torch-optimizer's).
pub const DEFAULT_LAMB_EPS: f32 = 1e-6;
/// LAMB's default bound of the weight norm in the trust ratio (torch-optimizer's).
pub const DEFAULT_LAMB_CLAMP: f32 = 10.0;

impl OptimizerConfig {
    /// `kind` over `groups`.
    pub fn new(kind: OptimizerKind, groups: Vec<ParamGroup>) -> Self {
        Self { kind, groups }
    }

    /// SGD with `momentum` (no dampening, no Nesterov, no weight decay), one group over `0..total`.
    pub fn sgd(lr: f32, momentum: f32, total: usize) -> Self {
        Self::single_group(
            OptimizerKind::Sgd {
                momentum,
                dampening: 0.0,
                nesterov: false,
            },
            lr,
            0.0,
            total,
        )
    }

    /// Adam with betas 0.9 and 0.999, eps 1e-8 and no weight decay, one group over `0..total`.
    pub fn adam(lr: f32, total: usize) -> Self {
        Self::single_group(
            OptimizerKind::Adam {
                beta1: DEFAULT_BETA1,
                beta2: DEFAULT_BETA2,
                eps: DEFAULT_ADAM_EPS,
            },
            lr,
            0.0,
            total,
        )
    }

    /// AdamW with betas 0.9 and 0.999, eps 1e-8 and `weight_decay`, one group over `0..total`.
    pub fn adamw(lr: f32, weight_decay: f32, total: usize) -> Self {
        Self::single_group(
            OptimizerKind::AdamW {
                beta1: DEFAULT_BETA1,
                beta2: DEFAULT_BETA2,
                eps: DEFAULT_ADAM_EPS,
            },
            lr,
            weight_decay,
            total,
        )
    }

    /// LAMB with betas 0.9 and 0.999, eps 1e-6, clamp 10 and `weight_decay`, one group with one range over
    /// `0..total` (so one trust ratio for the whole buffer: list one range per tensor for per-tensor ratios).
    pub fn lamb(lr: f32, weight_decay: f32, total: usize) -> Self {
        Self::single_group(
            OptimizerKind::Lamb {
                beta1: DEFAULT_BETA1,
                beta2: DEFAULT_BETA2,
                eps: DEFAULT_LAMB_EPS,
                clamp_value: DEFAULT_LAMB_CLAMP,
            },
            lr,
            weight_decay,
            total,
        )
    }

    fn single_group(kind: OptimizerKind, lr: f32, weight_decay: f32, total: usize) -> Self {
        Self::new(
            kind,
            vec![ParamGroup::new(std::iter::once(0..total).collect(), lr, weight_decay)],
        )
    }

    /// Checks every hyper-parameter and that the ranges are disjoint and inside a buffer of `total_values`.
    pub fn validate(&self, total_values: usize) -> Result<(), OptimizerError> {
        self.validate_kind()?;
        for (g, group) in self.groups.iter().enumerate() {
            check(
                format!("groups[{g}].lr"),
                group.lr,
                non_negative(group.lr),
                FINITE_NON_NEGATIVE,
            )?;
            check(
                format!("groups[{g}].weight_decay"),
                group.weight_decay,
                non_negative(group.weight_decay),
                FINITE_NON_NEGATIVE,
            )?;
        }
        self.validate_ranges(total_values)
    }

    fn validate_kind(&self) -> Result<(), OptimizerError> {
        match self.kind {
            OptimizerKind::Sgd {
                momentum,
                dampening,
                nesterov,
            } => {
                check("momentum", momentum, non_negative(momentum), FINITE_NON_NEGATIVE)?;
                check("dampening", dampening, (0.0..=1.0).contains(&dampening), "in [0, 1]")?;
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return Err(OptimizerError::InvalidHyperParameter {
                        field: "nesterov".into(),
                        value: format!("true (with momentum {momentum} and dampening {dampening})"),
                        rule: "false unless momentum > 0 and dampening = 0",
                    });
                }
                Ok(())
            }
            OptimizerKind::Adam { beta1, beta2, eps } | OptimizerKind::AdamW { beta1, beta2, eps } => {
                check_betas_and_eps(beta1, beta2, eps)
            }
            OptimizerKind::Lamb {
                beta1,
                beta2,
                eps,
                clamp_value,
            } => {
                check_betas_and_eps(beta1, beta2, eps)?;
                check("clamp_value", clamp_value, positive(clamp_value), FINITE_POSITIVE)
            }
        }
    }

    fn validate_ranges(&self, total: usize) -> Result<(), OptimizerError> {
        // (start, end, group, index) of every non-empty range; empty ranges only need to be in bounds.
        let mut ranges = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            for (r, range) in group.ranges.iter().enumerate() {
                let invalid = |rule| OptimizerError::InvalidRange {
                    group: g,
                    range: r,
                    start: range.start,
                    end: range.end,
                    total,
                    rule,
                };
                if range.start > range.end {
                    return Err(invalid("not be reversed (start after end)"));
                }
                if range.end > total {
                    return Err(invalid("end within the buffer"));
                }
                if range.start < range.end {
                    ranges.push((range.start, range.end, g, r));
                }
            }
        }
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            let (first, second) = (pair[0], pair[1]);
            if second.0 < first.1 {
                return Err(OptimizerError::OverlappingRanges {
                    first_group: first.2,
                    first_range: first.3,
                    first_start: first.0,
                    first_end: first.1,
                    second_group: second.2,
                    second_range: second.3,
                    second_start: second.0,
                    second_end: second.1,
                });
            }
        }
        Ok(())
    }
}

const FINITE_NON_NEGATIVE: &str = "finite and at least 0";
const FINITE_POSITIVE: &str = "finite and greater than 0";
const UNIT_INTERVAL: &str = "in [0, 1)";

fn non_negative(value: f32) -> bool {
    value.is_finite() && value >= 0.0
}

fn positive(value: f32) -> bool {
    value.is_finite() && value > 0.0
}

fn check(field: impl Into<String>, value: f32, ok: bool, rule: &'static str) -> Result<(), OptimizerError> {
    if ok {
        Ok(())
    } else {
        Err(OptimizerError::InvalidHyperParameter {
            field: field.into(),
            value: value.to_string(),
            rule,
        })
    }
}

fn check_betas_and_eps(beta1: f32, beta2: f32, eps: f32) -> Result<(), OptimizerError> {
    check("beta1", beta1, (0.0..1.0).contains(&beta1), UNIT_INTERVAL)?;
    check("beta2", beta2, (0.0..1.0).contains(&beta2), UNIT_INTERVAL)?;
    check("eps", eps, positive(eps), FINITE_POSITIVE)
}
