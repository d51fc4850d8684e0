//! [`OptimizerError`]: what can go wrong when building or stepping a [`CpuOptimizer`](super::CpuOptimizer).

/// Why an optimizer refused its configuration, a step, or metadata. Each message names the field, the value
/// and the rule it breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimizerError {
    /// A hyper-parameter is out of range or not finite.
    #[error("optimizer setting `{field}` is {value}, but it must be {rule}")]
    InvalidHyperParameter {
        /// The setting, e.g. `beta1` or `groups[1].lr`.
        field: String,
        /// Its value as given.
        value: String,
        /// The rule it breaks, e.g. `in [0, 1)`.
        rule: &'static str,
    },
    /// A parameter range is reversed or reaches past the end of the buffer.
    #[error(
        "optimizer range `groups[{group}].ranges[{range}]` is {start}..{end}, but it must {rule} (the buffer holds \
         {total} values)"
    )]
    InvalidRange {
        /// Index of the group.
        group: usize,
        /// Index of the range within the group.
        range: usize,
        /// The range's start.
        start: usize,
        /// The range's end.
        end: usize,
        /// Values in the flat buffer.
        total: usize,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// Two parameter ranges (of one group or of two) share values: each value has one update rule.
    #[error(
        "optimizer ranges `groups[{first_group}].ranges[{first_range}]` ({first_start}..{first_end}) and \
         `groups[{second_group}].ranges[{second_range}]` ({second_start}..{second_end}) overlap, but ranges must \
         be disjoint"
    )]
    OverlappingRanges {
        /// Group of the range that starts first.
        first_group: usize,
        /// Index of that range within its group.
        first_range: usize,
        /// Its start.
        first_start: usize,
        /// Its end.
        first_end: usize,
        /// Group of the other range.
        second_group: usize,
        /// Index of the other range within its group.
        second_range: usize,
        /// Its start.
        second_start: usize,
        /// Its end.
        second_end: usize,
    },
    /// A buffer handed to [`step`](super::CpuOptimizer::step) has the wrong length.
    #[error("optimizer step: `{buffer}` holds {len} values, but the optimizer was built for {expected}")]
    LengthMismatch {
        /// `params` or `grads`.
        buffer: &'static str,
        /// Its length.
        len: usize,
        /// The optimizer's `total_values`.
        expected: usize,
    },
    /// The learning-rate factor of a step is negative or not finite (often a custom schedule's output).
    #[error("optimizer step: `lr_factor` is {value}, but it must be finite and at least 0")]
    InvalidLrFactor {
        /// The factor as given.
        value: f64,
    },
    /// Metadata bytes (from another peer, during state transfer) that this optimizer cannot load.
    #[error("optimizer metadata: `{field}` is {value}, but it must be {rule}")]
    InvalidMetadata {
        /// The part of the encoding, e.g. `version` or `length`.
        field: &'static str,
        /// What was found.
        value: String,
        /// What this optimizer accepts.
        rule: String,
    },
}
