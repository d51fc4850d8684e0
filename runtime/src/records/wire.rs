//! Records and digests on the wire: rkyv archives, validated on receipt, converted to [`Record`]s only when
//! every field is well-formed.

use bytes::Bytes;
use colony_transports::identity::{PEER_ID_LEN, PeerId, SIGNATURE_LEN};
use colony_transports::wire::WireMessage;

use super::{DigestEntry, Record, Subkey, Time};

const NO_SUBKEY: u8 = 0;
const PEER_SUBKEY: u8 = 1;
const NAME_SUBKEY: u8 = 2;

/// A record as it travels.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireRecord {
    key: String,
    subkey_kind: u8,
    subkey: Vec<u8>,
    value: Option<Vec<u8>>,
    expiration: Time,
    signature: Option<[u8; SIGNATURE_LEN]>,
}

/// A digest entry as it travels.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireDigestEntry {
    key: String,
    subkey_kind: u8,
    subkey: Vec<u8>,
    expiration: Time,
}

/// A batch of records and, optionally, the sender's digest: what the anti-entropy exchange sends.
#[derive(Debug, Clone, PartialEq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireBatch {
    /// Records for the receiver.
    pub records: Vec<WireRecord>,
    /// The sender's digest, sorted as [`super::RecordStore::digest`] returns it.
    pub digest: Vec<WireDigestEntry>,
}

/// A malformed record or digest entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed record on the wire: {0}")]
pub struct MalformedRecord(pub String);

fn subkey_to_wire(subkey: &Option<Subkey>) -> (u8, Vec<u8>) {
    match subkey {
        None => (NO_SUBKEY, Vec::new()),
        Some(Subkey::Peer(peer)) => (PEER_SUBKEY, peer.as_bytes().to_vec()),
        Some(Subkey::Name(name)) => (NAME_SUBKEY, name.as_bytes().to_vec()),
    }
}

fn subkey_from_wire(kind: u8, bytes: Vec<u8>) -> Result<Option<Subkey>, MalformedRecord> {
    match kind {
        NO_SUBKEY if bytes.is_empty() => Ok(None),
        PEER_SUBKEY if bytes.len() == PEER_ID_LEN => Ok(Some(Subkey::Peer(
            PeerId::try_from_slice(&bytes).map_err(|e| MalformedRecord(e.to_string()))?,
        ))),
        NAME_SUBKEY => String::from_utf8(bytes)
            .map(|name| Some(Subkey::Name(name)))
            .map_err(|_| MalformedRecord("subkey name is not UTF-8".into())),
        other => Err(MalformedRecord(format!(
            "subkey kind {other} with {} bytes",
            bytes.len()
        ))),
    }
}

impl From<&Record> for WireRecord {
    fn from(record: &Record) -> Self {
        let (subkey_kind, subkey) = subkey_to_wire(&record.subkey);
        Self {
            key: record.key.clone(),
            subkey_kind,
            subkey,
            value: record.value.as_ref().map(|value| value.to_vec()),
            expiration: record.expiration,
            signature: record.signature,
        }
    }
}

impl TryFrom<WireRecord> for Record {
    type Error = MalformedRecord;

    fn try_from(wire: WireRecord) -> Result<Self, Self::Error> {
        Ok(Record {
            subkey: subkey_from_wire(wire.subkey_kind, wire.subkey)?,
            key: wire.key,
            value: wire.value.map(Bytes::from),
            expiration: wire.expiration,
            signature: wire.signature,
        })
    }
}

impl From<&DigestEntry> for WireDigestEntry {
    fn from(entry: &DigestEntry) -> Self {
        let (subkey_kind, subkey) = subkey_to_wire(&entry.subkey);
        Self {
            key: entry.key.clone(),
            subkey_kind,
            subkey,
            expiration: entry.expiration,
        }
    }
}

impl TryFrom<WireDigestEntry> for DigestEntry {
    type Error = MalformedRecord;

    fn try_from(wire: WireDigestEntry) -> Result<Self, Self::Error> {
        Ok(DigestEntry {
            subkey: subkey_from_wire(wire.subkey_kind, wire.subkey)?,
            key: wire.key,
            expiration: wire.expiration,
        })
    }
}

impl WireBatch {
    /// Encodes the batch (as a frame payload: batches can be larger than a frame header may be).
    pub fn encode(&self) -> Result<Bytes, MalformedRecord> {
        WireMessage::encode(self)
            .map(|bytes| Bytes::from(bytes.to_vec()))
            .map_err(|e| MalformedRecord(e.to_string()))
    }

    /// Validates and decodes a batch received as bytes (any alignment).
    pub fn decode(bytes: &[u8]) -> Result<Self, MalformedRecord> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        let archived = Self::access_archived(&aligned).map_err(|e| MalformedRecord(e.to_string()))?;
        Self::decode_archived(archived).map_err(|e| MalformedRecord(e.to_string()))
    }

    /// The batch's digest as digest entries, sorted.
    pub fn digest_entries(&self) -> Result<Vec<DigestEntry>, MalformedRecord> {
        let mut entries = self
            .digest
            .iter()
            .cloned()
            .map(DigestEntry::try_from)
            .collect::<Result<Vec<DigestEntry>, _>>()?;
        // A peer might send it unsorted; `missing_from` needs the order.
        entries.sort_by(|a, b| (&a.key, &a.subkey).cmp(&(&b.key, &b.subkey)));
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_transports::Keypair;

    #[test]
    fn records_round_trip_through_the_wire() {
        let keypair = Keypair::from_seed([9; 32]);
        let records = vec![
            Record {
                key: "k".into(),
                subkey: None,
                value: Some(Bytes::from_static(b"v")),
                expiration: 5.5,
                signature: None,
            },
            Record {
                key: "k".into(),
                subkey: Some(Subkey::Name("n".into())),
                value: None,
                expiration: 6.0,
                signature: None,
            },
            Record::signed(
                "run",
                &keypair,
                "p",
                Some(Subkey::Peer(keypair.peer_id())),
                Some(Bytes::from_static(b"x")),
                7.0,
            ),
        ];
        let batch = WireBatch {
            records: records.iter().map(WireRecord::from).collect(),
            digest: vec![WireDigestEntry::from(&DigestEntry {
                key: "k".into(),
                subkey: None,
                expiration: 5.5,
            })],
        };
        let decoded = WireBatch::decode(&batch.encode().unwrap()).unwrap();
        let back: Vec<Record> = decoded
            .records
            .into_iter()
            .map(|r| Record::try_from(r).unwrap())
            .collect();
        assert_eq!(back, records);
    }

    #[test]
    fn malformed_batches_and_subkeys_are_refused() {
        assert!(WireBatch::decode(b"garbage bytes that are not an archive").is_err());
        assert!(WireBatch::decode(&[]).is_err());
        let bad_peer = WireRecord {
            key: "k".into(),
            subkey_kind: PEER_SUBKEY,
            subkey: vec![1, 2, 3],
            value: None,
            expiration: 1.0,
            signature: None,
        };
        assert!(Record::try_from(bad_peer).is_err());
        let bad_kind = WireRecord {
            key: "k".into(),
            subkey_kind: 9,
            subkey: vec![],
            value: None,
            expiration: 1.0,
            signature: None,
        };
        assert!(Record::try_from(bad_kind).is_err());
    }
}
