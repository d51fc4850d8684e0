//! One peer's replica of the run's records: the [`RecordStore`] behind a lock, with the clock, the
//! publishing limits, the counters of what was refused and why, and subscriptions to changes.
//!
//! Every way a record enters (a local publish, a SWIM broadcast, an anti-entropy exchange) goes through
//! [`Replica::apply`], so validation, rate limiting, counting and change notification happen in one place.
//! Reads ([`Replica::get`]) are local: no network round trip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use colony_transports::PeerId;
use tokio::sync::broadcast;

use super::rate::{Payer, PublishLimiter, Throttle};
use super::sync::Clock;
use super::wire::WireRecord;
use super::{DigestEntry, Record, RecordError, RecordStore, Stored, Subkey, Time, View};

/// Limits on how often one peer may update one slot (a key and subkey).
#[derive(Debug, Clone, Copy)]
pub struct PublishLimits {
    /// Sustained updates per second per (peer, slot).
    pub rate_per_sec: f64,
    /// Updates allowed at once.
    pub burst: u32,
    /// (peer, slot) pairs tracked at most.
    pub max_tracked: usize,
    /// Sustained records per second per peer over all its slots: records signed by their owner are charged
    /// to the owner, unsigned ones to the peer that sent them (in a budget of their own).
    pub peer_rate_per_sec: f64,
    /// Records per peer allowed at once over all its slots.
    pub peer_burst: u32,
}

impl Default for PublishLimits {
    /// 20 updates a second per slot, bursts of 40: a matchmaking declaration slot takes two updates per
    /// round (declare, withdraw), and a swarm of small models runs several epochs a second, each with a
    /// gradient and a state round; the limit still bounds what one peer can make the swarm gossip. Over
    /// all its slots a peer may publish 500 records a second, bursts of 1,000: an honest peer publishes a
    /// few slots (progress, declarations, state offers), each within its own limit, a flooding one many
    /// distinct keys.
    fn default() -> Self {
        Self {
            rate_per_sec: 20.0,
            burst: 40,
            max_tracked: 100_000,
            peer_rate_per_sec: 500.0,
            peer_burst: 1000,
        }
    }
}

fn describe_throttle(budget: &Throttle) -> String {
    match budget {
        Throttle::Key { rate_per_sec } => format!("this slot faster than {rate_per_sec} updates/s"),
        Throttle::Peer { rate_per_sec } => format!("faster than {rate_per_sec} records/s over all its slots"),
        Throttle::Table { max_tracked } => {
            format!("while the limiter tracks {max_tracked} publishers and slots, all busy")
        }
    }
}

/// Why a record was not applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    /// The record broke a rule of the store.
    #[error(transparent)]
    Invalid(#[from] RecordError),
    /// Its owner (or, unsigned, its sender) publishes faster than the publishing limits allow.
    #[error("record {key}: peer {peer} publishes {}; throttled", describe_throttle(budget))]
    Throttled {
        key: String,
        peer: PeerId,
        /// The budget it exceeded.
        budget: Throttle,
    },
    /// It could not be decoded.
    #[error("{0}")]
    Malformed(String),
    /// Its owner (the peer its subkey names, else the peer that sent it) is not admitted to the run by its
    /// access policy.
    #[error("record {key}: its owner is not admitted to the run: {reason}")]
    NotAdmitted { key: String, owner: PeerId, reason: String },
}

impl Refused {
    /// A short, stable name of the reason, for counters and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Invalid(error) => error.reason(),
            Refused::Throttled { .. } => "throttled",
            Refused::Malformed(_) => "malformed",
            Refused::NotAdmitted { .. } => "not_admitted",
        }
    }
}

/// Every reason a record can be refused for, in the order [`RefusalCounts`] reports them.
pub const REFUSAL_REASONS: [&str; 10] = [
    "expired",
    "invalid_expiration",
    "too_large",
    "bad_signature",
    "unknown_kind",
    "invalid_value",
    "limit_reached",
    "throttled",
    "malformed",
    "not_admitted",
];

/// Counters of records applied and refused (by reason) by one replica. Also exported as the metrics
/// `colony_records_stored_total` and `colony_records_refused_total{reason}`.
#[derive(Debug, Default)]
pub struct RecordCounters {
    stored: AtomicU64,
    refused: [AtomicU64; REFUSAL_REASONS.len()],
}

impl RecordCounters {
    fn count_refusal(&self, reason: &'static str) {
        if let Some(index) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
            self.refused[index].fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!("colony_records_refused_total", "reason" => reason).increment(1);
    }

    /// Records that won their slot.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Records refused for `reason` (one of [`REFUSAL_REASONS`]).
    pub fn refused(&self, reason: &str) -> u64 {
        REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |index| self.refused[index].load(Ordering::Relaxed))
    }

    /// Records refused for any reason.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Decides whether the owner of a record takes part in the run: the run's access control
