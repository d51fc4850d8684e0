//! Anti-entropy: two peers compare digests of their record stores and send each other only what the other
//! lacks, in one and a half round trips on one stream of protocol `/colony/records/1`:
//!
//! 1. the initiator sends its digest;
//! 2. the responder sends the records the initiator lacks, and its own digest;
//! 3. the initiator sends the records the responder lacks.
//!
//! Every received record goes through [`RecordStore::store`], so forged, malformed or oversized ones are
//! refused and counted, never stored. Batches travel as frame payloads, bounded by the frame limits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use colony_transports::Connection;
use colony_transports::rpc::{self, Router, StreamConfig};
use colony_transports::wire::{ProtocolId, WireError};

use super::wire::{WireBatch, WireDigestEntry, WireRecord};
use super::{Record, RecordStore, Stored, Time};

/// A record store shared between the protocol handlers and its owner.
pub type SharedStore = Arc<Mutex<RecordStore>>;
/// The clock the store's expirations are compared with (seconds since the Unix epoch).
pub type Clock = Arc<dyn Fn() -> Time + Send + Sync>;

const DIGEST: u8 = 1;
const REPLY: u8 = 2;
const PUSH: u8 = 3;

/// The frame header of each step; the batch travels as the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SyncStep {
    step: u8,
}

/// A step header with the given number (1 digest, 2 reply, 3 push), for tests that play a peer by hand.
pub fn step(step: u8) -> SyncStep {
    SyncStep { step }
}

/// The protocol id of the exchange.
pub fn protocol() -> ProtocolId {
    ProtocolId::new("records", 1).expect("a valid protocol name")
}

/// What one exchange brought in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Records received.
    pub received: usize,
    /// Records that won their slot.
    pub stored: usize,
    /// Records that were refused (malformed, forged, invalid, over a limit).
    pub refused: usize,
}

/// Counters of the records a peer served and received through anti-entropy.
#[derive(Debug, Default)]
pub struct SyncCounters {
    /// Records stored from peers.
    pub stored: AtomicU64,
    /// Records refused from peers.
    pub refused: AtomicU64,
}

fn lock(store: &SharedStore) -> std::sync::MutexGuard<'_, RecordStore> {
    store.lock().expect("record store lock poisoned")
}

fn apply(store: &SharedStore, records: Vec<WireRecord>, now: Time, counters: &SyncCounters) -> Applied {
    let mut applied = Applied {
        received: records.len(),
        ..Applied::default()
    };
    let mut store = lock(store);
    for wire in records {
        let result = Record::try_from(wire)
            .map_err(|e| e.to_string())
            .and_then(|record| store.store(record, now).map_err(|e| e.to_string()));
        match result {
            Ok(Stored::Visible | Stored::Hidden) => applied.stored += 1,
            Ok(Stored::Outdated) => {}
            Err(_) => applied.refused += 1,
        }
    }
    counters.stored.fetch_add(applied.stored as u64, Ordering::Relaxed);
    counters.refused.fetch_add(applied.refused as u64, Ordering::Relaxed);
    applied
}

fn malformed(error: impl std::fmt::Display) -> WireError {
    WireError::Malformed(error.to_string())
}

fn batch(records: &[Record], digest: Option<&RecordStore>) -> Result<Bytes, WireError> {
    WireBatch {
        records: records.iter().map(WireRecord::from).collect(),
        digest: digest
            .map(|store| store.digest().iter().map(WireDigestEntry::from).collect())
            .unwrap_or_default(),
    }
    .encode()
    .map_err(malformed)
}

fn expect_step(got: SyncStep, want: u8) -> Result<(), WireError> {
    if got.step == want {
        Ok(())
    } else {
        Err(WireError::Malformed(format!(
            "records exchange: step {} where step {want} was expected",
            got.step
        )))
    }
}

/// Runs one exchange with the peer at the other end of `conn`, as the initiator.
pub async fn sync_with(
    conn: &Connection,
    store: &SharedStore,
    clock: &Clock,
    counters: &SyncCounters,
    config: &StreamConfig,
) -> Result<Applied, WireError> {
    let (mut send, mut recv) = rpc::open::<SyncStep>(conn, &protocol(), config).await?;
    let digest = batch(&[], Some(&lock(store)))?;
    send.send(&SyncStep { step: DIGEST }, digest).await?;
    let (step, payload) = recv.recv_required("the peer's records and digest").await?;
    expect_step(step, REPLY)?;
    let reply = WireBatch::decode(&payload).map_err(malformed)?;
    let theirs = reply.digest_entries().map_err(malformed)?;
    let now = clock();
    let applied = apply(store, reply.records, now, counters);
    let missing = lock(store).missing_from(&theirs, now);
    send.send(&SyncStep { step: PUSH }, batch(&missing, None)?).await?;
    send.finish().await?;
    Ok(applied)
}

/// Serves the exchange on `router`, as the responder.
pub fn serve(router: &mut Router, store: SharedStore, clock: Clock, counters: Arc<SyncCounters>) {
    router.stream(protocol(), move |mut incoming| {
        let (store, clock, counters) = (store.clone(), clock.clone(), counters.clone());
        async move {
            let mut recv = incoming.framed::<SyncStep>();
            let (step, payload) = recv.recv_required("a digest").await?;
            expect_step(step, DIGEST)?;
            let theirs = WireBatch::decode(&payload)
                .and_then(|b| b.digest_entries())
                .map_err(malformed)?;
            let reply = {
                let store = lock(&store);
                batch(&store.missing_from(&theirs, clock()), Some(&store))?
            };
            incoming.send.send(&SyncStep { step: REPLY }, reply).await?;
            let (step, payload) = recv.recv_required("the records this peer lacks").await?;
            expect_step(step, PUSH)?;
            let pushed = WireBatch::decode(&payload).map_err(malformed)?;
            apply(&store, pushed.records, clock(), &counters);
            incoming.send.finish().await
        }
    });
}
