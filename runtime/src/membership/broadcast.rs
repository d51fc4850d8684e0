//! Records piggybacked on SWIM packets (foca's custom broadcasts): a new record reaches every member in
//! O(log N) gossip rounds, long before the next anti-entropy exchange would bring it.
//!
//! Each broadcast item is one encoded [`WireRecord`]. A received item goes through the replica like any
//! other record; only records that won their slot are passed on, so stale or refused ones stop at the
//! first peer that sees them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use colony_transports::wire::WireMessage;
use foca::{BroadcastHandler, Invalidates};

use super::identity::MemberId;
use crate::records::replica::Replica;
use crate::records::wire::WireRecord;
use crate::records::{Record, Stored, Subkey, Time};

/// What identifies a record broadcast: its slot and expiration. A later write of the same slot replaces
/// an earlier one still being disseminated.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotVersion {
    key: String,
    subkey: Option<Subkey>,
    expiration: Time,
}

impl SlotVersion {
    fn of(record: &Record) -> Self {
        Self {
            key: record.key.clone(),
            subkey: record.subkey.clone(),
            expiration: record.expiration,
        }
    }
}

impl Invalidates for SlotVersion {
    fn invalidates(&self, other: &Self) -> bool {
        self.key == other.key && self.subkey == other.subkey && self.expiration >= other.expiration
    }
}

/// A broadcast item that could not be used (never returned to foca: a bad item must not make it drop the
/// rest of the packet).
#[derive(Debug, thiserror::Error)]
#[error("record broadcast: {0}")]
pub struct BroadcastError(String);

/// Encodes a record as a broadcast item.
pub fn encode(record: &Record) -> Option<Bytes> {
    WireMessage::encode(&WireRecord::from(record))
        .ok()
        .map(|bytes| Bytes::from(bytes.to_vec()))
}

fn decode(data: &[u8]) -> Option<Record> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(data.len());
    aligned.extend_from_slice(data);
    let archived = WireRecord::access_archived(&aligned).ok()?;
    let wire = WireRecord::decode_archived(archived).ok()?;
    Record::try_from(wire).ok()
}

/// Applies received record broadcasts to the replica.
pub struct RecordBroadcasts {
    replica: Arc<Replica>,
    fresh: Arc<AtomicBool>,
}

impl RecordBroadcasts {
    /// A handler storing into `replica`; `fresh` is raised whenever a received record won its slot, so that
    /// the owner can pass it on at once instead of at the next gossip round.
    pub fn new(replica: Arc<Replica>, fresh: Arc<AtomicBool>) -> Self {
        Self { replica, fresh }
    }
}

impl BroadcastHandler<MemberId> for RecordBroadcasts {
    type Key = SlotVersion;
    type Error = BroadcastError;

    fn receive_item(&mut self, data: &[u8], sender: Option<&MemberId>) -> Result<Option<SlotVersion>, BroadcastError> {
        let Some(record) = decode(data) else {
            // Counted like any malformed record; the rest of the packet is still used.
            self.replica.count_malformed();
            return Ok(None);
        };
        let version = SlotVersion::of(&record);
        let Some(sender) = sender else {
            // Added locally by `publish`, which stored it already.
            return Ok(Some(version));
        };
        match self.replica.apply(record, sender.peer) {
            Ok(Stored::Visible | Stored::Hidden) => {
                self.fresh.store(true, Ordering::Relaxed);
                Ok(Some(version))
            }
            Ok(Stored::Outdated) | Err(_) => Ok(None),
        }
    }
}
