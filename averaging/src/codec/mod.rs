//! Compression codecs for the parts that peers exchange during averaging, and the policies that choose one
//! per tensor.
//!
//! A part is a run of `f32` values; a [`Codec`] turns it into bytes for the wire and back. The codec itself is
//! not in the bytes: the message that carries a part names it by [`Codec::id`], and the receiver knows how
//! many values the part holds (from the tensor layout), so [`Codec::decode`] takes that count and checks every
//! length against it. Decoding never trusts the buffer: any size, header field or codebook that does not fit
//! is a [`CodecError`], non-finite numbers (NaN, infinity) are refused, and nothing is allocated beyond the
//! buffer's size and the expected number of values. A [`CodecPolicy`] picks the codec for a tensor by size,
//! role or name.
//!
//! # Wire layouts
//!
//! All integers and floats are little-endian; `n` is the number of values.
//!
//! | codec | id | layout |
//! |---|---|---|
//! | [`Codec::None`] | 0 | `n × f32` |
//! | [`Codec::Float16`] | 1 | `n × f16` (values clamped to ±65504 first) |
//! | [`Codec::ScaledFloat16`] | 2 | `u64 row_len ‖ rows × f32 mean ‖ rows × f32 std ‖ n × f16 (x − mean) / std` |
//! | [`Codec::Uniform8Bit`] | 3 | `u32 codebook_len ‖ codebook_len × f32 codebook ‖ n × u8 index` |
//! | [`Codec::Quantile8Bit`] | 4 | `u32 codebook_len ‖ codebook_len × f32 codebook ‖ n × u8 index` |
//! | [`Codec::Blockwise8Bit`] | 5 | `u32 block_size ‖ blocks × f32 absmax ‖ n × u8 code` |
//!
//! - ScaledFloat16: rows of `row_len` consecutive values (the last may be shorter), `rows = ⌈n / row_len⌉`;
//!   `row_len` is 0 exactly when `n` is 0 and otherwise lies in `1..=n`. A value decodes as `h · std + mean`.
//! - Uniform8Bit and Quantile8Bit share a layout: `codebook_len` is in `1..=256` (encoders write 256), every
//!   index is below it, and a value decodes as `codebook[index]`. They differ only in how values are put into
//!   buckets; the codebook is the mean of the original values of each bucket (0 for an empty one).
//! - Blockwise8Bit: blocks of `block_size` values (4096 when encoding; at least 1), `blocks = ⌈n / block_size⌉`,
//!   each with its largest magnitude `absmax ≥ 0`; a code decodes as `dynamic_map()[code] · absmax`, where
//!   [`dynamic_map`] is a fixed table of 256 values in `[-1, 1]`, finer near zero.
//!
//! # Speed
//!
//! Parts of at least [`PARALLEL_MIN_VALUES`] values are encoded and decoded on the rayon pool. Statistics are
//! always summed over the same fixed chunks in the same order, so the parallel result is bit-identical to the
//! sequential one (and to what another peer computes for the same input).

mod blockwise8;
mod codebook;
mod float16;
mod policy;
mod quantile8;
mod scaled16;
mod support;
mod uniform8;

#[cfg(test)]
mod tests;

use std::fmt;

use thiserror::Error;

pub use blockwise8::{BLOCK_SIZE, dynamic_map};
pub use policy::CodecPolicy;
pub use support::PARALLEL_MIN_VALUES;

use support::Exec;

/// How a part's values travel: raw, as 16-bit floats, or quantized to 8 bits. See the [module](self) docs for
/// each codec's wire layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Raw little-endian `f32`: exact, 4 bytes per value.
    None,
    /// IEEE half precision after clamping to ±65504 (the largest finite `f16`): 2 bytes per value, relative
    /// error about 2⁻¹¹ for values of normal magnitude.
    Float16,
    /// Per row, the mean is subtracted and the result divided by the row's standard deviation before it is
    /// stored as `f16`, with each row's mean and deviation as `f32`: robust to large offsets and scales.
    ScaledFloat16,
    /// 256 uniform buckets over the mean ± 3 unbiased standard deviations (values outside fall into the end
    /// buckets); each bucket decodes to the mean of its values. 1 byte per value plus a 1 KiB codebook.
    Uniform8Bit,
    /// 256 buckets cut at approximate quantiles (inner buckets hold `n / 255` values each, the two end ones
    /// half that); each bucket decodes to the mean of its values. 1 byte per value plus a 1 KiB codebook.
    Quantile8Bit,
    /// Blocks of 4096 values, each scaled by its largest magnitude and coded with a fixed 256-entry dynamic
    /// map that is finer near zero. 1 byte per value plus 4 bytes per block.
    Blockwise8Bit,
}