/// ([`colony_transports::access`]). The replica asks it about every record that passed the store's rules,
/// before storing it, whichever way the record came (published, gossiped, exchanged, relayed by a third
/// peer).
pub trait Admission: Send + Sync {
    /// `Ok` when records owned by `owner` may be stored; `record` is the record in question, which may carry
    /// its owner's credential. The error says why not, in words.
    fn admit(&self, owner: &PeerId, record: &Record) -> Result<(), String>;
}

/// A change of what a read of a key sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The key.
    pub key: String,
    /// The subkey written, `None` for the plain value.
    pub subkey: Option<Subkey>,
    /// The new value, `None` for a deletion.
    pub value: Option<Bytes>,
    /// The entry's expiration.
    pub expiration: Time,
}

/// Why a subscription yielded no change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// The subscriber fell behind and this many changes were dropped; read the keys again with `get`.
    #[error("the subscriber fell behind; {0} changes were dropped")]
    Lagged(u64),
    /// The replica is gone (the peer shut down).
    #[error("the record replica was shut down")]
    Closed,
}

/// A stream of the changes under a key prefix.
pub struct Subscription {
    prefix: String,
    receiver: broadcast::Receiver<Arc<Change>>,
}

impl Subscription {
    /// The next change of a key under the prefix.
    pub async fn next(&mut self) -> Result<Arc<Change>, SubscriptionError> {
        loop {
            match self.receiver.recv().await {
                Ok(change) if change.key.starts_with(&self.prefix) => return Ok(change),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(SubscriptionError::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Err(SubscriptionError::Closed),
            }
        }
    }
}

/// Changes buffered per subscriber before the slowest one lags.
const SUBSCRIPTION_BUFFER: usize = 4096;

/// One peer's replica of the run's records.
pub struct Replica {
    store: Mutex<RecordStore>,
    clock: Clock,
    limiter: Mutex<PublishLimiter>,
    counters: RecordCounters,
    changes: broadcast::Sender<Arc<Change>>,
    admission: Option<Arc<dyn Admission>>,
}

impl Replica {
    /// A replica around `store`, reading time from `clock`.
    pub fn new(store: RecordStore, clock: Clock, limits: PublishLimits) -> Self {
        Self {
            store: Mutex::new(store),
            clock,
            limiter: Mutex::new(
                PublishLimiter::new(limits.rate_per_sec, limits.burst, limits.max_tracked)
                    .with_peer_budget(limits.peer_rate_per_sec, limits.peer_burst),
            ),
            counters: RecordCounters::default(),
            changes: broadcast::channel(SUBSCRIPTION_BUFFER).0,
            admission: None,
        }
    }

