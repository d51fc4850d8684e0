//! Hostile length prefixes are refused before anything is allocated for them. A counting global allocator
//! records the largest single allocation while a peer announces frames of 4 GiB and 1 TiB.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use colony_transports::mem::MemHub;
use colony_transports::tcp::{TcpConfig, TcpTransport};
use colony_transports::wire::{FrameKind, encode_preamble};
use colony_transports::{Keypair, Transport};
use support::Setup;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Largest allocation allowed while handling the hostile frames: well under the 64 MiB frame limit (the
/// TCP transport's receive buffer is 4 MiB).
const ALLOWED: usize = 8 << 20;

async fn hostile_prefixes_allocate_nothing(setup: Setup) {
    let linked = support::link(&setup).await;
    let serving = tokio::spawn(support::test_router().serve(linked.server.clone()));
    // Warm up: one ordinary call so that buffers of normal operation exist before we start counting.
    let _ = support::bad_stream(&linked, support::open_frame("/colony/echo/2"), false).await;
    for claimed in [4u64 << 30, 1u64 << 40, u64::MAX] {
        LARGEST.store(0, Ordering::Relaxed);
        let mut frame = encode_preamble(FrameKind::Message, 0, 0).to_vec();
        frame[0..8].copy_from_slice(&claimed.to_le_bytes());
        let message = support::bad_stream(&linked, frame, false).await;
        assert!(message.contains("exceeds the limit"), "{message}");
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest < ALLOWED,
            "a {claimed}-byte claim led to a {largest}-byte allocation"
        );
    }
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mem() {
    let hub = MemHub::new();
    hostile_prefixes_allocate_nothing(Setup {
        server: hub.transport(&Keypair::generate()),
        client: hub.transport(&Keypair::generate()),
        listen: "mem://server".parse().unwrap(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp() {
    let make = || -> Arc<dyn Transport> { Arc::new(TcpTransport::new(Keypair::generate(), TcpConfig::default())) };
    hostile_prefixes_allocate_nothing(Setup {
        server: make(),
        client: make(),
        listen: "tcp://127.0.0.1:0".parse().unwrap(),
    })
    .await;
}
