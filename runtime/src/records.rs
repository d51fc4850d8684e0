//! The record store core: the small, signed, expiring records every peer of a run holds (progress,
//! matchmaking declarations, state-sharing offers). Pure: no I/O, no clock; time is passed in as seconds.
//!
//! A key holds either a *plain value* or a *dictionary* of subkeys, each entry with its own value and
//! absolute expiration, following Hivemind's DHT storage rules:
//!
//! - a write to a slot (the plain value, or one subkey) wins only with a strictly later expiration;
//! - entries expire at their expiration time and disappear;
//! - storing `None` with a later expiration deletes (the tombstone blocks older writes until it expires);
//! - the plain value is what a read sees only while its expiration is later than every subkey's; otherwise
//!   a read sees the dictionary of subkeys (a dictionary's expiration is its latest subkey's);
//! - a subkey that names a peer ([`Subkey::Peer`]) is accepted only with that peer's signature over
//!   (run id, key, subkey, value, expiration), so nobody else can write it, even after the peer left.
//!
//! Unlike Hivemind's storage, the result does not depend on the order in which writes arrive: each slot
//! keeps its latest write (ties broken by the bytes, so equal writes are idempotent) and what a read sees is
//! derived from the slots. The one visible difference: a plain value that overrides a dictionary *hides*
//! its subkeys instead of deleting them, so if a still newer subkey arrives later, the older unexpired
//! subkeys are seen again. That is what makes every peer converge whatever the delivery order.
//!
//! Values are typed per key kind: a [`Schemas`] registry maps the kind (the key up to its first `/`) to a
//! validator, usually an rkyv schema ([`Schemas::register`]). Limits bound keys, values and the number of
//! records each peer may own.

pub mod rate;
pub mod replica;
pub mod sync;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;
use colony_transports::identity::{Keypair, PeerId, SIGNATURE_LEN};
use colony_transports::wire::WireMessage;

/// Seconds since the Unix epoch, as every peer's clock reads it.
pub type Time = f64;

/// The second level of a key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subkey {
    /// A subkey owned by a peer: only that peer's signature makes a write valid.
    Peer(PeerId),
    /// A free-form subkey, writable by anyone in the run.
    Name(String),
}

impl Subkey {
    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Subkey::Peer(peer) => {
                out.push(1);
                out.extend_from_slice(peer.as_bytes());
            }
            Subkey::Name(name) => {
                out.push(2);
                put_bytes(out, name.as_bytes());
            }
        }
    }
}

/// One write: a plain value (`subkey: None`) or one subkey of a dictionary.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The key, `<kind>` or `<kind>/<rest>`.
    pub key: String,
    /// The subkey, or `None` for the plain value.
    pub subkey: Option<Subkey>,
    /// The value, or `None` to delete.
    pub value: Option<Bytes>,
    /// When the entry expires.
    pub expiration: Time,
    /// The owner's signature, required for [`Subkey::Peer`] subkeys.
    pub signature: Option<[u8; SIGNATURE_LEN]>,
}

impl Record {
    /// A record signed by `keypair` (required when the subkey is `keypair`'s [`Subkey::Peer`]).
    pub fn signed(
        run_id: &str,
        keypair: &Keypair,
        key: impl Into<String>,
        subkey: Option<Subkey>,
        value: Option<Bytes>,
        expiration: Time,
    ) -> Self {
        let mut record = Record {
            key: key.into(),
            subkey,
            value,
            expiration,
            signature: None,
        };
        record.signature = Some(keypair.sign(&record.signed_bytes(run_id)));
        record
    }

    /// The bytes a signature covers: a domain tag, the run id, key, subkey, value and expiration, each
    /// length-prefixed so that no two records share an encoding.
    pub fn signed_bytes(&self, run_id: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.key.len() + self.value.as_ref().map_or(0, Bytes::len));
        out.extend_from_slice(b"colony/record/1");
        put_bytes(&mut out, run_id.as_bytes());
        put_bytes(&mut out, self.key.as_bytes());
        match &self.subkey {
            None => out.push(0),
            Some(subkey) => subkey.encode_into(&mut out),
        }
        match &self.value {
            None => out.push(0),
            Some(value) => {
                out.push(1);
                put_bytes(&mut out, value);
            }
        }
        out.extend_from_slice(&self.expiration.to_bits().to_le_bytes());
        out
    }

    /// The kind of the key: the part before the first `/`.
    pub fn kind(&self) -> &str {
        self.key.split('/').next().unwrap_or("")
    }
}

