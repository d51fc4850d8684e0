//! Named tensors laid out in one flat buffer, and the schema hash that decides who may average together.
//!
//! A model's averaged state is a list of [`TensorInfo`] (name, shape, dtype, role). A [`TensorLayout`] places
//! them one after another in a flat `f32` buffer ([`FlatTensors`]); every peer derives the same offsets from
//! the same list, so a part is simply a range of that buffer. Averaging always happens in `f32`: the dtype
//! records what the trainer holds (and enters the schema hash), not how values travel — codecs decide that.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use thiserror::Error;

/// Element type of a trainer's tensor. Values are averaged as `f32` whatever the dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit IEEE float (averaged in `f32`).
    F64,
}

impl Dtype {
    /// The name used in the schema hash and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::F64 => "float64",
        }
    }
}

/// What a tensor is to the optimizer; codec policies may choose by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TensorRole {
    /// An accumulated gradient.
    Gradient,
    /// A model parameter.
    Parameter,
    /// An optimizer statistic (e.g. Adam's moments).
    OptimizerStatistic,
    /// Anything else.
    #[default]
    Unspecified,
}

/// One named tensor of an averaged set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorInfo {
    /// Unique name within the set (e.g. `layer1.weight`).
    pub name: String,
    /// Dimensions; empty for a scalar (one value). A zero dimension makes an empty tensor.
    pub shape: Vec<usize>,
    /// The trainer's element type.
    pub dtype: Dtype,
    /// What the tensor is to the optimizer.
    pub role: TensorRole,
}

impl TensorInfo {
    /// An `f32` tensor with no particular role.
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<usize>>) -> Self {
        Self {
            name: name.into(),
            shape: shape.into(),
            dtype: Dtype::F32,
            role: TensorRole::Unspecified,
        }
    }

    /// The same tensor with `role`.
    pub fn with_role(mut self, role: TensorRole) -> Self {
        self.role = role;
        self
    }

    /// The same tensor with `dtype`.
    pub fn with_dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Number of values, or `None` when the product of the shape overflows.
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// Length of the last axis (1 for a scalar): the row length of per-row codecs.
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
}

/// Why a tensor list cannot form a layout.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Two tensors share a name.
    #[error("tensor name `{0}` appears twice; names must be unique")]
    DuplicateName(String),
    /// A shape's product, or the total, exceeds `max_values`.
    #[error("tensor `{name}` makes the set exceed {max_values} values")]
    TooLarge {
        /// The tensor that crossed the limit.
        name: String,
        /// The limit.
        max_values: usize,
    },
}

/// The hash of a tensor list's names, shapes and dtypes (SHA-256). Peers average together only when theirs
/// match.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SchemaHash(pub [u8; 32]);

impl fmt::Debug for SchemaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SchemaHash(")?;
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// The most values one layout may hold (2^40 f32 = 4 TiB): anything larger is a mistake, not a model.
pub const MAX_LAYOUT_VALUES: usize = 1 << 40;

/// Where each tensor of a list sits in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    tensors: Vec<TensorInfo>,
    offsets: Vec<usize>,
    total: usize,
    schema_hash: SchemaHash,
}

impl TensorLayout {
    /// Lays `tensors` out in order. Fails on duplicate names or a total above [`MAX_LAYOUT_VALUES`].
    pub fn new(tensors: Vec<TensorInfo>) -> Result<Self, LayoutError> {
        let mut names = std::collections::HashSet::with_capacity(tensors.len());
        let mut offsets = Vec::with_capacity(tensors.len() + 1);
        let mut total = 0usize;
        for tensor in &tensors {
            if !names.insert(tensor.name.as_str()) {
                return Err(LayoutError::DuplicateName(tensor.name.clone()));
            }
            offsets.push(total);
            total = tensor
                .checked_numel()
                .and_then(|n| total.checked_add(n))
                .filter(|&t| t <= MAX_LAYOUT_VALUES)
                .ok_or_else(|| LayoutError::TooLarge {
                    name: tensor.name.clone(),
                    max_values: MAX_LAYOUT_VALUES,
                })?;
        }
        offsets.push(total);
        let schema_hash = schema_hash(&tensors);
        Ok(Self {
            tensors,
            offsets,
            total,
            schema_hash,
        })
    }

    /// The tensors, in layout order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the layout has no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of values.
    pub fn total_values(&self) -> usize {
        self.total
    }

    /// The flat range of tensor `index`. Panics when `index` is out of range (a caller's bug).
    pub fn range(&self, index: usize) -> Range<usize> {
        self.offsets[index]..self.offsets[index + 1]
    }

    /// The schema hash of this list.
    pub fn schema_hash(&self) -> SchemaHash {
        self.schema_hash
    }

    /// The schema hash bound to one round (e.g. an epoch): peers that pass different rounds never match,
    /// so a fast peer looking for its next round cannot pull a slow peer out of the current one.
    pub fn round_hash(&self, round: u64) -> SchemaHash {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(b"colony/round/1");
        context.update(&self.schema_hash.0);
        context.update(&round.to_le_bytes());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(context.finish().as_ref());
        SchemaHash(hash)
    }

    /// A zeroed buffer of this layout.
    pub fn zeros(self: &Arc<Self>) -> FlatTensors {
        FlatTensors {
            data: vec![0.0; self.total],
            layout: self.clone(),
        }
    }
}