    /// The replica, storing only records whose owner `admission` admits (refused ones are counted as
    /// `not_admitted`).
    pub fn with_admission(mut self, admission: Arc<dyn Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// The current time on this replica's clock.
    pub fn now(&self) -> Time {
        (self.clock)()
    }

    /// What was stored and refused so far.
    pub fn counters(&self) -> &RecordCounters {
        &self.counters
    }

    fn lock(&self) -> MutexGuard<'_, RecordStore> {
        // A panic while holding the lock cannot leave the store half-updated in a way that matters more than
        // losing the replica, so a poisoned lock is taken over.
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Validates, rate-limits and stores `record`, written (or relayed) by `writer`. The publishing limit is
    /// charged to the record's owner when its subkey names one, else to `writer`, and only for records that
    /// would win their slot (duplicates relayed by gossip cost nothing).
    pub fn apply(&self, record: Record, writer: PeerId) -> Result<Stored, Refused> {
        let result = self.apply_inner(record, writer);
        match &result {
            Ok(Stored::Visible | Stored::Hidden) => {
                self.counters.stored.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("colony_records_stored_total").increment(1);
            }
            Ok(Stored::Outdated) => {}
            Err(refused) => self.counters.count_refusal(refused.reason()),
        }
        result
    }

    fn apply_inner(&self, record: Record, writer: PeerId) -> Result<Stored, Refused> {
        let now = self.now();
        let mut store = self.lock();
        // A record that cannot win its slot changes nothing, whatever it holds: most of what gossip and
        // anti-entropy bring is such a duplicate, and checking it first spares its signature check.
        if !store.would_win(&record) {
            return Ok(Stored::Outdated);
        }
        store.validate(&record, now)?;
        // Validation proved the signature of a record whose subkey names a peer: it is charged to that
        // owner. Any other record is owned by nobody and charged to the peer that sent it.
        let (owner, payer) = match &record.subkey {
            Some(Subkey::Peer(peer)) => (*peer, Payer::Owner(*peer)),
            _ => (writer, Payer::Sender(writer)),
        };
        if let Some(admission) = &self.admission {
            // After the signature check, so that a record is attributed to its owner only when proven.
            admission
                .admit(&owner, &record)
                .map_err(|reason| Refused::NotAdmitted {
                    key: record.key.clone(),
                    owner,
                    reason,
                })?;
        }
        let slot = match &record.subkey {
            None => record.key.clone(),
            Some(Subkey::Peer(peer)) => format!("{}\u{0}{peer}", record.key),
            Some(Subkey::Name(name)) => format!("{}\u{0}{name}", record.key),
        };
        self.limiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .charge(payer, &slot, now)
            .map_err(|budget| Refused::Throttled {
                key: record.key.clone(),
                peer: owner,
                budget,
            })?;
        let change = Change {
            key: record.key.clone(),
            subkey: record.subkey.clone(),
            value: record.value.clone(),
            expiration: record.expiration,
        };
        let stored = store.insert_validated(record, now)?;
        drop(store);
        if stored == Stored::Visible {
            // No receivers is not an error: nobody subscribed yet.
            let _ = self.changes.send(Arc::new(change));
        }
        Ok(stored)
    }

    /// Decodes and applies a record received from `writer`.
    pub fn apply_wire(&self, wire: WireRecord, writer: PeerId) -> Result<Stored, Refused> {
        match Record::try_from(wire) {
            Ok(record) => self.apply(record, writer),
            Err(error) => {
                self.count_malformed();
                Err(Refused::Malformed(error.to_string()))
            }
        }
    }

    /// Counts a record that could not be decoded at all.
    pub fn count_malformed(&self) {
        self.counters.count_refusal("malformed");
    }

    /// What a read of `key` sees now.
    pub fn get(&self, key: &str) -> Option<View> {
        let now = self.now();
        self.lock().get(key, now)
    }

    /// Changes of keys starting with `prefix`, from now on.
    pub fn subscribe(&self, prefix: impl Into<String>) -> Subscription {
        Subscription {
            prefix: prefix.into(),
            receiver: self.changes.subscribe(),
        }
    }

    /// The digest and fingerprint after dropping expired entries.
    pub fn digest(&self) -> (Arc<[DigestEntry]>, [u8; 32]) {
        let now = self.now();
        let mut store = self.lock();
        store.remove_expired(now);
        store.digest_and_fingerprint()
    }

    /// The records a peer with digest `remote` lacks.
    pub fn missing_from(&self, remote: &[DigestEntry]) -> Vec<Record> {
        let now = self.now();
        self.lock().missing_from(remote, now)
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{RecordLimits, Schemas};
    use colony_transports::Keypair;

    fn replica(limits: PublishLimits) -> Replica {
        let mut schemas = Schemas::default();
        schemas.register_with("p", |_| Ok(()));
        Replica::new(
            RecordStore::new("run", RecordLimits::default(), schemas),
            Arc::new(|| 100.0),
            limits,
        )
    }

    fn own(keypair: &Keypair, expiration: Time) -> Record {
        Record::signed(
            "run",
            keypair,
            "p",
            Some(Subkey::Peer(keypair.peer_id())),
            Some(Bytes::from_static(b"v")),
            expiration,
        )
    }

    #[tokio::test]
    async fn visible_changes_reach_subscribers_of_their_prefix() {
        let replica = replica(PublishLimits::default());
        let keypair = Keypair::from_seed([1; 32]);
        let mut all = replica.subscribe("p");
        let mut none = replica.subscribe("q");
        assert_eq!(
            replica.apply(own(&keypair, 200.0), keypair.peer_id()),
            Ok(Stored::Visible)
        );
        assert_eq!(all.next().await.unwrap().expiration, 200.0);
        // Outdated duplicates notify nobody and cost no tokens.
        assert_eq!(
            replica.apply(own(&keypair, 200.0), keypair.peer_id()),
            Ok(Stored::Outdated)
        );
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), none.next())
                .await
                .is_err()
        );
        assert_eq!(replica.counters().stored(), 1);
    }

    #[test]
    fn a_writer_over_its_limit_is_throttled_and_counted() {
        let replica = replica(PublishLimits {
            rate_per_sec: 0.0,
            burst: 2,
            max_tracked: 10,
            ..PublishLimits::default()
        });
        let keypair = Keypair::from_seed([2; 32]);
        let relay = Keypair::from_seed([3; 32]).peer_id();
        // The owner is charged even when another peer relays the record.
        assert!(replica.apply(own(&keypair, 201.0), relay).is_ok());
        assert!(replica.apply(own(&keypair, 202.0), relay).is_ok());
        let refused = replica.apply(own(&keypair, 203.0), relay).unwrap_err();
        assert_eq!(refused.reason(), "throttled");
        assert!(
            refused.to_string().contains(&keypair.peer_id().to_string()),
            "{refused}"
        );
        assert_eq!(replica.counters().refused("throttled"), 1);
        // A forged record is counted under its own reason.
        let mut forged = own(&keypair, 300.0);
        forged.value = Some(Bytes::from_static(b"changed"));
        assert_eq!(replica.apply(forged, relay).unwrap_err().reason(), "bad_signature");
        assert_eq!(replica.counters().refused("bad_signature"), 1);
        assert_eq!(replica.counters().refused_total(), 2);
    }
}