/// Signatures verified so far in this process, as hashes of (peer, message, signature), in two
/// generations of at most [`VERIFIED_GENERATION`] each. Verification is a pure function of those three,
/// so a record that reaches a peer many times (gossip, anti-entropy), or many peers simulated in one
/// process, is verified once. Both generations are allocated at their full size on first use (about
/// 270 KiB each), so the cache costs the same memory from the first record on: a peer's memory does not
/// creep up while the cache fills.
type Generations = (HashSet<[u8; 32]>, HashSet<[u8; 32]>);
static VERIFIED: LazyLock<Mutex<Generations>> = LazyLock::new(|| {
    Mutex::new((
        HashSet::with_capacity(VERIFIED_GENERATION),
        HashSet::with_capacity(VERIFIED_GENERATION),
    ))
});
/// Records a swarm publishes in the time gossip takes to deliver them everywhere: a generation lasts tens
/// of seconds in a busy swarm, much longer than duplicates take to arrive, and holds every record of a
/// 1,000-peer simulation in one process.
const VERIFIED_GENERATION: usize = 4096;

fn verify_signature(peer: &PeerId, message: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    hasher.update(b"colony/verified/1");
    hasher.update(peer.as_bytes());
    hasher.update(&(message.len() as u64).to_le_bytes());
    hasher.update(message);
    hasher.update(signature);
    let mut key = [0u8; 32];
    key.copy_from_slice(hasher.finish().as_ref());
    {
        let verified = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
        if verified.0.contains(&key) || verified.1.contains(&key) {
            return true;
        }
    }
    if peer.verify(message, signature).is_err() {
        return false;
    }
    let mut verified = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
    if verified.0.len() >= VERIFIED_GENERATION {
        // The older generation's table is cleared and reused for the new one: no reallocation.
        let (young, old) = &mut *verified;
        std::mem::swap(young, old);
        young.clear();
    }
    verified.0.insert(key);
    true
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A stored entry of one slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The value, or `None` for a deletion.
    pub value: Option<Bytes>,
    /// When it expires.
    pub expiration: Time,
    /// The writer's signature, if the record carried one.
    pub signature: Option<[u8; SIGNATURE_LEN]>,
}

impl Entry {
    /// The record that wrote this entry.
    fn to_record(&self, key: &str, subkey: Option<&Subkey>) -> Record {
        Record {
            key: key.to_owned(),
            subkey: subkey.cloned(),
            value: self.value.clone(),
            expiration: self.expiration,
            signature: self.signature,
        }
    }

    /// Whether `self` wins over `other` in the same slot: a later expiration, or at the same expiration the
    /// greater bytes (so that replicas agree whichever arrived first).
    fn beats(&self, other: &Entry) -> bool {
        match self.expiration.total_cmp(&other.expiration) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => (&self.value, self.signature) > (&other.value, other.signature),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Slots {
    plain: Option<Entry>,
    subkeys: BTreeMap<Subkey, Entry>,
    /// The latest expiration among the subkeys (a dictionary's expiration).
    latest_subkey: Option<Time>,
    /// Subkeys holding a value (not a deletion).
    live_subkeys: usize,
    /// No entry expires before this (it may be earlier than the true minimum; then a scan finds nothing).
    earliest: Time,
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            plain: None,
            subkeys: BTreeMap::new(),
            latest_subkey: None,
            live_subkeys: 0,
            earliest: Time::INFINITY,
        }
    }
}

/// What a read of one key shows, as far as one write can change it: compared before and after a write to
/// tell whether the write was visible, without building the whole dictionary.
#[derive(Debug, PartialEq)]
enum Glance {
    Nothing,
    Value(Bytes, Time),
    Dictionary {
        expiration: Time,
        entry: Option<(Bytes, Time)>,
    },
}

impl Slots {
    fn glance(&self, subkey: Option<&Subkey>) -> Glance {
        if let Some(plain) = &self.plain
            && self.latest_subkey.is_none_or(|latest| plain.expiration > latest)
        {
            return match &plain.value {
                Some(value) => Glance::Value(value.clone(), plain.expiration),
                None => Glance::Nothing,
            };
        }
        match self.latest_subkey {
            Some(expiration) if self.live_subkeys > 0 => Glance::Dictionary {
                expiration,
                entry: subkey
                    .and_then(|subkey| self.subkeys.get(subkey))
                    .and_then(|entry| entry.value.clone().map(|value| (value, entry.expiration))),
            },
            _ => Glance::Nothing,
        }
    }