impl Codec {
    /// Every codec, in wire-id order.
    pub const ALL: [Codec; 6] = [
        Codec::None,
        Codec::Float16,
        Codec::ScaledFloat16,
        Codec::Uniform8Bit,
        Codec::Quantile8Bit,
        Codec::Blockwise8Bit,
    ];

    /// The stable wire id: 0 to 5 in the order of [`Codec::ALL`].
    pub fn id(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Float16 => 1,
            Codec::ScaledFloat16 => 2,
            Codec::Uniform8Bit => 3,
            Codec::Quantile8Bit => 4,
            Codec::Blockwise8Bit => 5,
        }
    }

    /// The codec with wire id `id`, or [`CodecError::UnknownCodec`].
    ///
    /// ```
    /// use colony_averaging::codec::Codec;
    /// assert_eq!(Codec::from_id(Codec::Quantile8Bit.id()), Ok(Codec::Quantile8Bit));
    /// assert!(Codec::from_id(6).is_err());
    /// ```
    pub fn from_id(id: u8) -> Result<Codec, CodecError> {
        Codec::ALL
            .get(usize::from(id))
            .copied()
            .ok_or(CodecError::UnknownCodec(id))
    }

    /// The name used in configuration files and messages: `none`, `float16`, `scaled-float16`,
    /// `uniform-8bit`, `quantile-8bit`, `blockwise-8bit`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Float16 => "float16",
            Codec::ScaledFloat16 => "scaled-float16",
            Codec::Uniform8Bit => "uniform-8bit",
            Codec::Quantile8Bit => "quantile-8bit",
            Codec::Blockwise8Bit => "blockwise-8bit",
        }
    }

    /// The codec called `name` (see [`Codec::name`]), if any.
    pub fn from_name(name: &str) -> Option<Codec> {
        Codec::ALL.into_iter().find(|codec| codec.name() == name)
    }

    /// Estimated encoded bytes per value, ignoring headers and codebooks: 4, 2, 2, 1, 1, 1. Used to size
    /// parts by their compressed size.
    pub fn bytes_per_value(self) -> f64 {
        match self {
            Codec::None => 4.0,
            Codec::Float16 | Codec::ScaledFloat16 => 2.0,
            Codec::Uniform8Bit | Codec::Quantile8Bit | Codec::Blockwise8Bit => 1.0,
        }
    }

    /// The exact size in bytes of [`Codec::encode`]'s output for `len` values with rows of `row_len`
    /// (saturating at `usize::MAX` for lengths no slice can have).
    pub fn encoded_len(self, len: usize, row_len: usize) -> usize {
        match self {
            Codec::None => len.saturating_mul(4),
            Codec::Float16 => len.saturating_mul(2),
            Codec::ScaledFloat16 => scaled16::encoded_len(len, row_len),
            Codec::Uniform8Bit | Codec::Quantile8Bit => codebook::encoded_len(len),
            Codec::Blockwise8Bit => blockwise8::encoded_len(len),
        }
    }

    /// Encodes `values` into a new buffer. `row_len` matters only for [`Codec::ScaledFloat16`] (rows of
    /// `row_len` consecutive values, the last may be shorter; 0 or at least `values.len()` means one row).
    ///
    /// Never fails and never panics. Non-finite inputs are not rejected here, but they make the buffer
    /// undecodable (the receiver refuses NaN and infinity); callers check their values first.
    ///
    /// ```
    /// use colony_averaging::codec::Codec;
    /// let values = [0.5_f32, -1.25, 3.0, 1e-3];
    /// let bytes = Codec::Float16.encode(&values, 0);
    /// assert_eq!(bytes.len(), 8);
    /// let decoded = Codec::Float16.decode(&bytes, values.len()).unwrap();
    /// assert!((decoded[3] - 1e-3).abs() < 1e-6);
    /// ```
    pub fn encode(self, values: &[f32], row_len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len(values.len(), row_len));
        self.encode_into(values, row_len, &mut out);
        out
    }

    /// Like [`Codec::encode`], appending to `out`.
    pub fn encode_into(self, values: &[f32], row_len: usize, out: &mut Vec<u8>) {
        self.encode_with(values, row_len, out, Exec::for_len(values.len()));
    }

    /// Decodes `len` values from `bytes`, checking every length and refusing non-finite values.
    ///
    /// ```
    /// use colony_averaging::codec::{Codec, CodecError};
    /// let bytes = Codec::None.encode(&[1.0, 2.0], 0);
    /// assert_eq!(Codec::None.decode(&bytes, 2).unwrap(), vec![1.0, 2.0]);
    /// assert!(matches!(Codec::None.decode(&bytes, 3), Err(CodecError::Length { .. })));
    /// ```
    pub fn decode(self, bytes: &[u8], len: usize) -> Result<Vec<f32>, CodecError> {
        // The size check comes before the allocation, so that a wrong `len` cannot allocate.
        self.check_len(bytes, len)?;
        let mut out = vec![0.0; len];
        self.decode_into(bytes, &mut out)?;
        Ok(out)
    }

    /// Decodes `out.len()` values from `bytes` into `out`. On error, `out` holds unspecified (finite or not)
    /// values.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        self.decode_with(bytes, out, Exec::for_len(out.len()))
    }

    /// Checks that `bytes` has the size that `len` values and the header call for.
    fn check_len(self, bytes: &[u8], len: usize) -> Result<(), CodecError> {
        let expected = match self {
            Codec::None => len.checked_mul(4),
            Codec::Float16 => len.checked_mul(2),
            Codec::ScaledFloat16 => return scaled16::parse_header(bytes, len).map(|_| ()),
            Codec::Uniform8Bit | Codec::Quantile8Bit => {
                return codebook::parse_header(self, bytes, len).map(|_| ());
            }
            Codec::Blockwise8Bit => return blockwise8::parse_header(bytes, len).map(|_| ()),
        };
        support::check_size(self, bytes, expected)
    }

    pub(crate) fn encode_with(self, values: &[f32], row_len: usize, out: &mut Vec<u8>, exec: Exec) {
        match self {
            Codec::None => float16::encode_f32(values, out, exec),
            Codec::Float16 => float16::encode_f16(values, out, exec),
            Codec::ScaledFloat16 => scaled16::encode(values, row_len, out, exec),
            Codec::Uniform8Bit => uniform8::encode(values, out, exec),
            Codec::Quantile8Bit => quantile8::encode(values, out, exec),
            Codec::Blockwise8Bit => blockwise8::encode(values, out, exec),
        }
    }

    pub(crate) fn decode_with(self, bytes: &[u8], out: &mut [f32], exec: Exec) -> Result<(), CodecError> {
        match self {
            Codec::None => float16::decode_f32(bytes, out, exec),
            Codec::Float16 => float16::decode_f16(bytes, out, exec),
            Codec::ScaledFloat16 => scaled16::decode(bytes, out, exec),
            Codec::Uniform8Bit | Codec::Quantile8Bit => codebook::decode(self, bytes, out, exec),
            Codec::Blockwise8Bit => blockwise8::decode(bytes, out, exec),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a buffer could not be decoded (or a codec id not understood). A peer that sends such a part is at
/// fault; the part is refused and counted, never trusted.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CodecError {
    /// The codec id is not one of [`Codec::ALL`]'s.
    #[error("unknown codec id {0}; known ids are 0 (none) to 5 (blockwise-8bit)")]
    UnknownCodec(u8),
    /// The buffer's size does not match what its header and the expected number of values call for.
    #[error("{codec} buffer holds {actual} bytes but its header and the number of values call for {expected}")]
    Length {
        /// The codec.
        codec: Codec,
        /// The size in bytes the header and the number of values call for (the header's own size when the
        /// buffer is too short to hold it; `usize::MAX` when the size would overflow).
        expected: usize,
        /// The buffer's size in bytes.
        actual: usize,
    },
    /// The buffer holds a non-finite number (NaN or infinity), or a value that decodes to one.
    #[error("{codec} buffer holds a non-finite number (NaN or infinity) at byte offset {index}")]
    NonFinite {
        /// The codec.
        codec: Codec,
        /// Byte offset in the buffer of the first non-finite field (a value, a mean, a standard deviation,
        /// a codebook entry or a block's absmax), or of the value whose decoding overflows.
        index: usize,
    },
    /// A header field is out of range (row length, codebook size, block size, a negative scale, an index past
    /// the codebook).
    #[error("{codec} buffer is malformed: {reason}")]
    Malformed {
        /// The codec.
        codec: Codec,
        /// Which field is wrong, its value and the allowed range.
        reason: String,
    },
}
