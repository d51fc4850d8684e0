//! [`CodecPolicy`]: which codec a tensor's parts travel in, chosen by the tensor's size, role or name.

use std::collections::HashMap;

use super::Codec;
use crate::tensor::{TensorInfo, TensorRole};

/// Chooses a [`Codec`] per tensor. Policies nest: a size threshold can choose between two role-based
/// policies, a per-name table can fall back to a size threshold, and so on. Every peer of a group evaluates
/// the policy on the same tensor list, but peers may use different policies: the codec travels with each part.
///
/// ```
/// use std::collections::HashMap;
/// use colony_averaging::codec::{Codec, CodecPolicy};
/// use colony_averaging::tensor::{TensorInfo, TensorRole};
///
/// // Small tensors raw, large gradients in 8 bits, other large tensors in half precision.
/// let policy = CodecPolicy::BySize {
///     threshold: 1 << 16,
///     small: Box::new(CodecPolicy::Fixed(Codec::None)),
///     large: Box::new(CodecPolicy::ByRole {
///         gradient: Codec::Uniform8Bit,
///         parameter: Codec::Float16,
///         optimizer_statistic: Codec::Float16,
///         other: Codec::Float16,
///     }),
/// };
/// let grad = TensorInfo::new("w.grad", [1024, 1024]).with_role(TensorRole::Gradient);
/// assert_eq!(policy.codec_for(&grad), Codec::Uniform8Bit);
/// assert_eq!(policy.codec_for(&TensorInfo::new("bias", [1024])), Codec::None);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum CodecPolicy {
    /// The same codec for every tensor.
    Fixed(Codec),
    /// `large` for tensors with at least `threshold` values (the whole tensor's count, not a part's),
    /// `small` for the others.
    BySize {
        /// Values from which a tensor counts as large.
        threshold: usize,
        /// The policy for tensors below the threshold.
        small: Box<CodecPolicy>,
        /// The policy for tensors at or above the threshold.
        large: Box<CodecPolicy>,
    },
    /// By the tensor's [`TensorRole`].
    ByRole {
        /// For [`TensorRole::Gradient`].
        gradient: Codec,
        /// For [`TensorRole::Parameter`].
        parameter: Codec,
        /// For [`TensorRole::OptimizerStatistic`].
        optimizer_statistic: Codec,
        /// For [`TensorRole::Unspecified`].
        other: Codec,
    },
    /// By the tensor's name, falling back to `default` for names not in the table.
    ByName {
        /// Codecs of named tensors.
        codecs: HashMap<String, Codec>,
        /// The policy for every other tensor.
        default: Box<CodecPolicy>,
    },
}

impl Default for CodecPolicy {
    /// No compression: `Fixed(Codec::None)`.
    fn default() -> Self {
        CodecPolicy::Fixed(Codec::None)
    }
}

impl CodecPolicy {
    /// The codec for `tensor`. A shape whose value count overflows counts as large.
    pub fn codec_for(&self, tensor: &TensorInfo) -> Codec {
        match self {
            CodecPolicy::Fixed(codec) => *codec,
            CodecPolicy::BySize {
                threshold,
                small,
                large,
            } => {
                if tensor.checked_numel().unwrap_or(usize::MAX) >= *threshold {
                    large.codec_for(tensor)
                } else {
                    small.codec_for(tensor)
                }
            }
            CodecPolicy::ByRole {
                gradient,
                parameter,
                optimizer_statistic,
                other,
            } => match tensor.role {
                TensorRole::Gradient => *gradient,
                TensorRole::Parameter => *parameter,
                TensorRole::OptimizerStatistic => *optimizer_statistic,
                TensorRole::Unspecified => *other,
            },
            CodecPolicy::ByName { codecs, default } => codecs
                .get(&tensor.name)
                .copied()
                .unwrap_or_else(|| default.codec_for(tensor)),
        }
    }
}