    fn put(&mut self, subkey: Option<Subkey>, entry: Entry) {
        self.earliest = self.earliest.min(entry.expiration);
        match subkey {
            None => self.plain = Some(entry),
            Some(subkey) => {
                let expiration = entry.expiration;
                let live = entry.value.is_some();
                let old = self.subkeys.insert(subkey, entry);
                if old.is_some_and(|old| old.value.is_some()) {
                    self.live_subkeys -= 1;
                }
                if live {
                    self.live_subkeys += 1;
                }
                self.latest_subkey = Some(self.latest_subkey.map_or(expiration, |l| l.max(expiration)));
            }
        }
    }

    /// Recomputes the aggregates after entries were removed.
    fn recount(&mut self) {
        self.latest_subkey = self.subkeys.values().map(|e| e.expiration).max_by(f64::total_cmp);
        self.live_subkeys = self.subkeys.values().filter(|e| e.value.is_some()).count();
        self.earliest = self
            .subkeys
            .values()
            .chain(self.plain.iter())
            .map(|e| e.expiration)
            .fold(Time::INFINITY, f64::min);
    }

    fn view(&self) -> Option<View> {
        if let Some(plain) = &self.plain
            && self.latest_subkey.is_none_or(|latest| plain.expiration > latest)
        {
            return plain.value.clone().map(|value| View::Value {
                value,
                expiration: plain.expiration,
            });
        }
        let entries: BTreeMap<Subkey, (Bytes, Time)> = self
            .subkeys
            .iter()
            .filter_map(|(subkey, entry)| {
                entry
                    .value
                    .clone()
                    .map(|value| (subkey.clone(), (value, entry.expiration)))
            })
            .collect();
        let expiration = self.latest_subkey?;
        (!entries.is_empty()).then_some(View::Dictionary { entries, expiration })
    }

    fn is_empty(&self) -> bool {
        self.plain.is_none() && self.subkeys.is_empty()
    }
}

/// What a read of a key returns.
#[derive(Debug, Clone, PartialEq)]
pub enum View {
    /// A plain value.
    Value { value: Bytes, expiration: Time },
    /// The merged dictionary of live subkeys; its expiration is the latest subkey's.
    Dictionary {
        entries: BTreeMap<Subkey, (Bytes, Time)>,
        expiration: Time,
    },
}

/// A (key, subkey, expiration) triple, for anti-entropy digests.
#[derive(Debug, Clone, PartialEq)]
pub struct DigestEntry {
    /// The key.
    pub key: String,
    /// The subkey, `None` for the plain value.
    pub subkey: Option<Subkey>,
    /// The expiration of the entry held.
    pub expiration: Time,
}

type Validator = Box<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// Validators of values by key kind. A record whose kind has no validator is refused.
#[derive(Default)]
pub struct Schemas {
    validators: HashMap<String, Validator>,
}

impl Schemas {
    /// Values of keys of `kind` must be valid rkyv archives of `T`.
    pub fn register<T: WireMessage>(&mut self, kind: &str) -> &mut Self {
        self.register_with(kind, |bytes| {
            // Network bytes may sit at any address; rkyv validates only aligned input.
            let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
            aligned.extend_from_slice(bytes);
            T::access_archived(&aligned).map(|_| ()).map_err(|e| e.to_string())
        })
    }

    /// Values of keys of `kind` must pass `validator`.
    pub fn register_with(
        &mut self,
        kind: &str,
        validator: impl Fn(&[u8]) -> Result<(), String> + Send + Sync + 'static,
    ) -> &mut Self {
        self.validators.insert(kind.to_owned(), Box::new(validator));
        self
    }
}

/// Limits of a record store.
#[derive(Debug, Clone)]
pub struct RecordLimits {
    /// Longest key.
    pub max_key_bytes: usize,
    /// Longest subkey name.
    pub max_subkey_bytes: usize,
    /// Largest value.
    pub max_value_bytes: usize,
    /// Entries one peer may own ([`Subkey::Peer`] subkeys naming it), over all keys.
    pub max_records_per_peer: usize,
    /// Entries in the whole store.
    pub max_records: usize,
}

