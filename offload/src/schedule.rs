//! Learning-rate schedules: [`LrSchedule`] maps the collaboration's epoch to a factor of every group's
//! learning rate, which [`CpuOptimizer::step`](crate::CpuOptimizer::step) takes as `lr_factor`.
//!
//! The epoch is the swarm's global optimizer step (Hivemind's `local_epoch`), not a pass over a data set, so a
//! peer that joins late gets the same factor as everyone else. The warm-up schedules follow Hugging Face's
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` exactly (the factor is 0 at epoch 0),
//! so a Hivemind user's numbers carry over.

use std::f64::consts::PI;
use std::fmt;
use std::sync::Arc;

/// A learning-rate schedule: a factor of the configured learning rates for each epoch.
///
/// ```
/// use colony_offload::LrSchedule;
///
/// let schedule = LrSchedule::Step { step_size: 10, gamma: 0.5 };
/// assert_eq!(schedule.factor(9), 1.0);
/// assert_eq!(schedule.factor(25), 0.25);
/// ```
#[derive(Clone, Default)]
pub enum LrSchedule {
    /// The factor is always 1.
    #[default]
    Constant,
    /// `gamma ^ floor(epoch / step_size)`: multiply by `gamma` every `step_size` epochs (torch's `StepLR`).
    Step {
        /// Epochs between two decays; at least 1.
        step_size: u64,
        /// Factor per decay; finite and positive.
        gamma: f64,
    },
    /// `gamma ^ epoch` (torch's `ExponentialLR`).
    Exponential {
        /// Factor per epoch; finite and positive.
        gamma: f64,
    },
    /// Linear warm-up, then a half cosine down to `min_factor`:
    ///
    /// - `epoch < warmup`: `epoch / warmup` (0 at epoch 0, as in Hugging Face);
    /// - `warmup <= epoch < total`: `min_factor + (1 - min_factor) · (1 + cos(π · progress)) / 2` with
    ///   `progress = (epoch - warmup) / (total - warmup)`, which is 1 at `epoch == warmup`;
    /// - `epoch >= total`: `min_factor`.
    ///
    /// With `min_factor = 0` this is `get_cosine_schedule_with_warmup` with its default half cycle.
    WarmupCosine {
        /// Warm-up epochs; 0 for none.
        warmup: u64,
        /// The epoch at which the factor reaches `min_factor`; at least `warmup`.
        total: u64,
        /// The factor from `total` on; in `[0, 1]`.
        min_factor: f64,
    },
    /// Linear warm-up, then a linear decay to 0 at `total` (`get_linear_schedule_with_warmup`):
    ///
    /// - `epoch < warmup`: `epoch / warmup`;
    /// - `warmup <= epoch < total`: `(total - epoch) / (total - warmup)`;
    /// - `epoch >= total`: 0.
    WarmupLinear {
        /// Warm-up epochs; 0 for none.
        warmup: u64,
        /// The epoch at which the factor reaches 0; at least `warmup`.
        total: u64,
    },
    /// A user function of the epoch. [`CpuOptimizer::step`](crate::CpuOptimizer::step) refuses a factor that is
    /// negative or not finite, so a bad closure surfaces as an error, not as NaN parameters.
    Custom(Arc<dyn Fn(u64) -> f64 + Send + Sync>),
}

impl LrSchedule {
    /// The factor of the learning rates at `epoch`.
    pub fn factor(&self, epoch: u64) -> f64 {
        match *self {
            Self::Constant => 1.0,
            Self::Step { step_size, gamma } => gamma.powf((epoch / step_size.max(1)) as f64),
            Self::Exponential { gamma } => gamma.powf(epoch as f64),
            Self::WarmupCosine {
                warmup,
                total,
                min_factor,
            } => {
                if epoch < warmup {
                    epoch as f64 / warmup as f64
                } else if epoch >= total {
                    min_factor
                } else {
                    let progress = (epoch - warmup) as f64 / (total - warmup) as f64;
                    min_factor + (1.0 - min_factor) * 0.5 * (1.0 + (PI * progress).cos())
                }
            }
            Self::WarmupLinear { warmup, total } => {
                if epoch < warmup {
                    epoch as f64 / warmup as f64
                } else if epoch >= total {
                    0.0
                } else {
                    (total - epoch) as f64 / (total - warmup) as f64
                }
            }
            Self::Custom(ref function) => function(epoch),
        }
    }

