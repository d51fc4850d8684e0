//! This peer's values during a round, averaged in place.
//!
//! A round reads the caller's buffer (to send parts and to reduce its own) and writes each part's result
//! back over the same part, so no output buffer of the vector's size is allocated and faulted in per
//! round. Several tasks touch the buffer at once, always on disjoint parts, under these rules:
//!
//! - **One writer.** Only the run's collector writes, and only a part whose result has arrived. A result
//!   arrives only after this peer has sent the part (its sender read it first) or, for a part this peer
//!   reduces, after its own contribution was accumulated (the reducer read it first); no task reads the part
//!   for the round afterwards, except the collector itself.
//! - **Leases.** An uncompressed part leaves as a payload that borrows the buffer ([`RoundBuffer::lease`])
//!   until the transport has written it. The collector never writes a part that is leased: it defers the
//!   result until the lease ends ([`RoundBuffer::released`] wakes it).
//! - **Taking it back.** [`RoundBuffer::into_vec`] returns the caller's buffer when nothing borrows it any
//!   more, or else a copy (a payload stuck behind a dead connection keeps the original alive until the
//!   connection drops it).

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

/// The buffer of one round: a `Vec<f32>` shared by the run's tasks, with a lease count per part.
pub(crate) struct RoundBuffer {
    values: RawValues,
    /// Per part: payloads still borrowing its memory.
    leases: Box<[AtomicUsize]>,
    /// Notified whenever a lease ends.
    released: Notify,
}

/// The parts of a `Vec<f32>`, freed on drop.
struct RawValues {
    ptr: NonNull<f32>,
    len: usize,
    capacity: usize,
}

// SAFETY: plain f32 memory owned by this value; the access rules of the module documentation keep every
// write to a part exclusive of every other access to it, so sharing it between threads is sound.
unsafe impl Send for RawValues {}
// SAFETY: as above.
unsafe impl Sync for RawValues {}

impl RawValues {
    fn into_vec(self) -> Vec<f32> {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the parts came from a Vec in `RoundBuffer::new` and are given back exactly once (`this` is
        // not dropped, so `Drop` does not free them again).
        unsafe { Vec::from_raw_parts(this.ptr.as_ptr(), this.len, this.capacity) }
    }
}

impl Drop for RawValues {
    fn drop(&mut self) {
        // SAFETY: as in `into_vec`: the parts of a Vec, freed exactly once.
        drop(unsafe { Vec::from_raw_parts(self.ptr.as_ptr(), self.len, self.capacity) });
    }
}

impl RoundBuffer {
    /// Takes `values`; `parts` is the number of parts the round splits them into.
    pub fn new(values: Vec<f32>, parts: usize) -> Self {
        let mut values = std::mem::ManuallyDrop::new(values);
        let (len, capacity) = (values.len(), values.capacity());
        Self {
            values: RawValues {
                ptr: NonNull::new(values.as_mut_ptr()).expect("a Vec's pointer is never null"),
                len,
                capacity,
            },
            leases: (0..parts).map(|_| AtomicUsize::new(0)).collect(),
            released: Notify::new(),
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.values.len
    }

    /// Reads `range`.
    ///
    /// # Safety
    /// No write to any of `range` may happen while the slice lives (module rules: only the collector writes,
    /// and only parts nobody reads any more).
    pub unsafe fn read(&self, range: Range<usize>) -> &[f32] {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "range {range:?} of {}",
            self.len()
        );
        // SAFETY: in bounds (asserted), initialised f32 memory owned by `self`; the caller rules out writes.
        unsafe { std::slice::from_raw_parts(self.values.ptr.as_ptr().add(range.start), range.len()) }
    }