impl Default for RecordLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 256,
            max_subkey_bytes: 256,
            max_value_bytes: 16 * 1024,
            max_records_per_peer: 64,
            max_records: 100_000,
        }
    }
}

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    /// The record expired before it was stored.
    #[error("record {key} expired at {expiration}, before it was stored (now {now})")]
    Expired { key: String, expiration: Time, now: Time },
    /// The expiration is not a finite number.
    #[error("record {key} has an invalid expiration {expiration}")]
    InvalidExpiration { key: String, expiration: Time },
    /// A size limit was exceeded.
    #[error("record {key}: {what} of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        key: String,
        what: &'static str,
        len: usize,
        limit: usize,
    },
    /// The owner's signature is missing or wrong.
    #[error("record {key}: subkey of peer {peer} {problem}")]
    BadSignature {
        key: String,
        peer: PeerId,
        problem: &'static str,
    },
    /// No validator for this key kind.
    #[error("record {key}: unknown key kind '{kind}'")]
    UnknownKind { key: String, kind: String },
    /// The value does not match the key kind's schema.
    #[error("record {key}: invalid value for kind '{kind}': {reason}")]
    InvalidValue { key: String, kind: String, reason: String },
    /// A count limit was reached.
    #[error("record {key}: {what} limit of {limit} reached")]
    LimitReached {
        key: String,
        what: &'static str,
        limit: usize,
    },
}

impl RecordError {
    /// A short, stable name of the kind of refusal, for counters and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::Expired { .. } => "expired",
            RecordError::InvalidExpiration { .. } => "invalid_expiration",
            RecordError::TooLarge { .. } => "too_large",
            RecordError::BadSignature { .. } => "bad_signature",
            RecordError::UnknownKind { .. } => "unknown_kind",
            RecordError::InvalidValue { .. } => "invalid_value",
            RecordError::LimitReached { .. } => "limit_reached",
        }
    }
}

/// What a successful store did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The write won its slot and changed what a read sees.
    Visible,
    /// The write won its slot but a read does not see it (a newer plain value or dictionary hides it).
    Hidden,
    /// The slot already held this write or a newer one; nothing changed.
    Outdated,
}

/// The record store of one run.
pub struct RecordStore {
    run_id: String,
    limits: RecordLimits,
    schemas: Schemas,
    keys: HashMap<String, Slots>,
    per_peer: HashMap<PeerId, usize>,
    entries: usize,
    /// No entry expires before this (may be earlier than the true minimum).
    earliest: Time,
    /// The digest and its fingerprint, until the next change.
    digest_cache: Option<(Arc<[DigestEntry]>, [u8; 32])>,
}

impl RecordStore {
    /// An empty store for `run_id`.
    pub fn new(run_id: impl Into<String>, limits: RecordLimits, schemas: Schemas) -> Self {
        Self {
            run_id: run_id.into(),
            limits,
            schemas,
            keys: HashMap::new(),
            per_peer: HashMap::new(),
            entries: 0,
            earliest: Time::INFINITY,
            digest_cache: None,
        }
    }

    /// The run this store belongs to.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Checks everything about `record` that does not depend on the store's contents.
    pub fn validate(&self, record: &Record, now: Time) -> Result<(), RecordError> {
        let key = || record.key.clone();
        if !record.expiration.is_finite() {
            return Err(RecordError::InvalidExpiration {
                key: key(),
                expiration: record.expiration,
            });
        }
        if record.expiration <= now {
            return Err(RecordError::Expired {
                key: key(),
                expiration: record.expiration,
                now,
            });
        }
        let too_large = |what, len, limit| RecordError::TooLarge {
            key: key(),
            what,
            len,
            limit,
        };
        if record.key.len() > self.limits.max_key_bytes {
            return Err(too_large("key", record.key.len(), self.limits.max_key_bytes));
        }
        if let Some(Subkey::Name(name)) = &record.subkey
            && name.len() > self.limits.max_subkey_bytes
        {
            return Err(too_large("subkey", name.len(), self.limits.max_subkey_bytes));
        }
        if let Some(value) = &record.value {
            if value.len() > self.limits.max_value_bytes {
                return Err(too_large("value", value.len(), self.limits.max_value_bytes));
            }
            let kind = record.kind();
            let validator = self
                .schemas
                .validators
                .get(kind)
                .ok_or_else(|| RecordError::UnknownKind {
                    key: key(),
                    kind: kind.to_owned(),
                })?;
            validator(value).map_err(|reason| RecordError::InvalidValue {
                key: key(),
                kind: kind.to_owned(),
                reason,
            })?;
        }
        if let Some(Subkey::Peer(peer)) = &record.subkey {
            let signature = record.signature.ok_or(RecordError::BadSignature {
                key: key(),
                peer: *peer,
                problem: "is not signed",
            })?;
            if !verify_signature(peer, &record.signed_bytes(&self.run_id), &signature) {
                return Err(RecordError::BadSignature {
                    key: key(),
                    peer: *peer,
                    problem: "carries a signature that is not the owner's",
                });
            }
        }
        Ok(())
    }

