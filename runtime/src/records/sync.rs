//! Anti-entropy: two peers compare their record stores and send each other only what the other lacks, on
//! one stream of protocol `/colony/records/2`:
//!
//! 1. the initiator sends the fingerprint of its digest (a hash, 32 bytes);
//! 2. the responder answers "same" when the fingerprints match (the common case, and the end of the
//!    exchange), else its digest;
//! 3. the initiator sends the records the responder lacks, and its own digest;
//! 4. the responder sends the records the initiator lacks.
//!
//! Every received record goes through [`Replica::apply_wire`], so forged, malformed or oversized ones are
//! refused and counted, never stored. Batches travel as frame payloads, bounded by the frame limits.

use std::sync::Arc;

use bytes::Bytes;
use colony_transports::rpc::{self, Router, StreamConfig};
use colony_transports::wire::{ProtocolId, WireError};
use colony_transports::{Connection, PeerId};

use super::Time;
use super::replica::Replica;
use super::wire::{WireBatch, WireDigestEntry, WireRecord};
use super::{DigestEntry, Record, Stored};

/// The clock the store's expirations are compared with (seconds since the Unix epoch).
pub type Clock = Arc<dyn Fn() -> Time + Send + Sync>;

/// The step numbers of the exchange.
pub mod steps {
    /// Initiator: the fingerprint of its digest.
    pub const OFFER: u8 = 1;
    /// Responder: the fingerprints match; the exchange ends.
    pub const SAME: u8 = 2;
    /// Responder: its digest.
    pub const DIGEST: u8 = 3;
    /// Initiator: what the responder lacks, and its own digest.
    pub const REPLY: u8 = 4;
    /// Responder: what the initiator lacks.
    pub const PUSH: u8 = 5;
}

/// The frame header of each step; batches travel as payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SyncStep {
    /// One of [`steps`].
    pub step: u8,
    /// The sender's fingerprint (in [`steps::OFFER`]; zero otherwise).
    pub fingerprint: [u8; 32],
}

impl SyncStep {
    /// A step without a fingerprint.
    pub fn plain(step: u8) -> Self {
        Self {
            step,
            fingerprint: [0; 32],
        }
    }
}

/// The protocol id of the exchange.
pub fn protocol() -> ProtocolId {
    ProtocolId::new("records", 2).expect("a valid protocol name")
}

/// What one exchange brought in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Records received.
    pub received: usize,
    /// Records that won their slot.
    pub stored: usize,
    /// Records that were refused (malformed, forged, invalid, throttled, over a limit).
    pub refused: usize,
}

fn apply(replica: &Replica, records: Vec<WireRecord>, from: PeerId) -> Applied {
    let mut applied = Applied {
        received: records.len(),
        ..Applied::default()
    };
    for wire in records {
        match replica.apply_wire(wire, from) {
            Ok(Stored::Visible | Stored::Hidden) => applied.stored += 1,
            Ok(Stored::Outdated) => {}
            Err(_) => applied.refused += 1,
        }
    }
    applied
}

fn malformed(error: impl std::fmt::Display) -> WireError {
    WireError::Malformed(error.to_string())
}

fn batch(records: &[Record], digest: &[DigestEntry]) -> Result<Bytes, WireError> {
    WireBatch {
        records: records.iter().map(WireRecord::from).collect(),
        digest: digest.iter().map(WireDigestEntry::from).collect(),
    }
    .encode()
    .map_err(malformed)
}

fn expect_step(got: SyncStep, want: &[u8]) -> Result<u8, WireError> {
    if want.contains(&got.step) {
        Ok(got.step)
    } else {
        Err(WireError::Malformed(format!(
            "records exchange: step {} where one of {want:?} was expected",
            got.step
        )))
    }
}

/// Runs one exchange with the peer at the other end of `conn`, as the initiator.
pub async fn sync_with(conn: &Connection, replica: &Replica, config: &StreamConfig) -> Result<Applied, WireError> {
    let from = conn.remote_peer();
    let (mut send, mut recv) = rpc::open::<SyncStep>(conn, &protocol(), config).await?;
    let (digest, fingerprint) = replica.digest();
    let offer = SyncStep {
        step: steps::OFFER,
        fingerprint,
    };
    send.send(&offer, Bytes::new()).await?;
    let (step, payload) = recv.recv_required("the peer's fingerprint check").await?;
    if expect_step(step, &[steps::SAME, steps::DIGEST])? == steps::SAME {
        send.finish().await?;
        return Ok(Applied::default());
    }
    let theirs = WireBatch::decode(&payload)
        .and_then(|b| b.digest_entries())
        .map_err(malformed)?;
    let missing = replica.missing_from(&theirs);
    send.send(&SyncStep::plain(steps::REPLY), batch(&missing, &digest)?)
        .await?;
    let (step, payload) = recv.recv_required("the records this peer lacks").await?;
    expect_step(step, &[steps::PUSH])?;
    let pushed = WireBatch::decode(&payload).map_err(malformed)?;
    let applied = apply(replica, pushed.records, from);
    send.finish().await?;
    Ok(applied)
}

/// Serves the exchange on `router`, as the responder.
pub fn serve(router: &mut Router, replica: Arc<Replica>) {
    router.stream(protocol(), move |mut incoming| {
        let replica = replica.clone();
        async move {
            let from = incoming.peer;
            let mut recv = incoming.framed::<SyncStep>();
            let (offer, _) = recv.recv_required("a fingerprint").await?;
            expect_step(offer, &[steps::OFFER])?;
            let (digest, fingerprint) = replica.digest();
            if offer.fingerprint == fingerprint {
                incoming.send.send(&SyncStep::plain(steps::SAME), Bytes::new()).await?;
                return incoming.send.finish().await;
            }
            let digest_batch = batch(&[], &digest)?;
            incoming
                .send
                .send(&SyncStep::plain(steps::DIGEST), digest_batch)
                .await?;
            let (step, payload) = recv.recv_required("the records this peer lacks").await?;
            expect_step(step, &[steps::REPLY])?;
            let reply = WireBatch::decode(&payload).map_err(malformed)?;
            let theirs = reply.digest_entries().map_err(malformed)?;
            apply(&replica, reply.records, from);
            let missing = replica.missing_from(&theirs);
            incoming
                .send
                .send(&SyncStep::plain(steps::PUSH), batch(&missing, &[])?)
                .await?;
            incoming.send.finish().await
        }
    });
}