    /// Writes `range`.
    ///
    /// # Safety
    /// Nothing else may read or write any of `range` while the slice lives, and `range` must lie within
    /// one part that is not leased ([`RoundBuffer::leased`]).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn write(&self, range: Range<usize>) -> &mut [f32] {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "range {range:?} of {}",
            self.len()
        );
        // SAFETY: in bounds (asserted); the caller guarantees exclusive access to `range`.
        unsafe { std::slice::from_raw_parts_mut(self.values.ptr.as_ptr().add(range.start), range.len()) }
    }

    /// The little-endian bytes of `range` (part `part`) as a payload that borrows the buffer; the part is
    /// leased until the payload and every slice of it are dropped. Little-endian machines only (the `none`
    /// codec's wire layout).
    pub fn lease(self: &Arc<Self>, part: usize, range: Range<usize>) -> Bytes {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "range {range:?} of {}",
            self.len()
        );
        self.leases[part].fetch_add(1, Ordering::AcqRel);
        Bytes::from_owner(Lease {
            buffer: self.clone(),
            part,
            range,
        })
    }

    /// Whether a payload still borrows part `part`.
    pub fn leased(&self, part: usize) -> bool {
        self.leases[part].load(Ordering::Acquire) > 0
    }

    /// Completes when a lease ends. To wait for a part, create the future and `enable` it before checking
    /// [`RoundBuffer::leased`], so an end between the check and the wait is not missed.
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    /// The values back: the caller's own buffer once nothing borrows it (waiting up to `wait` for the
    /// transport to drop payloads it has written), else a copy.
    pub async fn into_vec(mut buffer: Arc<Self>, wait: Duration) -> Vec<f32> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Arc::try_unwrap(buffer) {
                Ok(owned) => return owned.values.into_vec(),
                Err(shared) => buffer = shared,
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            // Leases notify when they end; other holders (tasks of the run being torn down) do not: poll too.
            let step = (now + Duration::from_millis(1)).min(deadline);
            let _ = tokio::time::timeout_at(step, buffer.released()).await;
        }
        tracing::debug!("all-reduce: the round's buffer is still borrowed; returning a copy");
        // SAFETY: the run's tasks have ended, so nothing writes any more; the remaining holders only read.
        unsafe { buffer.read(0..buffer.len()) }.to_vec()
    }
}

/// A payload borrowing one part of a [`RoundBuffer`].
struct Lease {
    buffer: Arc<RoundBuffer>,
    part: usize,
    range: Range<usize>,
}

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the part is leased while `self` lives, so the collector does not write it (module rules).
        f32_bytes(unsafe { self.buffer.read(self.range.clone()) })
    }
}

/// f32 values seen as their bytes, in the machine's order (the `none` codec's wire layout on a
/// little-endian machine).
pub(super) fn f32_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: an f32 slice is valid, initialised memory of `4 * len` bytes; u8 has alignment 1, every byte
    // pattern is a valid u8, and the result borrows `values`.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.buffer.leases[self.part].fetch_sub(1, Ordering::AcqRel);
        self.buffer.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_callers_buffer_comes_back_once_no_lease_borrows_it() {
        let values: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let pointer = values.as_ptr();
        let buffer = Arc::new(RoundBuffer::new(values, 2));
        let payload = buffer.lease(1, 4..8);
        assert!(buffer.leased(1) && !buffer.leased(0));
        let slice = payload.slice(4..8);
        drop(payload);
        assert!(buffer.leased(1), "a slice of the payload keeps the part leased");
        assert_eq!(&slice[..], &5.0f32.to_le_bytes());
        // SAFETY: part 0 is not leased and nothing else touches it in this test.
        unsafe { buffer.write(0..4) }.copy_from_slice(&[9.0; 4]);
        drop(slice);
        assert!(!buffer.leased(1));
        let back = RoundBuffer::into_vec(buffer, Duration::from_secs(1)).await;
        assert_eq!(back.as_ptr(), pointer, "the same allocation, not a copy");
        assert_eq!(back, vec![9.0, 9.0, 9.0, 9.0, 4.0, 5.0, 6.0, 7.0]);
    }

    #[tokio::test]
    async fn a_buffer_still_borrowed_comes_back_as_a_copy_and_the_original_lives_on() {
        let buffer = Arc::new(RoundBuffer::new(vec![1.0, 2.0, 3.0], 1));
        let payload = buffer.lease(0, 0..3);
        let back = RoundBuffer::into_vec(buffer, Duration::from_millis(20)).await;
        assert_eq!(back, vec![1.0, 2.0, 3.0]);
        let expected: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            &payload[..],
            &expected[..],
            "the payload still reads the original memory"
        );
    }

    #[tokio::test]
    async fn a_lease_that_ends_while_waiting_returns_the_buffer_itself() {
        let values = vec![0.5f32; 1024];
        let pointer = values.as_ptr();
        let buffer = Arc::new(RoundBuffer::new(values, 1));
        let payload = buffer.lease(0, 0..1024);
        let dropper = tokio::spawn(async move {
            tokio::task::yield_now().await;
            drop(payload);
        });
        let back = RoundBuffer::into_vec(buffer, Duration::from_secs(10)).await;
        dropper.await.unwrap();
        assert_eq!(back.as_ptr(), pointer);
    }
}