    /// Stores `record` if it is valid and newer than what its slot holds.
    pub fn store(&mut self, record: Record, now: Time) -> Result<Stored, RecordError> {
        self.validate(&record, now)?;
        self.insert_validated(record, now)
    }

    /// [`RecordStore::store`] for a record that [`RecordStore::validate`] accepted at `now`.
    pub(crate) fn insert_validated(&mut self, record: Record, now: Time) -> Result<Stored, RecordError> {
        self.remove_expired_key(&record.key, now);
        let before = self
            .keys
            .get(&record.key)
            .map_or(Glance::Nothing, |slots| slots.glance(record.subkey.as_ref()));
        let entry = Entry {
            value: record.value,
            expiration: record.expiration,
            signature: record.signature,
        };
        let slots = self.keys.get(&record.key);
        let current = slots.and_then(|slots| match &record.subkey {
            None => slots.plain.as_ref(),
            Some(subkey) => slots.subkeys.get(subkey),
        });
        if current.is_some_and(|current| !entry.beats(current)) {
            return Ok(Stored::Outdated);
        }
        if current.is_none() {
            let owner = match &record.subkey {
                Some(Subkey::Peer(peer)) => Some(*peer),
                _ => None,
            };
            let over_quota = |store: &Self| {
                store.entries >= store.limits.max_records
                    || owner.is_some_and(|peer| {
                        store.per_peer.get(&peer).copied().unwrap_or(0) >= store.limits.max_records_per_peer
                    })
            };
            if over_quota(self) {
                // Expired entries elsewhere may still count against the limits.
                self.remove_expired(now);
            }
            if self.entries >= self.limits.max_records {
                return Err(RecordError::LimitReached {
                    key: record.key,
                    what: "records in the store",
                    limit: self.limits.max_records,
                });
            }
            if let Some(Subkey::Peer(peer)) = &record.subkey {
                let owned = self.per_peer.get(peer).copied().unwrap_or(0);
                if owned >= self.limits.max_records_per_peer {
                    return Err(RecordError::LimitReached {
                        key: record.key,
                        what: "records per peer",
                        limit: self.limits.max_records_per_peer,
                    });
                }
                self.per_peer.insert(*peer, owned + 1);
            }
            self.entries += 1;
        }
        self.earliest = self.earliest.min(entry.expiration);
        self.digest_cache = None;
        let slots = self.keys.entry(record.key.clone()).or_default();
        let subkey = record.subkey;
        slots.put(subkey.clone(), entry);
        let after = slots.glance(subkey.as_ref());
        Ok(if after != before {
            Stored::Visible
        } else {
            Stored::Hidden
        })
    }

    /// What a read of `key` sees at `now`: the plain value or the merged dictionary, without deletions.
    pub fn get(&mut self, key: &str, now: Time) -> Option<View> {
        self.remove_expired_key(key, now);
        self.keys.get(key).and_then(Slots::view)
    }