    /// Checks the parameters; the error names the field, its value and the rule. A `Custom` closure cannot be
    /// checked ahead of time (see its documentation).
    pub fn validate(&self) -> Result<(), String> {
        fn positive_gamma(gamma: f64) -> Result<(), String> {
            if gamma.is_finite() && gamma > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "lr schedule `gamma` is {gamma}, but it must be finite and greater than 0"
                ))
            }
        }
        fn ordered(warmup: u64, total: u64) -> Result<(), String> {
            if total >= warmup {
                Ok(())
            } else {
                Err(format!(
                    "lr schedule `total` is {total}, but it must be at least `warmup` ({warmup})"
                ))
            }
        }
        match *self {
            Self::Constant | Self::Custom(_) => Ok(()),
            Self::Step { step_size, gamma } => {
                if step_size == 0 {
                    return Err("lr schedule `step_size` is 0, but it must be at least 1".into());
                }
                positive_gamma(gamma)
            }
            Self::Exponential { gamma } => positive_gamma(gamma),
            Self::WarmupCosine {
                warmup,
                total,
                min_factor,
            } => {
                ordered(warmup, total)?;
                if (0.0..=1.0).contains(&min_factor) {
                    Ok(())
                } else {
                    Err(format!(
                        "lr schedule `min_factor` is {min_factor}, but it must be in [0, 1]"
                    ))
                }
            }
            Self::WarmupLinear { warmup, total } => ordered(warmup, total),
        }
    }
}

