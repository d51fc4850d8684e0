//! Host memory for parameters, gradients and optimizer state: [`HostBuffer`].
//!
//! The CPU path is an ordinary heap allocation aligned to a cache line. Page-locked (pinned) memory for
//! asynchronous CUDA copies will come behind the same type; code that only reads and writes `f32` values
//! through `Deref` does not need to know which one it holds.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// Values per block: 16 × 4 bytes is one 64-byte cache line.
const BLOCK_VALUES: usize = 16;

/// The unit of allocation. `repr(C, align(64))` around `[f32; 16]`: 64 bytes, no padding, 64-byte aligned, so
/// a `Vec<Block>` is a contiguous, aligned run of `f32` values.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([f32; BLOCK_VALUES]);

const _: () = assert!(std::mem::size_of::<Block>() == BLOCK_VALUES * std::mem::size_of::<f32>());

/// A heap buffer of `f32` values whose first value sits on a 64-byte boundary.
///
/// The alignment puts every chunk of a multiple of 16 values on its own cache lines, so that threads working on
/// neighbouring chunks never share a line and vector loads never straddle one. The buffer dereferences to
/// `[f32]`, so every slice method works on it.
///
/// ```
/// use colony_offload::HostBuffer;
///
/// let mut buffer = HostBuffer::from_slice(&[1.0, 2.0, 3.0]);
/// buffer[1] = 5.0;
/// assert_eq!(buffer.as_slice(), &[1.0, 5.0, 3.0]);
/// assert_eq!(buffer.as_ptr() as usize % 64, 0);
/// ```
#[derive(Clone)]
pub struct HostBuffer {
    /// `len.div_ceil(16)` blocks; the values past `len` in the last block are zero and never exposed.
    blocks: Vec<Block>,
    len: usize,
}

impl HostBuffer {
    /// A buffer of `len` zeros.
    ///
    /// Every page is written here, so the first use of the buffer does not pay for page faults.
    pub fn zeroed(len: usize) -> Self {
        Self {
            blocks: vec![Block([0.0; BLOCK_VALUES]); len.div_ceil(BLOCK_VALUES)],
            len,
        }
    }

    /// A buffer holding a copy of `values`.
    pub fn from_slice(values: &[f32]) -> Self {
        let mut buffer = Self::zeroed(values.len());
        buffer.as_mut_slice().copy_from_slice(values);
        buffer
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The values.
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `Block` is `repr(C)` around `[f32; 16]` with no padding (checked above), so `blocks` is
        // `16 × blocks.len() >= len` contiguous, initialised `f32` values, suitably aligned (an empty `Vec`'s
        // dangling pointer is aligned to 64 too); the slice borrows `self`, which owns them.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<f32>(), self.len) }
    }

    /// The values, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`; the mutable borrow of `self` makes this the only reference to the values.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

impl Deref for HostBuffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        self.as_slice()
    }
}

impl DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for HostBuffer {
    /// The length and at most the first eight values: buffers hold millions.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        let shown = &self.as_slice()[..self.len.min(SHOWN)];
        let mut out = f.debug_struct("HostBuffer");
        out.field("len", &self.len).field("head", &shown);
        if self.len > SHOWN {
            out.finish_non_exhaustive()
        } else {
            out.finish()
        }
    }
}

impl PartialEq for HostBuffer {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn buffers_are_aligned_zeroed_and_sized() {
        assert_send_sync::<HostBuffer>();
        for len in [0, 1, 15, 16, 17, 1000, 1 << 16] {
            let buffer = HostBuffer::zeroed(len);
            assert_eq!(buffer.len(), len);
            assert_eq!(buffer.is_empty(), len == 0);
            assert_eq!(buffer.as_ptr() as usize % 64, 0, "len {len}");
            assert!(buffer.iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn from_slice_copies_and_clones_are_independent() {
        let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut buffer = HostBuffer::from_slice(&values);
        assert_eq!(buffer.as_slice(), &values[..]);
        let copy = buffer.clone();
        buffer.as_mut_slice()[3] = 100.0;
        buffer[4] = 200.0;
        assert_eq!(copy.as_slice(), &values[..]);
        assert_eq!(buffer[3], 100.0);
        assert_eq!(buffer[4], 200.0);
        assert_ne!(buffer, copy);
        assert_eq!(copy.as_ptr() as usize % 64, 0);
    }

    #[test]
    fn debug_shows_the_length_and_the_head_only() {
        let small = format!("{:?}", HostBuffer::from_slice(&[1.0, 2.0]));
        assert_eq!(small, "HostBuffer { len: 2, head: [1.0, 2.0] }");
        let large = format!("{:?}", HostBuffer::zeroed(1 << 20));
        assert!(
            large.starts_with("HostBuffer { len: 1048576, head: [0.0, 0.0"),
            "{large}"
        );
        assert!(large.ends_with(".. }"), "{large}");
    }
}