    /// Drops every entry that expired at `now`.
    pub fn remove_expired(&mut self, now: Time) {
        if self.earliest > now {
            return;
        }
        let due: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, slots)| slots.earliest <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            self.remove_expired_key(&key, now);
        }
        self.earliest = self.keys.values().map(|s| s.earliest).fold(Time::INFINITY, f64::min);
    }

    fn remove_expired_key(&mut self, key: &str, now: Time) {
        let Some(slots) = self.keys.get_mut(key) else { return };
        if slots.earliest > now {
            return;
        }
        let mut removed = 0;
        if slots.plain.as_ref().is_some_and(|entry| entry.expiration <= now) {
            slots.plain = None;
            removed += 1;
        }
        let per_peer = &mut self.per_peer;
        slots.subkeys.retain(|subkey, entry| {
            if entry.expiration > now {
                return true;
            }
            removed += 1;
            if let Subkey::Peer(peer) = subkey
                && let Some(count) = per_peer.get_mut(peer)
            {
                *count -= 1;
                if *count == 0 {
                    per_peer.remove(peer);
                }
            }
            false
        });
        slots.recount();
        self.entries -= removed;
        if removed > 0 {
            self.digest_cache = None;
        }
        if slots.is_empty() {
            self.keys.remove(key);
        }
    }

    /// Whether `record` would win its slot (checked before a rate limit is charged for it). It does not
    /// validate the record.
    pub fn would_win(&self, record: &Record) -> bool {
        let entry = Entry {
            value: record.value.clone(),
            expiration: record.expiration,
            signature: record.signature,
        };
        let current = self.keys.get(&record.key).and_then(|slots| match &record.subkey {
            None => slots.plain.as_ref(),
            Some(subkey) => slots.subkeys.get(subkey),
        });
        current.is_none_or(|current| entry.beats(current))
    }

    /// A hash of the digest: two stores with the same fingerprint hold the same slots at the same
    /// expirations, so an anti-entropy exchange between them can stop after comparing fingerprints.
    pub fn fingerprint(&mut self) -> [u8; 32] {
        self.digest_and_fingerprint().1
    }

    /// The digest and its fingerprint, computed once per change of the store.
    pub fn digest_and_fingerprint(&mut self) -> (Arc<[DigestEntry]>, [u8; 32]) {
        if let Some(cached) = &self.digest_cache {
            return cached.clone();
        }
        let digest: Arc<[DigestEntry]> = self.digest().into();
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut scratch = Vec::with_capacity(128);
        for entry in digest.iter() {
            scratch.clear();
            put_bytes(&mut scratch, entry.key.as_bytes());
            match &entry.subkey {
                None => scratch.push(0),
                Some(subkey) => subkey.encode_into(&mut scratch),
            }
            scratch.extend_from_slice(&entry.expiration.to_bits().to_le_bytes());
            hasher.update(&scratch);
        }
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(hasher.finish().as_ref());
        self.digest_cache = Some((digest.clone(), fingerprint));
        (digest, fingerprint)
    }

    /// Every entry held, as (key, subkey, expiration), sorted: what an anti-entropy exchange compares.
    pub fn digest(&self) -> Vec<DigestEntry> {
        let mut out: Vec<DigestEntry> = self
            .entries()
            .map(|(key, subkey, entry)| DigestEntry {
                key: key.clone(),
                subkey: subkey.cloned(),
                expiration: entry.expiration,
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.key, &a.subkey)
                .cmp(&(&b.key, &b.subkey))
                .then(a.expiration.total_cmp(&b.expiration))
        });
        out
    }

    /// What a peer whose digest is `remote` lacks: every record held here whose slot the remote does not
    /// have, or has with an older expiration. (Equal expirations are left to the next full exchange: the
    /// digest does not carry the bytes that break such ties.) `remote` must be sorted as
    /// [`RecordStore::digest`] returns it.
    pub fn missing_from(&self, remote: &[DigestEntry], now: Time) -> Vec<Record> {
        let held_remotely = |key: &str, subkey: Option<&Subkey>| {
            remote
                .binary_search_by(|entry| (entry.key.as_str(), entry.subkey.as_ref()).cmp(&(key, subkey)))
                .ok()
                .map(|index| remote[index].expiration)
        };
        let lacking = |key: &str, subkey: Option<&Subkey>, entry: &Entry| {
            entry.expiration > now && held_remotely(key, subkey).is_none_or(|theirs| entry.expiration > theirs)
        };
        self.entries()
            .filter(|(key, subkey, entry)| lacking(key, *subkey, entry))
            .map(|(key, subkey, entry)| entry.to_record(key, subkey))
            .collect()
    }

    /// The records held, to send to a peer (every entry as the record that wrote it).
    pub fn records(&self) -> Vec<Record> {
        self.entries()
            .map(|(key, subkey, entry)| entry.to_record(key, subkey))
            .collect()
    }

    /// Every entry held, as (key, subkey, entry).
    fn entries(&self) -> impl Iterator<Item = (&String, Option<&Subkey>, &Entry)> {
        self.keys.iter().flat_map(|(key, slots)| {
            let plain = slots.plain.iter().map(move |entry| (key, None, entry));
            let subkeys = slots
                .subkeys
                .iter()
                .map(move |(subkey, entry)| (key, Some(subkey), entry));
            plain.chain(subkeys)
        })
    }

    /// How many entries (plain values, subkeys and deletions) the store holds.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

#[cfg(test)]
mod tests;