/// SHA-256 over a canonical encoding of each tensor's name, shape and dtype (roles are local choices and
/// do not enter it).
fn schema_hash(tensors: &[TensorInfo]) -> SchemaHash {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"colony/schema/1");
    context.update(&(tensors.len() as u64).to_le_bytes());
    for tensor in tensors {
        context.update(&(tensor.name.len() as u64).to_le_bytes());
        context.update(tensor.name.as_bytes());
        context.update(&(tensor.shape.len() as u64).to_le_bytes());
        for dim in &tensor.shape {
            context.update(&(*dim as u64).to_le_bytes());
        }
        context.update(tensor.dtype.name().as_bytes());
        context.update(&[0]);
    }
    let digest = context.finish();
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    SchemaHash(hash)
}

/// Why values do not fit a layout.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the buffer holds {actual} values but the layout needs {expected}")]
pub struct LengthMismatch {
    /// Values the layout needs.
    pub expected: usize,
    /// Values given.
    pub actual: usize,
}

/// A layout with its values: the buffer that averaging reads and updates.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatTensors {
    layout: Arc<TensorLayout>,
    data: Vec<f32>,
}

impl FlatTensors {
    /// Wraps `data`, which must hold exactly the layout's number of values.
    pub fn new(layout: Arc<TensorLayout>, data: Vec<f32>) -> Result<Self, LengthMismatch> {
        if data.len() != layout.total_values() {
            return Err(LengthMismatch {
                expected: layout.total_values(),
                actual: data.len(),
            });
        }
        Ok(Self { layout, data })
    }

    /// The layout.
    pub fn layout(&self) -> &Arc<TensorLayout> {
        &self.layout
    }

    /// All values.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// All values, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The values of tensor `index`.
    pub fn tensor(&self, index: usize) -> &[f32] {
        &self.data[self.layout.range(index)]
    }

    /// The values of tensor `index`, mutably.
    pub fn tensor_mut(&mut self, index: usize) -> &mut [f32] {
        let range = self.layout.range(index);
        &mut self.data[range]
    }

    /// The values, giving up the layout.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_tensors_in_order_including_empty_and_scalars() {
        let layout = TensorLayout::new(vec![
            TensorInfo::new("a", [2, 3]),
            TensorInfo::new("empty", [0, 5]),
            TensorInfo::new("scalar", []),
            TensorInfo::new("b", [4]),
        ])
        .unwrap();
        assert_eq!(layout.range(0), 0..6);
        assert_eq!(layout.range(1), 6..6);
        assert_eq!(layout.range(2), 6..7);
        assert_eq!(layout.range(3), 7..11);
        assert_eq!(layout.total_values(), 11);
    }

    #[test]
    fn round_hashes_differ_by_round_and_by_schema() {
        let a = TensorLayout::new(vec![TensorInfo::new("w", [3])]).unwrap();
        let b = TensorLayout::new(vec![TensorInfo::new("w", [4])]).unwrap();
        assert_eq!(a.round_hash(7), a.round_hash(7));
        assert_ne!(a.round_hash(7), a.round_hash(8));
        assert_ne!(a.round_hash(7), b.round_hash(7));
        assert_ne!(a.round_hash(7), a.schema_hash());
    }

    #[test]
    fn duplicate_names_and_overflowing_shapes_are_refused() {
        let dup = TensorLayout::new(vec![TensorInfo::new("w", [1]), TensorInfo::new("w", [2])]);
        assert_eq!(dup.unwrap_err(), LayoutError::DuplicateName("w".into()));
        let huge = TensorLayout::new(vec![TensorInfo::new("h", [usize::MAX, 2])]);
        assert!(matches!(huge, Err(LayoutError::TooLarge { .. })));
        let too_many = TensorLayout::new(vec![TensorInfo::new("h", [MAX_LAYOUT_VALUES + 1])]);
        assert!(matches!(too_many, Err(LayoutError::TooLarge { .. })));
    }

    #[test]
    fn schema_hash_depends_on_names_shapes_and_dtypes_but_not_roles() {
        let base = || vec![TensorInfo::new("w", [3, 4]), TensorInfo::new("b", [4])];
        let hash = |t: Vec<TensorInfo>| TensorLayout::new(t).unwrap().schema_hash();
        let h = hash(base());
        assert_eq!(h, hash(base()));
        let mut renamed = base();
        renamed[1].name = "bias".into();
        assert_ne!(h, hash(renamed));
        let mut reshaped = base();
        reshaped[0].shape = vec![4, 3];
        assert_ne!(h, hash(reshaped));
        let mut retyped = base();
        retyped[0].dtype = Dtype::F16;
        assert_ne!(h, hash(retyped));
        let mut reroled = base();
        reroled[0].role = TensorRole::Gradient;
        assert_eq!(h, hash(reroled));
        // Shapes [12] + [] and [1, 2] + ... must not collide through concatenation.
        let a = hash(vec![TensorInfo::new("x", [1, 2]), TensorInfo::new("y", [])]);
        let b = hash(vec![TensorInfo::new("x", [1]), TensorInfo::new("y", [2])]);
        assert_ne!(a, b);
    }

    #[test]
    fn flat_tensors_check_lengths() {
        let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("w", [2])]).unwrap());
        assert_eq!(
            FlatTensors::new(layout.clone(), vec![1.0]).unwrap_err(),
            LengthMismatch { expected: 2, actual: 1 }
        );
        let mut flat = FlatTensors::new(layout, vec![1.0, 2.0]).unwrap();
        flat.tensor_mut(0)[1] = 5.0;
        assert_eq!(flat.tensor(0), &[1.0, 5.0]);
    }
}