impl fmt::Debug for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Constant => f.write_str("Constant"),
            Self::Step { step_size, gamma } => f
                .debug_struct("Step")
                .field("step_size", step_size)
                .field("gamma", gamma)
                .finish(),
            Self::Exponential { gamma } => f.debug_struct("Exponential").field("gamma", gamma).finish(),
            Self::WarmupCosine {
                warmup,
                total,
                min_factor,
            } => f
                .debug_struct("WarmupCosine")
                .field("warmup", warmup)
                .field("total", total)
                .field("min_factor", min_factor)
                .finish(),
            Self::WarmupLinear { warmup, total } => f
                .debug_struct("WarmupLinear")
                .field("warmup", warmup)
                .field("total", total)
                .finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_step_and_exponential_factors() {
        assert_eq!(LrSchedule::Constant.factor(0), 1.0);
        assert_eq!(LrSchedule::Constant.factor(u64::MAX), 1.0);
        let step = LrSchedule::Step {
            step_size: 10,
            gamma: 0.5,
        };
        let factors: Vec<f64> = [0, 9, 10, 25].iter().map(|&e| step.factor(e)).collect();
        assert_eq!(factors, [1.0, 1.0, 0.5, 0.25]);
        let exponential = LrSchedule::Exponential { gamma: 0.5 };
        assert_eq!(exponential.factor(0), 1.0);
        assert_eq!(exponential.factor(3), 0.125);
        assert_eq!(exponential.factor(2000), 0.0, "underflows to 0 instead of failing");
    }

    #[test]
    fn warmup_cosine_factors() {
        let schedule = LrSchedule::WarmupCosine {
            warmup: 4,
            total: 14,
            min_factor: 0.1,
        };
        assert_eq!(schedule.factor(0), 0.0);
        assert_eq!(schedule.factor(1), 0.25);
        assert_eq!(schedule.factor(3), 0.75);
        assert_eq!(schedule.factor(4), 1.0);
        // Half-way through the decay the cosine is 0: the mean of 1 and min_factor.
        assert!((schedule.factor(9) - 0.55).abs() < 1e-15, "{}", schedule.factor(9));
        // progress 0.2: 0.1 + 0.9 · (1 + cos(0.2π)) / 2.
        let expected = 0.1 + 0.9 * (1.0 + (0.2 * PI).cos()) / 2.0;
        assert!((schedule.factor(6) - expected).abs() < 1e-15);
        assert_eq!(schedule.factor(14), 0.1);
        assert_eq!(schedule.factor(1_000_000), 0.1);
        // Never below min_factor, never above 1, never increasing after the warm-up.
        let mut previous = f64::INFINITY;
        for epoch in 4..20 {
            let factor = schedule.factor(epoch);
            assert!(
                (0.1..=1.0).contains(&factor) && factor <= previous,
                "epoch {epoch}: {factor}"
            );
            previous = factor;
        }
        let no_warmup = LrSchedule::WarmupCosine {
            warmup: 0,
            total: 2,
            min_factor: 0.0,
        };
        assert_eq!(no_warmup.factor(0), 1.0);
        assert!((no_warmup.factor(1) - 0.5).abs() < 1e-15);
        assert_eq!(no_warmup.factor(2), 0.0);
    }

    #[test]
    fn warmup_linear_factors() {
        let schedule = LrSchedule::WarmupLinear { warmup: 2, total: 6 };
        let factors: Vec<f64> = (0..8).map(|e| schedule.factor(e)).collect();
        assert_eq!(factors, [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
    }

    #[test]
    fn custom_closures_are_called_with_the_epoch() {
        let schedule = LrSchedule::Custom(Arc::new(|t| 1.0 / (t.max(1) as f64)));
        assert_eq!(schedule.factor(0), 1.0);
        assert_eq!(schedule.factor(1337), 1.0 / 1337.0);
        let copy = schedule.clone();
        assert_eq!(copy.factor(4), 0.25);
        assert_eq!(format!("{copy:?}"), "Custom(..)");
        assert_eq!(copy.validate(), Ok(()));
    }

    #[test]
    fn debug_names_the_fields() {
        let schedule = LrSchedule::Step {
            step_size: 3,
            gamma: 0.5,
        };
        assert_eq!(format!("{schedule:?}"), "Step { step_size: 3, gamma: 0.5 }");
        assert_eq!(format!("{:?}", LrSchedule::default()), "Constant");
    }

    #[test]
    fn invalid_schedules_are_refused_with_the_field_named() {
        let cases = [
            (
                LrSchedule::Step {
                    step_size: 0,
                    gamma: 0.5,
                },
                "`step_size` is 0",
            ),
            (
                LrSchedule::Step {
                    step_size: 1,
                    gamma: f64::NAN,
                },
                "`gamma` is NaN",
            ),
            (LrSchedule::Exponential { gamma: -0.5 }, "`gamma` is -0.5"),
            (LrSchedule::Exponential { gamma: 0.0 }, "`gamma` is 0"),
            (
                LrSchedule::WarmupCosine {
                    warmup: 10,
                    total: 5,
                    min_factor: 0.0,
                },
                "`total` is 5, but it must be at least `warmup` (10)",
            ),
            (
                LrSchedule::WarmupCosine {
                    warmup: 0,
                    total: 5,
                    min_factor: 1.5,
                },
                "`min_factor` is 1.5",
            ),
            (LrSchedule::WarmupLinear { warmup: 3, total: 2 }, "`total` is 2"),
        ];
        for (schedule, expected) in cases {
            let error = schedule.validate().expect_err(&format!("{schedule:?} is invalid"));
            assert!(error.contains(expected), "{error:?} should contain {expected:?}");
        }
        for valid in [
            LrSchedule::Constant,
            LrSchedule::Exponential { gamma: 1.5 },
            LrSchedule::WarmupLinear { warmup: 0, total: 0 },
            LrSchedule::WarmupCosine {
                warmup: 5,
                total: 5,
                min_factor: 0.0,
            },
        ] {
            assert_eq!(valid.validate(), Ok(()), "{valid:?}");
        }
    }
}
